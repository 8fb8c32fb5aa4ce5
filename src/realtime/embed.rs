//! The realtime path: embeds given chunks *now* through `/v1/embeddings` (DESIGN.md §3
//! `embed`), shared by `embatch embed` and `embatch serve`.
//!
//! It owns looking chunks up by id, deciding whether each can be sent ([`Readiness`]), packing
//! the sendable ones into requests within the API's limits ([`pack_requests`], pure), checking
//! the vectors that come back, and writing them through the batch ingest's own
//! [`Sink`] — so a realtime write obeys exactly the same rules: the column's
//! dimension, the content hash read before the call (a chunk edited meanwhile is `stale`, never
//! given the old text's vector), and only where the embedding is NULL unless overwriting.
//!
//! It knows nothing of runs, batches or `run.json`: the realtime path never touches the batch
//! state machine, and shares with it only the database (`db`, `source`, `sink`), the tokenizer
//! and the HTTP client (`api`). It does not open connections or pools (the callers do), and it
//! does not decide HTTP statuses (`serve` does) or exit codes (`lib`/`main` do).

use std::collections::HashMap;
use std::ops::Range;

use sha2::{Digest as _, Sha256};
use tokio_postgres::{Client, Statement};

use crate::config::{EmbedConfig, Global, RealtimeConfig};
use crate::models::{self, DimensionChoice, Provider};
use crate::pg::conn::DbTarget;
use crate::pg::sink::{RowOutcome, Sink, SinkError, VectorRow};
use crate::pg::source::{Source, quote_ident, quote_qualified};
use crate::plan::tokens::{MAX_INPUT_TOKENS, count_tokens};
use crate::printer::Printer;
use crate::provider::{ApiError, BatchProvider};
use crate::run::store::{IdType, SourceSettings};

/// The provider's limits on one `/v1/embeddings` request (the OpenAPI description of
/// `CreateEmbeddingRequest.input`: at most 2048 inputs, 8192 tokens each — we keep 8191, see
/// [`MAX_INPUT_TOKENS`] — and 300,000 tokens summed over all inputs of a request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub max_inputs: usize,
    pub max_tokens: usize,
}

impl RequestLimits {
    pub const PROVIDER: RequestLimits = RequestLimits {
        max_inputs: 2048,
        max_tokens: 300_000,
    };
}

/// Splits inputs (given by their token counts, each at most [`MAX_INPUT_TOKENS`] and at most
/// `limits.max_tokens`) into consecutive requests: in order, every input in exactly one
/// request, no request over a limit, and every request but the last full (the next input would
/// break a limit). Pure.
pub fn pack_requests(token_counts: &[usize], limits: RequestLimits) -> Vec<Range<usize>> {
    let mut requests = Vec::new();
    let mut start = 0;
    let mut tokens = 0usize;
    for (index, &n_tokens) in token_counts.iter().enumerate() {
        let n_inputs = index - start;
        if n_inputs > 0 && (n_inputs >= limits.max_inputs || tokens + n_tokens > limits.max_tokens)
        {
            requests.push(start..index);
            start = index;
            tokens = 0;
        }
        tokens += n_tokens;
    }
    if start < token_counts.len() {
        requests.push(start..token_counts.len());
    }
    requests
}

/// What became of one chunk of an `embed` (or of one `serve` request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The chunk now holds the vector of its current content.
    Embedded { tokens: usize },
    /// It already had an embedding and overwriting was not asked for: kept, nothing sent.
    AlreadyEmbedded,
    /// No chunk has this id (or the id is not of the id column's type).
    NotFound { why: String },
    /// Empty or whitespace-only content: the API refuses it; nothing sent.
    Empty,
    /// More than [`MAX_INPUT_TOKENS`] tokens: nothing sent.
    TooLong { tokens: usize, provider: Provider },
    /// The content changed while its vector was being computed: not written.
    Stale,
    /// Another writer set the embedding while this one ran: kept, not overwritten.
    EmbeddedMeanwhile,
    /// The chunk was deleted while its vector was being computed.
    Deleted,
    /// The API call failed (after its retries); the message says why. Nothing written.
    Failed { message: String },
}

