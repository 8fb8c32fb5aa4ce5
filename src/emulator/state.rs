//! The emulator's state: its configuration and faults, the files and batches it holds, its
//! counters, and [`Shared`], what the handlers (`routes`) and the [`Emulator`](super::Emulator)
//! handle hold in common. Kept apart from `mod.rs` so the handlers import it without importing
//! the server that imports them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::batches::{self, Advance, BatchRecord, Generated, Job};
use super::voyage::Api;

/// How the emulator behaves apart from faults.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// The bearer token every `/v1` route requires.
    pub api_key: String,
    /// Time a batch spends in each of validating / in_progress / finalizing (and cancelling).
    /// Zero: a batch is done at the first read after its creation.
    pub stage_duration: Duration,
    /// Seeds the ids, the shuffling of output lines and the fault draws.
    pub seed: u64,
    /// Whose API the emulator speaks: OpenAI's (default) or Voyage's (`voyage` module).
    pub api: Api,
}

impl Default for EmulatorConfig {
    fn default() -> EmulatorConfig {
        EmulatorConfig {
            api_key: "sk-emulator".to_owned(),
            stage_duration: Duration::ZERO,
            seed: 0,
            api: Api::Openai,
        }
    }
}

/// Faults to inject. [`Emulator::set_faults`] replaces them all at once; batch faults are
/// frozen into each batch when it is created.
#[derive(Clone, Debug)]
pub struct Faults {
    /// Added to every request.
    pub latency: Duration,
    /// Probability that a request is answered 429 `rate_limit_exceeded` before anything is done.
    pub rate_429: f64,
    /// Probability that a request is answered 500 before anything is done.
    pub rate_500: f64,
    /// The `Retry-After` of injected 429s, in seconds.
    pub retry_after_secs: u64,
    /// Per request of a batch: the probability it lands in the error file as a 500 line.
    pub request_failure_rate: f64,
    /// Requests of a batch with these custom_ids always land in the error file as 500 lines.
    pub fail_custom_ids: Vec<String>,
    /// Batches expire: only this fraction of their requests get done, the rest get
    /// `batch_expired` lines, and the status is `expired`.
    pub expire_after_fraction: Option<f64>,
    /// The next N batch creations succeed, and each of those batches then turns `failed` with
    /// `token_limit_exceeded` (in Voyage mode: are refused with a 429, nothing created, as
    /// Voyage refuses a batch over its limits).
    pub token_limit_failures: u32,
    /// The organisation's enqueued-token limit: a batch created while the batches not yet
    /// finished, with it, would count for more turns `failed` with `token_limit_exceeded`, as
    /// the provider's do (in Voyage mode: the creation is refused with a 429). Each batch counts for its input file's bytes / 4 (the provider's own
    /// estimate may be byte-based).
    pub enqueued_token_limit: Option<u64>,
    /// One-shot: the next request of each listed kind acts, then its connection is dropped
    /// without an answer.
    pub lose_answers: Vec<LostAnswer>,
    /// Validate input files as the provider does (true by default); false lets broken lines
    /// through to become 400 lines of the error file.
    pub invalid_line_validation: bool,
    /// Batch input files uploaded now expire after this long, whatever `expires_after` the
    /// upload asked for (the provider dropping a file early; whole seconds, at least one).
    pub input_file_ttl: Option<Duration>,
    /// The emulator's clock runs this many seconds ahead of the real one (negative: behind),
    /// as a provider's far-off clock would: every timestamp it answers (`created_at`,
    /// `expires_at`, …), its own expiry decisions, and its `Date` header.
    pub clock_offset_secs: i64,
    /// The `Date` header's offset from the real clock, when it differs from
    /// `clock_offset_secs`: a proxy with its own clock in front of a server with another.
    pub date_offset_secs: Option<i64>,
    /// Every upload answer claims this `expires_at`, whatever the file's real expiry (a mock
    /// replaying a fixed example answer). The file itself is kept as usual.
    pub upload_answer_expires_at: Option<i64>,
    /// `/v1/embeddings` answers 400 (as for an input over the model's context length) to any
    /// request with an input containing this text: a server's own refusal, for `direct`.
    pub refuse_inputs_containing: Option<String>,
}

