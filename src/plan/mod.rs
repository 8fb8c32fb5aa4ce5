//! `plan`: select the pending chunks of a family, shard them, and write the run folder
//! (DESIGN.md §4, §6, §7). Calls no API.
//!
//! The stage's parts: `tokens` (cl100k_base counting and truncation), `request` (the exact
//! JSONL request line), `sharder` (pure: where one batch ends and the next begins), `writer`
//! (rows in, batch folders out; also what retries write with). This module is the command:
//! selection through `pg::source`, the family lock, the partial folder, the report.
//!
//! The folder is written under a hidden `.partial-…` name and renamed into place only when
//! complete, so a failed plan leaves no half-written run behind. Rows stream from the
//! database straight into the batch files: memory does not grow with the family.
//!
//! A family is known by its id as the database reads it (its canonical text), whatever the
//! spelling given. From reading the chunks other runs hold until the new run is in place, the
//! plan holds the family lock (`lock::FamilyLock`), so two plans of one family never take the
//! same chunk. SIGINT or SIGTERM removes the partial folder and cancels the query.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};

use crate::config::{Global, PlanConfig};
use crate::interrupt::{self, Interrupted};
use crate::models;
use crate::pg::conn::DbTarget;
use crate::pg::source::{self, FamilyIdType, Source};
use crate::plan::request::RequestTemplate;
use crate::printer::{Printer, count, number};
use crate::run::folders::{self, HeldChunks};
use crate::run::layout::{self, PARTIAL_PREFIX, SKIPPED_FILE};
use crate::run::lock::{self, FamilyLock};
use crate::run::store::{self, PlanSummary, RunFile, RunSettings};

pub mod request;
pub mod sharder;
pub mod tokens;
mod writer;

pub use writer::{Numbering, SkipReason};
pub(crate) use writer::{RunWriter, Written};
use writer::{create_private_dir, make_private_dir};

/// Rows prepared per round by one worker thread: ~400 KB of text, far more work than handing
/// a round over, and little memory.
const ROWS_PER_ROUND: usize = 512;

/// The outcome of a plan: the run folder, or why there is none.
pub enum PlanOutcome {
    Planned {
        run_dir: PathBuf,
    },
    /// No chunk needs sending (or every one is held by a run already on its way).
    NothingToDo,
    /// Nothing new to plan because runs planned but never submitted (by `plan` or `submit
    /// --dry-run`) hold `chunks` of the pending chunks: they wait for `advance`.
    HeldByUnsubmitted {
        family_id: String,
        chunks: u64,
        runs: Vec<PathBuf>,
    },
}

/// A plan refused because its estimated cost is over `--max-cost` (nothing was written):
/// `sync` tells it from other failures, and leaves the family for a later call.
#[derive(Debug, thiserror::Error)]
#[error(
    "the estimated cost ${cost:.4} is over --max-cost ${max:.4}; raise --max-cost or plan fewer chunks (--limit)"
)]
pub struct OverMaxCost {
    pub cost: f64,
    pub max: f64,
}

/// What an interrupted plan must clean up, filled in as the plan goes.
#[derive(Default)]
struct Progress {
    partial_dir: Option<PathBuf>,
    cancel: Option<(DbTarget, tokio_postgres::CancelToken)>,
}

