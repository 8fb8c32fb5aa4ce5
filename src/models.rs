//! The built-in table of embedding models (DESIGN.md §2) and the `dimensions` rule.
//!
//! Owns which models we know, their native dimension, whether they accept a `dimensions`
//! parameter and their batch price. It does not talk to the database: the caller passes the
//! vector column's declared dimension in.

use std::fmt;

/// What the tool knows about one embedding model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelInfo {
    pub name: &'static str,
    pub native_dimensions: u32,
    pub accepts_dimensions: bool,
    /// Batch API price in US dollars per million input tokens.
    pub batch_usd_per_million_tokens: f64,
}

/// Every model is counted with cl100k_base; an unknown model is too (with a warning).
pub const MODELS: &[ModelInfo] = &[
    ModelInfo {
        name: "text-embedding-3-small",
        native_dimensions: 1536,
        accepts_dimensions: true,
        batch_usd_per_million_tokens: 0.01,
    },
    ModelInfo {
        name: "text-embedding-3-large",
        native_dimensions: 3072,
        accepts_dimensions: true,
        batch_usd_per_million_tokens: 0.065,
    },
    ModelInfo {
        name: "text-embedding-ada-002",
        native_dimensions: 1536,
        accepts_dimensions: false,
        batch_usd_per_million_tokens: 0.05,
    },
];

pub const DEFAULT_MODEL: &str = "text-embedding-3-small";

pub fn lookup(name: &str) -> Option<&'static ModelInfo> {
    MODELS.iter().find(|m| m.name == name)
}

/// The dimension a run will request and store, and whether the request must say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DimensionChoice {
    pub dimensions: u32,
    /// `"dimensions": N` goes into each request only when N differs from the native size.
    pub send_dimensions: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DimensionError {
    #[error(
        "--dimensions {flag} disagrees with the column, which is vector({column}); drop --dimensions or point --embedding-column at a vector({flag}) column"
    )]
    FlagDisagreesWithColumn { flag: u32, column: u32 },
    #[error(
        "model {model} only produces {native} dimensions but the column is vector({column}); use a model that accepts `dimensions` (text-embedding-3-small or -large) or a vector({native}) column"
    )]
    ModelCannotResize {
        model: String,
        native: u32,
        column: u32,
    },
    #[error(
        "model {model} produces at most {native} dimensions but the column is vector({column}); use text-embedding-3-large or a smaller column"
    )]
    TooManyDimensions {
        model: String,
        native: u32,
        column: u32,
    },
}

/// Applies the rule of DESIGN.md §2 to the column's declared dimension.
///
/// An unknown model cannot be checked: the column's size is used and `dimensions` is sent only
/// when the user asked for it explicitly.
pub fn choose_dimensions(
    model: &str,
    column_dimensions: u32,
    flag_dimensions: Option<u32>,
) -> Result<DimensionChoice, DimensionError> {
    if let Some(flag) = flag_dimensions
        && flag != column_dimensions
    {
        return Err(DimensionError::FlagDisagreesWithColumn {
            flag,
            column: column_dimensions,
        });
    }
    let Some(info) = lookup(model) else {
        return Ok(DimensionChoice {
            dimensions: column_dimensions,
            send_dimensions: flag_dimensions.is_some(),
        });
    };
    if column_dimensions == info.native_dimensions {
        return Ok(DimensionChoice {
            dimensions: column_dimensions,
            send_dimensions: false,
        });
    }
    if !info.accepts_dimensions {
        return Err(DimensionError::ModelCannotResize {
            model: model.to_owned(),
            native: info.native_dimensions,
            column: column_dimensions,
        });
    }
    if column_dimensions > info.native_dimensions {
        return Err(DimensionError::TooManyDimensions {
            model: model.to_owned(),
            native: info.native_dimensions,
            column: column_dimensions,
        });
    }
    Ok(DimensionChoice {
        dimensions: column_dimensions,
        send_dimensions: true,
    })
}

/// The price per million tokens for a model: the override if given, else the table's.
pub fn price_per_million(model: &str, price_override: Option<f64>) -> Option<f64> {
    price_override.or_else(|| lookup(model).map(|m| m.batch_usd_per_million_tokens))
}

/// Estimated cost in US dollars of `tokens` input tokens.
pub fn estimate_cost(tokens: u64, usd_per_million: f64) -> f64 {
    tokens as f64 * usd_per_million / 1_000_000.0
}

/// `encoding_format` of the embedding requests.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

impl fmt::Display for EncodingFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EncodingFormat::Float => "float",
            EncodingFormat::Base64 => "base64",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_size_sends_no_dimensions() {
        let choice = choose_dimensions("text-embedding-3-small", 1536, None).unwrap();
        assert_eq!(
            choice,
            DimensionChoice {
                dimensions: 1536,
                send_dimensions: false
            }
        );
    }

    #[test]
    fn smaller_column_sends_dimensions_for_v3_models() {
        let choice = choose_dimensions("text-embedding-3-large", 1024, Some(1024)).unwrap();
        assert_eq!(
            choice,
            DimensionChoice {
                dimensions: 1024,
                send_dimensions: true
            }
        );
    }

    #[test]
    fn ada_cannot_resize() {
        let err = choose_dimensions("text-embedding-ada-002", 512, None).unwrap_err();
        assert!(matches!(err, DimensionError::ModelCannotResize { .. }));
    }

    #[test]
    fn small_cannot_grow() {
        let err = choose_dimensions("text-embedding-3-small", 3072, None).unwrap_err();
        assert!(matches!(err, DimensionError::TooManyDimensions { .. }));
    }

    #[test]
    fn flag_must_match_column() {
        let err = choose_dimensions("text-embedding-3-small", 1536, Some(512)).unwrap_err();
        assert_eq!(
            err,
            DimensionError::FlagDisagreesWithColumn {
                flag: 512,
                column: 1536
            }
        );
    }

    #[test]
    fn unknown_model_takes_the_column_size() {
        let choice = choose_dimensions("my-model", 768, None).unwrap();
        assert_eq!(choice.dimensions, 768);
        assert!(!choice.send_dimensions);
        assert_eq!(price_per_million("my-model", None), None);
        assert_eq!(price_per_million("my-model", Some(0.5)), Some(0.5));
    }

    #[test]
    fn cost_of_a_million_small_tokens_is_a_cent() {
        let price = price_per_million("text-embedding-3-small", None).unwrap();
        assert!((estimate_cost(1_000_000, price) - 0.01).abs() < 1e-12);
    }
}
