//! `run.json`: the serde types of a run and their durable, atomic persistence.
//!
//! Only this module writes `run.json` (and `run.json.bak`). It checks the schema version on
//! load and refuses to guess at a file it cannot read. It does not lock (the lock module does)
//! and does not decide transitions (the state module does).

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::models::{EncodingFormat, InputType, Provider, TaskType};
use crate::plan::sharder::BatchLimits;
use crate::run::layout::{BACKUP_FILE, RUN_FILE};
use crate::run::state::{BatchState, StateKind};

/// Bumped on every change of the on-disk shape; older versions load through a migration.
pub const SCHEMA_VERSION: u32 = 1;

/// What `plan` does with an input over the token limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OnTooLong {
    #[default]
    Skip,
    Truncate,
    Fail,
}

/// The id column's type, which decides how ids are ordered and bound. In `run.json` it is the
/// type's Postgres name; a name embatch cannot write to refuses the file at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum IdType {
    Uuid,
    Text,
    Bigint,
}

impl IdType {
    /// The Postgres type name, one of three fixed strings (never text from the user), so it
    /// can be pasted into SQL as a cast.
    pub fn as_str(self) -> &'static str {
        match self {
            IdType::Uuid => "uuid",
            IdType::Text => "text",
            IdType::Bigint => "bigint",
        }
    }
}

impl TryFrom<String> for IdType {
    type Error = String;

    fn try_from(name: String) -> Result<IdType, String> {
        match name.as_str() {
            "uuid" => Ok(IdType::Uuid),
            "text" => Ok(IdType::Text),
            "bigint" => Ok(IdType::Bigint),
            other => Err(format!(
                "id type {other:?} is not one embatch can write to; the id column must be uuid, text or bigint (plan again to record it)"
            )),
        }
    }
}

/// Where the chunks come from: every setting later steps need to find them again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceSettings {
    pub table: String,
    pub id_column: String,
    /// `uuid`, `text` or `bigint` in `run.json` (as Postgres names the column's type).
    pub id_type: IdType,
    pub text_column: String,
    pub embedding_column: String,
    pub family_column: String,
    pub family_table: Option<String>,
    pub scope_sql: Option<String>,
    /// `--content-hash-column`: ingest writes the sha256 of the content it embedded there.
    /// Absent in runs planned without it (their `run.json` bytes are unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash_column: Option<String>,
}

/// Every setting of the plan that later steps need. Never a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    pub source: SourceSettings,
    pub model: String,
    pub dimensions: u32,
    /// Whether requests carry `"dimensions"` (DESIGN.md §2).
    pub send_dimensions: bool,
    pub encoding_format: EncodingFormat,
    pub limits: BatchLimits,
    pub reembed: bool,
    pub on_too_long: OnTooLong,
    pub limit: Option<u64>,
    pub usd_per_million_tokens: Option<f64>,
    /// Who embeds (DESIGN.md §9). Absent means `openai` and is written only for another
    /// provider, so runs planned before it was recorded load and save byte for byte.
    #[serde(default, skip_serializing_if = "Provider::is_openai")]
    pub provider: Provider,
    /// Voyage's `input_type` of every request of the run (`--input-type`), recorded only for
    /// a Voyage run (absent otherwise, so other runs keep their bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_type: Option<InputType>,
    /// Gemini's `taskType` of every request of the run (`--task-type`), recorded only for a
    /// Gemini run (absent otherwise, so other runs keep their bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_type: Option<TaskType>,
}

/// The database the run was planned against; `advance` refuses any other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseIdentity {
    /// `pg_control_system().system_identifier`, when the role may read it.
    pub system_identifier: Option<String>,
    pub database: String,
}

/// Figures of the plan, for `status` and `runs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanSummary {
    /// Chunks sent in the first attempt's batches.
    pub chunks: u64,
    /// Chunks never sent (empty, too long, too large for a batch), listed in `skipped.tsv`.
    pub skipped: u64,
    /// Chunks cut at the token limit (`--on-too-long truncate`) and sent.
    pub truncated: u64,
    /// Pending chunks left out because an unfinished run already holds them.
    pub held_by_other_runs: u64,
    pub tokens: u64,
    pub estimated_cost_usd: Option<f64>,
}

