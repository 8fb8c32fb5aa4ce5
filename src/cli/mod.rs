//! The command line: clap's types live here and nowhere else.
//!
//! Arguments are parsed, checked and turned into a [`Config`] before any work starts; the
//! command modules never see clap. A flag beats the environment, which beats `.env` (loaded by
//! `main` before parsing through [`load_dotenv`], from the working folder only, without
//! overriding the environment).

use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{
    AdvanceConfig, AdvanceOptions, CancelConfig, Command, Config, Database, EmbedConfig,
    EmulatorCommandConfig, Global, IngestConfig, PlanConfig, RealtimeConfig, RunConfig, RunsConfig,
    ServeConfig, StatusConfig, StatusTarget, SubmitConfig, SyncConfig,
};
use crate::models::{DEFAULT_MODEL, EncodingFormat, InputType, Provider, TaskType};
use crate::pg::source::SourceConfig;
use crate::plan::sharder::BatchLimits;
use crate::printer::OutputSettings;
use crate::provider::connect::{ApiSettings, DirectEndpoint};
use crate::provider::direct::DirectOptions;
use crate::run::store::OnTooLong;

/// The exit codes, under the help of the commands where 75 ("not done yet, run again later",
/// or a lock held by another command) can happen.
const EXIT_CODES: &str = "Exit codes: 0 done, 75 not done yet (run again later, or the run is locked), 2 usage error, 1 any other error.";

/// Help headings. A command's own options come first, under clap's `Options`; then these
/// groups, in this order. The global options carry theirs (`Database`, `API`, `Output`); a
/// command's own options may be grouped under `Chunk table`, `Model`, `Batch limits` (plan's)
/// or `Advance` (what `run` passes on to its advance).
pub const HEADING_CHUNK_TABLE: &str = "Chunk table";
pub const HEADING_MODEL: &str = "Model";
pub const HEADING_BATCH_LIMITS: &str = "Batch limits";
pub const HEADING_ADVANCE: &str = "Advance";
pub const HEADING_DIRECT: &str = "Direct provider";
pub const HEADING_DATABASE: &str = "Database";
pub const HEADING_API: &str = "API";
pub const HEADING_OUTPUT: &str = "Output";

/// The global options each command has no use for: still accepted (old scripts pass them
/// everywhere), but not listed in its help.
fn unused_globals(command: &str) -> &'static [&'static str] {
    const API: [&str; 5] = [
        "api_key",
        "base_url",
        "organization",
        "project",
        "api_retries",
    ];
    match command {
        "plan" => &API,
        "runs" => &[
            "database_url",
            "api_key",
            "base_url",
            "organization",
            "project",
            "api_retries",
        ],
        // The emulator takes only the key it accepts.
        "emulator" => &[
            "database_url",
            "base_url",
            "organization",
            "project",
            "api_retries",
            "runs_dir",
        ],
        // `status --refresh` and `cancel` ask the provider but never write vectors.
        "status" | "cancel" => &["database_url", "runs_dir"],
        "advance" | "ingest" | "embed" | "serve" => &["runs_dir"],
        _ => &[],
    }
}

/// The command line definition as the parser and `--help` use it: clap's derive output with
/// each global option hidden from the commands that do not use it.
fn command() -> clap::Command {
    let mut cmd = Cli::command();
    // The build copies each global option into every subcommand that has no option of that
    // id yet: a hidden copy put there first keeps the option working there, out of its help.
    let globals: Vec<clap::Arg> = cmd.get_arguments().cloned().collect();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|sc| sc.get_name().to_owned())
        .collect();
    for name in names {
        for &id in unused_globals(&name) {
            if let Some(arg) = globals.iter().find(|a| a.get_id() == id) {
                // No heading: a hidden option's heading would still take its place in the order.
                let hidden = arg.clone().hide(true).help_heading(None);
                cmd = cmd.mut_subcommand(&name, |sc| sc.arg(hidden));
            }
        }
    }
    cmd
}

#[derive(Debug, Parser)]
#[command(
    name = "embatch",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("EMBATCH_COMMIT"), ")"),
    about = "Embed Postgres text chunks in bulk through the OpenAI Batch API into pgvector",
    long_about = "Embed the pending text chunks of one family through the OpenAI Batch API (half the price of the realtime endpoint) and write the vectors into a pgvector column. Each run is a crash-safe state machine in run.json.",
    after_help = "Start with `embatch plan --help`; a run goes plan → advance (again and again) → done.\n\n".to_owned() + EXIT_CODES
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: CommandArgs,
}

