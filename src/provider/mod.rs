//! The provider seam: what embatch asks of the service that embeds — files, batches and the
//! realtime endpoint — as one trait, [`BatchProvider`], and the provider-neutral values it
//! answers with ([`RemoteFile`], [`RemoteBatch`], whose [`RemoteSnapshot`] is what the state
//! machine keeps). A provider's wire types are translated inside its own module and never
//! reach `run.json` or the state machine; `batch.json` keeps the provider's own object as
//! [`RemoteBatch::record`].
//!
//! `openai` speaks OpenAI's Batch API (the emulator speaks the same protocol); `direct` runs the
//! planned batch files itself against any OpenAI-compatible `/v1/embeddings` endpoint, behind
//! the same trait; `voyage` speaks Voyage AI's Batch API, a thin translation over the OpenAI
//! client; `gemini` speaks the Gemini API's batch mode (resumable uploads, `batches/…`
//! operations) over the same client's machinery; `connect` makes the configured one. The
//! seam's provider-neutral error ([`ApiError`]: auth, rate limited, server, connection, not
//! found, refused, unknown outcome, queue limit, …) and the provider's clock
//! ([`ClockReading`]) are defined here.
//!
//! It owns no run folder and no state: callers decide what a failure means for a batch.

pub mod connect;
pub mod direct;
pub mod gemini;
pub mod openai;
pub mod voyage;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;

pub use crate::models::Provider;
use crate::run::state::RemoteSnapshot;

/// A file the provider holds (a batch input file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    pub id: String,
    pub filename: String,
    pub bytes: u64,
    /// On the provider's clock.
    pub created_at: DateTime<Utc>,
    /// On the provider's clock; `None` when the file never expires.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A remote batch as the provider reported it in one answer.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteBatch {
    pub id: String,
    /// On the provider's clock.
    pub created_at: DateTime<Utc>,
    pub metadata: BTreeMap<String, String>,
    /// What the state machine keeps of it.
    pub snapshot: RemoteSnapshot,
    /// The provider's own object, pretty-printed, for the batch's `batch.json`.
    pub record: String,
}

/// What a batch provider does. Every method is one remote step; none decides anything about a
/// run. Calls that create something (`upload`, `create_batch`) are sent once and answer a lost
/// reply with [`ApiError::UnknownOutcome`]: look (`find_files_named`, `find_batches`) before
/// creating again.
pub trait BatchProvider: Send + Sync {
    /// Uploads a batch input file that expires `expires_after` after its creation, telling
    /// `observe` the bytes sent so far.
    fn upload<'a>(
        &'a self,
        path: &'a Path,
        filename: &'a str,
        expires_after: Duration,
        observe: ByteObserver,
    ) -> BoxFuture<'a, Result<RemoteFile, ApiError>>;

    /// Every batch input file named `filename`, to adopt an upload whose answer was lost.
    fn find_files_named<'a>(
        &'a self,
        filename: &'a str,
    ) -> BoxFuture<'a, Result<Vec<RemoteFile>, ApiError>>;

    fn get_file<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<RemoteFile, ApiError>>;

    /// Deletes a file; deleting one already gone is fine.
    fn delete_file<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ApiError>>;

    /// Downloads a file to `dest`, telling `observe` the bytes received so far; returns the
    /// number of bytes written.
    fn download_file<'a>(
        &'a self,
        id: &'a str,
        dest: &'a Path,
        observe: ByteObserver,
    ) -> BoxFuture<'a, Result<u64, ApiError>>;

    /// Creates a batch of the embedding requests in `input_file_id`, tagged with `metadata`.
    fn create_batch<'a>(
        &'a self,
        input_file_id: &'a str,
        metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<RemoteBatch, ApiError>>;

    fn get_batch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<RemoteBatch, ApiError>>;

    /// Asks the provider to cancel a batch; cancelling one already ending is fine.
    fn cancel_batch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<RemoteBatch, ApiError>>;

    /// The batches created at or after `not_before` (provider's clock) whose metadata holds
    /// every pair of `metadata`, newest first: how a batch whose creation answer was lost is
    /// adopted.
    fn find_batches<'a>(
        &'a self,
        not_before: DateTime<Utc>,
        metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<RemoteBatch>, ApiError>>;

    /// The realtime endpoint: one vector per input, in input order.
    fn embed<'a>(
        &'a self,
        model: &'a str,
        inputs: &'a [String],
        dimensions: Option<u32>,
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, ApiError>>;

    /// The provider's clock as its last answer showed it (`None` before the first answer).
    fn clock_reading(&self) -> Option<ClockReading>;

    /// One cheap read, so that [`BatchProvider::clock_reading`] has something to say.
    fn read_clock(&self) -> BoxFuture<'_, Result<(), ApiError>>;
}