/// One batch of the run: its fixed plan-time figures and its current state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// `batch_001`, …: also the folder name under `batches/`.
    pub name: String,
    pub attempt: u32,
    pub retry_of: Vec<String>,
    pub requests: u64,
    pub bytes: u64,
    pub tokens: u64,
    /// What `plan` wrote for this batch (DESIGN.md §9); absent in runs planned before
    /// embatch recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<BatchFiles>,
    #[serde(flatten)]
    pub state: BatchState,
}

/// The evidence files of a batch as `plan` wrote them: checked before upload and before
/// ingest, so that a damaged file is found before it costs money or drops a paid vector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchFiles {
    /// `input.jsonl`: one request line per row.
    pub input: FileDigest,
    /// `chunks.tsv`: its rows are the records after the header line.
    pub chunks: FileDigest,
}

/// The row count and sha256 (lowercase hex) of a file, computed by [`FileDigest::of_file`]
/// only: at plan time, for retry batches, and by every check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Lines of the file (a last line without its newline counts too), less its header lines.
    pub rows: u64,
    pub sha256: String,
}

impl FileDigest {
    /// Header lines of `chunks.tsv` (`id sha256 tokens`); `input.jsonl` has none.
    pub const CHUNKS_HEADER_LINES: u64 = 1;

    /// Streams `path` once: its sha256 and its lines less `header_lines`. Never holds the
    /// file in memory.
    pub fn of_file(path: &Path, header_lines: u64) -> std::io::Result<FileDigest> {
        use sha2::Digest;
        use std::io::Read;
        let mut file = fs_err::File::open(path)?;
        let mut hasher = sha2::Sha256::new();
        let mut buffer = vec![0u8; 256 * 1024];
        let mut lines = 0u64;
        let mut last = None;
        loop {
            let n = match file.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            };
            let chunk = &buffer[..n];
            hasher.update(chunk);
            lines += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
            last = chunk.last().copied();
        }
        if last.is_some_and(|b| b != b'\n') {
            lines += 1;
        }
        Ok(FileDigest {
            rows: lines.saturating_sub(header_lines),
            sha256: hex::encode(hasher.finalize()),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunFile {
    pub schema_version: u32,
    pub run_id: String,
    pub family_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub embatch_version: String,
    pub settings: RunSettings,
    pub database: DatabaseIdentity,
    pub plan: PlanSummary,
    pub cancelled: bool,
    /// Chunks a retry could not send again (deleted, or no longer sendable): given up.
    #[serde(default)]
    pub retry_given_up: u64,
    pub batches: Vec<BatchRecord>,
}

impl RunFile {
    /// The run is finished when every batch is done.
    pub fn is_finished(&self) -> bool {
        self.batches.iter().all(|b| b.state.is_done())
    }

    pub fn count_in(&self, kind: StateKind) -> usize {
        self.batches
            .iter()
            .filter(|b| b.state.kind() == kind)
            .count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "{path} is missing; this folder is not an embatch run (point --run-dir at a run_… folder, or plan a new run)"
    )]
    Missing { path: PathBuf },
    /// `--run-dir` names a family folder: its runs are listed (newline-separated, indented).
    #[error("{dir} is a family folder, not a run; point --run-dir at one of its runs:\n  {runs}")]
    FamilyFolder { dir: PathBuf, runs: String },
    #[error("could not read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged ({detail}); {}", way_out(path, backup))]
    Damaged {
        path: PathBuf,
        backup: PathBuf,
        detail: String,
    },
    #[error(
        "{path} has schema version {found}, newer than this embatch understands ({supported}); upgrade embatch to continue this run"
    )]
    TooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("could not write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What to do about a damaged `run.json`: restore the backup when there is a readable one
/// (it holds the state one save before, which `advance` recovers from like from a crash), else
/// cancel and plan again. Decided when the message is shown, so it describes the folder as is.
fn way_out(path: &Path, backup: &Path) -> String {
    let backup_state = match fs_err::read(backup) {
        Ok(bytes) => match parse(&bytes, backup) {
            Ok(_) => BackupState::Readable,
            Err(_) => BackupState::Damaged,
        },
        Err(_) => BackupState::Missing,
    };
    let run_dir = path.parent().unwrap_or(Path::new("."));
    let replan = format!(
        "move the folder {} aside and plan the run again (batches it already submitted are not found again: cancel them in the OpenAI dashboard first)",
        run_dir.display()
    );
    match backup_state {
        BackupState::Readable => format!(
            "restore it from {backup}, which holds the run one save earlier (`cp {backup} {path}`), then run the command again",
            backup = backup.display(),
            path = path.display()
        ),
        BackupState::Damaged => format!("{} is damaged too; {replan}", backup.display()),
        BackupState::Missing => format!("there is no {} to restore; {replan}", backup.display()),
    }
}

enum BackupState {
    Readable,
    Damaged,
    Missing,
}

#[derive(Deserialize)]
struct VersionProbe {
    schema_version: u32,
}

/// Reads and checks `run.json` in `run_dir`.
pub fn load(run_dir: &Path) -> Result<RunFile, StoreError> {
    let path = run_dir.join(RUN_FILE);
    let bytes = match fs_err::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let runs = runs_inside(run_dir);
            if !runs.is_empty() {
                return Err(StoreError::FamilyFolder {
                    dir: run_dir.to_path_buf(),
                    runs: runs.join("\n  "),
                });
            }
            return Err(StoreError::Missing { path });
        }
        Err(source) => return Err(StoreError::Read { path, source }),
    };
    parse(&bytes, &path)
}