/// How long an interrupted plan tries to cancel its query before it exits anyway.
const CANCEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `plan` and reports on stderr; the caller prints the folder on stdout.
///
/// SIGINT or SIGTERM stops it: the partial folder is removed, the query running in the
/// database is cancelled, and the error is [`Interrupted`] (exit 130 or 143).
pub async fn plan(
    global: &Global,
    cfg: &PlanConfig,
    printer: &Printer,
    now: DateTime<Utc>,
) -> anyhow::Result<PlanOutcome> {
    let guard = interrupt::Guard::install().context("could not set up the signal handlers")?;
    let mut progress = Progress::default();
    let finished = {
        let work = std::pin::pin!(plan_uninterrupted(global, cfg, printer, now, &mut progress));
        let signal = std::pin::pin!(guard.wait());
        match futures_util::future::select(work, signal).await {
            futures_util::future::Either::Left((result, _)) => Ok(result),
            futures_util::future::Either::Right((signal, _)) => Err(signal),
        }
    };
    // The plan's future is gone here: its files are closed and its locks released.
    let signal = match finished {
        Ok(Ok(PlanOutcome::Planned { run_dir })) if guard.received().is_some() => {
            // The signal came as the run was being renamed into place: it stays, unsent.
            return Err(Interrupted {
                signal: guard.received().unwrap_or_default(),
                what: format!("; the run {} was written just before", run_dir.display()),
            }
            .into());
        }
        Ok(result) => return result,
        Err(signal) => signal,
    };
    let mut what = String::new();
    if let Some((target, token)) = progress.cancel.take() {
        let cancelled = tokio::time::timeout(CANCEL_TIMEOUT, target.cancel_query(&token)).await;
        if !matches!(cancelled, Ok(Ok(()))) {
            what.push_str("; the query in the database could not be cancelled");
        }
    }
    if let Some(partial) = progress.partial_dir.take() {
        remove_partial(&partial);
        what.push_str(&format!(
            "; removed the partial run folder {}",
            partial.display()
        ));
    }
    what.push_str("; no run was created");
    Err(Interrupted { signal, what }.into())
}

async fn plan_uninterrupted(
    global: &Global,
    cfg: &PlanConfig,
    printer: &Printer,
    now: DateTime<Utc>,
    progress: &mut Progress,
) -> anyhow::Result<PlanOutcome> {
    cfg.limits.validate()?;
    // The tokenizer's tables are built while we connect and check the catalog, on a thread of
    // its own that ends before the worker threads count (see `tokens::warm_up`).
    let warm_up = std::thread::spawn(tokens::warm_up);
    let target = global.database()?.clone();
    let mut client = target.connect().await?;
    progress.cancel = Some((target.clone(), client.cancel_token()));
    let source = Source::inspect(&client, &cfg.source).await?;
    warn_vector_indexes(&client, &source, printer).await;
    let (family, family_type) = resolve_family(&client, &source, cfg, printer).await?;

    if models::lookup_for(cfg.provider, &cfg.model).is_none() {
        printer.warn(&unknown_model_warning(cfg, source.dimensions));
    }
    let dims =
        models::choose_dimensions_for(cfg.provider, &cfg.model, source.dimensions, cfg.dimensions)?;
    let identity = source::database_identity(&client).await?;

    let family_dir = layout::family_dir(&global.runs_dir, &family);
    create_family_dir(&global.runs_dir, &family_dir)?;
    // From reading the held chunks until the run is in place, no other plan of the family
    // runs, on this machine or another one using the same database.
    let family_lock = FamilyLock::acquire(
        &family_dir,
        &client,
        lock::plan_lock_key(&source.table_identity, &family),
        &family,
        &format!("embatch plan --family-id {family}"),
    )
    .await?;
    let held = if cfg.force {
        HeldChunks::default()
    } else {
        let dirs = folders_of_family(
            &global.runs_dir,
            &family_dir,
            &family,
            &family_type,
            &client,
        )
        .await?;
        folders::held_chunks(&dirs)?
    };

    let (name, partial_dir) = reserve_partial_dir(&family_dir, now)?;
    progress.partial_dir = Some(partial_dir.clone());
    let template = RequestTemplate {
        model: cfg.model.clone(),
        dimensions: dims.send_dimensions.then_some(dims.dimensions),
        encoding_format: cfg.encoding_format,
        provider: cfg.provider,
        task_type: (cfg.provider == models::Provider::Gemini).then_some(cfg.task_type),
    };
    let writer = RunWriter::new(
        &partial_dir,
        template,
        cfg.on_too_long,
        cfg.limits,
        &held,
        Numbering::FIRST_ATTEMPT,
        &partial_dir.join(SKIPPED_FILE),
    )?;
    // A panic there would come back at the first count; nothing to report here.
    let _ = warm_up.join();
    let written =
        match write_pending(&mut client, &source, &family, cfg, &held, writer, printer).await {
            Ok(written) => written,
            Err(err) => {
                remove_partial(&partial_dir);
                return Err(err);
            }
        };

    let price = models::price_per_million_for(cfg.provider, &cfg.model, cfg.usd_per_million_tokens);
    let summary = summarize(&written, price);
    let over_cost = match (cfg.max_cost_usd, summary.estimated_cost_usd) {
        (Some(max), Some(cost)) => (cost > max).then_some((cost, max)),
        _ => None,
    };
    let run_dir = family_dir.join(&name.folder);
    let creates_run = !written.batches.is_empty() && over_cost.is_none();
    report(
        printer,
        cfg,
        dims.dimensions,
        &family,
        &summary,
        &written,
        &held,
        price,
        creates_run.then_some(run_dir.as_path()),
    );

    if written.batches.is_empty() {
        remove_partial(&partial_dir);
        return Ok(nothing_planned(&written, &held, family, printer));
    }
    if let Some((cost, max)) = over_cost {
        remove_partial(&partial_dir);
        return Err(OverMaxCost { cost, max }.into());
    }

    let run = RunFile {
        schema_version: store::SCHEMA_VERSION,
        run_id: name.run_id.clone(),
        family_id: family.clone(),
        created_at: now,
        updated_at: now,
        embatch_version: env!("CARGO_PKG_VERSION").to_owned(),
        settings: run_settings(cfg, &source, &dims, price),
        database: identity,
        plan: summary,
        cancelled: false,
        retry_given_up: 0,
        batches: written.batches,
    };
    put_in_place(&run, &partial_dir, &family_dir, &run_dir)?;
    progress.partial_dir = None;
    family_lock.release(&client).await;
    Ok(PlanOutcome::Planned { run_dir })
}

