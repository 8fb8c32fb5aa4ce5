//! `direct`: embatch runs the planned batch files itself against any OpenAI-compatible
//! `/v1/embeddings` endpoint (vLLM, Hugging Face TEI, Infinity, Ollama, LiteLLM, the
//! emulator), behind the same [`BatchProvider`] seam as a provider's Batch API, so that
//! `advance`, ingest, retries and `status` do not change.
//!
//! How the seam's steps map onto local work:
//! - **upload**: the input file stays where `plan` wrote it; its "file id" names the batch
//!   (`direct-input-batch_001`). Nothing is copied, nothing ever deletes it.
//! - **create**: a local job, `direct-batch_001`; creating it again is harmless (it resumes),
//!   so a lost answer cannot double anything and adoption never needs to find one.
//! - **get**: does the work, during this call: it sends the requests still without an answer
//!   (many inputs per request, bounded concurrency, requests and tokens per minute, backoff on
//!   429/5xx honouring `Retry-After`) and appends each answer, one line per input in the shape
//!   of a Batch API output line, to the batch's `answers.jsonl`, synced after each request. It
//!   reports `in_progress` with request counts, or `completed` once every input has a line.
//!   Only commands that may send ([`DirectOptions::send`]: `advance`, `run`) do work; the
//!   others (`submit`, `ingest`, `status --refresh`, `cancel`) only read what is on disk.
//! - **download**: the answered lines of `answers.jsonl`, successes to the output file and
//!   failures to the error file, exactly as a batch's two files.
//!
//! A crash at any instant loses nothing paid for and sends nothing twice: on every start the
//! answers file is read back, a torn last line (a kill in the middle of a write) is cut off,
//! and a request whose answer is on disk is never sent again. A refused request (HTTP 400,
//! 413, 422: one input too long for the server, say) is split in halves until the refused input
//! stands alone; it then gets an error line (`invalid_request`, reported, not retried). A
//! request still rate limited or failing after its retries gets a 429/5xx error line, which the
//! retry logic sends again in a retry batch, up to `--max-attempts`. A key refused, a server
//! unreachable or an answer that is not the API's stops the call with the error (the run is
//! saved; run advance again). The first answer's vectors are checked against the run's
//! dimension before anything is written ([`ApiError::WrongDimensions`]).
//!
//! It owns the `answers.jsonl` of each batch of a direct run, and nothing else in the run
//! folder.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota};
use reqwest::Url;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::crashpoint::crashpoint;
use crate::models::Provider;
use crate::plan::tokens;
use crate::provider::openai::{
    ClientOptions, classify_status_for, describe_transport, next_delay, parse_base_url,
    parse_retry_after, redact_url, sync_parent, temp_path_for,
};
use crate::provider::{
    ApiError, BatchProvider, ByteObserver, ClockReading, RemoteBatch, RemoteFile,
};
use crate::run::layout::{DIRECT_ANSWERS_FILE, INPUT_FILE, batch_dir};
use crate::run::state::{RemoteSnapshot, RequestCounts};
use crate::run::store::RunFile;

/// Inputs per request when `--direct-batch-size` is not given: what vLLM, TEI and Infinity
/// take without tuning (TEI's default `--max-client-batch-size` is 32; servers that take
/// fewer answer 4xx, and the request is split).
pub const DEFAULT_INPUTS_PER_REQUEST: usize = 64;
/// Bytes of input text per request: well under the usual 2 MB body limits.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1 << 20;
/// Requests in flight at once.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// Time limit of one request (connect excluded).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest provider error message kept in an error line.
const MAX_MESSAGE_CHARS: usize = 500;

/// How a direct run sends its requests; only `advance` and `run` send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectOptions {
    /// Inputs per request (`--direct-batch-size`).
    pub inputs_per_request: usize,
    /// Bytes of input text per request (`--direct-max-request-bytes`); one input larger than
    /// this goes alone.
    pub max_request_bytes: usize,
    /// Requests in flight at once (`--direct-concurrency`).
    pub concurrency: usize,
    /// `--max-requests-per-minute`.
    pub max_requests_per_minute: Option<NonZeroU32>,
    /// `--max-tokens-per-minute` (by the cl100k_base estimate of each input).
    pub max_tokens_per_minute: Option<NonZeroU32>,
    /// `--direct-time-budget`: this command starts no new request after this long; `None`
    /// works until every batch is answered.
    pub time_budget: Option<Duration>,
    /// Whether this command sends requests at all.
    pub send: bool,
}

impl Default for DirectOptions {
    fn default() -> DirectOptions {
        DirectOptions {
            inputs_per_request: DEFAULT_INPUTS_PER_REQUEST,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            concurrency: DEFAULT_CONCURRENCY,
            max_requests_per_minute: None,
            max_tokens_per_minute: None,
            time_budget: None,
            send: false,
        }
    }
}

