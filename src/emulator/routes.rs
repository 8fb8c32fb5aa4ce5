//! The emulator's HTTP routes: `/v1/files`, `/v1/batches`, `/v1/embeddings`.
//!
//! Each handler checks its request as the provider does and answers with the shapes of the
//! OpenAPI description; a bad request gets a 4xx with an OpenAI-shaped error, never a panic.
//! The `guard` middleware runs first on every route: latency, the bearer token, and injected
//! 429/500 answers, all before any side effect. Batch lifecycle rules live in `batches`; this
//! module only decides when to read, create or cancel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{DefaultBodyLimit, Extension, Multipart, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use sha2::Digest as _;

use super::batches::{self, BatchFaults, BatchRecord, Status};
use super::embeddings::{self, RequestError};
use super::state::{ConnectionKill, LostAnswer, Shared};

/// The provider's cap on any uploaded file.
const MAX_UPLOAD_BYTES: usize = 512 * 1024 * 1024;
/// The provider's cap on a batch input file.
const MAX_BATCH_FILE_BYTES: usize = 200 * 1024 * 1024;
/// How long an uploaded `batch` file lives when the upload does not say.
const DEFAULT_BATCH_FILE_TTL_SECS: i64 = 30 * 24 * 3600;
/// `expires_after.seconds` bounds (the spec's `FileExpirationAfter`).
const EXPIRES_AFTER_RANGE: std::ops::RangeInclusive<i64> = 3600..=2_592_000;
/// The purposes an upload may declare (the spec's `CreateFileRequest.purpose`).
const UPLOAD_PURPOSES: &[&str] = &[
    "assistants",
    "batch",
    "fine-tune",
    "vision",
    "user_data",
    "evals",
];

type SharedState = State<Arc<Shared>>;

/// The routes, with `extra` (another API's routes, such as `gemini`'s) behind the same guard.
pub(crate) fn router(shared: Arc<Shared>, extra: Router<Arc<Shared>>) -> Router {
    Router::new()
        .route("/v1/files", post(upload_file).get(list_files))
        .route("/v1/files/{file_id}", get(get_file).delete(delete_file))
        .route("/v1/files/{file_id}/content", get(file_content))
        .route("/v1/batches", post(create_batch).get(list_batches))
        .route("/v1/batches/{batch_id}", get(get_batch))
        .route("/v1/batches/{batch_id}/cancel", post(cancel_batch))
        .route("/v1/embeddings", post(create_embeddings))
        .merge(extra)
        .fallback(unknown_route)
        .layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES))
        .layer(middleware::from_fn_with_state(Arc::clone(&shared), guard))
        .layer(middleware::from_fn_with_state(
            shared.api,
            super::voyage::translate,
        ))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&shared),
            date_header,
        ))
        .with_state(shared)
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, axum::Json(self.body())).into_response()
    }
}

fn not_found(message: String, param: &str) -> RequestError {
    RequestError {
        status: 404,
        ..RequestError::invalid(message, Some(param))
    }
}

/// Latency, then the bearer token, then injected 429/500 — all before the handler acts.
async fn guard(State(shared): SharedState, request: Request, next: Next) -> Response {
    let latency = shared.lock().faults.latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if presented != Some(shared.api_key.as_str()) {
        let message = match presented {
            None => "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".to_owned(),
            Some(_) => "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.".to_owned(),
        };
        return RequestError {
            status: 401,
            message,
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key".to_owned()),
        }
        .into_response();
    }

    let injected = {
        let mut state = shared.lock();
        let (rate_429, rate_500) = (state.faults.rate_429, state.faults.rate_500);
        let retry_after = state.faults.retry_after_secs;
        let injected = if rate_429 > 0.0 && state.draw() < rate_429 {
            Some((429, retry_after))
        } else if rate_500 > 0.0 && state.draw() < rate_500 {
            Some((500, retry_after))
        } else {
            None
        };
        if injected.is_some() {
            state.counters.injected_errors += 1;
        }
        injected
    };
    match injected {
        Some((429, retry_after)) => {
            let mut response = RequestError {
                status: 429,
                message: "Rate limit reached for requests. Please try again later.".to_owned(),
                kind: "requests",
                param: None,
                code: Some("rate_limit_exceeded".to_owned()),
            }
            .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            response
        }
        Some(_) => RequestError {
            status: 500,
            message: "The server had an error while processing your request. Sorry about that!"
                .to_owned(),
            kind: "server_error",
            param: None,
            code: None,
        }
        .into_response(),
        None => next.run(request).await,
    }
}

