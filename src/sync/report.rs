//! What a `sync` call says: one line per family and a totals line on stderr, the same as JSON
//! on stdout (`--json`, [`SyncReport`]), and the exit the outcome makes. Pure but for the
//! printer; the runs it reports are [`RunEntry`] values the call has loaded.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::advance;
use crate::config::SyncConfig;
use crate::exit::ExitStatus;
use crate::printer::Printer;
use crate::run::state::StateKind;
use crate::run::store::RunFile;

/// What became of one family in this call.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FamilyReport {
    pub family_id: String,
    /// `done`, `waiting` (work on the provider or for a later call), or `failed`.
    pub status: &'static str,
    /// Pending chunks found (before leaving out those runs hold); `null` when not counted.
    pub pending_chunks: Option<u64>,
    /// The run planned in this call (or, with `--dry-run`, the one that would be).
    pub planned: Option<Planned>,
    /// Why its new work waits for a later call, when it does.
    pub waits: Option<String>,
    /// Its unfinished runs (after this call).
    pub runs: Vec<RunReport>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    /// `null` with `--dry-run`.
    pub run_dir: Option<String>,
    pub chunks: u64,
    pub tokens: u64,
    pub estimated_cost_usd: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub run_dir: String,
    pub finished: bool,
    pub batches: usize,
    /// Submitted batches and the tokens they count for against the budget.
    pub in_flight: usize,
    pub in_flight_tokens: u64,
    /// Batches not created yet (planned, uploaded, queued).
    pub waiting: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub families: usize,
    pub planned_runs: usize,
    pub planned_chunks: u64,
    pub planned_tokens: u64,
    pub planned_cost_usd: f64,
    pub unfinished_runs: usize,
    pub in_flight_tokens: u64,
    pub max_enqueued_tokens: Option<u64>,
    pub waiting_families: usize,
    pub failed_families: usize,
}

/// `sync --json`: stable keys (added, never removed or renamed).
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub dry_run: bool,
    pub families: Vec<FamilyReport>,
    pub totals: Totals,
    /// `done` (exit 0), `not_yet` (75) or `failed` (1).
    pub outcome: &'static str,
}

/// An unfinished run of this table, as sync sees it.
pub(super) struct RunEntry {
    pub(super) dir: PathBuf,
    pub(super) family: String,
    pub(super) created_at: DateTime<Utc>,
    pub(super) run: RunFile,
    /// Set once advancing it failed: it is left alone for the rest of the call.
    pub(super) error: Option<String>,
    /// Batches it created (or that left the waiting states) in this call: the runs that
    /// had fewer turns go first.
    pub(super) turns: usize,
}

/// What one pass found and did: the report of each family, the unfinished runs, and what
/// failed outside any family.
pub(super) struct Pass {
    pub(super) families: BTreeMap<String, FamilyReport>,
    pub(super) runs: Vec<RunEntry>,
    pub(super) failures: Vec<String>,
    /// A run that held chunks finished in this pass: the next pass plans those still pending.
    pub(super) released: bool,
}

/// The report: one line per family, a totals line, the JSON; and the exit.
pub(super) fn finish(
    cfg: &SyncConfig,
    printer: &Printer,
    pass: Pass,
) -> anyhow::Result<ExitStatus> {
    let Pass {
        mut families,
        runs,
        mut failures,
        released: _,
    } = pass;
    // The report: one line per family, a totals line, the JSON.
    for entry in &runs {
        let report = family_entry(&mut families, &entry.family);
        if let Some(err) = &entry.error {
            report.error.get_or_insert_with(|| err.clone());
        }
        if !entry.run.is_finished() {
            report.runs.push(run_report(entry));
        }
    }
    let mut totals = Totals {
        max_enqueued_tokens: cfg.opts.max_enqueued_tokens,
        ..Totals::default()
    };
    for report in families.values_mut() {
        report.status = if report.error.is_some() {
            "failed"
        } else if family_waits(report, cfg.dry_run) {
            "waiting"
        } else {
            "done"
        };
        totals.families += 1;
        if let Some(planned) = &report.planned {
            totals.planned_runs += 1;
            totals.planned_chunks += planned.chunks;
            totals.planned_tokens += planned.tokens;
            totals.planned_cost_usd += planned.estimated_cost_usd.unwrap_or(0.0);
        }
        totals.unfinished_runs += report.runs.len();
        totals.in_flight_tokens += report.runs.iter().map(|r| r.in_flight_tokens).sum::<u64>();
        match report.status {
            "failed" => {
                totals.failed_families += 1;
                failures.push(format!(
                    "family {}: {}",
                    report.family_id,
                    report.error.as_deref().unwrap_or_default()
                ));
            }
            "waiting" => totals.waiting_families += 1,
            _ => {}
        }
        printer.info(&family_line(report, cfg.dry_run));
    }
    printer.info(&totals_line(&totals, cfg.dry_run));
    let outcome = if !failures.is_empty() {
        "failed"
    } else if totals.waiting_families > 0 {
        "not_yet"
    } else {
        "done"
    };
    if cfg.json {
        let report = SyncReport {
            dry_run: cfg.dry_run,
            families: families.into_values().collect(),
            totals,
            outcome,
        };
        printer.data(&serde_json::to_string_pretty(&report)?);
    }
    match outcome {
        "failed" => anyhow::bail!(
            "{} (the other families were served; fix these and run sync again)",
            failures.join("; ")
        ),
        "not_yet" => Ok(ExitStatus::NotYet),
        _ => Ok(ExitStatus::Done),
    }
}