/// Options every command accepts (before or after its name). Listed after a command's own
/// options (`display_order` from 1000), and hidden from the commands that do not use them.
#[derive(Debug, Args)]
struct GlobalArgs {
    /// Postgres connection string; `sslmode` and `sslrootcert` mean what they mean to libpq
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true, value_name = "URL", help_heading = HEADING_DATABASE, display_order = 1000)]
    database_url: Option<String>,
    /// OpenAI API key (prefer the environment: a flag shows in the process list)
    #[arg(long, env = "OPENAI_API_KEY", global = true, hide_env_values = true, value_name = "KEY", help_heading = HEADING_API, display_order = 1010)]
    api_key: Option<String>,
    /// Base URL of the OpenAI-compatible API
    #[arg(
        long,
        env = "OPENAI_BASE_URL",
        global = true,
        hide_env_values = true,
        value_name = "URL",
        default_value = "https://api.openai.com/v1",
        help_heading = HEADING_API,
        display_order = 1011
    )]
    base_url: String,
    /// Sent as the OpenAI-Organization header
    #[arg(long, env = "OPENAI_ORG_ID", global = true, hide_env_values = true, value_name = "ID", help_heading = HEADING_API, display_order = 1012)]
    organization: Option<String>,
    /// Sent as the OpenAI-Project header
    #[arg(long, env = "OPENAI_PROJECT_ID", global = true, hide_env_values = true, value_name = "ID", help_heading = HEADING_API, display_order = 1013)]
    project: Option<String>,
    /// Retries of an API read or download after a 429, 5xx or connection error (with backoff)
    #[arg(long, env = "EMBATCH_API_RETRIES", global = true, hide_env_values = true, value_name = "N", default_value_t = 6, help_heading = HEADING_API, display_order = 1014)]
    api_retries: usize,
    /// Folder that holds the runs
    #[arg(
        long,
        env = "EMBATCH_RUNS_DIR",
        global = true,
        hide_env_values = true,
        value_name = "DIR",
        default_value = "./batches",
        help_heading = HEADING_OUTPUT,
        display_order = 1020
    )]
    runs_dir: PathBuf,
    /// Never show progress bars
    #[arg(long, global = true, help_heading = HEADING_OUTPUT, display_order = 1021)]
    no_progress: bool,
    /// Print only errors on stderr
    #[arg(short, long, global = true, conflicts_with = "verbose", help_heading = HEADING_OUTPUT, display_order = 1022)]
    quiet: bool,
    /// Print more detail on stderr
    #[arg(short, long, global = true, help_heading = HEADING_OUTPUT, display_order = 1023)]
    verbose: bool,
}

#[derive(Debug, Subcommand)]
enum CommandArgs {
    /// Select the pending chunks of a family and write the run folder; calls no API
    #[command(after_help = "Examples:\n  embatch plan --family-id \"$FAMILY\"              # prints the run folder on stdout\n  embatch plan --family-id \"$FAMILY\" --limit 100  # a trial on a new schema\n\n".to_owned() + EXIT_CODES)]
    Plan(PlanArgs),
    /// Show the batches of a run (read-only, never locks); needs --run-dir or --batch-file
    #[command(
        override_usage = "embatch status --run-dir <DIR> [OPTIONS]\n       embatch status --batch-file <FILE> [OPTIONS]",
        after_help = "Examples:\n  embatch status --run-dir \"$RUN\"\n  embatch status --run-dir \"$RUN\" --json\n  embatch status --batch-file \"$RUN/batches/batch_001/batch.json\"\n\n".to_owned() + EXIT_CODES
    )]
    Status(StatusArgs),
    /// List the runs under the runs dir, one line each
    #[command(
        after_help = "Examples:\n  embatch runs\n  embatch runs --family-id \"$FAMILY\" --json"
    )]
    Runs(RunsArgs),
    /// Move every batch of a run as far as it can go without waiting (exit 75: run it again later)
    #[command(after_help = "Examples:\n  embatch advance --run-dir \"$RUN\"            # one step; exit 75 = run again later\n  embatch advance --run-dir \"$RUN\" --wait --max-wait 26h\n\n".to_owned() + EXIT_CODES)]
    Advance(AdvanceArgs),
    /// Download and ingest what is complete; never uploads, creates or retries (never spends)
    #[command(after_help = "Examples:\n  embatch ingest --run-dir \"$RUN\"\n  embatch ingest --run-dir \"$RUN\" --redownload\n\n".to_owned() + EXIT_CODES)]
    Ingest(IngestArgs),
    /// Plan, then advance until the run is finished (polls every --poll-seconds)
    #[command(after_help = "Example:\n  embatch run --family-id \"$FAMILY\" --poll-seconds 60\n\n".to_owned() + EXIT_CODES)]
    Run(RunArgs),
    /// Cancel a run: no more creations or retries; remote batches are cancelled
    #[command(after_help = "Example:\n  embatch cancel --run-dir \"$RUN\"\n\n".to_owned() + EXIT_CODES)]
    Cancel(RunDirArgs),
    /// Run the built-in OpenAI-compatible emulator (try embatch with no API key)
    #[command(
        after_help = "Example:\n  embatch emulator --listen 127.0.0.1:8089 &\n  export OPENAI_BASE_URL=http://127.0.0.1:8089/v1 OPENAI_API_KEY=sk-emulator"
    )]
    Emulator(EmulatorArgs),
    /// Plan, then submit the batches (`--dry-run`: write the files only, call no API)
    #[command(after_help = "Examples:\n  embatch submit --family-id \"$FAMILY\"\n  embatch submit --family-id \"$FAMILY\" --dry-run\n\n".to_owned() + EXIT_CODES)]
    Submit(SubmitArgs),
    /// Embed the given chunks now through the realtime /v1/embeddings endpoint
    #[command(
        after_help = "Examples:\n  embatch embed --chunk-id \"$CHUNK\"\n  embatch embed --chunk-id \"$CHUNK\" --chunk-id \"$OTHER\" --overwrite\n\nstdout: one line per --chunk-id given, in order (repeats too): id, outcome, tokens (tab-separated).\nExit codes: 0 every chunk has an embedding, 1 some chunk was not embedded (the error names it), 2 usage error."
    )]
    Embed(EmbedArgs),
    /// Keep a whole table embedded: advance every unfinished run, plan a run per family with pending chunks (for cron)
    #[command(after_help = "Examples:\n  embatch sync --max-enqueued-tokens 3000000 --max-cost 20   # from cron, every 10 minutes\n  embatch sync --dry-run\n  embatch sync --wait --poll-seconds 300 --max-wait 26h       # as a service or CI job\n  embatch sync --embedding-column embedding_next --model text-embedding-3-large\n\nExit codes: 0 nothing pending and every run finished, 75 work is waiting on the provider (run again later; also when another sync holds the lock), 1 some family failed (the others were still served), 2 usage error, 130/143 --wait stopped by ctrl-c/SIGTERM (every run is saved).".to_owned())]
    Sync(SyncArgs),
    /// Serve the realtime path over HTTP: POST /api/v1/embed/chunk/{chunk_id}, GET /healthz
    #[command(
        after_help = "Example:\n  export EMBATCH_SERVE_TOKEN=$(openssl rand -hex 32)\n  embatch serve --listen 127.0.0.1:8080 &\n  curl -X POST -H \"Authorization: Bearer $EMBATCH_SERVE_TOKEN\" \\\n    http://127.0.0.1:8080/api/v1/embed/chunk/\"$CHUNK\"\n\nEMBATCH_SERVE_TOKEN is required on any address other than loopback. SIGTERM or ctrl-c stops it after the requests in flight."
    )]
    Serve(ServeArgs),
}