/// The `Date` header on every answer, by the emulator's clock (hyper would add one by the real
/// clock): a provider's far-off clock shows there too.
async fn date_header(State(shared): SharedState, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let now = shared.lock().date_header_now();
    let at = std::time::UNIX_EPOCH
        .checked_add(std::time::Duration::from_secs(now.max(0).unsigned_abs()))
        .unwrap_or(std::time::UNIX_EPOCH);
    if let Ok(value) = HeaderValue::from_str(&httpdate::fmt_http_date(at)) {
        response.headers_mut().insert(header::DATE, value);
    }
    response
}

async fn unknown_route(request: Request) -> Response {
    RequestError {
        status: 404,
        ..RequestError::invalid(
            format!(
                "Invalid URL ({} {})",
                request.method(),
                request.uri().path()
            ),
            None,
        )
    }
    .into_response()
}

/// Drops the connection this request came on, without answering: the action is done, the
/// answer is lost. The future never completes; the connection task drops it.
pub(super) async fn lose_answer(kill: &ConnectionKill) -> Response {
    kill.0.cancel();
    std::future::pending().await
}

// ---------------------------------------------------------------------------------- files

async fn upload_file(
    State(shared): SharedState,
    Extension(kill): Extension<ConnectionKill>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, RequestError> {
    let mut multipart = multipart.map_err(|rejection| {
        RequestError::invalid(
            format!("the body must be multipart/form-data: {rejection}"),
            None,
        )
    })?;
    let mut purpose: Option<String> = None;
    let mut file: Option<(String, Bytes)> = None;
    let mut anchor: Option<String> = None;
    let mut seconds: Option<String> = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(error) => {
                return Err(RequestError::invalid(
                    format!("unreadable multipart body: {error}"),
                    None,
                ));
            }
        };
        let name = field.name().unwrap_or_default().to_owned();
        let filename = field.file_name().map(str::to_owned);
        let data = field.bytes().await.map_err(|error| {
            RequestError::invalid(format!("unreadable field {name}: {error}"), None)
        })?;
        let text = || String::from_utf8_lossy(&data).into_owned();
        match name.as_str() {
            "purpose" => purpose = Some(text()),
            "expires_after[anchor]" => anchor = Some(text()),
            "expires_after[seconds]" => seconds = Some(text()),
            "file" => {
                let Some(filename) = filename.filter(|f| !f.is_empty()) else {
                    return Err(RequestError::invalid(
                        "the 'file' field must carry a filename",
                        Some("file"),
                    ));
                };
                file = Some((filename, data));
            }
            // The spec forbids other fields; the provider ignores them.
            _ => {}
        }
    }

    let Some(purpose) = purpose else {
        return Err(RequestError::invalid(
            "'purpose' is a required property",
            Some("purpose"),
        ));
    };
    if !UPLOAD_PURPOSES.contains(&purpose.as_str()) {
        return Err(RequestError::invalid(
            format!("'{purpose}' is not one of {UPLOAD_PURPOSES:?} - 'purpose'"),
            Some("purpose"),
        ));
    }
    let Some((filename, content)) = file else {
        return Err(RequestError::invalid(
            "'file' is a required property",
            Some("file"),
        ));
    };
    if purpose == "batch" {
        if !filename.ends_with(".jsonl") {
            return Err(RequestError::invalid(
                "Invalid file format for Batch API. Must be .jsonl",
                Some("file"),
            ));
        }
        if content.len() > MAX_BATCH_FILE_BYTES {
            return Err(RequestError::invalid(
                format!(
                    "File is too large for the Batch API: {} bytes, the maximum is {MAX_BATCH_FILE_BYTES}",
                    content.len()
                ),
                Some("file"),
            ));
        }
    }
    let now = shared.lock().now();
    let expires_at = match (anchor, seconds) {
        (None, None) => (purpose == "batch").then_some(now + DEFAULT_BATCH_FILE_TTL_SECS),
        (Some(anchor), Some(seconds)) => {
            if anchor != "created_at" {
                return Err(RequestError::invalid(
                    "expires_after[anchor] must be 'created_at'",
                    Some("expires_after.anchor"),
                ));
            }
            match seconds.trim().parse::<i64>() {
                Ok(seconds) if EXPIRES_AFTER_RANGE.contains(&seconds) => Some(now + seconds),
                _ => {
                    return Err(RequestError::invalid(
                        "expires_after[seconds] must be an integer between 3600 and 2592000",
                        Some("expires_after.seconds"),
                    ));
                }
            }
        }
        _ => {
            return Err(RequestError::invalid(
                "expires_after needs both anchor and seconds",
                Some("expires_after"),
            ));
        }
    };

    let (file_json, lost) = {
        let mut state = shared.lock();
        let expires_at = match state.faults.input_file_ttl {
            Some(ttl) if purpose == "batch" => Some(now + (ttl.as_secs() as i64).max(1)),
            _ => expires_at,
        };
        let id = state.add_file(filename, &purpose, content, expires_at);
        state.counters.uploads += 1;
        let mut file_json = state.file(&id).map(super::state::StoredFile::to_json);
        if let (Some(json), Some(claimed)) =
            (file_json.as_mut(), state.faults.upload_answer_expires_at)
        {
            json["expires_at"] = json!(claimed);
        }
        (file_json, state.take_lost_answer(LostAnswer::Upload))
    };
    if lost {
        return Ok(lose_answer(&kill).await);
    }
    Ok(axum::Json(file_json).into_response())
}

