//! The one-line summary every `advance` (and `submit`, `run`, `ingest`, `cancel`) prints on
//! stderr: the batches by phase, the provider's request counts for those in flight, what this
//! call did, and what comes next with its exit code. Also the totals the `--wait` display shows.
//!
//! Pure: a function of the run as loaded before the call ([`Snapshot`]), the run now and what
//! the call ends with ([`Next`]). It prints nothing and reads no clock.

use std::collections::BTreeMap;
use std::path::Path;

use crate::printer::{count, number};
use crate::run::state::{BatchState, StateKind};
use crate::run::store::RunFile;

/// The phases as the summary lists them: the furthest along first, then those the provider is
/// working on, then those not sent yet, then the ends that are not success. A provider status
/// not listed here comes after them, in alphabetical order.
const PHASE_ORDER: [&str; 13] = [
    "ingested",
    "downloaded",
    "completed",
    "expired",
    "finalizing",
    "in_progress",
    "validating",
    "cancelling",
    "queued",
    "uploaded",
    "planned",
    "cancelled",
    "failed",
];

/// What a call can do to a batch, in the order the summary lists it.
const VERB_ORDER: [&str; 9] = [
    "uploaded",
    "submitted",
    "queued",
    "found completed",
    "found expired",
    "found failed",
    "downloaded",
    "ingested",
    "cancelled",
];

/// Where a batch stands, in one word: its state, or for a created batch that has not ended,
/// the provider's status (`validating`, `in_progress`, `finalizing`, …).
pub fn phase(state: &BatchState) -> &str {
    match state {
        BatchState::Submitted(s) => s.remote.status.as_str(),
        other => other.kind().as_str(),
    }
}

/// Each batch's phase when the call began, to tell what the call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    phases: BTreeMap<String, String>,
}

impl Snapshot {
    pub fn of(run: &RunFile) -> Snapshot {
        Snapshot {
            phases: run
                .batches
                .iter()
                .map(|b| (b.name.clone(), phase(&b.state).to_owned()))
                .collect(),
        }
    }
}

/// How the call ends, which decides what the line says comes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Every batch is done (exit 0).
    Finished,
    /// `submit`: every batch is created; `advance` follows them (exit 0).
    Submitted,
    /// `status --refresh`: the provider was asked; the table follows (exit 0).
    Refreshed,
    /// Batches are with the provider: run again later (exit 75).
    Waiting,
    /// `--wait` gave up at `--max-wait` (exit 75).
    OutOfTime,
    /// The provider did not answer (exit 75).
    ProviderUnavailable,
    /// The database connection was lost and reconnecting did not help (exit 75).
    DatabaseLost,
    /// An error stops the call; it is printed after this line (exit 1).
    Stopped,
    /// ctrl-c or SIGTERM while waiting between polls (exit 128 + the signal).
    Interrupted(i32),
}

/// `20 batches: 3 ingested, 17 in_progress (412,000 / 950,000 requests)`: the batches by
/// phase, and for those the provider is working on, its count of completed requests.
pub fn totals(run: &RunFile) -> String {
    let rank = |phase: &str| {
        PHASE_ORDER
            .iter()
            .position(|p| *p == phase)
            .unwrap_or(PHASE_ORDER.len())
    };
    let mut by_phase: BTreeMap<(usize, &str), u64> = BTreeMap::new();
    let (mut completed, mut total) = (0u64, 0u64);
    // The request counts go after the last phase of a batch the provider is working on.
    let mut last_in_flight: Option<(usize, &str)> = None;
    for batch in &run.batches {
        let phase = phase(&batch.state);
        let key = (rank(phase), phase);
        *by_phase.entry(key).or_insert(0) += 1;
        if let BatchState::Submitted(s) = &batch.state {
            completed += s.remote.request_counts.completed;
            // Before the provider has counted the file: the batch's own request count.
            total += s.remote.request_counts.total.max(batch.requests);
            last_in_flight = last_in_flight.max(Some(key));
        }
    }
    let parts: Vec<String> = by_phase
        .iter()
        .map(|(&key, &n)| {
            let mut part = format!("{} {}", number(n), key.1);
            if Some(key) == last_in_flight {
                part.push_str(&format!(
                    " ({} / {} requests)",
                    number(completed),
                    number(total)
                ));
            }
            part
        })
        .collect();
    format!(
        "{}: {}",
        count(run.batches.len() as u64, "batch", "batches"),
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
    )
}

