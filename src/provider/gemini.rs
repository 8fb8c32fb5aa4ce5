//! The Gemini API behind the provider seam: its batch mode for embeddings
//! (`models.asyncBatchEmbedContent`, ai.google.dev "Batch API" and "Embeddings" references), its
//! Files API and its realtime `batchEmbedContents`, as a [`BatchProvider`].
//!
//! The HTTP machinery is [`ApiClient`]'s (retries with backoff honouring `Retry-After`, lost
//! answers of create calls reported as [`ApiError::UnknownOutcome`], the `Date` clock, the key
//! scrubbed from errors), with the key sent as `x-goog-api-key` ([`AuthHeader::GoogApiKey`]:
//! never as a Bearer token, never as `?key=` in a URL). What differs, and is translated here:
//! - paths carry the API version (`v1beta/…`), resource names are `files/<id>` and
//!   `batches/<id>`, and custom methods follow a colon (`batches/<id>:cancel`);
//! - an upload is the resumable protocol (start, then `upload, finalize`), and the file's id
//!   is chosen by embatch, deterministically from the filename ([`file_id_for`]): adopting an
//!   upload whose answer was lost is one `GET files/<id>`, exact;
//! - files live 48 h after upload (observed; the API takes no expiry);
//! - a batch is a long-running operation; its only label is `displayName`, which carries the
//!   run's metadata pairs ([`encode_display_name`]); the list cannot be filtered and its order
//!   is not documented, so adoption reads every page;
//! - states are `BATCH_STATE_*` (the SDK's `JOB_STATE_*` too), counts are int64 strings, and
//!   results come in one `responsesFile` whose lines are `{"key", "response"}` or
//!   `{"key", "error"}` (no error file);
//! - errors are `google.rpc.Status` bodies, classified by the shared client
//!   (`classify_status_for`: a 400 `API_KEY_INVALID` is an auth failure, a 429's
//!   `RetryInfo.retryDelay` is its wait);
//! - vectors below 3,072 dimensions are not normalised by Gemini: the realtime answers are
//!   normalised here, and batch results when their lines are read (`output`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use reqwest::{Method, Url};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::models::{Provider, TaskType};
use crate::provider::openai::{ApiClient, AuthHeader, ClientOptions};
use crate::provider::{
    ApiError, BatchProvider, ByteObserver, ClockReading, RemoteBatch, RemoteFile,
};
use crate::run::state::{RemoteError, RemoteSnapshot, RequestCounts};
use crate::run::store::RunSettings;

/// The API version in every path.
pub const API_VERSION: &str = "v1beta";
/// Page size when listing batches. The maximum is not documented (UNCONFIRMED): a server that
/// answers smaller pages is followed by its `nextPageToken` all the same.
const BATCH_PAGE_SIZE: u32 = 100;
/// Pages read at most when looking for a batch: the list cannot be filtered and its order is
/// not documented, so every page is read, up to 100,000 batches at 100 a page.
const MAX_PAGES: usize = 1000;
/// The inputs of one realtime `batchEmbedContents` call.
pub const MAX_INPUTS_PER_REQUEST: usize = crate::models::GEMINI_MAX_INPUTS_PER_REQUEST;
/// The first word of a display name embatch writes.
const DISPLAY_NAME_PREFIX: &str = "embatch";
/// Read size for uploads.
const UPLOAD_CHUNK_BYTES: usize = 256 * 1024;

/// What every batch of a run asks Gemini for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchParams {
    pub model: String,
    /// `Some(N)` only when N is not the model's native size.
    pub output_dimensionality: Option<u32>,
    pub task_type: TaskType,
}

impl BatchParams {
    /// The parameters a run's settings record.
    pub fn of_run(settings: &RunSettings) -> BatchParams {
        BatchParams {
            model: settings.model.clone(),
            output_dimensionality: settings.send_dimensions.then_some(settings.dimensions),
            task_type: settings.task_type.unwrap_or_default(),
        }
    }
}

/// The file id embatch chooses for the upload named `filename`: `eb-` and 37 hex digits of
/// its sha256 (40 characters, lowercase letters, digits and dashes, as the Files API
/// requires). The same filename gives the same id, so a lost upload answer is looked up by id.
pub fn file_id_for(filename: &str) -> String {
    let digest = hex::encode(Sha256::digest(filename.as_bytes()));
    format!("eb-{}", &digest[..37])
}

