//! The JSONL request lines of a batch input file (DESIGN.md §7).
//!
//! Owns the exact shape and byte length of one request line; it does not decide which chunks
//! go into which file (the sharder does) nor write files (the plan does).

use serde::Serialize;

use crate::models::{EncodingFormat, Provider};

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

#[cfg(test)]
mod tests {
    use super::*;

    fn template(provider: Provider) -> RequestTemplate {
        RequestTemplate {
            model: "voyage-3.5".to_owned(),
            dimensions: Some(512),
            encoding_format: EncodingFormat::Float,
            provider,
        }
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