/// Whether `report`'s family still waits for something (the provider, a later call) once
/// its runs are listed in it — or, before that (the `--wait` loop), has unfinished runs.
pub(super) fn family_waits(report: &FamilyReport, dry_run: bool) -> bool {
    report.error.is_none()
        && (report.waits.is_some()
            || !report.runs.is_empty()
            // A dry run plans nothing: what it would plan is still to do.
            || (dry_run && report.planned.is_some()))
}

/// The report entry of `family`, created empty if new.
pub(super) fn family_entry<'a>(
    families: &'a mut BTreeMap<String, FamilyReport>,
    family: &str,
) -> &'a mut FamilyReport {
    families
        .entry(family.to_owned())
        .or_insert_with(|| FamilyReport {
            family_id: family.to_owned(),
            ..FamilyReport::default()
        })
}

pub(super) fn run_report(entry: &RunEntry) -> RunReport {
    let run = &entry.run;
    RunReport {
        run_dir: entry.dir.display().to_string(),
        finished: run.is_finished(),
        batches: run.batches.len(),
        in_flight: run.count_in(StateKind::Submitted),
        in_flight_tokens: advance::tokens_in_flight(run),
        waiting: waiting(run),
    }
}

pub(super) fn family_line(report: &FamilyReport, dry_run: bool) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(err) = &report.error {
        parts.push(format!("failed: {err}"));
    }
    if let Some(p) = &report.planned {
        let cost = p
            .estimated_cost_usd
            .map(|c| format!(", ${c:.4}"))
            .unwrap_or_default();
        parts.push(match (&p.run_dir, dry_run) {
            (Some(dir), _) => format!(
                "planned {} chunks ({} tokens{cost}) in {dir}",
                p.chunks, p.tokens
            ),
            (None, _) => format!("would plan {} chunks ({} tokens{cost})", p.chunks, p.tokens),
        });
    }
    if let Some(waits) = &report.waits {
        parts.push(format!("waits: {waits}"));
    }
    if !report.runs.is_empty() {
        let in_flight: usize = report.runs.iter().map(|r| r.in_flight).sum();
        let tokens: u64 = report.runs.iter().map(|r| r.in_flight_tokens).sum();
        let waiting: usize = report.runs.iter().map(|r| r.waiting).sum();
        parts.push(format!(
            "{} unfinished run{}: {in_flight} batches in flight ({tokens} tokens), {waiting} not created yet",
            report.runs.len(),
            if report.runs.len() == 1 { "" } else { "s" }
        ));
    }
    if parts.is_empty() {
        parts.push(if report.pending_chunks.is_some_and(|n| n > 0) {
            "done: nothing left to send (its pending chunks are skipped or held)".to_owned()
        } else {
            "done".to_owned()
        });
    }
    format!(
        "{}family {}: {}",
        if dry_run { "dry run: " } else { "" },
        report.family_id,
        parts.join("; ")
    )
}

pub(super) fn totals_line(t: &Totals, dry_run: bool) -> String {
    let budget = t
        .max_enqueued_tokens
        .map(|m| format!(" of --max-enqueued-tokens {m}"))
        .unwrap_or_default();
    format!(
        "{}sync: {} families; {} {} runs ({} chunks, {} tokens, ${:.4}); {} unfinished runs with {} tokens in flight{budget}; {} waiting, {} failed",
        if dry_run { "dry run: " } else { "" },
        t.families,
        if dry_run { "would plan" } else { "planned" },
        t.planned_runs,
        t.planned_chunks,
        t.planned_tokens,
        t.planned_cost_usd,
        t.unfinished_runs,
        t.in_flight_tokens,
        t.waiting_families,
        t.failed_families,
    )
}

/// Batches not created yet (planned, uploaded, queued).
pub(super) fn waiting(run: &RunFile) -> usize {
    [StateKind::Planned, StateKind::Uploaded, StateKind::Queued]
        .into_iter()
        .map(|k| run.count_in(k))
        .sum()
}
