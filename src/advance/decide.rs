//! What to do next for one batch of a run: a pure function of the run, the goal and the two
//! clocks, so that every state and goal is tested without a database or a network. The loop
//! in `advance` carries the chosen action out (the remote steps, ingest) and asks again.

use chrono::{DateTime, Utc};

use crate::run::state::{BatchState, StateKind};
use crate::run::store::{BatchRecord, RunFile};

/// How far `advance` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// Every step there is: upload, create, poll, download, ingest, plan retries.
    Done,
    /// Stop once every batch is submitted (`submit`).
    Submitted,
    /// Poll, download and ingest what is complete; never upload, create or retry, so it never
    /// spends money (`ingest`).
    IngestOnly,
    /// Only poll what is submitted (`status --refresh`): no upload, no creation, no download.
    RefreshOnly,
}

impl Goal {
    /// Whether this goal uploads and creates batches.
    pub fn creates(self) -> bool {
        matches!(self, Goal::Done | Goal::Submitted)
    }

    /// Whether this goal downloads and ingests.
    pub fn ingests(self) -> bool {
        matches!(self, Goal::Done | Goal::IngestOnly)
    }
}

/// The next step for one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Planned → Uploaded: adopt an earlier upload, or upload the input file.
    Upload,
    /// Uploaded/Queued whose input file expired → Planned, to be uploaded again.
    ExpireInput,
    /// Uploaded/Queued → Submitted: adopt an earlier creation, or create the batch.
    Create,
    /// Submitted → whatever the provider says now.
    Poll,
    /// Completed/Expired/Cancelled → Downloaded: fetch the output and error files.
    Download,
    /// Downloaded → Ingested: write the vectors.
    Ingest,
    /// Ingested: delete the remote files.
    CleanUp,
    /// Nothing to do for this batch now.
    Wait,
}

/// The two clocks a decision reads: this machine's for our own marks (`not_before`), the
/// provider's for its expiry times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clocks {
    pub now: DateTime<Utc>,
    pub provider_now: DateTime<Utc>,
}

/// The next step for batch `idx` of `run` under `goal`. `max_enqueued_tokens` is the
/// command's `--max-enqueued-tokens` (the run's own setting applies when it is `None`).
/// (The loop calls [`decide_shared`], which is this for a run alone.)
#[cfg(test)]
pub fn decide(
    run: &RunFile,
    idx: usize,
    goal: Goal,
    max_enqueued_tokens: Option<u64>,
    clocks: Clocks,
) -> Action {
    decide_shared(run, idx, goal, max_enqueued_tokens, None, clocks)
}

/// [`decide`] for a run that shares its enqueued-token budget with other runs (`sync`):
/// `others_in_flight` is the tokens they have in flight. With `Some`, a batch is created only
/// when it fits beside them, a `queued` batch too, and "nothing in flight" means nothing in
/// any run. With `None` it is exactly [`decide`].
pub fn decide_shared(
    run: &RunFile,
    idx: usize,
    goal: Goal,
    max_enqueued_tokens: Option<u64>,
    others_in_flight: Option<u64>,
    clocks: Clocks,
) -> Action {
    let fits = |run: &RunFile| match others_in_flight {
        None => fits_in_flight(run, idx, max_enqueued_tokens),
        Some(others) => fits_beside(run, idx, max_enqueued_tokens, others),
    };
    let creating = goal.creates() && !run.cancelled;
    match &run.batches[idx].state {
        // Sharing a budget, a run uploads ahead only what it can create now, and one batch
        // more, so that the batch that takes the next free room is created at once: uploading
        // every planned file first would hold the first creations back by all the uploads
        // (and leave input files to expire while they wait).
        BatchState::Planned(_)
            if creating && others_in_flight.is_some() && !fits(run) && has_ready(run) =>
        {
            Action::Wait
        }
        BatchState::Planned(_) if creating => Action::Upload,
        BatchState::Uploaded(up) if creating => {
            if up.file_expires_at.is_some_and(|t| t <= clocks.provider_now)
                && up.create_started.is_none()
            {
                Action::ExpireInput
            } else if up.create_started.is_none() && !fits(run) {
                Action::Wait
            } else {
                Action::Create
            }
        }
        BatchState::Queued(q) if creating => {
            let nothing_in_flight = !run
                .batches
                .iter()
                .any(|b| b.state.kind() == StateKind::Submitted)
                && others_in_flight.unwrap_or(0) == 0;
            let too_soon = q.not_before > clocks.now && !nothing_in_flight;
            // Sharing a budget, it also waits until it fits beside the other runs.
            let no_room = others_in_flight.is_some() && !fits(run);
            if q.create_started.is_none() && (too_soon || no_room) {
                Action::Wait
            } else if q.file_expires_at.is_some_and(|t| t <= clocks.provider_now)
                && q.create_started.is_none()
            {
                Action::ExpireInput
            } else {
                Action::Create
            }
        }
        BatchState::Submitted(_) => Action::Poll,
        BatchState::Completed(_) | BatchState::Expired(_) if goal.ingests() => Action::Download,
        BatchState::Cancelled(c) if c.done.is_some() && goal.ingests() => Action::Download,
        BatchState::Downloaded(_) if goal.ingests() => Action::Ingest,
        BatchState::Ingested(i) if goal.ingests() && !i.remote_files_deleted => Action::CleanUp,
        _ => Action::Wait,
    }
}

