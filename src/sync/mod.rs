//! `sync`: keep a whole table embedded from one cron line (DESIGN.md §9).
//!
//! One call: take the sync lock (`sync.lock` in the runs dir: one sync at a time, a second
//! exits 75 naming the first); find the unfinished runs under the runs dir that belong to this
//! database and table; serve the provider's queue first (poll what is submitted, create what
//! fits, one turn each); find the families with pending chunks (the distinct family values
//! among pending rows, or `--families-sql` with `--scope-sql`); plan a run for each, through
//! `plan` itself — so the family lock, the canonical family id, the held chunks and the
//! evidence digests are exactly `plan`'s — while the estimated cost stays within `--max-cost`;
//! then advance every run, through `advance` itself, under one shared `--max-enqueued-tokens`
//! budget, until nothing moves. `--wait` repeats that pass every `--poll-seconds` until
//! nothing waits on the provider, with `--max-cost` bounding the whole call.
//!
//! The queue stays full: every pass of the runs begins by polling every submitted batch and
//! creating what fits (`fill`: no download, no ingest), and fills again after each run's
//! downloads and ingests, so a batch that finished is replaced at once, not after every other
//! run's ingest; with a budget a run uploads ahead only one batch it cannot create yet.
//! Fairness: runs take turns, and in each turn a run may create at most one batch — the runs
//! that had the fewest turns in this call first, then the oldest — so a huge family does not
//! take the whole budget while a small one waits. Families left waiting for `--max-cost` are
//! remembered (`sync-waiting.json` in the runs dir) and planned first next time.
//!
//! A family that fails (its scope errors, a run of it is damaged) is reported and the others
//! go on; the call then ends with an error (exit 1). It owns no SQL of its own (`pg::source`
//! does) and never writes a run's files (`plan` and `advance` do).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::advance;
use crate::config::{Global, SyncConfig};
use crate::exit::ExitStatus;
use crate::interrupt::Interrupted;
use crate::pg::source::{self, Source};
use crate::plan::{self, OverMaxCost, PlanOutcome};
use crate::printer::{OutputSettings, Printer};
use crate::run::folders;
use crate::run::layout::{self, SYNC_WAITING_FILE};
use crate::run::lock::{LockError, RunLock};
use crate::run::state::StateKind;
use crate::run::store::{self, RunFile};

mod dry_run;
mod report;
mod rounds;

pub use report::{FamilyReport, Planned, RunReport, SyncReport, Totals};
use report::{Pass, RunEntry, family_entry, finish};
use rounds::{advance_rounds, fill};