/// The run folders directly inside `dir` (a family folder, when `--run-dir` points one level
/// too high), sorted, as paths to paste; empty when there are none or `dir` cannot be read.
fn runs_inside(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs_err::read_dir(dir) else {
        return Vec::new();
    };
    let mut runs: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(crate::run::layout::RUN_PREFIX)
                && e.path().join(RUN_FILE).is_file()
        })
        .map(|e| e.path().display().to_string())
        .collect();
    runs.sort();
    runs
}

/// Parses the bytes of a `run.json`; `path` is for messages.
pub fn parse(bytes: &[u8], path: &Path) -> Result<RunFile, StoreError> {
    let damaged = |detail: String| StoreError::Damaged {
        path: path.to_path_buf(),
        backup: path.with_file_name(BACKUP_FILE),
        detail,
    };
    let probe: VersionProbe =
        serde_json::from_slice(bytes).map_err(|err| damaged(err.to_string()))?;
    if probe.schema_version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: probe.schema_version,
            supported: SCHEMA_VERSION,
        });
    }
    // Version 1 is the first released shape: later versions add migrations here.
    let run: RunFile = serde_json::from_slice(bytes).map_err(|err| damaged(err.to_string()))?;
    // Batch names become folder names: a name that is not `batch_NNN` could point outside the
    // run folder, so such a file is refused rather than followed.
    let mut names = std::collections::HashSet::new();
    for batch in &run.batches {
        if !is_batch_name(&batch.name) {
            return Err(damaged(format!(
                "batch name {:?} is not of the form batch_001",
                batch.name
            )));
        }
        if !names.insert(batch.name.as_str()) {
            return Err(damaged(format!("batch {} is listed twice", batch.name)));
        }
    }
    Ok(run)
}

/// `batch_` followed by at least three ASCII digits (what `layout::batch_name` makes).
fn is_batch_name(name: &str) -> bool {
    name.strip_prefix("batch_")
        .is_some_and(|digits| digits.len() >= 3 && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// Saves `run` durably: the previous `run.json` becomes `run.json.bak`, then the new one
/// replaces it atomically (temp file in the same folder, fsync, rename, fsync the folder).
pub fn save(run_dir: &Path, run: &RunFile) -> Result<(), StoreError> {
    let path = run_dir.join(RUN_FILE);
    let mut json = serde_json::to_vec_pretty(run).map_err(|err| StoreError::Write {
        path: path.clone(),
        source: std::io::Error::other(err),
    })?;
    json.push(b'\n');
    match fs_err::read(&path) {
        Ok(previous) => write_atomic(&run_dir.join(BACKUP_FILE), &previous)?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(StoreError::Read { path, source }),
    }
    write_atomic(&path, &json)
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content.
/// The file is created readable by its owner only.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let write_err = |source: std::io::Error| StoreError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .ok_or_else(|| write_err(std::io::Error::other("path has no parent folder")))?;
    // tempfile creates the file with mode 0600.
    let mut temp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(write_err)?;
    temp.write_all(bytes).map_err(write_err)?;
    temp.as_file().sync_all().map_err(write_err)?;
    temp.persist(path).map_err(|err| write_err(err.error))?;
    sync_dir(dir).map_err(write_err)
}

/// fsyncs a folder so that a rename inside it survives a power cut.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs_err::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests;
