//! The sharder: decides where one batch ends and the next begins (DESIGN §6).
//!
//! It owns the batch limits and the greedy rule that applies them: chunks arrive one at a time,
//! in id order, each as its token count and the byte length of its JSONL line; each either joins
//! the open batch, seals it and opens the next, or is too large for any batch. The rule needs
//! only the open batch's running tally, so the plan can stream millions of chunks through it.
//!
//! It does no I/O and knows nothing of chunks, files or tokenizers: the plan counts tokens
//! (see `tokens`), writes the input files, and records skipped chunks with the reason it is
//! given here.

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// The caps every batch of a run must respect, recorded in `run.json` by `plan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchLimits {
    /// Requests per batch (`--max-requests-per-batch`). The provider caps both requests and
    /// embedding inputs per batch at 50,000, and each request carries one input.
    pub max_requests: u32,
    /// Bytes of the input file (`--max-bytes-per-batch`), newlines included.
    pub max_bytes: u64,
    /// Exact tokens per batch (`--max-tokens-per-batch`).
    pub max_tokens: Option<u64>,
    /// `--max-enqueued-tokens`: no batch may exceed it on its own, or it could never be
    /// enqueued. A batch counts as [`BatchTally::enqueued_estimate`].
    pub max_enqueued_tokens: Option<u64>,
}

impl BatchLimits {
    /// The provider's cap on requests (and on embedding inputs) per batch.
    pub const MAX_REQUESTS: u32 = 50_000;
    /// 180 MiB: under the provider's 200 MB file cap with room to spare.
    pub const DEFAULT_MAX_BYTES: u64 = 188_743_680;
    /// The provider's cap on an input file (OpenAI: 200 MB): `--max-bytes-per-batch` above it
    /// is refused when the arguments are read.
    pub const PROVIDER_MAX_BYTES: u64 = 200 * 1024 * 1024;

    /// Checks the limits a user gave. The sharder itself stays well-defined on any limits (an
    /// item that cannot fit is reported [`Placement::TooLarge`]), but a zero cap would make
    /// every chunk unsendable, which is never what the user meant.
    pub fn validate(&self) -> Result<(), LimitsError> {
        if !(1..=Self::MAX_REQUESTS).contains(&self.max_requests) {
            return Err(LimitsError::Requests {
                value: self.max_requests,
            });
        }
        if self.max_bytes == 0 {
            return Err(LimitsError::ZeroBytes);
        }
        if self.max_tokens == Some(0) {
            return Err(LimitsError::ZeroTokens);
        }
        if self.max_enqueued_tokens == Some(0) {
            return Err(LimitsError::ZeroEnqueuedTokens);
        }
        Ok(())
    }

    /// Whether a batch with this tally respects every limit.
    fn allows(&self, tally: &BatchTally) -> bool {
        self.broken_by(tally).is_none()
    }

    /// The first limit this tally breaks, if any.
    fn broken_by(&self, tally: &BatchTally) -> Option<LimitKind> {
        if tally.requests > self.max_requests {
            Some(LimitKind::Requests)
        } else if tally.bytes > self.max_bytes {
            Some(LimitKind::Bytes)
        } else if self.max_tokens.is_some_and(|cap| tally.tokens > cap) {
            Some(LimitKind::Tokens)
        } else if self
            .max_enqueued_tokens
            .is_some_and(|cap| tally.enqueued_estimate() > cap)
        {
            Some(LimitKind::EnqueuedTokens)
        } else {
            None
        }
    }
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_requests: Self::MAX_REQUESTS,
            max_bytes: Self::DEFAULT_MAX_BYTES,
            max_tokens: None,
            max_enqueued_tokens: None,
        }
    }
}

/// Limits a user cannot mean; messages name the flag and say what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    #[error(
        "--max-requests-per-batch must be between 1 and {max}, got {value}",
        max = BatchLimits::MAX_REQUESTS
    )]
    Requests { value: u32 },
    #[error("--max-bytes-per-batch must be at least 1")]
    ZeroBytes,
    #[error("--max-tokens-per-batch must be at least 1")]
    ZeroTokens,
    #[error("--max-enqueued-tokens must be at least 1")]
    ZeroEnqueuedTokens,
}

/// What the sharder needs to know of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemSize {
    /// Exact token count of the request's input.
    pub tokens: u64,
    /// Byte length of the request's JSONL line, trailing newline included.
    pub line_bytes: u64,
}

/// Sums over the requests of one batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchTally {
    pub requests: u32,
    pub bytes: u64,
    pub tokens: u64,
}

impl BatchTally {
    /// How many tokens the batch may count for against the provider's enqueued-token limit:
    /// the larger of the exact count and a quarter of the file's bytes, because the provider's
    /// own estimate may be byte-based and it is the provider's estimate that gets refused.
    pub fn enqueued_estimate(&self) -> u64 {
        self.tokens.max(self.bytes.div_ceil(4))
    }

    fn of(item: ItemSize) -> BatchTally {
        BatchTally {
            requests: 1,
            bytes: item.line_bytes,
            tokens: item.tokens,
        }
    }

