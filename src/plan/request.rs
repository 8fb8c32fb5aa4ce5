//! The JSONL request lines of a batch input file (DESIGN.md §7).
//!
//! Owns the exact shape and byte length of one request line; it does not decide which chunks
//! go into which file (the sharder does) nor write files (the plan does).

use serde::Serialize;

use crate::models::EncodingFormat;

/// The per-run parts of every request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTemplate {
    pub model: String,
    /// `Some(N)` only when N differs from the model's native size (DESIGN.md §2).
    pub dimensions: Option<u32>,
    pub encoding_format: EncodingFormat,
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