impl Outcome {
    /// The word printed on stdout for this outcome.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Embedded { .. } => "embedded",
            Outcome::AlreadyEmbedded => "already_embedded",
            Outcome::NotFound { .. } => "not_found",
            Outcome::Empty => "empty",
            Outcome::TooLong { .. } => "too_long",
            Outcome::Stale => "stale",
            Outcome::EmbeddedMeanwhile => "embedded_meanwhile",
            Outcome::Deleted => "deleted",
            Outcome::Failed { .. } => "failed",
        }
    }

    /// Whether the chunk holds an embedding afterwards and nothing needs doing: `embed` exits
    /// 0 only when every chunk's outcome is ok.
    pub fn is_ok(&self) -> bool {
        matches!(
            self,
            Outcome::Embedded { .. } | Outcome::AlreadyEmbedded | Outcome::EmbeddedMeanwhile
        )
    }

    /// A sentence for stderr: what happened and what to do.
    pub fn message(&self, chunk_id: &str) -> String {
        match self {
            Outcome::Embedded { tokens } => format!("chunk {chunk_id}: embedded ({tokens} tokens)"),
            Outcome::AlreadyEmbedded => format!(
                "chunk {chunk_id} already has an embedding: kept (pass --overwrite to embed it again)"
            ),
            Outcome::NotFound { why } => format!("chunk {chunk_id} not found: {why}"),
            Outcome::Empty => format!(
                "chunk {chunk_id} has empty content: the API refuses empty input, so nothing was sent; give it text first"
            ),
            Outcome::TooLong {
                provider: Provider::Gemini,
                ..
            } => format!(
                "chunk {chunk_id} is over Gemini's limit of {} tokens per input, counted as UTF-8 bytes + 8 since no tokenizer of gemini-embedding-001 is published: nothing was sent; split the chunk (at most {} bytes)",
                crate::plan::request::GEMINI_MAX_INPUT_TOKENS,
                crate::plan::request::GEMINI_MAX_INPUT_TOKENS
                    - crate::plan::request::GEMINI_SPECIAL_TOKENS
            ),
            Outcome::TooLong { tokens, .. } => format!(
                "chunk {chunk_id} has {tokens} tokens, more than the {MAX_INPUT_TOKENS} the model takes: nothing was sent; split the chunk"
            ),
            Outcome::Stale => format!(
                "chunk {chunk_id} changed while it was being embedded: not written; run the command again to embed its new content"
            ),
            Outcome::EmbeddedMeanwhile => format!(
                "chunk {chunk_id} was embedded by another writer meanwhile: kept (pass --overwrite to replace it)"
            ),
            Outcome::Deleted => {
                format!("chunk {chunk_id} was deleted while it was being embedded: nothing written")
            }
            Outcome::Failed { message } => {
                format!("chunk {chunk_id} was not embedded: {message}")
            }
        }
    }
}

/// A chunk that can be sent: its text, the hash the write will check, and its token count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The id as the database prints it (`id::text`): what the write binds.
    pub id: String,
    pub content: String,
    pub content_sha256: String,
    pub tokens: usize,
}

/// Whether one chunk, as loaded, can be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready(Ready),
    /// Not sent: this is already its final outcome.
    Done(Outcome),
}

/// One chunk as read from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedChunk {
    pub id: String,
    pub content: Option<String>,
    pub has_embedding: bool,
}

/// Decides whether a loaded chunk can be sent to `provider` (pure): its per-input limit as at
/// plan time (cl100k_base tokens; Gemini's bound by bytes).
pub fn classify(chunk: &LoadedChunk, overwrite: bool, provider: Provider) -> Readiness {
    if chunk.has_embedding && !overwrite {
        return Readiness::Done(Outcome::AlreadyEmbedded);
    }
    let content = match &chunk.content {
        Some(content) if !content.trim().is_empty() => content,
        _ => return Readiness::Done(Outcome::Empty),
    };
    let tokens = count_tokens(content);
    if crate::plan::request::too_long_for(provider, content, tokens) {
        return Readiness::Done(Outcome::TooLong { tokens, provider });
    }
    Readiness::Ready(Ready {
        id: chunk.id.clone(),
        content: content.clone(),
        content_sha256: hex::encode(Sha256::digest(content.as_bytes())),
        tokens,
    })
}

