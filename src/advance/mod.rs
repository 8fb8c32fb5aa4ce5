//! `advance`: move every batch of a run as far forward as it can go without waiting
//! (DESIGN.md §5), and `cancel`. Also the engine behind `submit` and `status --refresh`.
//!
//! lock → load → step each batch → save after every transition. Remote calls that create
//! something (upload, batch creation) are announced in `run.json` *before* the call
//! (`upload_started`, `create_started`); when such a mark is found — after a crash, or after a
//! call whose answer was lost — the object is looked for and adopted before anything is created
//! again. This module decides nothing about legality: `state::BatchState::apply` does.
//!
//! Its parts: `decide` (pure: which step a batch takes next, for a goal and the two clocks),
//! the remote steps here (through the `provider::BatchProvider` seam), `ingest` (output lines
//! to rows, two writer connections, in-order checkpoints) and `retry` (retry batches, written
//! with plan's writer).
//!
//! Clocks: the provider's timestamps (a file's or a batch's `created_at` and `expires_at`) are
//! compared with the provider's time — this machine's time plus the skew its last `Date`
//! header showed — never with this machine's clock alone, so a clock a month off on either
//! side neither expires fresh uploads nor hides a batch from adoption. An upload that comes
//! back unusable anyway is tried at most [`MAX_UPLOADS_PER_BATCH`] times per call.
//!
//! Database faults: a lost connection (a terminated backend, a restart, a network cut) is
//! transient: the connections are dropped and the steps run again from the last saved state
//! — which, mid-ingest, is the last checkpoint, exactly where a new `advance` would resume —
//! at most [`MAX_DB_RECONNECTS`] times in a row, then the call exits 75.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};

pub use crate::config::AdvanceOptions;
use crate::config::{Database, Global};
use crate::crashpoint::crashpoint;
use crate::exit::ExitStatus;
use crate::pg::conn::DbFault;
use crate::run::lock::RunLock;

use crate::printer::Printer;
use crate::provider::{ApiError, BatchProvider, RemoteBatch, RemoteFile};
use crate::run::layout;
use crate::run::layout::{BATCH_JSON, ERRORS_FILE, INPUT_FILE, OUTPUT_FILE, batch_dir};
use crate::run::state::{BatchState, Event, RemoteError, RemoteStatus, StateKind};
use crate::run::store::{self, RunFile};
use crate::status::summary::{self, Next};

mod database;
mod decide;
mod ingest;
mod retry;

pub use decide::Goal;
use decide::{Action, Clocks, decide_shared};
pub use decide::{in_flight_estimate, tokens_in_flight};

/// How long the provider keeps an uploaded input file (DESIGN.md §5: not its 30-day default).
pub const INPUT_FILE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Batches are looked for back to this long before the run was created (clock skew).
const ADOPTION_SLACK: chrono::Duration = chrono::Duration::hours(1);
/// How many times one call uploads the same batch. Two: an input file that expired while
/// waiting in `queued`, or that the provider lost, is uploaded again once; an upload that
/// comes back unusable a second time (an `expires_at` already past, a file the provider
/// does not know) will not be fixed by a third, and uploading in a loop is what must never
/// happen. The call then stops with exit 1, saying what is wrong: waiting does not help until
/// someone fixes a clock, a proxy or `OPENAI_BASE_URL`, and exit 75 would have a cron loop
/// upload the file again every few minutes.
pub const MAX_UPLOADS_PER_BATCH: u32 = 2;
/// A clock difference below this is noise (whole-second headers, network time), not a skew
/// worth naming.
const NOTABLE_SKEW: chrono::Duration = chrono::Duration::minutes(5);
/// How many times in a row one call reconnects to the database after a transient fault
/// (1 s, 2 s, 4 s apart) before it exits 75.
pub const MAX_DB_RECONNECTS: u32 = 3;

/// `embatch advance` (and `submit`): returns `Done` when the run is finished.
pub async fn advance(
    global: &Global,
    run_dir: &Path,
    goal: Goal,
    opts: &AdvanceOptions,
    command: &str,
    printer: &Printer,
) -> anyhow::Result<ExitStatus> {
    let (_lock, mut stepper) = Stepper::open(global, run_dir, command, opts, printer)?;
    let started = std::time::Instant::now();
    let mut db_faults_in_a_row = 0u32;
    loop {
        let stepped = if opts.wait {
            // ctrl-c or SIGTERM during a step of `run` / `advance --wait`: the step stops where
            // it is — as a crash there would, and every step is safe to crash at — and the user
            // is told how to resume.
            let guard = crate::interrupt::Guard::install()
                .context("could not set up the signal handlers")?;
            let stepped = tokio::select! {
                result = stepper.step_all(goal) => Ok(result),
                signal = guard.wait() => Err(signal),
            };
            drop(guard);
            match stepped {
                Ok(result) => result,
                Err(signal) => {
                    stepper.report(Next::Interrupted(signal));
                    return Err(crate::interrupt::Interrupted {
                        signal,
                        what: summary::resume_advice(run_dir),
                    }
                    .into());
                }
            }
        } else {
            stepper.step_all(goal).await
        };
        match stepped {
            Ok(()) => db_faults_in_a_row = 0,
            Err(err) => match after_error(&mut stepper, err, opts, &mut db_faults_in_a_row).await {
                AfterError::GoOn => {}
                AfterError::StepAgain => continue,
                AfterError::End(result) => return result,
            },
        }
        let done = match goal {
            Goal::Done | Goal::IngestOnly => stepper.is_finished(goal),
            Goal::Submitted => stepper
                .run
                .batches
                .iter()
                .all(|b| !matches!(b.state.kind(), StateKind::Planned | StateKind::Uploaded)),
            Goal::RefreshOnly => true,
        };
        if done {
            stepper.report(match goal {
                Goal::Submitted => Next::Submitted,
                Goal::RefreshOnly => Next::Refreshed,
                Goal::Done | Goal::IngestOnly => Next::Finished,
            });
            return Ok(ExitStatus::Done);
        }
        let out_of_time = opts
            .max_wait
            .is_some_and(|max| started.elapsed() + opts.poll > max);
        if !opts.wait || out_of_time {
            stepper.report(if out_of_time {
                Next::OutOfTime
            } else {
                Next::Waiting
            });
            return Ok(ExitStatus::NotYet);
        }
        // Shown only while sleeping, so that the steps' own messages never tear it.
        let waiter = printer.waiting_line(
            format!(
                "{}; next poll in {}s",
                summary::totals(&stepper.run),
                opts.poll.as_secs()
            ),
            started.elapsed(),
        );
        // ctrl-c or SIGTERM while waiting between polls: clear the line, say how to resume.
        let guard =
            crate::interrupt::Guard::install().context("could not set up the signal handlers")?;
        let signal = tokio::select! {
            () = tokio::time::sleep(opts.poll) => None,
            signal = guard.wait() => Some(signal),
        };
        drop(guard);
        waiter.finish_and_clear();
        if let Some(signal) = signal {
            stepper.report(Next::Interrupted(signal));
            return Err(crate::interrupt::Interrupted {
                signal,
                what: summary::resume_advice(run_dir),
            }
            .into());
        }
    }
}