/// Query parameters as strings: a malformed query string is a 400, not axum's plain-text one.
type QueryParams = Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>;

fn query_params(query: QueryParams) -> Result<HashMap<String, String>, RequestError> {
    query
        .map(|Query(params)| params)
        .map_err(|rejection| RequestError::invalid(format!("bad query string: {rejection}"), None))
}

fn limit_param(
    params: &HashMap<String, String>,
    default: usize,
    max: usize,
) -> Result<usize, RequestError> {
    match params.get("limit") {
        None => Ok(default),
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if limit >= 1 => Ok(limit.min(max)),
            _ => Err(RequestError::invalid(
                format!("'limit' must be an integer between 1 and {max}"),
                Some("limit"),
            )),
        },
    }
}

/// One page of `items` (already in list order) after the item with id `after`.
fn page<'a, T>(
    items: Vec<&'a T>,
    id_of: impl Fn(&T) -> &str,
    after: Option<&String>,
    limit: usize,
) -> Result<(Vec<&'a T>, bool), RequestError> {
    let start = match after {
        None => 0,
        Some(after) => match items.iter().position(|item| id_of(item) == after.as_str()) {
            Some(index) => index + 1,
            None => {
                return Err(RequestError::invalid(
                    format!("'after' is not the id of an object in this list: {after}"),
                    Some("after"),
                ));
            }
        },
    };
    let rest = &items[start..];
    let has_more = rest.len() > limit;
    Ok((rest.iter().take(limit).copied().collect(), has_more))
}

/// The spec's list envelope. `first_id`/`last_id` are null on an empty page, as the provider
/// sends them.
fn list_json(data: Vec<Value>, has_more: bool) -> Value {
    let first_id = data.first().map(|item| item["id"].clone());
    let last_id = data.last().map(|item| item["id"].clone());
    json!({"object": "list", "data": data, "first_id": first_id, "last_id": last_id, "has_more": has_more})
}

