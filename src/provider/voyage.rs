//! Voyage AI behind the provider seam: its Batch API (docs.voyageai.com, "Batch inference")
//! as a [`BatchProvider`].
//!
//! Voyage's files and batches are OpenAI's in all but a few fields, so this is a thin
//! translation over [`ApiClient`], whose HTTP machinery (retries with backoff honouring
//! `Retry-After`, streamed upload and download, lost answers of create calls reported as
//! [`ApiError::UnknownOutcome`], the `Date` clock, the key scrubbed from errors) it reuses.
//! What differs, and is translated here:
//! - timestamps are RFC 3339 strings (older answers: `2025-01-29 13:05:05`, no zone);
//! - an upload has no `expires_after` (files live a fixed 30 days);
//! - a batch takes `completion_window: "12h"` and the model, `input_type` and
//!   `output_dimension` once, in `request_params`, for every line;
//! - a batch's expiry is `expected_completion_at`, and there is no `expired` status (requests
//!   not done by then are `batch_expired` lines of the error file);
//! - lists cannot be filtered and the order of batch lists is not documented, so adoption
//!   scans every page;
//! - error bodies are `{"detail": "…"}` (read by the shared classifier), and a 429 on batch
//!   creation is the organisation's limit on batches in flight: [`ApiError::QueueLimit`].

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::models::{InputType, Provider};
use crate::provider::openai::{ApiClient, BatchErrors, ClientOptions, RequestCounts};
use crate::provider::{
    ApiError, BatchProvider, ByteObserver, ClockReading, RemoteBatch, RemoteFile,
};
use crate::run::state::{RemoteError, RemoteSnapshot};
use crate::run::store::RunSettings;

/// Page size when listing batches (Voyage's maximum).
const BATCH_PAGE_SIZE: u32 = 100;
/// Page size when listing files (Voyage's maximum and default).
const FILE_PAGE_SIZE: u32 = 10_000;
/// Pages read at most when looking for a batch or a file: the lists cannot be filtered, so
/// this bounds a scan of a very long history (10,000 batches, 1M files).
const MAX_PAGES: usize = 100;
/// The inputs of one `/embeddings` request (Voyage's cap).
const MAX_INPUTS_PER_REQUEST: usize = 1000;

/// What every batch of a run asks Voyage for: the parameters that go into `request_params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchParams {
    pub model: String,
    /// `Some(N)` only when N is not the model's default size.
    pub output_dimension: Option<u32>,
    pub input_type: InputType,
}

impl BatchParams {
    /// The parameters a run's settings record.
    pub fn of_run(settings: &RunSettings) -> BatchParams {
        BatchParams {
            model: settings.model.clone(),
            output_dimension: settings.send_dimensions.then_some(settings.dimensions),
            input_type: settings.input_type.unwrap_or_default(),
        }
    }

    /// The `request_params` object of a batch creation.
    pub fn request_params(&self) -> Value {
        let mut params = json!({"model": self.model, "output_dtype": "float"});
        if let Some(input_type) = self.input_type.wire() {
            params["input_type"] = json!(input_type);
        }
        if let Some(dims) = self.output_dimension {
            params["output_dimension"] = json!(dims);
        }
        params
    }
}

/// The body of a realtime `POST /embeddings`.
pub(crate) fn embeddings_body(
    model: &str,
    inputs: &[String],
    dimensions: Option<u32>,
    input_type: InputType,
) -> Value {
    let mut body = json!({"model": model, "input": inputs});
    if let Some(input_type) = input_type.wire() {
        body["input_type"] = json!(input_type);
    }
    if let Some(dims) = dimensions {
        body["output_dimension"] = json!(dims);
    }
    body
}

/// Voyage's Batch API for one run's batches.
#[derive(Debug, Clone)]
pub struct VoyageProvider {
    client: ApiClient,
    params: BatchParams,
}

impl VoyageProvider {
    /// A client of Voyage's endpoint in `options` (whose `provider` must be Voyage, so that
    /// errors name `VOYAGE_API_KEY` and `VOYAGE_BASE_URL`) for batches asking `params`.
    pub fn new(options: ClientOptions, params: BatchParams) -> Result<VoyageProvider, ApiError> {
        let client = ApiClient::new(ClientOptions {
            provider: Provider::Voyage,
            ..options
        })?;
        Ok(VoyageProvider::with_client(client, params))
    }

