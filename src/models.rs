//! The built-in table of embedding models (DESIGN.md §2, §9), per provider, and the
//! `dimensions` rule.
//!
//! Owns the providers embatch can talk to ([`Provider`], recorded in `run.json`), which models
//! each one knows, their native dimension, whether they accept a `dimensions` parameter and
//! their batch price. It does not talk to the database: the caller passes the vector column's
//! declared dimension in.

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

/// Who embeds: the service a run or a realtime call talks to. Recorded in `run.json`
/// (`settings.provider`, absent for `openai` so that older runs keep their bytes).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// OpenAI's Batch API (files, batches, 50 % off, 24 h window).
    #[default]
    Openai,
    /// Any OpenAI-compatible `/v1/embeddings` endpoint, run as a batch by embatch itself.
    Direct,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::Direct => "direct",
        }
    }

    /// For `skip_serializing_if`: `openai` is what an absent key means.
    pub fn is_openai(&self) -> bool {
        *self == Provider::Openai
    }

    /// The environment variable of the provider's API key.
    pub fn key_var(self) -> &'static str {
        match self {
            Provider::Openai => "OPENAI_API_KEY",
            Provider::Direct => "EMBATCH_DIRECT_API_KEY",
        }
    }

    /// The environment variable of the provider's base URL (`--base-url` beats it).
    pub fn base_url_var(self) -> &'static str {
        match self {
            Provider::Openai => "OPENAI_BASE_URL",
            Provider::Direct => "EMBATCH_DIRECT_BASE_URL",
        }
    }

    /// The models this provider's table knows.
    pub fn models(self) -> &'static [ModelInfo] {
        match self {
            Provider::Openai => MODELS,
            Provider::Direct => DIRECT_MODELS,
        }
    }

    /// Whether a token count and a price make a cost: `direct` runs on the user's own server,
    /// so it has no price (its cost is not applicable, not zero dollars owed to anyone).
    pub fn has_price(self) -> bool {
        self == Provider::Openai
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// OpenAI's models. Every model is counted with cl100k_base; an unknown model is too (with a
/// warning).
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

/// Models commonly served by self-hosted OpenAI-compatible servers (Hugging Face TEI, vLLM,
/// Infinity, Ollama), under the names those servers use. None takes `dimensions` (servers
/// differ on whether they pass it on), and none has a price: the server is the user's own.
/// Their own tokenizers are not cl100k_base, so a token count is an estimate (see README,
/// "Providers"); a model not listed here gets its dimension from the server's first answer.
pub const DIRECT_MODELS: &[ModelInfo] = &[
    direct_model("BAAI/bge-small-en-v1.5", 384),
    direct_model("BAAI/bge-base-en-v1.5", 768),
    direct_model("BAAI/bge-large-en-v1.5", 1024),
    direct_model("BAAI/bge-m3", 1024),
    direct_model("sentence-transformers/all-MiniLM-L6-v2", 384),
    direct_model("intfloat/multilingual-e5-large", 1024),
    direct_model("nomic-ai/nomic-embed-text-v1.5", 768),
    direct_model("nomic-embed-text", 768),
    direct_model("mxbai-embed-large", 1024),
];

const fn direct_model(name: &'static str, native_dimensions: u32) -> ModelInfo {
    ModelInfo {
        name,
        native_dimensions,
        accepts_dimensions: false,
        batch_usd_per_million_tokens: 0.0,
    }
}

pub const DEFAULT_MODEL: &str = "text-embedding-3-small";

/// An OpenAI model of the table.
pub fn lookup(name: &str) -> Option<&'static ModelInfo> {
    lookup_for(Provider::Openai, name)
}

/// A model of `provider`'s table.
pub fn lookup_for(provider: Provider, name: &str) -> Option<&'static ModelInfo> {
    provider.models().iter().find(|m| m.name == name)
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
    #[error(
        "model {model} produces {native} dimensions (it takes no `dimensions` parameter) but the column is vector({column}); point --embedding-column at a vector({native}) column, or use another model"
    )]
    FixedDimensions {
        model: String,
        native: u32,
        column: u32,
    },
}

