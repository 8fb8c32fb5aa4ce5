//! The OpenAI HTTP client: Files, Batches and the realtime `/embeddings` endpoint.
//!
//! This module owns every request embatch sends to the provider (or to the emulator): the
//! headers, the timeouts, the retries and the classification of failures into [`ApiError`].
//! It does not decide what to do with a failure — the state machine does — but it says
//! whether a failure may be retried ([`ApiError::is_retryable`]) and whether a call that
//! creates something may have succeeded anyway ([`ApiError::is_unknown_outcome`]).
//!
//! Reads, downloads, deletes and cancels are retried with exponential backoff and jitter
//! (honouring `Retry-After`). The two calls that create a remote object, [`ApiClient::upload_file`]
//! and [`ApiClient::create_batch`], are sent once: a lost answer comes back as
//! [`ApiError::UnknownOutcome`] so that the caller looks for the object before creating it again
//! (DESIGN.md §5). The API key never appears in an error, in `Debug` output or in a log line.
//!
//! Every answer's `Date` header is remembered ([`ApiClient::clock_reading`]): the provider's
//! timestamps (`created_at`, `expires_at`) are on its clock, and a caller compares them with
//! the provider's time, not with this machine's, whose clock may be far off.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{Method, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

/// The provider's base URL when none is configured.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// Page size when listing batches (the API's maximum).
const BATCH_PAGE_SIZE: u32 = 100;
/// Page size when listing files (the API allows up to 10,000; smaller pages keep answers short).
const FILE_PAGE_SIZE: u32 = 1000;
/// The longest provider error message kept in an error (HTML error pages can be huge).
const MAX_MESSAGE_CHARS: usize = 500;
/// Write buffer for downloads: fewer, larger writes to disk.
const DOWNLOAD_BUFFER_BYTES: usize = 1 << 20;
/// Read size for uploads.
const UPLOAD_CHUNK_BYTES: usize = 256 * 1024;

// ---------------------------------------------------------------------------------------------
// Options

/// Told the number of bytes transferred so far (upload and download progress).
pub type ByteObserver = Arc<dyn Fn(u64) + Send + Sync>;

/// How to reach the API and how hard to retry.
#[derive(Clone)]
pub struct ClientOptions {
    /// For example `https://api.openai.com/v1` or the emulator's `http://127.0.0.1:PORT/v1`.
    pub base_url: String,
    pub api_key: String,
    /// Sent as `OpenAI-Organization` when set.
    pub organization: Option<String>,
    /// Sent as `OpenAI-Project` when set.
    pub project: Option<String>,
    /// Retries after the first attempt of a retried call (default 6).
    pub max_retries: usize,
    /// First backoff delay (default 1 s).
    pub min_backoff: Duration,
    /// Longest backoff delay, and the cap on a server's `Retry-After` (default 60 s).
    pub max_backoff: Duration,
}

impl ClientOptions {
    /// Options with the default retry policy.
    pub fn new(base_url: impl Into<String>, api_key: impl Into<String>) -> ClientOptions {
        ClientOptions {
            base_url: base_url.into(),
            api_key: api_key.into(),
            ..ClientOptions::default()
        }
    }
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            base_url: DEFAULT_BASE_URL.to_owned(),
            api_key: String::new(),
            organization: None,
            project: None,
            max_retries: 6,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

// Written by hand so that the key never reaches a log line.
impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("base_url", &redact_url(&self.base_url))
            .field("api_key", &"[redacted]")
            .field("organization", &self.organization)
            .field("project", &self.project)
            .field("max_retries", &self.max_retries)
            .field("min_backoff", &self.min_backoff)
            .field("max_backoff", &self.max_backoff)
            .finish()
    }
}

/// Time limits. The defaults suit the real API; tests shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// To open a connection.
    pub connect: Duration,
    /// Whole JSON calls (request, answer and body).
    pub request: Duration,
    /// Uploads and downloads have no total limit (a 1.5 GB file takes a while) but fail when
    /// no byte moves for this long.
    pub idle: Duration,
    /// After an upload's last byte is sent, how long the server may take to answer.
    pub upload_answer: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(10),
            request: Duration::from_secs(120),
            idle: Duration::from_secs(120),
            upload_answer: Duration::from_secs(300),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Types (only the fields embatch uses; unknown fields are ignored)

/// A file (`OpenAIFile` in the OpenAPI description).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileObject {
    pub id: String,
    #[serde(default)]
    pub bytes: u64,
    /// Unix seconds.
    #[serde(default)]
    pub created_at: i64,
    #[serde(default)]
    pub filename: String,
    #[serde(default)]
    pub purpose: String,
    /// Deprecated by the provider, but still sent: `uploaded`, `processed` or `error`.
    #[serde(default)]
    pub status: Option<String>,
    /// Unix seconds; absent when the file never expires.
    #[serde(default)]
    pub expires_at: Option<i64>,
}

/// One page of a list endpoint (`ListFilesResponse`, `ListBatchesResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(deserialize = "T: serde::de::DeserializeOwned"))]
pub struct Page<T> {
    #[serde(default = "Vec::new")]
    pub data: Vec<T>,
    #[serde(default)]
    pub has_more: bool,
    #[serde(default)]
    pub first_id: Option<String>,
    #[serde(default)]
    pub last_id: Option<String>,
}

/// One page of `GET /files`.
pub type FileList = Page<FileObject>;

/// A batch (`Batch` in the OpenAPI description).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub id: String,
    /// `validating`, `failed`, `in_progress`, `finalizing`, `completed`, `expired`,
    /// `cancelling` or `cancelled`. Kept as a string so that a status the provider adds later
    /// is shown as it is rather than rejected.
    pub status: String,
    pub input_file_id: String,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    #[serde(default)]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub request_counts: Option<RequestCounts>,
    #[serde(default)]
    pub errors: Option<BatchErrors>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

impl Batch {
    /// True once the provider will not change the batch any more.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.status.as_str(),
            "completed" | "failed" | "expired" | "cancelled"
        )
    }

    /// The value of one metadata key, if set.
    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.metadata.as_ref()?.get(key).map(String::as_str)
    }
}

/// `Batch.request_counts`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub completed: u64,
    #[serde(default)]
    pub failed: u64,
}

/// `Batch.errors`: why the provider rejected a whole batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchErrors {
    #[serde(default)]
    pub data: Vec<BatchError>,
}

/// One entry of `Batch.errors.data` (`BatchError`: every field optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub param: Option<String>,
    #[serde(default)]
    pub line: Option<u64>,
}

/// One page of `GET /batches`.
pub type BatchList = Page<Batch>;

#[derive(Serialize)]
struct CreateBatchRequest<'a> {
    input_file_id: &'a str,
    endpoint: &'static str,
    completion_window: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a BTreeMap<String, String>>,
}

#[derive(Serialize)]
struct CreateEmbeddingRequest<'a> {
    model: &'a str,
    input: &'a [String],
    encoding_format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u32>,
}

#[derive(Deserialize)]
struct CreateEmbeddingResponse {
    data: Vec<Embedding>,
}

#[derive(Deserialize)]
struct Embedding {
    index: usize,
    embedding: Vec<f32>,
}

/// The provider's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error: ErrorDetail,
}

#[derive(Deserialize, Default)]
struct ErrorDetail {
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

// ---------------------------------------------------------------------------------------------
// Errors

/// What went wrong talking to the API. Messages never contain the API key.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401/403: stop at once; never retried.
    #[error(
        "the API rejected the key (HTTP {status}): check OPENAI_API_KEY (and --organization/--project)"
    )]
    Auth { status: u16 },

    /// 429 `insufficient_quota`: stop at once; never retried.
    #[error(
        "the API refused the request for lack of quota (HTTP 429 insufficient_quota): check the plan and billing details of the OpenAI account, then run the command again"
    )]
    Quota,

    /// The organisation's enqueued token/request limit for batches was reached: the caller
    /// parks the batch in `queued`; never retried here.
    #[error(
        "the provider's batch queue limit was reached ({message}): the batch waits until other batches finish"
    )]
    QueueLimit { message: String },

    /// 429 rate limit: retried (honouring `Retry-After`); returned when the retries run out.
    #[error("{}", rate_limited_message(*.retry_after))]
    RateLimited { retry_after: Option<Duration> },

    /// 5xx (or 408): retried for reads; returned when the retries run out.
    #[error(
        "the API failed with HTTP {status}: try again later (see status.openai.com if it persists)"
    )]
    Server { status: u16 },

    /// No answer: connection refused, reset or closed, or a timeout. Retried for reads.
    #[error(
        "could not talk to the API: {message}; check the network and the base URL (--base-url / OPENAI_BASE_URL), then run the command again"
    )]
    Connection { message: String },

    /// 404.
    #[error("the API has no such object: {message}")]
    NotFound { message: String },

    /// Any other refusal (4xx), with the provider's message.
    #[error("the API refused the request (HTTP {status}): {message}")]
    BadRequest { status: u16, message: String },

    /// A call that creates something (upload, batch creation) may or may not have done so:
    /// the answer was lost. Look for the object before creating it again; never retry blindly.
    #[error(
        "the answer to the {what} was lost ({cause}): the object may exist, so look for it before creating it again"
    )]
    UnknownOutcome {
        what: String,
        #[source]
        cause: Box<ApiError>,
    },

    /// A successful answer that does not parse: the base URL probably points at something
    /// that is not the OpenAI API.
    #[error(
        "unexpected answer from the API ({message}): check the base URL (--base-url / OPENAI_BASE_URL)"
    )]
    Decode { message: String },

    /// A local file could not be read or written (the error names the file).
    #[error("{source}: check the disk space and the folder's permissions")]
    Io {
        #[from]
        source: std::io::Error,
    },

    /// A setting the client cannot use (bad base URL, a key that cannot be a header, …).
    #[error("{message}")]
    Config { message: String },
}

