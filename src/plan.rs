//! `plan`: select the pending chunks of a family, shard them, and write the run folder
//! (DESIGN.md §4, §6). Calls no API.
//!
//! The folder is written under a hidden `.partial-…` name and renamed into place only when
//! complete, so a failed plan leaves no half-written run behind. Rows stream from the
//! database straight into the batch files: memory does not grow with the family.
//!
//! A family is known by its id as the database reads it (its canonical text), whatever the
//! spelling given. From reading the chunks other runs hold until the new run is in place, the
//! plan holds the family lock (`lock::FamilyLock`), so two plans of one family never take the
//! same chunk. SIGINT or SIGTERM removes the partial folder and cancels the query.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::config::{Global, PlanConfig};
use crate::interrupt::{self, Interrupted};
use crate::models;
use crate::pg::conn::DbTarget;
use crate::pg::source::{self, ChunkRow, FamilyIdType, PendingRow, Source};
use crate::printer::Printer;
use crate::request::RequestTemplate;
use crate::run::folders::{self, HeldChunks};
use crate::run::layout::{
    self, CHUNKS_FILE, INPUT_FILE, PARTIAL_PREFIX, SKIPPED_FILE, batch_dir, batch_name,
};
use crate::run::lock::{self, FamilyLock};
use crate::run::state::{BatchState, Planned};
use crate::run::store::{self, BatchRecord, OnTooLong, PlanSummary, RunFile, RunSettings};
use crate::sharder::{BatchTally, ItemSize, Placement, Sharder};
use crate::tokens;
use crate::tsv;

/// Rows prepared per round by one worker thread: ~400 KB of text, far more work than handing
/// a round over, and little memory.
const ROWS_PER_ROUND: usize = 512;

/// Why a chunk is never sent (the `reason` of `skipped.tsv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SkipReason {
    Empty,
    TooLong,
    TooLargeForBatch,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Empty => "empty",
            SkipReason::TooLong => "too_long",
            SkipReason::TooLargeForBatch => "too_large_for_batch",
        }
    }
}

/// Creates a folder (and its missing parents) readable by its owner only.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    make_private_dir(path, true)
}

