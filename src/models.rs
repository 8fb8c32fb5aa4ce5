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
    /// The only sizes the model produces when it takes a size parameter (Voyage's
    /// `output_dimension`); empty: any size up to the native one (OpenAI's `dimensions`).
    pub accepted_dimensions: &'static [u32],
    /// The provider's limit on the tokens of one input (its context length), when known.
    pub max_input_tokens: Option<u32>,
    /// The provider's limit on the tokens of all inputs of one request, when known.
    pub max_request_tokens: Option<u32>,
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
    /// Voyage AI's Batch API (files, batches, 33 % off, 12 h window).
    Voyage,
    /// Google's Gemini API batch mode (`asyncBatchEmbedContent`, 50 % off, 24 h target).
    Gemini,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::Direct => "direct",
            Provider::Voyage => "voyage",
            Provider::Gemini => "gemini",
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
            Provider::Voyage => "VOYAGE_API_KEY",
            Provider::Gemini => "GEMINI_API_KEY",
        }
    }

    /// The environment variable of the provider's base URL (`--base-url` beats it).
    pub fn base_url_var(self) -> &'static str {
        match self {
            Provider::Openai => "OPENAI_BASE_URL",
            Provider::Direct => "EMBATCH_DIRECT_BASE_URL",
            Provider::Voyage => "VOYAGE_BASE_URL",
            Provider::Gemini => "GEMINI_BASE_URL",
        }
    }

    /// The provider's own base URL when neither `--base-url` nor its variable is set
    /// (`direct` has none: the server is the user's).
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            Provider::Openai => Some("https://api.openai.com/v1"),
            Provider::Direct => None,
            Provider::Voyage => Some(VOYAGE_DEFAULT_BASE_URL),
            Provider::Gemini => Some(GEMINI_DEFAULT_BASE_URL),
        }
    }

    /// The provider's cap on the inputs of one batch: OpenAI counts requests and embedding
    /// inputs (50,000 each); Voyage counts inputs (100,000, "100K inputs per batch").
    pub fn max_inputs_per_batch(self) -> u32 {
        match self {
            Provider::Openai | Provider::Direct => 50_000,
            Provider::Voyage => 100_000,
            // Not documented for file input (UNCONFIRMED): OpenAI's cap, the planner's default.
            Provider::Gemini => 50_000,
        }
    }

    /// The provider's cap on the inputs of one realtime `/embeddings` request.
    pub fn max_inputs_per_request(self) -> usize {
        match self {
            Provider::Openai | Provider::Direct => 2048,
            Provider::Voyage => 1000,
            Provider::Gemini => GEMINI_MAX_INPUTS_PER_REQUEST,
        }
    }

    /// The models this provider's table knows.
    pub fn models(self) -> &'static [ModelInfo] {
        match self {
            Provider::Openai => MODELS,
            Provider::Direct => DIRECT_MODELS,
            Provider::Voyage => VOYAGE_MODELS,
            Provider::Gemini => GEMINI_MODELS,
        }
    }

    /// Whether a token count and a price make a cost: `direct` runs on the user's own server,
    /// so it has no price (its cost is not applicable, not zero dollars owed to anyone).
    pub fn has_price(self) -> bool {
        self != Provider::Direct
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
        accepted_dimensions: &[],
        max_input_tokens: Some(8192),
        max_request_tokens: Some(300_000),
    },
    ModelInfo {
        name: "text-embedding-3-large",
        native_dimensions: 3072,
        accepts_dimensions: true,
        batch_usd_per_million_tokens: 0.065,
        accepted_dimensions: &[],
        max_input_tokens: Some(8192),
        max_request_tokens: Some(300_000),
    },
    ModelInfo {
        name: "text-embedding-ada-002",
        native_dimensions: 1536,
        accepts_dimensions: false,
        batch_usd_per_million_tokens: 0.05,
        accepted_dimensions: &[],
        max_input_tokens: Some(8192),
        max_request_tokens: Some(300_000),
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
        accepted_dimensions: &[],
        max_input_tokens: None,
        max_request_tokens: None,
    }
}

