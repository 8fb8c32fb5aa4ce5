//! The batch state machine of DESIGN.md §5: one enum of per-state structs, and one `match`
//! that knows the whole graph.
//!
//! Pure: no I/O, no clock (times come in with the events). It does not persist anything (the
//! store does) nor talk to the API (the advance step does); it only says which state follows
//! which event, and refuses the transitions the design does not allow.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Counts the provider reports for a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// One entry of a batch's `errors.data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    pub code: Option<String>,
    pub message: Option<String>,
    pub line: Option<u64>,
}

/// A batch's status as the provider reports it. The statuses the state machine reads have their
/// own variants; any other (a status a provider adds later) is kept as `Other`, and a batch in
/// it is followed like a running one. In `run.json` it is the provider's word, as received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum RemoteStatus {
    Validating,
    InProgress,
    Finalizing,
    Completed,
    Failed,
    Expired,
    Cancelling,
    Cancelled,
    /// Any other status, as received (never one of the words above: `From<String>` maps those).
    Other(String),
}

impl RemoteStatus {
    /// The provider's word for it.
    pub fn as_str(&self) -> &str {
        match self {
            RemoteStatus::Validating => "validating",
            RemoteStatus::InProgress => "in_progress",
            RemoteStatus::Finalizing => "finalizing",
            RemoteStatus::Completed => "completed",
            RemoteStatus::Failed => "failed",
            RemoteStatus::Expired => "expired",
            RemoteStatus::Cancelling => "cancelling",
            RemoteStatus::Cancelled => "cancelled",
            RemoteStatus::Other(status) => status,
        }
    }
}

impl From<String> for RemoteStatus {
    fn from(status: String) -> RemoteStatus {
        match status.as_str() {
            "validating" => RemoteStatus::Validating,
            "in_progress" => RemoteStatus::InProgress,
            "finalizing" => RemoteStatus::Finalizing,
            "completed" => RemoteStatus::Completed,
            "failed" => RemoteStatus::Failed,
            "expired" => RemoteStatus::Expired,
            "cancelling" => RemoteStatus::Cancelling,
            "cancelled" => RemoteStatus::Cancelled,
            _ => RemoteStatus::Other(status),
        }
    }
}

impl From<&str> for RemoteStatus {
    fn from(status: &str) -> RemoteStatus {
        RemoteStatus::from(status.to_owned())
    }
}

impl From<RemoteStatus> for String {
    fn from(status: RemoteStatus) -> String {
        match status {
            RemoteStatus::Other(status) => status,
            known => known.as_str().to_owned(),
        }
    }
}

impl std::fmt::Display for RemoteStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the provider said about a batch in one poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteSnapshot {
    /// The Batch object's `status`.
    pub status: RemoteStatus,
    pub request_counts: RequestCounts,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub errors: Vec<RemoteError>,
}