async fn list_files(
    State(shared): SharedState,
    query: QueryParams,
) -> Result<Response, RequestError> {
    let params = query_params(query)?;
    let limit = limit_param(&params, 10_000, 10_000)?;
    let descending = match params.get("order").map(String::as_str) {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(_) => {
            return Err(RequestError::invalid(
                "'order' must be 'asc' or 'desc'",
                Some("order"),
            ));
        }
    };
    let mut state = shared.lock();
    state.purge_expired_files();
    let mut files: Vec<&super::state::StoredFile> = state
        .files
        .iter()
        .filter(|file| {
            params
                .get("purpose")
                .is_none_or(|purpose| &file.purpose == purpose)
        })
        .collect();
    if descending {
        files.reverse();
    }
    let (files, has_more) = page(files, |file| &file.id, params.get("after"), limit)?;
    let data = files.iter().map(|file| file.to_json()).collect();
    Ok(axum::Json(list_json(data, has_more)).into_response())
}

async fn get_file(
    State(shared): SharedState,
    Path(file_id): Path<String>,
) -> Result<Response, RequestError> {
    let mut state = shared.lock();
    state.purge_expired_files();
    match state.file(&file_id) {
        Some(file) => Ok(axum::Json(file.to_json()).into_response()),
        None => Err(no_such_file(&file_id)),
    }
}

fn no_such_file(file_id: &str) -> RequestError {
    not_found(format!("No such File object: {file_id}"), "id")
}

async fn delete_file(
    State(shared): SharedState,
    Path(file_id): Path<String>,
) -> Result<Response, RequestError> {
    let mut state = shared.lock();
    state.purge_expired_files();
    let Some(index) = state.files.iter().position(|file| file.id == file_id) else {
        return Err(no_such_file(&file_id));
    };
    state.files.remove(index);
    state.counters.file_deletions += 1;
    Ok(axum::Json(json!({"id": file_id, "object": "file", "deleted": true})).into_response())
}

async fn file_content(
    State(shared): SharedState,
    Path(file_id): Path<String>,
) -> Result<Response, RequestError> {
    let content = {
        let mut state = shared.lock();
        state.purge_expired_files();
        let Some(file) = state.file(&file_id) else {
            return Err(no_such_file(&file_id));
        };
        let content = file.content.clone();
        state.counters.downloads += 1;
        content
    };
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        content,
    )
        .into_response())
}

// -------------------------------------------------------------------------------- batches

/// A JSON object body, or a 400 saying why not.
fn json_object(body: &[u8]) -> Result<Map<String, Value>, RequestError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(RequestError::invalid(
            "the request body must be a JSON object",
            None,
        )),
        Err(error) => Err(RequestError::invalid(
            format!("We could not parse the JSON body of your request: {error}"),
            None,
        )),
    }
}

fn required_string<'a>(body: &'a Map<String, Value>, key: &str) -> Result<&'a str, RequestError> {
    match body.get(key) {
        Some(Value::String(value)) => Ok(value),
        Some(_) => Err(RequestError::invalid(
            format!("'{key}' must be a string"),
            Some(key),
        )),
        None => Err(RequestError::invalid(
            format!("Missing required parameter: '{key}'."),
            Some(key),
        )),
    }
}

/// The spec's `Metadata`: at most 16 string pairs, keys ≤ 64 chars, values ≤ 512 chars.
fn metadata(body: &Map<String, Value>) -> Result<Option<Map<String, Value>>, RequestError> {
    let invalid = |message: &str| RequestError::invalid(message, Some("metadata"));
    match body.get("metadata") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(pairs)) => {
            if pairs.len() > 16 {
                return Err(invalid("'metadata' holds at most 16 pairs"));
            }
            for (key, value) in pairs {
                if key.chars().count() > 64 {
                    return Err(invalid("metadata keys are at most 64 characters"));
                }
                match value {
                    Value::String(value) if value.chars().count() <= 512 => {}
                    _ => {
                        return Err(invalid(
                            "metadata values are strings of at most 512 characters",
                        ));
                    }
                }
            }
            Ok(Some(pairs.clone()))
        }
        Some(_) => Err(invalid("'metadata' must be an object of string pairs")),
    }
}