/// Whether `run` has a batch uploaded and waiting to be created (whose creation was not
/// announced).
fn has_ready(run: &RunFile) -> bool {
    run.batches.iter().any(|b| match &b.state {
        BatchState::Uploaded(up) => up.create_started.is_none(),
        BatchState::Queued(q) => q.create_started.is_none(),
        _ => false,
    })
}

/// Whether creating batch `idx` keeps the tokens in flight under the enqueued-token bound
/// (each batch counted as the larger of its tokens and bytes/4). A batch alone over the bound
/// is still created when nothing else is in flight, or it would never run.
pub fn fits_in_flight(run: &RunFile, idx: usize, max_enqueued_tokens: Option<u64>) -> bool {
    let Some(bound) = max_enqueued_tokens.or(run.settings.limits.max_enqueued_tokens) else {
        return true;
    };
    let estimate = |b: &BatchRecord| b.tokens.max(b.bytes.div_ceil(4));
    let in_flight: u64 = run
        .batches
        .iter()
        .filter(|b| b.state.kind() == StateKind::Submitted)
        .map(estimate)
        .sum();
    in_flight == 0 || in_flight + estimate(&run.batches[idx]) <= bound
}

/// The tokens in flight in `run`, as a shared budget counts them: its submitted batches, and
/// those whose creation was announced (`create_started`) but whose answer was never saved —
/// a crash may have left them created on the provider — each counted as the larger of its
/// tokens and bytes/4.
pub fn tokens_in_flight(run: &RunFile) -> u64 {
    run.batches
        .iter()
        .filter(|b| match &b.state {
            BatchState::Submitted(_) => true,
            BatchState::Uploaded(up) => up.create_started.is_some(),
            BatchState::Queued(q) => q.create_started.is_some(),
            _ => false,
        })
        .map(in_flight_estimate)
        .sum()
}

/// What one batch counts for against the enqueued-token bound.
pub fn in_flight_estimate(batch: &BatchRecord) -> u64 {
    batch.tokens.max(batch.bytes.div_ceil(4))
}

/// [`fits_in_flight`] with `others` tokens in flight in other runs sharing the bound: a batch
/// alone over the bound is created only when nothing is in flight in any run.
pub fn fits_beside(
    run: &RunFile,
    idx: usize,
    max_enqueued_tokens: Option<u64>,
    others: u64,
) -> bool {
    let Some(bound) = max_enqueued_tokens.or(run.settings.limits.max_enqueued_tokens) else {
        return true;
    };
    let in_flight = tokens_in_flight(run) + others;
    in_flight == 0 || in_flight + in_flight_estimate(&run.batches[idx]) <= bound
}

#[cfg(test)]
mod tests;
