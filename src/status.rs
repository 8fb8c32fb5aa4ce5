//! `status`: the local view of a run, as a table or as the stable JSON of DESIGN.md §3.
//!
//! Read-only and lock-free: it loads `run.json` and renders it. Asking the API first
//! (`--refresh`) belongs to the advance step, not here.

use std::path::Path;

use comfy_table::{Cell, Color, ContentArrangement, Table, presets};
use serde::Serialize;

use crate::run::layout;
use crate::run::state::{BatchState, LineAnomalies, RequestCounts, StateKind};
use crate::run::store::{BatchRecord, RunFile};

pub mod summary;

#[derive(Debug, Clone, Serialize)]
pub struct StatusJson {
    pub run_id: String,
    pub family_id: String,
    pub run_dir: String,
    pub model: String,
    pub dimensions: u32,
    pub finished: bool,
    pub cancelled: bool,
    pub totals: Totals,
    pub batches: Vec<BatchJson>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Totals {
    pub chunks: u64,
    pub skipped: u64,
    pub ingested: u64,
    pub failed: u64,
    pub pending: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchJson {
    pub name: String,
    pub state: &'static str,
    pub attempt: u32,
    pub retry_of: Vec<String>,
    pub requests: u64,
    pub bytes: u64,
    pub tokens: u64,
    pub input_file_id: Option<String>,
    pub batch_id: Option<String>,
    pub remote_status: Option<String>,
    pub request_counts: Option<RequestCounts>,
    pub ingested: u64,
    pub already_present: u64,
    pub stale: u64,
    pub failed: u64,
    /// Output lines not taken as they were (unknown or repeated custom_id, unparseable).
    pub line_anomalies: LineAnomalies,
}

fn batch_json(batch: &BatchRecord) -> BatchJson {
    let (counts, line_anomalies) = match &batch.state {
        BatchState::Ingested(done) => (done.counts, done.anomalies),
        _ => Default::default(),
    };
    let remote = batch.state.remote();
    BatchJson {
        name: batch.name.clone(),
        state: batch.state.kind().as_str(),
        attempt: batch.attempt,
        retry_of: batch.retry_of.clone(),
        requests: batch.requests,
        bytes: batch.bytes,
        tokens: batch.tokens,
        input_file_id: batch.state.input_file_id().map(str::to_owned),
        batch_id: batch.state.batch_id().map(str::to_owned),
        remote_status: remote.map(|r| r.status.to_string()),
        request_counts: remote.map(|r| r.request_counts),
        ingested: counts.ingested,
        already_present: counts.already_present,
        stale: counts.stale,
        failed: counts.failed,
        line_anomalies,
    }
}

/// Builds the JSON view of a run; `only` keeps one batch (`--batch-file`).
pub fn view(run: &RunFile, run_dir: &Path, only: Option<&str>) -> StatusJson {
    // Chunks are sent once in the first attempt's batches; retry batches resend some of them.
    let chunks = run
        .batches
        .iter()
        .filter(|b| b.attempt == 1)
        .map(|b| b.requests)
        .sum();
    let (ingested, failed) = run
        .batches
        .iter()
        .filter_map(|b| match &b.state {
            BatchState::Ingested(done) => Some(done.counts),
            _ => None,
        })
        .fold((0u64, run.retry_given_up), |(ing, fail), c| {
            (ing + c.ingested + c.already_present, fail + c.failed)
        });
    StatusJson {
        run_id: run.run_id.clone(),
        family_id: run.family_id.clone(),
        run_dir: run_dir.display().to_string(),
        model: run.settings.model.clone(),
        dimensions: run.settings.dimensions,
        finished: run.is_finished(),
        cancelled: run.cancelled,
        totals: Totals {
            chunks,
            skipped: run.plan.skipped,
            ingested,
            failed,
            pending: chunks.saturating_sub(ingested + failed),
        },
        batches: run
            .batches
            .iter()
            .filter(|b| only.is_none_or(|name| b.name == name))
            .map(batch_json)
            .collect(),
    }
}

fn state_colour(kind: StateKind) -> Color {
    match kind {
        StateKind::Ingested => Color::Green,
        StateKind::Failed => Color::Red,
        StateKind::Expired | StateKind::Cancelled | StateKind::Queued => Color::Yellow,
        _ => Color::Cyan,
    }
}

/// The human table: one row per batch, then the totals.
pub fn render_table(status: &StatusJson, colour: bool) -> String {
    let mut table = Table::new();
    table
        .load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header([
            "batch",
            "state",
            "try",
            "requests",
            "tokens",
            "remote",
            "done/failed",
            "ingested",
            "failed",
            "batch id",
        ]);
    if !colour {
        table.force_no_tty();
    }
    for b in &status.batches {
        let kind = StateKind::ALL
            .into_iter()
            .find(|k| k.as_str() == b.state)
            .unwrap_or(StateKind::Planned);
        let mut state_cell = Cell::new(b.state);
        if colour {
            state_cell = state_cell.fg(state_colour(kind));
        }
        table.add_row([
            Cell::new(&b.name),
            state_cell,
            Cell::new(b.attempt),
            Cell::new(b.requests),
            Cell::new(b.tokens),
            Cell::new(b.remote_status.as_deref().unwrap_or("-")),
            Cell::new(
                b.request_counts
                    .map(|c| format!("{}/{} of {}", c.completed, c.failed, c.total))
                    .unwrap_or_else(|| "-".to_owned()),
            ),
            Cell::new(b.ingested + b.already_present),
            Cell::new(b.failed),
            Cell::new(b.batch_id.as_deref().unwrap_or("-")),
        ]);
    }
    let t = status.totals;
    let state = if status.finished {
        "finished"
    } else if status.cancelled {
        "cancelled, not finished"
    } else {
        "not finished"
    };
    let anomalies: Vec<String> = status
        .batches
        .iter()
        .filter_map(|b| {
            let a = b.line_anomalies;
            (a.unknown_custom_id + a.repeated_custom_id + a.unparseable > 0).then(|| {
                format!(
                    "\n{}: output lines {} with a custom_id not in the batch, {} repeated, {} unparseable",
                    b.name, a.unknown_custom_id, a.repeated_custom_id, a.unparseable
                )
            })
        })
        .collect();
    format!(
        "run {} (family {}, {}, {} dims): {state}\n{table}\nchunks {}  skipped {}  ingested {}  failed {}  pending {}{}",
        status.run_id,
        status.family_id,
        status.model,
        status.dimensions,
        t.chunks,
        t.skipped,
        t.ingested,
        t.failed,
        t.pending,
        anomalies.concat()
    )
}

/// Files the run still needs but its folder lost, each with the way out: an input not yet
/// uploaded, or an output or error file downloaded but not yet ingested. `status` shows these
/// as warnings (it only reads); `advance` and `ingest` stop on them with the same advice.
pub fn missing_files(run: &RunFile, run_dir: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    for batch in &run.batches {
        let dir = layout::batch_dir(run_dir, &batch.name);
        match &batch.state {
            BatchState::Planned(_) => {
                let input = dir.join(layout::INPUT_FILE);
                if !input.exists() {
                    missing.push(format!(
                        "{} is missing, so batch {} cannot be uploaded; restore the file if you have a copy, or `embatch cancel --run-dir {}` and plan again",
                        input.display(),
                        batch.name,
                        run_dir.display()
                    ));
                }
            }
            BatchState::Downloaded(downloaded) => {
                let files = [
                    (downloaded.has_output, layout::OUTPUT_FILE),
                    (downloaded.has_errors, layout::ERRORS_FILE),
                ];
                for (_, name) in files.iter().filter(|(has, _)| *has) {
                    let path = dir.join(name);
                    if !path.exists() {
                        missing.push(format!(
                            "{} is missing: batch {} was downloaded but not yet ingested; fetch it again with `embatch ingest --run-dir {} --redownload`",
                            path.display(),
                            batch.name,
                            run_dir.display()
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    missing
}