    /// Over an existing client (tests: shorter timeouts).
    pub fn with_client(client: ApiClient, params: BatchParams) -> VoyageProvider {
        VoyageProvider { client, params }
    }

    fn decode_error(&self, message: String) -> ApiError {
        ApiError::Decode {
            provider: Provider::Voyage,
            message,
        }
    }

    async fn list_files_page(&self, after: Option<&str>) -> Result<Value, ApiError> {
        let mut query = vec![
            ("purpose", "batch".to_owned()),
            ("limit", FILE_PAGE_SIZE.to_string()),
            ("order", "desc".to_owned()),
        ];
        if let Some(after) = after {
            query.push(("after", after.to_owned()));
        }
        self.client
            .read_as(Method::GET, &["files"], &query, "/files")
            .await
    }

    async fn list_batches_page(&self, after: Option<&str>) -> Result<Value, ApiError> {
        let mut query = vec![("limit", BATCH_PAGE_SIZE.to_string())];
        if let Some(after) = after {
            query.push(("after", after.to_owned()));
        }
        self.client
            .read_as(Method::GET, &["batches"], &query, "/batches")
            .await
    }

    /// Every item of a list endpoint, page after page (at most [`MAX_PAGES`]).
    async fn all_pages<'a, F, Fut>(&'a self, mut read: F) -> Result<Vec<Value>, ApiError>
    where
        F: FnMut(Option<String>) -> Fut,
        Fut: std::future::Future<Output = Result<Value, ApiError>> + 'a,
    {
        let mut items = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page = read(after.clone()).await?;
            let Some(data) = page.get("data").and_then(Value::as_array) else {
                return Err(self.decode_error("a list answered without a `data` array".into()));
            };
            items.extend(data.iter().cloned());
            let next = page
                .get("last_id")
                .and_then(Value::as_str)
                .or_else(|| {
                    data.last()
                        .and_then(|d| d.get("id"))
                        .and_then(Value::as_str)
                })
                .map(str::to_owned);
            let has_more = page.get("has_more").and_then(Value::as_bool) == Some(true);
            match next {
                // A page without progress would loop forever: stop instead.
                Some(next) if has_more && !data.is_empty() && after.as_ref() != Some(&next) => {
                    after = Some(next);
                }
                _ => break,
            }
        }
        Ok(items)
    }
}

/// A Voyage timestamp: RFC 3339 (`2025-02-11T19:52:02.536100+00:00`), the older
/// `2025-01-29 13:05:05` (taken as UTC), or Unix seconds.
pub fn parse_time(value: &Value) -> Option<DateTime<Utc>> {
    match value {
        Value::String(text) => {
            let text = text.trim();
            if let Ok(at) = DateTime::parse_from_rfc3339(text) {
                return Some(at.with_timezone(&Utc));
            }
            ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"]
                .iter()
                .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
                .map(|naive| naive.and_utc())
        }
        Value::Number(n) => n.as_i64().and_then(|s| DateTime::from_timestamp(s, 0)),
        _ => None,
    }
}

/// A Voyage file object as the seam sees it.
pub fn remote_file(file: &Value) -> Result<RemoteFile, String> {
    let id = file
        .get("id")
        .and_then(Value::as_str)
        .ok_or("a file without an id")?;
    Ok(RemoteFile {
        id: id.to_owned(),
        filename: file
            .get("filename")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        bytes: file.get("bytes").and_then(Value::as_u64).unwrap_or(0),
        created_at: file
            .get("created_at")
            .and_then(parse_time)
            .ok_or_else(|| format!("file {id} without a readable created_at"))?,
        expires_at: file.get("expires_at").and_then(parse_time),
    })
}

/// The statuses Voyage documents (its lifecycle table has no `expired`).
const KNOWN_STATUSES: &[&str] = &[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "cancelling",
    "cancelled",
];

