//! The emulator speaking the Gemini API (`EmulatorConfig::api` = Gemini, or `embatch emulator
//! --provider gemini`), following ai.google.dev (Batch API, Embeddings and Files references)
//! and the official Python SDK: its own routes over the OpenAI emulator's files and batches, so
//! the lifecycle, the output generation and every fault mode (latency, injected 429/500, lost
//! answers, expiry with partial output, the enqueued-token limit, early file expiry) are the
//! same:
//! - `POST /upload/v1beta/files` (resumable: `start` answers the session in
//!   `x-goog-upload-url`, then `upload, finalize` stores the file under the name the client
//!   chose, which must be free: 409 `ALREADY_EXISTS` otherwise); files live 48 h;
//! - `GET|DELETE /v1beta/files/{id}`, `GET /v1beta/files` (`pageSize` ≤ 100, `pageToken`),
//!   `GET /v1beta/files/{id}:download?alt=media` (generated files only); a missing file is
//!   403 `PERMISSION_DENIED` "… or it may not exist", as the Files API answers;
//! - `POST /v1beta/models/{model}:asyncBatchEmbedContent` → an Operation `batches/{id}` whose
//!   `metadata` holds `displayName`, `state` (`BATCH_STATE_*`), `batchStats` (int64 strings)
//!   and `output.responsesFile`; `GET /v1beta/batches/{id}`, `GET /v1beta/batches` (oldest
//!   first, at most 20 a page: the order and page size are not documented, so a client must
//!   read every page), `POST /v1beta/batches/{id}:cancel`; a batch over the enqueued-token
//!   limit is refused with 429 `RESOURCE_EXHAUSTED` and not created;
//! - `POST /v1beta/models/{model}:batchEmbedContents` (at most 100 requests) and
//!   `:embedContent`;
//! - result lines `{"key", "response": {"embedding": {"values"}, "tokenCount"}}` and
//!   `{"key", "error": {"code", "message", "status"}}`, all in the one responses file (Gemini
//!   has no error file); vectors below 3,072 dimensions are not normalised (scaled by
//!   [`UNNORMALISED_SCALE`]), as the Embeddings guide says of Gemini's;
//! - errors are `{"error": {"code", "message", "status", "details"}}`; the key is the
//!   `x-goog-api-key` header (none: 403 `PERMISSION_DENIED`; a wrong one: 400
//!   `INVALID_ARGUMENT` with `ErrorInfo.reason` `API_KEY_INVALID`); a 429 says its wait in
//!   `RetryInfo.retryDelay`, not in `Retry-After`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use serde_json::{Map, Value, json};

use super::routes::InputLines;
use super::state::{ConnectionKill, LostAnswer, Shared, StoredFile};
use super::voyage::{Api, VoyageParams};

/// Gemini's files live 48 h after upload (observed: the API takes no expiry).
const FILE_TTL_SECS: i64 = 48 * 3600;
/// The size of `gemini-embedding-001`'s vectors without `outputDimensionality`, the only size
/// Gemini normalises.
const NATIVE_DIMENSIONS: u64 = 3072;
/// Vectors of fewer dimensions come back this many times longer than unit length.
pub const UNNORMALISED_SCALE: f32 = 3.0;
/// The model the OpenAI emulator runs Gemini's requests as (native 3072, takes `dimensions`);
/// vectors depend only on the text and the size.
const RUN_AS_MODEL: &str = "text-embedding-3-large";
/// Requests of one `batchEmbedContents` call.
const MAX_REALTIME_REQUESTS: usize = 100;
/// Batches on one page of `GET /v1beta/batches` at most.
const MAX_BATCH_PAGE: usize = 20;
/// Files on one page of `GET /v1beta/files` at most (the Files reference).
const MAX_FILE_PAGE: usize = 100;
/// The largest JSON body read by the translation layer.
const MAX_JSON_BYTES: usize = 1 << 20;

type Query_ = Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>;

/// A Google error body.
fn google_error(status: StatusCode, word: &str, message: impl Into<String>) -> Response {
    google_error_with(status, word, message, Vec::new())
}

fn google_error_with(
    status: StatusCode,
    word: &str,
    message: impl Into<String>,
    details: Vec<Value>,
) -> Response {
    let mut error = json!({"code": status.as_u16(), "message": message.into(), "status": word});
    if !details.is_empty() {
        error["details"] = json!(details);
    }
    (status, axum::Json(json!({ "error": error }))).into_response()
}

fn not_found(message: impl Into<String>) -> Response {
    google_error(StatusCode::NOT_FOUND, "NOT_FOUND", message)
}

fn invalid(message: impl Into<String>) -> Response {
    google_error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message)
}