/// Where the chunks live: shared by `plan` (inside [`SourceArgs`]), `embed` and `serve`.
#[derive(Debug, Args)]
#[command(next_help_heading = HEADING_CHUNK_TABLE)]
struct ChunkColumnsArgs {
    /// Table holding the chunks (`schema.table` allowed)
    #[arg(long, value_name = "TABLE", default_value = "knowledge_chunks")]
    table: String,
    /// Primary key column (uuid, text or bigint)
    #[arg(long, value_name = "COLUMN", default_value = "id")]
    id_column: String,
    /// Column with the text to embed
    #[arg(long, value_name = "COLUMN", default_value = "content")]
    text_column: String,
    /// pgvector column that receives the embedding
    #[arg(long, value_name = "COLUMN", default_value = "embedding")]
    embedding_column: String,
    /// Column (bytea or text) that receives the sha256 of the content embedded; rows whose stored hash differs from their content's are pending again
    #[arg(long, value_name = "COLUMN")]
    content_hash_column: Option<String>,
}

/// The model and the vector size: shared by `plan`, `embed` and `serve`.
#[derive(Debug, Args)]
#[command(next_help_heading = HEADING_MODEL)]
struct ModelArgs {
    /// Embedding model
    #[arg(long, value_name = "MODEL", default_value = DEFAULT_MODEL)]
    model: String,
    /// Vector size; must equal the column's vector(N)
    #[arg(long, value_name = "N")]
    dimensions: Option<u32>,
    /// Who embeds: `openai` (the Batch API), `direct` (embatch sends the batch files itself to an OpenAI-compatible /v1/embeddings at EMBATCH_DIRECT_BASE_URL or --base-url), `voyage` (Voyage AI's Batch API, key in VOYAGE_API_KEY) or `gemini` (the Gemini API's batch mode, key in GEMINI_API_KEY)
    #[arg(long, value_enum, default_value_t = Provider::Openai)]
    provider: Provider,
    /// Voyage's input_type of a planned run's texts (ignored by other providers, and by embed and serve, which send `document`)
    #[arg(long, value_enum, value_name = "TYPE", default_value_t = InputType::Document)]
    input_type: InputType,
    /// Gemini's taskType of a planned run's texts (ignored by other providers, and by embed and serve, which send RETRIEVAL_DOCUMENT)
    #[arg(long, value_enum, value_name = "TYPE", default_value_t = TaskType::RetrievalDocument, ignore_case = true)]
    task_type: TaskType,
}

#[derive(Debug, Args)]
#[command(next_help_heading = HEADING_CHUNK_TABLE)]
struct SourceArgs {
    #[command(flatten)]
    columns: ChunkColumnsArgs,
    /// Column holding the family id
    #[arg(long, value_name = "COLUMN", default_value = "equipment_family_id")]
    family_column: String,
    /// Table whose `id` lists the families (`none` skips the check)
    #[arg(long, value_name = "TABLE", default_value = "equipment_families")]
    family_table: String,
    /// Query taking $1 = the family id and returning chunk ids (runs read-only); replaces --family-column
    #[arg(long, value_name = "SQL")]
    scope_sql: Option<String>,
}

#[derive(Debug, Args)]
struct PlanArgs {
    /// Id of the family whose pending chunks are embedded
    #[arg(long, value_name = "ID")]
    family_id: String,
    /// At most this many chunks (for trials)
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Embed every chunk of the family, not only those without an embedding
    #[arg(long)]
    reembed: bool,
    /// Take chunks even if an unfinished run of the family holds them
    #[arg(long)]
    force: bool,
    /// Refuse the plan if its estimated cost in US dollars is higher
    #[arg(long, value_name = "USD")]
    max_cost: Option<f64>,
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    batches: PlanBatchArgs,
}