/// What the loop of [`advance`] does after a step failed.
enum AfterError {
    /// Go on as after a step that waits (the provider was unreachable; `--wait` polls again).
    GoOn,
    /// Step again at once (the database connection was lost and is made again).
    StepAgain,
    /// The call ends with this.
    End(anyhow::Result<ExitStatus>),
}

/// Sorts a failed step: the provider unreachable or overloaded (nothing is lost: try again
/// later), the database connection lost (reconnect, at most [`MAX_DB_RECONNECTS`] times in a
/// row), or an error for a person to fix.
async fn after_error(
    stepper: &mut Stepper,
    err: anyhow::Error,
    opts: &AdvanceOptions,
    db_faults_in_a_row: &mut u32,
) -> AfterError {
    let printer = stepper.printer;
    match err {
        err if is_transient(&err) && !opts.wait => {
            stepper.report(Next::ProviderUnavailable);
            printer.warn(&format!(
                "{err:#}; the run is saved, run advance again later"
            ));
            AfterError::End(Ok(ExitStatus::NotYet))
        }
        err if is_transient(&err) => {
            printer.warn(&format!(
                "{err:#}; trying again in {}s",
                opts.poll.as_secs()
            ));
            AfterError::GoOn
        }
        err => match db_fault(&err).and_then(|fault| match fault {
            // A database this call has not reached yet may be a wrong DATABASE_URL:
            // that is for a person to fix (exit 1), not for a cron loop to wait out.
            DbFault::Unreachable(_) if !stepper.db_reached => None,
            DbFault::Unreachable(what) => Some(DbFault::Transient(what)),
            other => Some(other),
        }) {
            Some(DbFault::Transient(what)) => {
                // The connections are no use now; the next step that needs the database
                // connects again, and resumes from what is saved (mid-ingest: the last
                // checkpoint, whose rows are committed), as a new advance would.
                stepper.db = None;
                *db_faults_in_a_row += 1;
                if *db_faults_in_a_row > MAX_DB_RECONNECTS {
                    stepper.report(Next::DatabaseLost);
                    printer.warn(&format!(
                        "database connection lost ({what}) and {MAX_DB_RECONNECTS} reconnects in a row did not get through; the run is saved, run advance again later"
                    ));
                    return AfterError::End(Ok(ExitStatus::NotYet));
                }
                let delay = Duration::from_secs(1 << (*db_faults_in_a_row - 1));
                printer.verbose(&format!(
                    "database connection lost ({what}); reconnecting in {}s ({db_faults_in_a_row} of {MAX_DB_RECONNECTS}) and resuming from the last saved step",
                    delay.as_secs()
                ));
                tokio::time::sleep(delay).await;
                AfterError::StepAgain
            }
            Some(DbFault::StatementTimeout) => {
                stepper.report(Next::Stopped);
                AfterError::End(Err(err.context(statement_timeout_advice(&stepper.database))))
            }
            Some(DbFault::Unreachable(_)) | None => {
                stepper.report(Next::Stopped);
                AfterError::End(Err(err))
            }
        },
    }
}

/// `embatch cancel`: no more creations or retries; remote batches are cancelled and followed
/// until the provider finishes them (their partial output is still fetched).
///
/// Every batch is tried, whatever happens to the others: a batch that could not be cancelled
/// keeps its state (so `cancel` can be run again) and the call ends with an error naming each
/// one; the rest are cancelled in the same call. Nothing the run uploaded is left on the
/// provider for a batch that will never be created: an upload whose file id was never saved is
/// adopted first, and the input file of a batch cancelled before creation is deleted.
pub async fn cancel(
    global: &Global,
    run_dir: &Path,
    printer: &Printer,
) -> anyhow::Result<ExitStatus> {
    let (_lock, mut stepper) = Stepper::open(
        global,
        run_dir,
        "embatch cancel",
        &AdvanceOptions::default(),
        printer,
    )
    .map_err(|err| match err.downcast::<crate::run::lock::LockError>() {
        Ok(held) => anyhow::Error::new(held.for_cancel()),
        Err(other) => other,
    })?;
    stepper.run.cancelled = true;
    stepper.save()?;
    let mut failures: Vec<String> = Vec::new();
    for idx in 0..stepper.run.batches.len() {
        match stepper.cancel_batch(idx).await {
            Ok(()) => {}
            // The key or the account is refused: every other batch would be refused the same.
            Err(err)
                if err.downcast_ref::<ApiError>().is_some_and(|e| {
                    matches!(e, ApiError::Auth { .. } | ApiError::Quota { .. })
                }) =>
            {
                stepper.report(Next::Stopped);
                return Err(err);
            }
            Err(err) => failures.push(format!("{}: {err:#}", stepper.name(idx))),
        }
    }
    // Batches ingested before the cancel whose retries were not planned yet.
    if let Err(err) = stepper.drop_retries() {
        failures.push(format!("{err:#}"));
    }
    let finished = stepper.is_finished(Goal::Done);
    stepper.report(if !failures.is_empty() {
        Next::Stopped
    } else if finished {
        Next::Finished
    } else {
        Next::Waiting
    });
    if !failures.is_empty() {
        const SHOWN: usize = 3;
        let mut listed = failures
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        if failures.len() > SHOWN {
            listed.push_str(&format!("; and {} more", failures.len() - SHOWN));
        }
        anyhow::bail!(
            "could not cancel {} batch{} of the run ({listed}); the run is marked cancelled and its other batches are cancelled, run `embatch cancel --run-dir {}` again to cancel the rest",
            failures.len(),
            if failures.len() == 1 { "" } else { "es" },
            run_dir.display()
        );
    }
    Ok(if finished {
        ExitStatus::Done
    } else {
        ExitStatus::NotYet
    })
}