/// How the Files API answers for a file that is not there (or not the caller's).
fn no_such_file(id: &str) -> Response {
    google_error(
        StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
        format!("You do not have permission to access the File {id} or it may not exist."),
    )
}

/// The Gemini routes, for `routes::router` to put behind its guard (they answer 404 unless
/// the emulator speaks Gemini).
pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1beta/{*rest}", any(v1beta))
        .route("/upload/v1beta/{*rest}", any(upload))
}

/// `router` with the Gemini translation layer in front of everything.
pub(super) fn layer(router: Router, api: Api) -> Router {
    router.layer(axum::middleware::from_fn_with_state(api, translate))
}

/// The translation layer in front of the shared guard: the `x-goog-api-key` header becomes
/// the bearer token the guard checks, and every error that is not Google-shaped yet (the
/// guard's 401/429/500, the shared handlers' refusals) becomes one. A no-op unless the
/// emulator speaks Gemini and the path is a Gemini one.
pub(crate) async fn translate(State(api): State<Api>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if api != Api::Gemini || !(path.starts_with("/v1beta/") || path.starts_with("/upload/v1beta/"))
    {
        return next.run(request).await;
    }
    let mut request = request;
    let key = request.headers().get("x-goog-api-key").cloned();
    request.headers_mut().remove(header::AUTHORIZATION);
    let Some(key) = key else {
        return google_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
        );
    };
    let mut bearer = b"Bearer ".to_vec();
    bearer.extend_from_slice(key.as_bytes());
    if let Ok(value) = HeaderValue::from_bytes(&bearer) {
        request.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let response = next.run(request).await;
    if response.status().is_success() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_JSON_BYTES).await else {
        return google_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "Internal error",
        );
    };
    let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if value.pointer("/error/status").is_some_and(Value::is_string) {
        return Response::from_parts(parts, Body::from(bytes));
    }
    let message = value
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or("Internal error encountered.")
        .to_owned();
    let retry_after = parts
        .headers
        .remove(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok().and_then(|s| s.parse::<u64>().ok()));
    match parts.status {
        StatusCode::UNAUTHORIZED => google_error_with(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            vec![json!({
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
            })],
        ),
        StatusCode::TOO_MANY_REQUESTS => google_error_with(
            StatusCode::TOO_MANY_REQUESTS,
            "RESOURCE_EXHAUSTED",
            "Resource has been exhausted (e.g. check quota).",
            vec![json!({
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": format!("{}s", retry_after.unwrap_or(0)),
            })],
        ),
        StatusCode::NOT_FOUND => not_found(message),
        status if status.is_server_error() => {
            google_error(status, "INTERNAL", "Internal error encountered.")
        }
        status => google_error(status, "INVALID_ARGUMENT", message),
    }
}

/// Unix seconds as RFC 3339 (`2025-09-10T13:37:39.123456Z`).
fn rfc3339(unix: i64) -> Value {
    match chrono::DateTime::from_timestamp(unix, 0) {
        Some(at) => json!(at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        None => Value::Null,
    }
}

/// A stored file as a Gemini `File`.
fn file_json(file: &StoredFile, host: &str) -> Value {
    let generated = file.purpose == "batch_output";
    let digest = <sha2::Sha256 as sha2::Digest>::digest(&file.content);
    let sha256 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, digest);
    let mut json = json!({
        "name": format!("files/{}", file.id),
        "displayName": file.filename,
        "mimeType": "application/jsonl",
        "sizeBytes": file.content.len().to_string(),
        "createTime": rfc3339(file.created_at),
        "updateTime": rfc3339(file.created_at),
        "sha256Hash": sha256,
        "uri": format!("http://{host}/v1beta/files/{}", file.id),
        "state": "ACTIVE",
        "source": if generated { "GENERATED" } else { "UPLOADED" },
    });
    if let Some(expires_at) = file.expires_at {
        json["expirationTime"] = rfc3339(expires_at);
    }
    if generated {
        json["downloadUri"] = json!(format!(
            "http://{host}/v1beta/files/{}:download?alt=media",
            file.id
        ));
    }
    json
}

fn host_of(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_owned()
}