/// A chunk id as the user gave it, in the form the database prints (`id::text`), or why no
/// chunk can have it. Uuids are accepted in any spelling Postgres accepts (upper case, braces,
/// no hyphens) so they all meet in one single-flight key.
pub fn normalize_id(id_type: IdType, raw: &str) -> Result<String, String> {
    match id_type {
        // A text id is taken as given: spaces may be part of it.
        IdType::Text => Ok(raw.to_owned()),
        IdType::Uuid => uuid::Uuid::parse_str(raw.trim())
            .map(|id| id.hyphenated().to_string())
            .map_err(|_| format!("`{raw}` is not a uuid, and the id column holds uuids")),
        IdType::Bigint => raw
            .trim()
            .parse::<i64>()
            .map(|id| id.to_string())
            .map_err(|_| format!("`{raw}` is not an integer, and the id column holds integers")),
    }
}

/// Why the realtime path could not finish its work (as opposed to a chunk's own [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The database failed or refused a query; the message says which.
    #[error("{0}")]
    Db(String),
    /// The vectors could not be written for a reason that is not the chunk's (wrong
    /// dimension, …).
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The API failed after its retries.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The API answered with something that is not a usable vector.
    #[error(
        "the embeddings API answered a bad vector ({0}); check --base-url and the model, then try again"
    )]
    BadOutput(String),
}

/// The chunk table and model of the realtime path, checked against the catalog once.
#[derive(Debug, Clone)]
pub struct Target {
    pub source: Source,
    pub settings: SourceSettings,
    pub model: String,
    pub dims: DimensionChoice,
    /// Whose per-input limit applies.
    pub provider: Provider,
    load_sql: String,
}

impl Target {
    /// Checks the table, its columns and the model's dimensions (DESIGN.md §2).
    pub async fn inspect(client: &Client, cfg: &RealtimeConfig) -> anyhow::Result<Target> {
        let source = Source::inspect_chunks(client, &cfg.source).await?;
        let dims = models::choose_dimensions_for(
            cfg.provider,
            &cfg.model,
            source.dimensions,
            cfg.dimensions,
        )?;
        let c = &source.config;
        // The id type is one of three fixed names, never text from the user; ids are bound
        // as text and cast on our side so the primary-key index stays usable.
        // With `--content-hash-column`, a chunk edited since its embedding was written counts
        // as not embedded (its stored hash is not its content's).
        let emb = quote_ident(&c.embedding_column);
        let has_embedding = match (&c.content_hash_column, source.content_hash) {
            (Some(column), Some(kind)) => format!(
                "(t.{emb} IS NOT NULL AND t.{} IS NOT DISTINCT FROM {})",
                quote_ident(column),
                kind.of_content(&format!("t.{}", quote_ident(&c.text_column)))
            ),
            _ => format!("t.{emb} IS NOT NULL"),
        };
        let load_sql = format!(
            "SELECT t.{id}::text, t.{text}, {has_embedding} FROM {table} AS t \
             WHERE t.{id} = ANY($1::text[]::{id_type}[])",
            id = quote_ident(&c.id_column),
            text = quote_ident(&c.text_column),
            table = quote_qualified(&c.table),
            id_type = source.id_type.as_str(),
        );
        Ok(Target {
            settings: source.settings(),
            source,
            model: cfg.model.clone(),
            dims,
            provider: cfg.provider,
            load_sql,
        })
    }

    /// The `dimensions` parameter of the request (only when it differs from the native size).
    fn dimensions_param(&self) -> Option<u32> {
        self.dims.send_dimensions.then_some(self.dims.dimensions)
    }

    /// Checks the vectors the API returned: the column's dimension and finite values.
    fn check_vectors(&self, vectors: &[Vec<f32>]) -> Result<(), EmbedError> {
        let expected = self.dims.dimensions as usize;
        for vector in vectors {
            if vector.len() != expected {
                return Err(EmbedError::BadOutput(format!(
                    "{} dimensions where the column takes {expected}",
                    vector.len()
                )));
            }
            if vector.iter().any(|x| !x.is_finite()) {
                return Err(EmbedError::BadOutput("a non-finite value".to_owned()));
            }
        }
        Ok(())
    }
}

/// One database connection of the realtime path, with its statements prepared once (the
/// server's pool keeps these, so a request costs no prepare round trips).
pub struct Conn {
    pub client: Client,
    load: Option<Statement>,
    /// Index 0: keep existing embeddings; 1: overwrite.
    sinks: [Option<Sink>; 2],
}