    /// The tally with one more item, or `None` on overflow. An overflowing sum is far beyond
    /// any real limit, so the caller treats it as "does not fit" rather than wrapping.
    fn plus(&self, item: ItemSize) -> Option<BatchTally> {
        Some(BatchTally {
            requests: self.requests.checked_add(1)?,
            bytes: self.bytes.checked_add(item.line_bytes)?,
            tokens: self.tokens.checked_add(item.tokens)?,
        })
    }
}

/// Where one item went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Goes into the current batch (the first item opens batch 0).
    Current,
    /// The current batch is full: it is sealed with this tally and the item opens the next
    /// batch.
    StartsNew { sealed: BatchTally },
    /// The item alone breaks a limit: it cannot be sent in any batch (the caller skips it with
    /// this reason). The open batch is unchanged.
    TooLarge(LimitKind),
}

/// Which limit an item breaks on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// Only with `max_requests == 0`, which [`BatchLimits::validate`] refuses; kept so the
    /// sharder never has to pretend a batch of one fits a cap of zero.
    Requests,
    Bytes,
    Tokens,
    EnqueuedTokens,
}

impl LimitKind {
    /// A short reason, fit for `skipped.tsv` and for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Requests => "exceeds_max_requests_per_batch",
            LimitKind::Bytes => "exceeds_max_bytes_per_batch",
            LimitKind::Tokens => "exceeds_max_tokens_per_batch",
            LimitKind::EnqueuedTokens => "exceeds_max_enqueued_tokens",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The streaming sharder: feed it every sendable item in order with [`Sharder::place`], then
/// call [`Sharder::finish`] for the last batch.
///
/// The rule is greedy: an item joins the open batch if the batch would still respect every
/// limit, and otherwise seals it and opens the next. That is what makes every batch but the
/// last full, and the result depends only on the sequence of sizes, so a plan is reproducible.
#[derive(Debug, Clone)]
pub struct Sharder {
    limits: BatchLimits,
    open: Option<BatchTally>,
    n_batches: usize,
}

impl Sharder {
    /// A sharder with no batch open yet. `limits` should have passed
    /// [`BatchLimits::validate`]; on limits that did not, the rules still hold and every item
    /// a zero cap excludes comes back [`Placement::TooLarge`].
    pub fn new(limits: BatchLimits) -> Sharder {
        Sharder {
            limits,
            open: None,
            n_batches: 0,
        }
    }

    /// Decides where `item` goes, given everything placed before it.
    pub fn place(&mut self, item: ItemSize) -> Placement {
        let alone = BatchTally::of(item);
        if let Some(kind) = self.limits.broken_by(&alone) {
            return Placement::TooLarge(kind);
        }
        let Some(open) = self.open else {
            self.open = Some(alone);
            self.n_batches = 1;
            return Placement::Current;
        };
        match open.plus(item) {
            Some(grown) if self.limits.allows(&grown) => {
                self.open = Some(grown);
                Placement::Current
            }
            _ => {
                self.open = Some(alone);
                self.n_batches += 1;
                Placement::StartsNew { sealed: open }
            }
        }
    }

    /// Number of batches opened so far.
    pub fn batch_count(&self) -> usize {
        self.n_batches
    }

    /// Ends the stream: the tally of the last (open) batch, if any item was placed.
    pub fn finish(self) -> Option<BatchTally> {
        self.open
    }
}

/// One batch of a [`Sharding`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardedBatch {
    /// Indexes from the batch's first item to one past its last. The batch holds every index
    /// in this range except those listed in [`Sharding::too_large`], which may fall inside it.
    pub items: Range<usize>,
    pub tally: BatchTally,
}

/// The whole sharding of a slice of items, from [`shard_all`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sharding {
    /// Batches in order; their ranges are disjoint and increasing.
    pub batches: Vec<ShardedBatch>,
    /// Items that fit no batch, in order, with the limit each breaks alone.
    pub too_large: Vec<(usize, LimitKind)>,
}

/// Shards a whole slice: a convenience over [`Sharder`] for tests and small callers, with
/// exactly the streaming result.
pub fn shard_all(limits: BatchLimits, items: &[ItemSize]) -> Sharding {
    let mut sharder = Sharder::new(limits);
    let mut sharding = Sharding::default();
    // Start and end (exclusive) of the open batch's index range.
    let mut open_range: Option<Range<usize>> = None;
    for (item_idx, item) in items.iter().enumerate() {
        match sharder.place(*item) {
            Placement::Current => match &mut open_range {
                Some(range) => range.end = item_idx + 1,
                None => open_range = Some(item_idx..item_idx + 1),
            },
            Placement::StartsNew { sealed } => {
                if let Some(range) = open_range.replace(item_idx..item_idx + 1) {
                    sharding.batches.push(ShardedBatch {
                        items: range,
                        tally: sealed,
                    });
                }
            }
            Placement::TooLarge(kind) => sharding.too_large.push((item_idx, kind)),
        }
    }
    if let (Some(range), Some(tally)) = (open_range, sharder.finish()) {
        sharding.batches.push(ShardedBatch {
            items: range,
            tally,
        });
    }
    sharding
}

#[cfg(test)]
mod tests;