impl RemoteSnapshot {
    /// A batch that failed because of the provider's queue limits, not because of its content
    /// (DESIGN.md §5): it waits in `queued` and is created again.
    pub fn is_queue_refusal(&self) -> bool {
        self.errors.iter().any(|e| {
            e.code.as_deref() == Some("token_limit_exceeded")
                || e.message
                    .as_deref()
                    .is_some_and(|m| m.contains("Enqueued request limit reached"))
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Planned {
    /// Set (and saved) just before an upload call: if it is set when a run is loaded, the
    /// upload may have happened, so the file is looked for before uploading again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_started: Option<DateTime<Utc>>,
    /// The `embatch_submission` the next creation will carry when it is not 1: a batch whose
    /// input file expired after queue refusals is uploaded again, and the remote batches of
    /// its earlier submissions still exist, so the count goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submission: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uploaded {
    pub input_file_id: String,
    pub uploaded_at: DateTime<Utc>,
    /// When the provider deletes the input file (`expires_after`); a batch not created by then
    /// needs a new upload.
    pub file_expires_at: Option<DateTime<Utc>>,
    /// The `embatch_submission` the next creation will carry (starts at 1).
    pub submission: u32,
    /// Set (and saved) just before a create call: if set, the batch may exist already and is
    /// looked for before creating again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_started: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    pub input_file_id: String,
    pub file_expires_at: Option<DateTime<Utc>>,
    pub batch_id: String,
    pub submission: u32,
    pub created_at: DateTime<Utc>,
    pub remote: RemoteSnapshot,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    pub input_file_id: String,
    pub file_expires_at: Option<DateTime<Utc>>,
    /// The `embatch_submission` the next creation will carry.
    pub submission: u32,
    pub reason: String,
    /// Not created again before this time (10 min doubling to 2 h), unless other batches of
    /// the run finish first.
    pub not_before: DateTime<Utc>,
    /// How many refusals in a row: sets the backoff.
    pub refusals: u32,
    /// As in [`Uploaded::create_started`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_started: Option<DateTime<Utc>>,
}

/// A batch the provider has finished with (completed, expired or cancelled remotely).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteDone {
    pub input_file_id: String,
    pub batch_id: String,
    pub submission: u32,
    pub remote: RemoteSnapshot,
}

/// A batch cancelled by the user: remotely after creation, or before it was ever created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancelled {
    pub input_file_id: Option<String>,
    pub done: Option<RemoteDone>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub input_file_id: Option<String>,
    pub batch_id: Option<String>,
    pub errors: Vec<RemoteError>,
}

/// Which remote terminal state the downloaded files came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Terminal {
    Completed,
    Expired,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Downloaded {
    pub terminal: Terminal,
    pub done: RemoteDone,
    pub has_output: bool,
    pub has_errors: bool,
    /// Where an interrupted ingest resumes: saved after every committed transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<IngestProgress>,
    /// Set when an ingested batch is ingested again (`ingest --redownload`) after its retry
    /// batch was planned: the retries are not planned a second time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retries_planned: bool,
}

/// Which downloaded file an ingest is reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IngestFile {
    Output,
    Errors,
}

/// Lines of an output or error file that could not be taken as they were.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineAnomalies {
    /// A custom_id that is not a chunk of this batch: refused.
    pub unknown_custom_id: u64,
    /// A second line for a custom_id: the first line wins.
    pub repeated_custom_id: u64,
    /// A line that is not JSON or names no custom_id.
    pub unparseable: u64,
}

/// The state of an ingest after its last committed transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestProgress {
    pub file: IngestFile,
    /// Bytes of `file` fully handled (a line boundary).
    pub offset: u64,
    pub counts: IngestCounts,
    pub anomalies: LineAnomalies,
    /// Chunks marked for a retry batch so far.
    pub to_retry: u64,
    /// Length of `failed_chunk_ids.tsv` at that point (a resume truncates back to it).
    pub failed_file_len: u64,
}

/// Outcome of ingesting one batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestCounts {
    pub ingested: u64,
    pub already_present: u64,
    pub stale: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ingested {
    pub terminal: Terminal,
    pub done: Option<RemoteDone>,
    pub counts: IngestCounts,
    pub remote_files_deleted: bool,
    #[serde(default)]
    pub anomalies: LineAnomalies,
    /// Chunks of this batch that failed for a retryable reason and go into a retry batch.
    #[serde(default)]
    pub to_retry: u64,
    /// Their retry batch is planned (or there was nothing to retry).
    #[serde(default)]
    pub retries_planned: bool,
}

/// What an ingest produced, carried by [`Event::ResultsIngested`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    pub counts: IngestCounts,
    pub anomalies: LineAnomalies,
    pub to_retry: u64,
}

/// The state of one batch. The serialized `state` names are those of `status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BatchState {
    Planned(Planned),
    Uploaded(Uploaded),
    Submitted(Submitted),
    Queued(Queued),
    Completed(RemoteDone),
    Expired(RemoteDone),
    Cancelled(Cancelled),
    Failed(Failed),
    Downloaded(Downloaded),
    Ingested(Ingested),
}

/// The name of a state, without its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateKind {
    Planned,
    Uploaded,
    Submitted,
    Queued,
    Completed,
    Expired,
    Cancelled,
    Failed,
    Downloaded,
    Ingested,
}