impl Conn {
    pub fn new(client: Client) -> Conn {
        Conn {
            client,
            load: None,
            sinks: [None, None],
        }
    }

    /// Loads the chunks with these ids (normalized, unique); ids with no row are absent.
    pub async fn load(
        &mut self,
        target: &Target,
        ids: &[String],
    ) -> Result<HashMap<String, LoadedChunk>, EmbedError> {
        let statement = match &self.load {
            Some(statement) => statement.clone(),
            None => {
                let statement = self
                    .client
                    .prepare(&target.load_sql)
                    .await
                    .map_err(|e| db_error("could not prepare the chunk lookup", &e))?;
                self.load = Some(statement.clone());
                statement
            }
        };
        let rows = self
            .client
            .query(&statement, &[&ids])
            .await
            .map_err(|e| db_error("could not read the chunks", &e))?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let chunk = LoadedChunk {
                    id: row.get(0),
                    content: row.get(1),
                    has_embedding: row.get(2),
                };
                (chunk.id.clone(), chunk)
            })
            .collect())
    }

    /// Writes `vectors` (one per `ready` chunk, in order) through the batch ingest's sink, in
    /// one transaction, and returns each chunk's outcome.
    pub async fn store(
        &mut self,
        target: &Target,
        overwrite: bool,
        ready: &[Ready],
        vectors: &[Vec<f32>],
    ) -> Result<Vec<Outcome>, EmbedError> {
        target.check_vectors(vectors)?;
        let slot = usize::from(overwrite);
        let sink = match &self.sinks[slot] {
            Some(sink) => sink.clone(),
            None => {
                let sink = Sink::prepare(&self.client, &target.settings, overwrite).await?;
                self.sinks[slot] = Some(sink.clone());
                sink
            }
        };
        let tx = self
            .client
            .transaction()
            .await
            .map_err(|e| db_error("could not start a transaction", &e))?;
        let mut outcomes = Vec::with_capacity(ready.len());
        let pairs: Vec<(&Ready, &Vec<f32>)> = ready.iter().zip(vectors).collect();
        for group in pairs.chunks(Sink::MAX_ROWS_PER_STATEMENT) {
            let rows: Vec<VectorRow<'_>> = group
                .iter()
                .map(|(chunk, vector)| VectorRow {
                    id: &chunk.id,
                    vector,
                    content_sha256: &chunk.content_sha256,
                })
                .collect();
            let written = sink.write(&tx, &rows).await?;
            outcomes.extend(
                group
                    .iter()
                    .zip(written)
                    .map(|((chunk, _), row)| match row {
                        RowOutcome::Written => Outcome::Embedded {
                            tokens: chunk.tokens,
                        },
                        RowOutcome::AlreadyPresent => Outcome::EmbeddedMeanwhile,
                        RowOutcome::Stale => Outcome::Stale,
                        RowOutcome::Deleted => Outcome::Deleted,
                    }),
            );
        }
        tx.commit()
            .await
            .map_err(|e| db_error("could not commit the vectors", &e))?;
        Ok(outcomes)
    }

    /// Whether the connection still works (the pool's recycle check).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

fn db_error(context: &str, error: &tokio_postgres::Error) -> EmbedError {
    let detail = match error.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => error.to_string(),
    };
    EmbedError::Db(format!("{context}: {detail}"))
}

/// Calls the API for `ready` chunks (one request: the caller packs), returning one vector per
/// chunk in order.
pub async fn fetch_vectors(
    api: &dyn BatchProvider,
    target: &Target,
    ready: &[Ready],
) -> Result<Vec<Vec<f32>>, EmbedError> {
    let inputs: Vec<String> = ready.iter().map(|chunk| chunk.content.clone()).collect();
    let vectors = api
        .embed(&target.model, &inputs, target.dimensions_param())
        .await?;
    target.check_vectors(&vectors)?;
    Ok(vectors)
}

/// The database target from the global settings.
pub fn db_target(global: &Global) -> anyhow::Result<DbTarget> {
    Ok(global.database()?.clone())
}