/// [`choose_dimensions`] for a model of `provider`'s table. For `direct`, a model the table
/// does not know gets the column's size: its real size is checked on the server's first answer,
/// before anything is written.
pub fn choose_dimensions_for(
    provider: Provider,
    model: &str,
    column_dimensions: u32,
    flag_dimensions: Option<u32>,
) -> Result<DimensionChoice, DimensionError> {
    if provider == Provider::Openai {
        return choose_dimensions(model, column_dimensions, flag_dimensions);
    }
    if let Some(flag) = flag_dimensions
        && flag != column_dimensions
    {
        return Err(DimensionError::FlagDisagreesWithColumn {
            flag,
            column: column_dimensions,
        });
    }
    match lookup_for(provider, model) {
        Some(info) if info.native_dimensions != column_dimensions => {
            Err(DimensionError::FixedDimensions {
                model: model.to_owned(),
                native: info.native_dimensions,
                column: column_dimensions,
            })
        }
        Some(_) => Ok(DimensionChoice {
            dimensions: column_dimensions,
            send_dimensions: false,
        }),
        None => Ok(DimensionChoice {
            dimensions: column_dimensions,
            send_dimensions: flag_dimensions.is_some(),
        }),
    }
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

/// [`price_per_million`] for `provider`: `None` (no cost to estimate) for a provider without
/// a price, whatever the override.
pub fn price_per_million_for(
    provider: Provider,
    model: &str,
    price_override: Option<f64>,
) -> Option<f64> {
    if !provider.has_price() {
        return None;
    }
    price_override.or_else(|| lookup_for(provider, model).map(|m| m.batch_usd_per_million_tokens))
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
    fn direct_known_model_has_a_fixed_size() {
        let choice =
            choose_dimensions_for(Provider::Direct, "BAAI/bge-small-en-v1.5", 384, None).unwrap();
        assert_eq!(
            choice,
            DimensionChoice {
                dimensions: 384,
                send_dimensions: false
            }
        );
        let err = choose_dimensions_for(Provider::Direct, "BAAI/bge-small-en-v1.5", 768, None)
            .unwrap_err();
        assert!(matches!(
            err,
            DimensionError::FixedDimensions {
                native: 384,
                column: 768,
                ..
            }
        ));
        // OpenAI's names mean nothing to the direct table: the first answer tells.
        let choice =
            choose_dimensions_for(Provider::Direct, "text-embedding-3-small", 512, None).unwrap();
        assert_eq!(choice.dimensions, 512);
        assert!(!choice.send_dimensions);
    }

    #[test]
    fn direct_has_no_price() {
        assert_eq!(
            price_per_million_for(Provider::Direct, "BAAI/bge-m3", Some(1.0)),
            None
        );
        assert_eq!(
            price_per_million_for(Provider::Openai, "text-embedding-3-small", None),
            Some(0.01)
        );
    }

    #[test]
    fn provider_names_and_variables() {
        for provider in [Provider::Openai, Provider::Direct] {
            let json = serde_json::to_string(&provider).unwrap();
            assert_eq!(json, format!("\"{provider}\""));
            assert_eq!(serde_json::from_str::<Provider>(&json).unwrap(), provider);
        }
        assert_eq!(Provider::default(), Provider::Openai);
        assert_eq!(Provider::Direct.key_var(), "EMBATCH_DIRECT_API_KEY");
        assert_eq!(Provider::Direct.base_url_var(), "EMBATCH_DIRECT_BASE_URL");
    }

    #[test]
    fn cost_of_a_million_small_tokens_is_a_cent() {
        let price = price_per_million("text-embedding-3-small", None).unwrap();
        assert!((estimate_cost(1_000_000, price) - 0.01).abs() < 1e-12);
    }
}