/// `embatch sync`: one pass; with `--wait`, passes every `--poll-seconds` until nothing waits
/// (or `--max-wait` is spent).
pub async fn sync(
    global: &Global,
    cfg: &SyncConfig,
    printer: &Printer,
) -> anyhow::Result<ExitStatus> {
    let _lock = if cfg.dry_run {
        None
    } else {
        let lock = RunLock::acquire_sync(&global.runs_dir, "embatch sync")?;
        // Fail on a missing key before planning anything.
        crate::provider::connect::check(&global.api, cfg.plan.provider)?;
        Some(lock)
    };
    // What plan and advance say of each run is summed up here, one line per family; with -v
    // their own messages show too.
    let inner = if global.output.verbose {
        *printer
    } else {
        Printer::new(OutputSettings {
            quiet: true,
            verbose: false,
            progress: false,
        })
    };
    let mut memory = Memory::default();
    if !cfg.opts.wait {
        let pass = pass(global, cfg, printer, &inner, &mut memory).await?;
        return finish(cfg, printer, pass);
    }
    let started = std::time::Instant::now();
    let mut passes_done = 0u32;
    let mut db_faults_in_a_row = 0u32;
    loop {
        // ctrl-c or SIGTERM during a pass stops it where it is, as a crash there would (every
        // step is safe to crash at); between passes, while sleeping.
        let guard =
            crate::interrupt::Guard::install().context("could not set up the signal handlers")?;
        let passed = tokio::select! {
            result = pass(global, cfg, printer, &inner, &mut memory) => Ok(result),
            signal = guard.wait() => Err(signal),
        };
        drop(guard);
        let mut pass = match passed {
            Ok(Ok(pass)) => pass,
            // The database went away after an earlier pass reached it (a restart, a failover,
            // a network cut): the runs are saved, so wait for the next pass, a few times.
            Ok(Err(err)) if passes_done > 0 && lost_database(&err) => {
                db_faults_in_a_row += 1;
                if db_faults_in_a_row > crate::advance::MAX_DB_RECONNECTS {
                    printer.warn(&format!(
                        "{err:#}; {} passes in a row could not reach the database; every run is saved, run sync again later",
                        crate::advance::MAX_DB_RECONNECTS + 1
                    ));
                    return Ok(ExitStatus::NotYet);
                }
                printer.warn(&format!(
                    "{err:#}; every run is saved, trying again in {}s",
                    cfg.opts.poll.as_secs()
                ));
                if let Some(signal) = sleep_or_signal(cfg.opts.poll).await? {
                    return Err(interrupted(signal));
                }
                continue;
            }
            Ok(Err(err)) => return Err(err),
            Err(signal) => return Err(interrupted(signal)),
        };
        passes_done += 1;
        db_faults_in_a_row = 0;
        memory.note_planned(&mut pass);
        // Go on while a run is unfinished (and not failed or in another command's hands) or
        // let go of chunks in this pass; a family waiting for --max-cost or for another
        // command's plan waits for a later sync, not for this one.
        let waiting = pass.released
            || pass
                .runs
                .iter()
                .any(|r| r.error.is_none() && !r.run.is_finished());
        let out_of_time = cfg
            .opts
            .max_wait
            .is_some_and(|max| started.elapsed() + cfg.opts.poll > max);
        if !waiting || out_of_time {
            return finish(cfg, printer, pass);
        }
        let in_flight: u64 = pass
            .runs
            .iter()
            .map(|r| advance::tokens_in_flight(&r.run))
            .sum();
        let unfinished = pass.runs.iter().filter(|r| !r.run.is_finished()).count();
        let waiter = printer.waiting_line(
            format!(
                "sync: {}, {} tokens in flight; next pass in {}s",
                crate::printer::count(unfinished as u64, "unfinished run", "unfinished runs"),
                crate::printer::number(in_flight),
                cfg.opts.poll.as_secs()
            ),
            started.elapsed(),
        );
        let signal = sleep_or_signal(cfg.opts.poll).await?;
        waiter.finish_and_clear();
        if let Some(signal) = signal {
            return Err(interrupted(signal));
        }
    }
}

/// Sleeps `poll`, or less if ctrl-c or SIGTERM comes first (then that signal).
async fn sleep_or_signal(poll: std::time::Duration) -> anyhow::Result<Option<i32>> {
    let guard =
        crate::interrupt::Guard::install().context("could not set up the signal handlers")?;
    let signal = tokio::select! {
        () = tokio::time::sleep(poll) => None,
        signal = guard.wait() => Some(signal),
    };
    drop(guard);
    Ok(signal)
}

/// Whether `err` is the database being unreachable or the connection lost: gone by itself
/// later, for a call that reached the database before.
fn lost_database(err: &anyhow::Error) -> bool {
    matches!(
        err.chain().find_map(crate::pg::conn::DbFault::of),
        Some(crate::pg::conn::DbFault::Transient(_) | crate::pg::conn::DbFault::Unreachable(_))
    )
}

fn interrupted(signal: i32) -> anyhow::Error {
    crate::interrupt::Interrupted {
        signal,
        what: "; every run is saved, go on with: embatch sync --wait (same options)".to_owned(),
    }
    .into()
}