/// Voyage's API root.
pub const VOYAGE_DEFAULT_BASE_URL: &str = "https://api.voyageai.com/v1";

/// The sizes Voyage's current models produce through `output_dimension` (1024 by default).
pub const VOYAGE_DIMENSIONS: &[u32] = &[256, 512, 1024, 2048];

/// Voyage's batch-eligible embedding models of the 3 and 3.5 generations (docs.voyageai.com,
/// "Text embeddings" and "Batch inference"): a 32,000-token context, 1024 dimensions by
/// default, `output_dimension` 256/512/1024/2048, at most 1,000 inputs per request and a
/// per-request token cap that depends on the model. Batch prices are the standard prices of
/// the pricing page less the documented 33 % batch discount (standard × 0.67; the first 200M
/// free tokens of an account are not counted).
pub const VOYAGE_MODELS: &[ModelInfo] = &[
    voyage_model("voyage-3.5", 0.06 * 0.67, 320_000),
    voyage_model("voyage-3.5-lite", 0.02 * 0.67, 1_000_000),
    voyage_model("voyage-3-large", 0.18 * 0.67, 120_000),
    voyage_model("voyage-code-3", 0.18 * 0.67, 120_000),
];

const fn voyage_model(
    name: &'static str,
    batch_usd_per_million_tokens: f64,
    max_request_tokens: u32,
) -> ModelInfo {
    ModelInfo {
        name,
        native_dimensions: 1024,
        accepts_dimensions: true,
        batch_usd_per_million_tokens,
        accepted_dimensions: VOYAGE_DIMENSIONS,
        max_input_tokens: Some(32_000),
        max_request_tokens: Some(max_request_tokens),
    }
}

/// The Gemini API's root (the API version, `v1beta`, goes into each path).
pub const GEMINI_DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";

/// The inputs of one realtime `batchEmbedContents` call: the Gemini reference gives no cap
/// (UNCONFIRMED); 100 is the value in common use.
pub const GEMINI_MAX_INPUTS_PER_REQUEST: usize = 100;

/// The sizes `gemini-embedding-001` produces through `outputDimensionality` ("Flexible,
/// supports: 128 – 3072", ai.google.dev, Embeddings guide).
pub const GEMINI_DIMENSIONS: std::ops::RangeInclusive<u32> = 128..=3072;

/// Gemini's models (ai.google.dev, Embeddings guide): `gemini-embedding-001`, native 3072,
/// 2,048 input tokens; the batch price is 50 % of the interactive $0.15 per 1M tokens.
pub const GEMINI_MODELS: &[ModelInfo] = &[ModelInfo {
    name: "gemini-embedding-001",
    native_dimensions: 3072,
    accepts_dimensions: true,
    batch_usd_per_million_tokens: 0.15 * 0.5,
    accepted_dimensions: &[],
    max_input_tokens: Some(2048),
    max_request_tokens: None,
}];

/// Gemini's `taskType` (`--task-type`), recorded for a Gemini run; other providers take no
/// such parameter and ignore it. The values are the API's `TaskType` enum.
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
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskType {
    /// Texts to be found (the documents of a retrieval)
    #[default]
    RetrievalDocument,
    /// Texts that search
    RetrievalQuery,
    /// Semantic similarity between texts
    SemanticSimilarity,
    /// Classification
    Classification,
    /// Clustering
    Clustering,
    /// Questions of a question-answering system
    QuestionAnswering,
    /// Fact verification
    FactVerification,
    /// Code retrieval queries
    CodeRetrievalQuery,
    /// No `taskType`: the API's default (`TASK_TYPE_UNSPECIFIED`)
    TaskTypeUnspecified,
}