/// `files/<id>` for an id with or without its collection.
fn file_name(id: &str) -> String {
    if id.starts_with("files/") {
        id.to_owned()
    } else {
        format!("files/{id}")
    }
}

/// `batches/<id>` for an id with or without its collection.
fn batch_name(id: &str) -> String {
    if id.starts_with("batches/") {
        id.to_owned()
    } else {
        format!("batches/{id}")
    }
}

/// The last path segment of a resource name (`files/abc` → `abc`).
fn short_id(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// The metadata pairs of a batch as its display name: `embatch k=v k=v`, keys in order, `%`,
/// space and `=` percent-encoded. The same pairs always give the same name.
pub fn encode_display_name(metadata: &BTreeMap<String, String>) -> String {
    let escape = |text: &str| {
        text.replace('%', "%25")
            .replace(' ', "%20")
            .replace('=', "%3D")
    };
    let mut name = DISPLAY_NAME_PREFIX.to_owned();
    for (key, value) in metadata {
        name.push(' ');
        name.push_str(&escape(key));
        name.push('=');
        name.push_str(&escape(value));
    }
    name
}

/// The metadata pairs of a display name written by [`encode_display_name`]; `None` for a
/// name embatch did not write.
pub fn decode_display_name(name: &str) -> Option<BTreeMap<String, String>> {
    let unescape = |text: &str| {
        text.replace("%20", " ")
            .replace("%3D", "=")
            .replace("%25", "%")
    };
    let mut words = name.split(' ');
    if words.next() != Some(DISPLAY_NAME_PREFIX) {
        return None;
    }
    let mut pairs = BTreeMap::new();
    for word in words.filter(|w| !w.is_empty()) {
        let (key, value) = word.split_once('=')?;
        pairs.insert(unescape(key), unescape(value));
    }
    Some(pairs)
}

/// An RFC 3339 timestamp of the API.
fn parse_time(value: &Value) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(value.as_str()?.trim())
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

/// An int64 as the API writes it (a JSON string), or a plain number.
fn int64(value: &Value) -> Option<u64> {
    match value {
        Value::String(text) => text.trim().parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// A Gemini File as the seam sees it.
pub fn remote_file(file: &Value) -> Result<RemoteFile, String> {
    let name = file
        .get("name")
        .and_then(Value::as_str)
        .ok_or("a file without a name")?;
    Ok(RemoteFile {
        id: file_name(name),
        filename: file
            .get("displayName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        bytes: file.get("sizeBytes").and_then(int64).unwrap_or(0),
        created_at: file
            .get("createTime")
            .and_then(parse_time)
            .ok_or_else(|| format!("file {name} without a readable createTime"))?,
        expires_at: file.get("expirationTime").and_then(parse_time),
    })
}

/// The state machine's word for a batch state: Gemini's `BATCH_STATE_*` and the SDK's
/// `JOB_STATE_*` spellings; `None` for a state not known here.
fn status_word(state: &str) -> Option<&'static str> {
    let state = state
        .strip_prefix("BATCH_STATE_")
        .or_else(|| state.strip_prefix("JOB_STATE_"))?;
    Some(match state {
        "PENDING" | "QUEUED" => "validating",
        "RUNNING" => "in_progress",
        "SUCCEEDED" => "completed",
        "FAILED" => "failed",
        "CANCELLING" => "cancelling",
        "CANCELLED" => "cancelled",
        "EXPIRED" => "expired",
        _ => return None,
    })
}

/// What the state machine keeps of a batch operation.
pub fn snapshot(operation: &Value) -> RemoteSnapshot {
    let meta = operation.get("metadata").unwrap_or(&Value::Null);
    let state = meta
        .get("state")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let output_file_id = meta
        .pointer("/output/responsesFile")
        .or_else(|| operation.pointer("/response/responsesFile"))
        .or_else(|| operation.pointer("/response/output/responsesFile"))
        .and_then(Value::as_str)
        .map(file_name);
    let error = operation.get("error").filter(|e| e.is_object());
    let done = operation.get("done").and_then(Value::as_bool) == Some(true);
    let status = match status_word(state) {
        Some(word) => word.to_owned(),
        // A state not known here on an operation that says it is done is an ending all the
        // same: an error of code 1 is how a cancelled operation ends (Operation reference),
        // any other a failure; without an error its results are ingested. `batch.json` keeps
        // the word as Gemini sent it.
        None if done => match error.and_then(|e| e.get("code")).and_then(Value::as_i64) {
            Some(1) => "cancelled".to_owned(),
            Some(_) => "failed".to_owned(),
            None => "completed".to_owned(),
        },
        // Followed like a running batch (`Other`).
        None if state.is_empty() => "BATCH_STATE_UNSPECIFIED".to_owned(),
        None => state.to_owned(),
    };
    let stats = meta.get("batchStats").unwrap_or(&Value::Null);
    let count = |key: &str| stats.get(key).and_then(int64).unwrap_or(0);
    let errors = error
        .map(|e| RemoteError {
            code: e
                .get("status")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| e.get("code").map(Value::to_string)),
            message: e.get("message").and_then(Value::as_str).map(str::to_owned),
            line: None,
        })
        .into_iter()
        .collect();
    RemoteSnapshot {
        status: status.as_str().into(),
        request_counts: RequestCounts {
            total: count("requestCount"),
            completed: count("successfulRequestCount"),
            failed: count("failedRequestCount"),
        },
        output_file_id,
        error_file_id: None,
        // Gemini states no deadline for a batch ("24 h target").
        expires_at: None,
        errors,
    }
}

/// The seam's view of a batch operation; `batch.json` gets the operation as Gemini sent it.
pub fn remote_batch(operation: &Value) -> Result<RemoteBatch, String> {
    let name = operation
        .get("name")
        .and_then(Value::as_str)
        .ok_or("a batch operation without a name")?;
    let meta = operation.get("metadata").unwrap_or(&Value::Null);
    let created_at = meta
        .get("createTime")
        .and_then(parse_time)
        .ok_or_else(|| format!("batch {name} without a readable metadata.createTime"))?;
    let metadata = meta
        .get("displayName")
        .and_then(Value::as_str)
        .and_then(decode_display_name)
        .unwrap_or_default();
    let record = serde_json::to_string_pretty(operation)
        .map_err(|e| format!("could not encode batch {name}: {e}"))?;
    Ok(RemoteBatch {
        id: batch_name(name),
        created_at,
        metadata,
        snapshot: snapshot(operation),
        record,
    })
}

pub use crate::output::normalize;

/// The Gemini API for one run's batches (or for the realtime path).
#[derive(Debug, Clone)]
pub struct GeminiProvider {
    client: ApiClient,
    params: BatchParams,
}

impl GeminiProvider {
    /// A client of the Gemini endpoint in `options` for batches asking `params`. The key goes
    /// in `x-goog-api-key` and errors name `GEMINI_API_KEY` and `GEMINI_BASE_URL`, whatever
    /// `options` said.
    pub fn new(options: ClientOptions, params: BatchParams) -> Result<GeminiProvider, ApiError> {
        let client = ApiClient::new(ClientOptions {
            provider: Provider::Gemini,
            auth_header: AuthHeader::GoogApiKey,
            ..options
        })?;
        Ok(GeminiProvider::with_client(client, params))
    }

    /// The realtime path's client: documents (`RETRIEVAL_DOCUMENT`), the model and size given
    /// per call.
    pub fn realtime(options: ClientOptions) -> Result<GeminiProvider, ApiError> {
        GeminiProvider::new(
            options,
            BatchParams {
                model: String::new(),
                output_dimensionality: None,
                task_type: TaskType::RetrievalDocument,
            },
        )
    }

    /// Over an existing client (tests: shorter timeouts). The client must send its key as
    /// `x-goog-api-key` ([`AuthHeader::GoogApiKey`]).
    pub fn with_client(client: ApiClient, params: BatchParams) -> GeminiProvider {
        GeminiProvider { client, params }
    }

    fn decode_error(&self, message: String) -> ApiError {
        ApiError::Decode {
            provider: Provider::Gemini,
            message,
        }
    }

    /// `v1beta` + the segments of a resource name (`files/abc` → `v1beta/files/abc`).
    fn path<'a>(name: &'a str, suffix: &'a str) -> Vec<String> {
        let mut segments = vec![API_VERSION.to_owned()];
        let parts: Vec<&str> = name.split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                segments.push(format!("{part}{suffix}"));
            } else {
                segments.push((*part).to_owned());
            }
        }
        segments
    }

    async fn read(
        &self,
        method: Method,
        segments: &[String],
        query: &[(&str, String)],
        path: &'static str,
    ) -> Result<Value, ApiError> {
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        self.client.read_as(method, &segments, query, path).await
    }

    /// The upload URL the server gave, sent only to the configured origin (the SDK does the
    /// same): the key header never goes to another host.
    fn upload_url(&self, given: &str) -> Result<Url, ApiError> {
        let mut url = Url::parse(given)
            .map_err(|e| self.decode_error(format!("the upload session URL is not a URL ({e})")))?;
        let base = self.client.base_url();
        let same = url.set_scheme(base.scheme()).is_ok()
            && url.set_host(base.host_str()).is_ok()
            && url.set_port(base.port()).is_ok();
        if !same {
            return Err(self.decode_error("the upload session URL cannot be used".to_owned()));
        }
        Ok(url)
    }

    /// The resumable upload: a start request naming the file, then the whole file in one
    /// `upload, finalize` request. Both are sent once.
    async fn upload_resumable(
        &self,
        path: &Path,
        filename: &str,
        observe: ByteObserver,
    ) -> Result<Value, ApiError> {
        let file = fs_err::tokio::File::open(path).await?;
        let length = file.metadata().await?.len();
        let id = file_id_for(filename);
        let what = format!("upload of {filename}");
        let timeouts = self.client.timeouts();

        let start_url = self.client.url_of(&["upload", API_VERSION, "files"]);
        let start = self
            .client
            .http()
            .post(start_url)
            .timeout(timeouts.request)
            .header("X-Goog-Upload-Protocol", "resumable")
            .header("X-Goog-Upload-Command", "start")
            .header("X-Goog-Upload-Header-Content-Length", length.to_string())
            .header("X-Goog-Upload-Header-Content-Type", "application/jsonl")
            .json(&json!({"file": {"name": format!("files/{id}"), "displayName": filename}}))
            .send()
            .await;
        let started = match self.client.created_response(start, &what).await {
            Ok(response) => response,
            // The name is taken: an earlier upload of this file may have succeeded with its
            // answer lost (the stepper adopts it by id). The status the API answers for a
            // taken name is not documented (UNCONFIRMED): 409 or ALREADY_EXISTS is read so.
            Err(ApiError::BadRequest { status, message })
                if status == 409 || message.contains("ALREADY_EXISTS") =>
            {
                return Err(self
                    .client
                    .lost_answer(&what, ApiError::BadRequest { status, message }));
            }
            Err(other) => return Err(other),
        };
        let session = started
            .headers()
            .get("x-goog-upload-url")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let Some(session) = session else {
            return Err(self.decode_error(
                "the upload start answered without an x-goog-upload-url header".to_owned(),
            ));
        };
        let session = self.upload_url(&session)?;

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
        let request = self
            .client
            .http()
            .post(session)
            .header("X-Goog-Upload-Command", "upload, finalize")
            .header("X-Goog-Upload-Offset", "0")
            .header(reqwest::header::CONTENT_LENGTH, length.to_string())
            .body(reqwest::Body::wrap_stream(stream))
            .send();
        let watchdog = async {
            loop {
                tokio::time::sleep((timeouts.idle / 4).max(Duration::from_millis(10))).await;
                let (last_progress, sent) = *progress.lock().unwrap_or_else(|e| e.into_inner());
                let limit = if sent >= length {
                    timeouts.upload_answer
                } else {
                    timeouts.idle
                };
                if last_progress.elapsed() > limit {
                    return (sent, limit);
                }
            }
        };
        let response = tokio::select! {
            response = request => response,
            (sent, limit) = watchdog => {
                let cause = ApiError::Connection {
                    provider: Provider::Gemini,
                    message: if sent >= length {
                        format!("no answer {} s after the whole file was sent", limit.as_secs())
                    } else {
                        format!("the upload stalled after {sent} of {length} bytes")
                    },
                };
                return Err(self.client.lost_answer(&what, cause));
            }
        };
        let response = self.client.created_response(response, &what).await?;
        let answer: Value = self
            .client
            .created_body(response, &what, "/upload/v1beta/files")
            .await?;
        Ok(answer.get("file").cloned().unwrap_or(answer))
    }

    /// One page of `GET v1beta/batches`.
    async fn list_batches_page(&self, token: Option<&str>) -> Result<Value, ApiError> {
        let mut query = vec![("pageSize", BATCH_PAGE_SIZE.to_string())];
        if let Some(token) = token {
            query.push(("pageToken", token.to_owned()));
        }
        self.read(
            Method::GET,
            &[API_VERSION.to_owned(), "batches".to_owned()],
            &query,
            "/v1beta/batches",
        )
        .await
    }

    /// Every batch operation of the project, page after page. Running out of pages before
    /// the list ends is an error: a batch not seen is not proof that none exists.
    async fn all_batches(&self) -> Result<Vec<Value>, ApiError> {
        let mut operations = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page = self.list_batches_page(token.as_deref()).await?;
            if let Some(items) = page.get("operations").and_then(Value::as_array) {
                operations.extend(items.iter().cloned());
            } else if !page.is_object() {
                return Err(self.decode_error("a batch list that is not an object".into()));
            }
            match page.get("nextPageToken").and_then(Value::as_str) {
                Some(next) if !next.is_empty() && token.as_deref() != Some(next) => {
                    token = Some(next.to_owned());
                }
                _ => return Ok(operations),
            }
        }
        Err(ApiError::Config {
            message: format!(
                "the Gemini batch list is longer than {MAX_PAGES} pages of {BATCH_PAGE_SIZE}: embatch could not look through all of it for a batch whose creation answer was lost; delete old batches (DELETE v1beta/batches/ID), then run advance again"
            ),
        })
    }

    /// The realtime `batchEmbedContents` of one part of at most
    /// [`MAX_INPUTS_PER_REQUEST`] inputs.
    async fn embed_part(
        &self,
        model: &str,
        part: &[String],
        dimensions: Option<u32>,
    ) -> Result<Vec<Vec<f32>>, ApiError> {
        let model_name = format!("models/{model}");
        let requests: Vec<Value> = part
            .iter()
            .map(|text| {
                let mut request = json!({
                    "model": model_name,
                    "content": {"parts": [{"text": text}]},
                });
                if let Some(task_type) = self.params.task_type.wire() {
                    request["taskType"] = json!(task_type);
                }
                if let Some(dims) = dimensions {
                    request["outputDimensionality"] = json!(dims);
                }
                request
            })
            .collect();
        let segment = format!("{model}:batchEmbedContents");
        let answer: Value = self
            .client
            .post_as(
                &[API_VERSION, "models", &segment],
                &json!({"requests": requests}),
                "/v1beta/models/{model}:batchEmbedContents",
            )
            .await?;
        let Some(embeddings) = answer.get("embeddings").and_then(Value::as_array) else {
            return Err(self
                .decode_error("batchEmbedContents answered without an `embeddings` array".into()));
        };
        if embeddings.len() != part.len() {
            return Err(self.decode_error(format!(
                "batchEmbedContents answered {} vectors for {} inputs",
                embeddings.len(),
                part.len()
            )));
        }
        let mut vectors = Vec::with_capacity(part.len());
        for embedding in embeddings {
            let values = embedding
                .get("values")
                .and_then(Value::as_array)
                .ok_or_else(|| self.decode_error("an embedding without `values`".into()))?;
            let mut vector = values
                .iter()
                .map(|v| v.as_f64().map(|f| f as f32))
                .collect::<Option<Vec<f32>>>()
                .ok_or_else(|| self.decode_error("an embedding value is not a number".into()))?;
            normalize(&mut vector);
            vectors.push(vector);
        }
        Ok(vectors)
    }
}