/// A direct run's provider: its batches, executed here against the server at `url`.
pub struct DirectProvider {
    http: reqwest::Client,
    /// `<base URL>/embeddings`.
    url: Url,
    /// Kept only to scrub it from any text that reaches an error.
    api_key: Arc<str>,
    run_id: String,
    run_dir: PathBuf,
    dimensions: u32,
    cancelled: bool,
    opts: DirectOptions,
    deadline: Option<Instant>,
    max_retries: usize,
    min_backoff: Duration,
    max_backoff: Duration,
    pace: Pace,
    /// The last `Date` header seen (informational: a direct run has no remote timestamps).
    clock: Mutex<Option<ClockReading>>,
}

impl DirectProvider {
    /// The provider of `run` (in `run_dir`), sending to the endpoint of `client`.
    pub fn new(
        client: ClientOptions,
        run: &RunFile,
        run_dir: &Path,
        opts: DirectOptions,
    ) -> Result<DirectProvider, ApiError> {
        let base = parse_base_url(&client.base_url)?;
        let mut url = base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("embeddings");
        }
        let mut headers = HeaderMap::new();
        if !client.api_key.trim().is_empty() {
            let mut auth = HeaderValue::from_str(&format!("Bearer {}", client.api_key)).map_err(
                |_| ApiError::Config {
                    message: format!(
                        "the API key contains characters that cannot go in an HTTP header (a stray newline or quote?): check {}",
                        Provider::Direct.key_var()
                    ),
                },
            )?;
            auth.set_sensitive(true);
            headers.insert(AUTHORIZATION, auth);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("embatch/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .tcp_keepalive(Duration::from_secs(30))
            .build()
            .map_err(|e| ApiError::Config {
                message: format!("could not set up the HTTP client: {e}"),
            })?;
        Ok(DirectProvider {
            http,
            url,
            api_key: Arc::from(client.api_key.as_str()),
            run_id: run.run_id.clone(),
            run_dir: run_dir.to_path_buf(),
            dimensions: run.settings.dimensions,
            cancelled: run.cancelled,
            deadline: opts.time_budget.map(|budget| Instant::now() + budget),
            pace: Pace::new(opts.max_requests_per_minute, opts.max_tokens_per_minute),
            opts,
            max_retries: client.max_retries,
            min_backoff: client.min_backoff,
            max_backoff: client.max_backoff.max(client.min_backoff),
            clock: Mutex::new(None),
        })
    }

    fn input_path(&self, batch: &str) -> PathBuf {
        batch_dir(&self.run_dir, batch).join(INPUT_FILE)
    }

    fn answers_path(&self, batch: &str) -> PathBuf {
        batch_dir(&self.run_dir, batch).join(DIRECT_ANSWERS_FILE)
    }

    /// The batch an upload filename names (`embatch-<run_id>-<batch>.jsonl`).
    fn batch_of_filename<'a>(&self, filename: &'a str) -> Option<&'a str> {
        let batch = filename
            .strip_prefix("embatch-")?
            .strip_prefix(self.run_id.as_str())?
            .strip_prefix('-')?
            .strip_suffix(".jsonl")?;
        valid_batch_name(batch).then_some(batch)
    }

    fn input_file(&self, batch: &str) -> Result<RemoteFile, ApiError> {
        let path = self.input_path(batch);
        let metadata = match fs_err::metadata(&path) {
            Ok(metadata) => metadata,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(ApiError::NotFound {
                    message: format!("{} is missing", path.display()),
                });
            }
            Err(err) => return Err(err.into()),
        };
        let created_at = metadata
            .modified()
            .ok()
            .map(DateTime::<Utc>::from)
            .unwrap_or_else(Utc::now);
        Ok(RemoteFile {
            id: FileId::Input(batch.to_owned()).to_string(),
            filename: format!("embatch-{}-{batch}.jsonl", self.run_id),
            bytes: metadata.len(),
            created_at,
            expires_at: None,
        })
    }

    /// What the job of `batch` looks like from its files, without sending anything.
    fn job(
        &self,
        batch: &str,
        answers: &Answers,
        total: u64,
        cancelled: bool,
    ) -> Result<RemoteBatch, ApiError> {
        let answered = answers.completed + answers.failed;
        let status = if answered >= total {
            "completed"
        } else if cancelled {
            "cancelled"
        } else {
            "in_progress"
        };
        let terminal = status != "in_progress";
        let output_file_id = (terminal && answers.completed > 0)
            .then(|| FileId::Output(batch.to_owned()).to_string());
        let error_file_id =
            (terminal && answers.failed > 0).then(|| FileId::Errors(batch.to_owned()).to_string());
        let counts = RequestCounts {
            total,
            completed: answers.completed,
            failed: answers.failed,
        };
        let id = job_id(batch);
        let record = serde_json::json!({
            "id": id,
            "object": "embatch.direct_job",
            "endpoint": "/v1/embeddings",
            "server": redact_url(self.url.as_str()),
            "status": status,
            "input_file_id": FileId::Input(batch.to_owned()).to_string(),
            "output_file_id": output_file_id,
            "error_file_id": error_file_id,
            "request_counts": {"total": total, "completed": answers.completed, "failed": answers.failed},
        });
        let record = serde_json::to_string_pretty(&record).map_err(|e| ApiError::Decode {
            provider: Provider::Direct,
            message: format!("could not encode job {id}: {e}"),
        })?;
        Ok(RemoteBatch {
            id,
            created_at: Utc::now(),
            metadata: BTreeMap::new(),
            snapshot: RemoteSnapshot {
                status: status.into(),
                request_counts: counts,
                output_file_id,
                error_file_id,
                expires_at: None,
                errors: Vec::new(),
            },
            record,
        })
    }

    fn out_of_time(&self) -> bool {
        self.deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
    }

    /// The job of `batch`, after sending what this command may send.
    async fn work(&self, batch: &str) -> Result<RemoteBatch, ApiError> {
        let input_path = self.input_path(batch);
        let answers_path = self.answers_path(batch);
        let may_send = self.opts.send && !self.cancelled && !self.out_of_time();
        let mut answers = if may_send {
            recover_answers(&answers_path)?
        } else {
            read_answers(&answers_path)?
        };
        let mut input = InputReader::open(&input_path)?;
        if !may_send {
            let total = input.count_lines()?;
            return self.job(batch, &answers, total, self.cancelled);
        }
        let mut file = {
            let mut options = fs_err::OpenOptions::new();
            options.create(true).append(true);
            #[cfg(unix)]
            fs_err::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            options.open(&answers_path)?
        };
        sync_parent(&answers_path).await?;
        let window = self.opts.concurrency.max(1) * 2;
        loop {
            if self.out_of_time() {
                break;
            }
            let groups = input.next_groups(&answers.answered, &self.opts, window)?;
            if groups.is_empty() {
                break;
            }
            let mut results =
                futures_util::stream::iter(groups.into_iter().map(|group| async move {
                    let lines = self.answer_group(&group).await;
                    (group, lines)
                }))
                .buffer_unordered(self.opts.concurrency.max(1));
            while let Some((group, lines)) = results.next().await {
                let lines = lines?;
                let mut block = String::new();
                for line in &lines {
                    block.push_str(&line.text);
                    block.push('\n');
                }
                append_block(&mut file, block.as_bytes())?;
                for (item, line) in group.items.iter().zip(&lines) {
                    answers.answered.insert(item.custom_id.clone());
                    if line.ok {
                        answers.completed += 1;
                    } else {
                        answers.failed += 1;
                    }
                }
                crashpoint("direct_after_answer");
            }
        }
        // The lines not read yet (a time budget ran out) count too.
        let total = input.count_lines()?;
        self.job(batch, &answers, total, self.cancelled)
    }

    /// One line per input of `group`, in order: the server's vectors, or error lines. Splits a
    /// refused request until the refused input stands alone. An `Err` stops the whole call.
    fn answer_group<'a>(
        &'a self,
        group: &'a Group,
    ) -> BoxFuture<'a, Result<Vec<AnswerLine>, ApiError>> {
        async move {
            match self.send(group).await {
                Ok(data) => self.success_lines(group, data),
                Err(ApiError::BadRequest { .. }) if group.items.len() > 1 => {
                    let (first, second) = group.split();
                    let mut lines = self.answer_group(&first).await?;
                    lines.extend(self.answer_group(&second).await?);
                    Ok(lines)
                }
                Err(ApiError::BadRequest { status, message }) => Ok(group
                    .items
                    .iter()
                    .map(|item| error_line(item, status, "invalid_request_error", &message))
                    .collect()),
                Err(ApiError::RateLimited { .. }) => Ok(group
                    .items
                    .iter()
                    .map(|item| {
                        error_line(
                            item,
                            429,
                            "rate_limit_exceeded",
                            "still rate limited after the retries",
                        )
                    })
                    .collect()),
                Err(ApiError::Server { status, .. }) => Ok(group
                    .items
                    .iter()
                    .map(|item| {
                        error_line(
                            item,
                            status,
                            "server_error",
                            "still failing after the retries",
                        )
                    })
                    .collect()),
                Err(other) => Err(other),
            }
        }
        .boxed()
    }

    /// Checks the answer (one vector per input, the run's dimension) and makes its lines.
    fn success_lines(
        &self,
        group: &Group,
        data: Vec<AnswerItem>,
    ) -> Result<Vec<AnswerLine>, ApiError> {
        let n_inputs = group.items.len();
        let mut slots: Vec<Option<Box<RawValue>>> = (0..n_inputs).map(|_| None).collect();
        let n_answers = data.len();
        for item in data {
            match slots.get_mut(item.index) {
                Some(slot @ None) => *slot = Some(item.embedding),
                _ => {
                    return Err(self.decode_error(format!(
                        "POST /embeddings answered an unexpected or repeated index {} for {n_inputs} inputs",
                        item.index
                    )));
                }
            }
        }
        let mut lines = Vec::with_capacity(n_inputs);
        for (item, slot) in group.items.iter().zip(slots) {
            let Some(embedding) = slot else {
                return Err(self.decode_error(format!(
                    "POST /embeddings answered {n_answers} vectors for {n_inputs} inputs"
                )));
            };
            let answered = vector_len(embedding.get()).ok_or_else(|| {
                self.decode_error(
                    "POST /embeddings answered an embedding that is neither an array nor base64"
                        .to_owned(),
                )
            })?;
            if answered != self.dimensions as usize {
                return Err(ApiError::WrongDimensions {
                    model: group.model.clone(),
                    answered,
                    expected: self.dimensions,
                });
            }
            lines.push(success_line(item, &group.model, embedding.get()));
        }
        Ok(lines)
    }

    fn decode_error(&self, message: String) -> ApiError {
        ApiError::Decode {
            provider: Provider::Direct,
            message,
        }
    }

    /// One request for `group`, retried on 429, 5xx and lost connections (honouring
    /// `Retry-After`), each attempt within the per-minute limits.
    async fn send(&self, group: &Group) -> Result<Vec<AnswerItem>, ApiError> {
        let body = group.body();
        let tokens = group.tokens.clamp(1, u32::MAX as usize) as u32;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.min_backoff)
            .with_max_delay(self.max_backoff)
            .with_max_times(self.max_retries)
            .with_jitter();
        let max_backoff = self.max_backoff;
        (|| async {
            self.pace.wait(tokens).await;
            self.send_once(&body).await
        })
        .retry(backoff)
        .sleep(tokio::time::sleep)
        .when(ApiError::is_retryable)
        .adjust(move |error, delay| next_delay(error, delay, max_backoff))
        .await
    }

    async fn send_once(&self, body: &Value) -> Result<Vec<AnswerItem>, ApiError> {
        let response = self
            .http
            .post(self.url.clone())
            .timeout(REQUEST_TIMEOUT)
            .json(body)
            .send()
            .await
            .map_err(|e| self.transport(&e))?;
        self.note_date(response.headers());
        let status = response.status();
        if !status.is_success() {
            let retry_after = parse_retry_after(response.headers(), SystemTime::now());
            let text = tokio::time::timeout(REQUEST_TIMEOUT, response.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let error = classify_status_for(Provider::Direct, status.as_u16(), retry_after, &text);
            return Err(match error {
                ApiError::BadRequest { status, message } => ApiError::BadRequest {
                    status,
                    message: self.scrub(message),
                },
                ApiError::NotFound { message } => ApiError::NotFound {
                    message: format!(
                        "{} answered 404 ({}): check the base URL (--base-url / {}) and --model",
                        redact_url(self.url.as_str()),
                        self.scrub(message),
                        Provider::Direct.base_url_var()
                    ),
                },
                other => other,
            });
        }
        let bytes = response.bytes().await.map_err(|e| self.transport(&e))?;
        let answer: EmbeddingAnswer = serde_json::from_slice(&bytes)
            .map_err(|e| self.decode_error(format!("POST /embeddings answered: {e}")))?;
        Ok(answer.data)
    }

    fn transport(&self, error: &reqwest::Error) -> ApiError {
        ApiError::Connection {
            provider: Provider::Direct,
            message: self.scrub(describe_transport(error)),
        }
    }

    fn scrub(&self, text: String) -> String {
        if self.api_key.is_empty() || !text.contains(&*self.api_key) {
            text
        } else {
            text.replace(&*self.api_key, "[redacted]")
        }
    }

    fn note_date(&self, headers: &HeaderMap) {
        let reading = headers
            .get("date")
            .and_then(|v| v.to_str().ok())
            .and_then(|date| ClockReading::parse(date, Utc::now()));
        if let Some(reading) = reading {
            *self.clock.lock().unwrap_or_else(|e| e.into_inner()) = Some(reading);
        }
    }

    /// Copies the answered lines of `batch` (successes or failures) to `dest`, through a temp
    /// file synced and renamed into place.
    async fn copy_answers(
        &self,
        batch: &str,
        successes: bool,
        dest: &Path,
        observe: &ByteObserver,
    ) -> Result<u64, ApiError> {
        let source = self.answers_path(batch);
        let reader = match fs_err::File::open(&source) {
            Ok(file) => BufReader::new(file),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(ApiError::NotFound {
                    message: format!("{} is missing", source.display()),
                });
            }
            Err(err) => return Err(err.into()),
        };
        let temp = temp_path_for(dest);
        let result = (|| -> Result<u64, ApiError> {
            let mut options = fs_err::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            fs_err::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut out = std::io::BufWriter::new(options.open(&temp)?);
            let mut written = 0u64;
            for_each_line(reader, |line| {
                if line_is_success(line) == Some(successes) {
                    out.write_all(line)?;
                    out.write_all(b"\n")?;
                    written += line.len() as u64 + 1;
                    observe(written);
                }
                Ok(())
            })?;
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            fs_err::rename(&temp, dest)?;
            Ok(written)
        })();
        if result.is_err() {
            let _ = fs_err::remove_file(&temp);
            return result;
        }
        sync_parent(dest).await?;
        result
    }
}