/// One pass: find the runs and the families with pending chunks, serve the provider's queue,
/// plan, and advance every run until nothing moves.
async fn pass(
    global: &Global,
    cfg: &SyncConfig,
    printer: &Printer,
    inner: &Printer,
    memory: &mut Memory,
) -> anyhow::Result<Pass> {
    let target = global.database()?.clone();
    let mut client = target.connect().await?;
    let source = Source::inspect(&client, &cfg.plan.source).await?;
    let identity = source::database_identity(&client).await?;
    let family_type = source.family_id_type(&client).await?;

    let mut families: BTreeMap<String, FamilyReport> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let only = canonical_family_ids(&client, &family_type, cfg, &mut families).await;
    let wanted = |family: &str| only.as_ref().is_none_or(|set| set.contains(family));
    let mut runs =
        unfinished_runs(global, &client, &source, &identity, &wanted, &mut families).await?;
    // The provider's queue first: what finished since the last pass is replaced before
    // anything is counted or planned.
    runs.sort_by(|a, b| (a.created_at, &a.dir).cmp(&(b.created_at, &b.dir)));
    if !cfg.dry_run {
        // One turn each: the runs planned below get theirs before these take a second.
        fill(global, cfg, inner, &mut runs, Some(1)).await?;
    }
    match pending_families(&source, &mut client, cfg, only.as_ref()).await {
        Ok(pending) => {
            for (family, counted) in pending.into_iter().filter(|(f, _)| wanted(f)) {
                let report = family_entry(&mut families, &family);
                match counted {
                    Ok(n) => report.pending_chunks = Some(n),
                    Err(err) => report.error = Some(err),
                }
            }
        }
        Err(err) => failures.push(format!(
            "finding the families with pending chunks failed: {err:#}"
        )),
    }
    drop(client);

    let mut waiting_since = load_waiting(&global.runs_dir);
    let order = planning_order(&families, &runs, &waiting_since);
    let mut released = false;
    if cfg.dry_run {
        dry_run_plans(global, cfg, &source, &order, &mut families).await?;
    } else {
        // The plans leave out pending chunks that these runs hold; a run that finishes in
        // this pass lets them go, and the next pass plans them.
        let held_before: BTreeSet<PathBuf> = runs.iter().map(|r| r.dir.clone()).collect();
        let mut call = Call {
            global,
            cfg,
            printer: inner,
            families: &mut families,
            runs: &mut runs,
            waiting_since: &mut waiting_since,
            memory,
        };
        call.plan_families(&order).await?;
        save_waiting(&global.runs_dir, &waiting_since, printer);
        runs.sort_by(|a, b| (a.created_at, &a.dir).cmp(&(b.created_at, &b.dir)));
        advance_rounds(global, cfg, inner, &mut runs).await?;
        released = note_released_chunks(&runs, &held_before, &mut families);
    }
    Ok(Pass {
        families,
        runs,
        failures,
        released,
    })
}

/// What the passes of one `sync --wait` call share: the estimated cost of the runs planned so
/// far (`--max-cost` bounds the whole call, not each pass), and the families whose plan found
/// nothing to send, with what they looked like then. While that stays the same (the same
/// pending count, and their runs have ingested nothing since), planning them again would
/// find nothing again, so a later pass skips them; a later `sync` plans them as usual.
#[derive(Default)]
struct Memory {
    spent_usd: f64,
    quiet: BTreeMap<String, QuietKey>,
    /// What each family had planned in the passes so far (summed; the last run's folder).
    planned: BTreeMap<String, Planned>,
}

