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
    /// Gemini's name for the request's id (its lines have no `custom_id`).
    #[serde(borrow)]
    key: Option<&'a RawValue>,
    #[serde(borrow)]
    response: Option<&'a RawValue>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
}

/// Gemini's `response`: `{"embedding": {"values": [...]}, "tokenCount": "12"}`.
#[derive(Deserialize)]
struct GeminiResponse<'a> {
    #[serde(borrow)]
    embedding: Option<GeminiEmbedding<'a>>,
}

#[derive(Deserialize)]
struct GeminiEmbedding<'a> {
    #[serde(borrow)]
    values: Option<&'a RawValue>,
}

/// Gemini's `error`, a `google.rpc.Status`: `{"code", "message", "status"}`.
#[derive(Deserialize)]
struct GeminiError {
    code: Option<serde_json::Value>,
    message: Option<String>,
    status: Option<String>,
}

#[derive(Deserialize)]
struct Response<'a> {
    status_code: Option<u16>,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
    /// Voyage's error lines say why beside the status, without a body:
    /// `{"status_code": 500, "message": "Internal Server Error"}`.
    message: Option<String>,
}

#[derive(Deserialize)]
struct ErrorObject {
    code: Option<String>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: Option<ErrorObject>,
    /// Voyage's error body: `{"detail": "…"}`.
    detail: Option<String>,
}

#[derive(Deserialize)]
struct EmbeddingBody<'a> {
    #[serde(borrow)]
    data: Vec<EmbeddingItem<'a>>,
}

#[derive(Deserialize)]
struct EmbeddingItem<'a> {
    /// Which input of the request this is; one request carries one input, so 0 (a lone item
    /// without it is taken as 0).
    index: Option<u64>,
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
///
/// The embedding is most of a line (1536 floats are ~18 KB, as base64 ~8 KB), and a general
/// JSON parser walks it several times (the line, then the body, then the numbers). So the
/// first `"embedding":` value is decoded here in one pass, and serde sees the line with that
/// value replaced by a short marker string: the rest of the line (status, custom_id, shape) is
/// checked exactly as before, and the decoded vector is used only if serde finds the marker
/// where the embedding belongs. Whatever the fast pass cannot decode goes the general way.
pub fn parse_line(line: &str, dimensions: usize) -> LineOutcome {
    if let Some((start, end, vector)) = fast_embedding(line, dimensions)
        && let (Some(before), Some(after)) = (line.get(..start), line.get(end..))
    {
        let mut skeleton = String::with_capacity(before.len() + MARKER.len() + after.len());
        skeleton.push_str(before);
        skeleton.push_str(MARKER);
        skeleton.push_str(after);
        return parse_with(&skeleton, dimensions, Some(vector));
    }
    parse_with(line, dimensions, None)
}

/// Stands in for an embedding decoded by [`fast_embedding`]: a JSON string no provider sends
/// (and that is not base64, so the fast pass never produced it from a real value).
const MARKER: &str = r#""\u0000embatch-decoded""#;

/// Finds the first `"embedding":` value of a line and decodes it when it is a plain array of
/// JSON numbers or a base64 string without escapes. Returns the value's byte range and the
/// vector; `None` sends the line the general way.
fn fast_embedding(line: &str, dimensions: usize) -> Option<(usize, usize, Vec<f32>)> {
    const KEY: &str = "\"embedding\":";
    let bytes = line.as_bytes();
    let mut start = line.find(KEY)? + KEY.len();
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = bytes.get(start) {
        start += 1;
    }
    match bytes.get(start)? {
        b'[' => {
            let (vector, end) = parse_number_array(bytes, start, dimensions)?;
            Some((start, end, vector))
        }
        b'"' => {
            let len = bytes.get(start + 1..)?.iter().position(|&b| b == b'"')?;
            let text = line.get(start + 1..start + 1 + len)?;
            if text.contains('\\') {
                return None;
            }
            Some((start, start + len + 2, decode_base64(text)?))
        }
        _ => None,
    }
}