/// `--max-requests-per-minute` and `--max-tokens-per-minute` (governor's GCRA limiters).
/// Requests are paced evenly (one every minute / N, no burst), so no minute ever sees more
/// than N + 1. Tokens refill evenly too, with a burst of a tenth of a minute's budget; a
/// request larger than the burst takes its tokens burst by burst, so it waits as long as its
/// size asks.
struct Pace {
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<(DefaultDirectRateLimiter, NonZeroU32)>,
}

impl Pace {
    fn new(requests_per_minute: Option<NonZeroU32>, tokens_per_minute: Option<NonZeroU32>) -> Pace {
        let evenly = |per_minute: NonZeroU32| {
            Quota::with_period(Duration::from_secs(60) / per_minute.get())
                .unwrap_or_else(|| Quota::per_minute(per_minute))
        };
        Pace {
            requests: requests_per_minute
                .map(|n| DefaultDirectRateLimiter::direct(evenly(n).allow_burst(NonZeroU32::MIN))),
            tokens: tokens_per_minute.map(|n| {
                let burst = NonZeroU32::new(n.get() / 10).unwrap_or(NonZeroU32::MIN);
                (
                    DefaultDirectRateLimiter::direct(evenly(n).allow_burst(burst)),
                    burst,
                )
            }),
        }
    }