fn make_private_dir(path: &Path, recursive: bool) -> std::io::Result<()> {
    // fs-err has no DirBuilder: name the folder in the error ourselves.
    std::fs::DirBuilder::new()
        .recursive(recursive)
        .mode(0o700)
        .create(path)
        .map_err(|err| {
            std::io::Error::new(
                err.kind(),
                format!("failed to create directory `{}`: {err}", path.display()),
            )
        })
}

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
    // One family, one identity: the id as the database reads it names the runs folder, the
    // held chunks, the lock and run.json, whichever way it was spelled.
    let family_type = source.family_id_type(&client).await?;
    let family = family_type.canonical(&client, &cfg.family_id).await?;
    if family != cfg.family_id {
        printer.verbose(&format!(
            "family id {} reads as {family} in the database",
            cfg.family_id
        ));
    }
    name_session(&client, &family).await;
    source.check_family(&client, &family).await?;

    let model_info = models::lookup(&cfg.model);
    if model_info.is_none() {
        printer.warn(&format!(
            "unknown model {}: its tokens are counted with cl100k_base and no cost is estimated (pass --price-per-million-tokens for one)",
            cfg.model
        ));
    }
    let dims = models::choose_dimensions(&cfg.model, source.dimensions, cfg.dimensions)?;
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
    };
    let mut writer = RunWriter::new(
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
    let bar = printer.row_counter("planning");
    // `--limit N` counts the chunks no other run holds: the query reads at most N more rows
    // than chunks are held, and rows past the N-th unheld one are let go.
    let sql_limit = cfg
        .limit
        .map(|limit| limit.saturating_add(held.len() as u64));
    let mut unheld = 0u64;
    // Rows go to the writer in rounds, so that each round's tokenizing runs on two threads.
    let mut round = Vec::with_capacity(ROWS_PER_ROUND);
    let streamed = source
        .stream_pending(&mut client, &family, cfg.reembed, sql_limit, |row| {
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
    let result = match streamed {
        Ok(_) => writer.add_many(round).and_then(|()| writer.finish()),
        Err(err) => Err(err),
    };
    let written = match result {
        Ok(written) => written,
        Err(err) => {
            remove_partial(&partial_dir);
            return Err(err);
        }
    };

    let price = models::price_per_million(&cfg.model, cfg.usd_per_million_tokens);
    let cost = price.map(|p| models::estimate_cost(written.tokens, p));
    let summary = PlanSummary {
        chunks: written.chunks,
        skipped: written.skipped.values().sum(),
        truncated: written.truncated,
        held_by_other_runs: written.held.iter().sum(),
        tokens: written.tokens,
        estimated_cost_usd: cost,
    };
    let over_cost = match (cfg.max_cost_usd, cost) {
        (Some(max), Some(cost)) => (cost > max).then_some((cost, max)),
        _ => None,
    };
    let run_dir = family_dir.join(&name.folder);
    let creates_run = !written.batches.is_empty() && over_cost.is_none();
    report(
        printer,
        cfg,
        &family,
        &summary,
        &written,
        &held,
        price,
        creates_run.then_some(run_dir.as_path()),
    );

    if written.batches.is_empty() {
        remove_partial(&partial_dir);
        let unsubmitted: Vec<(PathBuf, u64)> = written
            .held
            .iter()
            .zip(&held.runs)
            .filter(|(n, run)| **n > 0 && run.unsubmitted)
            .map(|(n, run)| (run.dir.clone(), *n))
            .collect();
        if written.chunks == 0 && !unsubmitted.is_empty() {
            return Ok(PlanOutcome::HeldByUnsubmitted {
                family_id: family,
                chunks: unsubmitted.iter().map(|(_, n)| n).sum(),
                runs: unsubmitted.into_iter().map(|(dir, _)| dir).collect(),
            });
        }
        printer.info(&format!(
            "nothing to embed for family {family}: no pending chunk needs sending; no run created"
        ));
        return Ok(PlanOutcome::NothingToDo);
    }
    if let Some((cost, max)) = over_cost {
        remove_partial(&partial_dir);
        bail!(
            "the estimated cost ${cost:.4} is over --max-cost ${max:.4}; raise --max-cost or plan fewer chunks (--limit)"
        );
    }

    let run = RunFile {
        schema_version: store::SCHEMA_VERSION,
        run_id: name.run_id.clone(),
        family_id: family.clone(),
        created_at: now,
        updated_at: now,
        embatch_version: env!("CARGO_PKG_VERSION").to_owned(),
        settings: RunSettings {
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
        },
        database: identity,
        plan: summary,
        cancelled: false,
        retry_given_up: 0,
        batches: written.batches,
    };
    let finished = store::save(&partial_dir, &run)
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            fs_err::rename(&partial_dir, &run_dir)?;
            store::sync_dir(&family_dir)?;
            Ok(())
        });
    if let Err(err) = finished {
        remove_partial(&partial_dir);
        return Err(err.context(format!(
            "could not write the run folder {}",
            run_dir.display()
        )));
    }
    progress.partial_dir = None;
    family_lock.release(&client).await;
    Ok(PlanOutcome::Planned { run_dir })
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
    family: &str,
    summary: &PlanSummary,
    written: &Written,
    held: &HeldChunks,
    price: Option<f64>,
    run_dir: Option<&Path>,
) {
    printer.info(&format!(
        "family {family}: {} chunks to embed ({} tokens) in {} batch{}",
        summary.chunks,
        summary.tokens,
        written.batches.len(),
        if written.batches.len() == 1 { "" } else { "es" }
    ));
    if summary.skipped > 0 {
        let reasons: Vec<String> = written
            .skipped
            .iter()
            .map(|(reason, n)| format!("{}: {n}", reason.as_str()))
            .collect();
        // skipped.tsv exists only in a run that is created.
        let listed = match run_dir {
            Some(dir) => format!("; listed in {}", dir.join(SKIPPED_FILE).display()),
            None => String::new(),
        };
        printer.info(&format!(
            "skipped {} chunks, never sent ({}){listed}",
            summary.skipped,
            reasons.join(", ")
        ));
    }
    if summary.truncated > 0 {
        printer.info(&format!(
            "truncated {} chunks to {} tokens (--on-too-long truncate)",
            summary.truncated,
            tokens::MAX_INPUT_TOKENS
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

/// What the writer produced.
pub(crate) struct Written {
    pub(crate) batches: Vec<BatchRecord>,
    pub(crate) chunks: u64,
    pub(crate) tokens: u64,
    pub(crate) truncated: u64,
    pub(crate) skipped: BTreeMap<SkipReason, u64>,
    /// Chunks left out, per holding run (indexes of `HeldChunks::runs`).
    held: Vec<u64>,
}

/// The batch being filled.
struct OpenBatch {
    name: String,
    dir: PathBuf,
    input: BufWriter<fs_err::File>,
    chunks: BufWriter<fs_err::File>,
    /// Bytes of `input` written since its writeback was last started.
    unsynced: u64,
}

/// How often the writeback of a batch file being written is started (see
/// [`start_writeback`]).
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Asks the kernel to start writing the file's dirty pages to disk now, without waiting, so
/// that the fsync when the batch is sealed has little left to do and the plan does not stall
/// on it. Only a hint: nothing depends on it, and where it is not available it does nothing.
fn start_writeback(file: &fs_err::File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open for
        // as long as `file` is borrowed. Offset 0 and length 0 mean the whole file.
        let _ = unsafe {
            libc::sync_file_range(file.file().as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
        };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// How new batches are named and what they record about their origin.
#[derive(Debug, Clone)]
pub struct Numbering {
    /// Number of the first batch written (`batch_001` is 1).
    pub first: usize,
    pub attempt: u32,
    pub retry_of: Vec<String>,
}

impl Numbering {
    pub const FIRST_ATTEMPT: Numbering = Numbering {
        first: 1,
        attempt: 1,
        retry_of: Vec::new(),
    };
}

/// The batch folders being written: the open batch and the records of the sealed ones.
struct BatchFiles {
    run_dir: PathBuf,
    numbering: Numbering,
    open: Option<OpenBatch>,
    written: Written,
}

impl BatchFiles {
    fn open_next(&mut self) -> anyhow::Result<()> {
        let name = batch_name(self.numbering.first + self.written.batches.len());
        let dir = batch_dir(&self.run_dir, &name);
        create_private_dir(&dir)?;
        let input = BufWriter::with_capacity(1 << 20, fs_err::File::create(dir.join(INPUT_FILE))?);
        let mut chunks = BufWriter::new(fs_err::File::create(dir.join(CHUNKS_FILE))?);
        tsv::write_record(&mut chunks, &["id", "sha256", "tokens"])?;
        self.open = Some(OpenBatch {
            name,
            dir,
            input,
            chunks,
            unsynced: 0,
        });
        Ok(())
    }

    /// Flushes and fsyncs the open batch, and records it with the sharder's tally.
    fn seal(&mut self, tally: BatchTally) -> anyhow::Result<()> {
        let Some(open) = self.open.take() else {
            bail!("internal error: sealing a batch that was never opened");
        };
        for writer in [open.input, open.chunks] {
            let file = writer.into_inner().map_err(|err| err.into_error())?;
            file.sync_all()?;
        }
        store::sync_dir(&open.dir)?;
        // The evidence of what was written, read back from disk (DESIGN.md §9).
        let files = store::BatchFiles {
            input: store::FileDigest::of_file(&open.dir.join(INPUT_FILE), 0)?,
            chunks: store::FileDigest::of_file(
                &open.dir.join(CHUNKS_FILE),
                store::FileDigest::CHUNKS_HEADER_LINES,
            )?,
        };
        self.written.batches.push(BatchRecord {
            name: open.name,
            attempt: self.numbering.attempt,
            retry_of: self.numbering.retry_of.clone(),
            requests: u64::from(tally.requests),
            bytes: tally.bytes,
            tokens: tally.tokens,
            files: Some(files),
            state: BatchState::Planned(Planned::default()),
        });
        Ok(())
    }
}

/// A round of rows prepared ahead, off the writing thread: for each row its id, and for a
/// sendable one its token count, request line and `chunks.tsv` record, the lines and records
/// of the round packed one after the other so that a run of rows going to the same batch is
/// written with one call.
struct PreparedRound {
    ids: String,
    lines: Vec<u8>,
    records: Vec<u8>,
    rows: Vec<PreparedRow>,
}

struct PreparedRow {
    /// Where the id is in [`PreparedRound::ids`].
    id: Range<usize>,
    prep: Prep,
}

enum Prep {
    /// No content, or only whitespace: never sent.
    Empty,
    /// Within the model's input limit; where its line and record are in the round.
    Ready {
        n_tokens: usize,
        line: Range<usize>,
        record: Range<usize>,
    },
    /// Over the model's input limit: what `--on-too-long` decides needs the content.
    TooLong {
        n_tokens: usize,
        hash: String,
        content: String,
    },
}

impl PreparedRound {
    fn with_capacity(rows: usize) -> PreparedRound {
        PreparedRound {
            ids: String::with_capacity(rows * 40),
            lines: Vec::with_capacity(rows * 1024),
            records: Vec::with_capacity(rows * 120),
            rows: Vec::with_capacity(rows),
        }
    }

    /// Prepares one row: counts its tokens, hashes its content (sha256 of the content as
    /// stored, even when a truncated prefix is sent: ingest compares it with the row's current
    /// content) and writes its request line and record.
    fn push(&mut self, template: &RequestTemplate, id: &str, content: Option<&str>) {
        let start = self.ids.len();
        self.ids.push_str(id);
        let id_range = start..self.ids.len();
        let prep = match content {
            Some(content) if !content.trim().is_empty() => {
                let n_tokens = tokens::count_tokens(content);
                let mut hex = [0u8; 64];
                // 32 bytes always fit 64 hex digits.
                let hash = hex::encode_to_slice(Sha256::digest(content.as_bytes()), &mut hex)
                    .ok()
                    .and_then(|()| std::str::from_utf8(&hex).ok())
                    .unwrap_or_default();
                if n_tokens > tokens::MAX_INPUT_TOKENS {
                    Prep::TooLong {
                        n_tokens,
                        hash: hash.to_owned(),
                        content: content.to_owned(),
                    }
                } else {
                    self.ready(template, id, content, hash, n_tokens)
                }
            }
            _ => Prep::Empty,
        };
        self.rows.push(PreparedRow { id: id_range, prep });
    }

    /// Writes the request line of `input` and the record of a sendable row.
    fn ready(
        &mut self,
        template: &RequestTemplate,
        id: &str,
        input: &str,
        hash: &str,
        n_tokens: usize,
    ) -> Prep {
        let line_start = self.lines.len();
        template.write_line(id, input, &mut self.lines);
        let record_start = self.records.len();
        tsv::push_record(&mut self.records, &[id, hash, &n_tokens.to_string()]);
        Prep::Ready {
            n_tokens,
            line: line_start..self.lines.len(),
            record: record_start..self.records.len(),
        }
    }

    /// A round of one row ready to send, with `input` as its request's text.
    fn single_ready(
        template: &RequestTemplate,
        id: &str,
        input: &str,
        hash: &str,
        n_tokens: usize,
    ) -> PreparedRound {
        let mut round = PreparedRound::with_capacity(1);
        round.ids.push_str(id);
        let prep = round.ready(template, id, input, hash, n_tokens);
        round.rows.push(PreparedRow {
            id: 0..id.len(),
            prep,
        });
        round
    }
}

/// Streams chunks into batch folders as the sharder decides. The decisions (sharding, token
/// limits) belong to the sharder and tokens modules; this only applies them and writes.
pub(crate) struct RunWriter<'a> {
    template: RequestTemplate,
    on_too_long: OnTooLong,
    held: &'a HeldChunks,
    sharder: Sharder,
    files: BatchFiles,
    skipped_file: BufWriter<fs_err::File>,
    /// Started by the first [`RunWriter::add_many`].
    preparer: Option<Preparer>,
}

/// Rounds of rows being prepared (tokens, hash, request line) on two worker threads while
/// this thread fetches and writes: a round in, its prepared rows out, written in order.
struct Preparer {
    rounds: Option<std::sync::mpsc::SyncSender<(u64, Vec<PendingRow>)>>,
    prepared: std::sync::mpsc::Receiver<(u64, anyhow::Result<PreparedRound>)>,
    /// Rounds prepared out of order, waiting for an earlier one.
    early: BTreeMap<u64, anyhow::Result<PreparedRound>>,
    next_in: u64,
    next_out: u64,
}

/// Rounds in flight at most: enough that the workers stay busy while this thread seals a
/// batch or waits for rows; memory stays a few MB (measured at 100,000 rows: 512 × 8 was
/// 4 % faster than 1,024 × 4 and 256 × 16 no better).
const ROUNDS_IN_FLIGHT: u64 = 8;

impl Preparer {
    fn start(template: &RequestTemplate) -> Preparer {
        let (rounds, inbox) = std::sync::mpsc::sync_channel::<(u64, Vec<PendingRow>)>(2);
        let inbox = std::sync::Arc::new(std::sync::Mutex::new(inbox));
        let (outbox, prepared) = std::sync::mpsc::channel();
        for _ in 0..2 {
            let inbox = std::sync::Arc::clone(&inbox);
            let outbox = outbox.clone();
            let template = template.clone();
            std::thread::spawn(move || {
                loop {
                    // A poisoned lock means the other worker panicked: stop too.
                    let next = match inbox.lock() {
                        Ok(inbox) => inbox.recv(),
                        Err(_) => return,
                    };
                    let Ok((seq, rows)) = next else { return };
                    let prepared = Self::prepare(&template, &rows);
                    // The rows (and the server's buffers they point into) are freed here.
                    drop(rows);
                    if outbox.send((seq, prepared)).is_err() {
                        return;
                    }
                }
            });
        }
        Preparer {
            rounds: Some(rounds),
            prepared,
            early: BTreeMap::new(),
            next_in: 0,
            next_out: 0,
        }
    }

    fn prepare(template: &RequestTemplate, rows: &[PendingRow]) -> anyhow::Result<PreparedRound> {
        let mut round = PreparedRound::with_capacity(rows.len());
        for row in rows {
            round.push(template, row.id()?, row.content()?);
        }
        Ok(round)
    }

    /// The next round in order, waiting for it; `None` when every round sent came back.
    fn next_ready(&mut self) -> anyhow::Result<Option<PreparedRound>> {
        if self.next_out == self.next_in {
            return Ok(None);
        }
        loop {
            if let Some(ready) = self.early.remove(&self.next_out) {
                self.next_out += 1;
                return ready.map(Some);
            }
            let Ok((seq, round)) = self.prepared.recv() else {
                bail!("internal error: the plan's tokenizer threads stopped");
            };
            self.early.insert(seq, round);
        }
    }
}

/// Rows of a round placed in the open batch one after the other, not yet written: where their
/// lines and records are in the round, written with one call each.
struct Run {
    lines: Range<usize>,
    records: Range<usize>,
}

impl<'a> RunWriter<'a> {
    /// `skipped_path` receives the chunks that cannot be sent; it is created with a header
    /// line, or appended to when it exists.
    pub(crate) fn new(
        run_dir: &Path,
        template: RequestTemplate,
        on_too_long: OnTooLong,
        limits: crate::sharder::BatchLimits,
        held: &'a HeldChunks,
        numbering: Numbering,
        skipped_path: &Path,
    ) -> anyhow::Result<RunWriter<'a>> {
        let exists = skipped_path.exists();
        let file = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(skipped_path)?;
        let mut skipped_file = BufWriter::new(file);
        if !exists {
            tsv::write_record(&mut skipped_file, &["id", "reason"])?;
        }
        Ok(RunWriter {
            template,
            on_too_long,
            held,
            sharder: Sharder::new(limits),
            files: BatchFiles {
                run_dir: run_dir.to_path_buf(),
                numbering,
                open: None,
                written: Written {
                    batches: Vec::new(),
                    chunks: 0,
                    tokens: 0,
                    truncated: 0,
                    skipped: BTreeMap::new(),
                    held: vec![0; held.runs.len()],
                },
            },
            skipped_file,
            preparer: None,
        })
    }

    fn skip(&mut self, id: &str, reason: SkipReason) -> anyhow::Result<()> {
        tsv::write_record(&mut self.skipped_file, &[id, reason.as_str()])?;
        *self.files.written.skipped.entry(reason).or_insert(0) += 1;
        Ok(())
    }

    /// Adds one row, after every row given before; prepared on this thread.
    pub(crate) fn add(&mut self, row: ChunkRow) -> anyhow::Result<()> {
        while self.write_next_round()? {}
        let mut round = PreparedRound::with_capacity(1);
        round.push(&self.template, &row.id, row.content.as_deref());
        self.write_round(&round)
    }

    /// Adds `rows` in order, as [`RunWriter::add`] one by one would, after every row given
    /// before. The costly part of each row (tokens, hash, request line) is computed on two
    /// worker threads, a few rounds ahead; placing and writing stay on this thread, in order.
    /// [`RunWriter::finish`] writes the rounds still in flight.
    pub(crate) fn add_many(&mut self, rows: Vec<PendingRow>) -> anyhow::Result<()> {
        let template = &self.template;
        let preparer = self
            .preparer
            .get_or_insert_with(|| Preparer::start(template));
        let Some(rounds) = &preparer.rounds else {
            bail!("internal error: rows added after the plan's rounds ended");
        };
        if rounds.send((preparer.next_in, rows)).is_err() {
            bail!("internal error: the plan's tokenizer threads stopped");
        }
        preparer.next_in += 1;
        while self
            .preparer
            .as_ref()
            .is_some_and(|p| p.next_in - p.next_out >= ROUNDS_IN_FLIGHT)
        {
            self.write_next_round()?;
        }
        Ok(())
    }

    /// Writes the oldest prepared round; false when none is in flight.
    fn write_next_round(&mut self) -> anyhow::Result<bool> {
        let Some(preparer) = self.preparer.as_mut() else {
            return Ok(false);
        };
        let Some(round) = preparer.next_ready()? else {
            return Ok(false);
        };
        self.write_round(&round)?;
        Ok(true)
    }

    /// Places each row of a prepared round, in order, and writes it to its batch.
    fn write_round(&mut self, round: &PreparedRound) -> anyhow::Result<()> {
        let mut run = None;
        for row in &round.rows {
            let id = &round.ids[row.id.clone()];
            if !self.held.is_empty()
                && let Some(run_idx) = self.held.holder(id)
            {
                self.files.written.held[run_idx] += 1;
                continue;
            }
            match &row.prep {
                Prep::Empty => self.skip(id, SkipReason::Empty)?,
                Prep::Ready {
                    n_tokens,
                    line,
                    record,
                } => {
                    let item = ItemSize {
                        tokens: *n_tokens as u64,
                        line_bytes: line.len() as u64,
                    };
                    if self.place(id, item, round, &mut run)? {
                        self.gather(round, &mut run, line, record)?;
                        self.count(*n_tokens);
                    }
                }
                Prep::TooLong {
                    n_tokens,
                    hash,
                    content,
                } => {
                    // The rows gathered so far go first, to keep the order.
                    self.write_run(round, &mut run)?;
                    self.add_too_long(id, *n_tokens, hash, content)?;
                }
            }
        }
        self.write_run(round, &mut run)
    }

    /// Adds a placed row to the run of rows to write, after writing the run when the row does
    /// not follow it in the round (a row between them was left out).
    fn gather(
        &mut self,
        round: &PreparedRound,
        run: &mut Option<Run>,
        line: &Range<usize>,
        record: &Range<usize>,
    ) -> anyhow::Result<()> {
        if let Some(gathered) = run.as_mut() {
            if gathered.lines.end == line.start && gathered.records.end == record.start {
                gathered.lines.end = line.end;
                gathered.records.end = record.end;
                return Ok(());
            }
            self.write_run(round, run)?;
        }
        *run = Some(Run {
            lines: line.clone(),
            records: record.clone(),
        });
        Ok(())
    }

    fn count(&mut self, n_tokens: usize) {
        self.files.written.chunks += 1;
        self.files.written.tokens += n_tokens as u64;
    }

    /// Decides where a row goes. Before a new batch opens, the rows gathered for the one
    /// before are written. False when the row is skipped as too large for any batch.
    fn place(
        &mut self,
        id: &str,
        item: ItemSize,
        round: &PreparedRound,
        run: &mut Option<Run>,
    ) -> anyhow::Result<bool> {
        match self.sharder.place(item) {
            Placement::TooLarge(_) => {
                self.skip(id, SkipReason::TooLargeForBatch)?;
                return Ok(false);
            }
            Placement::StartsNew { sealed } => {
                self.write_run(round, run)?;
                self.files.seal(sealed)?;
                self.files.open_next()?;
            }
            Placement::Current if self.files.open.is_none() => self.files.open_next()?,
            Placement::Current => {}
        }
        Ok(true)
    }

    /// Writes the gathered rows of `round` to the open batch.
    fn write_run(&mut self, round: &PreparedRound, run: &mut Option<Run>) -> anyhow::Result<()> {
        let Some(Run { lines, records }) = run.take() else {
            return Ok(());
        };
        let Some(open) = self.files.open.as_mut() else {
            bail!("internal error: no open batch for placed rows");
        };
        open.input.write_all(&round.lines[lines.clone()])?;
        open.chunks.write_all(&round.records[records])?;
        open.unsynced += lines.len() as u64;
        if open.unsynced >= WRITEBACK_EVERY {
            open.unsynced = 0;
            start_writeback(open.input.get_ref());
        }
        Ok(())
    }

    /// A row over the model's input limit, as `--on-too-long` says: skipped, an error, or
    /// truncated (placed and written as a round of its own).
    fn add_too_long(
        &mut self,
        id: &str,
        n_tokens: usize,
        hash: &str,
        content: &str,
    ) -> anyhow::Result<()> {
        match self.on_too_long {
            OnTooLong::Skip => self.skip(id, SkipReason::TooLong),
            OnTooLong::Fail => bail!(
                "chunk {id} has {n_tokens} tokens, over the model's limit of {}; shorten it, or plan with --on-too-long skip or truncate",
                tokens::MAX_INPUT_TOKENS
            ),
            OnTooLong::Truncate => {
                let (prefix, count) = tokens::truncate_to_tokens(content, tokens::MAX_INPUT_TOKENS);
                self.files.written.truncated += 1;
                let single = PreparedRound::single_ready(&self.template, id, &prefix, hash, count);
                self.write_round(&single)
            }
        }
    }

    pub(crate) fn finish(mut self) -> anyhow::Result<Written> {
        while self.write_next_round()? {}
        if let Some(preparer) = self.preparer.as_mut() {
            // The workers end when their channel closes.
            preparer.rounds = None;
        }
        if let Some(tally) = self.sharder.finish() {
            self.files.seal(tally)?;
        }
        let file = self
            .skipped_file
            .into_inner()
            .map_err(|err| err.into_error())?;
        file.sync_all()?;
        Ok(self.files.written)
    }
}