/// The plan's figures, as `run.json` records them.
fn summarize(written: &Written, price: Option<f64>) -> PlanSummary {
    PlanSummary {
        chunks: written.chunks,
        skipped: written.skipped.values().sum(),
        truncated: written.truncated,
        held_by_other_runs: written.held.iter().sum(),
        tokens: written.tokens,
        estimated_cost_usd: price.map(|p| models::estimate_cost(written.tokens, p)),
    }
}

/// The settings every later command of the run reads back.
fn run_settings(
    cfg: &PlanConfig,
    source: &Source,
    dims: &models::DimensionChoice,
    price: Option<f64>,
) -> RunSettings {
    RunSettings {
        source: source.settings(),
        model: cfg.model.clone(),
        dimensions: dims.dimensions,
        send_dimensions: dims.send_dimensions,
        encoding_format: cfg.encoding_format,
        limits: cfg.limits,
        reembed: cfg.reembed,
        on_too_long: cfg.on_too_long,
        limit: cfg.limit,
        usd_per_million_tokens: price,
        provider: cfg.provider,
        input_type: (cfg.provider == models::Provider::Voyage).then_some(cfg.input_type),
        task_type: (cfg.provider == models::Provider::Gemini).then_some(cfg.task_type),
    }
}

/// The family as the database reads it (its canonical text) and the type of its id. One
/// family, one identity: the canonical id names the runs folder, the held chunks, the lock and
/// run.json, whichever way it was spelled.
async fn resolve_family(
    client: &tokio_postgres::Client,
    source: &Source,
    cfg: &PlanConfig,
    printer: &Printer,
) -> anyhow::Result<(String, FamilyIdType)> {
    let family_type = source.family_id_type(client).await?;
    let family = family_type.canonical(client, &cfg.family_id).await?;
    if family != cfg.family_id {
        printer.verbose(&format!(
            "family id {} reads as {family} in the database",
            cfg.family_id
        ));
    }
    name_session(client, &family).await;
    source.check_family(client, &family).await?;
    Ok((family, family_type))
}

