//! One embeddings request, executed: the body of `POST /v1/embeddings`, shared by the realtime
//! route and by each line of a batch.
//!
//! It owns the request's checks (model, input shapes, `dimensions`, `encoding_format`, the
//! per-input token limit) and the `CreateEmbeddingResponse` it produces. It knows nothing of
//! HTTP, batches or faults: a rejected request comes back as a [`RequestError`] that the caller
//! turns into a 400 response or a 400 line of an error file.

use base64::Engine as _;
use serde::Serialize;
use serde_json::Value;

use super::vectors;

/// The provider's per-input limit, in tokens, as its error messages state it.
pub(crate) const MAX_TOKENS_PER_INPUT: usize = 8192;
/// The provider's limit on the tokens of all inputs of one request.
const MAX_TOKENS_PER_REQUEST: usize = 300_000;
/// The provider's limit on the number of inputs of one request.
const MAX_INPUTS_PER_REQUEST: usize = 2048;

/// Native output size of a model; unknown models get the size of the small one, which keeps the
/// emulator usable with any model name.
pub(crate) fn native_dimensions(model: &str) -> usize {
    match model {
        "text-embedding-3-large" => 3072,
        _ => 1536,
    }
}

/// Whether a model takes the `dimensions` parameter (only the text-embedding-3 family, and
/// models the emulator does not know, so tests can use made-up names).
fn accepts_dimensions(model: &str) -> bool {
    model != "text-embedding-ada-002"
}

/// A request the provider would refuse, with the fields of the spec's `Error` object.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RequestError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl RequestError {
    pub(crate) fn invalid(message: impl Into<String>, param: Option<&str>) -> RequestError {
        RequestError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_owned),
            code: None,
        }
    }

    /// The `{"error": {...}}` body of the spec's `ErrorResponse`.
    pub(crate) fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorObject {
                message: self.message.clone(),
                kind: self.kind.to_owned(),
                param: self.param.clone(),
                code: self.code.clone(),
            },
        }
    }
}

/// The spec's `ErrorResponse`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ErrorBody {
    pub error: ErrorObject,
}

/// The spec's `Error`: every key always present, `param` and `code` possibly null.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ErrorObject {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// The spec's `CreateEmbeddingResponse`.
#[derive(Debug, Serialize)]
pub(crate) struct EmbeddingResponse {
    pub object: &'static str,
    pub data: Vec<EmbeddingData>,
    pub model: String,
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub(crate) struct EmbeddingData {
    pub object: &'static str,
    pub index: usize,
    pub embedding: EmbeddingValue,
}

/// A vector as the client asked for it. `Float` serializes each `f32` as serde_json prints an
/// f32 (the shortest text that reads back to the same f32), which a conversion to f64 or to
/// `serde_json::Value` would lose.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum EmbeddingValue {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
pub(crate) struct Usage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
}

/// Little-endian f32s, base64 (standard alphabet, padded), as the provider encodes them.
pub(crate) fn encode_base64(vector: &[f32]) -> String {
    let mut raw = Vec::with_capacity(vector.len() * 4);
    for value in vector {
        raw.extend_from_slice(&value.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// Executes one `CreateEmbeddingRequest` body.
pub(crate) fn execute(body: &Value) -> Result<EmbeddingResponse, RequestError> {
    let Some(body) = body.as_object() else {
        return Err(RequestError::invalid(
            "the request body must be a JSON object",
            None,
        ));
    };
    let model = match body.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        Some(_) => {
            return Err(RequestError::invalid(
                "'model' must be a non-empty string",
                Some("model"),
            ));
        }
        None => {
            return Err(RequestError::invalid(
                "you must provide a model parameter",
                Some("model"),
            ));
        }
    };
    let texts = inputs(body.get("input"))?;

    let native = native_dimensions(&model);
    let dims = match body.get("dimensions") {
        None | Some(Value::Null) => native,
        Some(value) => {
            let Some(dims) = value.as_u64().filter(|d| *d >= 1) else {
                return Err(RequestError::invalid(
                    "'dimensions' must be an integer of at least 1",
                    Some("dimensions"),
                ));
            };
            if !accepts_dimensions(&model) {
                return Err(RequestError::invalid(
                    "This model does not support specifying dimensions.",
                    Some("dimensions"),
                ));
            }
            if dims as usize > native {
                return Err(RequestError::invalid(
                    format!("'dimensions' must be at most {native} for {model}, got {dims}"),
                    Some("dimensions"),
                ));
            }
            dims as usize
        }
    };
    let base64 = match body.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(format)) if format == "float" => false,
        Some(Value::String(format)) if format == "base64" => true,
        Some(_) => {
            return Err(RequestError::invalid(
                "'encoding_format' must be 'float' or 'base64'",
                Some("encoding_format"),
            ));
        }
    };

    let mut total_tokens = 0usize;
    for input in &texts {
        if input.n_tokens > MAX_TOKENS_PER_INPUT {
            return Err(RequestError::invalid(
                format!(
                    "This model's maximum context length is {MAX_TOKENS_PER_INPUT} tokens, however you requested {n} tokens ({n} in your prompt; 0 for the completion). Please reduce your prompt; or completion length.",
                    n = input.n_tokens
                ),
                None,
            ));
        }
        total_tokens += input.n_tokens;
    }
    if total_tokens > MAX_TOKENS_PER_REQUEST {
        return Err(RequestError::invalid(
            format!(
                "Requested {total_tokens} tokens, max {MAX_TOKENS_PER_REQUEST} tokens per request"
            ),
            None,
        ));
    }

    let data = texts
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector = vectors::embedding(&input.text, dims);
            EmbeddingData {
                object: "embedding",
                index,
                embedding: if base64 {
                    EmbeddingValue::Base64(encode_base64(&vector))
                } else {
                    EmbeddingValue::Float(vector)
                },
            }
        })
        .collect();
    Ok(EmbeddingResponse {
        object: "list",
        data,
        model,
        usage: Usage {
            prompt_tokens: total_tokens as u64,
            total_tokens: total_tokens as u64,
        },
    })
}