/// What the state machine keeps of a Voyage batch object.
pub fn snapshot(batch: &Value) -> RemoteSnapshot {
    let text = |key: &str| batch.get(key).and_then(Value::as_str).map(str::to_owned);
    let output_file_id = text("output_file_id");
    let error_file_id = text("error_file_id");
    let status = text("status").unwrap_or_default();
    // A status Voyage does not document (older answers show `partially_completed`) that
    // comes with result files is an ending: its files are ingested as a completed batch's.
    // `batch.json` keeps the word as Voyage sent it.
    let status = if !KNOWN_STATUSES.contains(&status.as_str())
        && (output_file_id.is_some() || error_file_id.is_some())
    {
        "completed".to_owned()
    } else {
        status
    };
    let counts: RequestCounts = batch
        .get("request_counts")
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default();
    let errors: BatchErrors = batch
        .get("errors")
        .and_then(|e| serde_json::from_value(e.clone()).ok())
        .unwrap_or_default();
    RemoteSnapshot {
        status: status.as_str().into(),
        request_counts: crate::run::state::RequestCounts {
            total: counts.total,
            completed: counts.completed,
            failed: counts.failed,
        },
        output_file_id,
        error_file_id,
        expires_at: batch.get("expected_completion_at").and_then(parse_time),
        errors: errors
            .data
            .into_iter()
            .map(|d| RemoteError {
                code: d.code,
                message: d.message,
                line: d.line,
            })
            .collect(),
    }
}

/// The seam's view of a Voyage batch object; `batch.json` gets the object as Voyage sent it.
pub fn remote_batch(batch: &Value) -> Result<RemoteBatch, String> {
    let id = batch
        .get("id")
        .and_then(Value::as_str)
        .ok_or("a batch without an id")?;
    let created_at = batch
        .get("created_at")
        .and_then(parse_time)
        .ok_or_else(|| format!("batch {id} without a readable created_at"))?;
    let metadata = match batch.get("metadata") {
        Some(Value::Object(pairs)) => pairs
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect(),
        _ => BTreeMap::new(),
    };
    let record = serde_json::to_string_pretty(batch)
        .map_err(|e| format!("could not encode batch {id}: {e}"))?;
    Ok(RemoteBatch {
        id: id.to_owned(),
        created_at,
        metadata,
        snapshot: snapshot(batch),
        record,
    })
}

#[derive(Deserialize)]
struct EmbeddingsAnswer {
    data: Vec<crate::provider::openai::Embedding>,
}