    /// Waits until one request of `tokens` tokens fits both limits.
    async fn wait(&self, tokens: u32) {
        if let Some(limiter) = &self.requests {
            limiter.until_ready().await;
        }
        if let Some((limiter, burst)) = &self.tokens {
            let mut left = tokens;
            while let Some(n) = NonZeroU32::new(left.min(burst.get())) {
                // `n` is at most the burst, so it always fits eventually.
                let _ = limiter.until_n_ready(n).await;
                left -= n.get();
            }
        }
    }
}

/// `batch_001`-like: a folder name, nothing that climbs out of `batches/`.
fn valid_batch_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn job_id(batch: &str) -> String {
    format!("direct-{batch}")
}

fn batch_of_job(id: &str) -> Option<&str> {
    id.strip_prefix("direct-").filter(|b| valid_batch_name(b))
}

/// The seam's file ids of a direct run: each names its batch.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FileId {
    Input(String),
    Output(String),
    Errors(String),
}

impl FileId {
    fn parse(id: &str) -> Option<FileId> {
        let (kind, batch) = id.strip_prefix("direct-")?.split_once('-')?;
        if !valid_batch_name(batch) {
            return None;
        }
        let batch = batch.to_owned();
        match kind {
            "input" => Some(FileId::Input(batch)),
            "output" => Some(FileId::Output(batch)),
            "errors" => Some(FileId::Errors(batch)),
            _ => None,
        }
    }
}

impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileId::Input(batch) => write!(f, "direct-input-{batch}"),
            FileId::Output(batch) => write!(f, "direct-output-{batch}"),
            FileId::Errors(batch) => write!(f, "direct-errors-{batch}"),
        }
    }
}

fn unknown_id(id: &str) -> ApiError {
    ApiError::NotFound {
        message: format!("{id} is not an object of this direct run"),
    }
}

// ---------------------------------------------------------------------------------------------
// The answers file

/// What the answers file of a batch holds.
#[derive(Debug, Default, PartialEq)]
struct Answers {
    answered: HashSet<String>,
    completed: u64,
    failed: u64,
}

#[derive(Deserialize)]
struct LineHead<'a> {
    #[serde(borrow)]
    custom_id: std::borrow::Cow<'a, str>,
    response: Option<LineResponse>,
}

#[derive(Deserialize)]
struct LineResponse {
    status_code: Option<u16>,
}

/// A complete answer line's custom_id and whether it is a success; `None` for a line that is
/// not one (torn, or not ours).
fn parse_answer_line(line: &[u8]) -> Option<(String, bool)> {
    let head: LineHead = serde_json::from_slice(line).ok()?;
    let ok = head.response.and_then(|r| r.status_code) == Some(200);
    Some((head.custom_id.into_owned(), ok))
}

fn line_is_success(line: &[u8]) -> Option<bool> {
    parse_answer_line(line).map(|(_, ok)| ok)
}