/// One input of a request: the text to embed and what it costs.
struct Input {
    text: String,
    n_tokens: usize,
}

/// The inputs of a request, in the four shapes the spec allows: a string, an array of strings,
/// an array of token ids, or an array of arrays of token ids. Token ids are embedded as the text
/// of the numbers (the emulator has no decoder) and cost one token each.
fn inputs(input: Option<&Value>) -> Result<Vec<Input>, RequestError> {
    let param = Some("input");
    let from_text = |text: &str| -> Result<Input, RequestError> {
        if text.is_empty() {
            return Err(RequestError::invalid(
                "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.",
                param,
            ));
        }
        Ok(Input {
            text: text.to_owned(),
            n_tokens: crate::plan::tokens::count_tokens(text),
        })
    };
    let from_tokens = |tokens: &[Value]| -> Result<Input, RequestError> {
        if tokens.is_empty() || !tokens.iter().all(Value::is_u64) {
            return Err(RequestError::invalid(
                "'$.input' must not contain empty token arrays or non-integers",
                param,
            ));
        }
        let text = tokens
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Input {
            text,
            n_tokens: tokens.len(),
        })
    };
    match input {
        None | Some(Value::Null) => Err(RequestError::invalid(
            "'input' is a required property",
            param,
        )),
        Some(Value::String(text)) => Ok(vec![from_text(text)?]),
        Some(Value::Array(items)) => {
            if items.is_empty() || items.len() > MAX_INPUTS_PER_REQUEST {
                return Err(RequestError::invalid(
                    format!("'$.input' must hold between 1 and {MAX_INPUTS_PER_REQUEST} items"),
                    param,
                ));
            }
            if items.iter().all(Value::is_u64) {
                return Ok(vec![from_tokens(items)?]);
            }
            items
                .iter()
                .map(|item| match item {
                    Value::String(text) => from_text(text),
                    Value::Array(tokens) => from_tokens(tokens),
                    _ => Err(RequestError::invalid(
                        "'$.input' must be a string, an array of strings or an array of token arrays",
                        param,
                    )),
                })
                .collect()
        }
        Some(_) => Err(RequestError::invalid(
            "'$.input' must be a string, an array of strings or an array of token arrays",
            param,
        )),
    }
}

/// How many inputs a request body carries (the batch-wide cap of 50,000 embedding inputs
/// counts these, not lines). Anything that is not an array counts as one.
pub(crate) fn n_inputs(body: &Value) -> usize {
    match body.get("input") {
        Some(Value::Array(items)) if !items.is_empty() && !items.iter().all(Value::is_u64) => {
            items.len()
        }
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use serde_json::json;

    use super::*;

    #[test]
    fn float_and_base64_carry_the_same_bits() {
        let float = execute(
            &json!({"model": "text-embedding-3-small", "input": "a pump", "dimensions": 8}),
        )
        .unwrap();
        let b64 = execute(&json!({"model": "text-embedding-3-small", "input": ["a pump"], "dimensions": 8, "encoding_format": "base64"})).unwrap();
        let expected = vectors::embedding("a pump", 8);
        let EmbeddingValue::Float(v) = &float.data[0].embedding else {
            panic!("float")
        };
        assert_eq!(v, &expected);
        let EmbeddingValue::Base64(text) = &b64.data[0].embedding else {
            panic!("base64")
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap();
        let decoded: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(decoded, expected);
        assert_eq!(float.usage.prompt_tokens, 2);
    }

    #[test]
    fn floats_print_in_shortest_f32_form() {
        let response = execute(&json!({"model": "m", "input": "x y z", "dimensions": 4})).unwrap();
        let text = serde_json::to_string(&response).unwrap();
        let parsed: Value = serde_json::from_str(&text).unwrap();
        for (printed, value) in parsed["data"][0]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .zip(vectors::embedding("x y z", 4))
        {
            // The printed text is exactly what ryu prints for the f32.
            assert_eq!(printed.to_string(), serde_json::to_string(&value).unwrap());
        }
    }

    #[test]
    fn refuses_what_the_provider_refuses() {
        let too_long = "word ".repeat(9000);
        let cases = [
            json!({"input": "x"}),
            json!({"model": "text-embedding-3-small"}),
            json!({"model": "text-embedding-3-small", "input": ""}),
            json!({"model": "text-embedding-3-small", "input": []}),
            json!({"model": "text-embedding-3-small", "input": too_long}),
            json!({"model": "text-embedding-ada-002", "input": "x", "dimensions": 256}),
            json!({"model": "text-embedding-3-small", "input": "x", "dimensions": 4000}),
            json!({"model": "text-embedding-3-small", "input": "x", "encoding_format": "hex"}),
        ];
        for case in cases {
            let error = execute(&case).unwrap_err();
            assert_eq!(error.status, 400, "{case}");
        }
        assert_eq!(
            execute(&json!({"model": "text-embedding-3-large", "input": "x"}))
                .unwrap()
                .data[0]
                .embedding_len(),
            3072
        );
        assert_eq!(n_inputs(&json!({"input": ["a", "b"]})), 2);
        assert_eq!(n_inputs(&json!({"input": [1, 2]})), 1);
    }

    impl EmbeddingData {
        fn embedding_len(&self) -> usize {
            match &self.embedding {
                EmbeddingValue::Float(v) => v.len(),
                EmbeddingValue::Base64(s) => s.len(),
            }
        }
    }
}