/// `output_expires_after.seconds`, checked like `FileExpirationAfter`.
fn output_expires_after(body: &Map<String, Value>) -> Result<Option<i64>, RequestError> {
    let param = Some("output_expires_after");
    match body.get("output_expires_after") {
        None | Some(Value::Null) => Ok(None),
        Some(value) => {
            let anchor_ok = value.get("anchor").and_then(Value::as_str) == Some("created_at");
            match value.get("seconds").and_then(Value::as_i64) {
                Some(seconds) if anchor_ok && EXPIRES_AFTER_RANGE.contains(&seconds) => {
                    Ok(Some(seconds))
                }
                _ => Err(RequestError::invalid(
                    "'output_expires_after' must be {\"anchor\": \"created_at\", \"seconds\": 3600..2592000}",
                    param,
                )),
            }
        }
    }
}

/// The `creations_by_metadata` key of a create call.
fn metadata_key(metadata: Option<&Map<String, Value>>) -> String {
    ["embatch_run_id", "embatch_batch", "embatch_submission"]
        .iter()
        .map(|key| {
            metadata
                .and_then(|m| m.get(*key))
                .and_then(Value::as_str)
                .unwrap_or("-")
        })
        .collect::<Vec<_>>()
        .join("/")
}

pub(super) async fn create_batch(
    State(shared): SharedState,
    Extension(kill): Extension<ConnectionKill>,
    voyage: Option<Extension<super::voyage::VoyageParams>>,
    lines: Option<Extension<InputLines>>,
    body: Bytes,
) -> Result<Response, RequestError> {
    let request_params = voyage.map(|Extension(params)| params.0);
    let body = json_object(&body)?;
    let input_file_id = required_string(&body, "input_file_id")?.to_owned();
    let endpoint = required_string(&body, "endpoint")?.to_owned();
    if !batches::ENDPOINTS.contains(&endpoint.as_str()) {
        return Err(RequestError::invalid(
            format!(
                "'{endpoint}' is not one of {:?} - 'endpoint'",
                batches::ENDPOINTS
            ),
            Some("endpoint"),
        ));
    }
    let completion_window = required_string(&body, "completion_window")?.to_owned();
    if completion_window != "24h" {
        return Err(RequestError::invalid(
            format!("'{completion_window}' is not one of ['24h'] - 'completion_window'"),
            Some("completion_window"),
        ));
    }
    let metadata = metadata(&body)?;
    let output_expires_after = output_expires_after(&body)?;

    let (input, strict) = {
        let mut state = shared.lock();
        state.purge_expired_files();
        let Some(file) = state.file(&input_file_id) else {
            return Err(RequestError::invalid(
                format!("Invalid 'input_file_id': '{input_file_id}'. No such file."),
                Some("input_file_id"),
            ));
        };
        if file.purpose != "batch" {
            return Err(RequestError::invalid(
                format!(
                    "The input file {input_file_id} has purpose '{}': it must be uploaded with purpose 'batch'.",
                    file.purpose
                ),
                Some("input_file_id"),
            ));
        }
        (file.content.clone(), state.faults.invalid_line_validation)
    };
    // A Voyage batch's lines carry only their inputs: they run as lines of its parameters.
    let input = match (&lines, &request_params) {
        (Some(Extension(InputLines(translate))), _) => translate(&input),
        (None, Some(params)) => super::voyage::openai_lines(&input, params),
        (None, None) => input,
    };
    // Parsing a file of up to 200 MB belongs outside the lock and off the async threads.
    let validation = {
        let (input, endpoint) = (input.clone(), endpoint.clone());
        tokio::task::spawn_blocking(move || batches::validate(&input, &endpoint, strict))
            .await
            .map_err(|_| RequestError {
                status: 500,
                ..RequestError::invalid("validation crashed", None)
            })?
    };

    let now = Instant::now();
    let (batch_json, lost) = {
        let mut state = shared.lock();
        let mut token_limit_exceeded = state.faults.token_limit_failures > 0;
        if token_limit_exceeded {
            state.faults.token_limit_failures -= 1;
        }
        // The enqueued-token limit: batches not finished (as last read) count for bytes / 4.
        let estimate = (input.len() as u64).div_ceil(4);
        let enqueued: u64 = state
            .batches
            .iter()
            .filter(|b| !b.status.is_terminal() && !b.faults.token_limit_exceeded)
            .map(|b| (b.input.len() as u64).div_ceil(4))
            .sum();
        if !token_limit_exceeded {
            if state
                .faults
                .enqueued_token_limit
                .is_some_and(|limit| enqueued + estimate > limit)
            {
                token_limit_exceeded = true;
                state.counters.enqueued_limit_refusals += 1;
            } else {
                let total = enqueued + estimate;
                state.counters.max_enqueued_tokens = state.counters.max_enqueued_tokens.max(total);
            }
        }
        // Voyage refuses a creation over its limits with a 429 and creates nothing, where
        // OpenAI creates a batch that turns `failed` with `token_limit_exceeded`.
        if token_limit_exceeded && shared.api == super::voyage::Api::Voyage {
            state.counters.queue_limit_429s += 1;
            return Err(RequestError {
                status: 429,
                message: "You have exceeded the limit on batches in flight for your organization; wait for some to complete and try again.".to_owned(),
                kind: "requests",
                param: None,
                code: Some("rate_limit_exceeded".to_owned()),
            });
        }
        let faults = BatchFaults {
            request_failure_rate: state.faults.request_failure_rate,
            fail_custom_ids: state.faults.fail_custom_ids.iter().cloned().collect(),
            expire_after_fraction: state.faults.expire_after_fraction,
            token_limit_exceeded,
        };
        let id = state.new_id("batch_");
        let model = match &validation {
            batches::Validation::Valid { model, .. } => model.clone(),
            batches::Validation::Invalid(_) => None,
        };
        let seed = shared.seed
            ^ u64::from_le_bytes(
                sha2::Sha256::digest(id.as_bytes())[..8]
                    .try_into()
                    .unwrap_or([0; 8]),
            );
        let record = BatchRecord {
            id,
            endpoint,
            input_file_id,
            completion_window,
            output_expires_after,
            created_at: state.now(),
            created_instant: now,
            status: Status::Validating,
            in_progress_at: None,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            total: 0,
            completed: 0,
            failed: 0,
            input_tokens: 0,
            output_file_id: None,
            error_file_id: None,
            errors: None,
            model,
            stage_started: now,
            held: false,
            generating: false,
            n_done_at_cancel: 0,
            validation,
            input,
            seed,
            faults,
            metadata,
            request_params,
        };
        let batch_json = record.to_json();
        let key = metadata_key(record.metadata.as_ref());
        state.batches.push(record);
        state.counters.batch_creations += 1;
        *state.counters.creations_by_metadata.entry(key).or_insert(0) += 1;
        (batch_json, state.take_lost_answer(LostAnswer::CreateBatch))
    };
    if lost {
        return Ok(lose_answer(&kill).await);
    }
    Ok(axum::Json(batch_json).into_response())
}

