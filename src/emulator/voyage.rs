//! The emulator speaking Voyage AI's Batch API (`EmulatorConfig::api` = Voyage, or
//! `embatch emulator --provider voyage`), following docs.voyageai.com ("Batch inference" and
//! the API reference): the same routes as OpenAI's (`/v1/files`, `/v1/batches`,
//! `/v1/embeddings`) with Voyage's shapes. A translation layer over the OpenAI emulator, so the
//! lifecycle, the output generation and every fault mode are the same (but for a creation over
//! a queue limit, which Voyage refuses with a 429 rather than failing the batch):
//! - requests: a batch creation takes `completion_window: "12h"` and `request_params` (model,
//!   `input_type`, `output_dimension`), and its input lines `{"custom_id", "body": {"input":
//!   [...]}}` are run as OpenAI lines of that model and size; an `/embeddings` body takes
//!   `output_dimension` and `input_type` and at most 1,000 inputs;
//! - answers: timestamps as RFC 3339 strings, files with a fixed 30-day life and purposes
//!   `batch-output`/`batch-error`, batches with `request_params` and
//!   `expected_completion_at` and no `expired` status (an expired batch ends `completed`, its
//!   undone requests `batch_expired` lines of the error file), errors as `{"detail": "…"}`;
//! - result lines `{"batch_id", "custom_id", "response": {"status_code", "body"}, "error"}`,
//!   error lines `{"response": {"status_code", "message"}}` or `{"response": null, "error":
//!   {"code", "message"}}`.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// Voyage's completion window, in seconds ("Currently only `12h` is supported").
const WINDOW_SECS: i64 = 12 * 3600;
/// Voyage's default output size.
const DEFAULT_DIMENSIONS: u64 = 1024;
/// The inputs of one `/v1/embeddings` request.
const MAX_INPUTS_PER_REQUEST: usize = 1000;
/// The largest body translated (an upload is never translated: it is multipart).
const MAX_JSON_BYTES: usize = 64 * 1024 * 1024;

/// Whose API the emulator speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Api {
    /// OpenAI's Files, Batches and Embeddings.
    #[default]
    Openai,
    /// Voyage AI's Batch API: the same routes, Voyage's shapes (the `voyage` module).
    Voyage,
    /// The Gemini API's batch mode: its own routes under `/v1beta` and `/upload/v1beta`, served
    /// over the same files and batches (the `gemini` module).
    Gemini,
}

/// A batch creation's `request_params`, handed from the translation layer to the handler.
#[derive(Clone, Debug)]
pub(crate) struct VoyageParams(pub Value);

fn detail(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"detail": message.into()}))).into_response()
}

/// The translation layer: a no-op unless the emulator speaks Voyage.
pub(crate) async fn translate(State(api): State<Api>, request: Request, next: Next) -> Response {
    if api != Api::Voyage {
        return next.run(request).await;
    }
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let request = if method == Method::POST && (path == "/v1/batches" || path == "/v1/embeddings") {
        let (parts, body) = request.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_JSON_BYTES).await else {
            return detail(StatusCode::BAD_REQUEST, "the request body is unreadable");
        };
        let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&bytes) else {
            return detail(
                StatusCode::BAD_REQUEST,
                "the request body must be a JSON object",
            );
        };
        let mut parts = parts;
        let translated = if path == "/v1/batches" {
            match batch_request(body) {
                Ok((body, params)) => {
                    parts.extensions.insert(VoyageParams(params));
                    body
                }
                Err(message) => return detail(StatusCode::BAD_REQUEST, message),
            }
        } else {
            match embeddings_request(body) {
                Ok(body) => body,
                Err(message) => return detail(StatusCode::BAD_REQUEST, message),
            }
        };
        parts.headers.remove(header::CONTENT_LENGTH);
        Request::from_parts(parts, Body::from(translated.to_string()))
    } else {
        request
    };
    let response = next.run(request).await;
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return detail(StatusCode::INTERNAL_SERVER_ERROR, "internal server error");
    };
    let Ok(value) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let translated = if parts.status.is_success() {
        answer(value)
    } else {
        let message = value["error"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| value.to_string());
        json!({"detail": message})
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(translated.to_string()))
}