impl Memory {
    /// Adds the plans of `pass` to those of the earlier passes, and reports them all in it:
    /// the report of a `--wait` call covers the whole call.
    fn note_planned(&mut self, pass: &mut Pass) {
        for (family, report) in &pass.families {
            if let Some(new) = &report.planned {
                self.planned
                    .entry(family.clone())
                    .and_modify(|sum| {
                        sum.run_dir.clone_from(&new.run_dir);
                        sum.chunks += new.chunks;
                        sum.tokens += new.tokens;
                        sum.estimated_cost_usd =
                            match (sum.estimated_cost_usd, new.estimated_cost_usd) {
                                (Some(a), Some(b)) => Some(a + b),
                                (a, b) => a.or(b),
                            };
                    })
                    .or_insert_with(|| new.clone());
            }
        }
        for (family, planned) in &self.planned {
            family_entry(&mut pass.families, family).planned = Some(planned.clone());
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct QuietKey {
    pending: Option<u64>,
    runs: usize,
    ingested_batches: usize,
}

impl QuietKey {
    fn of(family: &str, report: &FamilyReport, runs: &[RunEntry]) -> QuietKey {
        let own = runs.iter().filter(|r| r.family == family);
        QuietKey {
            pending: report.pending_chunks,
            runs: own.clone().count(),
            ingested_batches: own.map(|r| r.run.count_in(StateKind::Ingested)).sum(),
        }
    }
}

/// `--family-id`, each in the database's spelling; a spelling the database refuses is that
/// family's error. `None`: every family.
async fn canonical_family_ids(
    client: &tokio_postgres::Client,
    family_type: &source::FamilyIdType,
    cfg: &SyncConfig,
    families: &mut BTreeMap<String, FamilyReport>,
) -> Option<BTreeSet<String>> {
    if cfg.family_ids.is_empty() {
        return None;
    }
    let mut set = BTreeSet::new();
    for raw in &cfg.family_ids {
        match family_type.canonical(client, raw).await {
            Ok(id) => {
                set.insert(id);
            }
            Err(err) => family_entry(families, raw).error = Some(err.to_string()),
        }
    }
    Some(set)
}

/// The unfinished runs of this database and table, for the wanted families; a run folder
/// that cannot be read is its family's error.
async fn unfinished_runs(
    global: &Global,
    client: &tokio_postgres::Client,
    source: &Source,
    identity: &crate::run::store::DatabaseIdentity,
    wanted: &dyn Fn(&str) -> bool,
    families: &mut BTreeMap<String, FamilyReport>,
) -> anyhow::Result<Vec<RunEntry>> {
    let mut runs: Vec<RunEntry> = Vec::new();
    let mut tables: BTreeMap<String, Option<String>> = BTreeMap::new();
    for found in folders::find_runs(&global.runs_dir, None)
        .with_context(|| format!("could not read the runs dir {}", global.runs_dir.display()))?
    {
        let run = match found.run {
            Ok(run) => run,
            Err(err) => {
                let family = found
                    .dir
                    .parent()
                    .and_then(Path::file_name)
                    .and_then(|n| layout::family_folder_id(&n.to_string_lossy()))
                    .unwrap_or_else(|| found.dir.display().to_string());
                if wanted(&family) {
                    family_entry(families, &family).error = Some(format!(
                        "{err}; restore it from run.json.bak, or move the folder {} out of the runs dir",
                        found.dir.display()
                    ));
                }
                continue;
            }
        };
        if run.is_finished() || !wanted(&run.family_id) || !same_database(&run, identity) {
            continue;
        }
        let table = match tables.get(&run.settings.source.table) {
            Some(table) => table.clone(),
            None => {
                let table = source::table_identity(client, &run.settings.source.table).await?;
                tables.insert(run.settings.source.table.clone(), table.clone());
                table
            }
        };
        if table.as_deref() != Some(source.table_identity.as_str()) {
            continue;
        }
        family_entry(families, &run.family_id);
        runs.push(RunEntry {
            dir: found.dir,
            family: run.family_id.clone(),
            created_at: run.created_at,
            run,
            error: None,
            turns: 0,
        });
    }
    Ok(runs)
}

/// Oldest pending work first: families that waited for --max-cost before, longest first;
/// then those with the oldest unfinished run; then the rest by id.
fn planning_order(
    families: &BTreeMap<String, FamilyReport>,
    runs: &[RunEntry],
    waiting_since: &BTreeMap<String, DateTime<Utc>>,
) -> Vec<String> {
    let oldest_run: BTreeMap<&str, DateTime<Utc>> =
        runs.iter().fold(BTreeMap::new(), |mut acc, r| {
            let at = acc.entry(r.family.as_str()).or_insert(r.created_at);
            *at = (*at).min(r.created_at);
            acc
        });
    let mut order: Vec<String> = families
        .values()
        .filter(|f| f.error.is_none() && f.pending_chunks.is_some_and(|n| n > 0))
        .map(|f| f.family_id.clone())
        .collect();
    order.sort_by_cached_key(|family| {
        (
            waiting_since
                .get(family)
                .copied()
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            oldest_run
                .get(family.as_str())
                .copied()
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            family.clone(),
        )
    });
    order
}

/// `--dry-run`: what each family's plan would be, written nowhere.
async fn dry_run_plans(
    global: &Global,
    cfg: &SyncConfig,
    source: &Source,
    order: &[String],
    families: &mut BTreeMap<String, FamilyReport>,
) -> anyhow::Result<()> {
    for (family, plan) in dry_run::plan_families(global, cfg, source, order).await? {
        let report = family_entry(families, &family);
        match plan {
            dry_run::DryPlan::Nothing => {}
            dry_run::DryPlan::Would {
                chunks,
                tokens,
                cost,
            } => {
                report.planned = Some(Planned {
                    run_dir: None,
                    chunks,
                    tokens,
                    estimated_cost_usd: cost,
                });
            }
            dry_run::DryPlan::Waits(why) => report.waits = Some(why),
            dry_run::DryPlan::Failed(err) => report.error = Some(err),
        }
    }
    Ok(())
}

/// The planning part of one call.
struct Call<'a> {
    global: &'a Global,
    cfg: &'a SyncConfig,
    /// What plan says is summed up in the family's line.
    printer: &'a Printer,
    families: &'a mut BTreeMap<String, FamilyReport>,
    runs: &'a mut Vec<RunEntry>,
    waiting_since: &'a mut BTreeMap<String, DateTime<Utc>>,
    memory: &'a mut Memory,
}

impl Call<'_> {
    /// Plans a run for each family in `order` while the estimated cost stays within
    /// `--max-cost`; the families beyond it wait for a later call.
    async fn plan_families(&mut self, order: &[String]) -> anyhow::Result<()> {
        let now = Utc::now();
        let mut cost_left = self
            .cfg
            .plan
            .max_cost_usd
            .map(|max| max - self.memory.spent_usd);
        for family in order {
            if cost_left.is_some_and(|left| left <= 0.0) {
                family_entry(self.families, family).waits =
                    Some("--max-cost is spent for this call; a later sync plans it".to_owned());
                self.waiting_since.entry(family.clone()).or_insert(now);
                continue;
            }
            let key = QuietKey::of(family, family_entry(self.families, family), self.runs);
            if self.memory.quiet.get(family) == Some(&key) {
                continue;
            }
            let plan_cfg = crate::config::PlanConfig {
                family_id: family.clone(),
                max_cost_usd: cost_left,
                ..self.cfg.plan.clone()
            };
            let planned = plan::plan(self.global, &plan_cfg, self.printer, Utc::now()).await;
            let found_nothing = matches!(
                planned,
                Ok(PlanOutcome::NothingToDo | PlanOutcome::HeldByUnsubmitted { .. })
            );
            if found_nothing {
                self.memory.quiet.insert(family.clone(), key);
            } else {
                self.memory.quiet.remove(family);
            }
            if let Some(cost) = self.record_plan(family, planned, now)? {
                self.memory.spent_usd += cost;
                cost_left = cost_left.map(|left| left - cost);
            }
        }
        Ok(())
    }

    /// Records what planning `family` gave; returns the estimated cost of a run planned.
    fn record_plan(
        &mut self,
        family: &str,
        planned: anyhow::Result<PlanOutcome>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Option<f64>> {
        let report = family_entry(self.families, family);
        match planned {
            Ok(PlanOutcome::Planned { run_dir }) => {
                self.waiting_since.remove(family);
                let run = store::load(&run_dir)?;
                report.planned = Some(Planned {
                    run_dir: Some(run_dir.display().to_string()),
                    chunks: run.plan.chunks,
                    tokens: run.plan.tokens,
                    estimated_cost_usd: run.plan.estimated_cost_usd,
                });
                let cost = run.plan.estimated_cost_usd;
                self.runs.push(RunEntry {
                    dir: run_dir,
                    family: family.to_owned(),
                    created_at: run.created_at,
                    run,
                    error: None,
                    turns: 0,
                });
                return Ok(cost);
            }
            Ok(PlanOutcome::NothingToDo | PlanOutcome::HeldByUnsubmitted { .. }) => {
                self.waiting_since.remove(family);
            }
            Err(err) if err.downcast_ref::<Interrupted>().is_some() => return Err(err),
            Err(err) => {
                if let Some(over) = err.downcast_ref::<OverMaxCost>() {
                    report.waits = Some(format!(
                        "its plan (${:.4}) is over what is left of --max-cost (${:.4}); a later sync plans it",
                        over.cost, over.max
                    ));
                    self.waiting_since.entry(family.to_owned()).or_insert(now);
                } else if err
                    .downcast_ref::<LockError>()
                    .is_some_and(LockError::is_held)
                {
                    report.waits = Some(format!("{err:#}"));
                } else {
                    report.error = Some(format!("{err:#}"));
                }
            }
        }
        Ok(None)
    }
}

/// A run that held chunks when the call began and finished in it let them go: its family
/// still waits (the next call plans what is pending), it is not done.
fn note_released_chunks(
    runs: &[RunEntry],
    held_before: &BTreeSet<PathBuf>,
    families: &mut BTreeMap<String, FamilyReport>,
) -> bool {
    let mut released = false;
    for entry in runs {
        if held_before.contains(&entry.dir) && entry.run.is_finished() {
            released = true;
            let report = family_entry(families, &entry.family);
            if report.pending_chunks.is_some_and(|n| n > 0) && report.waits.is_none() {
                report.waits = Some(format!(
                    "the run {} finished in this call and let go of chunks it held; the next sync plans those still pending",
                    entry.dir.display()
                ));
            }
        }
    }
    released
}

/// Whether `run` was planned against this database (`advance` refuses any other).
fn same_database(run: &RunFile, identity: &crate::run::store::DatabaseIdentity) -> bool {
    run.database.database == identity.database
        && match (&run.database.system_identifier, &identity.system_identifier) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
}

/// The families to look at, each with its pending chunk count or why it could not be
/// counted: the distinct family values among pending rows; with `--families-sql` (or
/// `--family-id` under `--scope-sql`), each family's scope counted.
async fn pending_families(
    source: &Source,
    client: &mut tokio_postgres::Client,
    cfg: &SyncConfig,
    only: Option<&BTreeSet<String>>,
) -> anyhow::Result<Vec<(String, Result<u64, String>)>> {
    let scoped: Option<Vec<String>> = match (&cfg.families_sql, only) {
        (Some(sql), _) => Some(source.families_from_sql(client, sql).await?),
        (None, Some(only)) if source.config.scope_sql.is_some() => {
            Some(only.iter().cloned().collect())
        }
        _ => None,
    };
    let Some(families) = scoped else {
        return Ok(source
            .families_with_pending(client)
            .await?
            .into_iter()
            .map(|(family, n)| (family, Ok(n)))
            .collect());
    };
    let mut counted = Vec::with_capacity(families.len());
    for family in families {
        let n = source
            .count_pending(client, &family)
            .await
            .map_err(|err| err.to_string());
        counted.push((family, n));
    }
    Ok(counted)
}

/// Families that waited for `--max-cost`, with when they first did (`sync-waiting.json`).
#[derive(Debug, Default, Serialize, Deserialize)]
struct WaitingFile {
    waiting_since: BTreeMap<String, DateTime<Utc>>,
}

fn load_waiting(runs_dir: &Path) -> BTreeMap<String, DateTime<Utc>> {
    // Only an order depends on it: a missing or unreadable file is an empty one.
    fs_err::read(runs_dir.join(SYNC_WAITING_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<WaitingFile>(&bytes).ok())
        .map(|f| f.waiting_since)
        .unwrap_or_default()
}

fn save_waiting(runs_dir: &Path, waiting: &BTreeMap<String, DateTime<Utc>>, printer: &Printer) {
    let path = runs_dir.join(SYNC_WAITING_FILE);
    let file = WaitingFile {
        waiting_since: waiting.clone(),
    };
    let written = serde_json::to_vec_pretty(&file)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| store::write_atomic(&path, &bytes).map_err(anyhow::Error::from));
    if let Err(err) = written {
        printer.warn(&format!(
            "could not save {} ({err:#}); the families waiting for --max-cost may not be served first next time",
            path.display()
        ));
    }
}