/// The model options only plan takes (the price and the output encoding), and the limits of
/// each batch file.
#[derive(Debug, Args)]
struct PlanBatchArgs {
    /// `base64` makes output files about 4× smaller; try it on a tiny batch first
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = EncodingFormat::Float, help_heading = HEADING_MODEL)]
    encoding_format: EncodingFormat,
    /// Batch price per million tokens, overriding the built-in table
    #[arg(long, value_name = "USD", help_heading = HEADING_MODEL)]
    price_per_million_tokens: Option<f64>,
    /// Requests per batch file (provider maximum 50000)
    #[arg(long, value_name = "N", default_value_t = BatchLimits::MAX_REQUESTS, value_parser = clap::value_parser!(u32).range(1..=i64::from(BatchLimits::MAX_REQUESTS)), help_heading = HEADING_BATCH_LIMITS)]
    max_requests_per_batch: u32,
    /// Bytes per batch file (at most the provider's cap, 200 MiB = 209715200)
    #[arg(long, value_name = "BYTES", default_value_t = BatchLimits::DEFAULT_MAX_BYTES, value_parser = clap::value_parser!(u64).range(1..=BatchLimits::PROVIDER_MAX_BYTES), help_heading = HEADING_BATCH_LIMITS)]
    max_bytes_per_batch: u64,
    /// Tokens per batch file
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), help_heading = HEADING_BATCH_LIMITS)]
    max_tokens_per_batch: Option<u64>,
    /// Bound on tokens in flight; also caps each batch
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), help_heading = HEADING_BATCH_LIMITS)]
    max_enqueued_tokens: Option<u64>,
    /// What to do with a chunk over 8191 tokens
    #[arg(long, value_enum, value_name = "WHAT", default_value_t = OnTooLong::Skip, help_heading = HEADING_BATCH_LIMITS)]
    on_too_long: OnTooLong,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The run folder (run_…)
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "batch_file",
        conflicts_with = "batch_file"
    )]
    run_dir: Option<PathBuf>,
    /// One batch: its batch.json (or its folder)
    #[arg(long, value_name = "FILE")]
    batch_file: Option<PathBuf>,
    /// Print the stable JSON form
    #[arg(long)]
    json: bool,
    /// Ask the API first and save what it says
    #[arg(long, alias = "update-json")]
    refresh: bool,
}

#[derive(Debug, Args)]
struct RunDirArgs {
    /// The run folder (run_…)
    #[arg(long, value_name = "DIR")]
    run_dir: PathBuf,
}

#[derive(Debug, Args)]
struct WriteArgs {
    /// Write embeddings even where one is already present
    #[arg(long)]
    overwrite: bool,
    /// Rows per transaction when writing vectors
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    update_chunk_size: u64,
    /// Keep the remote input, output and error files after ingest
    #[arg(long)]
    keep_remote_files: bool,
}

#[derive(Debug, Args)]
struct StepArgs {
    #[command(flatten)]
    write: WriteArgs,
    /// Attempts per chunk before it is reported failed
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    max_attempts: u32,
    /// Seconds between polls while waiting
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    poll_seconds: u64,
    /// Give up waiting after this long (e.g. 90m, 26h); exit 75
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    max_wait: Option<std::time::Duration>,
    #[command(flatten, next_help_heading = HEADING_DIRECT)]
    direct: DirectArgs,
}

/// How a `--provider direct` run sends its requests (ignored for other providers).
#[derive(Debug, Args)]
struct DirectArgs {
    /// Direct runs: inputs per /v1/embeddings request
    #[arg(long, value_name = "N", default_value_t = crate::provider::direct::DEFAULT_INPUTS_PER_REQUEST, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=2048))]
    direct_batch_size: usize,
    /// Direct runs: bytes of input text per request (one larger input goes alone)
    #[arg(long, value_name = "BYTES", default_value_t = crate::provider::direct::DEFAULT_MAX_REQUEST_BYTES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    direct_max_request_bytes: usize,
    /// Direct runs: requests in flight at once
    #[arg(long, value_name = "N", default_value_t = crate::provider::direct::DEFAULT_CONCURRENCY, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    direct_concurrency: usize,
    /// Direct runs: at most this many requests per minute
    #[arg(long, value_name = "N")]
    max_requests_per_minute: Option<std::num::NonZeroU32>,
    /// Direct runs: at most this many input tokens per minute (cl100k_base estimate)
    #[arg(long, value_name = "N")]
    max_tokens_per_minute: Option<std::num::NonZeroU32>,
}

#[derive(Debug, Args)]
struct AdvanceArgs {
    /// The run folder (run_…)
    #[arg(long, value_name = "DIR")]
    run_dir: PathBuf,
    /// Loop until the run is finished
    #[arg(long)]
    wait: bool,
    /// Keep the tokens in flight under this bound (overrides the plan's)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_enqueued_tokens: Option<u64>,
    /// Direct runs: start no new request after this long (e.g. 10m), then exit 75 while work remains
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with = "wait")]
    direct_time_budget: Option<std::time::Duration>,
    #[command(flatten)]
    step: StepArgs,
}