impl BatchProvider for GeminiProvider {
    fn upload<'a>(
        &'a self,
        path: &'a Path,
        filename: &'a str,
        _expires_after: Duration,
        observe: ByteObserver,
    ) -> BoxFuture<'a, Result<RemoteFile, ApiError>> {
        async move {
            // Gemini's files live 48 h after upload: no expiry can be asked for.
            let file = self.upload_resumable(path, filename, observe).await?;
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
            // The id is a function of the filename: one read says whether it exists.
            let name = format!("files/{}", file_id_for(filename));
            let file = match self
                .read(
                    Method::GET,
                    &Self::path(&name, ""),
                    &[],
                    "/v1beta/files/{file}",
                )
                .await
            {
                Ok(file) => file,
                Err(ApiError::NotFound { .. }) => return Ok(Vec::new()),
                Err(other) => return Err(other),
            };
            let remote = remote_file(&file).map_err(|m| self.decode_error(m))?;
            let failed = file.get("state").and_then(Value::as_str) == Some("FAILED");
            let ours = remote.filename.is_empty() || remote.filename == filename;
            Ok(if ours && !failed {
                vec![remote]
            } else {
                Vec::new()
            })
        }
        .boxed()
    }

    fn get_file<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<RemoteFile, ApiError>> {
        async move {
            let file = self
                .read(
                    Method::GET,
                    &Self::path(&file_name(id), ""),
                    &[],
                    "/v1beta/files/{file}",
                )
                .await?;
            remote_file(&file).map_err(|m| self.decode_error(m))
        }
        .boxed()
    }

    fn delete_file<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ApiError>> {
        async move {
            match self
                .read(
                    Method::DELETE,
                    &Self::path(&file_name(id), ""),
                    &[],
                    "/v1beta/files/{file}",
                )
                .await
            {
                Ok(_) | Err(ApiError::NotFound { .. }) => Ok(()),
                Err(other) => Err(other),
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
            let segment = format!("{}:download", short_id(id));
            self.client
                .download_from(
                    &[API_VERSION, "files", &segment],
                    &[("alt", "media")],
                    id,
                    dest,
                    observe,
                )
                .await
        }
        .boxed()
    }

    fn create_batch<'a>(
        &'a self,
        input_file_id: &'a str,
        metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<RemoteBatch, ApiError>> {
        async move {
            let body = json!({
                "batch": {
                    "displayName": encode_display_name(metadata),
                    "inputConfig": {"fileName": file_name(input_file_id)},
                }
            });
            let segment = format!("{}:asyncBatchEmbedContent", self.params.model);
            let what = format!("creation of the batch for file {input_file_id}");
            // A 429 on creation is read as the batch queue being full, not as a request rate:
            // one creation is sent per batch, far below any request rate, and the limits a
            // batch creation meets are the project's concurrent batches and enqueued tokens
            // (ai.google.dev, Batch API limits). The batch then waits in `queued` and is
            // created again at a later advance, instead of being retried at once against a
            // queue that only other batches' ends can free. Either way nothing was created (a
            // 429 is a refusal), so nothing is paid twice.
            let operation: Value = self
                .client
                .create_as(
                    &[API_VERSION, "models", &segment],
                    &body,
                    &what,
                    "/v1beta/models/{model}:asyncBatchEmbedContent",
                )
                .await
                .map_err(|e| {
                    e.rate_limit_as_queue_limit("HTTP 429 RESOURCE_EXHAUSTED on batch creation: the project's limit on Gemini batches in flight or on their enqueued tokens")
                })?;
            remote_batch(&operation).map_err(|message| ApiError::UnknownOutcome {
                what,
                cause: Box::new(self.decode_error(message)),
            })
        }
        .boxed()
    }

    fn get_batch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<RemoteBatch, ApiError>> {
        async move {
            let operation = self
                .read(
                    Method::GET,
                    &Self::path(&batch_name(id), ""),
                    &[],
                    "/v1beta/batches/{batch}",
                )
                .await?;
            remote_batch(&operation).map_err(|m| self.decode_error(m))
        }
        .boxed()
    }

    fn cancel_batch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<RemoteBatch, ApiError>> {
        async move {
            // Cancelling is best effort and answers `{}`; a batch already ending refuses
            // (400 FAILED_PRECONDITION), which the seam counts as fine.
            match self
                .read(
                    Method::POST,
                    &Self::path(&batch_name(id), ":cancel"),
                    &[],
                    "/v1beta/batches/{batch}:cancel",
                )
                .await
            {
                Ok(_) | Err(ApiError::BadRequest { .. }) => {}
                Err(other) => return Err(other),
            }
            self.get_batch(id).await
        }
        .boxed()
    }

    fn find_batches<'a>(
        &'a self,
        not_before: DateTime<Utc>,
        metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<RemoteBatch>, ApiError>> {
        async move {
            // The order of the list is not documented: every page is read, none is assumed
            // to end the search.
            let model = format!("models/{}", self.params.model);
            let mut found = Vec::new();
            for operation in self.all_batches().await? {
                let meta = operation.get("metadata").unwrap_or(&Value::Null);
                let Some(pairs) = meta
                    .get("displayName")
                    .and_then(Value::as_str)
                    .and_then(decode_display_name)
                else {
                    continue;
                };
                if !metadata.iter().all(|(k, v)| pairs.get(k) == Some(v)) {
                    continue;
                }
                // The model is echoed in the operation's metadata; one of another model is
                // not this run's, whatever its name says.
                if let Some(echoed) = meta.get("model").and_then(Value::as_str)
                    && !self.params.model.is_empty()
                    && echoed != model
                {
                    continue;
                }
                let remote = remote_batch(&operation).map_err(|m| self.decode_error(m))?;
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
                vectors.extend(self.embed_part(model, part, dimensions).await?);
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
            self.read(
                Method::GET,
                &[API_VERSION.to_owned(), "files".to_owned()],
                &[("pageSize", "1".to_owned())],
                "/v1beta/files",
            )
            .await?;
            Ok(())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests;