/// An OpenAI batch object of the emulator as a Gemini batch Operation.
fn operation(batch: &Value) -> Value {
    let params = batch.get("request_params").unwrap_or(&Value::Null);
    let status = batch["status"].as_str().unwrap_or("validating");
    let state = match status {
        "validating" => "BATCH_STATE_PENDING",
        "in_progress" | "finalizing" | "cancelling" => "BATCH_STATE_RUNNING",
        "completed" => "BATCH_STATE_SUCCEEDED",
        "failed" => "BATCH_STATE_FAILED",
        "expired" => "BATCH_STATE_EXPIRED",
        "cancelled" => "BATCH_STATE_CANCELLED",
        _ => "BATCH_STATE_UNSPECIFIED",
    };
    let done = matches!(status, "completed" | "failed" | "expired" | "cancelled");
    let counts = &batch["request_counts"];
    let n = |key: &str| counts[key].as_u64().unwrap_or(0);
    let (total, completed, failed) = (n("total"), n("completed"), n("failed"));
    let created = batch["created_at"].as_i64().unwrap_or(0);
    let times = [
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    ];
    let updated = times
        .iter()
        .filter_map(|key| batch[*key].as_i64())
        .max()
        .unwrap_or(created);
    let mut metadata = json!({
        "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.EmbedContentBatch",
        "model": format!("models/{}", params["model"].as_str().unwrap_or_default()),
        "displayName": params["displayName"],
        "inputConfig": {"fileName": params["fileName"]},
        "createTime": rfc3339(created),
        "updateTime": rfc3339(updated),
        "batchStats": {
            "requestCount": total.to_string(),
            "successfulRequestCount": completed.to_string(),
            "failedRequestCount": failed.to_string(),
            "pendingRequestCount": total.saturating_sub(completed + failed).to_string(),
        },
        "state": state,
    });
    if done {
        metadata["endTime"] = rfc3339(updated);
    }
    let responses = batch["output_file_id"]
        .as_str()
        .or_else(|| batch["error_file_id"].as_str());
    if let Some(file) = responses {
        metadata["output"] = json!({"responsesFile": format!("files/{file}")});
    }
    let mut op = json!({
        "name": format!("batches/{}", batch["id"].as_str().unwrap_or_default()),
        "metadata": metadata,
        "done": done,
    });
    match status {
        "failed" => {
            let message = batch
                .pointer("/errors/data/0/message")
                .and_then(Value::as_str)
                .unwrap_or("the batch failed");
            op["error"] = json!({"code": 3, "message": message});
        }
        "cancelled" => op["error"] = json!({"code": 1, "message": "CANCELLED"}),
        _ => {}
    }
    op
}

/// The metadata pairs of an `embatch k=v …` display name (`provider::gemini`'s encoding).
fn display_name_pairs(name: &str) -> Map<String, Value> {
    let unescape = |text: &str| {
        text.replace("%20", " ")
            .replace("%3D", "=")
            .replace("%25", "%")
    };
    let mut words = name.split(' ');
    let mut pairs = Map::new();
    if words.next() != Some("embatch") {
        return pairs;
    }
    for word in words {
        if let Some((key, value)) = word.split_once('=') {
            pairs.insert(unescape(key), json!(unescape(value)));
        }
    }
    pairs
}

/// The input file of a Gemini batch as OpenAI lines, run as [`RUN_AS_MODEL`] of the line's
/// size. A line that does not parse is kept as it is, for validation to refuse.
pub(crate) fn openai_lines(input: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(input.len() + input.len() / 2);
    for line in input.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<Value>(line) {
            Ok(value) if value.get("request").is_some_and(Value::is_object) => {
                let request = &value["request"];
                let text: String = request
                    .pointer("/content/parts")
                    .and_then(Value::as_array)
                    .map(|parts| {
                        parts
                            .iter()
                            .filter_map(|p| p["text"].as_str())
                            .collect::<Vec<_>>()
                            .join("")
                    })
                    .unwrap_or_default();
                let dims = request
                    .get("outputDimensionality")
                    .or_else(|| request.get("output_dimensionality"))
                    .and_then(Value::as_u64)
                    .unwrap_or(NATIVE_DIMENSIONS);
                let translated = json!({
                    "custom_id": value.get("key").cloned().unwrap_or(Value::Null),
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {"model": RUN_AS_MODEL, "input": text, "dimensions": dims},
                });
                out.extend_from_slice(translated.to_string().as_bytes());
            }
            _ => out.extend_from_slice(line),
        }
        out.push(b'\n');
    }
    Bytes::from(out)
}

/// Scales a vector of fewer than 3,072 dimensions off unit length, as Gemini's come.
fn as_gemini_values(values: &Value) -> Value {
    match values.as_array() {
        Some(items) if (items.len() as u64) < NATIVE_DIMENSIONS => Value::Array(
            items
                .iter()
                .map(|v| json!(v.as_f64().unwrap_or(0.0) as f32 * UNNORMALISED_SCALE))
                .collect(),
        ),
        _ => values.clone(),
    }
}

