//! Parsing one line of a batch's output or error file (DESIGN.md §5, §7).
//!
//! Pure and allocation-light: a line becomes a vector for its custom_id or a failure with
//! the reason of `failed_chunk_ids.tsv`. It does not know which ids belong to the batch, nor
//! write anything (the ingest step does). Never panics, whatever the line holds.

use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Why a request did not produce a usable vector (the `reason` column of
/// `failed_chunk_ids.tsv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailReason {
    Expired,
    RateLimited,
    ServerError,
    RequestTimeout,
    BadOutput,
    Stale,
    InvalidRequest,
    Cancelled,
    Deleted,
    AttemptsExhausted,
}

impl FailReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::Expired => "expired",
            FailReason::RateLimited => "rate_limited",
            FailReason::ServerError => "server_error",
            FailReason::RequestTimeout => "request_timeout",
            FailReason::BadOutput => "bad_output",
            FailReason::Stale => "stale",
            FailReason::InvalidRequest => "invalid_request",
            FailReason::Cancelled => "cancelled",
            FailReason::Deleted => "deleted",
            FailReason::AttemptsExhausted => "attempts_exhausted",
        }
    }

    /// The `retried` column of DESIGN.md §5's table.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            FailReason::Expired
                | FailReason::RateLimited
                | FailReason::ServerError
                | FailReason::RequestTimeout
                | FailReason::BadOutput
                | FailReason::Stale
        )
    }
}

/// What one line says.
#[derive(Debug, Clone, PartialEq)]
pub enum LineOutcome {
    Vector {
        custom_id: String,
        vector: Vec<f32>,
    },
    Failed {
        /// `None` when the line is too broken to name its request.
        custom_id: Option<String>,
        reason: FailReason,
        detail: String,
    },
}

#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    custom_id: Option<&'a RawValue>,
    response: Option<Response<'a>>,
    error: Option<ErrorObject>,
}

#[derive(Deserialize)]
struct Response<'a> {
    status_code: Option<u16>,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ErrorObject {
    code: Option<String>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: Option<ErrorObject>,
}

#[derive(Deserialize)]
struct EmbeddingBody<'a> {
    #[serde(borrow)]
    data: Vec<EmbeddingItem<'a>>,
}

#[derive(Deserialize)]
struct EmbeddingItem<'a> {
    /// A JSON array of numbers, or a base64 string: read raw and decoded below.
    #[serde(borrow)]
    embedding: &'a RawValue,
}

fn fail(custom_id: Option<String>, reason: FailReason, detail: impl Into<String>) -> LineOutcome {
    LineOutcome::Failed {
        custom_id,
        reason,
        detail: detail.into(),
    }
}

/// Parses one line (without its newline) of an output or error file, expecting vectors of
/// `dimensions` values.
pub fn parse_line(line: &str, dimensions: usize) -> LineOutcome {
    let parsed: Line = match serde_json::from_str(line) {
        Ok(parsed) => parsed,
        Err(err) => {
            return fail(
                None,
                FailReason::BadOutput,
                format!("unparseable line: {err}"),
            );
        }
    };
    let custom_id = match parsed
        .custom_id
        .map(|raw| serde_json::from_str::<String>(raw.get()))
    {
        Some(Ok(id)) => id,
        _ => {
            return fail(
                None,
                FailReason::BadOutput,
                "line without a string custom_id",
            );
        }
    };
    let id = Some(custom_id.clone());
    let Some(response) = parsed.response else {
        // No response at all: the provider never ran the request.
        let (code, message) = parsed
            .error
            .map(|e| (e.code.unwrap_or_default(), e.message.unwrap_or_default()))
            .unwrap_or_default();
        let reason = match code.as_str() {
            "batch_expired" => FailReason::Expired,
            "batch_cancelled" => FailReason::Cancelled,
            "request_timeout" => FailReason::RequestTimeout,
            "rate_limit_exceeded" => FailReason::RateLimited,
            _ => FailReason::ServerError,
        };
        return fail(id, reason, format!("{code}: {message}"));
    };
    let status = response.status_code.unwrap_or(0);
    let body = response.body.map(RawValue::get).unwrap_or("null");
    if status != 200 {
        let message = serde_json::from_str::<ErrorBody>(body)
            .ok()
            .and_then(|b| b.error)
            .map(|e| {
                format!(
                    "{}: {}",
                    e.code.unwrap_or_default(),
                    e.message.unwrap_or_default()
                )
            })
            .unwrap_or_default();
        let reason = match status {
            429 => FailReason::RateLimited,
            408 => FailReason::RequestTimeout,
            500..=599 => FailReason::ServerError,
            400..=499 => FailReason::InvalidRequest,
            _ => FailReason::BadOutput,
        };
        return fail(id, reason, format!("HTTP {status} {message}"));
    }
    let body: EmbeddingBody = match serde_json::from_str(body) {
        Ok(body) => body,
        Err(err) => {
            return fail(
                id,
                FailReason::BadOutput,
                format!("bad response body: {err}"),
            );
        }
    };
    let Some(item) = body.data.into_iter().next() else {
        return fail(id, FailReason::BadOutput, "response without an embedding");
    };
    let raw = item.embedding.get();
    let vector = if raw.starts_with('"') {
        let decoded = serde_json::from_str::<&str>(raw)
            .ok()
            .and_then(decode_base64);
        match decoded {
            Some(vector) => vector,
            None => return fail(id, FailReason::BadOutput, "invalid base64 embedding"),
        }
    } else {
        match parse_float_array(raw) {
            Some(vector) => vector,
            None => {
                return fail(
                    id,
                    FailReason::BadOutput,
                    "embedding is not an array of numbers",
                );
            }
        }
    };
    if vector.len() != dimensions {
        return fail(
            id,
            FailReason::BadOutput,
            format!("{} dimensions, expected {dimensions}", vector.len()),
        );
    }
    if vector.iter().any(|v| !v.is_finite()) {
        return fail(
            id,
            FailReason::BadOutput,
            "non-finite value in the embedding",
        );
    }
    LineOutcome::Vector { custom_id, vector }
}