/// Told the number of bytes transferred so far (upload and download progress).
pub type ByteObserver = Arc<dyn Fn(u64) + Send + Sync>;

/// What went wrong talking to a provider: the seam's one error, whatever the provider. Each
/// provider translates its wire errors into these kinds inside its own module; callers branch
/// on the kind (auth, quota, queue limit, rate limited, server, connection, not found, refused,
/// lost answer, bad answer), never on a provider's codes. Messages name the provider's own key
/// variable and base URL ([`Provider::key_var`], [`Provider::base_url_var`]) and never contain
/// the key.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401/403: stop at once; never retried.
    #[error("{}", auth_message(*.provider, *.status))]
    Auth { status: u16, provider: Provider },

    /// 429 `insufficient_quota`: stop at once; never retried.
    #[error("{}", quota_message(*.provider))]
    Quota { provider: Provider },

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
    #[error("{}", server_message(*.provider, *.status))]
    Server { status: u16, provider: Provider },

    /// No answer: connection refused, reset or closed, or a timeout. Retried for reads.
    #[error(
        "could not talk to the API: {message}; check the network and the base URL (--base-url / {}), then run the command again",
        .provider.base_url_var()
    )]
    Connection { message: String, provider: Provider },

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
    /// that does not speak the provider's API.
    #[error(
        "unexpected answer from the API ({message}): check the base URL (--base-url / {})",
        .provider.base_url_var()
    )]
    Decode { message: String, provider: Provider },

    /// The provider answered vectors of another size than the run's column: nothing of the
    /// answer was kept. Never retried (the model decides the size).
    #[error(
        "model {model} answered {answered}-dimensional vectors but the run writes vector({expected}); plan again with --model of a {expected}-dimensional model (or --dimensions if the server honours it), or point --embedding-column at a vector({answered}) column — nothing was written"
    )]
    WrongDimensions {
        model: String,
        answered: usize,
        expected: u32,
    },

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

fn auth_message(provider: Provider, status: u16) -> String {
    match provider {
        Provider::Openai => format!(
            "the API rejected the key (HTTP {status}): check OPENAI_API_KEY (and --organization/--project)"
        ),
        other => format!(
            "the API rejected the key (HTTP {status}): check {} (or --api-key)",
            other.key_var()
        ),
    }
}

fn quota_message(provider: Provider) -> String {
    match provider {
        Provider::Openai => "the API refused the request for lack of quota (HTTP 429 insufficient_quota): check the plan and billing details of the OpenAI account, then run the command again".to_owned(),
        other => format!(
            "the API refused the request for lack of quota (HTTP 429 insufficient_quota): check the account behind the server at {}, then run the command again",
            other.base_url_var()
        ),
    }
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

fn server_message(provider: Provider, status: u16) -> String {
    match provider {
        Provider::Openai => format!(
            "the API failed with HTTP {status}: try again later (see status.openai.com if it persists)"
        ),
        other => format!(
            "the API failed with HTTP {status}: try again later (check the logs of the server at {} if it persists)",
            other.base_url_var()
        ),
    }
}

impl ApiError {
    /// A 429 answered to a batch creation, read as the provider's limit on batches or tokens
    /// in flight (`message` says whose): nothing was created, and the batch waits in `queued`
    /// rather than being retried at once. Any other error is returned as it is.
    pub fn rate_limit_as_queue_limit(self, message: &str) -> ApiError {
        match self {
            ApiError::RateLimited { .. } => ApiError::QueueLimit {
                message: message.to_owned(),
            },
            other => other,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_each_providers_own_key_and_base_url() {
        let openai = Provider::Openai;
        assert_eq!(
            ApiError::Auth {
                status: 401,
                provider: openai
            }
            .to_string(),
            "the API rejected the key (HTTP 401): check OPENAI_API_KEY (and --organization/--project)"
        );
        assert!(
            ApiError::Server {
                status: 502,
                provider: openai
            }
            .to_string()
            .contains("status.openai.com")
        );
        let direct = Provider::Direct;
        let texts = [
            ApiError::Auth {
                status: 401,
                provider: direct,
            },
            ApiError::Quota { provider: direct },
            ApiError::Server {
                status: 502,
                provider: direct,
            },
            ApiError::Connection {
                message: "refused".into(),
                provider: direct,
            },
            ApiError::Decode {
                message: "x".into(),
                provider: direct,
            },
        ]
        .map(|e| e.to_string());
        for text in &texts {
            assert!(!text.contains("OPENAI"), "{text}");
            assert!(!text.contains("openai.com"), "{text}");
            assert!(text.contains("EMBATCH_DIRECT_"), "{text}");
        }
        assert!(texts[0].contains("EMBATCH_DIRECT_API_KEY"));
        assert!(texts[3].contains("--base-url / EMBATCH_DIRECT_BASE_URL"));
    }
}