/// How another API's input lines run as OpenAI lines (`gemini`'s translation), handed to
/// [`create_batch`] by the handler that calls it.
#[derive(Clone, Copy)]
pub(crate) struct InputLines(pub fn(&[u8]) -> Bytes);

fn no_such_batch(batch_id: &str) -> RequestError {
    not_found(format!("No batch found with id '{batch_id}'."), "batch_id")
}

async fn get_batch(
    State(shared): SharedState,
    Path(batch_id): Path<String>,
) -> Result<Response, RequestError> {
    match shared.read_batch(&batch_id).await {
        Some(batch) => Ok(axum::Json(batch).into_response()),
        None => Err(no_such_batch(&batch_id)),
    }
}

async fn list_batches(
    State(shared): SharedState,
    query: QueryParams,
) -> Result<Response, RequestError> {
    let params = query_params(query)?;
    let limit = limit_param(&params, 20, 100)?;
    let (ids, has_more) = {
        let state = shared.lock();
        // Newest first.
        let batches: Vec<&BatchRecord> = state.batches.iter().rev().collect();
        let (batches, has_more) = page(batches, |batch| &batch.id, params.get("after"), limit)?;
        let ids: Vec<String> = batches.iter().map(|batch| batch.id.clone()).collect();
        (ids, has_more)
    };
    // Each batch is read (advanced, its output generated if due) outside the lock.
    let mut data = Vec::with_capacity(ids.len());
    for id in &ids {
        // A batch listed a moment ago cannot vanish: batches are never deleted.
        if let Some(batch) = shared.read_batch(id).await {
            data.push(batch);
        }
    }
    Ok(axum::Json(list_json(data, has_more)).into_response())
}