/// A JSON array of numbers, each read straight into the nearest f32 (std's parser is
/// correctly rounded; going through f64 first could round twice and miss by one ulp).
fn parse_float_array(raw: &str) -> Option<Vec<f32>> {
    let inner = raw.strip_prefix('[')?.strip_suffix(']')?.trim();
    if inner.is_empty() {
        return Some(Vec::new());
    }
    inner
        .split(',')
        .map(|n| {
            let n = n.trim();
            // Rust accepts "inf", "NaN" and "+1", JSON does not.
            let json_number = n
                .bytes()
                .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'e' | b'E' | b'+'))
                && !n.starts_with('+');
            if json_number {
                n.parse::<f32>().ok()
            } else {
                None
            }
        })
        .collect()
}

/// Little-endian f32s, base64-encoded (the API's `encoding_format: base64`).
fn decode_base64(text: &str) -> Option<Vec<f32>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    if bytes.len() % 4 != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok_line(id: &str, embedding: &str) -> String {
        format!(
            r#"{{"id":"r1","custom_id":"{id}","response":{{"status_code":200,"request_id":"q","body":{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":{embedding}}}],"model":"m","usage":{{"prompt_tokens":1,"total_tokens":1}}}}}},"error":null}}"#
        )
    }

    #[test]
    fn float_and_base64_vectors_parse_alike() {
        let floats = ok_line("a", "[0.5,-0.25,1e-3]");
        let b64 = base64::engine::general_purpose::STANDARD.encode(
            [0.5f32, -0.25, 1e-3]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        let base64_line = ok_line("a", &format!("\"{b64}\""));
        let want = LineOutcome::Vector {
            custom_id: "a".to_owned(),
            vector: vec![0.5, -0.25, 1e-3],
        };
        assert_eq!(parse_line(&floats, 3), want);
        assert_eq!(parse_line(&base64_line, 3), want);
    }

    #[test]
    fn floats_read_exactly_as_f32() {
        // The shortest forms that read back to these f32s exactly.
        for value in [0.1f32, 1.0e-38, 3.4028235e38, -0.000_123_45, 0.333_333_34] {
            let line = ok_line("a", &format!("[{value}]"));
            assert_eq!(
                parse_line(&line, 1),
                LineOutcome::Vector {
                    custom_id: "a".to_owned(),
                    vector: vec![value]
                }
            );
        }
        assert!(matches!(
            parse_line(&ok_line("a", "[NaN]"), 1),
            LineOutcome::Failed { .. }
        ));
        assert!(matches!(
            parse_line(&ok_line("a", "[1e999]"), 1),
            LineOutcome::Failed { .. }
        ));
    }

    #[test]
    fn wrong_dimension_and_nan_are_bad_output() {
        let short = parse_line(&ok_line("a", "[0.5]"), 3);
        assert!(matches!(
            short,
            LineOutcome::Failed {
                reason: FailReason::BadOutput,
                ..
            }
        ));
        // JSON has no NaN, but a base64 vector can carry one.
        let nan = base64::engine::general_purpose::STANDARD.encode(f32::NAN.to_le_bytes());
        let line = ok_line("a", &format!("\"{nan}\""));
        let out = parse_line(&line, 1);
        assert!(
            matches!(&out, LineOutcome::Failed { reason: FailReason::BadOutput, custom_id: Some(id), .. } if id == "a"),
            "{out:?}"
        );
    }

    #[test]
    fn error_shapes_map_to_reasons() {
        let http = r#"{"id":"r","custom_id":"b","response":{"status_code":429,"request_id":"q","body":{"error":{"message":"slow down","type":"rate_limit","param":null,"code":"rate_limit_exceeded"}}},"error":null}"#;
        let none = r#"{"id":"r","custom_id":"c","response":null,"error":{"code":"batch_expired","message":"expired"}}"#;
        let bad = r#"{"id":"r","custom_id":"d","response":{"status_code":400,"body":{"error":{"message":"too many tokens","code":null}}},"error":null}"#;
        let reason = |line: &str| match parse_line(line, 3) {
            LineOutcome::Failed { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(http), FailReason::RateLimited);
        assert_eq!(reason(none), FailReason::Expired);
        assert_eq!(reason(bad), FailReason::InvalidRequest);
        assert!(!FailReason::InvalidRequest.is_retryable());
        assert!(FailReason::Expired.is_retryable());
        assert_eq!(reason("{truncated"), FailReason::BadOutput);
    }

    proptest! {
        /// No line, however broken or huge, makes the parser panic.
        #[test]
        fn never_panics(line in ".{0,400}", dims in 0usize..8) {
            let _ = parse_line(&line, dims);
        }

        #[test]
        fn never_panics_on_mangled_valid_lines(cut in 0usize..300, junk in "[\\[\\]{}\",:0-9a-z.eE+-]{0,20}") {
            let line = ok_line("x", "[0.1,0.2,0.3]");
            let cut = cut.min(line.len());
            let mangled = format!("{}{}{}", &line[..cut], junk, &line[cut..]);
            let _ = parse_line(&mangled, 3);
        }
    }
}