fn rate_limited_message(retry_after: Option<Duration>) -> String {
    match retry_after {
        Some(wait) => format!(
            "the API is rate limiting requests (HTTP 429, retry after {} s): wait and run the command again",
            wait.as_secs()
        ),
        None => "the API is rate limiting requests (HTTP 429): wait and run the command again"
            .to_owned(),
    }
}

impl ApiError {
    /// True for failures that a later attempt of the same read may not meet: rate limits,
    /// server errors and lost connections. False for refusals, for [`ApiError::UnknownOutcome`]
    /// (look first), and for local errors.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ApiError::RateLimited { .. } | ApiError::Server { .. } | ApiError::Connection { .. }
        )
    }

    /// True when a create call may have created its object although no answer said so.
    pub fn is_unknown_outcome(&self) -> bool {
        matches!(self, ApiError::UnknownOutcome { .. })
    }

    /// The server's requested wait, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }
}

/// Classifies a non-2xx answer from its status, its `Retry-After` and its body.
///
/// Rules, first match wins:
/// - 401, 403 → [`ApiError::Auth`]
/// - 400 or 429 whose code is `token_limit_exceeded` or whose message says the enqueued
///   token/request limit was reached → [`ApiError::QueueLimit`]
/// - 429 with `insufficient_quota` (code or type) → [`ApiError::Quota`]
/// - other 429 → [`ApiError::RateLimited`]
/// - 404 → [`ApiError::NotFound`]
/// - 408, 5xx → [`ApiError::Server`]
/// - anything else → [`ApiError::BadRequest`] with the provider's message
pub fn classify_status(status: u16, retry_after: Option<Duration>, body: &str) -> ApiError {
    let parsed: ErrorBody = serde_json::from_str(body).unwrap_or_default();
    let code = match &parsed.error.code {
        Some(serde_json::Value::String(s)) => Some(s.as_str()),
        _ => None,
    };
    let kind = parsed.error.kind.as_deref();
    let message = match parsed.error.message.as_deref().map(str::trim) {
        Some(m) if !m.is_empty() => truncate(m),
        _ => {
            let raw = body.trim();
            if raw.is_empty() {
                format!("HTTP {status} with an empty body")
            } else {
                truncate(raw)
            }
        }
    };
    match status {
        401 | 403 => ApiError::Auth { status },
        400 | 429 if is_queue_limit(code, &message) => ApiError::QueueLimit { message },
        429 if code == Some("insufficient_quota") || kind == Some("insufficient_quota") => {
            ApiError::Quota
        }
        429 => ApiError::RateLimited { retry_after },
        404 => ApiError::NotFound { message },
        408 | 500..=599 => ApiError::Server { status },
        _ => ApiError::BadRequest { status, message },
    }
}

fn is_queue_limit(code: Option<&str>, message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    code == Some("token_limit_exceeded")
        || lower.contains("enqueued token limit")
        || lower.contains("enqueued request limit")
}

fn truncate(message: &str) -> String {
    if message.chars().count() <= MAX_MESSAGE_CHARS {
        message.to_owned()
    } else {
        let cut: String = message.chars().take(MAX_MESSAGE_CHARS).collect();
        format!("{cut}…")
    }
}

/// The wait a server asks for: `retry-after-ms` (milliseconds, sent by OpenAI), else
/// `Retry-After` as seconds or as an HTTP-date (a date in the past means now).
pub fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = header_str(headers, "retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let value = header_str(headers, "retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// The backoff before the next retry: the server's `Retry-After` when it sent a non-zero one
/// (capped at `max_backoff`), else backon's exponential delay with jitter. `None` means the
/// retries ran out.
fn next_delay(
    error: &ApiError,
    backoff_delay: Option<Duration>,
    max_backoff: Duration,
) -> Option<Duration> {
    let delay = backoff_delay?;
    // A zero `Retry-After` is no hint at all: retrying at once would only hammer the server,
    // so the exponential delay applies (as in OpenAI's own SDKs).
    Some(match error.retry_after() {
        Some(wait) if !wait.is_zero() => wait.min(max_backoff),
        _ => delay,
    })
}

/// Describes a transport error with its whole chain ("error sending request …: connection
/// closed before message completed"), which reqwest's own `Display` leaves out.
fn describe_transport(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        format!("timed out ({error})")
    } else {
        error.to_string()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

// ---------------------------------------------------------------------------------------------
// The client

/// The OpenAI Files + Batches (+ embeddings) client. Cheap to clone.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base_url: Url,
    /// Kept only to scrub it from any text that reaches an error.
    api_key: Arc<str>,
    organization: Option<String>,
    project: Option<String>,
    max_retries: usize,
    min_backoff: Duration,
    max_backoff: Duration,
    timeouts: Timeouts,
    retries: Arc<AtomicUsize>,
    /// The last `Date` header seen, with this machine's time when it arrived.
    clock: Arc<Mutex<Option<ClockReading>>>,
}

/// The provider's clock as one answer's `Date` header showed it, against this machine's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockReading {
    /// The header as sent, for messages.
    pub date_header: String,
    pub provider_time: DateTime<Utc>,
    pub local_time: DateTime<Utc>,
}

impl ClockReading {
    /// A reading of header `date` received at `local_time`; `None` when it is not an HTTP
    /// date.
    pub fn parse(date: &str, local_time: DateTime<Utc>) -> Option<ClockReading> {
        let provider_time: DateTime<Utc> = httpdate::parse_http_date(date).ok()?.into();
        Some(ClockReading {
            date_header: date.to_owned(),
            provider_time,
            local_time,
        })
    }

    /// How far the provider's clock is ahead of this machine's (negative: behind). The
    /// header has whole seconds and the answer took some time to arrive, so a few seconds
    /// of it mean nothing.
    pub fn skew(&self) -> chrono::Duration {
        self.provider_time - self.local_time
    }
}