impl BatchProvider for VoyageProvider {
    fn upload<'a>(
        &'a self,
        path: &'a Path,
        filename: &'a str,
        _expires_after: Duration,
        observe: ByteObserver,
    ) -> BoxFuture<'a, Result<RemoteFile, ApiError>> {
        async move {
            // Voyage's files live a fixed 30 days: no expiry is sent.
            let file: Value = self.client.upload_as(path, filename, None, observe).await?;
            remote_file(&file).map_err(|message| ApiError::UnknownOutcome {
                what: format!("upload of {filename}"),
                cause: Box::new(self.decode_error(message)),
            })
        }
        .boxed()
    }

    fn find_files_named<'a>(
        &'a self,
        filename: &'a str,
    ) -> BoxFuture<'a, Result<Vec<RemoteFile>, ApiError>> {
        async move {
            let files = self
                .all_pages(|after| async move { self.list_files_page(after.as_deref()).await })
                .await?;
            let mut found = Vec::new();
            for file in files
                .iter()
                .filter(|f| f.get("filename").and_then(Value::as_str) == Some(filename))
            {
                found.push(remote_file(file).map_err(|m| self.decode_error(m))?);
            }
            found.sort_by_key(|f| std::cmp::Reverse(f.created_at));
            Ok(found)
        }
        .boxed()
    }

    fn get_file<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<RemoteFile, ApiError>> {
        async move {
            let file: Value = self
                .client
                .read_as(Method::GET, &["files", id], &[], "/files/{file_id}")
                .await?;
            remote_file(&file).map_err(|m| self.decode_error(m))
        }
        .boxed()
    }

    fn delete_file<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ApiError>> {
        self.client.delete_file(id).boxed()
    }

    fn download_file<'a>(
        &'a self,
        id: &'a str,
        dest: &'a Path,
        observe: ByteObserver,
    ) -> BoxFuture<'a, Result<u64, ApiError>> {
        self.client
            .download_file_observed(id, dest, observe)
            .boxed()
    }

    fn create_batch<'a>(
        &'a self,
        input_file_id: &'a str,
        metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<RemoteBatch, ApiError>> {
        async move {
            let mut body = json!({
                "endpoint": "/v1/embeddings",
                "input_file_id": input_file_id,
                "completion_window": "12h",
                "request_params": self.params.request_params(),
            });
            if !metadata.is_empty() {
                body["metadata"] = json!(metadata);
            }
            let what = format!("creation of the batch for file {input_file_id}");
            // Voyage answers 429 when the organisation's batches in flight (or their tokens)
            // are at the limit: the batch waits, as for OpenAI's queue limit.
            let batch: Value = self
                .client
                .create_as(&["batches"], &body, &what, "/batches")
                .await
                .map_err(|e| {
                    e.rate_limit_as_queue_limit("HTTP 429 on batch creation: the organisation's limit on Voyage batches in flight or on their tokens")
                })?;
            remote_batch(&batch).map_err(|message| ApiError::UnknownOutcome {
                what,
                cause: Box::new(self.decode_error(message)),
            })
        }
        .boxed()
    }

    fn get_batch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<RemoteBatch, ApiError>> {
        async move {
            let batch: Value = self
                .client
                .read_as(Method::GET, &["batches", id], &[], "/batches/{batch_id}")
                .await?;
            remote_batch(&batch).map_err(|m| self.decode_error(m))
        }
        .boxed()
    }

    fn cancel_batch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<RemoteBatch, ApiError>> {
        async move {
            let batch: Value = match self
                .client
                .read_as(
                    Method::POST,
                    &["batches", id, "cancel"],
                    &[],
                    "/batches/{batch_id}/cancel",
                )
                .await
            {
                Ok(batch) => batch,
                // Only `validating` and `in_progress` batches can be cancelled: a batch
                // already ending is fine, as the seam promises.
                Err(ApiError::BadRequest { status: 400, .. }) => {
                    return self.get_batch(id).await;
                }
                Err(other) => return Err(other),
            };
            remote_batch(&batch).map_err(|m| self.decode_error(m))
        }
        .boxed()
    }

    fn find_batches<'a>(
        &'a self,
        not_before: DateTime<Utc>,
        metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<RemoteBatch>, ApiError>> {
        async move {
            // The order of Voyage's batch list is not documented: every page is read, none
            // is assumed to end the search.
            let batches = self
                .all_pages(|after| async move { self.list_batches_page(after.as_deref()).await })
                .await?;
            let mut found = Vec::new();
            for batch in &batches {
                let matches = metadata.iter().all(|(key, value)| {
                    batch
                        .get("metadata")
                        .and_then(|m| m.get(key))
                        .and_then(Value::as_str)
                        == Some(value.as_str())
                });
                if !matches {
                    continue;
                }
                let remote = remote_batch(batch).map_err(|m| self.decode_error(m))?;
                if remote.created_at >= not_before {
                    found.push(remote);
                }
            }
            found.sort_by_key(|b| std::cmp::Reverse(b.created_at));
            Ok(found)
        }
        .boxed()
    }

    fn embed<'a>(
        &'a self,
        model: &'a str,
        inputs: &'a [String],
        dimensions: Option<u32>,
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, ApiError>> {
        async move {
            let mut vectors = Vec::with_capacity(inputs.len());
            for part in inputs.chunks(MAX_INPUTS_PER_REQUEST) {
                let body = embeddings_body(model, part, dimensions, self.params.input_type);
                let answer: EmbeddingsAnswer = self
                    .client
                    .post_as(&["embeddings"], &body, "/embeddings")
                    .await?;
                vectors.extend(crate::provider::openai::order_embeddings(
                    Provider::Voyage,
                    answer.data,
                    part.len(),
                )?);
            }
            Ok(vectors)
        }
        .boxed()
    }

    fn clock_reading(&self) -> Option<ClockReading> {
        self.client.clock_reading()
    }

    fn read_clock(&self) -> BoxFuture<'_, Result<(), ApiError>> {
        async move {
            let _: Value = self
                .client
                .read_as(
                    Method::GET,
                    &["files"],
                    &[("limit", "1".to_owned())],
                    "/files",
                )
                .await?;
            Ok(())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests;