/// The database fault behind an error, if a database error is in its chain.
fn db_fault(err: &anyhow::Error) -> Option<DbFault> {
    err.chain().find_map(DbFault::of)
}

/// What to do about a statement cancelled by `statement_timeout`.
fn statement_timeout_advice(database: &Database) -> String {
    let user = database
        .target()
        .ok()
        .and_then(|target| target.user().map(crate::pg::source::quote_ident))
        .unwrap_or_else(|| "<user>".to_owned());
    format!(
        "a database statement ran longer than the server's statement_timeout and was cancelled; raise statement_timeout for the role embatch connects as (`ALTER ROLE {user} SET statement_timeout = '10min'`), or add `options=-c%20statement_timeout%3D0` to the query string of DATABASE_URL (a smaller --update-chunk-size also shortens each statement), then run advance again: the run is saved"
    )
}

fn is_transient(err: &anyhow::Error) -> bool {
    err.downcast_ref::<ApiError>()
        .is_some_and(|e| e.is_retryable() || e.is_unknown_outcome())
}

/// Moves the batches of one loaded run; `database.rs` adds the database steps, `retry.rs` the
/// retry planning.
pub(crate) struct Stepper {
    pub(crate) run_dir: PathBuf,
    pub(crate) run: RunFile,
    pub(crate) api: Box<dyn BatchProvider>,
    pub(crate) printer: Printer,
    pub(crate) opts: AdvanceOptions,
    pub(crate) database: Database,
    /// Connected on first need: polling and downloading need no database.
    pub(crate) db: Option<ingest::DbContext>,
    /// Uploads made by this call, per batch index (bounded by [`MAX_UPLOADS_PER_BATCH`]).
    uploads: BTreeMap<usize, u32>,
    /// This call connected to the database at least once: failing to reach it later is a
    /// lost connection, not a wrong `DATABASE_URL`.
    pub(crate) db_reached: bool,
    /// Batch creations tried by this call (bounded by `opts.max_creations`, for `sync`).
    creations: u32,
    /// Each batch's phase when the call began, for the summary of what it did.
    opened: summary::Snapshot,
}

/// What one step did.
pub(crate) enum Progress {
    /// The batch moved: step it again.
    Moved,
    /// Nothing more to do for this batch in this advance.
    Wait,
}

impl Stepper {
    /// lock → load → API client: how every command that writes a run begins. The lock is
    /// held as long as the returned guard lives.
    fn open(
        global: &Global,
        run_dir: &Path,
        command: &str,
        opts: &AdvanceOptions,
        printer: &Printer,
    ) -> anyhow::Result<(RunLock, Stepper)> {
        // A folder that is not a run gets no `run.lock` left behind in it.
        if !run_dir.join(layout::RUN_FILE).exists() {
            store::load(run_dir)?;
        }
        let lock = RunLock::acquire(run_dir, command)?;
        let run = store::load(run_dir)?;
        let api = crate::provider::connect::run_provider(&global.api, &run, run_dir, &opts.direct)?;
        let stepper = Stepper {
            run_dir: run_dir.to_path_buf(),
            opened: summary::Snapshot::of(&run),
            run,
            api,
            printer: *printer,
            opts: opts.clone(),
            database: global.database.clone(),
            db: None,
            uploads: BTreeMap::new(),
            db_reached: false,
            creations: 0,
        };
        Ok((lock, stepper))
    }

    pub(crate) fn save(&mut self) -> anyhow::Result<()> {
        self.run.updated_at = Utc::now();
        crashpoint("before_save");
        store::save(&self.run_dir, &self.run)?;
        crashpoint("after_save");
        Ok(())
    }

    /// Applies one event to batch `idx` and saves the run.
    pub(crate) fn apply(&mut self, idx: usize, event: Event) -> anyhow::Result<()> {
        self.transition(idx, event)?;
        self.save()
    }

    /// Applies one event to batch `idx` in memory only: for changes that must reach
    /// `run.json` in one save together with others (the caller saves).
    pub(crate) fn transition(&mut self, idx: usize, event: Event) -> anyhow::Result<()> {
        let batch = &mut self.run.batches[idx];
        let state = std::mem::replace(&mut batch.state, BatchState::Planned(Default::default()));
        match state.apply(event) {
            Ok(next) => batch.state = next,
            Err(illegal) => {
                let message = illegal.to_string();
                batch.state = *illegal.state;
                anyhow::bail!("internal error in batch {}: {message}", batch.name);
            }
        }
        Ok(())
    }