/// Embeds one group of ready chunks: API call, then write. A failure of the call is the
/// chunks' `Failed` outcome; a database failure is the caller's error.
async fn embed_group(
    conn: &mut Conn,
    api: &dyn BatchProvider,
    target: &Target,
    overwrite: bool,
    ready: &[Ready],
) -> Result<Vec<Outcome>, EmbedError> {
    let vectors = fetch_vectors(api, target, ready).await?;
    conn.store(target, overwrite, ready, &vectors).await
}

/// `embatch embed --chunk-id ID…`: one line per `--chunk-id` on stdout (`id`, outcome,
/// tokens, tab-separated, in the order given, a repeated id on each of its lines; the summary
/// counts chunks), the reasons on stderr. An error (exit 1) unless every
/// chunk holds an embedding afterwards.
pub async fn embed_command(
    global: &Global,
    cfg: &EmbedConfig,
    printer: &Printer,
) -> anyhow::Result<()> {
    let api = crate::provider::connect::realtime_provider_for(&global.api, cfg.realtime.provider)?;
    let target_db = db_target(global)?;
    let client = target_db.connect().await?;
    let target = Target::inspect(&client, &cfg.realtime).await?;
    if models::lookup_for(cfg.realtime.provider, &target.model).is_none() {
        printer.warn(&format!(
            "unknown model {}: its tokens are counted with cl100k_base",
            target.model
        ));
    }
    let mut conn = Conn::new(client);

    let (lines, lookup_ids) = given_ids(&cfg.chunk_ids, target.source.id_type);
    let loaded = conn.load(&target, &lookup_ids).await?;
    let (ready, mut decided) = sort_loaded(&target, &lookup_ids, &loaded, cfg.overwrite);
    let failure = send_ready(
        &mut conn,
        &*api,
        &target,
        cfg.overwrite,
        &ready,
        &mut decided,
    )
    .await?;
    report_outcomes(printer, &target.model, lines, &decided, failure)
}

/// One line per id given, repeats included, in order (with the outcome of an id that is not
/// one), and the valid ids to look up, each once.
fn given_ids(
    chunk_ids: &[String],
    id_type: crate::run::store::IdType,
) -> (Vec<(String, Option<Outcome>)>, Vec<String>) {
    // Normalize, then look up every valid id in one query. `lines` keeps one entry per id
    // given, repeats included, in order; each chunk is looked up, sent and counted once.
    let mut lines: Vec<(String, Option<Outcome>)> = Vec::with_capacity(chunk_ids.len());
    let mut lookup_ids: Vec<String> = Vec::new();
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    for raw in chunk_ids {
        match normalize_id(id_type, raw) {
            Ok(id) => {
                if seen.insert(id.clone()) {
                    lookup_ids.push(id.clone());
                }
                lines.push((id, None));
            }
            Err(why) => lines.push((raw.clone(), Some(Outcome::NotFound { why }))),
        }
    }
    (lines, lookup_ids)
}

/// The chunks ready to send, and the outcome of those already decided (not found, already
/// embedded, empty, too long).
fn sort_loaded(
    target: &Target,
    lookup_ids: &[String],
    loaded: &HashMap<String, LoadedChunk>,
    overwrite: bool,
) -> (Vec<Ready>, HashMap<String, Outcome>) {
    let mut ready: Vec<Ready> = Vec::new();
    let mut decided: HashMap<String, Outcome> = HashMap::new();
    for id in lookup_ids {
        match loaded.get(id) {
            None => {
                decided.insert(
                    id.clone(),
                    Outcome::NotFound {
                        why: format!(
                            "no row of {} has this {}; check the id (and --table/--id-column)",
                            target.settings.table, target.settings.id_column
                        ),
                    },
                );
            }
            Some(chunk) => match classify(chunk, overwrite, target.provider) {
                Readiness::Ready(r) => ready.push(r),
                Readiness::Done(outcome) => {
                    decided.insert(id.clone(), outcome);
                }
            },
        }
    }

    (ready, decided)
}