impl StateKind {
    pub const ALL: [StateKind; 10] = [
        StateKind::Planned,
        StateKind::Uploaded,
        StateKind::Submitted,
        StateKind::Queued,
        StateKind::Completed,
        StateKind::Expired,
        StateKind::Cancelled,
        StateKind::Failed,
        StateKind::Downloaded,
        StateKind::Ingested,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StateKind::Planned => "planned",
            StateKind::Uploaded => "uploaded",
            StateKind::Submitted => "submitted",
            StateKind::Queued => "queued",
            StateKind::Completed => "completed",
            StateKind::Expired => "expired",
            StateKind::Cancelled => "cancelled",
            StateKind::Failed => "failed",
            StateKind::Downloaded => "downloaded",
            StateKind::Ingested => "ingested",
        }
    }

    /// The `next` column of DESIGN.md §5's table: the states this one may move to.
    pub fn successors(self) -> &'static [StateKind] {
        use StateKind::*;
        match self {
            Planned => &[Uploaded, Cancelled],
            // Beyond the design's table: a create call refused for the queue limits parks the
            // batch in `queued`, one refused for good fails it, and an input file that expired
            // before creation sends it back to `planned` for a new upload. A batch adopted
            // after a crash may already be past `submitted`: creation then reads like a poll.
            Uploaded | Queued => &[
                Submitted, Cancelled, Queued, Failed, Planned, Completed, Expired,
            ],
            Submitted => &[Completed, Expired, Cancelled, Failed, Queued],
            Completed | Expired | Cancelled => &[Downloaded],
            Failed => &[],
            Downloaded => &[Ingested],
            // Beyond the design's table: `ingest --redownload` ingests a batch again.
            Ingested => &[Downloaded],
        }
    }
}

/// Something that happened to a batch: the only way its state changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The input file is on the provider (uploaded now, or an earlier upload adopted).
    FileUploaded {
        file_id: String,
        at: DateTime<Utc>,
        file_expires_at: Option<DateTime<Utc>>,
    },
    /// An upload call is about to be made (saved first: see [`Planned::upload_started`]).
    UploadStarted { at: DateTime<Utc> },
    /// The input file expired before a batch was created from it: upload it again.
    FileExpired,
    /// A create call is about to be made (saved first: see [`Uploaded::create_started`]).
    CreateStarted { at: DateTime<Utc> },
    /// The create call was refused for a reason that retrying cannot fix.
    CreateRejected { errors: Vec<RemoteError> },
    /// A batch exists for this file (created now, or adopted after a lost answer or crash).
    BatchCreated {
        batch_id: String,
        at: DateTime<Utc>,
        remote: RemoteSnapshot,
    },
    /// The create call itself was refused for the provider's queue limits.
    CreateRefused { reason: String, now: DateTime<Utc> },
    /// A poll of the remote batch.
    Polled(RemoteSnapshot),
    /// A queued batch may be created again now.
    QueueReleased,
    /// The output and error files (those that exist) are on disk.
    FilesDownloaded { has_output: bool, has_errors: bool },
    /// One more transaction of an ingest is committed.
    IngestCommitted { progress: IngestProgress },
    /// The results are written to the database.
    ResultsIngested { outcome: IngestOutcome },
    /// `ingest --redownload`: an ingested batch's files are on disk again (fetched again, or
    /// the local copy when the provider's is gone), to be ingested again from the start.
    IngestAgain { has_output: bool, has_errors: bool },
    /// The retry batch for this batch's retryable failures is planned.
    RetriesPlanned,
    /// The run is cancelled before this batch's retryable failures got their retry batch:
    /// they are given up (reported with their reason, not retried) and the batch is done.
    RetriesDropped,
    /// The remote input, output and error files are deleted.
    RemoteFilesDeleted,
    /// The user cancelled the run; for a submitted batch, the remote cancel was requested and
    /// the batch is followed until the provider finishes it.
    CancelRequested,
}

/// A transition the graph does not allow. Carries the untouched state back: nothing is lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("batch in state `{}` cannot take event {event}", .state.kind().as_str())]
pub struct IllegalTransition {
    pub state: Box<BatchState>,
    pub event: String,
}

impl IllegalTransition {
    fn new(state: BatchState, event: Event) -> IllegalTransition {
        IllegalTransition {
            state: Box::new(state),
            event: format!("{event:?}"),
        }
    }
}

/// Backoff for a queue refusal: 10 minutes, doubling, capped at 2 hours.
pub fn queue_backoff(refusals: u32) -> chrono::Duration {
    let minutes = 10i64.saturating_mul(1i64 << refusals.saturating_sub(1).min(4));
    chrono::Duration::minutes(minutes.min(120))
}