pub(super) async fn cancel_batch(
    State(shared): SharedState,
    Extension(kill): Extension<ConnectionKill>,
    Path(batch_id): Path<String>,
) -> Result<Response, RequestError> {
    // With timed stages a cancel sees the batch as of now; with zero-length stages a batch is
    // only advanced by reads (it would otherwise always be complete before it can be
    // cancelled), so a cancel right after creation finds it still validating.
    if !shared.stage_duration.is_zero() && shared.read_batch(&batch_id).await.is_none() {
        return Err(no_such_batch(&batch_id));
    }
    let (batch_json, lost) = {
        let mut state = shared.lock();
        let stage_duration = shared.stage_duration;
        let Some(record) = state.batch_mut(&batch_id) else {
            return Err(no_such_batch(&batch_id));
        };
        match record.status {
            Status::Validating | Status::InProgress | Status::Finalizing => {
                record.cancel(Instant::now(), stage_duration);
            }
            Status::Cancelling => {}
            status => {
                return Err(RequestError::invalid(
                    format!("Cannot cancel a batch with status '{}'.", status.as_str()),
                    None,
                ));
            }
        }
        let batch_json = record.to_json();
        (batch_json, state.take_lost_answer(LostAnswer::Cancel))
    };
    if lost {
        return Ok(lose_answer(&kill).await);
    }
    Ok(axum::Json(batch_json).into_response())
}

// ----------------------------------------------------------------------------- embeddings

pub(super) async fn create_embeddings(
    State(shared): SharedState,
    body: Bytes,
) -> Result<Response, RequestError> {
    let body = Value::Object(json_object(&body)?);
    {
        let mut state = shared.lock();
        state.counters.embedding_calls += 1;
        let texts: Vec<&str> = match body.get("input") {
            Some(Value::String(text)) => vec![text.as_str()],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if let Some(needle) = &state.faults.refuse_inputs_containing
            && texts.iter().any(|text| text.contains(needle.as_str()))
        {
            return Err(RequestError::invalid(
                format!(
                    "This model's maximum context length is {} tokens, however you requested more. Please reduce your prompt.",
                    embeddings::MAX_TOKENS_PER_INPUT
                ),
                Some("input"),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for text in texts {
            if seen.insert(text) {
                *state
                    .counters
                    .embedding_inputs
                    .entry(text.to_owned())
                    .or_default() += 1;
            }
        }
    }
    // Up to 2048 inputs of 8k tokens: tokenizing and hashing them is CPU work.
    let response = tokio::task::spawn_blocking(move || {
        embeddings::execute(&body).map(|response| serde_json::to_vec(&response))
    })
    .await
    .map_err(|_| RequestError {
        status: 500,
        ..RequestError::invalid("embedding crashed", None)
    })??;
    let bytes = response.map_err(|error| RequestError {
        status: 500,
        ..RequestError::invalid(error.to_string(), None)
    })?;
    Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}