/// An HTTP status as Google's canonical code and word.
fn rpc_status(status: u64) -> (u64, &'static str) {
    match status {
        429 => (8, "RESOURCE_EXHAUSTED"),
        408 => (4, "DEADLINE_EXCEEDED"),
        503 => (14, "UNAVAILABLE"),
        400..=499 => (3, "INVALID_ARGUMENT"),
        _ => (13, "INTERNAL"),
    }
}

/// A batch's result (or error) file in Gemini's line shapes.
fn result_lines(content: &[u8], out: &mut Vec<u8>) {
    for line in content.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(value) = serde_json::from_slice::<Value>(line) else {
            out.extend_from_slice(line);
            out.push(b'\n');
            continue;
        };
        let key = value.get("custom_id").cloned().unwrap_or(Value::Null);
        let translated = match value.get("response") {
            Some(response) if response.is_object() => {
                let status = response["status_code"].as_u64().unwrap_or(500);
                if status == 200 {
                    let body = &response["body"];
                    json!({"key": key, "response": {
                        "embedding": {"values": as_gemini_values(&body["data"][0]["embedding"])},
                        "tokenCount": body["usage"]["total_tokens"].as_u64().unwrap_or(0).to_string(),
                    }})
                } else {
                    let (code, word) = rpc_status(status);
                    let message = response
                        .pointer("/body/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("Internal error encountered.");
                    json!({"key": key, "error": {"code": code, "message": message, "status": word}})
                }
            }
            _ => {
                let code = value.pointer("/error/code").and_then(Value::as_str);
                let message = value
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let (code, word) = match code {
                    Some("batch_expired") => (4, "DEADLINE_EXCEEDED"),
                    Some("batch_cancelled") => (1, "CANCELLED"),
                    _ => (13, "INTERNAL"),
                };
                json!({"key": key, "error": {"code": code, "message": message, "status": word}})
            }
        };
        out.extend_from_slice(translated.to_string().as_bytes());
        out.push(b'\n');
    }
}

/// The parts of `/upload/v1beta/files?upload_id=…` embatch's emulator encodes the session
/// in: the file's name, its display name and its declared size.
fn encode_session(name: &str, display_name: &str, length: Option<u64>) -> String {
    format!(
        "{}.{}.{}",
        hex::encode(name),
        hex::encode(display_name),
        length.map(|l| l.to_string()).unwrap_or_default()
    )
}

fn decode_session(session: &str) -> Option<(String, String, Option<u64>)> {
    let mut parts = session.split('.');
    let name = String::from_utf8(hex::decode(parts.next()?).ok()?).ok()?;
    let display = String::from_utf8(hex::decode(parts.next()?).ok()?).ok()?;
    let length = parts.next()?.parse().ok();
    Some((name, display, length))
}

/// A client-chosen file id: 1 to 40 lowercase letters, digits and dashes.
fn valid_file_id(id: &str) -> bool {
    (1..=40).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-')
}

/// `/upload/v1beta/files`: the resumable upload protocol.
pub(super) async fn upload(
    State(shared): State<Arc<Shared>>,
    Extension(kill): Extension<ConnectionKill>,
    method: Method,
    uri: Uri,
    query: Query_,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if shared.api != Api::Gemini || method != Method::POST || uri.path() != "/upload/v1beta/files" {
        return not_found(format!("Invalid URL ({method} {})", uri.path()));
    }
    let params = query.map(|Query(q)| q).unwrap_or_default();
    let header_text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    let command = header_text("x-goog-upload-command");
    let Some(session) = params.get("upload_id") else {
        return start_upload(&shared, &headers, &command, &body);
    };
    let commands: Vec<&str> = command.split(',').map(str::trim).collect();
    if !commands.contains(&"upload") || !commands.contains(&"finalize") {
        return invalid(
            "X-Goog-Upload-Command must be 'upload, finalize' (chunked uploads are not emulated)",
        );
    }
    if header_text("x-goog-upload-offset") != "0" {
        return invalid("X-Goog-Upload-Offset must be 0");
    }
    let Some((name, display_name, length)) = decode_session(session) else {
        return not_found("No such upload session.");
    };
    if length.is_some_and(|l| l != body.len() as u64) {
        return invalid(format!(
            "the upload carried {} bytes, {} were declared",
            body.len(),
            length.unwrap_or(0)
        ));
    }
    let host = host_of(&headers);
    let (file, lost) = {
        let mut state = shared.lock();
        state.purge_expired_files();
        if state.file(&name).is_some() {
            return google_error(
                StatusCode::CONFLICT,
                "ALREADY_EXISTS",
                format!("File files/{name} already exists."),
            );
        }
        let now = state.now();
        let expires_at = match state.faults.input_file_ttl {
            Some(ttl) => now + (ttl.as_secs() as i64).max(1),
            None => now + FILE_TTL_SECS,
        };
        let stored = state.add_file(display_name, "batch", body, Some(expires_at));
        if let Some(file) = state.files.iter_mut().find(|f| f.id == stored) {
            file.id = name.clone();
        }
        state.counters.uploads += 1;
        let mut file = state.file(&name).map(|f| file_json(f, &host));
        if let (Some(json), Some(claimed)) = (file.as_mut(), state.faults.upload_answer_expires_at)
        {
            json["expirationTime"] = rfc3339(claimed);
        }
        (file, state.take_lost_answer(LostAnswer::Upload))
    };
    if lost {
        return super::routes::lose_answer(&kill).await;
    }
    let mut response = axum::Json(json!({ "file": file })).into_response();
    response
        .headers_mut()
        .insert("x-goog-upload-status", HeaderValue::from_static("final"));
    response
}