impl BatchState {
    pub fn kind(&self) -> StateKind {
        match self {
            BatchState::Planned(_) => StateKind::Planned,
            BatchState::Uploaded(_) => StateKind::Uploaded,
            BatchState::Submitted(_) => StateKind::Submitted,
            BatchState::Queued(_) => StateKind::Queued,
            BatchState::Completed(_) => StateKind::Completed,
            BatchState::Expired(_) => StateKind::Expired,
            BatchState::Cancelled(_) => StateKind::Cancelled,
            BatchState::Failed(_) => StateKind::Failed,
            BatchState::Downloaded(_) => StateKind::Downloaded,
            BatchState::Ingested(_) => StateKind::Ingested,
        }
    }

    /// Nothing more will happen to this batch.
    pub fn is_done(&self) -> bool {
        match self {
            BatchState::Failed(_) => true,
            // Done once its retryable failures have their retry batch.
            BatchState::Ingested(i) => i.retries_planned,
            // A batch cancelled before creation has nothing to fetch.
            BatchState::Cancelled(c) => c.done.is_none(),
            _ => false,
        }
    }

    pub fn input_file_id(&self) -> Option<&str> {
        match self {
            BatchState::Planned(_) => None,
            BatchState::Uploaded(s) => Some(&s.input_file_id),
            BatchState::Submitted(s) => Some(&s.input_file_id),
            BatchState::Queued(s) => Some(&s.input_file_id),
            BatchState::Completed(d) | BatchState::Expired(d) => Some(&d.input_file_id),
            BatchState::Cancelled(c) => c.input_file_id.as_deref(),
            BatchState::Failed(f) => f.input_file_id.as_deref(),
            BatchState::Downloaded(d) => Some(&d.done.input_file_id),
            BatchState::Ingested(i) => i.done.as_ref().map(|d| d.input_file_id.as_str()),
        }
    }

    pub fn batch_id(&self) -> Option<&str> {
        self.remote_done()
            .map(|d| d.batch_id.as_str())
            .or(match self {
                BatchState::Submitted(s) => Some(s.batch_id.as_str()),
                BatchState::Failed(f) => f.batch_id.as_deref(),
                _ => None,
            })
    }

    /// The last remote snapshot, for states that have one.
    pub fn remote(&self) -> Option<&RemoteSnapshot> {
        match self {
            BatchState::Submitted(s) => Some(&s.remote),
            _ => self.remote_done().map(|d| &d.remote),
        }
    }

    fn remote_done(&self) -> Option<&RemoteDone> {
        match self {
            BatchState::Completed(d) | BatchState::Expired(d) => Some(d),
            BatchState::Cancelled(c) => c.done.as_ref(),
            BatchState::Downloaded(d) => Some(&d.done),
            BatchState::Ingested(i) => i.done.as_ref(),
            _ => None,
        }
    }

    /// Consumes the state and returns the next one. These `match`es are the whole graph: up
    /// to the provider's answer ([`BatchState::on_submission`]), then its results
    /// ([`BatchState::on_results`]).
    pub fn apply(self, event: Event) -> Result<BatchState, IllegalTransition> {
        use Event as E;
        match event {
            E::FilesDownloaded { .. }
            | E::IngestCommitted { .. }
            | E::ResultsIngested { .. }
            | E::IngestAgain { .. }
            | E::RetriesPlanned
            | E::RetriesDropped
            | E::RemoteFilesDeleted => self.on_results(event),
            _ => self.on_submission(event),
        }
    }

