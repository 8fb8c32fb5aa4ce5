//! Validated settings of each command: what `cli` turns the arguments into before any work
//! starts. Command modules see these types, never clap's.

use std::path::PathBuf;
use std::sync::Arc;

use crate::models::{EncodingFormat, Provider};
use crate::pg::conn::{DbError, DbTarget};
use crate::pg::source::SourceConfig;
use crate::plan::sharder::BatchLimits;
use crate::printer::OutputSettings;
use crate::provider::connect::ApiSettings;
use crate::provider::direct::DirectOptions;
use crate::run::store::OnTooLong;

/// Options shared by every command.
#[derive(Debug, Clone)]
pub struct Global {
    /// `DATABASE_URL`, parsed once; it holds a secret: never printed, never written.
    pub database: Database,
    pub api: ApiSettings,
    pub runs_dir: PathBuf,
    pub output: OutputSettings,
}

impl Global {
    /// The database to connect to, or why there is none: the one place that says so.
    pub fn database(&self) -> Result<&DbTarget, DatabaseError> {
        self.database.target()
    }
}

/// `DATABASE_URL` (or `--database-url`), parsed when the arguments are read. Commands that need
/// no database never look at it, so a broken one stops only the commands that would use it.
#[derive(Debug, Clone)]
pub enum Database {
    NotGiven,
    Given(Box<DbTarget>),
    Invalid(Arc<DbError>),
}

impl Database {
    /// Parses a `DATABASE_URL`; `None` or an empty string is no database.
    pub fn from_url(url: Option<&str>) -> Database {
        match url.filter(|url| !url.is_empty()) {
            None => Database::NotGiven,
            Some(url) => match DbTarget::parse(url) {
                Ok(target) => Database::Given(Box::new(target)),
                Err(err) => Database::Invalid(Arc::new(err)),
            },
        }
    }

    /// The parsed target, or why there is none.
    pub fn target(&self) -> Result<&DbTarget, DatabaseError> {
        match self {
            Database::Given(target) => Ok(target),
            Database::NotGiven => Err(DatabaseError::NotGiven),
            Database::Invalid(err) => Err(DatabaseError::Invalid(Arc::clone(err))),
        }
    }
}

/// Why a command that needs the database has none.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error(
        "no database given; set DATABASE_URL (in the environment or .env) or pass --database-url"
    )]
    NotGiven,
    #[error(transparent)]
    Invalid(Arc<DbError>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlanConfig {
    pub family_id: String,
    pub source: SourceConfig,
    pub limit: Option<u64>,
    pub model: String,
    pub dimensions: Option<u32>,
    pub encoding_format: EncodingFormat,
    pub limits: BatchLimits,
    pub on_too_long: OnTooLong,
    pub reembed: bool,
    pub force: bool,
    pub max_cost_usd: Option<f64>,
    pub usd_per_million_tokens: Option<f64>,
    /// `--provider`: recorded in `run.json`; later steps use the recorded one.
    pub provider: Provider,
    /// `--input-type`: Voyage's `input_type`, recorded for a Voyage run; ignored by the others.
    pub input_type: crate::models::InputType,
    /// `--task-type`: Gemini's `taskType`, recorded for a Gemini run; ignored by the others.
    pub task_type: crate::models::TaskType,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StatusConfig {
    pub target: StatusTarget,
    pub json: bool,
    /// Ask the API first and save what it says (takes the run's lock).
    pub refresh: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdvanceConfig {
    pub run_dir: PathBuf,
    pub opts: AdvanceOptions,
}

/// `ingest --run-dir DIR`: never uploads, creates or retries.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestConfig {
    pub run_dir: PathBuf,
    pub opts: AdvanceOptions,
}

/// `run --family-id ID`: plan, then advance until finished.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    pub plan: PlanConfig,
    pub opts: AdvanceOptions,
}

/// Options of `advance` (and `run`, `submit`, `ingest`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdvanceOptions {
    /// Write even where an embedding exists.
    pub overwrite: bool,
    /// Rows per transaction.
    pub update_chunk_size: usize,
    pub max_attempts: u32,
    /// Overrides the plan's bound on tokens in flight.
    pub max_enqueued_tokens: Option<u64>,
    pub keep_remote_files: bool,
    /// Loop until finished (`--wait`).
    pub wait: bool,
    pub poll: std::time::Duration,
    pub max_wait: Option<std::time::Duration>,
    /// `ingest --redownload`: fetch downloaded files again before ingesting.
    pub redownload: bool,
    /// `ingest --dims N`: checked against the run.
    pub dims: Option<u32>,
    /// How a `direct` run sends its requests (and whether this command sends any).
    pub direct: DirectOptions,
    /// Set by `sync`: the tokens other runs have in flight, counted against the one
    /// `max_enqueued_tokens` budget they share (`None`: this run is alone).
    pub shared_in_flight_tokens: Option<u64>,
    /// Set by `sync`: at most this many batch creations in this call, so that runs take
    /// turns at the shared budget (`None`: no bound).
    pub max_creations: Option<u32>,
}