fn start_upload(shared: &Shared, headers: &HeaderMap, command: &str, body: &[u8]) -> Response {
    let protocol = headers
        .get("x-goog-upload-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if protocol != "resumable" || command.trim() != "start" {
        return invalid(
            "an upload starts with X-Goog-Upload-Protocol: resumable and X-Goog-Upload-Command: start",
        );
    }
    let request: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(body) {
            Ok(value @ Value::Object(_)) => value,
            _ => return invalid("the start request's body must be a JSON object"),
        }
    };
    let file = request.get("file").unwrap_or(&Value::Null);
    let display_name = file["displayName"].as_str().unwrap_or_default().to_owned();
    if display_name.chars().count() > 512 {
        return invalid("displayName must be at most 512 characters");
    }
    let id = match file["name"].as_str() {
        Some(name) => {
            let id = name.strip_prefix("files/").unwrap_or(name);
            if !valid_file_id(id) {
                return invalid(format!(
                    "Invalid file name {name}: at most 40 characters, lowercase letters, digits and dashes"
                ));
            }
            id.to_owned()
        }
        None => shared.lock().new_id("")[..12].to_owned(),
    };
    {
        let mut state = shared.lock();
        state.purge_expired_files();
        if state.file(&id).is_some() {
            return google_error(
                StatusCode::CONFLICT,
                "ALREADY_EXISTS",
                format!("File files/{id} already exists."),
            );
        }
    }
    let length = headers
        .get("x-goog-upload-header-content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let url = format!(
        "http://{}/upload/v1beta/files?upload_id={}&upload_protocol=resumable",
        host_of(headers),
        encode_session(&id, &display_name, length)
    );
    let mut response = StatusCode::OK.into_response();
    if let Ok(value) = HeaderValue::from_str(&url) {
        response.headers_mut().insert("x-goog-upload-url", value);
    }
    response
        .headers_mut()
        .insert("x-goog-upload-status", HeaderValue::from_static("active"));
    response
}