/// Scans an answers file: the answers of its complete lines, and the length of the prefix
/// they make. A last line without its newline, or any line that does not parse, ends the
/// valid prefix: everything from it on is a torn write.
fn scan_answers(reader: impl BufRead) -> std::io::Result<(Answers, u64)> {
    let mut answers = Answers::default();
    let mut valid = 0u64;
    let mut reader = reader;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        let Some((custom_id, ok)) = parse_answer_line(&line[..n - 1]) else {
            break;
        };
        if answers.answered.insert(custom_id) {
            if ok {
                answers.completed += 1;
            } else {
                answers.failed += 1;
            }
        }
        valid += n as u64;
    }
    Ok((answers, valid))
}

/// The answers on disk, read only.
fn read_answers(path: &Path) -> Result<Answers, ApiError> {
    match fs_err::File::open(path) {
        Ok(file) => Ok(scan_answers(BufReader::new(file))?.0),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Answers::default()),
        Err(err) => Err(err.into()),
    }
}

/// The answers on disk, with a torn tail cut off (and synced) so appends start on a line.
fn recover_answers(path: &Path) -> Result<Answers, ApiError> {
    let file = match fs_err::OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Answers::default()),
        Err(err) => return Err(err.into()),
    };
    let (answers, valid) = scan_answers(BufReader::new(&file))?;
    if file.metadata()?.len() > valid {
        file.set_len(valid)?;
        file.sync_all()?;
    }
    Ok(answers)
}

/// Appends one request's lines and syncs them: after this, those answers are never asked for
/// again. Written in two halves around a crash point, so the tests can tear a line.
fn append_block(file: &mut fs_err::File, block: &[u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::End(0))?;
    let half = block.len() / 2;
    file.write_all(&block[..half])?;
    crashpoint("direct_torn_answer");
    file.write_all(&block[half..])?;
    file.sync_data()
}

fn for_each_line(
    mut reader: impl BufRead,
    mut each: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Ok(());
        }
        each(&line[..n - 1])?;
    }
}

// ---------------------------------------------------------------------------------------------
// The input file

/// One request line of `input.jsonl`.
#[derive(Debug, Clone, PartialEq)]
struct Item {
    custom_id: String,
    input: String,
}

/// Inputs sent in one request: consecutive lines with the same model and options.
#[derive(Debug, Clone, PartialEq)]
struct Group {
    model: String,
    /// The request body but its `input`.
    rest: Map<String, Value>,
    items: Vec<Item>,
    /// cl100k_base estimate, for `--max-tokens-per-minute`.
    tokens: usize,
}

impl Group {
    fn body(&self) -> Value {
        let mut body = self.rest.clone();
        body.insert(
            "input".to_owned(),
            Value::Array(
                self.items
                    .iter()
                    .map(|i| Value::String(i.input.clone()))
                    .collect(),
            ),
        );
        Value::Object(body)
    }

    fn split(&self) -> (Group, Group) {
        let mid = self.items.len() / 2;
        let part = |items: &[Item]| Group {
            model: self.model.clone(),
            rest: self.rest.clone(),
            items: items.to_vec(),
            tokens: items.iter().map(|i| tokens::count_tokens(&i.input)).sum(),
        };
        (part(&self.items[..mid]), part(&self.items[mid..]))
    }
}

#[derive(Deserialize)]
struct RequestLine {
    custom_id: String,
    body: Map<String, Value>,
}

/// A request line: its item, and its body but the input.
type RequestParts = (Item, Map<String, Value>);

/// Reads `input.jsonl` once, front to back, in groups.
struct InputReader {
    path: PathBuf,
    reader: BufReader<fs_err::File>,
    lines: u64,
    /// A line read but not fitting the last group.
    held: Option<RequestParts>,
}