fn parse_with(line: &str, dimensions: usize, decoded: Option<Vec<f32>>) -> LineOutcome {
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
    if parsed.custom_id.is_none()
        && let Some(key) = parsed.key
    {
        return parse_gemini(key, parsed.response, parsed.error, dimensions);
    }
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
    let response = match parsed.response.filter(|raw| raw.get() != "null") {
        None => None,
        Some(raw) => match serde_json::from_str::<Response>(raw.get()) {
            Ok(response) => Some(response),
            // As when the whole line was one value: the line does not parse.
            Err(err) => {
                return fail(
                    None,
                    FailReason::BadOutput,
                    format!("unparseable line: {err}"),
                );
            }
        },
    };
    let error = match parsed.error.filter(|raw| raw.get() != "null") {
        None => None,
        Some(raw) => match serde_json::from_str::<ErrorObject>(raw.get()) {
            Ok(error) => Some(error),
            Err(err) => {
                return fail(
                    None,
                    FailReason::BadOutput,
                    format!("unparseable line: {err}"),
                );
            }
        },
    };
    let Some(response) = response else {
        // No response at all: the provider never ran the request.
        let (code, message) = error
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
        let parsed = serde_json::from_str::<ErrorBody>(body).ok();
        let detail = parsed.as_ref().and_then(|b| b.detail.clone());
        let message = parsed
            .and_then(|b| b.error)
            .map(|e| {
                format!(
                    "{}: {}",
                    e.code.unwrap_or_default(),
                    e.message.unwrap_or_default()
                )
            })
            .or(detail)
            .or(response.message)
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
    // One request carries one input: its embedding is the item with index 0, and a response
    // with none, or with several, does not say which vector is this chunk's.
    let mut items = body
        .data
        .into_iter()
        .filter(|item| item.index.unwrap_or(0) == 0);
    let (Some(item), None) = (items.next(), items.next()) else {
        return fail(
            id,
            FailReason::BadOutput,
            "response without exactly one embedding of index 0",
        );
    };
    let raw = item.embedding.get();
    let vector = if let Some(vector) = decoded.filter(|_| raw == MARKER) {
        vector
    } else if raw.starts_with('"') {
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
    checked(custom_id, vector, dimensions)
}

/// The checks every vector passes: its size, finite values, not all zeros.
fn checked(custom_id: String, vector: Vec<f32>, dimensions: usize) -> LineOutcome {
    let id = Some(custom_id.clone());
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
    // No embedding model returns the zero vector (it has no direction): a provider fault.
    if vector.iter().all(|&v| v == 0.0) {
        return fail(id, FailReason::BadOutput, "the embedding is all zeros");
    }
    LineOutcome::Vector { custom_id, vector }
}

/// A line of a Gemini batch's responses file: `{"key", "response": {"embedding": {"values"},
/// "tokenCount"}}` or `{"key", "error": {"code", "message", "status"}}`; a line with neither
/// is an error line. Gemini normalises only its 3,072-dimensional vectors (Embeddings guide),
/// so every vector is scaled to length 1 here: a stored vector has norm 1 whatever its size.
fn parse_gemini(
    key: &RawValue,
    response: Option<&RawValue>,
    error: Option<&RawValue>,
    dimensions: usize,
) -> LineOutcome {
    let Ok(custom_id) = serde_json::from_str::<String>(key.get()) else {
        return fail(None, FailReason::BadOutput, "line without a string key");
    };
    let id = Some(custom_id.clone());
    let response = response.filter(|raw| raw.get() != "null");
    let error = error.filter(|raw| raw.get() != "null");
    if let Some(raw) = error {
        let Ok(error) = serde_json::from_str::<GeminiError>(raw.get()) else {
            return fail(id, FailReason::BadOutput, "an error that is not a Status");
        };
        let code = error.code.as_ref().and_then(serde_json::Value::as_i64);
        let word = error.status.as_deref().unwrap_or_default();
        let reason = match (word, code) {
            ("DEADLINE_EXCEEDED", _) | (_, Some(4)) => FailReason::Expired,
            ("CANCELLED", _) | (_, Some(1)) => FailReason::Cancelled,
            ("RESOURCE_EXHAUSTED", _) | (_, Some(8 | 429)) => FailReason::RateLimited,
            (
                "INVALID_ARGUMENT"
                | "FAILED_PRECONDITION"
                | "OUT_OF_RANGE"
                | "NOT_FOUND"
                | "PERMISSION_DENIED"
                | "UNAUTHENTICATED",
                _,
            )
            | (_, Some(3 | 5 | 7 | 9 | 11 | 16 | 400..=428 | 430..=499)) => {
                FailReason::InvalidRequest
            }
            _ => FailReason::ServerError,
        };
        let code = error.code.map(|c| c.to_string()).unwrap_or_default();
        return fail(
            id,
            reason,
            format!("{word} ({code}): {}", error.message.unwrap_or_default()),
        );
    }
    let Some(raw) = response else {
        return fail(
            id,
            FailReason::ServerError,
            "line without response or error",
        );
    };
    let values = match serde_json::from_str::<GeminiResponse>(raw.get()) {
        Ok(GeminiResponse {
            embedding: Some(GeminiEmbedding {
                values: Some(values),
            }),
        }) => values,
        Ok(_) => {
            return fail(
                id,
                FailReason::BadOutput,
                "response without embedding.values",
            );
        }
        Err(err) => return fail(id, FailReason::BadOutput, format!("bad response: {err}")),
    };
    let Some(mut vector) = parse_float_array(values.get()) else {
        return fail(
            id,
            FailReason::BadOutput,
            "embedding values are not an array of numbers",
        );
    };
    if vector.iter().all(|v| v.is_finite()) {
        normalize(&mut vector);
    }
    checked(custom_id, vector, dimensions)
}

/// `values` scaled to length 1: Gemini normalises only its 3,072-dimensional vectors, a
/// smaller one is a truncation of it ("you need to normalize", Embeddings guide). A zero or
/// non-finite vector is left as it is, for the checks that refuse it.
pub fn normalize(values: &mut [f32]) {
    let norm = values
        .iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt();
    if norm.is_finite() && norm > 0.0 {
        for v in values.iter_mut() {
            *v = (f64::from(*v) / norm) as f32;
        }
    }
}

/// Parses one line as read from a file (without its newline). A line that is not valid UTF-8
/// is `bad_output`, never passed over: its custom_id is still read when the broken bytes are
/// elsewhere in the line, so that its chunk is retried by name.
pub fn parse_line_bytes(line: &[u8], dimensions: usize) -> LineOutcome {
    match std::str::from_utf8(line) {
        Ok(text) => parse_line(text, dimensions),
        Err(err) => {
            // The line is not JSON any more, but its `"custom_id": "…"` may be intact.
            const KEY: &str = "\"custom_id\"";
            let lossy = String::from_utf8_lossy(line);
            let custom_id = lossy
                .find(KEY)
                .and_then(|at| lossy.get(at + KEY.len()..))
                .and_then(|rest| rest.trim_start().strip_prefix(':'))
                .and_then(|value| {
                    serde_json::Deserializer::from_str(value)
                        .into_iter::<String>()
                        .next()?
                        .ok()
                })
                .filter(|id| !id.contains(char::REPLACEMENT_CHARACTER));
            fail(
                custom_id,
                FailReason::BadOutput,
                format!("line is not valid UTF-8 ({err})"),
            )
        }
    }
}

/// A JSON array of numbers (the whole of `raw`), each read into the nearest f32.
fn parse_float_array(raw: &str) -> Option<Vec<f32>> {
    let bytes = raw.trim().as_bytes();
    match parse_number_array(bytes, 0, 0)? {
        (vector, end) if end == bytes.len() => Some(vector),
        _ => None,
    }
}

/// Parses the JSON array of numbers that starts at `bytes[start]` (a `[`); returns the values
/// and the index just past the closing `]`. `None` for anything else (strings, nesting,
/// numbers JSON does not allow such as `NaN`, `inf`, `+1`, `01` or `.5`).
fn parse_number_array(bytes: &[u8], start: usize, capacity: usize) -> Option<(Vec<f32>, usize)> {
    if bytes.get(start) != Some(&b'[') {
        return None;
    }
    let mut i = start + 1;
    let mut values = Vec::with_capacity(capacity);
    skip_whitespace(bytes, &mut i);
    if bytes.get(i) == Some(&b']') {
        return Some((values, i + 1));
    }
    loop {
        skip_whitespace(bytes, &mut i);
        let (value, next) = parse_number(bytes, i)?;
        values.push(value);
        i = next;
        skip_whitespace(bytes, &mut i);
        match bytes.get(i)? {
            b',' => i += 1,
            b']' => return Some((values, i + 1)),
            _ => return None,
        }
    }
}

fn skip_whitespace(bytes: &[u8], i: &mut usize) {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = bytes.get(*i) {
        *i += 1;
    }
}

/// Exact powers of ten as f64 (10^22 is the largest that f64 holds exactly).
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// One JSON number starting at `bytes[start]`, read into the nearest f32; returns it and the
/// index just past it.
///
/// Correctly rounded, like std's parser (which it falls back to): when the decimal mantissa
/// has at most 15 digits and the power of ten is at most 22, `mantissa ×/÷ 10^k` is one
/// correctly rounded f64 operation (Clinger's fast path). Rounding that f64 to f32 can differ
/// from rounding the exact value only when the f64 lands exactly halfway between two f32s
/// (any other f32 halfway point lies strictly between the exact value and its nearest f64,
/// which is impossible); that case, subnormals and long mantissas go to std's parser.
fn parse_number(bytes: &[u8], start: usize) -> Option<(f32, usize)> {
    let digit = |i: usize| bytes.get(i).copied().filter(u8::is_ascii_digit);
    let mut i = start;
    let negative = bytes.get(i) == Some(&b'-');
    if negative {
        i += 1;
    }
    let mut mantissa: u64 = 0;
    let mut n_digits = 0u32;
    let mut exponent: i64 = 0;
    // Integer part: 0, or a non-zero digit and more digits.
    match digit(i)? {
        b'0' => i += 1,
        _ => {
            while let Some(d) = digit(i) {
                if n_digits < 19 {
                    mantissa = mantissa * 10 + u64::from(d - b'0');
                    n_digits += 1;
                } else {
                    exponent += 1;
                    n_digits += 1;
                }
                i += 1;
            }
        }
    }
    if bytes.get(i) == Some(&b'.') {
        i += 1;
        digit(i)?;
        while let Some(d) = digit(i) {
            if n_digits < 19 {
                mantissa = mantissa * 10 + u64::from(d - b'0');
                exponent -= 1;
                if mantissa > 0 {
                    n_digits += 1;
                }
            } else {
                n_digits += 1;
            }
            i += 1;
        }
    }
    if let Some(b'e' | b'E') = bytes.get(i) {
        i += 1;
        let negative_exponent = bytes.get(i) == Some(&b'-');
        if let Some(b'+' | b'-') = bytes.get(i) {
            i += 1;
        }
        digit(i)?;
        let mut e: i64 = 0;
        while let Some(d) = digit(i) {
            e = (e * 10 + i64::from(d - b'0')).min(100_000);
            i += 1;
        }
        exponent += if negative_exponent { -e } else { e };
    }
    if n_digits <= 15 && exponent.abs() <= 22 {
        let power = POW10[exponent.unsigned_abs() as usize];
        let magnitude = if exponent >= 0 {
            mantissa as f64 * power
        } else {
            mantissa as f64 / power
        };
        let halfway = magnitude.to_bits() & ((1 << 29) - 1) == 1 << 28;
        let subnormal = magnitude != 0.0 && magnitude < f64::from(f32::MIN_POSITIVE);
        if !halfway && !subnormal {
            let value = magnitude as f32;
            return Some((if negative { -value } else { value }, i));
        }
    }
    let text = std::str::from_utf8(bytes.get(start..i)?).ok()?;
    Some((text.parse::<f32>().ok()?, i))
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
mod tests;