/// Streams the family's pending rows into the writer and finishes its batch files.
/// `--limit N` counts the chunks no other run holds: the query reads at most N more rows than
/// chunks are held, and rows past the N-th unheld one are let go.
async fn write_pending(
    client: &mut tokio_postgres::Client,
    source: &Source,
    family: &str,
    cfg: &PlanConfig,
    held: &HeldChunks,
    mut writer: RunWriter<'_>,
    printer: &Printer,
) -> anyhow::Result<Written> {
    let bar = printer.row_counter("planning");
    let sql_limit = cfg
        .limit
        .map(|limit| limit.saturating_add(held.len() as u64));
    let mut unheld = 0u64;
    // Rows go to the writer in rounds, so that each round's tokenizing runs on two threads.
    let mut round = Vec::with_capacity(ROWS_PER_ROUND);
    let streamed = source
        .stream_pending(client, family, cfg.reembed, sql_limit, |row| {
            if let Some(limit) = cfg.limit {
                if unheld >= limit {
                    return Ok(());
                }
                if held.is_empty() || held.holder(row.id()?).is_none() {
                    unheld += 1;
                }
            }
            bar.inc(1);
            round.push(row);
            if round.len() >= ROWS_PER_ROUND {
                writer.add_many(std::mem::replace(
                    &mut round,
                    Vec::with_capacity(ROWS_PER_ROUND),
                ))?;
            }
            Ok(())
        })
        .await;
    bar.finish_and_clear();
    streamed?;
    writer.add_many(round)?;
    writer.finish()
}

/// No batch was written: the chunks are all held by runs never submitted (they wait for
/// `advance`), or nothing needs sending.
fn nothing_planned(
    written: &Written,
    held: &HeldChunks,
    family: String,
    printer: &Printer,
) -> PlanOutcome {
    let unsubmitted: Vec<(PathBuf, u64)> = written
        .held
        .iter()
        .zip(&held.runs)
        .filter(|(n, run)| **n > 0 && run.unsubmitted)
        .map(|(n, run)| (run.dir.clone(), *n))
        .collect();
    if written.chunks == 0 && !unsubmitted.is_empty() {
        return PlanOutcome::HeldByUnsubmitted {
            family_id: family,
            chunks: unsubmitted.iter().map(|(_, n)| n).sum(),
            runs: unsubmitted.into_iter().map(|(dir, _)| dir).collect(),
        };
    }
    printer.info(&format!(
        "nothing to embed for family {family}: no pending chunk needs sending; no run created"
    ));
    PlanOutcome::NothingToDo
}

/// Saves `run.json` in the partial folder and renames it into place; on failure the partial
/// folder is removed.
fn put_in_place(
    run: &RunFile,
    partial_dir: &Path,
    family_dir: &Path,
    run_dir: &Path,
) -> anyhow::Result<()> {
    let finished = store::save(partial_dir, run)
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            fs_err::rename(partial_dir, run_dir)?;
            store::sync_dir(family_dir)?;
            Ok(())
        });
    if let Err(err) = finished {
        remove_partial(partial_dir);
        return Err(err.context(format!(
            "could not write the run folder {}",
            run_dir.display()
        )));
    }
    Ok(())
}

/// Warns about an HNSW or IVFFlat index on the embedding column here, where the user decides
/// whether to drop it before the backfill (`advance` warns again before it writes). Best effort:
/// a catalog that cannot be read only costs the warning.
async fn warn_vector_indexes(client: &tokio_postgres::Client, source: &Source, printer: &Printer) {
    let settings = source.settings();
    if let Ok(indexes) = crate::pg::sink::ann_indexes(client, &settings).await {
        for index in indexes {
            printer.warn(&index.slow_write_warning(&settings.table, &settings.embedding_column));
        }
    }
}

/// Names the plan's database session `embatch plan <family>` (unless the connection string
/// named it), so that a plan waiting for the family's advisory lock can name its holder.
async fn name_session(client: &tokio_postgres::Client, family: &str) {
    // Best effort: only a message depends on it.
    let _ = client
        .execute(
            "SELECT set_config('application_name', $1, false) WHERE current_setting('application_name') = ''",
            &[&format!("embatch plan {family}")],
        )
        .await;
}

/// Creates the family's folder under the runs dir; a name the file system refuses as too long
/// says so.
fn create_family_dir(runs_dir: &Path, family_dir: &Path) -> anyhow::Result<()> {
    match create_private_dir(family_dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::InvalidFilename => {
            let name = family_dir
                .file_name()
                .map(|n| n.len())
                .unwrap_or_default();
            bail!(
                "the family id is too long to name its folder under the runs dir {} ({name} bytes once percent-encoded; the file system refused it, most allow 255): embatch keeps a family's runs in a folder named after its id, so plan this family with --scope-sql and a shorter key that selects the same chunks",
                runs_dir.display()
            )
        }
        Err(err) => Err(anyhow::Error::from(err).context(format!(
            "cannot write the runs dir {}; choose a writable folder with --runs-dir or EMBATCH_RUNS_DIR",
            runs_dir.display()
        ))),
    }
}

