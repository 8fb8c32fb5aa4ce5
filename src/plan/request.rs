//! The JSONL request lines of a batch input file (DESIGN.md §7).
//!
//! Owns the exact shape and byte length of one request line; it does not decide which chunks
//! go into which file (the sharder does) nor write files (the plan does).

use serde::Serialize;

use crate::models::{EncodingFormat, Provider, TaskType};
use crate::plan::tokens;

/// Gemini's limit on the tokens of one input (`gemini-embedding-001`: 2,048).
pub const GEMINI_MAX_INPUT_TOKENS: usize = 2048;
/// Added to an input's UTF-8 bytes to bound its Gemini tokens: no local tokenizer exists for
/// `gemini-embedding-001`, and a SentencePiece tokenizer with byte fallback makes at most one
/// token per byte, plus a few special tokens. The bound never under-counts.
pub const GEMINI_SPECIAL_TOKENS: usize = 8;

/// The most Gemini tokens `input` can be: its UTF-8 bytes plus [`GEMINI_SPECIAL_TOKENS`].
pub fn gemini_token_bound(input: &str) -> usize {
    input.len() + GEMINI_SPECIAL_TOKENS
}

/// The per-run parts of every request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTemplate {
    pub model: String,
    /// `Some(N)` only when N differs from the model's native size (DESIGN.md §2).
    pub dimensions: Option<u32>,
    pub encoding_format: EncodingFormat,
    /// Whose line shape: OpenAI's (and `direct`'s) carries the model and the request's
    /// parameters on every line; Voyage's carries only the input, the batch carrying the rest.
    pub provider: Provider,
    /// Gemini's `taskType` of every line (`None` for other providers, or for no `taskType`).
    pub task_type: Option<TaskType>,
}

/// Gemini's request line: `{"key", "request": EmbedContentRequest}` (ai.google.dev, Batch
/// API and Embeddings reference); the model comes from the batch.
#[derive(Serialize)]
struct GeminiLine<'a> {
    key: &'a str,
    request: GeminiRequest<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GeminiRequest<'a> {
    content: GeminiContent<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_dimensionality: Option<u32>,
}

#[derive(Serialize)]
struct GeminiContent<'a> {
    parts: [GeminiPart<'a>; 1],
}

#[derive(Serialize)]
struct GeminiPart<'a> {
    text: &'a str,
}

/// Voyage's request line: `{"custom_id", "body": {"input": [text]}}` (docs.voyageai.com,
/// "Batch inference"); the model, `input_type` and `output_dimension` go into the batch's
/// `request_params`.
#[derive(Serialize)]
struct VoyageLine<'a> {
    custom_id: &'a str,
    body: VoyageBody<'a>,
}

#[derive(Serialize)]
struct VoyageBody<'a> {
    input: [&'a str; 1],
}

#[derive(Serialize)]
struct RequestLine<'a> {
    custom_id: &'a str,
    method: &'static str,
    url: &'static str,
    body: EmbeddingBody<'a>,
}

#[derive(Serialize)]
struct EmbeddingBody<'a> {
    model: &'a str,
    input: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding_format: Option<&'static str>,
}

impl RequestTemplate {
    /// Appends the request line for one chunk, newline included, to `out`.
    pub fn write_line(&self, custom_id: &str, input: &str, out: &mut Vec<u8>) {
        if self.provider == Provider::Gemini {
            let line = GeminiLine {
                key: custom_id,
                request: GeminiRequest {
                    content: GeminiContent {
                        parts: [GeminiPart { text: input }],
                    },
                    task_type: self.task_type.and_then(TaskType::wire),
                    output_dimensionality: self.dimensions,
                },
            };
            // Serializing plain strings and integers into a Vec cannot fail.
            serde_json::to_writer(&mut *out, &line).unwrap_or_else(|_| unreachable!());
            out.push(b'\n');
            return;
        }
        if self.provider == Provider::Voyage {
            let line = VoyageLine {
                custom_id,
                body: VoyageBody { input: [input] },
            };
            // Serializing plain strings into a Vec cannot fail.
            serde_json::to_writer(&mut *out, &line).unwrap_or_else(|_| unreachable!());
            out.push(b'\n');
            return;
        }
        let line = RequestLine {
            custom_id,
            method: "POST",
            url: "/v1/embeddings",
            body: EmbeddingBody {
                model: &self.model,
                input,
                dimensions: self.dimensions,
                // Float is the API's default: leave it out so lines stay as small as possible.
                encoding_format: match self.encoding_format {
                    EncodingFormat::Float => None,
                    EncodingFormat::Base64 => Some("base64"),
                },
            },
        };
        // Serializing plain strings and integers into a Vec cannot fail.
        serde_json::to_writer(&mut *out, &line).unwrap_or_else(|_| unreachable!());
        out.push(b'\n');
    }
}