#[derive(Debug, Args)]
struct IngestArgs {
    /// The run folder (run_…)
    #[arg(long, value_name = "DIR")]
    run_dir: PathBuf,
    #[command(flatten)]
    write: WriteArgs,
    /// Download the output files again
    #[arg(long)]
    redownload: bool,
    /// The vector size, checked against the run
    #[arg(long, value_name = "N")]
    dims: Option<u32>,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    plan: PlanArgs,
    #[command(flatten, next_help_heading = HEADING_ADVANCE)]
    step: StepArgs,
}

#[derive(Debug, Args)]
struct EmulatorArgs {
    /// Address to listen on
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8089")]
    listen: std::net::SocketAddr,
    /// Seconds a batch spends in each of validating, in_progress and finalizing
    #[arg(long, value_name = "SECONDS", default_value_t = 2)]
    stage_seconds: u64,
    /// Whose API it speaks: `openai`, `voyage` (Voyage AI's Batch API) or `gemini` (the Gemini API's batch mode)
    #[arg(long, value_enum, default_value_t = Provider::Openai, hide_possible_values = true)]
    provider: Provider,
}

#[derive(Debug, Args)]
struct RunsArgs {
    /// Only the runs of this family
    #[arg(long, value_name = "ID")]
    family_id: Option<String>,
    /// Print one JSON array on stdout, an object per run (`[]` when there is none)
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct EmbedArgs {
    /// Embed even chunks that already have an embedding
    #[arg(long)]
    overwrite: bool,
    /// A chunk to embed (repeat the flag for several; they share API requests)
    #[arg(long = "chunk-id", required = true, value_name = "ID")]
    chunk_ids: Vec<String>,
    #[command(flatten)]
    columns: ChunkColumnsArgs,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on; any address but loopback needs EMBATCH_SERVE_TOKEN
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Database connections in the pool shared by all requests
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1000))]
    max_connections: u64,
    /// Client connections open at once; more wait to be accepted until one closes
    #[arg(long, value_name = "N", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_http_connections: u32,
    /// Time a client has to send a request's headers and body, and that a kept-alive connection may sit idle (e.g. 30s)
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_header_timeout)]
    header_timeout: std::time::Duration,
    #[command(flatten)]
    columns: ChunkColumnsArgs,
    #[command(flatten)]
    model: ModelArgs,
}

fn parse_header_timeout(text: &str) -> Result<std::time::Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.is_zero() || duration > std::time::Duration::from_secs(3600) {
        return Err("must be more than 0 and at most 1h".to_owned());
    }
    Ok(duration)
}

/// `sync`: the plan options of every family (as `plan` takes them), which families, and the
/// advance options of every run.
#[derive(Debug, Args)]
struct SyncArgs {
    /// Only this family (repeat the flag for several); default: every family with pending chunks
    #[arg(long = "family-id", value_name = "ID")]
    family_ids: Vec<String>,
    /// Query returning the family ids to look at (one column; runs read-only), needed with --scope-sql
    #[arg(long, value_name = "SQL")]
    families_sql: Option<String>,
    /// At most this many chunks per family and call (for trials, or to plan a huge family in pieces)
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Embed every chunk of each family, not only the pending ones
    #[arg(long)]
    reembed: bool,
    /// Take chunks even if an unfinished run of the family holds them
    #[arg(long)]
    force: bool,
    /// Plan new runs only up to this estimated cost in US dollars in this call; the rest wait for a later call
    #[arg(long, value_name = "USD")]
    max_cost: Option<f64>,
    /// Attempts per chunk before it is reported failed
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    max_attempts: u32,
    /// Print what would be planned and advanced; write nothing, call no API
    #[arg(long)]
    dry_run: bool,
    /// Print the outcome as JSON on stdout
    #[arg(long)]
    json: bool,
    /// Keep going, a pass every --poll-seconds, until nothing waits on the provider (for a
    /// service or a CI job rather than cron)
    #[arg(long, conflicts_with = "dry_run")]
    wait: bool,
    /// With --wait: seconds between passes
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..), requires = "wait")]
    poll_seconds: u64,
    /// With --wait: stop after this long (e.g. 90m, 26h); exit 75
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires = "wait")]
    max_wait: Option<std::time::Duration>,
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// The batch limits of every run planned; --max-enqueued-tokens is one bound on the tokens
    /// in flight across all runs.
    #[command(flatten)]
    batches: PlanBatchArgs,
    #[command(flatten, next_help_heading = HEADING_ADVANCE)]
    write: WriteArgs,
    #[command(flatten, next_help_heading = HEADING_DIRECT)]
    direct: DirectArgs,
}

#[derive(Debug, Args)]
struct SubmitArgs {
    /// Write the files and metadata but call no API
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    plan: PlanArgs,
}