/// Not derived: validation must be on unless a test turns it off.
impl Default for Faults {
    fn default() -> Faults {
        Faults {
            latency: Duration::ZERO,
            rate_429: 0.0,
            rate_500: 0.0,
            retry_after_secs: 0,
            request_failure_rate: 0.0,
            fail_custom_ids: Vec::new(),
            expire_after_fraction: None,
            token_limit_failures: 0,
            enqueued_token_limit: None,
            lose_answers: Vec::new(),
            invalid_line_validation: true,
            input_file_ttl: None,
            clock_offset_secs: 0,
            date_offset_secs: None,
            upload_answer_expires_at: None,
            refuse_inputs_containing: None,
        }
    }
}

/// A request whose answer can be lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostAnswer {
    Upload,
    CreateBatch,
    Cancel,
}

/// What the emulator was asked to do, for tests to check (e.g. "one batch created per
/// submission", "nothing uploaded twice").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub uploads: u64,
    pub batch_creations: u64,
    /// Key: `<embatch_run_id>/<embatch_batch>/<embatch_submission>` from the create call's
    /// metadata, `-` for a missing field.
    pub creations_by_metadata: BTreeMap<String, u64>,
    pub downloads: u64,
    pub file_deletions: u64,
    pub embedding_calls: u64,
    /// Realtime `/v1/embeddings` calls per input text (each text counted once per call that
    /// carried it), so a test can check that a chunk was sent exactly once.
    pub embedding_inputs: BTreeMap<String, u64>,
    pub lost_answers: u64,
    pub injected_errors: u64,
    /// The most enqueued tokens (bytes / 4 of the input files of batches not finished) seen
    /// right after a creation that was not refused for the limit.
    pub max_enqueued_tokens: u64,
    /// Creations refused for `Faults::enqueued_token_limit`.
    pub enqueued_limit_refusals: u64,
    /// Voyage mode: creations refused with a 429 for a queue limit (`token_limit_failures`
    /// or `enqueued_token_limit`), nothing created.
    pub queue_limit_429s: u64,
}

/// A file the emulator holds (uploaded, or written by a batch).
#[derive(Debug)]
pub(crate) struct StoredFile {
    pub id: String,
    pub filename: String,
    pub purpose: String,
    pub content: Bytes,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

impl StoredFile {
    /// The spec's `OpenAIFile`.
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "file",
            "bytes": self.content.len(),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": null,
        })
    }
}

/// Everything behind the lock. Files and batches are kept in creation order.
pub(crate) struct State {
    pub faults: Faults,
    pub counters: Counters,
    pub files: Vec<StoredFile>,
    pub batches: Vec<BatchRecord>,
    rng: StdRng,
}

impl State {
    /// A fresh id such as `file-…` or `batch_…`, from the seeded generator.
    pub(crate) fn new_id(&mut self, prefix: &str) -> String {
        format!("{prefix}{:032x}", self.rng.random::<u128>())
    }

    /// A draw in [0, 1) from the seeded generator (fault decisions).
    pub(crate) fn draw(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// The emulator's time (Unix seconds): the real clock plus the `clock_offset_secs` fault.
    pub(crate) fn now(&self) -> i64 {
        unix_now() + self.faults.clock_offset_secs
    }

    /// The `Date` header's time (Unix seconds).
    pub(crate) fn date_header_now(&self) -> i64 {
        unix_now()
            + self
                .faults
                .date_offset_secs
                .unwrap_or(self.faults.clock_offset_secs)
    }

    /// Forgets files whose `expires_at` has passed (by the emulator's clock), as the provider
    /// deletes them.
    pub(crate) fn purge_expired_files(&mut self) {
        let now_unix = self.now();
        self.files
            .retain(|file| file.expires_at.is_none_or(|at| at > now_unix));
    }

    pub(crate) fn file(&self, id: &str) -> Option<&StoredFile> {
        self.files.iter().find(|file| file.id == id)
    }

    pub(crate) fn batch_mut(&mut self, id: &str) -> Option<&mut BatchRecord> {
        self.batches.iter_mut().find(|batch| batch.id == id)
    }

    /// Takes one pending [`LostAnswer`] of this kind, if any, and counts it.
    pub(crate) fn take_lost_answer(&mut self, kind: LostAnswer) -> bool {
        match self.faults.lose_answers.iter().position(|k| *k == kind) {
            Some(index) => {
                self.faults.lose_answers.remove(index);
                self.counters.lost_answers += 1;
                true
            }
            None => false,
        }
    }

    /// Stores a new file and returns its id.
    pub(crate) fn add_file(
        &mut self,
        filename: String,
        purpose: &str,
        content: Bytes,
        expires_at: Option<i64>,
    ) -> String {
        let id = format!("file-{}", &self.new_id("")[..24]);
        self.files.push(StoredFile {
            id: id.clone(),
            filename,
            purpose: purpose.to_owned(),
            content,
            created_at: self.now(),
            expires_at,
        });
        id
    }
}

/// The state shared by the handlers and the [`Emulator`](super::Emulator) handle.
pub(crate) struct Shared {
    pub api_key: String,
    pub stage_duration: Duration,
    pub seed: u64,
    pub api: Api,
    state: Mutex<State>,
}

impl Shared {
    pub(super) fn new(config: EmulatorConfig) -> Shared {
        Shared {
            api_key: config.api_key,
            stage_duration: config.stage_duration,
            seed: config.seed,
            api: config.api,
            state: Mutex::new(State {
                faults: Faults::default(),
                counters: Counters::default(),
                files: Vec::new(),
                batches: Vec::new(),
                rng: StdRng::seed_from_u64(config.seed),
            }),
        }
    }