/// The folders under the runs dir holding runs of `family` (canonical): its own, and any
/// named after another spelling of the same id — runs planned before plans used the
/// database's spelling.
async fn folders_of_family(
    runs_dir: &Path,
    family_dir: &Path,
    family: &str,
    family_type: &FamilyIdType,
    client: &tokio_postgres::Client,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut dirs = vec![family_dir.to_path_buf()];
    if family_type.is_verbatim() {
        return Ok(dirs);
    }
    let candidates: Vec<(PathBuf, String)> = folders::family_folders(runs_dir)?
        .into_iter()
        .filter(|(dir, id)| dir != family_dir && !family_type.is_surely_canonical(id))
        .collect();
    // Asked all at once: tokio-postgres pipelines the queries on the one connection, so many
    // folders cost about one round trip.
    let answers = futures_util::future::join_all(
        candidates
            .iter()
            .map(|(_, id)| family_type.try_canonical(client, id)),
    )
    .await;
    for ((dir, _), answer) in candidates.into_iter().zip(answers) {
        if answer?.as_deref() == Some(family) {
            dirs.push(dir);
        }
    }
    Ok(dirs)
}

/// Picks a run name whose final and partial folders are both free, and creates the partial
/// one. Two plans in the same second get different random suffixes.
fn reserve_partial_dir(
    family_dir: &Path,
    now: DateTime<Utc>,
) -> anyhow::Result<(layout::RunName, PathBuf)> {
    for _ in 0..16 {
        let name = layout::run_name(now, rand::random());
        let partial = family_dir.join(format!("{PARTIAL_PREFIX}{}", name.folder));
        if family_dir.join(&name.folder).exists() {
            continue;
        }
        match make_private_dir(&partial, false) {
            Ok(()) => return Ok((name, partial)),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => {
                return Err(anyhow::Error::from(err).context(format!(
                    "cannot write the runs dir {}; choose a writable folder with --runs-dir",
                    family_dir.display()
                )));
            }
        }
    }
    bail!(
        "could not find a free run folder name under {}",
        family_dir.display()
    )
}

fn remove_partial(partial_dir: &Path) {
    // Best effort: the error that brought us here matters more than a failed clean-up.
    let _ = fs_err::remove_dir_all(partial_dir);
}