/// Loads `folder/.env` into the environment, never overriding a variable already set (clap
/// then reads the environment, and a flag beats both). Only that one file: never a `.env` of a
/// parent folder, which someone else may control and which could point `OPENAI_BASE_URL` at a
/// host that collects the key. No file is fine. A file that cannot be read or parsed is an
/// error naming it, and nothing of it is loaded; the message never quotes its lines, which may
/// hold secrets.
pub fn load_dotenv(folder: &Path) -> Result<(), String> {
    let path = folder.join(".env");
    let bytes = match fs_err::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(format!("{err}; fix its permissions or remove it")),
    };
    // dotenvy strips a byte order mark only when loading; strip it before checking too.
    let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let malformed = |why: String| {
        Err(format!(
            "{} is not a valid .env file ({why}); write one KEY=VALUE per line, quoting values with spaces, or remove the file",
            path.display()
        ))
    };
    for item in dotenvy::from_read_iter(text) {
        match item {
            Ok(_) => {}
            Err(dotenvy::Error::LineParse(line, _)) => {
                return malformed(match dotenv_key(&line) {
                    Some(key) => format!("the line that sets {key} cannot be parsed"),
                    None => "a line cannot be parsed".to_owned(),
                });
            }
            Err(dotenvy::Error::Io(err)) if err.kind() == std::io::ErrorKind::InvalidData => {
                return malformed("it is not UTF-8 text".to_owned());
            }
            Err(err) => return malformed(err.to_string()),
        }
    }
    dotenvy::from_read(text).or_else(|err| malformed(err.to_string()))
}

/// The variable name a malformed `.env` line sets, when it plainly has one: safe to print,
/// unlike the rest of the line.
fn dotenv_key(line: &str) -> Option<&str> {
    let line = line.trim_start();
    let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
    let key = line.split('=').next()?.trim();
    let plain = !key.is_empty()
        && key.len() <= 64
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    plain.then_some(key)
}

/// What parsing the command line produced, besides the config.
pub struct Parsed {
    pub config: Config,
    /// The API key came from `--api-key`: warn that it shows in the process list.
    pub api_key_on_command_line: bool,
    /// `--database-url` on the command line holds a password: warn likewise.
    pub database_password_on_command_line: bool,
}

/// Parses `args` (the program name first). Usage errors come back as clap errors, which the
/// caller prints and turns into exit code 2.
pub fn parse<I, T>(args: I) -> Result<Parsed, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = command().try_get_matches_from(args)?;
    let on_command_line = |id: &str| value_source(&matches, id) == Some(ValueSource::CommandLine);
    let api_key_on_command_line = on_command_line("api_key");
    let base_url_on_command_line = on_command_line("base_url");
    let database_url_on_command_line = on_command_line("database_url");
    let cli = Cli::from_arg_matches(&matches)?;
    let database_password_on_command_line = database_url_on_command_line
        && cli
            .global
            .database_url
            .as_deref()
            .is_some_and(connection_string_has_password);
    let config = into_config(cli, base_url_on_command_line, api_key_on_command_line)?;
    Ok(Parsed {
        config,
        api_key_on_command_line,
        database_password_on_command_line,
    })
}

/// Where a global argument's value came from (given before or after the subcommand).
fn value_source(matches: &ArgMatches, id: &str) -> Option<ValueSource> {
    matches.value_source(id).or_else(|| {
        matches
            .subcommand()
            .and_then(|(_, sub)| sub.value_source(id))
    })
}

/// Whether a Postgres connection string (URL or `key=value`) carries a password: in the URL's
/// user part, as a `password` query parameter, or as a `password` key. Only for the warning:
/// the string is not otherwise parsed here.
fn connection_string_has_password(conn: &str) -> bool {
    let conn = conn.trim();
    if let Some(rest) = conn
        .strip_prefix("postgresql://")
        .or_else(|| conn.strip_prefix("postgres://"))
    {
        let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
        let in_user_part = authority
            .rfind('@')
            .is_some_and(|at| authority[..at].contains(':'));
        let in_query = rest.split_once('?').is_some_and(|(_, query)| {
            query
                .split('&')
                .any(|pair| pair.split('=').next() == Some("password"))
        });
        return in_user_part || in_query;
    }
    // key=value: a `password` key at the start or after whitespace, spaces allowed before `=`.
    conn.match_indices("password").any(|(at, key)| {
        let starts_a_key = conn[..at]
            .chars()
            .next_back()
            .is_none_or(char::is_whitespace);
        starts_a_key && conn[at + key.len()..].trim_start().starts_with('=')
    })
}

