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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn item(tokens: u64, line_bytes: u64) -> ItemSize {
        ItemSize { tokens, line_bytes }
    }

    fn limits(max_requests: u32, max_bytes: u64) -> BatchLimits {
        BatchLimits {
            max_requests,
            max_bytes,
            max_tokens: None,
            max_enqueued_tokens: None,
        }
    }

    /// The item indexes of each batch, too-large items left out.
    fn batch_members(sharding: &Sharding) -> Vec<Vec<usize>> {
        sharding
            .batches
            .iter()
            .map(|batch| {
                batch
                    .items
                    .clone()
                    .filter(|idx| !sharding.too_large.iter().any(|(t, _)| t == idx))
                    .collect()
            })
            .collect()
    }

    /// The limit check written out again from DESIGN §6, independent of `BatchLimits::allows`,
    /// so a mistake there cannot hide in the oracle too.
    fn within_limits(limits: &BatchLimits, members: &[ItemSize]) -> bool {
        let requests = members.len() as u128;
        let bytes: u128 = members.iter().map(|m| u128::from(m.line_bytes)).sum();
        let tokens: u128 = members.iter().map(|m| u128::from(m.tokens)).sum();
        let estimate = tokens.max(bytes.div_ceil(4));
        requests <= u128::from(limits.max_requests)
            && bytes <= u128::from(limits.max_bytes)
            && limits
                .max_tokens
                .is_none_or(|cap| tokens <= u128::from(cap))
            && limits
                .max_enqueued_tokens
                .is_none_or(|cap| estimate <= u128::from(cap))
    }

    #[test]
    fn empty_stream_makes_no_batch() {
        let sharder = Sharder::new(BatchLimits::default());
        assert_eq!(sharder.batch_count(), 0);
        assert_eq!(sharder.finish(), None);
        assert_eq!(shard_all(BatchLimits::default(), &[]), Sharding::default());
    }

    #[test]
    fn only_too_large_items_make_no_batch() {
        let mut sharder = Sharder::new(limits(10, 5));
        assert_eq!(
            sharder.place(item(1, 6)),
            Placement::TooLarge(LimitKind::Bytes)
        );
        assert_eq!(sharder.batch_count(), 0);
        assert_eq!(sharder.finish(), None);
    }

    #[test]
    fn exactly_at_byte_limit_fits() {
        let mut sharder = Sharder::new(limits(10, 100));
        assert_eq!(sharder.place(item(1, 60)), Placement::Current);
        assert_eq!(sharder.place(item(1, 40)), Placement::Current);
        assert_eq!(
            sharder.place(item(1, 1)),
            Placement::StartsNew {
                sealed: BatchTally {
                    requests: 2,
                    bytes: 100,
                    tokens: 2
                }
            }
        );
        // A single item of exactly the byte limit is sendable.
        assert_eq!(
            sharder.place(item(1, 100)),
            Placement::StartsNew {
                sealed: BatchTally {
                    requests: 1,
                    bytes: 1,
                    tokens: 1
                }
            }
        );
        assert_eq!(
            sharder.place(item(1, 101)),
            Placement::TooLarge(LimitKind::Bytes)
        );
        assert_eq!(sharder.batch_count(), 3);
    }

    #[test]
    fn exactly_at_token_limits_fits() {
        let capped = BatchLimits {
            max_tokens: Some(10),
            max_enqueued_tokens: Some(12),
            ..BatchLimits::default()
        };
        let sharding = shard_all(capped, &[item(4, 4), item(6, 4), item(1, 1)]);
        assert_eq!(batch_members(&sharding), vec![vec![0, 1], vec![2]]);
        assert_eq!(sharding.batches[0].tally.tokens, 10);

        // 48 bytes estimate as 12 enqueued tokens: exactly at the cap.
        let sharding = shard_all(capped, &[item(1, 24), item(1, 24), item(1, 1)]);
        assert_eq!(batch_members(&sharding), vec![vec![0, 1], vec![2]]);
        assert_eq!(sharding.batches[0].tally.enqueued_estimate(), 12);
    }

    #[test]
    fn fifty_thousand_requests_exactly() {
        let items = vec![item(1, 10); 50_001];
        let sharding = shard_all(BatchLimits::default(), &items);
        assert_eq!(sharding.batches.len(), 2);
        assert_eq!(sharding.batches[0].items, 0..50_000);
        assert_eq!(
            sharding.batches[0].tally.requests,
            BatchLimits::MAX_REQUESTS
        );
        assert_eq!(sharding.batches[1].items, 50_000..50_001);
        assert!(sharding.too_large.is_empty());
    }

    #[test]
    fn too_large_item_neither_seals_nor_joins() {
        let capped = BatchLimits {
            max_tokens: Some(100),
            ..limits(3, 1000)
        };
        let items = [
            item(10, 10),
            item(101, 10),
            item(10, 10),
            item(10, 10),
            item(10, 10),
        ];
        let sharding = shard_all(capped, &items);
        assert_eq!(sharding.too_large, vec![(1, LimitKind::Tokens)]);
        assert_eq!(batch_members(&sharding), vec![vec![0, 2, 3], vec![4]]);
        assert_eq!(sharding.batches[0].items, 0..4);
    }

    #[test]
    fn enqueued_estimate_is_byte_based_when_bytes_dominate() {
        let tally = BatchTally {
            requests: 1,
            bytes: 4001,
            tokens: 10,
        };
        assert_eq!(tally.enqueued_estimate(), 1001);
        let tally = BatchTally {
            tokens: 2000,
            ..tally
        };
        assert_eq!(tally.enqueued_estimate(), 2000);

        let capped = BatchLimits {
            max_enqueued_tokens: Some(1000),
            ..BatchLimits::default()
        };
        let mut sharder = Sharder::new(capped);
        assert_eq!(
            sharder.place(item(10, 4001)),
            Placement::TooLarge(LimitKind::EnqueuedTokens)
        );
        assert_eq!(sharder.place(item(10, 4000)), Placement::Current);
    }

    #[test]
    fn validate_refuses_impossible_limits() {
        assert_eq!(BatchLimits::default().validate(), Ok(()));
        let max = limits(BatchLimits::MAX_REQUESTS, 1);
        assert_eq!(max.validate(), Ok(()));
        assert_eq!(
            limits(0, 1).validate(),
            Err(LimitsError::Requests { value: 0 })
        );
        assert_eq!(
            limits(50_001, 1).validate(),
            Err(LimitsError::Requests { value: 50_001 })
        );
        assert_eq!(limits(1, 0).validate(), Err(LimitsError::ZeroBytes));
        let zero_tokens = BatchLimits {
            max_tokens: Some(0),
            ..max
        };
        assert_eq!(zero_tokens.validate(), Err(LimitsError::ZeroTokens));
        let zero_enqueued = BatchLimits {
            max_enqueued_tokens: Some(0),
            ..max
        };
        assert_eq!(
            zero_enqueued.validate(),
            Err(LimitsError::ZeroEnqueuedTokens)
        );
        assert_eq!(
            limits(0, 1).validate().unwrap_err().to_string(),
            "--max-requests-per-batch must be between 1 and 50000, got 0"
        );
    }

    #[test]
    fn zero_request_cap_makes_every_item_too_large() {
        let mut sharder = Sharder::new(limits(0, 100));
        assert_eq!(
            sharder.place(item(1, 1)),
            Placement::TooLarge(LimitKind::Requests)
        );
        assert_eq!(sharder.finish(), None);
    }

    #[test]
    fn limits_round_trip_through_json() {
        let limits = BatchLimits {
            max_tokens: Some(1_000_000),
            ..BatchLimits::default()
        };
        let json = serde_json::to_string(&limits).unwrap();
        assert_eq!(serde_json::from_str::<BatchLimits>(&json).unwrap(), limits);
    }

    /// Limits valid by construction, often tiny so that many batches form and items are often
    /// too large, sometimes the defaults.
    fn arb_limits() -> impl Strategy<Value = BatchLimits> {
        let max_requests = prop_oneof![
            4 => 1u32..=6,
            1 => 1u32..=BatchLimits::MAX_REQUESTS,
            1 => Just(BatchLimits::MAX_REQUESTS),
        ];
        let max_bytes = prop_oneof![
            4 => 1u64..=2_000,
            1 => Just(BatchLimits::DEFAULT_MAX_BYTES),
        ];
        let max_tokens = prop::option::of(1u64..=2_000);
        let max_enqueued_tokens = prop::option::of(1u64..=2_000);
        (max_requests, max_bytes, max_tokens, max_enqueued_tokens).prop_map(
            |(max_requests, max_bytes, max_tokens, max_enqueued_tokens)| BatchLimits {
                max_requests,
                max_bytes,
                max_tokens,
                max_enqueued_tokens,
            },
        )
    }

    /// Item sizes around the tiny limits above, with now and then one far too large. A JSONL
    /// line is never empty (it has at least its newline); an input may count zero tokens.
    /// Real lines carry ~100 bytes of JSON around text of ~4 bytes per token, so the byte-based
    /// enqueued estimate often dominates: half the items are drawn that way so the
    /// `div_ceil(4)` edge gets exercised, not only the token count.
    fn arb_item() -> impl Strategy<Value = ItemSize> {
        prop_oneof![
            4 => (0u64..=400, 1u64..=600),
            4 => (0u64..=150, 0u64..=3, 80u64..=120).prop_map(|(tokens, jitter, overhead)| {
                (tokens, overhead + 4 * tokens + jitter)
            }),
            1 => (0u64..=10_000, 1u64..=10_000),
        ]
        .prop_map(|(tokens, line_bytes)| ItemSize { tokens, line_bytes })
    }

    fn arb_items() -> impl Strategy<Value = Vec<ItemSize>> {
        prop::collection::vec(arb_item(), 0..120)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prop_deterministic(limits in arb_limits(), items in arb_items()) {
            prop_assert_eq!(shard_all(limits, &items), shard_all(limits, &items));
        }

        #[test]
        fn prop_batches_are_ordered_nonempty_ranges(
            limits in arb_limits(),
            items in arb_items(),
        ) {
            let sharding = shard_all(limits, &items);
            for pair in sharding.batches.windows(2) {
                prop_assert!(pair[0].items.end <= pair[1].items.start);
            }
            for (batch, members) in sharding.batches.iter().zip(batch_members(&sharding)) {
                prop_assert!(batch.items.end <= items.len());
                // A range starts and ends on one of the batch's own items.
                prop_assert_eq!(members.first(), Some(&batch.items.start));
                prop_assert_eq!(members.last(), Some(&(batch.items.end - 1)));
            }
            let too_large_idxs: Vec<usize> =
                sharding.too_large.iter().map(|(idx, _)| *idx).collect();
            prop_assert!(too_large_idxs.windows(2).all(|pair| pair[0] < pair[1]));
        }

        #[test]
        fn prop_every_placeable_item_in_exactly_one_batch(
            limits in arb_limits(),
            items in arb_items(),
        ) {
            let sharding = shard_all(limits, &items);
            let members = batch_members(&sharding);
            for (item_idx, item) in items.iter().enumerate() {
                let n_batches = members.iter().filter(|m| m.contains(&item_idx)).count();
                let placeable = within_limits(&limits, &[*item]);
                let marked_too_large =
                    sharding.too_large.iter().any(|(idx, _)| *idx == item_idx);
                prop_assert_eq!(marked_too_large, !placeable, "item {}", item_idx);
                prop_assert_eq!(n_batches, usize::from(placeable), "item {}", item_idx);
            }
        }

        #[test]
        fn prop_too_large_names_a_limit_the_item_breaks(
            limits in arb_limits(),
            items in arb_items(),
        ) {
            for (item_idx, kind) in shard_all(limits, &items).too_large {
                let item = items[item_idx];
                let breaks = match kind {
                    LimitKind::Requests => limits.max_requests < 1,
                    LimitKind::Bytes => item.line_bytes > limits.max_bytes,
                    LimitKind::Tokens => limits.max_tokens.is_some_and(|cap| item.tokens > cap),
                    LimitKind::EnqueuedTokens => limits.max_enqueued_tokens.is_some_and(|cap| {
                        item.tokens.max(item.line_bytes.div_ceil(4)) > cap
                    }),
                };
                prop_assert!(breaks, "item {} reported {:?}", item_idx, kind);
            }
        }

        #[test]
        fn prop_no_batch_breaks_a_limit_and_tallies_are_sums(
            limits in arb_limits(),
            items in arb_items(),
        ) {
            let sharding = shard_all(limits, &items);
            for (batch, members) in sharding.batches.iter().zip(batch_members(&sharding)) {
                let sizes: Vec<ItemSize> = members.iter().map(|&idx| items[idx]).collect();
                prop_assert!(within_limits(&limits, &sizes), "batch {:?}", batch);
                let expected = BatchTally {
                    requests: u32::try_from(sizes.len()).unwrap(),
                    bytes: sizes.iter().map(|s| s.line_bytes).sum(),
                    tokens: sizes.iter().map(|s| s.tokens).sum(),
                };
                prop_assert_eq!(batch.tally, expected);
            }
        }

        #[test]
        fn prop_every_batch_but_the_last_is_full(
            limits in arb_limits(),
            items in arb_items(),
        ) {
            let sharding = shard_all(limits, &items);
            let members = batch_members(&sharding);
            for pair in members.windows(2) {
                let mut grown: Vec<ItemSize> = pair[0].iter().map(|&idx| items[idx]).collect();
                grown.push(items[pair[1][0]]);
                prop_assert!(
                    !within_limits(&limits, &grown),
                    "batch {:?} could also have taken item {}", pair[0], pair[1][0]
                );
            }
        }

        #[test]
        fn prop_streaming_agrees_with_shard_all(
            limits in arb_limits(),
            items in arb_items(),
        ) {
            let sharding = shard_all(limits, &items);
            let mut sharder = Sharder::new(limits);
            let mut sealed_tallies = Vec::new();
            let mut too_large = Vec::new();
            let mut batch_of_item = Vec::new();
            for (item_idx, item) in items.iter().enumerate() {
                match sharder.place(*item) {
                    Placement::Current => batch_of_item.push((item_idx, sharder.batch_count() - 1)),
                    Placement::StartsNew { sealed } => {
                        sealed_tallies.push(sealed);
                        batch_of_item.push((item_idx, sharder.batch_count() - 1));
                    }
                    Placement::TooLarge(kind) => too_large.push((item_idx, kind)),
                }
                prop_assert_eq!(sharder.batch_count(), sealed_tallies.len() + usize::from(!batch_of_item.is_empty()));
            }
            let n_batches = sharder.batch_count();
            sealed_tallies.extend(sharder.finish());
            prop_assert_eq!(n_batches, sharding.batches.len());
            let expected_tallies: Vec<BatchTally> =
                sharding.batches.iter().map(|b| b.tally).collect();
            prop_assert_eq!(sealed_tallies, expected_tallies);
            prop_assert_eq!(too_large, sharding.too_large.clone());
            let members = batch_members(&sharding);
            for (item_idx, batch_idx) in batch_of_item {
                prop_assert!(members[batch_idx].contains(&item_idx));
            }
        }
    }
}