/// What the call did: `submitted 3, ingested 2, planned 1 retry batch`, or `nothing changed`.
pub fn did(before: &Snapshot, run: &RunFile) -> String {
    let mut verbs: BTreeMap<(usize, &str), u64> = BTreeMap::new();
    let mut retries = 0u64;
    for batch in &run.batches {
        let now = phase(&batch.state);
        let Some(was) = before.phases.get(&batch.name) else {
            retries += 1;
            continue;
        };
        if was == now {
            continue;
        }
        let was_remote = matches!(
            was.as_str(),
            "validating" | "in_progress" | "finalizing" | "cancelling"
        ) || !PHASE_ORDER.contains(&was.as_str());
        let verb = match batch.state.kind() {
            StateKind::Planned => continue,
            StateKind::Uploaded => "uploaded",
            StateKind::Queued => "queued",
            // The provider moving a batch on (validating → in_progress) is not this call's doing.
            StateKind::Submitted if was_remote => continue,
            StateKind::Submitted => "submitted",
            StateKind::Completed => "found completed",
            StateKind::Expired => "found expired",
            StateKind::Downloaded => "downloaded",
            StateKind::Ingested => "ingested",
            StateKind::Cancelled => "cancelled",
            StateKind::Failed => "found failed",
        };
        let rank = VERB_ORDER.iter().position(|v| *v == verb).unwrap_or(0);
        *verbs.entry((rank, verb)).or_insert(0) += 1;
    }
    let mut parts: Vec<String> = verbs
        .iter()
        .map(|(&(_, verb), &n)| match verb.strip_prefix("found ") {
            // `found 2 expired`: the provider ended them; this call saw it.
            Some(phase) => format!("found {} {phase}", number(n)),
            None => format!("{verb} {}", number(n)),
        })
        .collect();
    if retries > 0 {
        parts.push(format!(
            "planned {}",
            count(retries, "retry batch", "retry batches")
        ));
    }
    if parts.is_empty() {
        "nothing changed".to_owned()
    } else {
        parts.join(", ")
    }
}

/// What comes next, with the exit code.
pub fn next(run: &RunFile, run_dir: &Path, next: Next) -> String {
    let queued = run.count_in(StateKind::Queued) > 0;
    match next {
        Next::Finished if run.cancelled => "the run is cancelled and finished (exit 0)".to_owned(),
        Next::Finished => "finished (exit 0)".to_owned(),
        Next::Submitted => format!(
            "every batch is with the provider; follow them with `embatch advance --run-dir {}` (exit 0)",
            run_dir.display()
        ),
        Next::Refreshed => "refreshed from the provider (exit 0)".to_owned(),
        Next::Waiting if run.cancelled => {
            "waiting on the provider to end the cancelled batches — run again later (exit 75)"
                .to_owned()
        }
        Next::Waiting if queued => {
            "waiting for room in the provider's queue — run again later (exit 75)".to_owned()
        }
        Next::Waiting => "waiting on the provider — run again later (exit 75)".to_owned(),
        Next::OutOfTime => {
            "--max-wait reached, the run is saved — run again later (exit 75)".to_owned()
        }
        Next::ProviderUnavailable => {
            "the provider did not answer, the run is saved — run again later (exit 75)".to_owned()
        }
        Next::DatabaseLost => {
            "the database connection was lost, the run is saved — run again later (exit 75)"
                .to_owned()
        }
        Next::Stopped => "stopped by the error below (exit 1)".to_owned(),
        Next::Interrupted(signal) => format!(
            "stopped by {}, the run is saved (exit {})",
            match signal {
                2 => "ctrl-c".to_owned(),
                15 => "SIGTERM".to_owned(),
                other => format!("signal {other}"),
            },
            128 + signal
        ),
    }
}

/// What an interrupted wait prints last (after "interrupted by SIGINT"): the command that
/// resumes it.
pub fn resume_advice(run_dir: &Path) -> String {
    format!(
        "; the run is saved, resume it with: embatch advance --run-dir {} --wait",
        run_dir.display()
    )
}

/// The whole line: `20 batches: 3 ingested, 17 in_progress (412,000 / 950,000 requests); this
/// call: ingested 3; waiting on the provider — run again later (exit 75)`.
pub fn one_line(before: &Snapshot, run: &RunFile, run_dir: &Path, ending: Next) -> String {
    format!(
        "{}; this call: {}; {}",
        totals(run),
        did(before, run),
        next(run, run_dir, ending)
    )
}

#[cfg(test)]
mod tests;