    pub(crate) fn name(&self, idx: usize) -> &str {
        &self.run.batches[idx].name
    }

    pub(crate) fn dir(&self, idx: usize) -> PathBuf {
        batch_dir(&self.run_dir, self.name(idx))
    }

    fn upload_filename(&self, idx: usize) -> String {
        format!("embatch-{}-{}.jsonl", self.run.run_id, self.name(idx))
    }

    fn metadata(&self, idx: usize, submission: u32) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("embatch_run_id".to_owned(), self.run.run_id.clone()),
            ("embatch_family_id".to_owned(), self.run.family_id.clone()),
            ("embatch_batch".to_owned(), self.name(idx).to_owned()),
            ("embatch_submission".to_owned(), submission.to_string()),
        ])
    }

    /// The run is finished for this goal (`ingest` cannot plan retries: retryable failures
    /// then wait for an `advance`).
    fn is_finished(&self, goal: Goal) -> bool {
        self.run.batches.iter().all(|b| match &b.state {
            BatchState::Ingested(_) if goal == Goal::IngestOnly => true,
            state => state.is_done(),
        })
    }

    async fn step_all(&mut self, goal: Goal) -> anyhow::Result<()> {
        if let Some(dims) = self.opts.dims
            && dims != self.run.settings.dimensions
        {
            anyhow::bail!(
                "--dims {dims} does not match this run, which was planned for {} dimensions",
                self.run.settings.dimensions
            );
        }
        if self.opts.redownload {
            // Once per invocation: the files are fetched again before ingesting.
            self.opts.redownload = false;
            for idx in 0..self.run.batches.len() {
                match self.run.batches[idx].state.kind() {
                    StateKind::Downloaded => {
                        self.download(idx).await?;
                    }
                    // Ingested already: ingest it again (`ingest --redownload [--overwrite]`).
                    StateKind::Ingested if goal == Goal::IngestOnly => {
                        self.ingest_again(idx).await?
                    }
                    _ => {}
                }
            }
        }
        // Batches grow while we go: retry batches are appended at the end.
        let mut idx = 0;
        while idx < self.run.batches.len() {
            while let Progress::Moved = self.step(idx, goal).await? {}
            idx += 1;
            if idx == self.run.batches.len() && goal == Goal::Done {
                if self.run.cancelled {
                    self.drop_retries()?;
                } else {
                    self.plan_retries().await?;
                }
            }
        }
        Ok(())
    }

    /// One transition of batch `idx`, if one is possible now (`decide` says which).
    async fn step(&mut self, idx: usize, goal: Goal) -> anyhow::Result<Progress> {
        let clocks = Clocks {
            now: Utc::now(),
            // The provider's expiry times are on its clock.
            provider_now: self.provider_now(),
        };
        let action = decide_shared(
            &self.run,
            idx,
            goal,
            self.opts.max_enqueued_tokens,
            self.opts.shared_in_flight_tokens,
            clocks,
        );
        match action {
            // `sync` lets each run create a bounded number of batches per turn.
            Action::Create if self.opts.max_creations.is_some_and(|m| self.creations >= m) => {
                Ok(Progress::Wait)
            }
            Action::Create => {
                self.creations += 1;
                self.create(idx).await
            }
            Action::Upload => self.upload(idx).await,
            Action::ExpireInput => {
                self.expire_input(idx).await?;
                Ok(Progress::Moved)
            }
            Action::Poll => self.poll(idx).await,
            Action::Download => self.download(idx).await,
            Action::Ingest => self.ingest(idx).await,
            Action::CleanUp => self.clean_up(idx).await,
            Action::Wait => Ok(Progress::Wait),
        }
    }

    /// The provider's time now: this machine's, plus the skew the last `Date` header showed.
    fn provider_now(&self) -> DateTime<Utc> {
        Utc::now() + self.clock_skew()
    }

    /// How far the provider's clock is ahead of this machine's (zero when unknown).
    fn clock_skew(&self) -> chrono::Duration {
        self.api
            .clock_reading()
            .map_or(chrono::Duration::zero(), |r| r.skew())
    }

    /// Uploaded/Queued whose input file expired → Planned, to be uploaded again. The old file
    /// is deleted first (best effort): when only this side's reckoning expired it, the
    /// provider would otherwise keep the text until its own expiry.
    async fn expire_input(&mut self, idx: usize) -> anyhow::Result<()> {
        if let Some(id) = self.run.batches[idx]
            .state
            .input_file_id()
            .map(str::to_owned)
            && let Err(err) = self.api.delete_file(&id).await
        {
            self.printer.verbose(&format!(
                "{}: could not delete the expired input file {id} ({err}); it expires by itself",
                self.name(idx)
            ));
        }
        self.apply(idx, Event::FileExpired)
    }

    /// Why an upload's answer is unusable: its `expires_at` is already past. Names the clock
    /// that disagrees, when one does.
    fn unusable_upload_message(
        &self,
        idx: usize,
        file: &RemoteFile,
        expires_at: DateTime<Utc>,
    ) -> String {
        let name = self.name(idx);
        let created_at = file.created_at;
        let mut why = Vec::new();
        match self.api.clock_reading() {
            Some(reading) => {
                let skew = reading.skew();
                if skew.abs() >= NOTABLE_SKEW {
                    why.push(format!(
                        "the provider's clock (Date: {}) is {} {} this machine's",
                        reading.date_header,
                        human_duration(skew),
                        if skew > chrono::Duration::zero() { "ahead of" } else { "behind" }
                    ));
                } else {
                    why.push(format!(
                        "this machine's clock agrees with the provider's (Date: {})",
                        reading.date_header
                    ));
                }
                let inner = created_at - reading.provider_time;
                if inner.abs() >= NOTABLE_SKEW {
                    why.push(format!(
                        "but the answer's created_at ({}) is {} {} its own Date header, so the server (or a proxy in front of it) runs a clock that is off — fix that clock (timedatectl / NTP on that host)",
                        created_at.to_rfc3339(),
                        human_duration(inner),
                        if inner > chrono::Duration::zero() { "ahead of" } else { "behind" }
                    ));
                } else if skew.abs() >= NOTABLE_SKEW {
                    why.push("fix the clock that is wrong (timedatectl / NTP)".to_owned());
                }
            }
            None => why.push(
                "the provider sends no Date header, so embatch cannot tell whose clock is off: check this machine's clock (timedatectl / NTP)"
                    .to_owned(),
            ),
        }
        if expires_at <= created_at {
            why.push(format!(
                "and the answer's expires_at is not even after its created_at ({}): the server OPENAI_BASE_URL points at does not answer as the OpenAI API does (a mock or a proxy rewriting answers?)",
                created_at.to_rfc3339()
            ));
        }
        format!(
            "the provider answered the upload of {name} (file {}) with expires_at {}, already past by the provider's own clock; {}",
            file.id,
            expires_at.to_rfc3339(),
            why.join("; "),
        )
    }

    /// Ingested: delete the remote input, output and error files (unless kept).
    async fn clean_up(&mut self, idx: usize) -> anyhow::Result<Progress> {
        if !self.opts.keep_remote_files {
            let state = &self.run.batches[idx].state;
            let mut ids: Vec<String> = state
                .input_file_id()
                .map(str::to_owned)
                .into_iter()
                .collect();
            if let Some(remote) = state.remote() {
                ids.extend(remote.output_file_id.clone());
                ids.extend(remote.error_file_id.clone());
            }
            for id in ids {
                // A file already gone is not an error (the client maps 404 to Ok).
                if let Err(err) = self.api.delete_file(&id).await {
                    self.printer.warn(&format!(
                        "{}: could not delete the remote file {id} ({err}); it expires by itself, or delete it in the dashboard",
                        self.name(idx)
                    ));
                    return Ok(Progress::Wait);
                }
            }
        }
        self.apply(idx, Event::RemoteFilesDeleted)?;
        Ok(Progress::Moved)
    }

    /// Planned → Uploaded: adopt an earlier upload of this file, or upload it.
    async fn upload(&mut self, idx: usize) -> anyhow::Result<Progress> {
        let BatchState::Planned(planned) = &self.run.batches[idx].state else {
            return Ok(Progress::Wait);
        };
        if planned.upload_started.is_some() && self.adopt_upload(idx).await? {
            return Ok(Progress::Moved);
        }
        let path = self.dir(idx).join(INPUT_FILE);
        if !path.exists() {
            // Nothing can rebuild it here (the chunks may have changed since the plan): the
            // way out is a copy of the file, or a new plan for what is still pending.
            anyhow::bail!(
                "{} is missing, so batch {} cannot be uploaded; restore the file if you have a copy, or `embatch cancel --run-dir {}` and plan again (the new plan takes every chunk still without an embedding)",
                path.display(),
                self.name(idx),
                self.run_dir.display()
            );
        }
        let n_uploads = self.uploads.get(&idx).copied().unwrap_or(0);
        if n_uploads >= MAX_UPLOADS_PER_BATCH {
            anyhow::bail!(
                "{} was uploaded {n_uploads} times in this advance and the provider never took an upload of it for a batch (the file was gone or expired each time); embatch stops rather than upload it again: run advance again later, and if this repeats, check the server OPENAI_BASE_URL points at and the clocks (timedatectl / NTP)",
                self.name(idx)
            );
        }
        // Never upload a file other than the one planned, nor one whose vectors could not be
        // matched to their chunks (DESIGN.md §9).
        let batch = &self.run.batches[idx];
        crate::run::evidence::check_input(&self.run_dir, &self.run, batch)?;
        crate::run::evidence::ensure_chunks(&self.run_dir, &self.run, batch, None, &self.printer)?;
        let filename = self.upload_filename(idx);
        self.apply(idx, Event::UploadStarted { at: Utc::now() })?;
        *self.uploads.entry(idx).or_insert(0) += 1;
        crashpoint("before_upload");
        let bar = self.printer.byte_bar(
            format!("uploading {}", self.name(idx)),
            Some(self.run.batches[idx].bytes),
        );
        let observer = bar.clone();
        let uploaded = self
            .api
            .upload(
                &path,
                &filename,
                INPUT_FILE_TTL,
                std::sync::Arc::new(move |n| observer.set_position(n)),
            )
            .await;
        bar.finish_and_clear();
        match uploaded {
            Ok(file) => {
                crashpoint("after_upload");
                self.apply(idx, uploaded_event(&file))?;
                self.printer
                    .verbose(&format!("{}: uploaded as {}", self.name(idx), file.id));
                if let Some(expires_at) = file.expires_at
                    && expires_at <= self.provider_now()
                {
                    let message = self.unusable_upload_message(idx, &file, expires_at);
                    let n_uploads = self.uploads.get(&idx).copied().unwrap_or(0);
                    if n_uploads >= MAX_UPLOADS_PER_BATCH {
                        // Saved as uploaded: the next advance finds it expired and uploads
                        // again, so the run resumes once the cause is fixed.
                        anyhow::bail!(
                            "{message}; {} was uploaded {n_uploads} times in this advance and came back unusable each time, so embatch stops rather than upload it again: fix that, then run advance again (the run is saved)",
                            self.name(idx)
                        );
                    }
                    self.printer
                        .warn(&format!("{message}; uploading it once more"));
                }
                Ok(Progress::Moved)
            }
            Err(err) if err.is_unknown_outcome() => {
                // The file may exist: look before anything else.
                if self.adopt_upload(idx).await? {
                    Ok(Progress::Moved)
                } else {
                    Err(anyhow::Error::from(err))
                }
            }
            Err(err) => Err(anyhow::Error::from(err)
                .context(format!("could not upload batch {}", self.name(idx)))),
        }
    }

    /// Looks for an uploaded file of this batch (same name and size) and adopts the newest.
    async fn adopt_upload(&mut self, idx: usize) -> anyhow::Result<bool> {
        let filename = self.upload_filename(idx);
        let size = self.run.batches[idx].bytes;
        let mut found: Vec<RemoteFile> = self
            .api
            .find_files_named(&filename)
            .await?
            .into_iter()
            .filter(|f| f.bytes == size)
            .collect();
        if found.is_empty() {
            return Ok(false);
        }
        found.sort_by_key(|f| std::cmp::Reverse(f.created_at));
        let keep = found.remove(0);
        // Copies from repeated lost answers are not used by anything: remove them.
        for extra in found {
            if let Err(err) = self.api.delete_file(&extra.id).await {
                self.printer.warn(&format!(
                    "could not delete the duplicate upload {}: {err}",
                    extra.id
                ));
            }
        }
        self.printer.info(&format!(
            "{}: adopted the earlier upload {}",
            self.name(idx),
            keep.id
        ));
        self.apply(idx, uploaded_event(&keep))?;
        Ok(true)
    }

    /// For a batch whose creation may have happened unrecorded, adopt the remote batch.
    async fn adopt_pending(&mut self, idx: usize) -> anyhow::Result<()> {
        let pending = match &self.run.batches[idx].state {
            BatchState::Uploaded(up) => up.create_started.map(|_| up.submission),
            BatchState::Queued(q) => q.create_started.map(|_| q.submission),
            _ => None,
        };
        if let Some(submission) = pending {
            self.adopt_batch(idx, submission).await?;
        }
        Ok(())
    }

    /// Looks for a remote batch with exactly this batch's metadata and adopts it.
    async fn adopt_batch(&mut self, idx: usize, submission: u32) -> anyhow::Result<bool> {
        let wanted = self.metadata(idx, submission);
        let not_before = self.adoption_cutoff().await? - ADOPTION_SLACK;
        let found = self.api.find_batches(not_before, &wanted).await?;
        // Newest first: with the create mark, at most one should exist.
        let Some(batch) = found.into_iter().next() else {
            return Ok(false);
        };
        self.printer.info(&format!(
            "{}: adopted the earlier batch {}",
            self.name(idx),
            batch.id
        ));
        self.record_created(idx, &batch)?;
        Ok(true)
    }

    /// The earliest time, on the provider's clock, at which this run can have created a
    /// batch: its creation time shifted by the measured skew — or not shifted, whichever is
    /// earlier, in case this machine's clock was set right (or wrong) since the run was
    /// planned — and no later than the earliest upload the provider timed for this run.
    /// Erring early only lists more; erring late would miss a batch and pay for it twice.
    async fn adoption_cutoff(&self) -> anyhow::Result<DateTime<Utc>> {
        if self.api.clock_reading().is_none() {
            // Adoption may be this call's first request: one cheap read shows the provider's
            // clock. A server without a Date header leaves the skew unknown (zero).
            self.api
                .read_clock()
                .await
                .context("could not list batches to look for one created earlier")?;
        }
        let created = self.run.created_at;
        let mut cutoff = created.min(created + self.clock_skew());
        for batch in &self.run.batches {
            if let BatchState::Uploaded(up) = &batch.state {
                cutoff = cutoff.min(up.uploaded_at);
            }
        }
        Ok(cutoff)
    }

    /// A remote batch exists for batch `idx` (created now or adopted): save what we know.
    fn record_created(&mut self, idx: usize, batch: &RemoteBatch) -> anyhow::Result<()> {
        self.write_batch_json(idx, batch)?;
        self.apply(
            idx,
            Event::BatchCreated {
                batch_id: batch.id.clone(),
                at: batch.created_at,
                remote: batch.snapshot.clone(),
            },
        )
    }

    /// Uploaded/Queued → Submitted (or Queued again after a queue refusal).
    async fn create(&mut self, idx: usize) -> anyhow::Result<Progress> {
        let (input_file_id, submission, marked) = match &self.run.batches[idx].state {
            BatchState::Uploaded(up) => (
                up.input_file_id.clone(),
                up.submission,
                up.create_started.is_some(),
            ),
            BatchState::Queued(q) => (
                q.input_file_id.clone(),
                q.submission,
                q.create_started.is_some(),
            ),
            _ => return Ok(Progress::Wait),
        };
        if marked && self.adopt_batch(idx, submission).await? {
            return Ok(Progress::Moved);
        }
        let metadata = self.metadata(idx, submission);
        self.apply(idx, Event::CreateStarted { at: Utc::now() })?;
        crashpoint("before_create");
        match self.api.create_batch(&input_file_id, &metadata).await {
            Ok(batch) => {
                crashpoint("after_create");
                self.record_created(idx, &batch)?;
                self.printer
                    .verbose(&format!("{}: created {}", self.name(idx), batch.id));
                Ok(Progress::Moved)
            }
            Err(ApiError::QueueLimit { message }) => {
                self.printer.warn(&format!(
                    "{}: the provider's queue is full ({message}); it waits in `queued` and is created again later",
                    self.name(idx)
                ));
                self.apply(
                    idx,
                    Event::CreateRefused {
                        reason: message,
                        now: Utc::now(),
                    },
                )?;
                Ok(Progress::Wait)
            }
            Err(err) if err.is_unknown_outcome() => {
                if self.adopt_batch(idx, submission).await? {
                    Ok(Progress::Moved)
                } else {
                    // Not visible (yet): the mark stays, the next advance looks again first.
                    Err(anyhow::Error::from(err))
                }
            }
            Err(ApiError::NotFound { .. }) => {
                // The input file is gone (expired or deleted): upload it again.
                self.printer.warn(&format!(
                    "{}: the uploaded input file {input_file_id} is gone; uploading it again",
                    self.name(idx)
                ));
                self.apply(idx, Event::FileExpired)?;
                Ok(Progress::Moved)
            }
            Err(ApiError::BadRequest { status, message })
                if self.input_file_gone(&input_file_id).await? =>
            {
                // Refused because the input file is gone (the provider answers 400, not 404,
                // for an unknown input_file_id): upload it again.
                self.printer.warn(&format!(
                    "{}: the uploaded input file {input_file_id} is gone (HTTP {status}: {message}); uploading it again",
                    self.name(idx)
                ));
                self.apply(idx, Event::FileExpired)?;
                Ok(Progress::Moved)
            }
            Err(ApiError::BadRequest { status, message }) => {
                self.printer.warn(&format!(
                    "{}: the provider refused the batch (HTTP {status}): {message}",
                    self.name(idx)
                ));
                self.apply(
                    idx,
                    Event::CreateRejected {
                        errors: vec![RemoteError {
                            code: Some(format!("http_{status}")),
                            message: Some(message),
                            line: None,
                        }],
                    },
                )?;
                Ok(Progress::Moved)
            }
            Err(err) => Err(anyhow::Error::from(err)
                .context(format!("could not create the batch for {}", self.name(idx)))),
        }
    }

    /// Whether the provider no longer has the input file `file_id` (expired or deleted).
    async fn input_file_gone(&self, file_id: &str) -> anyhow::Result<bool> {
        match self.api.get_file(file_id).await {
            Ok(_) => Ok(false),
            Err(ApiError::NotFound { .. }) => Ok(true),
            Err(err) => Err(err.into()),
        }
    }

    /// Submitted → whatever the provider says now.
    async fn poll(&mut self, idx: usize) -> anyhow::Result<Progress> {
        let Some(batch_id) = self.run.batches[idx].state.batch_id().map(str::to_owned) else {
            return Ok(Progress::Wait);
        };
        let batch = self
            .api
            .get_batch(&batch_id)
            .await
            .with_context(|| format!("could not read batch {batch_id}"))?;
        self.write_batch_json(idx, &batch)?;
        let before = self.run.batches[idx].state.clone();
        let remote = batch.snapshot.clone();
        let stuck = matches!(remote.status.as_str(), "validating" | "finalizing")
            && remote.expires_at.is_some_and(|t| t < self.provider_now());
        self.apply(idx, Event::Polled(remote))?;
        if stuck {
            self.printer.warn(&format!(
                "{}: batch {batch_id} is still `{}` past its expiry time; the provider may be stuck (check it in the OpenAI dashboard, or `embatch cancel` the run)",
                self.name(idx),
                batch.snapshot.status
            ));
        }
        let after = &self.run.batches[idx].state;
        Ok(if after.kind() == before.kind() {
            Progress::Wait
        } else {
            Progress::Moved
        })
    }

    /// Completed/Expired/Cancelled → Downloaded: fetch the output and error files.
    pub(crate) async fn download(&mut self, idx: usize) -> anyhow::Result<Progress> {
        let Some(remote) = self.run.batches[idx].state.remote().cloned() else {
            return Ok(Progress::Wait);
        };
        let dir = self.dir(idx);
        let mut has = [false, false];
        for (slot, (file_id, name)) in [
            (remote.output_file_id.as_deref(), OUTPUT_FILE),
            (remote.error_file_id.as_deref(), ERRORS_FILE),
        ]
        .into_iter()
        .enumerate()
        {
            let Some(file_id) = file_id else { continue };
            crashpoint("before_download");
            let bar = self
                .printer
                .byte_bar(format!("downloading {name} of {}", self.name(idx)), None);
            let observer = bar.clone();
            let downloaded = self
                .api
                .download_file(
                    file_id,
                    &dir.join(name),
                    std::sync::Arc::new(move |n| observer.set_position(n)),
                )
                .await;
            bar.finish_and_clear();
            downloaded
                .with_context(|| format!("could not download {name} of {}", self.name(idx)))?;
            crashpoint("after_download");
            has[slot] = true;
        }
        self.apply(
            idx,
            Event::FilesDownloaded {
                has_output: has[0],
                has_errors: has[1],
            },
        )?;
        Ok(Progress::Moved)
    }

    /// Cancels batch `idx` for `cancel`: one never created is cancelled here (its uploaded
    /// input file deleted), one created is cancelled remotely, one finished is left as it is.
    async fn cancel_batch(&mut self, idx: usize) -> anyhow::Result<()> {
        // An upload may have happened unrecorded (a kill or a lost answer right after it):
        // adopt it, so that its file is deleted below instead of keeping the chunks' text on
        // the provider until it expires.
        if let BatchState::Planned(planned) = &self.run.batches[idx].state
            && planned.upload_started.is_some()
        {
            self.adopt_upload(idx).await?;
        }
        // A creation may be in flight from a crashed advance: adopt it so that it is cancelled
        // remotely too, instead of left running unseen.
        self.adopt_pending(idx).await?;
        match self.run.batches[idx].state.kind() {
            StateKind::Planned => self.apply(idx, Event::CancelRequested),
            StateKind::Uploaded | StateKind::Queued => {
                // Never created, never will be: its input file is of no more use.
                if let Some(file_id) = self.run.batches[idx]
                    .state
                    .input_file_id()
                    .map(str::to_owned)
                {
                    // A file already gone is not an error (the client maps 404 to Ok).
                    self.api.delete_file(&file_id).await.with_context(|| {
                        format!("could not delete its uploaded input file {file_id}")
                    })?;
                }
                self.apply(idx, Event::CancelRequested)
            }
            StateKind::Submitted => self.cancel_remote(idx).await,
            _ => Ok(()),
        }
    }

    /// A cancelled run plans no retries: the retryable failures of its ingested batches that
    /// have no retry batch yet are given up instead. Their lines of `failed_chunk_ids.tsv` say
    /// `retryable false` (the reason kept, as an ingest of a cancelled run writes them) before
    /// the batch is marked done, so a crash in between only repeats the rewrite.
    fn drop_retries(&mut self) -> anyhow::Result<()> {
        for idx in 0..self.run.batches.len() {
            let BatchState::Ingested(ingested) = &self.run.batches[idx].state else {
                continue;
            };
            if ingested.retries_planned {
                continue;
            }
            if ingested.to_retry > 0 {
                self.give_up_failures(idx)?;
            }
            self.apply(idx, Event::RetriesDropped)?;
        }
        Ok(())
    }

    /// Rewrites `failed_chunk_ids.tsv` of batch `idx` with every line `retryable false`
    /// (streamed, into a temp file renamed over it).
    fn give_up_failures(&self, idx: usize) -> anyhow::Result<()> {
        use std::io::Write as _;
        let dir = self.dir(idx);
        let path = dir.join(crate::run::layout::FAILED_FILE);
        let reader = std::io::BufReader::new(fs_err::File::open(&path)?);
        // tempfile creates the file with mode 0600.
        let temp = tempfile::Builder::new()
            .prefix(".tmp-failed-")
            .tempfile_in(&dir)
            .with_context(|| format!("could not write a file in {}", dir.display()))?;
        let mut out = std::io::BufWriter::new(temp.as_file());
        crate::tsv::write_record(&mut out, &["id", "reason", "retryable"])?;
        crate::tsv::for_each_record(reader, |fields| {
            let id = fields.first().map_or("", String::as_str);
            let reason = fields.get(1).map_or("", String::as_str);
            crate::tsv::write_record(&mut out, &[id, reason, "false"])
        })
        .with_context(|| format!("could not read {}", path.display()))?;
        out.flush()?;
        drop(out);
        temp.as_file().sync_all()?;
        temp.persist(&path)
            .map_err(|err| err.error)
            .with_context(|| format!("could not replace {}", path.display()))?;
        store::sync_dir(&dir)?;
        Ok(())
    }

    /// Asks the provider to cancel the submitted batch `idx`, and records its answer.
    async fn cancel_remote(&mut self, idx: usize) -> anyhow::Result<()> {
        let Some(batch_id) = self.run.batches[idx].state.batch_id().map(str::to_owned) else {
            return Ok(());
        };
        let batch = match self.api.cancel_batch(&batch_id).await {
            Ok(batch) => batch,
            Err(ApiError::BadRequest { status, message }) => {
                // The provider refuses to cancel a batch that ended since the last poll
                // (completed, failed, expired, cancelled): how it ended is the answer.
                let batch = self.api.get_batch(&batch_id).await.with_context(|| {
                    format!("could not read batch {batch_id} after the provider refused to cancel it (HTTP {status}: {message})")
                })?;
                let remote_status = batch.snapshot.status.clone();
                if matches!(
                    remote_status,
                    RemoteStatus::Validating | RemoteStatus::InProgress | RemoteStatus::Finalizing
                ) {
                    // Still running, not cancelling yet.
                    self.write_batch_json(idx, &batch)?;
                    self.apply(idx, Event::Polled(batch.snapshot))?;
                    anyhow::bail!(
                        "the provider refused to cancel batch {batch_id} (HTTP {status}: {message}) although it is still `{remote_status}`"
                    );
                }
                if remote_status != RemoteStatus::Cancelling {
                    self.printer.info(&format!(
                        "{}: batch {batch_id} had already ended (`{remote_status}`); advance fetches what it returned",
                        self.name(idx)
                    ));
                }
                batch
            }
            Err(err) => {
                return Err(
                    anyhow::Error::from(err).context(format!("could not cancel batch {batch_id}"))
                );
            }
        };
        self.write_batch_json(idx, &batch)?;
        self.apply(idx, Event::Polled(batch.snapshot))
    }

    /// `batch.json`: the last Batch object seen from the API.
    fn write_batch_json(&self, idx: usize, batch: &RemoteBatch) -> anyhow::Result<()> {
        let mut json = batch.record.clone().into_bytes();
        json.push(b'\n');
        store::write_atomic(&self.dir(idx).join(BATCH_JSON), &json)?;
        Ok(())
    }

    /// The one-line summary on stderr (`status::summary`): also without `-v`.
    pub(crate) fn report(&self, ending: Next) {
        self.printer.info(&summary::one_line(
            &self.opened,
            &self.run,
            &self.run_dir,
            ending,
        ));
    }
}

fn uploaded_event(file: &RemoteFile) -> Event {
    Event::FileUploaded {
        file_id: file.id.clone(),
        at: file.created_at,
        file_expires_at: file.expires_at,
    }
}

/// "31 days", "5 hours", "12 minutes": the size of a clock difference, for messages.
fn human_duration(d: chrono::Duration) -> String {
    let d = d.abs();
    let (n, unit) = if d >= chrono::Duration::days(2) {
        (d.num_days(), "days")
    } else if d >= chrono::Duration::hours(2) {
        (d.num_hours(), "hours")
    } else {
        (d.num_minutes(), "minutes")
    };
    format!("{n} {unit}")
}

#[cfg(test)]
mod tests {
    use super::human_duration;

    #[test]
    fn clock_differences_read_in_a_fitting_unit() {
        assert_eq!(human_duration(chrono::Duration::days(-31)), "31 days");
        assert_eq!(human_duration(chrono::Duration::hours(30)), "30 hours");
        assert_eq!(human_duration(chrono::Duration::minutes(-7)), "7 minutes");
    }
}