/// A Voyage batch creation as the OpenAI handler takes it, and its `request_params`.
fn batch_request(body: Map<String, Value>) -> Result<(Value, Value), String> {
    if body.get("endpoint").and_then(Value::as_str) != Some("/v1/embeddings") {
        return Err("'endpoint' must be '/v1/embeddings'".into());
    }
    if body.get("completion_window").and_then(Value::as_str) != Some("12h") {
        return Err(
            "'completion_window' must be '12h' (currently the only supported window)".into(),
        );
    }
    let Some(params) = body.get("request_params").filter(|p| p.is_object()) else {
        return Err("'request_params' is required".into());
    };
    if !params.get("model").is_some_and(Value::is_string) {
        return Err("'request_params.model' is required".into());
    }
    if let Some(dims) = params.get("output_dimension").filter(|d| !d.is_null())
        && !matches!(dims.as_u64(), Some(256 | 512 | 1024 | 2048))
    {
        return Err("'output_dimension' must be one of 256, 512, 1024, 2048".into());
    }
    let mut translated = json!({
        "endpoint": "/v1/embeddings",
        "completion_window": "24h",
        "input_file_id": body.get("input_file_id").cloned().unwrap_or(Value::Null),
    });
    if let Some(metadata) = body.get("metadata") {
        translated["metadata"] = metadata.clone();
    }
    Ok((translated, params.clone()))
}

/// A Voyage `/v1/embeddings` body as the OpenAI executor takes it.
fn embeddings_request(body: Map<String, Value>) -> Result<Value, String> {
    let n_inputs = match body.get("input") {
        Some(Value::Array(items)) => items.len(),
        _ => 1,
    };
    if n_inputs > MAX_INPUTS_PER_REQUEST {
        return Err(format!(
            "The batch size limit is {MAX_INPUTS_PER_REQUEST}. Your batch size is {n_inputs}."
        ));
    }
    // Voyage's `encoding_format` is null (floats) or `base64`; OpenAI's `float` is not one.
    match body.get("encoding_format") {
        None | Some(Value::Null) => {}
        Some(Value::String(format)) if format == "base64" => {}
        Some(_) => return Err("'encoding_format' must be null or 'base64'".into()),
    }
    let dims = match body.get("output_dimension") {
        None | Some(Value::Null) => DEFAULT_DIMENSIONS,
        Some(value) => match value.as_u64() {
            Some(d @ (256 | 512 | 1024 | 2048)) => d,
            _ => return Err("'output_dimension' must be one of 256, 512, 1024, 2048".into()),
        },
    };
    Ok(json!({
        "model": body.get("model").cloned().unwrap_or(Value::Null),
        "input": body.get("input").cloned().unwrap_or(Value::Null),
        "dimensions": dims,
    }))
}

/// The input file of a Voyage batch as OpenAI lines of the batch's model and size. A line
/// that does not parse is kept as it is, for validation to refuse.
pub(crate) fn openai_lines(input: &[u8], params: &Value) -> Bytes {
    let dims = params
        .get("output_dimension")
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_DIMENSIONS);
    let mut out = Vec::with_capacity(input.len() + input.len() / 2);
    for line in input.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<Value>(line) {
            Ok(value) if value.get("body").is_some_and(Value::is_object) => {
                let translated = json!({
                    "custom_id": value.get("custom_id").cloned().unwrap_or(Value::Null),
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {
                        "model": params["model"],
                        "input": value["body"].get("input").cloned().unwrap_or(Value::Null),
                        "dimensions": dims,
                    },
                });
                out.extend_from_slice(translated.to_string().as_bytes());
            }
            _ => out.extend_from_slice(line),
        }
        out.push(b'\n');
    }
    Bytes::from(out)
}