impl TaskType {
    /// The value sent, `None` for no `taskType` at all.
    pub fn wire(self) -> Option<&'static str> {
        Some(match self {
            TaskType::RetrievalDocument => "RETRIEVAL_DOCUMENT",
            TaskType::RetrievalQuery => "RETRIEVAL_QUERY",
            TaskType::SemanticSimilarity => "SEMANTIC_SIMILARITY",
            TaskType::Classification => "CLASSIFICATION",
            TaskType::Clustering => "CLUSTERING",
            TaskType::QuestionAnswering => "QUESTION_ANSWERING",
            TaskType::FactVerification => "FACT_VERIFICATION",
            TaskType::CodeRetrievalQuery => "CODE_RETRIEVAL_QUERY",
            TaskType::TaskTypeUnspecified => return None,
        })
    }
}

/// Voyage's `input_type` (`--input-type`): `document` prepends the provider's retrieval
/// prompt for documents, `query` its prompt for queries, `none` sends no type. Other
/// providers take no such parameter and ignore it.
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
#[serde(rename_all = "lowercase")]
pub enum InputType {
    /// Texts to be found: Voyage prepends its prompt for documents
    #[default]
    Document,
    /// Texts that search: Voyage prepends its prompt for queries
    Query,
    /// No `input_type`: the provider's default (`null`).
    None,
}