    /// Upload, creation (refused, queued, rejected), polling and cancel.
    fn on_submission(self, event: Event) -> Result<BatchState, IllegalTransition> {
        use BatchState as S;
        use Event as E;
        Ok(match (self, event) {
            (
                S::Planned(p),
                E::FileUploaded {
                    file_id,
                    at,
                    file_expires_at,
                },
            ) => S::Uploaded(Uploaded {
                input_file_id: file_id,
                uploaded_at: at,
                file_expires_at,
                submission: p.submission.unwrap_or(1),
                create_started: None,
            }),
            (S::Planned(p), E::UploadStarted { at }) => S::Planned(Planned {
                upload_started: Some(at),
                ..p
            }),
            // Uploaded again, the batch keeps its submission count: creating submission 1 a
            // second time would make two remote batches with the same metadata.
            (S::Uploaded(Uploaded { submission, .. }), E::FileExpired)
            | (S::Queued(Queued { submission, .. }), E::FileExpired) => S::Planned(Planned {
                upload_started: None,
                submission: (submission > 1).then_some(submission),
            }),
            (S::Uploaded(up), E::CreateStarted { at }) => S::Uploaded(Uploaded {
                create_started: Some(at),
                ..up
            }),
            (S::Queued(q), E::CreateStarted { at }) => S::Queued(Queued {
                create_started: Some(at),
                ..q
            }),
            (S::Uploaded(up), E::CreateRejected { errors }) => S::Failed(Failed {
                input_file_id: Some(up.input_file_id),
                batch_id: None,
                errors,
            }),
            (S::Queued(q), E::CreateRejected { errors }) => S::Failed(Failed {
                input_file_id: Some(q.input_file_id),
                batch_id: None,
                errors,
            }),
            (
                S::Uploaded(up),
                E::BatchCreated {
                    batch_id,
                    at,
                    remote,
                },
            ) => submitted(
                up.input_file_id,
                up.file_expires_at,
                up.submission,
                batch_id,
                at,
                remote,
            ),
            (
                S::Queued(q),
                E::BatchCreated {
                    batch_id,
                    at,
                    remote,
                },
            ) => submitted(
                q.input_file_id,
                q.file_expires_at,
                q.submission,
                batch_id,
                at,
                remote,
            ),
            (S::Uploaded(up), E::CreateRefused { reason, now }) => S::Queued(Queued {
                input_file_id: up.input_file_id,
                file_expires_at: up.file_expires_at,
                // The refused call created nothing: the next try keeps the same number.
                submission: up.submission,
                reason,
                not_before: now + queue_backoff(1),
                refusals: 1,
                create_started: None,
            }),
            (S::Queued(q), E::CreateRefused { reason, now }) => {
                let refusals = q.refusals + 1;
                S::Queued(Queued {
                    reason,
                    not_before: now + queue_backoff(refusals),
                    refusals,
                    create_started: None,
                    ..q
                })
            }
            (S::Queued(q), E::QueueReleased) => S::Queued(Queued {
                not_before: DateTime::<Utc>::MIN_UTC,
                ..q
            }),
            (S::Submitted(sub), E::Polled(remote)) => poll_submitted(sub, remote),
            (S::Planned(_), E::CancelRequested) => S::Cancelled(Cancelled {
                input_file_id: None,
                done: None,
            }),
            (S::Uploaded(up), E::CancelRequested) => S::Cancelled(Cancelled {
                input_file_id: Some(up.input_file_id),
                done: None,
            }),
            (S::Queued(q), E::CancelRequested) => S::Cancelled(Cancelled {
                input_file_id: Some(q.input_file_id),
                done: None,
            }),
            (state, event) => return Err(IllegalTransition::new(state, event)),
        })
    }