/// Sends what can be sent, request by request; stops at the first failed call (the same
/// failure would meet the next one) and reports the rest as not embedded. Returns that
/// failure.
async fn send_ready(
    conn: &mut Conn,
    api: &dyn BatchProvider,
    target: &Target,
    overwrite: bool,
    ready: &[Ready],
    decided: &mut HashMap<String, Outcome>,
) -> anyhow::Result<Option<String>> {
    let token_counts: Vec<usize> = ready.iter().map(|r| r.tokens).collect();
    let mut failure: Option<String> = None;
    for range in pack_requests(&token_counts, RequestLimits::PROVIDER) {
        let group = &ready[range];
        let results = match &failure {
            Some(message) => Err(message.clone()),
            None => match embed_group(conn, api, target, overwrite, group).await {
                Ok(results) => Ok(results),
                Err(EmbedError::Api(e)) => Err(format!("{e}")),
                Err(EmbedError::BadOutput(m)) => Err(EmbedError::BadOutput(m).to_string()),
                Err(other) => return Err(other.into()),
            },
        };
        match results {
            Ok(results) => {
                for (chunk, outcome) in group.iter().zip(results) {
                    decided.insert(chunk.id.clone(), outcome);
                }
            }
            Err(message) => {
                failure.get_or_insert(message.clone());
                for chunk in group {
                    decided.insert(
                        chunk.id.clone(),
                        Outcome::Failed {
                            message: message.clone(),
                        },
                    );
                }
            }
        }
    }

    Ok(failure)
}

