//! An OpenAI-compatible emulator of the Files, Batches and Embeddings APIs, for the tests, the
//! demo and the benchmark (in-process on `127.0.0.1:0`) and for `embatch emulator --listen`.
//!
//! This module owns the [`Emulator`] handle, the shared state (files, batches, faults,
//! counters) and the server loop. The server loop is our own rather than `axum::serve` because
//! a [`LostAnswer`] fault must drop a connection *after* its handler acted and *without* a
//! response: each connection gets a kill switch in its requests' extensions, and the connection
//! task drops the connection when it fires. `routes` holds the handlers, `batches` the batch
//! lifecycle and output generation, `embeddings` one embeddings request, `vectors` the
//! deterministic embedding function, `voyage` the translation into Voyage AI's Batch API
//! (`EmulatorConfig::api`), `gemini` the Gemini API's routes over the same files and batches.
//! Every response follows the OpenAPI description of the OpenAI API (DESIGN §8), or the
//! provider's own reference; the emulator never calls the network.
//!
//! All shared state sits behind one `std::sync::Mutex`, never held across an `.await`; the
//! expensive work (validating an input file, generating an output file) runs outside it.

mod batches;
mod embeddings;
mod gemini;
mod routes;
mod state;
pub mod vectors;
mod voyage;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use self::batches::{BatchRecord, Status};
use self::state::{ConnectionKill, Shared, StoredFile};
pub use self::state::{Counters, EmulatorConfig, Faults, LostAnswer};
pub use self::voyage::Api;

/// [`Emulator::enqueued_tokens`]: the tokens (input bytes / 4) of the batches created and not
/// refused for the enqueued-token limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnqueuedTokens {
    /// Of the batches not finished in the status a client last read: what the limit checks
    /// at a creation.
    pub as_last_read: u64,
    /// Of the batches the clock has not ended yet, read or not: what the provider is still
    /// working on (a batch whose stages are over but that nobody read since is not).
    pub by_clock: u64,
    /// Of every batch ever created.
    pub created: u64,
}

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
        let router = gemini::layer(
            routes::router(Arc::clone(&shared), gemini::routes()),
            shared.api,
        );
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

    /// `http://127.0.0.1:PORT/v1`: what `--base-url` / `OPENAI_BASE_URL` should be; for the
    /// Gemini API, whose paths carry their version, `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        if self.shared.api == Api::Gemini {
            return format!("http://{}", self.addr);
        }
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

    /// The tokens the emulator holds as enqueued now, counted as its enqueued-token limit
    /// counts them (an input file's bytes / 4, batches refused for the limit left out). This
    /// does not advance any batch.
    pub fn enqueued_tokens(&self) -> EnqueuedTokens {
        let now = Instant::now();
        let stage_duration = self.shared.stage_duration;
        let state = self.shared.lock();
        let mut tokens = EnqueuedTokens::default();
        for record in state.batches.iter().filter(|b| b.counts_as_enqueued()) {
            let estimate = (record.input.len() as u64).div_ceil(4);
            tokens.created += estimate;
            if !record.status.is_terminal() {
                tokens.as_last_read += estimate;
            }
            if record.running_by_clock(now, stage_duration) {
                tokens.by_clock += estimate;
            }
        }
        tokens
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
    let (what, base_var, key_var) = match emulator.shared.api {
        Api::Voyage => ("Voyage-compatible", "VOYAGE_BASE_URL", "VOYAGE_API_KEY"),
        Api::Gemini => ("Gemini-compatible", "GEMINI_BASE_URL", "GEMINI_API_KEY"),
        Api::Openai => ("OpenAI-compatible", "OPENAI_BASE_URL", "OPENAI_API_KEY"),
    };
    eprintln!("{what} emulator listening (ctrl-c stops it)");
    eprintln!("  {base_var}={}", emulator.base_url());
    if show_key {
        eprintln!("  {key_var}={}", emulator.api_key());
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