// Written by hand so that the key never reaches a log line.
impl fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiClient")
            .field("base_url", &self.base_url.as_str())
            .field("api_key", &"[redacted]")
            .field("organization", &self.organization)
            .field("project", &self.project)
            .field("max_retries", &self.max_retries)
            .field("min_backoff", &self.min_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

/// Whether a call creates something remote, and so must not be retried and must report an
/// ambiguous failure as [`ApiError::UnknownOutcome`].
#[derive(Clone, Copy)]
enum Effect<'a> {
    /// Reads, and calls that are harmless to repeat (delete, cancel, embeddings).
    Repeatable,
    Creates(&'a str),
}

impl ApiClient {
    /// A client with the default [`Timeouts`].
    pub fn new(opts: ClientOptions) -> Result<ApiClient, ApiError> {
        ApiClient::with_timeouts(opts, Timeouts::default())
    }

    /// A client with the given time limits.
    pub fn with_timeouts(opts: ClientOptions, timeouts: Timeouts) -> Result<ApiClient, ApiError> {
        let base_url = parse_base_url(&opts.base_url)?;
        if opts.api_key.trim().is_empty() {
            return Err(ApiError::Config {
                message: "no API key: set OPENAI_API_KEY (or pass --api-key)".to_owned(),
            });
        }
        let mut headers = HeaderMap::new();
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", opts.api_key)).map_err(|_| {
            ApiError::Config {
                message: "the API key contains characters that cannot go in an HTTP header (a stray newline or quote?): check OPENAI_API_KEY".to_owned(),
            }
        })?;
        auth.set_sensitive(true);
        headers.insert(AUTHORIZATION, auth);
        for (name, value, flag) in [
            ("openai-organization", &opts.organization, "--organization"),
            ("openai-project", &opts.project, "--project"),
        ] {
            if let Some(value) = value {
                let value = HeaderValue::from_str(value).map_err(|_| ApiError::Config {
                    message: format!(
                        "the value of {flag} contains characters that cannot go in an HTTP header"
                    ),
                })?;
                headers.insert(name, value);
            }
        }
        // No client-wide read timeout: reqwest counts it from the start of the request, which
        // would cut a long upload. JSON calls get a total timeout per request; transfers get
        // an idle timeout of their own.
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("embatch/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(timeouts.connect)
            .tcp_keepalive(Duration::from_secs(30))
            .build()
            .map_err(|e| ApiError::Config {
                message: format!("could not set up the HTTP client: {e}"),
            })?;
        Ok(ApiClient {
            http,
            base_url,
            api_key: Arc::from(opts.api_key.as_str()),
            organization: opts.organization,
            project: opts.project,
            max_retries: opts.max_retries,
            min_backoff: opts.min_backoff,
            max_backoff: opts.max_backoff.max(opts.min_backoff),
            timeouts,
            retries: Arc::new(AtomicUsize::new(0)),
            clock: Arc::new(Mutex::new(None)),
        })
    }

    /// The provider's clock as the last answer's `Date` header showed it; `None` before any
    /// answer, or when the server sends no (or no readable) `Date`.
    pub fn clock_reading(&self) -> Option<ClockReading> {
        self.clock.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Remembers the `Date` header of an answer.
    fn note_date(&self, headers: &HeaderMap) {
        let Some(reading) =
            header_str(headers, "date").and_then(|date| ClockReading::parse(date, Utc::now()))
        else {
            return;
        };
        *self.clock.lock().unwrap_or_else(|e| e.into_inner()) = Some(reading);
    }

    /// How many retries this client (and its clones) made so far.
    pub fn retry_count(&self) -> usize {
        self.retries.load(Ordering::Relaxed)
    }

    // -- Files -------------------------------------------------------------------------------

    /// Uploads a batch input file (`purpose=batch`), streamed from disk, expiring
    /// `expires_after` after its creation (the API accepts 1 hour to 30 days). Sent once: a lost
    /// answer is [`ApiError::UnknownOutcome`]; look for the file with
    /// [`ApiClient::find_files_named`] before uploading again.
    pub async fn upload_file(
        &self,
        path: &Path,
        filename: &str,
        expires_after: Duration,
    ) -> Result<FileObject, ApiError> {
        self.upload_file_observed(path, filename, expires_after, Arc::new(|_| {}))
            .await
    }

    /// [`ApiClient::upload_file`], telling `observe` how many bytes have been sent so far (for
    /// a progress bar).
    pub async fn upload_file_observed(
        &self,
        path: &Path,
        filename: &str,
        expires_after: Duration,
        observe: ByteObserver,
    ) -> Result<FileObject, ApiError> {
        let seconds = expires_after.as_secs();
        if !(3600..=2_592_000).contains(&seconds) {
            return Err(ApiError::Config {
                message: format!(
                    "a file's expiry must be between 1 hour and 30 days, not {seconds} s"
                ),
            });
        }
        let file = fs_err::tokio::File::open(path).await?;
        let length = file.metadata().await?.len();
        let what = format!("upload of {filename}");
        let effect = Effect::Creates(&what);

        // Progress shared with the watchdog below: when the last byte moved, and how many.
        let progress = Arc::new(Mutex::new((Instant::now(), 0u64)));
        let stream_progress = Arc::clone(&progress);
        let stream = tokio_util::io::ReaderStream::with_capacity(file, UPLOAD_CHUNK_BYTES).inspect(
            move |chunk| {
                if let Ok(bytes) = chunk {
                    let mut state = stream_progress.lock().unwrap_or_else(|e| e.into_inner());
                    state.0 = Instant::now();
                    state.1 += bytes.len() as u64;
                    observe(state.1);
                }
            },
        );
        let part = reqwest::multipart::Part::stream_with_length(
            reqwest::Body::wrap_stream(stream),
            length,
        )
        .file_name(filename.to_owned())
        .mime_str("application/octet-stream")
        .map_err(|e| ApiError::Config {
            message: format!("bad content type: {e}"),
        })?;
        // The plain fields go before the file, so a streaming server knows them up front.
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .text("expires_after[anchor]", "created_at")
            .text("expires_after[seconds]", seconds.to_string())
            .part("file", part);
        let request = self.http.post(self.url(&["files"])).multipart(form).send();

        let idle = self.timeouts.idle;
        let answer = self.timeouts.upload_answer;
        let watchdog = async {
            loop {
                tokio::time::sleep((idle / 4).max(Duration::from_millis(10))).await;
                let (last_progress, sent) = *progress.lock().unwrap_or_else(|e| e.into_inner());
                let limit = if sent >= length { answer } else { idle };
                if last_progress.elapsed() > limit {
                    return (sent, limit);
                }
            }
        };
        let response = tokio::select! {
            response = request => response,
            (sent, limit) = watchdog => {
                let cause = ApiError::Connection {
                    message: if sent >= length {
                        format!("no answer {} s after the whole file was sent", limit.as_secs())
                    } else {
                        format!("the upload stalled after {sent} of {length} bytes")
                    },
                };
                return Err(self.lost(effect, cause));
            }
        };
        self.finish_json(response, effect, Method::POST, "/files")
            .await
    }

    /// `GET /files`, newest first.
    pub async fn list_files(
        &self,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<FileList, ApiError> {
        let mut url = self.url(&["files"]);
        {
            let mut query = url.query_pairs_mut();
            if let Some(purpose) = purpose {
                query.append_pair("purpose", purpose);
            }
            if let Some(after) = after {
                query.append_pair("after", after);
            }
            query.append_pair("limit", &limit.to_string());
            query.append_pair("order", "desc");
        }
        self.read_json(Method::GET, url, "/files").await
    }

    /// `GET /files/{id}`; retried.
    pub async fn get_file(&self, id: &str) -> Result<FileObject, ApiError> {
        self.read_json(Method::GET, self.url(&["files", id]), "/files/{file_id}")
            .await
    }

    /// `DELETE /files/{id}`; retried. A file already gone is not an error.
    pub async fn delete_file(&self, id: &str) -> Result<(), ApiError> {
        let url = self.url(&["files", id]);
        match self
            .read_json::<serde_json::Value>(Method::DELETE, url, "/files/{file_id}")
            .await
        {
            Ok(_) | Err(ApiError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `GET /files/{id}/content` streamed to `dest` through a temp file in the same folder,
    /// synced and renamed into place, so `dest` is either absent, the old file or the whole new
    /// one. Retried from scratch; a body shorter than its `Content-Length` is retried too.
    /// Returns the number of bytes written.
    pub async fn download_file(&self, id: &str, dest: &Path) -> Result<u64, ApiError> {
        self.download_file_observed(id, dest, Arc::new(|_| {}))
            .await
    }

    /// [`ApiClient::download_file`], telling `observe` how many bytes have been received so
    /// far (for a progress bar; a retry starts again from zero).
    pub async fn download_file_observed(
        &self,
        id: &str,
        dest: &Path,
        observe: ByteObserver,
    ) -> Result<u64, ApiError> {
        self.retrying(|| self.download_once(id, dest, &observe))
            .await
    }

    async fn download_once(
        &self,
        id: &str,
        dest: &Path,
        observe: &ByteObserver,
    ) -> Result<u64, ApiError> {
        let idle = self.timeouts.idle;
        let stalled = |what: &str| ApiError::Connection {
            message: format!(
                "the download of file {id} stalled: no data for {} s {what}",
                idle.as_secs()
            ),
        };
        let request = self
            .http
            .get(self.url(&["files", id, "content"]))
            .header(reqwest::header::ACCEPT_ENCODING, "identity")
            .send();
        let response = tokio::time::timeout(idle, request)
            .await
            .map_err(|_| stalled("waiting for the answer"))?
            .map_err(|e| self.transport(&e))?;
        let mut response = self.check_status(response).await?;
        let expected = response.content_length();

        let temp = temp_path_for(dest);
        let result = async {
            let mut options = fs_err::tokio::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            options.mode(0o600);
            let file = options.open(&temp).await?;
            let mut writer = tokio::io::BufWriter::with_capacity(DOWNLOAD_BUFFER_BYTES, file);
            let mut written: u64 = 0;
            loop {
                let chunk = tokio::time::timeout(idle, response.chunk())
                    .await
                    .map_err(|_| stalled(&format!("after {written} bytes")))?
                    .map_err(|e| self.transport(&e))?;
                let Some(chunk) = chunk else { break };
                writer.write_all(&chunk).await?;
                written += chunk.len() as u64;
                observe(written);
            }
            if let Some(expected) = expected
                && written != expected
            {
                return Err(ApiError::Connection {
                    message: format!(
                        "the download of file {id} ended after {written} of {expected} bytes"
                    ),
                });
            }
            writer.flush().await?;
            let file = writer.into_inner();
            file.sync_all().await?;
            drop(file);
            fs_err::tokio::rename(&temp, dest).await?;
            sync_parent(dest).await?;
            Ok(written)
        }
        .await;
        if result.is_err() {
            // Best effort: a leftover temp file is harmless, and the real error matters more.
            let _ = tokio::fs::remove_file(&temp).await;
        }
        result
    }

    // -- Batches -----------------------------------------------------------------------------

    /// `POST /batches` for `/v1/embeddings` with a 24 h window. Sent once: a lost answer is
    /// [`ApiError::UnknownOutcome`]; look for the batch by its metadata with
    /// [`ApiClient::find_batches`] before creating it again.
    pub async fn create_batch(
        &self,
        input_file_id: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Batch, ApiError> {
        let body = CreateBatchRequest {
            input_file_id,
            endpoint: "/v1/embeddings",
            completion_window: "24h",
            metadata: (!metadata.is_empty()).then_some(metadata),
        };
        let what = format!("creation of the batch for file {input_file_id}");
        let request = self
            .http
            .post(self.url(&["batches"]))
            .timeout(self.timeouts.request)
            .json(&body)
            .send();
        self.finish_json(
            request.await,
            Effect::Creates(&what),
            Method::POST,
            "/batches",
        )
        .await
    }

    /// `GET /batches/{id}`; retried.
    pub async fn get_batch(&self, id: &str) -> Result<Batch, ApiError> {
        self.read_json(
            Method::GET,
            self.url(&["batches", id]),
            "/batches/{batch_id}",
        )
        .await
    }

    /// `GET /batches` (newest first); retried.
    pub async fn list_batches(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<BatchList, ApiError> {
        let mut url = self.url(&["batches"]);
        {
            let mut query = url.query_pairs_mut();
            if let Some(after) = after {
                query.append_pair("after", after);
            }
            query.append_pair("limit", &limit.to_string());
        }
        self.read_json(Method::GET, url, "/batches").await
    }

    /// `POST /batches/{id}/cancel`. Cancelling twice is harmless on the provider's side, so
    /// this is retried.
    pub async fn cancel_batch(&self, id: &str) -> Result<Batch, ApiError> {
        self.read_json(
            Method::POST,
            self.url(&["batches", id, "cancel"]),
            "/batches/{batch_id}/cancel",
        )
        .await
    }

    /// Finds batches newest-first, following pagination, stopping at batches created before
    /// `not_before` (a time on the provider's clock: see [`ApiClient::clock_reading`]);
    /// returns those for which `keep` is true. Used to adopt a batch after a
    /// lost answer (the API cannot filter by metadata).
    pub async fn find_batches(
        &self,
        not_before: DateTime<Utc>,
        keep: impl Fn(&Batch) -> bool,
    ) -> Result<Vec<Batch>, ApiError> {
        let not_before = not_before.timestamp();
        let mut found = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.list_batches(after.as_deref(), BATCH_PAGE_SIZE).await?;
            for batch in &page.data {
                if batch.created_at < not_before {
                    return Ok(found);
                }
                if keep(batch) {
                    found.push(batch.clone());
                }
            }
            let next = page
                .last_id
                .clone()
                .or_else(|| page.data.last().map(|b| b.id.clone()));
            // A page without progress would loop forever: stop instead.
            match next {
                Some(next)
                    if page.has_more && !page.data.is_empty() && after != Some(next.clone()) =>
                {
                    after = Some(next);
                }
                _ => return Ok(found),
            }
        }
    }

    /// Finds files (purpose `batch`) with exactly this filename, newest first.
    pub async fn find_files_named(&self, filename: &str) -> Result<Vec<FileObject>, ApiError> {
        let mut found = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .list_files(Some("batch"), after.as_deref(), FILE_PAGE_SIZE)
                .await?;
            found.extend(page.data.iter().filter(|f| f.filename == filename).cloned());
            let next = page
                .last_id
                .clone()
                .or_else(|| page.data.last().map(|f| f.id.clone()));
            match next {
                Some(next)
                    if page.has_more && !page.data.is_empty() && after != Some(next.clone()) =>
                {
                    after = Some(next);
                }
                _ => break,
            }
        }
        // The API already sorts newest first; sorting again makes it independent of the
        // server (a stable sort keeps the server's order within one second).
        found.sort_by_key(|f| std::cmp::Reverse(f.created_at));
        Ok(found)
    }

    // -- Realtime ----------------------------------------------------------------------------

    /// `POST /embeddings` with float output: one vector per input, in input order. Retried
    /// (a repeated request costs a little but changes nothing).
    pub async fn embed(
        &self,
        model: &str,
        inputs: &[String],
        dimensions: Option<u32>,
    ) -> Result<Vec<Vec<f32>>, ApiError> {
        let body = CreateEmbeddingRequest {
            model,
            input: inputs,
            encoding_format: "float",
            dimensions,
        };
        let body = serde_json::to_value(&body).map_err(|e| ApiError::Config {
            message: format!("could not encode the embeddings request: {e}"),
        })?;
        let url = self.url(&["embeddings"]);
        let response: CreateEmbeddingResponse = self
            .retrying(|| {
                let request = self
                    .http
                    .post(url.clone())
                    .timeout(self.timeouts.request)
                    .json(&body)
                    .send();
                self.send_json(request, Method::POST, "/embeddings")
            })
            .await?;
        order_embeddings(response.data, inputs.len())
    }

    // -- Plumbing ----------------------------------------------------------------------------

    /// `base_url` + path segments, each percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base_url.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Runs `op` until it succeeds, fails for good, or the retries run out.
    async fn retrying<T, Op, Fut>(&self, op: Op) -> Result<T, ApiError>
    where
        Op: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.min_backoff)
            .with_max_delay(self.max_backoff)
            .with_max_times(self.max_retries)
            .with_jitter();
        let max_backoff = self.max_backoff;
        op.retry(backoff)
            .sleep(tokio::time::sleep)
            .when(ApiError::is_retryable)
            .adjust(move |error, delay| next_delay(error, delay, max_backoff))
            .notify(|_, _| {
                self.retries.fetch_add(1, Ordering::Relaxed);
            })
            .await
    }

    /// A retried JSON call without a body (or with none needed: cancel).
    async fn read_json<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        path: &'static str,
    ) -> Result<T, ApiError> {
        self.retrying(|| {
            let request = self
                .http
                .request(method.clone(), url.clone())
                .timeout(self.timeouts.request)
                .send();
            self.send_json(request, method.clone(), path)
        })
        .await
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        request: impl Future<Output = Result<reqwest::Response, reqwest::Error>>,
        method: Method,
        path: &'static str,
    ) -> Result<T, ApiError> {
        let response = request.await.map_err(|e| self.transport(&e))?;
        self.finish_json(Ok(response), Effect::Repeatable, method, path)
            .await
    }

    /// Status check, body, decode; for a create call every ambiguous failure becomes
    /// [`ApiError::UnknownOutcome`].
    async fn finish_json<T: DeserializeOwned>(
        &self,
        response: Result<reqwest::Response, reqwest::Error>,
        effect: Effect<'_>,
        method: Method,
        path: &'static str,
    ) -> Result<T, ApiError> {
        let response = response.map_err(|e| self.send_failed(effect, &e))?;
        let response = self.check_status(response).await.map_err(|e| match e {
            ApiError::Server { .. } => self.lost(effect, e),
            other => other,
        })?;
        let body = response
            .bytes()
            .await
            .map_err(|e| self.lost(effect, self.transport(&e)))?;
        serde_json::from_slice(&body).map_err(|e| {
            let cause = ApiError::Decode {
                message: self.scrub(format!("{method} {path} answered: {e}")),
            };
            self.lost(effect, cause)
        })
    }

    /// `Ok(response)` for a 2xx; the classified error otherwise.
    async fn check_status(
        &self,
        response: reqwest::Response,
    ) -> Result<reqwest::Response, ApiError> {
        self.note_date(response.headers());
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = parse_retry_after(response.headers(), SystemTime::now());
        // The body of an error is short; a failure to read it only loses the message.
        let body = tokio::time::timeout(self.timeouts.request, response.text())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        Err(self.scrub_error(classify_status(status.as_u16(), retry_after, &body)))
    }

    /// A request that failed before any answer. Failing to connect means nothing was sent,
    /// so even a create call knows it created nothing; any later failure is ambiguous.
    fn send_failed(&self, effect: Effect<'_>, error: &reqwest::Error) -> ApiError {
        let cause = self.transport(error);
        if error.is_connect() {
            cause
        } else {
            self.lost(effect, cause)
        }
    }

    /// For a create call, wraps an ambiguous failure as [`ApiError::UnknownOutcome`].
    fn lost(&self, effect: Effect<'_>, cause: ApiError) -> ApiError {
        match effect {
            Effect::Repeatable => cause,
            Effect::Creates(what) => ApiError::UnknownOutcome {
                what: what.to_owned(),
                cause: Box::new(cause),
            },
        }
    }

    fn transport(&self, error: &reqwest::Error) -> ApiError {
        ApiError::Connection {
            message: self.scrub(describe_transport(error)),
        }
    }

    /// Removes the key from text that came from outside (a server could echo it).
    fn scrub(&self, text: String) -> String {
        if self.api_key.is_empty() || !text.contains(&*self.api_key) {
            text
        } else {
            text.replace(&*self.api_key, "[redacted]")
        }
    }

    fn scrub_error(&self, error: ApiError) -> ApiError {
        match error {
            ApiError::QueueLimit { message } => ApiError::QueueLimit {
                message: self.scrub(message),
            },
            ApiError::NotFound { message } => ApiError::NotFound {
                message: self.scrub(message),
            },
            ApiError::BadRequest { status, message } => ApiError::BadRequest {
                status,
                message: self.scrub(message),
            },
            other => other,
        }
    }
}

/// `raw` (a URL, or something meant to be one) fit to print: user and password replaced by
/// `***`, the query and fragment cut (`?…`), since any of them may carry a secret.
pub fn redact_url(raw: &str) -> String {
    let raw = raw.trim();
    let (scheme, rest) = match raw.find("://") {
        Some(i) => raw.split_at(i + 3),
        None => ("", raw),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let host = match authority.rfind('@') {
        Some(i) => format!("***@{}", &authority[i + 1..]),
        None => authority.to_owned(),
    };
    let path = match path.find(['?', '#']) {
        Some(i) => format!("{}?…", &path[..i]),
        None => path.to_owned(),
    };
    format!("{scheme}{host}{path}")
}

fn parse_base_url(base_url: &str) -> Result<Url, ApiError> {
    // Printed redacted: a URL with credentials is refused, and must not be echoed.
    let shown = redact_url(base_url);
    let invalid = |why: &str| ApiError::Config {
        message: format!(
            "the API base URL {shown:?} is not usable ({why}): expected something like {DEFAULT_BASE_URL}"
        ),
    };
    let url = Url::parse(base_url.trim()).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("not http or https"));
    }
    if url.cannot_be_a_base() || url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("not a base URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("credentials do not belong in the URL"));
    }
    Ok(url)
}

/// Puts the vectors in input order and checks that each input got exactly one.
fn order_embeddings(data: Vec<Embedding>, n_inputs: usize) -> Result<Vec<Vec<f32>>, ApiError> {
    let mut slots: Vec<Option<Vec<f32>>> = vec![None; n_inputs];
    let n_answers = data.len();
    for item in data {
        match slots.get_mut(item.index) {
            Some(slot @ None) => *slot = Some(item.embedding),
            _ => {
                return Err(ApiError::Decode {
                    message: format!(
                        "POST /embeddings answered an unexpected or repeated index {} for {n_inputs} inputs",
                        item.index
                    ),
                });
            }
        }
    }
    slots
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ApiError::Decode {
            message: format!("POST /embeddings answered {n_answers} vectors for {n_inputs} inputs"),
        })
}