    /// The state. A panic elsewhere while holding the lock leaves plain data behind (no
    /// invariant spans two fields), so a poisoned lock is still usable.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads a batch the way a client sees it: advanced to now, its output generated if it is
    /// due (on a blocking thread, outside the lock). `None` if there is no such batch.
    pub(crate) async fn read_batch(self: &Arc<Self>, batch_id: &str) -> Option<Value> {
        loop {
            let job = {
                let mut state = self.lock();
                let record = state.batch_mut(batch_id)?;
                match batches::advance(record, Instant::now(), self.stage_duration) {
                    Advance::Settled => return Some(record.to_json()),
                    Advance::NeedsOutput(job) => job,
                }
            };
            // The blocking task installs its result itself, so a client that hangs up while
            // waiting does not leave the batch marked as generating forever.
            let shared = Arc::clone(self);
            let _ = tokio::task::spawn_blocking(move || shared.run_job(&job)).await;
        }
    }

    /// Generates a batch's files and installs them.
    pub(super) fn run_job(&self, job: &Job) {
        let generated = batches::generate(job);
        self.install(job, generated);
    }

    /// Stores the output and error files of a finished job and ends its batch — unless the
    /// batch moved on meanwhile (a `force_status`), in which case nothing is stored.
    fn install(&self, job: &Job, mut generated: Generated) {
        let mut state = self.lock();
        let now_unix = state.now();
        let Some(record) = state.batch_mut(&job.batch_id) else {
            return;
        };
        if record.status != job.from_status || record.status.is_terminal() {
            record.generating = false;
            return;
        }
        let expires_at = record.output_expires_after.map(|secs| now_unix + secs);
        let batch_id = job.batch_id.clone();
        // The file contents move into the store; `generated` keeps the counts.
        let mut output = std::mem::take(&mut generated.output);
        let mut errors = std::mem::take(&mut generated.errors);
        if self.api == Api::Voyage {
            output = super::voyage::result_lines(&output, &batch_id);
            errors = super::voyage::result_lines(&errors, &batch_id);
        }
        // A file only when it has lines: a batch where every request failed has no output
        // file, one where none failed has no error file.
        let output_file_id = (!output.is_empty()).then(|| {
            state.add_file(
                format!("{batch_id}_output.jsonl"),
                "batch_output",
                Bytes::from(output),
                expires_at,
            )
        });
        let error_file_id = (!errors.is_empty()).then(|| {
            state.add_file(
                format!("{batch_id}_error.jsonl"),
                "batch_output",
                Bytes::from(errors),
                expires_at,
            )
        });
        if let Some(record) = state.batch_mut(&batch_id) {
            batches::finish(record, job, &generated, output_file_id, error_file_id);
        }
    }
}

/// The current Unix time in seconds.
pub(crate) fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Fired by a handler to drop its own connection without answering (a [`LostAnswer`]).
#[derive(Clone, Debug)]
pub(crate) struct ConnectionKill(pub CancellationToken);