impl InputReader {
    fn open(path: &Path) -> Result<InputReader, ApiError> {
        let file = match fs_err::File::open(path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(ApiError::NotFound {
                    message: format!("{} is missing", path.display()),
                });
            }
            Err(err) => return Err(err.into()),
        };
        Ok(InputReader {
            path: path.to_path_buf(),
            reader: BufReader::new(file),
            lines: 0,
            held: None,
        })
    }

    fn count_lines(&mut self) -> Result<u64, ApiError> {
        while self.next_line()?.is_some() {}
        Ok(self.lines)
    }

    fn next_line(&mut self) -> Result<Option<RequestParts>, ApiError> {
        if let Some(held) = self.held.take() {
            return Ok(Some(held));
        }
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Ok(None);
            }
            if !line.trim().is_empty() {
                break;
            }
        }
        self.lines += 1;
        let bad = |why: String| ApiError::Config {
            message: format!(
                "line {} of {} is not a request line ({why}); the file was checked at plan time, so something changed it since",
                self.lines,
                self.path.display()
            ),
        };
        let parsed: RequestLine =
            serde_json::from_str(line.trim_end()).map_err(|e| bad(e.to_string()))?;
        let mut rest = parsed.body;
        let input = match rest.remove("input") {
            Some(Value::String(text)) => text,
            _ => return Err(bad("its body has no string input".to_owned())),
        };
        Ok(Some((
            Item {
                custom_id: parsed.custom_id,
                input,
            },
            rest,
        )))
    }

    /// Up to `max_groups` groups of the lines not in `answered`.
    fn next_groups(
        &mut self,
        answered: &HashSet<String>,
        opts: &DirectOptions,
        max_groups: usize,
    ) -> Result<Vec<Group>, ApiError> {
        let mut groups: Vec<Group> = Vec::new();
        let mut bytes = 0usize;
        while let Some((item, rest)) = self.next_line()? {
            if answered.contains(&item.custom_id) {
                continue;
            }
            let fits = groups.last().is_some_and(|last| {
                last.rest == rest
                    && last.items.len() < opts.inputs_per_request.max(1)
                    && bytes + item.input.len() <= opts.max_request_bytes
            });
            if !fits {
                if groups.len() == max_groups {
                    self.held = Some((item, rest));
                    break;
                }
                let model = rest
                    .get("model")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                groups.push(Group {
                    model,
                    rest,
                    items: Vec::new(),
                    tokens: 0,
                });
                bytes = 0;
            }
            let Some(last) = groups.last_mut() else {
                break;
            };
            bytes += item.input.len();
            last.tokens += tokens::count_tokens(&item.input);
            last.items.push(item);
        }
        Ok(groups)
    }
}

// ---------------------------------------------------------------------------------------------
// Answers and their lines

#[derive(Deserialize)]
struct EmbeddingAnswer {
    data: Vec<AnswerItem>,
}

#[derive(Deserialize)]
struct AnswerItem {
    #[serde(default)]
    index: usize,
    embedding: Box<RawValue>,
}

/// One line of the answers file, and whether it is a success.
#[derive(Debug, Clone, PartialEq)]
struct AnswerLine {
    text: String,
    ok: bool,
}