/// Prints one line per id given and the summary; an error names every chunk left undone.
fn report_outcomes(
    printer: &Printer,
    model: &str,
    lines: Vec<(String, Option<Outcome>)>,
    decided: &HashMap<String, Outcome>,
    failure: Option<String>,
) -> anyhow::Result<()> {
    let mut problems: Vec<String> = Vec::new();
    let mut n_failed = 0usize;
    let (mut n_embedded, mut n_tokens) = (0usize, 0usize);
    // The summary counts chunks, not lines: a repeated id is printed again, counted once.
    let mut counted: std::collections::HashSet<String> = std::collections::HashSet::new();
    for (id, outcome) in lines {
        let outcome = match outcome.or_else(|| decided.get(&id).cloned()) {
            Some(outcome) => outcome,
            None => Outcome::Failed {
                message: "no outcome recorded; this is a bug in embatch, please report it"
                    .to_owned(),
            },
        };
        let tokens = match &outcome {
            Outcome::Embedded { tokens } | Outcome::TooLong { tokens, .. } => tokens.to_string(),
            _ => String::new(),
        };
        printer.data(&format!("{id}\t{}\t{tokens}", outcome.label()));
        if !counted.insert(id.clone()) {
            continue;
        }
        if let Outcome::Embedded { tokens } = &outcome {
            n_embedded += 1;
            n_tokens += tokens;
        }
        if outcome.is_ok() {
            printer.verbose(&outcome.message(&id));
        } else if !matches!(outcome, Outcome::Failed { .. }) {
            problems.push(outcome.message(&id));
        } else {
            n_failed += 1;
        }
    }
    // A failed call fails every chunk after it the same way: said once, not per chunk.
    if let Some(message) = &failure {
        problems.insert(
            0,
            format!(
                "the embeddings API call failed ({message}), so {n_failed} chunks were not sent or not written"
            ),
        );
    }
    let n_chunks = counted.len();
    printer.info(&format!(
        "embedded {} of {} ({}) with {model}",
        crate::printer::number(n_embedded as u64),
        crate::printer::count(n_chunks as u64, "chunk", "chunks"),
        crate::printer::count(n_tokens as u64, "token", "tokens"),
    ));
    if problems.is_empty() {
        return Ok(());
    }
    // One error (printed by `main`, even with -q) that names every chunk left undone.
    const SHOWN: usize = 20;
    let n_problems = problems.len() + n_failed - usize::from(failure.is_some());
    let mut message = format!(
        "{n_problems} of {n_chunks} chunks were not embedded: {}",
        problems[..problems.len().min(SHOWN)].join("; ")
    );
    if problems.len() > SHOWN {
        message.push_str(&format!("; … and {} more", problems.len() - SHOWN));
    }
    Err(anyhow::anyhow!(message))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn chunk(content: Option<&str>, has_embedding: bool) -> LoadedChunk {
        LoadedChunk {
            id: "c1".to_owned(),
            content: content.map(str::to_owned),
            has_embedding,
        }
    }

    #[test]
    fn classify_follows_the_batch_rules() {
        assert_eq!(
            classify(&chunk(Some("pump"), true), false, Provider::Openai),
            Readiness::Done(Outcome::AlreadyEmbedded)
        );
        assert!(matches!(
            classify(&chunk(Some("pump"), true), true, Provider::Openai),
            Readiness::Ready(_)
        ));
        assert_eq!(
            classify(&chunk(Some(" \n\t"), false), false, Provider::Openai),
            Readiness::Done(Outcome::Empty)
        );
        assert_eq!(
            classify(&chunk(None, false), false, Provider::Openai),
            Readiness::Done(Outcome::Empty)
        );
        let long = "word ".repeat(MAX_INPUT_TOKENS + 10);
        assert!(matches!(
            classify(&chunk(Some(&long), false), false, Provider::Openai),
            Readiness::Done(Outcome::TooLong { tokens, .. }) if tokens > MAX_INPUT_TOKENS
        ));
        // Gemini's bound counts bytes: 2,041 bytes are over it, however few tokens they are.
        let wide = "a".repeat(2041);
        assert!(matches!(
            classify(&chunk(Some(&wide), false), false, Provider::Gemini),
            Readiness::Done(Outcome::TooLong { .. })
        ));
        assert!(matches!(
            classify(&chunk(Some(&wide), false), false, Provider::Openai),
            Readiness::Ready(_)
        ));
        let Readiness::Ready(ready) =
            classify(&chunk(Some("hello world"), false), false, Provider::Openai)
        else {
            panic!("expected ready");
        };
        assert_eq!(ready.tokens, 2);
        // The hash Postgres computes: encode(sha256(convert_to(content, 'UTF8')), 'hex').
        assert_eq!(
            ready.content_sha256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
    }

    #[test]
    fn ids_normalize_by_type() {
        assert_eq!(
            normalize_id(IdType::Uuid, "{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}").unwrap(),
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        );
        assert!(normalize_id(IdType::Uuid, "nope").is_err());
        assert_eq!(normalize_id(IdType::Bigint, " 042 ").unwrap(), "42");
        assert!(normalize_id(IdType::Bigint, "4.2").is_err());
        assert_eq!(normalize_id(IdType::Text, "Ab c").unwrap(), "Ab c");
    }

    #[test]
    fn packing_examples() {
        let limits = RequestLimits {
            max_inputs: 2,
            max_tokens: 10,
        };
        assert_eq!(pack_requests(&[], limits), Vec::<Range<usize>>::new());
        assert_eq!(pack_requests(&[3, 3, 3], limits), vec![0..2, 2..3]);
        assert_eq!(
            pack_requests(&[6, 6, 10, 1], limits),
            vec![0..1, 1..2, 2..3, 3..4]
        );
        assert_eq!(
            pack_requests(&vec![1; 4097], RequestLimits::PROVIDER).len(),
            3,
            "2048 inputs per request"
        );
        assert_eq!(
            pack_requests(&vec![8191; 74], RequestLimits::PROVIDER),
            vec![0..36, 36..72, 72..74],
            "300,000 tokens per request"
        );
    }

    fn limits() -> impl Strategy<Value = (RequestLimits, Vec<usize>)> {
        (1usize..6, 1usize..50).prop_flat_map(|(max_inputs, max_tokens)| {
            (
                Just(RequestLimits {
                    max_inputs,
                    max_tokens,
                }),
                prop::collection::vec(0..=max_tokens, 0..40),
            )
        })
    }

    proptest! {
        #[test]
        fn packing_keeps_order_limits_and_fullness((limits, tokens) in limits()) {
            let requests = pack_requests(&tokens, limits);
            let mut next = 0;
            for (i, range) in requests.iter().enumerate() {
                prop_assert_eq!(range.start, next, "in order, no gap, no overlap");
                prop_assert!(range.end > range.start, "no empty request");
                let sum: usize = tokens[range.clone()].iter().sum();
                prop_assert!(range.len() <= limits.max_inputs);
                prop_assert!(sum <= limits.max_tokens);
                if i + 1 < requests.len() {
                    let full = range.len() == limits.max_inputs
                        || sum + tokens[range.end] > limits.max_tokens;
                    prop_assert!(full, "request {} is not full", i);
                }
                next = range.end;
            }
            prop_assert_eq!(next, tokens.len(), "every input in a request");
        }
    }
}