/// A temp file beside `dest` (same folder, so the rename is atomic), unique per attempt.
fn temp_path_for(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "download".to_owned());
    let suffix: u32 = rand::random();
    dest.with_file_name(format!(".{name}.{suffix:08x}.part"))
}

/// Makes the rename durable: fsync the folder that holds `path`.
async fn sync_parent(path: &Path) -> Result<(), ApiError> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        fs_err::tokio::File::open(parent).await?.sync_all().await?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-test-SECRET-123";

    fn options(base_url: &str) -> ClientOptions {
        ClientOptions {
            max_retries: 3,
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            ..ClientOptions::new(base_url, KEY)
        }
    }

    fn assert_no_key(error: &ApiError) {
        let shown = format!("{error} | {error:#} | {error:?}");
        assert!(!shown.contains(KEY), "key leaked: {shown}");
        assert!(!shown.contains("SECRET"), "key leaked: {shown}");
    }

    // -- classification ----------------------------------------------------------------------

    fn body(message: &str, kind: &str, code: Option<&str>) -> String {
        serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
            .to_string()
    }

    #[test]
    fn auth_failures_stop() {
        for status in [401, 403] {
            let e = classify_status(
                status,
                None,
                &body(
                    "Incorrect API key",
                    "invalid_request_error",
                    Some("invalid_api_key"),
                ),
            );
            assert!(
                matches!(e, ApiError::Auth { status: s } if s == status),
                "{e:?}"
            );
            assert!(!e.is_retryable());
            assert!(e.to_string().contains("OPENAI_API_KEY"));
            assert!(e.to_string().contains(&format!("HTTP {status}")));
        }
    }

    #[test]
    fn insufficient_quota_is_not_a_rate_limit() {
        let e = classify_status(
            429,
            Some(Duration::from_secs(1)),
            &body(
                "You exceeded your current quota",
                "insufficient_quota",
                Some("insufficient_quota"),
            ),
        );
        assert!(matches!(e, ApiError::Quota), "{e:?}");
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("billing"));
        // Recognised by its type alone too.
        let e = classify_status(429, None, &body("quota", "insufficient_quota", None));
        assert!(matches!(e, ApiError::Quota), "{e:?}");
    }

    #[test]
    fn queue_limits_are_recognised() {
        let cases = [
            (
                400,
                body(
                    "Enqueued token limit reached for text-embedding-3-small in organization org-x. Limit: 3,000,000 enqueued tokens.",
                    "invalid_request_error",
                    None,
                ),
            ),
            (
                429,
                body(
                    "Enqueued request limit reached for text-embedding-3-small",
                    "invalid_request_error",
                    None,
                ),
            ),
            (
                400,
                body(
                    "too many tokens in flight",
                    "invalid_request_error",
                    Some("token_limit_exceeded"),
                ),
            ),
            (
                429,
                body(
                    "enqueued TOKEN limit reached",
                    "tokens",
                    Some("rate_limit_exceeded"),
                ),
            ),
        ];
        for (status, text) in cases {
            let e = classify_status(status, None, &text);
            assert!(
                matches!(e, ApiError::QueueLimit { .. }),
                "{status} {text}: {e:?}"
            );
            assert!(!e.is_retryable());
        }
        // Only on 400 and 429.
        let e = classify_status(
            500,
            None,
            &body("Enqueued token limit reached", "server_error", None),
        );
        assert!(matches!(e, ApiError::Server { status: 500 }), "{e:?}");
    }

    #[test]
    fn rate_limits_keep_retry_after() {
        let e = classify_status(
            429,
            Some(Duration::from_secs(7)),
            &body(
                "Rate limit reached",
                "requests",
                Some("rate_limit_exceeded"),
            ),
        );
        assert!(
            matches!(e, ApiError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(7)),
            "{e:?}"
        );
        assert!(e.is_retryable());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        let e = classify_status(429, None, "");
        assert!(
            matches!(e, ApiError::RateLimited { retry_after: None }),
            "{e:?}"
        );
    }

    #[test]
    fn server_errors_and_others() {
        for status in [500, 502, 503, 504, 408] {
            let e = classify_status(status, None, "<html>bad gateway</html>");
            assert!(
                matches!(e, ApiError::Server { status: s } if s == status),
                "{e:?}"
            );
            assert!(e.is_retryable());
        }
        let e = classify_status(
            404,
            None,
            &body("No such File object: file-x", "invalid_request_error", None),
        );
        assert!(
            matches!(&e, ApiError::NotFound { message } if message.contains("file-x")),
            "{e:?}"
        );
        assert!(!e.is_retryable());
        let e = classify_status(
            400,
            None,
            &body("Invalid 'input_file_id'", "invalid_request_error", None),
        );
        assert!(
            matches!(&e, ApiError::BadRequest { status: 400, message } if message == "Invalid 'input_file_id'"),
            "{e:?}"
        );
        // A body that is not the provider's JSON still gives a message.
        let e = classify_status(409, None, "conflict!");
        assert!(
            matches!(&e, ApiError::BadRequest { status: 409, message } if message == "conflict!"),
            "{e:?}"
        );
        let e = classify_status(422, None, "");
        assert!(
            matches!(&e, ApiError::BadRequest { message, .. } if message.contains("empty body")),
            "{e:?}"
        );
        // Huge bodies are cut.
        let e = classify_status(400, None, &"x".repeat(10_000));
        assert!(e.to_string().chars().count() < 1000);
    }

    #[test]
    fn retryable_and_unknown_outcome_flags() {
        let unknown = ApiError::UnknownOutcome {
            what: "upload of a.jsonl".into(),
            cause: Box::new(ApiError::Server { status: 502 }),
        };
        assert!(unknown.is_unknown_outcome());
        assert!(
            !unknown.is_retryable(),
            "a create must never be retried blindly"
        );
        assert!(unknown.to_string().contains("look for it"));
        assert!(
            ApiError::Connection {
                message: "reset".into()
            }
            .is_retryable()
        );
        assert!(
            !ApiError::Connection {
                message: "reset".into()
            }
            .is_unknown_outcome()
        );
        assert!(
            !ApiError::Decode {
                message: "x".into()
            }
            .is_retryable()
        );
        assert!(
            !ApiError::QueueLimit {
                message: "x".into()
            }
            .is_retryable()
        );
    }

    // -- Retry-After and backoff -------------------------------------------------------------

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn a_date_header_gives_the_provider_clock_skew() {
        let local = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap();
        let ahead = httpdate::fmt_http_date(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + 31 * 24 * 3600),
        );
        let reading = ClockReading::parse(&ahead, local).unwrap();
        assert_eq!(reading.skew(), chrono::Duration::days(31));
        assert_eq!(reading.date_header, ahead);
        let behind =
            httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(1_799_999_000));
        assert_eq!(
            ClockReading::parse(&behind, local).unwrap().skew(),
            chrono::Duration::seconds(-1000)
        );
        assert_eq!(ClockReading::parse("yesterday", local), None);
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after(&headers(&[("retry-after", "12")]), now),
            Some(Duration::from_secs(12))
        );
        assert_eq!(
            parse_retry_after(&headers(&[("retry-after", " 0 ")]), now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after(&headers(&[("retry-after", "1.5")]), now),
            Some(Duration::from_millis(1500))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&headers(&[("retry-after", &later)]), now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&headers(&[("retry-after", &earlier)]), now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after(
                &headers(&[("retry-after-ms", "250"), ("retry-after", "9")]),
                now
            ),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse_retry_after(&headers(&[("retry-after", "soon")]), now),
            None
        );
        assert_eq!(
            parse_retry_after(&headers(&[("retry-after", "-3")]), now),
            None
        );
        assert_eq!(parse_retry_after(&headers(&[]), now), None);
    }

    #[test]
    fn retry_after_beats_backoff_but_is_capped() {
        let max = Duration::from_secs(60);
        let limited = |secs| ApiError::RateLimited {
            retry_after: Some(Duration::from_secs(secs)),
        };
        assert_eq!(
            next_delay(&limited(5), Some(Duration::from_secs(1)), max),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            next_delay(&limited(3600), Some(Duration::from_secs(1)), max),
            Some(max)
        );
        assert_eq!(
            next_delay(
                &ApiError::Server { status: 503 },
                Some(Duration::from_secs(2)),
                max
            ),
            Some(Duration::from_secs(2))
        );
        // A zero Retry-After is no hint: the exponential delay applies.
        assert_eq!(
            next_delay(&limited(0), Some(Duration::from_millis(300)), max),
            Some(Duration::from_millis(300))
        );
        // Retries exhausted: no delay, whatever the server asked.
        assert_eq!(next_delay(&limited(5), None, max), None);
    }

    // -- pure helpers ------------------------------------------------------------------------

    #[test]
    fn urls_are_built_segment_by_segment() {
        for base in ["http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1/"] {
            let client = ApiClient::new(options(base)).unwrap();
            assert_eq!(
                client.url(&["files", "file-1", "content"]).as_str(),
                "http://127.0.0.1:9/v1/files/file-1/content"
            );
            assert_eq!(
                client.url(&["batches", "a/b?c"]).as_str(),
                "http://127.0.0.1:9/v1/batches/a%2Fb%3Fc"
            );
        }
    }

    #[test]
    fn bad_settings_are_refused_without_the_key() {
        for base in [
            "not a url",
            "ftp://x/v1",
            "mailto:x@y",
            "http://u:p@host/v1",
        ] {
            let e = ApiClient::new(options(base)).unwrap_err();
            assert!(matches!(e, ApiError::Config { .. }), "{base}: {e:?}");
            assert_no_key(&e);
        }
        let e = ApiClient::new(ClientOptions::new("http://x/v1", "  ")).unwrap_err();
        assert!(e.to_string().contains("OPENAI_API_KEY"));
        let e = ApiClient::new(ClientOptions::new("http://x/v1", format!("{KEY}\n"))).unwrap_err();
        assert!(e.to_string().contains("OPENAI_API_KEY"));
        assert_no_key(&e);
    }

    #[test]
    fn debug_output_hides_the_key() {
        let opts = ClientOptions {
            organization: Some("org-1".into()),
            ..options("http://127.0.0.1:9/v1")
        };
        let shown = format!("{opts:?}");
        assert!(!shown.contains(KEY) && shown.contains("org-1"), "{shown}");
        let client = ApiClient::new(opts).unwrap();
        let shown = format!("{client:?} {client:#?}");
        assert!(
            !shown.contains(KEY) && shown.contains("redacted"),
            "{shown}"
        );
    }

    #[test]
    fn echoed_keys_are_scrubbed() {
        let client = ApiClient::new(options("http://127.0.0.1:9/v1")).unwrap();
        let e = client.scrub_error(classify_status(
            400,
            None,
            &body(&format!("bad key {KEY} here"), "x", None),
        ));
        assert_no_key(&e);
        assert!(e.to_string().contains("bad key [redacted] here"));
    }

    #[test]
    fn embeddings_come_back_in_input_order() {
        let data = vec![
            Embedding {
                index: 1,
                embedding: vec![1.0],
            },
            Embedding {
                index: 0,
                embedding: vec![0.0],
            },
        ];
        assert_eq!(
            order_embeddings(data, 2).unwrap(),
            vec![vec![0.0], vec![1.0]]
        );
        let short = vec![Embedding {
            index: 0,
            embedding: vec![0.0],
        }];
        assert!(matches!(
            order_embeddings(short, 2),
            Err(ApiError::Decode { .. })
        ));
        let repeated = vec![
            Embedding {
                index: 0,
                embedding: vec![0.0],
            },
            Embedding {
                index: 0,
                embedding: vec![0.0],
            },
        ];
        assert!(matches!(
            order_embeddings(repeated, 2),
            Err(ApiError::Decode { .. })
        ));
    }

    #[test]
    fn batch_parses_the_spec_example_shape() {
        let json = serde_json::json!({
            "id": "batch_abc123", "object": "batch", "endpoint": "/v1/embeddings",
            "errors": {"object": "list", "data": [{"code": "token_limit_exceeded", "message": "Enqueued token limit reached", "param": null, "line": null}]},
            "input_file_id": "file-abc123", "completion_window": "24h", "status": "failed",
            "output_file_id": null, "error_file_id": null, "created_at": 1711471533,
            "in_progress_at": null, "expires_at": 1711557933, "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": {"embatch_run_id": "r1"}, "usage": {"input_tokens": 0}
        });
        let batch: Batch = serde_json::from_value(json).unwrap();
        assert!(batch.is_terminal());
        assert_eq!(batch.metadata_value("embatch_run_id"), Some("r1"));
        assert_eq!(
            batch.errors.unwrap().data[0].code.as_deref(),
            Some("token_limit_exceeded")
        );
        assert_eq!(batch.output_file_id, None);
    }

    #[test]
    fn temp_files_sit_beside_their_destination() {
        let temp = temp_path_for(Path::new("/a/b/output.jsonl"));
        assert_eq!(temp.parent(), Some(Path::new("/a/b")));
        assert!(
            temp.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".output.jsonl.")
        );
    }

    // -- wire-level faults, against a tiny raw HTTP server -----------------------------------
    //
    // The emulator covers the API's behaviour; these cover what only a raw socket can do:
    // a connection closed with no answer, or a body shorter than its Content-Length.

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Serves each connection with `answer(n)` (n counts connections from 0): `None` closes
    /// the connection after reading the request; `Some(bytes)` writes them and closes.
    async fn raw_server(
        answer: impl Fn(usize) -> Option<Vec<u8>> + Send + Sync + 'static,
    ) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let served = Arc::clone(&count);
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let n = served.fetch_add(1, Ordering::SeqCst);
                let answer = Arc::clone(&answer);
                tokio::spawn(async move {
                    read_request(&mut socket).await;
                    if let Some(bytes) = answer(n) {
                        let _ = socket.write_all(&bytes).await;
                    }
                    let _ = socket.shutdown().await;
                });
            }
        });
        (format!("http://{address}/v1"), count)
    }

    /// Reads one request: headers, then a Content-Length body.
    async fn read_request(socket: &mut tokio::net::TcpStream) {
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let Ok(n) = socket.read(&mut chunk).await else {
                return;
            };
            if n == 0 {
                return;
            }
            buffer.extend_from_slice(&chunk[..n]);
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buffer.len() < end + 4 + length {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                    }
                }
                return;
            }
        }
    }

    fn http_answer(status: &str, headers: &str, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn raw_closed_connection_on_create_is_unknown_outcome() {
        let (base, served) = raw_server(|_| None).await;
        let client = ApiClient::new(options(&base)).unwrap();
        let e = client
            .create_batch("file-1", &BTreeMap::new())
            .await
            .unwrap_err();
        assert!(e.is_unknown_outcome(), "{e:?}");
        assert_eq!(served.load(Ordering::SeqCst), 1, "a create is sent once");
        assert_no_key(&e);

        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("input.jsonl");
        fs_err::write(&input, b"{}\n").unwrap();
        let e = client
            .upload_file(&input, "x.jsonl", Duration::from_secs(3600))
            .await
            .unwrap_err();
        assert!(e.is_unknown_outcome(), "{e:?}");
        assert_eq!(served.load(Ordering::SeqCst), 2, "an upload is sent once");
        assert_no_key(&e);
    }

    #[tokio::test]
    async fn raw_refused_connection_on_create_is_a_plain_connection_error() {
        // Bind then drop: nothing listens on that port any more.
        let address = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let client = ApiClient::new(options(&format!("http://{address}/v1"))).unwrap();
        let e = client
            .create_batch("file-1", &BTreeMap::new())
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::Connection { .. }), "{e:?}");
        assert_no_key(&e);
    }

    #[tokio::test]
    async fn raw_server_error_on_create_is_unknown_and_client_error_is_not() {
        let (base, served) = raw_server(|n| {
            Some(if n == 0 {
                http_answer("502 Bad Gateway", "", "<html>oops</html>")
            } else {
                http_answer(
                    "400 Bad Request",
                    "content-type: application/json\r\n",
                    &body("Invalid file", "invalid_request_error", None),
                )
            })
        })
        .await;
        let client = ApiClient::new(options(&base)).unwrap();
        let e = client
            .create_batch("file-1", &BTreeMap::new())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ApiError::UnknownOutcome { cause, .. } if matches!(**cause, ApiError::Server { status: 502 })),
            "{e:?}"
        );
        let e = client
            .create_batch("file-1", &BTreeMap::new())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ApiError::BadRequest { status: 400, .. }),
            "{e:?}"
        );
        assert_eq!(served.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn raw_upload_refusal_after_the_body_is_its_own_variant() {
        // Records each request, then answers 429 (a clear refusal) or 503 (ambiguous).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/v1", listener.local_addr().unwrap());
        let (sender, mut received) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            for status in ["429 Too Many Requests", "503 Service Unavailable"] {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                let mut chunk = [0u8; 8192];
                // Read until the multipart closing boundary has arrived.
                while !request.ends_with(b"--\r\n") {
                    let n = socket.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "the client closed early");
                    request.extend_from_slice(&chunk[..n]);
                }
                sender.send(request).unwrap();
                let error = body(
                    "Rate limit reached",
                    "requests",
                    Some("rate_limit_exceeded"),
                );
                socket
                    .write_all(&http_answer(status, "", &error))
                    .await
                    .unwrap();
                let _ = socket.shutdown().await;
            }
        });
        let client = ApiClient::new(options(&base)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("input.jsonl");
        fs_err::write(&input, b"{\"custom_id\":\"a\"}\n").unwrap();

        let e = client
            .upload_file(
                &input,
                "embatch-r-batch_001.jsonl",
                Duration::from_secs(7200),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::RateLimited { .. }), "{e:?}");
        let request = String::from_utf8(received.recv().await.unwrap()).unwrap();
        let lower = request.to_ascii_lowercase();
        assert!(
            lower.starts_with("post /v1/files http/1.1\r\n"),
            "{request}"
        );
        assert!(lower.contains("authorization: bearer sk-test-secret-123\r\n"));
        assert!(lower.contains(&format!(
            "user-agent: embatch/{}\r\n",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(lower.contains("content-type: multipart/form-data; boundary="));
        assert!(
            lower.contains("content-length: "),
            "a known length, not chunked"
        );
        for part in [
            "name=\"purpose\"\r\n\r\nbatch\r\n",
            "name=\"expires_after[anchor]\"\r\n\r\ncreated_at\r\n",
            "name=\"expires_after[seconds]\"\r\n\r\n7200\r\n",
            "name=\"file\"; filename=\"embatch-r-batch_001.jsonl\"",
            "{\"custom_id\":\"a\"}\n",
        ] {
            assert!(request.contains(part), "missing {part:?} in {request}");
        }

        let e = client
            .upload_file(
                &input,
                "embatch-r-batch_001.jsonl",
                Duration::from_secs(7200),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ApiError::UnknownOutcome { cause, .. } if matches!(**cause, ApiError::Server { status: 503 })),
            "{e:?}"
        );
        assert_no_key(&e);
    }

    /// A server that reads each request, writes `prefix`, then holds the connection open
    /// without another byte.
    async fn stalling_server(prefix: &'static [u8]) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/v1", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let served = Arc::clone(&count);
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                served.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    read_request(&mut socket).await;
                    let _ = socket.write_all(prefix).await;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                });
            }
        });
        (base, count)
    }

    fn short_timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(2),
            request: Duration::from_millis(300),
            idle: Duration::from_millis(200),
            upload_answer: Duration::from_millis(300),
        }
    }

    #[tokio::test]
    async fn raw_timeouts_end_stalled_calls() {
        // An upload that gets no answer is an unknown outcome, not a hang.
        let (base, served) = stalling_server(b"").await;
        let client = ApiClient::with_timeouts(options(&base), short_timeouts()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("input.jsonl");
        fs_err::write(&input, b"{}\n").unwrap();
        let e = client
            .upload_file(&input, "a.jsonl", Duration::from_secs(3600))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ApiError::UnknownOutcome { cause, .. } if cause.to_string().contains("no answer")),
            "{e:?}"
        );
        // A JSON read times out and is retried.
        let e = client.get_batch("batch_x").await.unwrap_err();
        assert!(
            matches!(&e, ApiError::Connection { message } if message.contains("timed out")),
            "{e:?}"
        );
        assert_eq!(served.load(Ordering::SeqCst), 1 + 4);

        // A download whose body stops flowing fails on the idle limit, and is retried.
        let (base, served) =
            stalling_server(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\npartial").await;
        let client = ApiClient::with_timeouts(options(&base), short_timeouts()).unwrap();
        let dest = dir.path().join("output.jsonl");
        let e = client.download_file("file-1", &dest).await.unwrap_err();
        assert!(
            matches!(&e, ApiError::Connection { message } if message.contains("stalled")),
            "{e:?}"
        );
        assert_eq!(served.load(Ordering::SeqCst), 4);
        assert!(!dest.exists());
    }

    #[tokio::test]
    async fn raw_short_download_is_retried_then_reported() {
        let (base, served) = raw_server(|_| {
            // Promises 100 bytes, sends 10, closes.
            Some(
                b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\nconnection: close\r\n\r\n0123456789"
                    .to_vec(),
            )
        })
        .await;
        let client = ApiClient::new(options(&base)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("output.jsonl");
        let e = client.download_file("file-1", &dest).await.unwrap_err();
        assert!(matches!(e, ApiError::Connection { .. }), "{e:?}");
        assert_eq!(
            served.load(Ordering::SeqCst),
            4,
            "one try and three retries"
        );
        assert_eq!(client.retry_count(), 3);
        assert!(!dest.exists());
        let leftovers: Vec<_> = fs_err::read_dir(dir.path()).unwrap().collect();
        assert!(
            leftovers.is_empty(),
            "temp files left behind: {leftovers:?}"
        );
    }

    #[tokio::test]
    async fn raw_retry_after_is_honoured_then_success() {
        let (base, served) = raw_server(|n| {
            Some(if n == 0 {
                http_answer("429 Too Many Requests", "retry-after-ms: 30\r\n", &body("Rate limit reached", "requests", Some("rate_limit_exceeded")))
            } else {
                http_answer("200 OK", "content-type: application/json\r\n", r#"{"id":"file-1","object":"file","bytes":3,"created_at":1,"filename":"a.jsonl","purpose":"batch","status":"processed"}"#)
            })
        })
        .await;
        let client = ApiClient::new(options(&base)).unwrap();
        let file = client.get_file("file-1").await.unwrap();
        assert_eq!(file.filename, "a.jsonl");
        assert_eq!(served.load(Ordering::SeqCst), 2);
        assert_eq!(client.retry_count(), 1);
    }

    // -- against the project's emulator --------------------------------------------------

    use crate::emulator::{Emulator, EmulatorConfig, Faults, LostAnswer};

    /// An emulator whose key is the secret under test, so any leak would show.
    async fn emulator() -> Emulator {
        Emulator::start(EmulatorConfig {
            api_key: KEY.to_owned(),
            ..EmulatorConfig::default()
        })
        .await
        .unwrap()
    }

    fn client_for(emu: &Emulator) -> ApiClient {
        let mut opts = options(&emu.base_url());
        opts.api_key = emu.api_key().to_owned();
        ApiClient::new(opts).unwrap()
    }

    /// A small valid batch input file of `n` embedding requests.
    fn write_input(dir: &Path, n: usize) -> (PathBuf, Vec<u8>) {
        let mut content = Vec::new();
        for i in 0..n {
            let line = serde_json::json!({
                "custom_id": format!("chunk-{i}"), "method": "POST", "url": "/v1/embeddings",
                "body": {"model": "text-embedding-3-small", "input": format!("pump {i} seal"), "dimensions": 8}
            });
            content.extend_from_slice(line.to_string().as_bytes());
            content.push(b'\n');
        }
        let path = dir.join("input.jsonl");
        fs_err::write(&path, &content).unwrap();
        (path, content)
    }

    fn metadata(run: &str, batch: &str, submission: u32) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("embatch_run_id".to_owned(), run.to_owned()),
            ("embatch_batch".to_owned(), batch.to_owned()),
            ("embatch_submission".to_owned(), submission.to_string()),
        ])
    }

    const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

    #[tokio::test]
    async fn emu_upload_sends_name_bytes_and_expiry() {
        let emu = emulator().await;
        let client = client_for(&emu);
        let dir = tempfile::tempdir().unwrap();
        let (path, content) = write_input(dir.path(), 3);
        let name = "embatch-run1-batch_001.jsonl";

        let file = client.upload_file(&path, name, WEEK).await.unwrap();
        assert_eq!(file.filename, name);
        assert_eq!(file.bytes, content.len() as u64);
        assert_eq!(file.purpose, "batch");
        assert_eq!(
            file.expires_at,
            Some(file.created_at + WEEK.as_secs() as i64)
        );

        let remote = emu.files();
        assert_eq!(remote.len(), 1);
        assert_eq!(remote[0]["id"], file.id.as_str());
        assert_eq!(remote[0]["filename"], name);
        assert_eq!(remote[0]["bytes"], content.len());
        assert_eq!(
            remote[0]["expires_at"],
            file.created_at + WEEK.as_secs() as i64
        );
        assert_eq!(emu.counters().uploads, 1);

        assert_eq!(client.get_file(&file.id).await.unwrap(), file);
        assert_eq!(
            client.find_files_named(name).await.unwrap(),
            vec![file.clone()]
        );
        assert!(
            client
                .find_files_named("other.jsonl")
                .await
                .unwrap()
                .is_empty()
        );
        // The bytes that arrived are the bytes on disk.
        let dest = dir.path().join("back.jsonl");
        assert_eq!(
            client.download_file(&file.id, &dest).await.unwrap(),
            content.len() as u64
        );
        assert_eq!(fs_err::read(&dest).unwrap(), content);

        // An expiry outside the API's range is refused before anything is sent.
        let e = client
            .upload_file(&path, name, Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::Config { .. }), "{e:?}");
        assert_eq!(emu.counters().uploads, 1);
    }

    #[tokio::test]
    async fn emu_batches_create_get_list_paginate_find() {
        let emu = emulator().await;
        let client = client_for(&emu);
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_input(dir.path(), 2);
        let file = client.upload_file(&path, "in.jsonl", WEEK).await.unwrap();
        let started = Utc::now() - chrono::Duration::hours(1);

        let mut created = Vec::new();
        for i in 1..=5 {
            let batch = client
                .create_batch(&file.id, &metadata("run1", &format!("batch_{i:03}"), 1))
                .await
                .unwrap();
            assert_eq!(batch.input_file_id, file.id);
            assert_eq!(
                batch.metadata_value("embatch_batch"),
                Some(format!("batch_{i:03}").as_str())
            );
            created.push(batch);
        }
        assert_eq!(emu.counters().batch_creations, 5);
        assert_eq!(
            emu.counters().creations_by_metadata.get("run1/batch_003/1"),
            Some(&1)
        );
        let remote = emu.batches();
        assert_eq!(remote[0]["endpoint"], "/v1/embeddings");
        assert_eq!(remote[0]["completion_window"], "24h");

        let got = client.get_batch(&created[2].id).await.unwrap();
        assert_eq!(got.id, created[2].id);
        assert_eq!(got.metadata, created[2].metadata);

        // Pages of two, newest first, cover all five exactly once.
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = client.list_batches(after.as_deref(), 2).await.unwrap();
            assert!(page.data.len() <= 2);
            seen.extend(page.data.iter().map(|b| b.id.clone()));
            if !page.has_more {
                break;
            }
            after = page.last_id.clone();
        }
        let mut newest_first: Vec<String> = created.iter().map(|b| b.id.clone()).collect();
        newest_first.reverse();
        assert_eq!(seen, newest_first);

        let found = client
            .find_batches(started, |b| {
                b.metadata_value("embatch_batch") == Some("batch_003")
            })
            .await
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, created[2].id);
        let all = client.find_batches(started, |_| true).await.unwrap();
        assert_eq!(all.len(), 5);
        // Batches created before `not_before` are not looked at.
        let future = Utc::now() + chrono::Duration::hours(1);
        assert!(
            client
                .find_batches(future, |_| true)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn emu_download_equals_remote_content() {
        let emu = emulator().await;
        let client = client_for(&emu);
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_input(dir.path(), 20);
        let file = client.upload_file(&path, "in.jsonl", WEEK).await.unwrap();
        let batch = client
            .create_batch(&file.id, &metadata("r", "batch_001", 1))
            .await
            .unwrap();
        // With the default stage duration of zero a batch is done at its first read.
        let batch = client.get_batch(&batch.id).await.unwrap();
        assert_eq!(batch.status, "completed", "{batch:?}");
        assert_eq!(
            batch.request_counts,
            Some(RequestCounts {
                total: 20,
                completed: 20,
                failed: 0
            })
        );
        let output_id = batch.output_file_id.clone().unwrap();

        let dest = dir.path().join("output.jsonl");
        // An old, longer file in the way is replaced whole.
        fs_err::write(&dest, vec![b'x'; 100_000]).unwrap();
        let n = client.download_file(&output_id, &dest).await.unwrap();
        let on_disk = fs_err::read(&dest).unwrap();
        assert_eq!(n, on_disk.len() as u64);
        assert_eq!(client.get_file(&output_id).await.unwrap().bytes, n);
        // The remote content, fetched independently.
        let remote = reqwest::Client::new()
            .get(format!("{}/files/{output_id}/content", emu.base_url()))
            .bearer_auth(emu.api_key())
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(on_disk, remote.to_vec());
        assert_eq!(
            on_disk
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .count(),
            20
        );
        let names: Vec<String> = fs_err::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.ends_with(".part")),
            "temp file left: {names:?}"
        );
    }

    #[tokio::test]
    async fn emu_delete_twice_is_fine() {
        let emu = emulator().await;
        let client = client_for(&emu);
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_input(dir.path(), 1);
        let file = client.upload_file(&path, "in.jsonl", WEEK).await.unwrap();
        client.delete_file(&file.id).await.unwrap();
        client.delete_file(&file.id).await.unwrap();
        assert!(emu.files().is_empty());
        assert_eq!(emu.counters().file_deletions, 1);
        let e = client.get_file(&file.id).await.unwrap_err();
        assert!(matches!(e, ApiError::NotFound { .. }), "{e:?}");
        assert_no_key(&e);
        let e = client
            .download_file(&file.id, &dir.path().join("x"))
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::NotFound { .. }), "{e:?}");
        assert_eq!(client.retry_count(), 0, "a 404 is not retried");
    }

    #[tokio::test]
    async fn emu_wrong_key_is_auth_and_never_retried() {
        let emu = Emulator::start(EmulatorConfig::default()).await.unwrap();
        // The client holds the secret; the emulator expects another key.
        let client = ApiClient::new(options(&emu.base_url())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_input(dir.path(), 1);
        let errors = [
            client.get_batch("batch_x").await.unwrap_err(),
            client.list_files(None, None, 10).await.unwrap_err(),
            client
                .create_batch("file-x", &BTreeMap::new())
                .await
                .unwrap_err(),
            client
                .download_file("file-x", &dir.path().join("o"))
                .await
                .unwrap_err(),
            client
                .embed("text-embedding-3-small", &["a".to_owned()], None)
                .await
                .unwrap_err(),
        ];
        for e in &errors {
            assert!(matches!(e, ApiError::Auth { status: 401 }), "{e:?}");
            assert!(!e.is_retryable() && !e.is_unknown_outcome());
            assert!(e.to_string().contains("OPENAI_API_KEY"));
            assert_no_key(e);
        }
        let e = client
            .upload_file(&path, "in.jsonl", WEEK)
            .await
            .unwrap_err();
        assert_upload_refused(&e, |e| matches!(e, ApiError::Auth { status: 401 }));
        assert_no_key(&e);
        assert_eq!(client.retry_count(), 0);
    }

    /// The emulator refuses an upload (401, injected 429) before reading its body and closes
    /// the connection, so the client may get a broken pipe while still sending instead of the
    /// answer. The real API's front reads the whole body first. Either way the upload is sent
    /// once and is not retried: the refusal, or an unknown outcome from a broken connection.
    fn assert_upload_refused(e: &ApiError, refusal: impl Fn(&ApiError) -> bool) {
        let broken_pipe = matches!(e, ApiError::UnknownOutcome { cause, .. }
            if matches!(**cause, ApiError::Connection { .. }));
        assert!(refusal(e) || broken_pipe, "{e:?}");
    }

    #[tokio::test]
    async fn emu_429_then_success_is_retried() {
        let emu = emulator().await;
        let client = ApiClient::new(ClientOptions {
            max_retries: 100,
            ..options(&emu.base_url())
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_input(dir.path(), 1);
        let file = client.upload_file(&path, "in.jsonl", WEEK).await.unwrap();

        emu.set_faults(Faults {
            rate_429: 1.0,
            retry_after_secs: 0,
            ..Faults::default()
        });
        let task = {
            let client = client.clone();
            let id = file.id.clone();
            tokio::spawn(async move { client.get_file(&id).await })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        emu.set_faults(Faults::default());
        let got = task.await.unwrap().unwrap();
        assert_eq!(got.id, file.id);
        let injected = emu.counters().injected_errors;
        assert!(injected >= 1, "no 429 was injected");
        assert_eq!(
            client.retry_count() as u64,
            injected,
            "one retry per injected 429"
        );
    }

    #[tokio::test]
    async fn emu_429_and_500_run_out_of_retries() {
        let emu = emulator().await;
        let client = client_for(&emu); // 3 retries
        emu.set_faults(Faults {
            rate_429: 1.0,
            retry_after_secs: 0,
            ..Faults::default()
        });
        let e = client.list_batches(None, 10).await.unwrap_err();
        assert!(
            matches!(e, ApiError::RateLimited { retry_after: Some(d) } if d.is_zero()),
            "{e:?}"
        );
        assert_eq!(emu.counters().injected_errors, 4);
        assert_no_key(&e);

        emu.set_faults(Faults {
            rate_500: 1.0,
            ..Faults::default()
        });
        let e = client.get_batch("batch_x").await.unwrap_err();
        assert!(matches!(e, ApiError::Server { status: 500 }), "{e:?}");
        assert_eq!(emu.counters().injected_errors, 8);
        let e = client
            .embed("text-embedding-3-small", &["a".to_owned()], None)
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::Server { status: 500 }), "{e:?}");
        assert_eq!(emu.counters().injected_errors, 12);
        assert_no_key(&e);
    }

    #[tokio::test]
    async fn emu_500_on_a_read_is_retried_to_success() {
        let emu = Emulator::start(EmulatorConfig {
            api_key: KEY.to_owned(),
            seed: 7,
            ..EmulatorConfig::default()
        })
        .await
        .unwrap();
        let client = ApiClient::new(ClientOptions {
            max_retries: 30,
            ..options(&emu.base_url())
        })
        .unwrap();
        emu.set_faults(Faults {
            rate_500: 0.5,
            ..Faults::default()
        });
        for _ in 0..10 {
            client.list_files(Some("batch"), None, 10).await.unwrap();
        }
        let injected = emu.counters().injected_errors;
        assert!(
            injected >= 1,
            "a seeded 50% rate over 10+ calls injected nothing"
        );
        assert_eq!(client.retry_count() as u64, injected);
    }

    #[tokio::test]
    async fn emu_creates_are_sent_once() {
        let emu = emulator().await;
        let client = client_for(&emu);
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_input(dir.path(), 1);

        // A clear refusal is its own variant; a 500 may have acted, so it is unknown.
        emu.set_faults(Faults {
            rate_429: 1.0,
            ..Faults::default()
        });
        let e = client
            .create_batch("file-x", &BTreeMap::new())
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::RateLimited { .. }), "{e:?}");
        let e = client
            .upload_file(&path, "in.jsonl", WEEK)
            .await
            .unwrap_err();
        assert_upload_refused(&e, |e| matches!(e, ApiError::RateLimited { .. }));
        emu.set_faults(Faults {
            rate_500: 1.0,
            ..Faults::default()
        });
        let e = client
            .create_batch("file-x", &BTreeMap::new())
            .await
            .unwrap_err();
        assert!(e.is_unknown_outcome(), "{e:?}");
        assert_no_key(&e);
        let e = client
            .upload_file(&path, "in.jsonl", WEEK)
            .await
            .unwrap_err();
        assert!(e.is_unknown_outcome(), "{e:?}");
        assert_no_key(&e);
        assert_eq!(
            emu.counters().injected_errors,
            4,
            "each create call sent exactly once"
        );
        assert_eq!(client.retry_count(), 0);
    }

    #[tokio::test]
    async fn emu_lost_upload_answer_is_unknown_and_the_file_can_be_adopted() {
        let emu = emulator().await;
        let client = client_for(&emu);
        let dir = tempfile::tempdir().unwrap();
        let (path, content) = write_input(dir.path(), 4);
        let name = "embatch-run1-batch_001.jsonl";
        emu.set_faults(Faults {
            lose_answers: vec![LostAnswer::Upload],
            ..Faults::default()
        });

        let e = client.upload_file(&path, name, WEEK).await.unwrap_err();
        assert!(e.is_unknown_outcome() && !e.is_retryable(), "{e:?}");
        assert!(e.to_string().contains(name), "{e}");
        assert_no_key(&e);
        let counters = emu.counters();
        assert_eq!((counters.uploads, counters.lost_answers), (1, 1));

        let found = client.find_files_named(name).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].bytes, content.len() as u64);
        assert_eq!(emu.counters().uploads, 1, "looking does not upload");
    }

    #[tokio::test]
    async fn emu_lost_create_answer_is_unknown_and_the_batch_can_be_adopted() {
        let emu = emulator().await;
        let client = client_for(&emu);
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_input(dir.path(), 2);
        let file = client.upload_file(&path, "in.jsonl", WEEK).await.unwrap();
        let started = Utc::now() - chrono::Duration::hours(1);
        client
            .create_batch(&file.id, &metadata("run1", "batch_001", 1))
            .await
            .unwrap();
        emu.set_faults(Faults {
            lose_answers: vec![LostAnswer::CreateBatch],
            ..Faults::default()
        });

        let wanted = metadata("run1", "batch_002", 1);
        let e = client.create_batch(&file.id, &wanted).await.unwrap_err();
        assert!(e.is_unknown_outcome() && !e.is_retryable(), "{e:?}");
        assert_no_key(&e);
        assert_eq!(emu.counters().batch_creations, 2);
        assert_eq!(emu.counters().lost_answers, 1);

        let found = client
            .find_batches(started, |b| b.metadata.as_ref() == Some(&wanted))
            .await
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].input_file_id, file.id);
        assert_eq!(emu.counters().batch_creations, 2, "looking does not create");
    }

    #[tokio::test]
    async fn emu_cancel_is_retried_and_repeatable() {
        let emu = Emulator::start(EmulatorConfig {
            api_key: KEY.to_owned(),
            stage_duration: Duration::from_secs(60),
            ..EmulatorConfig::default()
        })
        .await
        .unwrap();
        let client = client_for(&emu);
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_input(dir.path(), 2);
        let file = client.upload_file(&path, "in.jsonl", WEEK).await.unwrap();
        let batch = client
            .create_batch(&file.id, &BTreeMap::new())
            .await
            .unwrap();
        assert!(!batch.is_terminal());
        emu.set_faults(Faults {
            lose_answers: vec![LostAnswer::Cancel],
            ..Faults::default()
        });
        let cancelled = client.cancel_batch(&batch.id).await.unwrap();
        assert!(
            matches!(cancelled.status.as_str(), "cancelling" | "cancelled"),
            "{cancelled:?}"
        );
        assert_eq!(emu.counters().lost_answers, 1);
        assert!(
            client.retry_count() >= 1,
            "the lost cancel answer was retried"
        );
    }

    #[tokio::test]
    async fn emu_token_limit_failure_is_reported_on_the_batch() {
        let emu = emulator().await;
        let client = client_for(&emu);
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_input(dir.path(), 2);
        let file = client.upload_file(&path, "in.jsonl", WEEK).await.unwrap();
        emu.set_faults(Faults {
            token_limit_failures: 1,
            ..Faults::default()
        });
        let batch = client
            .create_batch(&file.id, &BTreeMap::new())
            .await
            .unwrap();
        let batch = client.get_batch(&batch.id).await.unwrap();
        assert_eq!(batch.status, "failed");
        let codes: Vec<_> = batch
            .errors
            .unwrap()
            .data
            .into_iter()
            .filter_map(|e| e.code)
            .collect();
        assert_eq!(codes, ["token_limit_exceeded"]);
    }

    #[tokio::test]
    async fn emu_embed_returns_the_emulator_vectors_in_order() {
        let emu = emulator().await;
        let client = client_for(&emu);
        let inputs: Vec<String> = ["pump seal leak", "valve", "motor bearing"]
            .map(String::from)
            .to_vec();
        let vectors = client
            .embed("text-embedding-3-small", &inputs, Some(16))
            .await
            .unwrap();
        assert_eq!(vectors.len(), 3);
        for (text, vector) in inputs.iter().zip(&vectors) {
            assert_eq!(vector, &crate::emulator::vectors::embedding(text, 16));
        }
        let native = client
            .embed("text-embedding-3-small", &inputs[..1], None)
            .await
            .unwrap();
        assert_eq!(native[0].len(), 1536);
        let e = client
            .embed("text-embedding-3-small", &["".to_owned()], None)
            .await
            .unwrap_err();
        assert!(
            matches!(e, ApiError::BadRequest { status: 400, .. }),
            "{e:?}"
        );
        assert_no_key(&e);
    }
}
