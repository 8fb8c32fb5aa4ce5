//! An OpenAI-compatible emulator of the Files, Batches and Embeddings APIs, for the tests, the
//! demo and the benchmark (in-process on `127.0.0.1:0`) and for `embatch emulator --listen`.
//!
//! This module owns the [`Emulator`] handle, the shared state (files, batches, faults,
//! counters) and the server loop. The server loop is our own rather than `axum::serve` because
//! a [`LostAnswer`] fault must drop a connection *after* its handler acted and *without* a
//! response: each connection gets a kill switch in its requests' extensions, and the connection
//! task drops the connection when it fires. `routes` holds the handlers, `batches` the batch
//! lifecycle and output generation, `embeddings` one embeddings request, `vectors` the
//! deterministic embedding function. Every response follows the OpenAPI description of the
//! OpenAI API (DESIGN §8); the emulator never calls the network.
//!
//! All shared state sits behind one `std::sync::Mutex`, never held across an `.await`; the
//! expensive work (validating an input file, generating an output file) runs outside it.

mod batches;
mod embeddings;
mod routes;
pub mod vectors;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use self::batches::{Advance, BatchRecord, Generated, Job, Status};

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
}

impl Default for EmulatorConfig {
    fn default() -> EmulatorConfig {
        EmulatorConfig {
            api_key: "sk-emulator".to_owned(),
            stage_duration: Duration::ZERO,
            seed: 0,
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
    /// `token_limit_exceeded`.
    pub token_limit_failures: u32,
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
            lose_answers: Vec::new(),
            invalid_line_validation: true,
            input_file_ttl: None,
            clock_offset_secs: 0,
            date_offset_secs: None,
            upload_answer_expires_at: None,
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

/// The state shared by the handlers and the [`Emulator`] handle.
pub(crate) struct Shared {
    pub api_key: String,
    pub stage_duration: Duration,
    pub seed: u64,
    state: Mutex<State>,
}

impl Shared {
    fn new(config: EmulatorConfig) -> Shared {
        Shared {
            api_key: config.api_key,
            stage_duration: config.stage_duration,
            seed: config.seed,
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
    fn run_job(&self, job: &Job) {
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
        let output = std::mem::take(&mut generated.output);
        let errors = std::mem::take(&mut generated.errors);
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

/// A running emulator. Dropping it stops the server too; [`Emulator::shutdown`] also waits for
/// the accept loop to end.
pub struct Emulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: CancellationToken,
    accept_task: Option<JoinHandle<()>>,
}

impl Emulator {
    /// Starts an emulator on `127.0.0.1` and a free port.
    pub async fn start(config: EmulatorConfig) -> std::io::Result<Emulator> {
        Emulator::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    /// Starts an emulator on `addr`.
    pub async fn bind(addr: SocketAddr, config: EmulatorConfig) -> std::io::Result<Emulator> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let shutdown = CancellationToken::new();
        let router = routes::router(Arc::clone(&shared));
        let accept_task = tokio::spawn(accept_loop(listener, router, shutdown.clone()));
        Ok(Emulator {
            shared,
            addr,
            shutdown,
            accept_task: Some(accept_task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v1`: what `--base-url` / `OPENAI_BASE_URL` should be.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn api_key(&self) -> &str {
        &self.shared.api_key
    }

    /// Replaces the current faults.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock().faults = faults;
    }

    /// Changes the current faults in place. Unlike [`Emulator::set_faults`] this keeps what
    /// the emulator consumed meanwhile (the `token_limit_failures` left, the `lose_answers`
    /// not yet fired), so a test can switch one fault without re-arming the others.
    pub fn update_faults(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.shared.lock().faults);
    }

    pub fn counters(&self) -> Counters {
        self.shared.lock().counters.clone()
    }

    /// Every batch the emulator holds, as `Batch` objects, oldest first, in the status a
    /// client last saw (this does not advance them).
    pub fn batches(&self) -> Vec<Value> {
        self.shared
            .lock()
            .batches
            .iter()
            .map(BatchRecord::to_json)
            .collect()
    }

    /// Every file the emulator holds (not deleted, not expired), as `OpenAIFile` objects,
    /// oldest first.
    pub fn files(&self) -> Vec<Value> {
        let mut state = self.shared.lock();
        state.purge_expired_files();
        state.files.iter().map(StoredFile::to_json).collect()
    }

    /// Forces a batch's status now, for tests.
    ///
    /// - `completed`, `expired`, `cancelled` on a running batch end it at once, with the output
    ///   of what was done (everything for `completed`; for the others what the cancel rule of
    ///   `batches` counts as done); on an ended batch they only relabel it.
    /// - `failed` ends it with no files.
    /// - `validating`, `in_progress`, `finalizing` put it there and hold it there (no lazy
    ///   advance) until a cancel or another `force_status`.
    /// - `cancelling` cancels it as `POST /cancel` would.
    ///
    /// # Panics
    /// On an unknown batch id or status: a mistake in the test that calls it.
    pub fn force_status(&self, batch_id: &str, status: &str) {
        let Some(status) = Status::parse(status) else {
            panic!("force_status: {status:?} is not a batch status");
        };
        let now = Instant::now();
        let stage_duration = self.shared.stage_duration;
        let job = {
            let mut state = self.shared.lock();
            let Some(record) = state.batch_mut(batch_id) else {
                panic!("force_status: no batch {batch_id}");
            };
            let now_unix = record.unix_at(now);
            if record.total == 0
                && let batches::Validation::Valid { n_requests, .. } = record.validation
            {
                record.total = n_requests as u64;
            }
            match status {
                Status::Validating | Status::InProgress | Status::Finalizing => {
                    if status != Status::Validating {
                        record.in_progress_at.get_or_insert(now_unix);
                    }
                    if status == Status::Finalizing {
                        record.finalizing_at.get_or_insert(now_unix);
                    }
                    record.status = status;
                    record.stage_started = now;
                    record.held = true;
                    None
                }
                Status::Cancelling => {
                    record.cancel(now, stage_duration);
                    None
                }
                Status::Failed => {
                    record.status = Status::Failed;
                    record.failed_at = Some(now_unix);
                    record.held = false;
                    None
                }
                Status::Completed | Status::Expired | Status::Cancelled => {
                    if record.status.is_terminal() {
                        record.status = status;
                        match status {
                            Status::Completed => record.completed_at = Some(now_unix),
                            Status::Expired => record.expired_at = Some(now_unix),
                            _ => record.cancelled_at = Some(now_unix),
                        }
                        None
                    } else {
                        let (ending, n_done) = match status {
                            Status::Completed => {
                                (batches::Ending::Completed, record.total as usize)
                            }
                            Status::Expired => (
                                batches::Ending::Expired,
                                record.n_done_now(now, stage_duration),
                            ),
                            _ => (
                                batches::Ending::Cancelled,
                                record.n_done_now(now, stage_duration),
                            ),
                        };
                        record.held = false;
                        record.generating = true;
                        Some(batches::job(record, ending, n_done, now_unix))
                    }
                }
            }
        };
        // Generated right here rather than on a blocking thread: this is a synchronous test
        // hook, and the batches tests force are small.
        if let Some(job) = job {
            self.shared.run_job(&job);
        }
    }

    /// Stops accepting, drops every open connection, and waits for the accept loop to end.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.accept_task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Serves until ctrl-c (`embatch emulator --listen ADDR`), printing the base URL on stderr,
/// and the key too when it is the built-in one (`show_key`). A key the user gave (from
/// `OPENAI_API_KEY`, `.env` or `--api-key`) may be a real one: it is never printed.
pub async fn serve_forever(
    addr: SocketAddr,
    config: EmulatorConfig,
    show_key: bool,
) -> anyhow::Result<()> {
    let emulator = Emulator::bind(addr, config)
        .await
        .with_context(|| format!("cannot listen on {addr}; choose another --listen address"))?;
    eprintln!("OpenAI-compatible emulator listening (ctrl-c stops it)");
    eprintln!("  OPENAI_BASE_URL={}", emulator.base_url());
    if show_key {
        eprintln!("  OPENAI_API_KEY={}", emulator.api_key());
    } else {
        eprintln!("  it accepts the key given in OPENAI_API_KEY (or --api-key), not shown here");
    }
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for ctrl-c")?;
    emulator.shutdown().await;
    Ok(())
}

async fn accept_loop(listener: TcpListener, router: axum::Router, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, _peer)) => {
                tokio::spawn(serve_connection(stream, router.clone(), shutdown.clone()));
            }
            // Out of file descriptors and the like: pause rather than spin, keep serving.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Serves one TCP connection until it closes, the server shuts down, or a handler fires the
/// connection's kill switch — then the connection is dropped, with no response to a request in
/// flight: the client sees the connection close, as when an answer is lost on the network.
async fn serve_connection(stream: TcpStream, router: axum::Router, shutdown: CancellationToken) {
    let _ = stream.set_nodelay(true);
    let kill = CancellationToken::new();
    let kill_switch = kill.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request
            .extensions_mut()
            .insert(ConnectionKill(kill_switch.clone()));
        router.clone().oneshot(request)
    });
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        // A client that hangs up mid-request is its own business: nothing to report.
        _ = connection => {}
        () = kill.cancelled() => {}
        () = shutdown.cancelled() => {}
    }
}

#[cfg(test)]
mod tests;