impl InputType {
    /// The value sent, `None` for no `input_type` at all.
    pub fn wire(self) -> Option<&'static str> {
        match self {
            InputType::Document => Some("document"),
            InputType::Query => Some("query"),
            InputType::None => None,
        }
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
    #[error(
        "model {model} produces vectors of {accepted} dimensions, not {column}: point --embedding-column at a vector column of one of those sizes"
    )]
    SizeNotOffered {
        model: String,
        accepted: String,
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
    if provider == Provider::Gemini
        && let Some(info) = lookup_for(provider, model)
    {
        return if GEMINI_DIMENSIONS.contains(&column_dimensions) {
            Ok(DimensionChoice {
                dimensions: column_dimensions,
                send_dimensions: column_dimensions != info.native_dimensions,
            })
        } else {
            Err(DimensionError::SizeNotOffered {
                model: model.to_owned(),
                accepted: format!(
                    "{} to {}",
                    GEMINI_DIMENSIONS.start(),
                    GEMINI_DIMENSIONS.end()
                ),
                column: column_dimensions,
            })
        };
    }
    match lookup_for(provider, model) {
        Some(info) if !info.accepted_dimensions.is_empty() => {
            if info.accepted_dimensions.contains(&column_dimensions) {
                Ok(DimensionChoice {
                    dimensions: column_dimensions,
                    send_dimensions: column_dimensions != info.native_dimensions,
                })
            } else {
                let accepted: Vec<String> = info
                    .accepted_dimensions
                    .iter()
                    .map(u32::to_string)
                    .collect();
                Err(DimensionError::SizeNotOffered {
                    model: model.to_owned(),
                    accepted: accepted.join(", "),
                    column: column_dimensions,
                })
            }
        }
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
        for provider in [
            Provider::Openai,
            Provider::Direct,
            Provider::Voyage,
            Provider::Gemini,
        ] {
            let json = serde_json::to_string(&provider).unwrap();
            assert_eq!(json, format!("\"{provider}\""));
            assert_eq!(serde_json::from_str::<Provider>(&json).unwrap(), provider);
        }
        assert_eq!(Provider::default(), Provider::Openai);
        assert_eq!(Provider::Direct.key_var(), "EMBATCH_DIRECT_API_KEY");
        assert_eq!(Provider::Direct.base_url_var(), "EMBATCH_DIRECT_BASE_URL");
    }

    #[test]
    fn voyage_models_take_only_the_offered_sizes() {
        let choice = choose_dimensions_for(Provider::Voyage, "voyage-3.5", 1024, None).unwrap();
        assert_eq!(
            choice,
            DimensionChoice {
                dimensions: 1024,
                send_dimensions: false
            }
        );
        let choice = choose_dimensions_for(Provider::Voyage, "voyage-3-large", 2048, None).unwrap();
        assert_eq!(
            choice,
            DimensionChoice {
                dimensions: 2048,
                send_dimensions: true
            }
        );
        let err = choose_dimensions_for(Provider::Voyage, "voyage-code-3", 1536, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "model voyage-code-3 produces vectors of 256, 512, 1024, 2048 dimensions, not 1536: point --embedding-column at a vector column of one of those sizes"
        );
    }

    #[test]
    fn voyage_prices_are_a_third_off_and_named() {
        let price = price_per_million_for(Provider::Voyage, "voyage-3.5", None).unwrap();
        assert!((price - 0.0402).abs() < 1e-9, "{price}");
        let lite = price_per_million_for(Provider::Voyage, "voyage-3.5-lite", None).unwrap();
        assert!((lite - 0.0134).abs() < 1e-9, "{lite}");
        assert_eq!(Provider::Voyage.key_var(), "VOYAGE_API_KEY");
        assert_eq!(Provider::Voyage.base_url_var(), "VOYAGE_BASE_URL");
        assert_eq!(
            Provider::Voyage.default_base_url(),
            Some("https://api.voyageai.com/v1")
        );
        assert_eq!(Provider::Voyage.max_inputs_per_batch(), 100_000);
        assert_eq!(Provider::Voyage.max_inputs_per_request(), 1000);
        let info = lookup_for(Provider::Voyage, "voyage-3-large").unwrap();
        assert_eq!(info.max_input_tokens, Some(32_000));
        assert_eq!(info.max_request_tokens, Some(120_000));
        assert_eq!(
            serde_json::to_string(&InputType::Document).unwrap(),
            "\"document\""
        );
        assert_eq!(InputType::None.wire(), None);
    }

    #[test]
    fn gemini_takes_128_to_3072_and_costs_half() {
        let native =
            choose_dimensions_for(Provider::Gemini, "gemini-embedding-001", 3072, None).unwrap();
        assert!(!native.send_dimensions);
        let small =
            choose_dimensions_for(Provider::Gemini, "gemini-embedding-001", 768, None).unwrap();
        assert_eq!(
            small,
            DimensionChoice {
                dimensions: 768,
                send_dimensions: true
            }
        );
        let err =
            choose_dimensions_for(Provider::Gemini, "gemini-embedding-001", 64, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "model gemini-embedding-001 produces vectors of 128 to 3072 dimensions, not 64: point --embedding-column at a vector column of one of those sizes"
        );
        let price = price_per_million_for(Provider::Gemini, "gemini-embedding-001", None).unwrap();
        assert!((price - 0.075).abs() < 1e-12, "{price}");
        assert_eq!(Provider::Gemini.key_var(), "GEMINI_API_KEY");
        assert_eq!(Provider::Gemini.base_url_var(), "GEMINI_BASE_URL");
        assert_eq!(
            Provider::Gemini.default_base_url(),
            Some("https://generativelanguage.googleapis.com")
        );
        let info = lookup_for(Provider::Gemini, "gemini-embedding-001").unwrap();
        assert_eq!(info.max_input_tokens, Some(2048));
        assert_eq!(
            serde_json::to_string(&TaskType::RetrievalDocument).unwrap(),
            "\"RETRIEVAL_DOCUMENT\""
        );
        assert_eq!(
            TaskType::CodeRetrievalQuery.wire(),
            Some("CODE_RETRIEVAL_QUERY")
        );
        assert_eq!(TaskType::TaskTypeUnspecified.wire(), None);
    }

    #[test]
    fn cost_of_a_million_small_tokens_is_a_cent() {
        let price = price_per_million("text-embedding-3-small", None).unwrap();
        assert!((estimate_cost(1_000_000, price) - 0.01).abs() < 1e-12);
    }
}