fn into_config(
    cli: Cli,
    base_url_on_command_line: bool,
    api_key_on_command_line: bool,
) -> Result<Config, clap::Error> {
    let g = cli.global;
    // `--provider direct` and `voyage` never take OpenAI's variables: `--base-url`, else the
    // provider's own variable (Voyage then falls back to its own URL); `--api-key`, else the
    // provider's key variable.
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let endpoint = |provider: Provider| DirectEndpoint {
        base_url: if base_url_on_command_line {
            Some(g.base_url.clone())
        } else {
            env(provider.base_url_var())
        }
        .map(|url| url.trim_end_matches('/').to_owned()),
        api_key: if api_key_on_command_line {
            g.api_key.clone().filter(|s| !s.is_empty())
        } else {
            env(provider.key_var())
        },
    };
    let direct = endpoint(Provider::Direct);
    let voyage = endpoint(Provider::Voyage);
    let gemini = endpoint(Provider::Gemini);
    let global = Global {
        database: Database::from_url(g.database_url.as_deref()),
        api: ApiSettings {
            api_key: g.api_key.filter(|s| !s.is_empty()),
            base_url: g.base_url.trim_end_matches('/').to_owned(),
            organization: g.organization.filter(|s| !s.is_empty()),
            project: g.project.filter(|s| !s.is_empty()),
            max_retries: g.api_retries,
            direct,
            voyage,
            gemini,
        },
        runs_dir: g.runs_dir,
        output: OutputSettings {
            quiet: g.quiet,
            verbose: g.verbose,
            progress: !g.no_progress && !g.quiet,
        },
    };
    let command = match cli.command {
        CommandArgs::Plan(args) => Command::Plan(plan_config(args)?),
        CommandArgs::Status(args) => Command::Status(StatusConfig {
            target: match (args.run_dir, args.batch_file) {
                (_, Some(batch)) => StatusTarget::Batch(batch),
                (Some(run), None) => StatusTarget::Run(run),
                (None, None) => {
                    return Err(usage_error("status needs --run-dir or --batch-file"));
                }
            },
            json: args.json,
            refresh: args.refresh,
        }),
        CommandArgs::Advance(args) => Command::Advance(AdvanceConfig {
            run_dir: args.run_dir,
            opts: {
                let mut opts = AdvanceOptions {
                    wait: args.wait,
                    max_enqueued_tokens: args.max_enqueued_tokens,
                    ..step_options(args.step)
                };
                opts.direct.time_budget = args.direct_time_budget;
                opts
            },
        }),
        CommandArgs::Ingest(args) => Command::Ingest(IngestConfig {
            run_dir: args.run_dir,
            opts: AdvanceOptions {
                redownload: args.redownload,
                dims: args.dims,
                ..write_options(args.write)
            },
        }),
        CommandArgs::Run(args) => Command::Run(RunConfig {
            plan: plan_config(args.plan)?,
            opts: AdvanceOptions {
                wait: true,
                ..step_options(args.step)
            },
        }),
        CommandArgs::Cancel(args) => Command::Cancel(CancelConfig {
            run_dir: args.run_dir,
        }),
        CommandArgs::Emulator(args) => Command::Emulator(EmulatorCommandConfig {
            listen: args.listen,
            stage_seconds: args.stage_seconds,
            provider: args.provider,
        }),
        CommandArgs::Runs(args) => Command::Runs(RunsConfig {
            family_id: args.family_id,
            json: args.json,
        }),
        CommandArgs::Submit(args) => Command::Submit(SubmitConfig {
            plan: plan_config(args.plan)?,
            dry_run: args.dry_run,
            opts: AdvanceOptions::default(),
        }),
        CommandArgs::Sync(args) => Command::Sync(sync_config(args)?),
        CommandArgs::Embed(args) => {
            // Repeats are kept: `embed` prints one line per id given (a repeat is embedded
            // once and counted once).
            let mut chunk_ids: Vec<String> = Vec::with_capacity(args.chunk_ids.len());
            for id in args.chunk_ids {
                let id = id.trim().to_owned();
                if id.is_empty() {
                    return Err(usage_error("--chunk-id must not be empty"));
                }
                chunk_ids.push(id);
            }
            Command::Embed(EmbedConfig {
                chunk_ids,
                realtime: realtime_config(args.columns, args.model)?,
                overwrite: args.overwrite,
            })
        }
        CommandArgs::Serve(args) => Command::Serve(ServeConfig {
            listen: args.listen,
            token: std::env::var("EMBATCH_SERVE_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
            realtime: realtime_config(args.columns, args.model)?,
            max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
            max_http_connections: usize::try_from(args.max_http_connections).unwrap_or(usize::MAX),
            header_timeout: args.header_timeout,
        }),
    };
    Ok(Config { global, command })
}

fn write_options(args: WriteArgs) -> AdvanceOptions {
    AdvanceOptions {
        overwrite: args.overwrite,
        update_chunk_size: usize::try_from(args.update_chunk_size).unwrap_or(usize::MAX),
        keep_remote_files: args.keep_remote_files,
        ..AdvanceOptions::default()
    }
}

/// `advance` and `run`: the only commands whose direct runs send requests.
fn step_options(args: StepArgs) -> AdvanceOptions {
    AdvanceOptions {
        max_attempts: args.max_attempts,
        poll: std::time::Duration::from_secs(args.poll_seconds),
        max_wait: args.max_wait,
        direct: direct_options(args.direct),
        ..write_options(args.write)
    }
}

/// How the direct runs of a command that sends (`advance`, `run`, `sync`) send.
fn direct_options(d: DirectArgs) -> DirectOptions {
    DirectOptions {
        inputs_per_request: d.direct_batch_size,
        max_request_bytes: d.direct_max_request_bytes,
        concurrency: d.direct_concurrency,
        max_requests_per_minute: d.max_requests_per_minute,
        max_tokens_per_minute: d.max_tokens_per_minute,
        time_budget: None,
        send: true,
    }
}

fn usage_error(message: &str) -> clap::Error {
    command().error(clap::error::ErrorKind::ValueValidation, message)
}

/// The chunk table's names, checked non-empty; the family settings keep their defaults
/// (unused by the realtime path).
fn chunk_source(c: ChunkColumnsArgs) -> Result<SourceConfig, clap::Error> {
    for (flag, value) in [
        ("--table", &c.table),
        ("--id-column", &c.id_column),
        ("--text-column", &c.text_column),
        ("--embedding-column", &c.embedding_column),
    ] {
        if value.is_empty() {
            return Err(usage_error(&format!("{flag} must not be empty")));
        }
    }
    if c.content_hash_column.as_deref() == Some("") {
        return Err(usage_error("--content-hash-column must not be empty"));
    }
    Ok(SourceConfig {
        table: c.table,
        id_column: c.id_column,
        text_column: c.text_column,
        embedding_column: c.embedding_column,
        content_hash_column: c.content_hash_column,
        ..SourceConfig::default()
    })
}

fn check_model(m: &ModelArgs) -> Result<(), clap::Error> {
    if m.model.trim().is_empty() {
        return Err(usage_error("--model must not be empty"));
    }
    if m.dimensions == Some(0) {
        return Err(usage_error("--dimensions must be at least 1"));
    }
    Ok(())
}

fn realtime_config(
    columns: ChunkColumnsArgs,
    model: ModelArgs,
) -> Result<RealtimeConfig, clap::Error> {
    check_model(&model)?;
    Ok(RealtimeConfig {
        source: chunk_source(columns)?,
        model: model.model,
        dimensions: model.dimensions,
        provider: model.provider,
    })
}

/// `sync`'s settings: its plan options go through [`plan_config`] (the same checks as
/// `plan`'s), with the family left empty (each planned family fills it in).
fn sync_config(args: SyncArgs) -> Result<SyncConfig, clap::Error> {
    let mut family_ids = Vec::with_capacity(args.family_ids.len());
    for id in args.family_ids {
        let id = id.trim().to_owned();
        if id.is_empty() {
            return Err(usage_error("--family-id must not be empty"));
        }
        family_ids.push(id);
    }
    let families_sql = args
        .families_sql
        .map(|q| q.trim().trim_end_matches(';').trim().to_owned())
        .filter(|q| !q.is_empty());
    let has_scope = args
        .source
        .scope_sql
        .as_deref()
        .is_some_and(|q| !q.trim().is_empty());
    if has_scope && families_sql.is_none() && family_ids.is_empty() {
        return Err(usage_error(
            "with --scope-sql, sync needs --families-sql (a query returning the family ids) or --family-id",
        ));
    }
    let write = args.write;
    let opts = AdvanceOptions {
        max_attempts: args.max_attempts,
        max_enqueued_tokens: args.batches.max_enqueued_tokens,
        wait: args.wait,
        poll: std::time::Duration::from_secs(args.poll_seconds),
        max_wait: args.max_wait,
        // sync moves runs as `advance` does: the batches of a direct run are sent.
        direct: direct_options(args.direct),
        ..write_options(write)
    };
    let mut plan = plan_config(PlanArgs {
        // A placeholder that passes the check; each family planned replaces it.
        family_id: "sync".to_owned(),
        limit: args.limit,
        reembed: args.reembed,
        force: args.force,
        max_cost: args.max_cost,
        source: args.source,
        model: args.model,
        batches: args.batches,
    })?;
    plan.family_id = String::new();
    Ok(SyncConfig {
        plan,
        family_ids,
        families_sql,
        opts,
        dry_run: args.dry_run,
        json: args.json,
    })
}

fn plan_config(args: PlanArgs) -> Result<PlanConfig, clap::Error> {
    if args.family_id.trim().is_empty() {
        return Err(usage_error("--family-id must not be empty"));
    }
    for (flag, value) in [
        ("--max-cost", args.max_cost),
        (
            "--price-per-million-tokens",
            args.batches.price_per_million_tokens,
        ),
    ] {
        if let Some(v) = value
            && !(v.is_finite() && v >= 0.0)
        {
            return Err(usage_error(&format!(
                "{flag} must be a number >= 0, got {v}"
            )));
        }
    }
    check_model(&args.model)?;
    let b = args.batches;
    let s = args.source;
    let chunks = chunk_source(s.columns)?;
    for (flag, value) in [
        ("--family-column", &s.family_column),
        ("--family-table", &s.family_table),
    ] {
        if value.is_empty() {
            return Err(usage_error(&format!("{flag} must not be empty")));
        }
    }
    let scope_sql = s
        .scope_sql
        .map(|q| q.trim().trim_end_matches(';').trim().to_owned())
        .filter(|q| !q.is_empty());
    Ok(PlanConfig {
        family_id: args.family_id,
        source: SourceConfig {
            family_column: s.family_column,
            family_table: (!s.family_table.eq_ignore_ascii_case("none")).then_some(s.family_table),
            scope_sql,
            ..chunks
        },
        limit: args.limit,
        model: args.model.model,
        dimensions: args.model.dimensions,
        provider: args.model.provider,
        input_type: args.model.input_type,
        task_type: args.model.task_type,
        encoding_format: b.encoding_format,
        limits: BatchLimits {
            max_requests: b.max_requests_per_batch,
            max_bytes: b.max_bytes_per_batch,
            max_tokens: b.max_tokens_per_batch,
            max_enqueued_tokens: b.max_enqueued_tokens,
        },
        on_too_long: b.on_too_long,
        reembed: args.reembed,
        force: args.force,
        max_cost_usd: args.max_cost,
        usd_per_million_tokens: b.price_per_million_tokens,
    })
}

#[cfg(test)]
mod tests;