/// A batch's result or error file in Voyage's line shapes.
pub(crate) fn result_lines(content: &[u8], batch_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len());
    for line in content.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(value) = serde_json::from_slice::<Value>(line) else {
            out.extend_from_slice(line);
            out.push(b'\n');
            continue;
        };
        let response = match value.get("response") {
            Some(response) if response.is_object() => {
                let status = response["status_code"].as_u64().unwrap_or(500);
                if status == 200 {
                    let mut body = response["body"].clone();
                    let tokens = body["usage"]["total_tokens"].clone();
                    body["usage"] = json!({"total_tokens": tokens});
                    json!({"status_code": 200, "body": body})
                } else {
                    let message = response["body"]["error"]["message"]
                        .as_str()
                        .unwrap_or("Internal Server Error")
                        .to_owned();
                    json!({"status_code": status, "message": message})
                }
            }
            _ => Value::Null,
        };
        let translated = json!({
            "batch_id": batch_id,
            "custom_id": value.get("custom_id").cloned().unwrap_or(Value::Null),
            "response": response,
            "error": value.get("error").cloned().unwrap_or(Value::Null),
        });
        out.extend_from_slice(translated.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// Unix seconds as Voyage writes times (`2025-02-11T19:52:02.536100+00:00`).
fn time(value: &Value) -> Value {
    match value
        .as_i64()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
    {
        Some(at) => json!(at.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()),
        None => Value::Null,
    }
}

/// A successful answer in Voyage's shapes.
fn answer(value: Value) -> Value {
    match value.get("object").and_then(Value::as_str) {
        Some("list")
            if value.get("data").is_some_and(|d| {
                d.as_array()
                    .is_some_and(|items| items.iter().all(|i| i["object"] == "embedding"))
                    && value.get("usage").is_some()
            }) =>
        {
            json!({
                "object": "list",
                "data": value["data"],
                "model": value["model"],
                "usage": {"total_tokens": value["usage"]["total_tokens"]},
            })
        }
        Some("list") => {
            let mut value = value;
            if let Some(items) = value.get_mut("data").and_then(Value::as_array_mut) {
                for item in items.iter_mut() {
                    *item = answer(std::mem::take(item));
                }
            }
            value
        }
        Some("file") if value.get("deleted").is_some() => value,
        Some("file") => {
            let purpose = match value["purpose"].as_str() {
                Some("batch_output")
                    if value["filename"]
                        .as_str()
                        .is_some_and(|f| f.ends_with("_error.jsonl")) =>
                {
                    "batch-error"
                }
                Some("batch_output") => "batch-output",
                Some(other) => other,
                None => "batch",
            };
            json!({
                "id": value["id"],
                "object": "file",
                "bytes": value["bytes"],
                "created_at": time(&value["created_at"]),
                "expires_at": time(&value["expires_at"]),
                "filename": value["filename"],
                "purpose": purpose,
            })
        }
        Some("batch") => {
            let status = match value["status"].as_str() {
                // Voyage has no `expired`: a batch whose window ended completes with what was
                // done, the rest `batch_expired` lines of its error file.
                Some("expired") => "completed",
                Some(other) => other,
                None => "validating",
            };
            let mut batch = json!({
                "id": value["id"],
                "object": "batch",
                "endpoint": value["endpoint"],
                "errors": value["errors"],
                "input_file_id": value["input_file_id"],
                "completion_window": "12h",
                "status": status,
                "output_file_id": value["output_file_id"],
                "error_file_id": value["error_file_id"],
                "expected_completion_at": value["created_at"]
                    .as_i64()
                    .map(|c| time(&json!(c + WINDOW_SECS)))
                    .unwrap_or(Value::Null),
                "request_counts": value["request_counts"],
                "metadata": value["metadata"],
                "request_params": value.get("request_params").cloned().unwrap_or(Value::Null),
            });
            for key in [
                "created_at",
                "in_progress_at",
                "finalizing_at",
                "completed_at",
                "failed_at",
                "cancelling_at",
                "cancelled_at",
            ] {
                batch[key] = time(&value[key]);
            }
            if status == "completed" && batch["completed_at"].is_null() {
                batch["completed_at"] = time(&value["expired_at"]);
            }
            batch
        }
        _ => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_translate_both_ways() {
        let input = b"{\"custom_id\":\"a\",\"body\":{\"input\":[\"x\"]}}\nnot json\n";
        let params = json!({"model": "voyage-3.5", "output_dimension": 512});
        let lines = openai_lines(input, &params);
        let first: Value =
            serde_json::from_slice(lines.split(|b| *b == b'\n').next().unwrap()).unwrap();
        assert_eq!(
            first["body"],
            json!({"model": "voyage-3.5", "input": ["x"], "dimensions": 512})
        );
        assert!(lines.ends_with(b"not json\n"));

        let output = br#"{"id":"r","custom_id":"a","response":{"status_code":500,"request_id":"q","body":{"error":{"message":"boom"}}},"error":null}"#;
        let line: Value =
            serde_json::from_slice(result_lines(output, "batch_1").trim_ascii_end()).unwrap();
        assert_eq!(
            line,
            json!({"batch_id": "batch_1", "custom_id": "a", "response": {"status_code": 500, "message": "boom"}, "error": null})
        );
    }

    #[test]
    fn an_expired_batch_completes_with_string_times() {
        let batch = answer(json!({
            "object": "batch", "id": "b", "status": "expired", "created_at": 1_700_000_000,
            "expired_at": 1_700_000_100, "request_counts": {"total": 2, "completed": 1, "failed": 1},
        }));
        assert_eq!(batch["status"], "completed");
        assert_eq!(batch["created_at"], "2023-11-14T22:13:20.000000+00:00");
        assert_eq!(
            batch["expected_completion_at"],
            "2023-11-15T10:13:20.000000+00:00"
        );
        assert_eq!(batch["completed_at"], "2023-11-14T22:15:00.000000+00:00");
        assert_eq!(batch["completion_window"], "12h");
    }
}