/// Whether `input` (of `n_tokens` cl100k_base tokens) is over `provider`'s per-input limit:
/// Gemini's 2,048 tokens bounded by bytes ([`gemini_token_bound`]), else cl100k_base's
/// [`tokens::MAX_INPUT_TOKENS`]. The plan and the realtime path (`embed`, `serve`) both ask.
pub fn too_long_for(provider: Provider, input: &str, n_tokens: usize) -> bool {
    match provider {
        Provider::Gemini => gemini_token_bound(input) > GEMINI_MAX_INPUT_TOKENS,
        _ => n_tokens > tokens::MAX_INPUT_TOKENS,
    }
}

impl RequestTemplate {
    /// The provider's per-input limit as the plan counts it: Gemini's 2,048 tokens (bounded
    /// by bytes, see [`gemini_token_bound`]), else cl100k_base's
    /// [`tokens::MAX_INPUT_TOKENS`].
    pub fn input_limit(&self) -> usize {
        match self.provider {
            Provider::Gemini => GEMINI_MAX_INPUT_TOKENS,
            _ => tokens::MAX_INPUT_TOKENS,
        }
    }

    /// Whether `input` (of `n_tokens` cl100k_base tokens) is over the provider's per-input
    /// limit, and so is skipped or truncated by `--on-too-long`, never sent to be refused.
    pub fn is_too_long(&self, input: &str, n_tokens: usize) -> bool {
        too_long_for(self.provider, input, n_tokens)
    }

    /// The longest prefix of `input` within the per-input limit, and its cl100k_base count
    /// (the plan's count for the cost).
    pub fn truncate(&self, input: &str) -> (String, usize) {
        match self.provider {
            Provider::Gemini => {
                let mut end = GEMINI_MAX_INPUT_TOKENS - GEMINI_SPECIAL_TOKENS;
                while end > 0 && !input.is_char_boundary(end.min(input.len())) {
                    end -= 1;
                }
                let prefix = input.get(..end.min(input.len())).unwrap_or_default();
                (prefix.to_owned(), tokens::count_tokens(prefix))
            }
            _ => tokens::truncate_to_tokens(input, tokens::MAX_INPUT_TOKENS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(provider: Provider) -> RequestTemplate {
        RequestTemplate {
            model: "voyage-3.5".to_owned(),
            dimensions: Some(512),
            encoding_format: EncodingFormat::Float,
            provider,
            task_type: Some(TaskType::RetrievalDocument),
        }
    }

    #[test]
    fn gemini_lines_carry_key_content_task_type_and_size() {
        let mut out = Vec::new();
        template(Provider::Gemini).write_line("c-1", "Grease \"the\" bearing", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"key\":\"c-1\",\"request\":{\"content\":{\"parts\":[{\"text\":\"Grease \\\"the\\\" bearing\"}]},\"taskType\":\"RETRIEVAL_DOCUMENT\",\"outputDimensionality\":512}}\n"
        );
        let native = RequestTemplate {
            dimensions: None,
            task_type: None,
            ..template(Provider::Gemini)
        };
        let mut out = Vec::new();
        native.write_line("c-2", "x", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"key\":\"c-2\",\"request\":{\"content\":{\"parts\":[{\"text\":\"x\"}]}}}\n"
        );
    }

    #[test]
    fn gemini_counts_bytes_plus_eight_against_2048() {
        let gemini = template(Provider::Gemini);
        let at_limit = "a".repeat(2040);
        assert!(!gemini.is_too_long(&at_limit, 1));
        assert!(gemini.is_too_long(&format!("{at_limit}a"), 1));
        // Four bytes a character: 511 characters are 2,044 bytes, over 2,040.
        let wide = "\u{1F600}".repeat(511);
        assert!(gemini.is_too_long(&wide, 511));
        let (prefix, n_tokens) = gemini.truncate(&wide);
        assert_eq!(prefix.len(), 2040);
        assert!(!gemini.is_too_long(&prefix, n_tokens));
        assert_eq!(gemini.input_limit(), 2048);
        // OpenAI's limit is cl100k_base's count, whatever the bytes.
        let openai = template(Provider::Openai);
        assert!(!openai.is_too_long(&wide, 511));
        assert!(openai.is_too_long("x", 8192));
    }

    #[test]
    fn voyage_lines_carry_only_the_input() {
        let mut out = Vec::new();
        template(Provider::Voyage).write_line("c-1", "Grease \"the\" bearing", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"custom_id\":\"c-1\",\"body\":{\"input\":[\"Grease \\\"the\\\" bearing\"]}}\n"
        );
    }

    #[test]
    fn openai_lines_keep_their_shape() {
        let mut out = Vec::new();
        template(Provider::Openai).write_line("c-1", "x", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"custom_id\":\"c-1\",\"method\":\"POST\",\"url\":\"/v1/embeddings\",\"body\":{\"model\":\"voyage-3.5\",\"input\":\"x\",\"dimensions\":512}}\n"
        );
    }
}