#[allow(clippy::too_many_arguments)]
fn report(
    printer: &Printer,
    cfg: &PlanConfig,
    dimensions: u32,
    family: &str,
    summary: &PlanSummary,
    written: &Written,
    held: &HeldChunks,
    price: Option<f64>,
    run_dir: Option<&Path>,
) {
    printer.info(&format!(
        "family {family}: {} to embed ({}) in {}, {}, {dimensions} dims",
        count(summary.chunks, "chunk", "chunks"),
        count(summary.tokens, "token", "tokens"),
        count(written.batches.len() as u64, "batch", "batches"),
        cfg.model,
    ));
    if summary.skipped > 0 {
        let reasons: Vec<String> = written
            .skipped
            .iter()
            .map(|(reason, n)| format!("{}: {}", reason.as_str(), number(*n)))
            .collect();
        // skipped.tsv exists only in a run that is created.
        let listed = match run_dir {
            Some(dir) => format!("; listed in {}", dir.join(SKIPPED_FILE).display()),
            None => String::new(),
        };
        printer.info(&format!(
            "skipped {}, never sent ({}){listed}",
            count(summary.skipped, "chunk", "chunks"),
            reasons.join(", ")
        ));
    }
    if summary.truncated > 0 && cfg.provider == models::Provider::Gemini {
        printer.info(&format!(
            "truncated {} to {} bytes (--on-too-long truncate): Gemini's limit of {} tokens, counted as UTF-8 bytes + {}",
            count(summary.truncated, "chunk", "chunks"),
            number((request::GEMINI_MAX_INPUT_TOKENS - request::GEMINI_SPECIAL_TOKENS) as u64),
            number(request::GEMINI_MAX_INPUT_TOKENS as u64),
            request::GEMINI_SPECIAL_TOKENS
        ));
    } else if summary.truncated > 0 {
        printer.info(&format!(
            "truncated {} to {} tokens (--on-too-long truncate)",
            count(summary.truncated, "chunk", "chunks"),
            number(tokens::MAX_INPUT_TOKENS as u64)
        ));
    }
    for (idx, n) in written.held.iter().enumerate() {
        if *n == 0 {
            continue;
        }
        let Some(run) = held.runs.get(idx) else {
            continue;
        };
        if run.unsubmitted {
            printer.info(&format!(
                "left out {n} chunks held by the unfinished run {}, planned but not submitted yet (submit it with: {}; or cancel it, or pass --force)",
                run.dir.display(),
                advance_command(&run.dir)
            ));
        } else {
            printer.info(&format!(
                "left out {n} chunks held by the unfinished run {} (finish or cancel it, or pass --force)",
                run.dir.display()
            ));
        }
    }
    match (summary.estimated_cost_usd, price) {
        _ if !cfg.provider.has_price() => printer.info(&direct_cost_line(cfg.provider)),
        (Some(cost), Some(price)) if cfg.provider == models::Provider::Voyage => {
            printer.info(&format!(
                "estimated cost ${cost:.4} at batch prices ({}, ${price:.4} per 1M tokens), approximate: tokens are counted with cl100k_base, and Voyage's own tokenizer counts about 1.1-1.2 times as many",
                cfg.model
            ))
        }
        (Some(cost), Some(price)) if cfg.provider == models::Provider::Gemini => {
            printer.info(&format!(
                "estimated cost ${cost:.4} at batch prices ({}, ${price:.4} per 1M tokens), approximate: tokens are counted with cl100k_base, as no tokenizer of gemini-embedding-001 is published; Gemini's own count may differ",
                cfg.model
            ))
        }
        (Some(cost), Some(price)) => printer.info(&format!(
            "estimated cost ${cost:.4} at batch prices ({}, ${price} per 1M tokens)",
            cfg.model
        )),
        _ => printer.info("estimated cost unknown for this model"),
    }
}

/// The command that submits (and moves on) the run in `run_dir`, quoted for a POSIX shell.
pub fn advance_command(run_dir: &Path) -> String {
    format!(
        "embatch advance --run-dir {}",
        shell_quote(&run_dir.display().to_string())
    )
}

/// `text` as one word of a POSIX shell: as it is when it needs no quoting, else in single
/// quotes.
pub fn shell_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:@%,".contains(&b));
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

// --- providers (issue 18): what plan says about a provider without a batch price -----------

/// The warning for a model `cfg.provider`'s table does not know.
fn unknown_model_warning(cfg: &PlanConfig, column_dimensions: u32) -> String {
    match cfg.provider {
        models::Provider::Openai => format!(
            "unknown model {}: its tokens are counted with cl100k_base and no cost is estimated (pass --price-per-million-tokens for one)",
            cfg.model
        ),
        models::Provider::Gemini => format!(
            "unknown model {} for --provider gemini (the table knows {}): Gemini refuses a model it does not serve when the batch is created, and no cost is estimated (pass --price-per-million-tokens for one)",
            cfg.model,
            models::GEMINI_MODELS
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        models::Provider::Voyage => format!(
            "unknown model {} for --provider voyage (the table knows {}): Voyage refuses a model it does not serve when the batch is created, and no cost is estimated (pass --price-per-million-tokens for one)",
            cfg.model,
            models::VOYAGE_MODELS
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        provider => format!(
            "unknown model {} for --provider {provider}: its dimension is taken from the server's first answer and checked against the column's vector({column_dimensions}) before anything is written; its tokens are estimated with cl100k_base",
            cfg.model
        ),
    }
}

/// The cost line of a provider without a batch price.
fn direct_cost_line(provider: models::Provider) -> String {
    format!(
        "estimated cost: not applicable for --provider {provider} (your own server; no batch price); the token count is a cl100k_base estimate, not the server's tokenizer"
    )
}
