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

pub use super::{ApiError, ByteObserver, ClockReading, Provider};

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
    /// Whose endpoint this is (default OpenAI): errors name its key variable and base URL.
    /// `direct` speaks the same `/embeddings` protocol, and its key is optional.
    pub provider: Provider,
    /// How the key is sent (default `Authorization: Bearer`).
    pub auth_header: AuthHeader,
}

/// How a client sends its key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AuthHeader {
    /// `Authorization: Bearer <key>` (OpenAI, Voyage, OpenAI-compatible servers).
    #[default]
    Bearer,
    /// `x-goog-api-key: <key>` (the Gemini API): never in the URL, where it would reach logs.
    GoogApiKey,
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
            provider: Provider::Openai,
            auth_header: AuthHeader::Bearer,
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
            .field("provider", &self.provider)
            .field("auth_header", &self.auth_header)
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
pub(crate) struct CreateEmbeddingResponse {
    pub(crate) data: Vec<Embedding>,
}

#[derive(Deserialize)]
pub(crate) struct Embedding {
    index: usize,
    embedding: Vec<f32>,
}

/// The provider's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error: ErrorDetail,
    /// Voyage's (and FastAPI's) error body: `{"detail": "<message>"}`.
    #[serde(default)]
    detail: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct ErrorDetail {
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
    /// Google's canonical status (`RESOURCE_EXHAUSTED`, `INVALID_ARGUMENT`, …).
    #[serde(default)]
    status: Option<String>,
    /// Google's `details` (`google.rpc.ErrorInfo`, `google.rpc.RetryInfo`, …).
    #[serde(default)]
    details: Vec<serde_json::Value>,
}

// ---------------------------------------------------------------------------------------------
// Errors

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
    classify_status_for(Provider::Openai, status, retry_after, body)
}