/// The size of an embedding as sent: a JSON array's length, or a base64 string's floats.
fn vector_len(raw: &str) -> Option<usize> {
    if raw.starts_with('"') {
        use base64::Engine as _;
        let text: &str = serde_json::from_str(raw).ok()?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?;
        (bytes.len() % 4 == 0).then_some(bytes.len() / 4)
    } else {
        serde_json::from_str::<Vec<serde::de::IgnoredAny>>(raw)
            .ok()
            .map(|v| v.len())
    }
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// A Batch API output line for one input: the embedding exactly as the server sent it.
fn success_line(item: &Item, model: &str, embedding: &str) -> AnswerLine {
    AnswerLine {
        text: format!(
            r#"{{"custom_id":{},"response":{{"status_code":200,"body":{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":{embedding}}}],"model":{}}}}},"error":null}}"#,
            json_string(&item.custom_id),
            json_string(model),
        ),
        ok: true,
    }
}

/// A Batch API error line (an HTTP error inside the line) for one input.
fn error_line(item: &Item, status: u16, code: &str, message: &str) -> AnswerLine {
    let message: String = message.chars().take(MAX_MESSAGE_CHARS).collect();
    AnswerLine {
        text: format!(
            r#"{{"custom_id":{},"response":{{"status_code":{status},"body":{{"error":{{"message":{},"type":{},"param":null,"code":{}}}}}}},"error":null}}"#,
            json_string(&item.custom_id),
            json_string(&message),
            json_string(code),
            json_string(code),
        ),
        ok: false,
    }
}

// ---------------------------------------------------------------------------------------------
// The seam

impl BatchProvider for DirectProvider {
    fn upload<'a>(
        &'a self,
        path: &'a Path,
        filename: &'a str,
        _expires_after: Duration,
        observe: ByteObserver,
    ) -> BoxFuture<'a, Result<RemoteFile, ApiError>> {
        async move {
            let batch = self.batch_of_filename(filename).ok_or_else(|| ApiError::Config {
                message: format!("{filename} is not an input file name of run {}", self.run_id),
            })?;
            if self.input_path(batch) != path {
                return Err(ApiError::Config {
                    message: format!(
                        "{} is not the input file of {batch}: a direct run sends only the files of its own folder",
                        path.display()
                    ),
                });
            }
            let file = self.input_file(batch)?;
            observe(file.bytes);
            Ok(file)
        }
        .boxed()
    }

    fn find_files_named<'a>(
        &'a self,
        filename: &'a str,
    ) -> BoxFuture<'a, Result<Vec<RemoteFile>, ApiError>> {
        async move {
            let Some(batch) = self.batch_of_filename(filename) else {
                return Ok(Vec::new());
            };
            match self.input_file(batch) {
                Ok(file) => Ok(vec![file]),
                Err(ApiError::NotFound { .. }) => Ok(Vec::new()),
                Err(err) => Err(err),
            }
        }
        .boxed()
    }

    fn get_file<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<RemoteFile, ApiError>> {
        async move {
            match FileId::parse(id) {
                Some(FileId::Input(batch)) => self.input_file(&batch),
                _ => Err(unknown_id(id)),
            }
        }
        .boxed()
    }

    /// The input file is the plan's own and is never deleted; the output and error files are
    /// the one answers file, removed once ingested (unless `--keep-remote-files`).
    fn delete_file<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ApiError>> {
        async move {
            match FileId::parse(id) {
                Some(FileId::Input(_)) | None => Ok(()),
                Some(FileId::Output(batch) | FileId::Errors(batch)) => {
                    match fs_err::remove_file(self.answers_path(&batch)) {
                        Ok(()) => Ok(()),
                        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
                        Err(err) => Err(err.into()),
                    }
                }
            }
        }
        .boxed()
    }

    fn download_file<'a>(
        &'a self,
        id: &'a str,
        dest: &'a Path,
        observe: ByteObserver,
    ) -> BoxFuture<'a, Result<u64, ApiError>> {
        async move {
            match FileId::parse(id) {
                Some(FileId::Output(batch)) => {
                    self.copy_answers(&batch, true, dest, &observe).await
                }
                Some(FileId::Errors(batch)) => {
                    self.copy_answers(&batch, false, dest, &observe).await
                }
                _ => Err(unknown_id(id)),
            }
        }
        .boxed()
    }

    fn create_batch<'a>(
        &'a self,
        input_file_id: &'a str,
        metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<RemoteBatch, ApiError>> {
        async move {
            let Some(FileId::Input(batch)) = FileId::parse(input_file_id) else {
                return Err(unknown_id(input_file_id));
            };
            let mut job = self.work_without_sending(&batch)?;
            job.metadata = metadata.clone();
            Ok(job)
        }
        .boxed()
    }

    fn get_batch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<RemoteBatch, ApiError>> {
        async move {
            let batch = batch_of_job(id).ok_or_else(|| unknown_id(id))?;
            self.work(batch).await
        }
        .boxed()
    }

    fn cancel_batch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<RemoteBatch, ApiError>> {
        async move {
            let batch = batch_of_job(id).ok_or_else(|| unknown_id(id))?;
            let answers = read_answers(&self.answers_path(batch))?;
            let total = InputReader::open(&self.input_path(batch))?.count_lines()?;
            // Nothing runs between two calls: the job stops where it is.
            self.job(batch, &answers, total, true)
        }
        .boxed()
    }

    /// A direct job is created again harmlessly (it resumes from its answers), so there is
    /// never one to adopt.
    fn find_batches<'a>(
        &'a self,
        _not_before: DateTime<Utc>,
        _metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<RemoteBatch>, ApiError>> {
        async move { Ok(Vec::new()) }.boxed()
    }

    fn embed<'a>(
        &'a self,
        model: &'a str,
        inputs: &'a [String],
        dimensions: Option<u32>,
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, ApiError>> {
        async move {
            let mut rest = Map::new();
            rest.insert("model".to_owned(), Value::String(model.to_owned()));
            if let Some(dimensions) = dimensions {
                rest.insert("dimensions".to_owned(), Value::from(dimensions));
            }
            let group = Group {
                model: model.to_owned(),
                rest,
                items: inputs
                    .iter()
                    .enumerate()
                    .map(|(i, input)| Item {
                        custom_id: i.to_string(),
                        input: input.clone(),
                    })
                    .collect(),
                tokens: 0,
            };
            let data = self.send(&group).await?;
            let mut slots: Vec<Option<Vec<f32>>> = vec![None; inputs.len()];
            for item in data {
                let vector: Vec<f32> = serde_json::from_str(item.embedding.get())
                    .map_err(|e| self.decode_error(format!("POST /embeddings answered: {e}")))?;
                if let Some(slot @ None) = slots.get_mut(item.index) {
                    *slot = Some(vector);
                }
            }
            slots
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    self.decode_error(format!(
                        "POST /embeddings did not answer one vector for each of {} inputs",
                        inputs.len()
                    ))
                })
        }
        .boxed()
    }

    fn clock_reading(&self) -> Option<ClockReading> {
        // Nothing of a direct run is timed by the server: its clock does not matter.
        None
    }

    fn read_clock(&self) -> BoxFuture<'_, Result<(), ApiError>> {
        async move { Ok(()) }.boxed()
    }
}

impl DirectProvider {
    fn work_without_sending(&self, batch: &str) -> Result<RemoteBatch, ApiError> {
        let answers = read_answers(&self.answers_path(batch))?;
        let total = InputReader::open(&self.input_path(batch))?.count_lines()?;
        self.job(batch, &answers, total, self.cancelled)
    }
}

#[cfg(test)]
mod tests;