impl Default for AdvanceOptions {
    fn default() -> Self {
        AdvanceOptions {
            overwrite: false,
            update_chunk_size: 1000,
            max_attempts: 3,
            max_enqueued_tokens: None,
            keep_remote_files: false,
            wait: false,
            poll: std::time::Duration::from_secs(60),
            max_wait: None,
            redownload: false,
            dims: None,
            direct: DirectOptions::default(),
            shared_in_flight_tokens: None,
            max_creations: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CancelConfig {
    pub run_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmulatorCommandConfig {
    pub listen: std::net::SocketAddr,
    /// Seconds a batch spends in each of validating, in_progress and finalizing.
    pub stage_seconds: u64,
    /// `--provider`: whose API the emulator speaks (OpenAI's, or Voyage's).
    pub provider: Provider,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StatusTarget {
    Run(PathBuf),
    /// `--batch-file PATH/batch.json` (or the batch folder): one batch of a run.
    Batch(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunsConfig {
    pub family_id: Option<String>,
    pub json: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SubmitConfig {
    pub plan: PlanConfig,
    pub dry_run: bool,
    pub opts: AdvanceOptions,
}

/// `sync`: advance every unfinished run of the table, plan a run per family with pending
/// chunks, under one enqueued-token budget and one cost bound per call.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncConfig {
    /// The plan options of every family; `family_id` is empty (each family fills it in).
    /// `max_cost_usd` is the bound of the whole call, `limits.max_enqueued_tokens` the one
    /// budget shared by every run.
    pub plan: PlanConfig,
    /// `--family-id` (repeatable): only these families; empty means every family.
    pub family_ids: Vec<String>,
    /// `--families-sql`: the family ids to look at, for schemas where chunks reach their
    /// family through joins (with `--scope-sql`).
    pub families_sql: Option<String>,
    /// How each run is advanced (`max_enqueued_tokens` is the shared budget).
    pub opts: AdvanceOptions,
    /// Print what would be planned and advanced; write nothing, call no API.
    pub dry_run: bool,
    pub json: bool,
}

/// What the realtime path (`embed`, `serve`) embeds with: the chunk table and the model.
/// The family settings of `source` are unused there: chunks are looked up by id.
#[derive(Debug, Clone, PartialEq)]
pub struct RealtimeConfig {
    pub source: SourceConfig,
    pub model: String,
    /// `--dimensions`: must equal the column's vector(N).
    pub dimensions: Option<u32>,
    /// `--provider`: whose `/embeddings` endpoint answers.
    pub provider: Provider,
}

/// `embed --chunk-id ID…`: embeds those chunks now through `/v1/embeddings`.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedConfig {
    /// As given (trimmed), in order, repeats included: one stdout line each.
    pub chunk_ids: Vec<String>,
    pub realtime: RealtimeConfig,
    /// Write even where an embedding exists.
    pub overwrite: bool,
}

/// `serve --listen ADDR`: the realtime path as an HTTP service.
#[derive(Clone, PartialEq)]
pub struct ServeConfig {
    pub listen: std::net::SocketAddr,
    /// `EMBATCH_SERVE_TOKEN`: the bearer token every request but `/healthz` must carry. A
    /// secret: never printed, never logged.
    pub token: Option<String>,
    pub realtime: RealtimeConfig,
    /// Database connections in the pool.
    pub max_connections: usize,
    /// Client connections open at once; more wait (unaccepted) for one to close.
    pub max_http_connections: usize,
    /// How long a client may take to send a request's headers (and its body), and how long a
    /// kept-alive connection may sit idle, before it is closed.
    pub header_timeout: std::time::Duration,
}

// Written by hand so that the token never reaches a log line.
impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .field("realtime", &self.realtime)
            .field("max_connections", &self.max_connections)
            .field("max_http_connections", &self.max_http_connections)
            .field("header_timeout", &self.header_timeout)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Plan(PlanConfig),
    Status(StatusConfig),
    Runs(RunsConfig),
    Submit(SubmitConfig),
    Advance(AdvanceConfig),
    Ingest(IngestConfig),
    Run(RunConfig),
    Cancel(CancelConfig),
    Emulator(EmulatorCommandConfig),
    Embed(EmbedConfig),
    Serve(ServeConfig),
    Sync(SyncConfig),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub global: Global,
    pub command: Command,
}
