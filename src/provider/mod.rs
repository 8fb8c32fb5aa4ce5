//! The provider seam: what embatch asks of the service that embeds — files, batches and the
//! realtime endpoint — as one trait, [`BatchProvider`], and the provider-neutral values it
//! answers with ([`RemoteFile`], [`RemoteBatch`], whose [`RemoteSnapshot`] is what the state
//! machine keeps). A provider's wire types are translated inside its own module and never
//! reach `run.json` or the state machine; `batch.json` keeps the provider's own object as
//! [`RemoteBatch::record`].
//!
//! `openai` is the one implementation (the emulator speaks the same protocol). Its error
//! classes ([`ApiError`]: retryable, unknown outcome, queue limit, not found, …) and its clock
//! reading are what the seam reports.
//!
//! It owns no run folder and no state: callers decide what a failure means for a batch.

pub mod openai;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;

use crate::run::state::RemoteSnapshot;

pub use openai::{ApiClient, ApiError, ByteObserver, ClientOptions, ClockReading};

/// How to reach the OpenAI API. The key is a secret: never printed, never written.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub api_key: Option<String>,
    pub base_url: String,
    pub organization: Option<String>,
    pub project: Option<String>,
    /// Retries of a read, download or delete after a 429, 5xx or connection error.
    pub max_retries: usize,
}

/// The batch path's client for the configured settings, or a message saying what is missing.
pub fn batch_client(settings: &ApiSettings) -> anyhow::Result<ApiClient> {
    Ok(ApiClient::new(client_options(settings)?)?)
}

/// The client options of the configured settings (the batch path's retry policy), or a
/// message saying what is missing.
pub fn client_options(settings: &ApiSettings) -> anyhow::Result<ClientOptions> {
    let api_key = settings.api_key.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "no OpenAI API key; set OPENAI_API_KEY in the environment or in .env (to try embatch without one, run `embatch emulator` and point OPENAI_BASE_URL at it)"
        )
    })?;
    Ok(ClientOptions {
        base_url: settings.base_url.clone(),
        api_key,
        organization: settings.organization.clone(),
        project: settings.project.clone(),
        max_retries: settings.max_retries,
        ..ClientOptions::default()
    })
}

/// The realtime path's client. Its retry policy is the batch path's (429, 5xx and connection
/// errors, honouring `Retry-After`) with a shorter longest wait: someone is waiting for the
/// answer.
pub fn realtime_client(settings: &ApiSettings) -> anyhow::Result<ApiClient> {
    Ok(ApiClient::new(ClientOptions {
        max_backoff: Duration::from_secs(10),
        ..client_options(settings)?
    })?)
}

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