/// [`classify_status`] for an endpoint of `provider` (same rules; the messages name its key
/// variable and base URL).
pub fn classify_status_for(
    provider: Provider,
    status: u16,
    retry_after: Option<Duration>,
    body: &str,
) -> ApiError {
    let parsed: ErrorBody = serde_json::from_str(body).unwrap_or_default();
    let code = match &parsed.error.code {
        Some(serde_json::Value::String(s)) => Some(s.as_str()),
        _ => None,
    };
    let kind = parsed.error.kind.as_deref();
    let detail = match &parsed.detail {
        Some(serde_json::Value::String(text)) => Some(text.clone()),
        Some(other) => Some(other.to_string()),
        None => None,
    };
    let message = match parsed
        .error
        .message
        .as_deref()
        .or(detail.as_deref())
        .map(str::trim)
    {
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
    if provider == Provider::Gemini {
        return classify_google(status, retry_after, message, &parsed.error);
    }
    match status {
        401 | 403 => ApiError::Auth { status, provider },
        400 | 429 if is_queue_limit(code, &message) => ApiError::QueueLimit { message },
        429 if code == Some("insufficient_quota") || kind == Some("insufficient_quota") => {
            ApiError::Quota { provider }
        }
        429 => ApiError::RateLimited { retry_after },
        404 => ApiError::NotFound { message },
        408 | 500..=599 => ApiError::Server { status, provider },
        _ => ApiError::BadRequest { status, message },
    }
}

/// A Gemini API error (`{"error": {"code", "message", "status", "details"}}`, the shape of
/// `google.rpc.Status`):
/// - 401, 403, and 400 whose `ErrorInfo.reason` is `API_KEY_INVALID` (the Gemini API answers a
///   bad key with 400 `INVALID_ARGUMENT`, not 401) → [`ApiError::Auth`]
/// - 429 → [`ApiError::RateLimited`], waiting `Retry-After` when sent, else
///   `RetryInfo.retryDelay` (`"36s"`, `"0.5s"`)
/// - 404 → [`ApiError::NotFound`]; 408, 5xx → [`ApiError::Server`]
/// - anything else → [`ApiError::BadRequest`] with the status word and the message
fn classify_google(
    status: u16,
    retry_after: Option<Duration>,
    message: String,
    error: &ErrorDetail,
) -> ApiError {
    let provider = Provider::Gemini;
    let type_is = |detail: &serde_json::Value, suffix: &str| {
        detail
            .get("@type")
            .and_then(serde_json::Value::as_str)
            .is_some_and(|t| t.ends_with(suffix))
    };
    let bad_key = error.details.iter().any(|d| {
        type_is(d, "google.rpc.ErrorInfo")
            && d.get("reason").and_then(serde_json::Value::as_str) == Some("API_KEY_INVALID")
    });
    // The Files API answers a file that is not there (or not the caller's) with 403
    // PERMISSION_DENIED "… or it may not exist": no such object, not a bad key.
    let absent = status == 403 && message.contains("may not exist");
    match status {
        403 if absent => ApiError::NotFound { message },
        401 | 403 => ApiError::Auth { status, provider },
        400 if bad_key => ApiError::Auth { status, provider },
        429 => {
            let retry_info = error
                .details
                .iter()
                .filter(|d| type_is(d, "google.rpc.RetryInfo"))
                .find_map(|d| d.get("retryDelay").and_then(serde_json::Value::as_str))
                .and_then(parse_google_duration);
            ApiError::RateLimited {
                retry_after: retry_after.or(retry_info),
            }
        }
        404 => ApiError::NotFound { message },
        408 | 500..=599 => ApiError::Server { status, provider },
        _ => ApiError::BadRequest {
            status,
            message: match &error.status {
                Some(word) if !message.contains(word.as_str()) => format!("{word}: {message}"),
                _ => message,
            },
        },
    }
}

/// A `google.protobuf.Duration` in its JSON form: seconds with an `s` (`"36s"`, `"1.5s"`).
pub(crate) fn parse_google_duration(text: &str) -> Option<Duration> {
    let seconds: f64 = text.trim().strip_suffix('s')?.parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
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
pub(crate) fn next_delay(
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
pub(crate) fn describe_transport(error: &reqwest::Error) -> String {
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
    provider: Provider,
    retries: Arc<AtomicUsize>,
    /// The last `Date` header seen, with this machine's time when it arrived.
    clock: Arc<Mutex<Option<ClockReading>>>,
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
        let key_var = opts.provider.key_var();
        let key_given = !opts.api_key.trim().is_empty();
        // A self-hosted server (`direct`) often wants no key at all.
        if !key_given && opts.provider != Provider::Direct {
            return Err(ApiError::Config {
                message: format!("no API key: set {key_var} (or pass --api-key)"),
            });
        }
        let mut headers = HeaderMap::new();
        if key_given {
            let value = match opts.auth_header {
                AuthHeader::Bearer => format!("Bearer {}", opts.api_key),
                AuthHeader::GoogApiKey => opts.api_key.clone(),
            };
            let mut auth = HeaderValue::from_str(&value).map_err(|_| {
                ApiError::Config {
                    message: format!("the API key contains characters that cannot go in an HTTP header (a stray newline or quote?): check {key_var}"),
                }
            })?;
            auth.set_sensitive(true);
            match opts.auth_header {
                AuthHeader::Bearer => headers.insert(AUTHORIZATION, auth),
                AuthHeader::GoogApiKey => headers.insert("x-goog-api-key", auth),
            };
        }
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
            provider: opts.provider,
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
        self.upload_as(path, filename, Some(expires_after), observe)
            .await
    }

    /// The multipart upload of [`ApiClient::upload_file_observed`], its answer decoded as `T`
    /// (another provider's file object); `expires_after` `None` sends no expiry fields (a
    /// provider whose files have a fixed lifetime).
    pub(crate) async fn upload_as<T: DeserializeOwned>(
        &self,
        path: &Path,
        filename: &str,
        expires_after: Option<Duration>,
        observe: ByteObserver,
    ) -> Result<T, ApiError> {
        let seconds = expires_after.map(|e| e.as_secs());
        if let Some(seconds) = seconds
            && !(3600..=2_592_000).contains(&seconds)
        {
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
        let mut form = reqwest::multipart::Form::new().text("purpose", "batch");
        if let Some(seconds) = seconds {
            form = form
                .text("expires_after[anchor]", "created_at")
                .text("expires_after[seconds]", seconds.to_string());
        }
        let form = form.part("file", part);
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
                    provider: self.provider,
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
        let url = self.url(&["files", id, "content"]);
        self.retrying(|| self.download_once(&url, id, dest, &observe))
            .await
    }

    /// [`ApiClient::download_file_observed`] of the file `id` at `base_url/segments?query`
    /// (another provider's download route).
    pub(crate) async fn download_from(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
        id: &str,
        dest: &Path,
        observe: ByteObserver,
    ) -> Result<u64, ApiError> {
        let mut url = self.url(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        self.retrying(|| self.download_once(&url, id, dest, &observe))
            .await
    }

    async fn download_once(
        &self,
        url: &Url,
        id: &str,
        dest: &Path,
        observe: &ByteObserver,
    ) -> Result<u64, ApiError> {
        let idle = self.timeouts.idle;
        let stalled = |what: &str| ApiError::Connection {
            provider: self.provider,
            message: format!(
                "the download of file {id} stalled: no data for {} s {what}",
                idle.as_secs()
            ),
        };
        let request = self
            .http
            .get(url.clone())
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
                    provider: self.provider,
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
        let body = if self.provider == Provider::Voyage {
            // Voyage's body (as `voyage::embeddings_body`): `output_dimension` and
            // `input_type`, no `encoding_format`; the realtime path embeds documents.
            let mut body =
                serde_json::json!({"model": model, "input": inputs, "input_type": "document"});
            if let Some(dims) = dimensions {
                body["output_dimension"] = dims.into();
            }
            body
        } else {
            let body = CreateEmbeddingRequest {
                model,
                input: inputs,
                encoding_format: "float",
                dimensions,
            };
            serde_json::to_value(&body).map_err(|e| ApiError::Config {
                message: format!("could not encode the embeddings request: {e}"),
            })?
        };
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
        order_embeddings(self.provider, response.data, inputs.len())
    }

    // -- Shared with providers that speak the same HTTP (Voyage) ------------------------------

    /// A retried call of `base_url/segments?query` without a body, its answer decoded as `T`.
    pub(crate) async fn read_as<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        path: &'static str,
    ) -> Result<T, ApiError> {
        let mut url = self.url(segments);
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (key, value) in query {
                pairs.append_pair(key, value);
            }
        }
        self.read_json(method, url, path).await
    }

    /// A call that creates something: `POST base_url/segments` with a JSON body, sent once (a
    /// lost answer is [`ApiError::UnknownOutcome`] about `what`).
    pub(crate) async fn create_as<T: DeserializeOwned, B: Serialize>(
        &self,
        segments: &[&str],
        body: &B,
        what: &str,
        path: &'static str,
    ) -> Result<T, ApiError> {
        let request = self
            .http
            .post(self.url(segments))
            .timeout(self.timeouts.request)
            .json(body)
            .send();
        self.finish_json(request.await, Effect::Creates(what), Method::POST, path)
            .await
    }

    /// A retried `POST base_url/segments` with a JSON body (harmless to repeat).
    pub(crate) async fn post_as<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &serde_json::Value,
        path: &'static str,
    ) -> Result<T, ApiError> {
        let url = self.url(segments);
        self.retrying(|| {
            let request = self
                .http
                .post(url.clone())
                .timeout(self.timeouts.request)
                .json(body)
                .send();
            self.send_json(request, Method::POST, path)
        })
        .await
    }

    // -- For a protocol of its own (Gemini's resumable upload) ---------------------------------

    /// The HTTP client, with the key header set.
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `base_url` + path segments, each percent-encoded.
    pub(crate) fn url_of(&self, segments: &[&str]) -> Url {
        self.url(segments)
    }

    /// The base URL (a server-given URL is sent only to this origin).
    pub(crate) fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// The time limits.
    pub(crate) fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// The answer to one step of a call that creates something, sent once: a 2xx answer as
    /// it is (headers and body unread), a refusal classified, and every ambiguous failure
    /// [`ApiError::UnknownOutcome`] about `what`.
    pub(crate) async fn created_response(
        &self,
        response: Result<reqwest::Response, reqwest::Error>,
        what: &str,
    ) -> Result<reqwest::Response, ApiError> {
        let effect = Effect::Creates(what);
        let response = response.map_err(|e| self.send_failed(effect, &e))?;
        self.check_status(response).await.map_err(|e| match e {
            ApiError::Server { .. } => self.lost(effect, e),
            other => other,
        })
    }

    /// The body of a 2xx answer of a call that creates something, decoded as `T`; a body lost
    /// or unreadable is [`ApiError::UnknownOutcome`] about `what`.
    pub(crate) async fn created_body<T: DeserializeOwned>(
        &self,
        response: reqwest::Response,
        what: &str,
        path: &'static str,
    ) -> Result<T, ApiError> {
        self.finish_json(Ok(response), Effect::Creates(what), Method::POST, path)
            .await
    }

    /// For a create call, `cause` as [`ApiError::UnknownOutcome`] about `what`.
    pub(crate) fn lost_answer(&self, what: &str, cause: ApiError) -> ApiError {
        self.lost(Effect::Creates(what), cause)
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
                provider: self.provider,
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
        Err(self.scrub_error(classify_status_for(
            self.provider,
            status.as_u16(),
            retry_after,
            &body,
        )))
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
            provider: self.provider,
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

pub(crate) fn parse_base_url(base_url: &str) -> Result<Url, ApiError> {
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
pub(crate) fn order_embeddings(
    provider: Provider,
    data: Vec<Embedding>,
    n_inputs: usize,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let mut slots: Vec<Option<Vec<f32>>> = vec![None; n_inputs];
    let n_answers = data.len();
    for item in data {
        match slots.get_mut(item.index) {
            Some(slot @ None) => *slot = Some(item.embedding),
            _ => {
                return Err(ApiError::Decode {
                    provider,
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
            provider,
            message: format!("POST /embeddings answered {n_answers} vectors for {n_inputs} inputs"),
        })
}

/// A temp file beside `dest` (same folder, so the rename is atomic), unique per attempt.
pub(crate) fn temp_path_for(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "download".to_owned());
    let suffix: u32 = rand::random();
    dest.with_file_name(format!(".{name}.{suffix:08x}.part"))
}

/// Makes the rename durable: fsync the folder that holds `path`.
pub(crate) async fn sync_parent(path: &Path) -> Result<(), ApiError> {
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

mod seam;

#[cfg(test)]
mod tests;