/// Everything under `/v1beta/`.
pub(super) async fn v1beta(
    State(shared): State<Arc<Shared>>,
    Extension(kill): Extension<ConnectionKill>,
    method: Method,
    uri: Uri,
    query: Query_,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let rest = uri.path().strip_prefix("/v1beta/").unwrap_or_default();
    if shared.api != Api::Gemini {
        return not_found(format!("Invalid URL ({method} {})", uri.path()));
    }
    let params = query.map(|Query(q)| q).unwrap_or_default();
    let host = host_of(&headers);
    let (collection, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let (id, verb) = match tail.rsplit_once(':') {
        Some((id, verb)) => (id, Some(verb)),
        None => (tail, None),
    };
    match (&method, collection, id, verb) {
        (&Method::GET, "files", "", None) => list_files(&shared, &params, &host),
        (&Method::GET, "files", id, None) => {
            let mut state = shared.lock();
            state.purge_expired_files();
            match state.file(id) {
                Some(file) => axum::Json(file_json(file, &host)).into_response(),
                None => no_such_file(id),
            }
        }
        (&Method::DELETE, "files", id, None) => {
            let mut state = shared.lock();
            state.purge_expired_files();
            let Some(index) = state.files.iter().position(|f| f.id == id) else {
                return no_such_file(id);
            };
            state.files.remove(index);
            state.counters.file_deletions += 1;
            // Gemini writes a batch's results and errors into one responses file: the error
            // file the shared model keeps beside it is part of that file, and goes with it.
            let error_file = state
                .batches
                .iter()
                .find(|b| b.output_file_id.as_deref() == Some(id))
                .and_then(|b| b.error_file_id.clone());
            if let Some(error_file) = error_file {
                state.files.retain(|f| f.id != error_file);
            }
            axum::Json(json!({})).into_response()
        }
        (&Method::GET, "files", id, Some("download")) => download(&shared, id),
        (&Method::POST, "models", model, Some("asyncBatchEmbedContent")) => {
            create_batch(&shared, &kill, model, &body).await
        }
        (&Method::POST, "models", model, Some("batchEmbedContents")) => {
            embed(&shared, model, &body, false).await
        }
        (&Method::POST, "models", model, Some("embedContent")) => {
            embed(&shared, model, &body, true).await
        }
        (&Method::GET, "batches", "", None) => list_batches(&shared, &params).await,
        (&Method::GET, "batches", id, None) => match shared.read_batch(id).await {
            Some(batch) => axum::Json(operation(&batch)).into_response(),
            None => not_found(format!("Batch batches/{id} not found.")),
        },
        (&Method::POST, "batches", id, Some("cancel")) => {
            let answer = super::routes::cancel_batch(
                State(Arc::clone(&shared)),
                Extension(kill),
                axum::extract::Path(id.to_owned()),
            )
            .await;
            match answer {
                Ok(_) => axum::Json(json!({})).into_response(),
                Err(error) if error.status == 404 => {
                    not_found(format!("Batch batches/{id} not found."))
                }
                Err(error) => google_error(
                    StatusCode::BAD_REQUEST,
                    "FAILED_PRECONDITION",
                    error.message,
                ),
            }
        }
        // "The client is no longer interested in the operation result. It does not cancel
        // the operation." Nothing to forget here.
        (&Method::DELETE, "batches", _, None) => axum::Json(json!({})).into_response(),
        _ => not_found(format!("Invalid URL ({method} {})", uri.path())),
    }
}

/// An offset page token: `pageSize` (default and cap given) and `pageToken`.
fn page_bounds(
    params: &HashMap<String, String>,
    default: usize,
    max: usize,
) -> Result<(usize, usize), &'static str> {
    let size = match params.get("pageSize") {
        None => default,
        Some(text) => match text.parse::<usize>() {
            Ok(0) => default,
            Ok(n) => n.min(max),
            Err(_) => return Err("pageSize must be an integer"),
        },
    };
    let start = match params.get("pageToken").filter(|t| !t.is_empty()) {
        None => 0,
        Some(token) => match token.strip_prefix("p").and_then(|t| t.parse().ok()) {
            Some(start) => start,
            None => return Err("Invalid page token."),
        },
    };
    Ok((start, size))
}

fn list_files(shared: &Shared, params: &HashMap<String, String>, host: &str) -> Response {
    let (start, size) = match page_bounds(params, 10, MAX_FILE_PAGE) {
        Ok(bounds) => bounds,
        Err(message) => return invalid(message),
    };
    let mut state = shared.lock();
    state.purge_expired_files();
    let files: Vec<Value> = state
        .files
        .iter()
        .rev()
        .skip(start)
        .take(size)
        .map(|f| file_json(f, host))
        .collect();
    let mut answer = json!({ "files": files });
    if start + size < state.files.len() {
        answer["nextPageToken"] = json!(format!("p{}", start + size));
    }
    axum::Json(answer).into_response()
}

async fn list_batches(shared: &Arc<Shared>, params: &HashMap<String, String>) -> Response {
    let (start, size) = match page_bounds(params, 10, MAX_BATCH_PAGE) {
        Ok(bounds) => bounds,
        Err(message) => return invalid(message),
    };
    let (ids, more) = {
        let state = shared.lock();
        // Oldest first: the order is not documented, and a client must not rely on one.
        let ids: Vec<String> = state
            .batches
            .iter()
            .skip(start)
            .take(size)
            .map(|b| b.id.clone())
            .collect();
        (ids, start + size < state.batches.len())
    };
    let mut operations = Vec::with_capacity(ids.len());
    for id in &ids {
        if let Some(batch) = shared.read_batch(id).await {
            operations.push(operation(&batch));
        }
    }
    let mut answer = json!({ "operations": operations });
    if more {
        answer["nextPageToken"] = json!(format!("p{}", start + size));
    }
    axum::Json(answer).into_response()
}

