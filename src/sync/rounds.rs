//! How a `sync` call moves its runs: `fill` serves the provider's queue (polls, creations,
//! one per run and turn with a budget, the runs with the fewest turns first), and
//! `advance_rounds` adds each run's downloads, ingests and retries, filling again after each,
//! until nothing moves. Every move is `advance::advance` itself.

use crate::advance::{self, AdvanceOptions, Goal};
use crate::config::{Global, SyncConfig};
use crate::interrupt::Interrupted;
use crate::printer::Printer;
use crate::run::lock::LockError;
use crate::run::state::StateKind;
use crate::run::store::{self, RunFile};

use super::report::{RunEntry, waiting};

/// A safety bound on the advance rounds of one call; each round but the last moves something,
/// so this is never reached by real work.
const MAX_ROUNDS: usize = 10_000;

/// Advances every run until nothing moves. The provider's queue comes first: each pass
/// begins by polling every submitted batch and creating what fits (`fill`), and fills again
/// after each run's downloads and ingests, so that a batch that finished is replaced at once
/// rather than after every other run's ingest. With a budget, each run creates at most one
/// batch per turn, oldest run first, beside the tokens the other runs have in flight.
pub(super) async fn advance_rounds(
    global: &Global,
    cfg: &SyncConfig,
    printer: &Printer,
    runs: &mut [RunEntry],
) -> anyhow::Result<()> {
    for _ in 0..MAX_ROUNDS {
        let before: Vec<Vec<StateKind>> = runs.iter().map(|r| kinds(&r.run)).collect();
        fill(global, cfg, printer, runs, None).await?;
        for idx in 0..runs.len() {
            if advance_one(global, cfg, printer, runs, idx, Goal::Done).await? {
                fill(global, cfg, printer, runs, None).await?;
            }
        }
        let after: Vec<Vec<StateKind>> = runs.iter().map(|r| kinds(&r.run)).collect();
        if after == before {
            break;
        }
    }
    Ok(())
}

/// Polls every run's submitted batches and creates what fits, in turns (with a budget, one
/// creation per run and turn, the runs that had the fewest turns in this call first, then the
/// oldest), until a turn creates nothing or `max_turns` are taken; downloads nothing and
/// ingests nothing, so that it is quick.
pub(super) async fn fill(
    global: &Global,
    cfg: &SyncConfig,
    printer: &Printer,
    runs: &mut [RunEntry],
    max_turns: Option<usize>,
) -> anyhow::Result<()> {
    for _ in 0..max_turns.unwrap_or(MAX_ROUNDS) {
        let mut order: Vec<usize> = (0..runs.len()).collect();
        order.sort_by_key(|&i| (runs[i].turns, runs[i].created_at, runs[i].dir.clone()));
        let mut moved = false;
        for idx in order {
            moved |= advance_one(global, cfg, printer, runs, idx, Goal::Submitted).await?;
        }
        // Without a budget every run created all it could in its turn.
        if !moved || cfg.opts.max_enqueued_tokens.is_none() {
            break;
        }
    }
    Ok(())
}

/// One `advance` of run `idx` towards `goal`, beside the tokens the other runs have in
/// flight; whether a batch of it changed state. A run that failed, or that another command
/// holds, is left alone for the rest of the call.
async fn advance_one(
    global: &Global,
    cfg: &SyncConfig,
    printer: &Printer,
    runs: &mut [RunEntry],
    idx: usize,
    goal: Goal,
) -> anyhow::Result<bool> {
    if runs[idx].error.is_some() || runs[idx].run.is_finished() {
        return Ok(false);
    }
    let budget = cfg.opts.max_enqueued_tokens;
    let total: u64 = runs.iter().map(|r| advance::tokens_in_flight(&r.run)).sum();
    let own = advance::tokens_in_flight(&runs[idx].run);
    let opts = AdvanceOptions {
        shared_in_flight_tokens: budget.map(|_| total - own),
        max_creations: budget.map(|_| 1),
        wait: false,
        ..cfg.opts.clone()
    };
    let entry = &mut runs[idx];
    let before = kinds(&entry.run);
    let waiting_before = waiting(&entry.run);
    let result = advance::advance(global, &entry.dir, goal, &opts, "embatch sync", printer).await;
    match result {
        Ok(_) => {}
        Err(err) if err.downcast_ref::<Interrupted>().is_some() => return Err(err),
        // Another command has this run now: it is not ours to move in this call.
        Err(err)
            if err
                .downcast_ref::<LockError>()
                .is_some_and(LockError::is_held) =>
        {
            entry.error = None;
        }
        Err(err) => entry.error = Some(format!("{}: {err:#}", entry.dir.display())),
    }
    match store::load(&entry.dir) {
        Ok(run) => entry.run = run,
        Err(err) => {
            entry.error.get_or_insert_with(|| format!("{err:#}"));
        }
    }
    entry.turns += waiting_before.saturating_sub(waiting(&entry.run));
    Ok(kinds(&entry.run) != before)
}

fn kinds(run: &RunFile) -> Vec<StateKind> {
    run.batches.iter().map(|b| b.state.kind()).collect()
}
