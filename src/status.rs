//! `status`: the local view of a run, as a table or as the stable JSON of DESIGN.md §3.
//!
//! Read-only and lock-free: it loads `run.json` and renders it. Asking the API first
//! (`--refresh`) belongs to the advance step, not here.

use std::path::Path;

use comfy_table::{Cell, CellAlignment, Color, ContentArrangement, Table, presets};
use serde::Serialize;

use crate::printer::{count, number};
use crate::run::folders::run_state;
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
    /// Where the batch stands in one word (`summary::phase`: the provider's status while it
    /// runs); for the table only, the JSON keeps `state` and `remote_status`.
    #[serde(skip)]
    pub phase: String,
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
        phase: summary::phase(&batch.state).to_owned(),
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

/// How much of a batch the table shows: wide terminals get everything, narrow ones the
/// columns a person watching the run needs (everything stays in `--json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Layout {
    /// batch, state, requests, done, ingested, failed.
    Narrow,
    /// Also the tokens and the batch id cut short.
    Medium,
    /// Also the attempt, and the whole batch id.
    Wide,
}

/// The provider's batch id cut to fit: `958b761d…` for `batch_958b761dabe5…` (OpenAI's ids
/// all begin with `batch_`; the whole id is in the wide table and in `--json`).
fn short_batch_id(id: &str) -> String {
    const KEEP: usize = 8;
    let id = id.strip_prefix("batch_").unwrap_or(id);
    if id.chars().count() <= KEEP + 1 {
        id.to_owned()
    } else {
        format!("{}…", id.chars().take(KEEP).collect::<String>())
    }
}

/// `412 / 500`, or `-` when the provider has not said.
fn done_of(counts: Option<RequestCounts>) -> String {
    counts
        .map(|c| format!("{} / {}", number(c.completed), number(c.total)))
        .unwrap_or_else(|| "-".to_owned())
}

/// The one failure column: the requests ingest reported failed once the batch is ingested,
/// before that the provider's count of failed requests.
fn failed_of(b: &BatchJson) -> u64 {
    if b.state == StateKind::Ingested.as_str() {
        b.failed
    } else {
        b.request_counts.map(|c| c.failed).unwrap_or(0)
    }
}

fn table_of(status: &StatusJson, colour: bool, layout: Layout) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled);
    let mut header = vec!["batch", "state"];
    if layout >= Layout::Wide {
        header.push("try");
    }
    header.push("requests");
    if layout >= Layout::Medium {
        header.push("tokens");
    }
    header.extend(["done", "ingested", "failed"]);
    if layout >= Layout::Medium {
        header.push("batch id");
    }
    table.set_header(header);
    if !colour {
        table.force_no_tty();
    }
    let right = |cell: Cell| cell.set_alignment(CellAlignment::Right);
    let mut sum = BatchSums::default();
    for b in &status.batches {
        let kind = StateKind::ALL
            .into_iter()
            .find(|k| k.as_str() == b.state)
            .unwrap_or(StateKind::Planned);
        let mut state_cell = Cell::new(b.phase.as_str());
        if colour {
            state_cell = state_cell.fg(state_colour(kind));
        }
        sum.add(b);
        let mut row = vec![Cell::new(&b.name), state_cell];
        if layout >= Layout::Wide {
            row.push(right(Cell::new(b.attempt)));
        }
        row.push(right(Cell::new(number(b.requests))));
        if layout >= Layout::Medium {
            row.push(right(Cell::new(number(b.tokens))));
        }
        row.extend([
            right(Cell::new(done_of(b.request_counts))),
            right(Cell::new(number(b.ingested + b.already_present))),
            right(Cell::new(number(failed_of(b)))),
        ]);
        match layout {
            Layout::Narrow => {}
            Layout::Medium => row.push(Cell::new(
                b.batch_id
                    .as_deref()
                    .map(short_batch_id)
                    .unwrap_or_else(|| "-".to_owned()),
            )),
            Layout::Wide => row.push(Cell::new(b.batch_id.as_deref().unwrap_or("-"))),
        }
        table.add_row(row);
    }
    if status.batches.len() > 1 {
        let mut row = vec![Cell::new("total"), Cell::new("")];
        if layout >= Layout::Wide {
            row.push(Cell::new(""));
        }
        row.push(right(Cell::new(number(sum.requests))));
        if layout >= Layout::Medium {
            row.push(right(Cell::new(number(sum.tokens))));
        }
        row.extend([
            right(Cell::new(if sum.any_counts {
                done_of(Some(sum.counts))
            } else {
                "-".to_owned()
            })),
            right(Cell::new(number(sum.ingested))),
            right(Cell::new(number(sum.failed))),
        ]);
        if layout >= Layout::Medium {
            row.push(Cell::new(""));
        }
        table.add_row(row);
    }
    table
}

/// The sums of the table's totals row.
#[derive(Default)]
struct BatchSums {
    requests: u64,
    tokens: u64,
    counts: RequestCounts,
    any_counts: bool,
    ingested: u64,
    failed: u64,
}

impl BatchSums {
    fn add(&mut self, b: &BatchJson) {
        self.requests += b.requests;
        self.tokens += b.tokens;
        if let Some(c) = b.request_counts {
            self.any_counts = true;
            self.counts.completed += c.completed;
            self.counts.total += c.total;
            self.counts.failed += c.failed;
        }
        self.ingested += b.ingested + b.already_present;
        self.failed += failed_of(b);
    }
}

/// The run's folder name (`run_20261124_104500_7f3a`): the one spelling of the run a person
/// sees and types (`run.json`'s `run_id` stays in `--json`).
fn run_name(status: &StatusJson) -> String {
    Path::new(&status.run_dir)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| status.run_id.clone())
}

/// The human table: one row per batch and a totals row, fitted to `width` columns (`None`:
/// no limit, every column), then the run's totals.
pub fn render_table(status: &StatusJson, colour: bool, width: Option<usize>) -> String {
    let fits = |table: &Table| {
        width.is_none_or(|w| {
            table
                .lines()
                .next()
                .is_none_or(|line| line.chars().count() <= w)
        })
    };
    let table = [Layout::Wide, Layout::Medium]
        .into_iter()
        .map(|layout| table_of(status, colour, layout))
        .find(fits)
        .unwrap_or_else(|| table_of(status, colour, Layout::Narrow));
    let t = status.totals;
    let anomalies: Vec<String> = status
        .batches
        .iter()
        .filter_map(|b| {
            let a = b.line_anomalies;
            (a.unknown_custom_id + a.repeated_custom_id + a.unparseable > 0).then(|| {
                format!(
                    "\n{}: output lines {} with a custom_id not in the batch, {} repeated, {} unparseable",
                    b.name,
                    number(a.unknown_custom_id),
                    number(a.repeated_custom_id),
                    number(a.unparseable)
                )
            })
        })
        .collect();
    format!(
        "{} · {}\nfamily {} · {}, {} dims\n{table}\n{}, {} skipped, {} ingested, {} failed, {} pending{}",
        run_name(status),
        run_state(status.finished, status.cancelled),
        status.family_id,
        status.model,
        status.dimensions,
        count(t.chunks, "chunk", "chunks"),
        number(t.skipped),
        number(t.ingested),
        number(t.failed),
        number(t.pending),
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

#[cfg(test)]
mod tests;