/// `files/{id}:download`: a generated file in Gemini's line shapes; the responses file of a
/// batch also carries the lines of the emulator's error file (Gemini has no error file).
fn download(shared: &Shared, id: &str) -> Response {
    let mut state = shared.lock();
    state.purge_expired_files();
    let Some(file) = state.file(id) else {
        return no_such_file(id);
    };
    if file.purpose != "batch_output" {
        return google_error(
            StatusCode::BAD_REQUEST,
            "FAILED_PRECONDITION",
            "Only generated files can be downloaded; files created by upload cannot.",
        );
    }
    let mut content = file.content.clone().to_vec();
    let extra = state
        .batches
        .iter()
        .find(|b| b.output_file_id.as_deref() == Some(id))
        .and_then(|b| b.error_file_id.clone())
        .and_then(|error_id| state.file(&error_id).map(|f| f.content.clone()));
    if let Some(extra) = extra {
        content.extend_from_slice(&extra);
    }
    state.counters.downloads += 1;
    drop(state);
    let mut out = Vec::with_capacity(content.len());
    result_lines(&content, &mut out);
    ([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response()
}

/// The metadata key of a creation, as the shared handler counts it.
fn creation_key(metadata: &Map<String, Value>) -> String {
    ["embatch_run_id", "embatch_batch", "embatch_submission"]
        .iter()
        .map(|key| metadata.get(*key).and_then(Value::as_str).unwrap_or("-"))
        .collect::<Vec<_>>()
        .join("/")
}

async fn create_batch(
    shared: &Arc<Shared>,
    kill: &ConnectionKill,
    model: &str,
    body: &[u8],
) -> Response {
    if !model.starts_with("gemini-embedding") {
        return not_found(format!(
            "models/{model} is not found for API version v1beta, or is not supported for asyncBatchEmbedContent."
        ));
    }
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(body) else {
        return invalid("the request body must be a JSON object");
    };
    let batch = body.get("batch").unwrap_or(&Value::Null);
    let Some(display_name) = batch["displayName"].as_str().filter(|n| !n.is_empty()) else {
        return invalid("batch.displayName is required");
    };
    let input = &batch["inputConfig"];
    let Some(file_name) = input["fileName"]
        .as_str()
        .or_else(|| input["file_name"].as_str())
    else {
        return invalid(
            "batch.inputConfig.fileName is required (inline requests are not emulated)",
        );
    };
    let file_id = file_name.strip_prefix("files/").unwrap_or(file_name);
    let metadata = display_name_pairs(display_name);
    let mut openai = json!({
        "input_file_id": file_id,
        "endpoint": "/v1/embeddings",
        "completion_window": "24h",
    });
    if !metadata.is_empty() {
        openai["metadata"] = Value::Object(metadata.clone());
    }
    let params = json!({
        "model": model,
        "displayName": display_name,
        "fileName": format!("files/{file_id}"),
    });
    let answer = super::routes::create_batch(
        State(Arc::clone(shared)),
        Extension(kill.clone()),
        Some(Extension(VoyageParams(params))),
        Some(Extension(InputLines(openai_lines))),
        Bytes::from(openai.to_string()),
    )
    .await;
    let response = match answer {
        Ok(response) => response,
        Err(error) => return error.into_response(),
    };
    let Ok(bytes) = axum::body::to_bytes(response.into_body(), MAX_JSON_BYTES).await else {
        return google_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "Internal error",
        );
    };
    let created: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let id = created["id"].as_str().unwrap_or_default().to_owned();
    // Over the enqueued-token limit (or a `token_limit_failures` fault): Gemini refuses the
    // creation itself, so the batch the shared handler made is taken back.
    let refused = {
        let mut state = shared.lock();
        let refused = state
            .batches
            .iter()
            .position(|b| b.id == id && b.faults.token_limit_exceeded);
        if let Some(index) = refused {
            state.batches.remove(index);
            state.counters.batch_creations = state.counters.batch_creations.saturating_sub(1);
            let key = creation_key(&metadata);
            if let Some(n) = state.counters.creations_by_metadata.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    state.counters.creations_by_metadata.remove(&key);
                }
            }
        }
        refused.is_some()
    };
    if refused {
        return google_error(
            StatusCode::TOO_MANY_REQUESTS,
            "RESOURCE_EXHAUSTED",
            format!(
                "Enqueued token limit exceeded for model {model}: wait for running batch jobs to finish."
            ),
        );
    }
    axum::Json(operation(&created)).into_response()
}