    /// Download, ingest (with its checkpoints), ingest again, retries and remote clean-up.
    fn on_results(self, event: Event) -> Result<BatchState, IllegalTransition> {
        use BatchState as S;
        use Event as E;
        Ok(match (self, event) {
            (
                S::Completed(done),
                E::FilesDownloaded {
                    has_output,
                    has_errors,
                },
            ) => downloaded(Terminal::Completed, done, has_output, has_errors),
            (
                S::Expired(done),
                E::FilesDownloaded {
                    has_output,
                    has_errors,
                },
            ) => downloaded(Terminal::Expired, done, has_output, has_errors),
            (
                S::Cancelled(Cancelled {
                    done: Some(done), ..
                }),
                E::FilesDownloaded {
                    has_output,
                    has_errors,
                },
            ) => downloaded(Terminal::Cancelled, done, has_output, has_errors),
            // `--redownload`: fetch the files again and ingest from the start (writes are
            // idempotent, so redoing part of an ingest is harmless).
            (
                S::Downloaded(d),
                E::FilesDownloaded {
                    has_output,
                    has_errors,
                },
            ) => BatchState::Downloaded(Downloaded {
                progress: None,
                has_output,
                has_errors,
                ..d
            }),
            (S::Downloaded(d), E::IngestCommitted { progress }) => S::Downloaded(Downloaded {
                progress: Some(progress),
                ..d
            }),
            (S::Downloaded(d), E::ResultsIngested { outcome }) => S::Ingested(Ingested {
                terminal: d.terminal,
                done: Some(d.done),
                counts: outcome.counts,
                remote_files_deleted: false,
                anomalies: outcome.anomalies,
                to_retry: outcome.to_retry,
                retries_planned: d.retries_planned || outcome.to_retry == 0,
            }),
            (
                S::Ingested(Ingested {
                    terminal,
                    done: Some(done),
                    retries_planned,
                    ..
                }),
                E::IngestAgain {
                    has_output,
                    has_errors,
                },
            ) => BatchState::Downloaded(Downloaded {
                terminal,
                done,
                has_output,
                has_errors,
                progress: None,
                retries_planned,
            }),
            (S::Ingested(i), E::RetriesPlanned) => S::Ingested(Ingested {
                retries_planned: true,
                ..i
            }),
            // Failures already in a retry batch stay there.
            (S::Ingested(i), E::RetriesDropped) if !i.retries_planned => S::Ingested(Ingested {
                counts: IngestCounts {
                    failed: i.counts.failed + i.to_retry,
                    ..i.counts
                },
                to_retry: 0,
                retries_planned: true,
                ..i
            }),
            (S::Ingested(i), E::RemoteFilesDeleted) => S::Ingested(Ingested {
                remote_files_deleted: true,
                ..i
            }),
            (state, event) => return Err(IllegalTransition::new(state, event)),
        })
    }
}

fn submitted(
    input_file_id: String,
    file_expires_at: Option<DateTime<Utc>>,
    submission: u32,
    batch_id: String,
    created_at: DateTime<Utc>,
    remote: RemoteSnapshot,
) -> BatchState {
    let sub = Submitted {
        input_file_id,
        file_expires_at,
        batch_id,
        submission,
        created_at,
        remote: remote.clone(),
    };
    // An adopted batch may already be past `validating`: read it like a poll.
    poll_submitted(sub, remote)
}

fn poll_submitted(sub: Submitted, remote: RemoteSnapshot) -> BatchState {
    let status = remote.status.clone();
    let done = |remote| RemoteDone {
        input_file_id: sub.input_file_id.clone(),
        batch_id: sub.batch_id.clone(),
        submission: sub.submission,
        remote,
    };
    match status {
        RemoteStatus::Completed => BatchState::Completed(done(remote)),
        RemoteStatus::Expired => BatchState::Expired(done(remote)),
        RemoteStatus::Cancelled => BatchState::Cancelled(Cancelled {
            input_file_id: Some(sub.input_file_id.clone()),
            done: Some(done(remote)),
        }),
        RemoteStatus::Failed if remote.is_queue_refusal() => {
            let reason = remote
                .errors
                .iter()
                .find_map(|e| e.code.clone().or_else(|| e.message.clone()))
                .unwrap_or_else(|| "queue limit".to_owned());
            BatchState::Queued(Queued {
                input_file_id: sub.input_file_id,
                file_expires_at: sub.file_expires_at,
                // That remote batch exists (failed): the next creation is a new submission.
                submission: sub.submission + 1,
                reason,
                // Another batch of the run finishing releases it sooner (advance decides).
                not_before: sub.created_at + queue_backoff(1),
                refusals: 1,
                create_started: None,
            })
        }
        RemoteStatus::Failed => BatchState::Failed(Failed {
            input_file_id: Some(sub.input_file_id),
            batch_id: Some(sub.batch_id),
            errors: remote.errors,
        }),
        // validating, in_progress, finalizing, cancelling, or a status we do not know yet:
        // keep following it.
        _ => BatchState::Submitted(Submitted { remote, ..sub }),
    }
}

fn downloaded(
    terminal: Terminal,
    done: RemoteDone,
    has_output: bool,
    has_errors: bool,
) -> BatchState {
    BatchState::Downloaded(Downloaded {
        terminal,
        done,
        has_output,
        has_errors,
        progress: None,
        retries_planned: false,
    })
}

#[cfg(test)]
mod tests;