/// `batchEmbedContents` (`single`: `embedContent`), run as one OpenAI `/v1/embeddings` call.
async fn embed(shared: &Arc<Shared>, model: &str, body: &[u8], single: bool) -> Response {
    if !model.starts_with("gemini-embedding") {
        return not_found(format!(
            "models/{model} is not found for API version v1beta, or is not supported for embedContent."
        ));
    }
    let Ok(body) = serde_json::from_slice::<Value>(body) else {
        return invalid("the request body must be a JSON object");
    };
    let requests: Vec<Value> = if single {
        vec![body]
    } else {
        match body.get("requests").and_then(Value::as_array) {
            Some(requests) if !requests.is_empty() => requests.clone(),
            _ => return invalid("requests must be a non-empty list"),
        }
    };
    if requests.len() > MAX_REALTIME_REQUESTS {
        return invalid(format!(
            "at most {MAX_REALTIME_REQUESTS} requests can be in one batch, got {}",
            requests.len()
        ));
    }
    let wanted = format!("models/{model}");
    let mut texts = Vec::with_capacity(requests.len());
    let mut dims: Option<u64> = None;
    for request in &requests {
        if !single
            && let Some(model) = request["model"].as_str()
            && model != wanted
        {
            return invalid(format!(
                "the model of each request must be the call's: {model} is not {wanted}"
            ));
        }
        let text: String = request
            .pointer("/content/parts")
            .and_then(Value::as_array)
            .map(|parts| parts.iter().filter_map(|p| p["text"].as_str()).collect())
            .unwrap_or_default();
        let size = request["outputDimensionality"]
            .as_u64()
            .unwrap_or(NATIVE_DIMENSIONS);
        if !(128..=NATIVE_DIMENSIONS).contains(&size) {
            return invalid("outputDimensionality must be between 128 and 3072");
        }
        if dims.is_some_and(|d| d != size) {
            return invalid("the emulator runs one outputDimensionality per call");
        }
        dims = Some(size);
        texts.push(text);
    }
    let openai = json!({"model": RUN_AS_MODEL, "input": texts, "dimensions": dims});
    let answer = super::routes::create_embeddings(
        State(Arc::clone(shared)),
        Bytes::from(openai.to_string()),
    )
    .await;
    let response = match answer {
        Ok(response) => response,
        Err(error) => return error.into_response(),
    };
    let Ok(bytes) = axum::body::to_bytes(response.into_body(), usize::MAX).await else {
        return google_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "Internal error",
        );
    };
    let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let mut data: Vec<&Value> = value["data"]
        .as_array()
        .map(|d| d.iter().collect())
        .unwrap_or_default();
    data.sort_by_key(|item| item["index"].as_u64().unwrap_or(0));
    let embeddings: Vec<Value> = data
        .iter()
        .map(|item| json!({"values": as_gemini_values(&item["embedding"])}))
        .collect();
    let answer = if single {
        json!({"embedding": embeddings.first().cloned().unwrap_or(Value::Null)})
    } else {
        json!({ "embeddings": embeddings })
    };
    axum::Json(answer).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_translate_both_ways() {
        let input = br#"{"key":"a","request":{"content":{"parts":[{"text":"x"}]},"taskType":"RETRIEVAL_DOCUMENT","outputDimensionality":768}}
not json
"#;
        let lines = openai_lines(input);
        let first: Value =
            serde_json::from_slice(lines.split(|b| *b == b'\n').next().unwrap()).unwrap();
        assert_eq!(first["custom_id"], "a");
        assert_eq!(
            first["body"],
            json!({"model": RUN_AS_MODEL, "input": "x", "dimensions": 768})
        );
        assert!(lines.ends_with(b"not json\n"));

        let output = br#"{"id":"r","custom_id":"a","response":{"status_code":200,"body":{"data":[{"embedding":[0.6,0.8]}],"usage":{"total_tokens":3}}},"error":null}
{"id":"r","custom_id":"b","response":{"status_code":500,"body":{"error":{"message":"boom"}}},"error":null}
{"id":"r","custom_id":"c","response":null,"error":{"code":"batch_expired","message":"late"}}
"#;
        let mut out = Vec::new();
        result_lines(output, &mut out);
        let lines: Vec<Value> = out
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        // Fewer than 3,072 dimensions: scaled off unit length.
        let values: Vec<f64> = lines[0]["response"]["embedding"]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!((values[0] - 1.8).abs() < 1e-6 && (values[1] - 2.4).abs() < 1e-6);
        assert_eq!(lines[0]["response"]["tokenCount"], "3");
        assert_eq!(
            lines[1],
            json!({"key": "b", "error": {"code": 13, "message": "boom", "status": "INTERNAL"}})
        );
        assert_eq!(lines[2]["error"]["status"], "DEADLINE_EXCEEDED");
    }

    #[test]
    fn sessions_and_display_names_round_trip() {
        let session = encode_session("eb-1", "embatch-x.jsonl", Some(12));
        assert_eq!(
            decode_session(&session),
            Some(("eb-1".into(), "embatch-x.jsonl".into(), Some(12)))
        );
        let pairs = display_name_pairs("embatch a=1 b=x%20y%3Dz");
        assert_eq!(pairs["b"], "x y=z");
        assert!(display_name_pairs("someone else's").is_empty());
        assert!(valid_file_id("eb-0123abc"));
        assert!(!valid_file_id("EB_1"));
    }
}
