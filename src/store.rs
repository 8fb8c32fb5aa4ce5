//! `run.json`: the serde types of a run and their durable, atomic persistence.
//!
//! Only this module writes `run.json` (and `run.json.bak`). It checks the schema version on
//! load and refuses to guess at a file it cannot read. It does not lock (the lock module does)
//! and does not decide transitions (the state module does).

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::models::EncodingFormat;
use crate::sharder::BatchLimits;
use crate::state::{BatchState, StateKind};

/// Bumped on every change of the on-disk shape; older versions load through a migration.
pub const SCHEMA_VERSION: u32 = 1;
pub const RUN_FILE: &str = "run.json";
pub const BACKUP_FILE: &str = "run.json.bak";

/// What `plan` does with an input over the token limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OnTooLong {
    #[default]
    Skip,
    Truncate,
    Fail,
}

/// Where the chunks come from: every setting later steps need to find them again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceSettings {
    pub table: String,
    pub id_column: String,
    /// `uuid`, `text` or `bigint` (as Postgres names the column's type).
    pub id_type: String,
    pub text_column: String,
    pub embedding_column: String,
    pub family_column: String,
    pub family_table: Option<String>,
    pub scope_sql: Option<String>,
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
            return Err(StoreError::Missing { path });
        }
        Err(source) => return Err(StoreError::Read { path, source }),
    };
    parse(&bytes, &path)
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

/// `batch_` followed by at least three ASCII digits (what `plan::batch_name` makes).
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
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs_err::read(&path).unwrap(), b"two");
        let mode = fs_err::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = fs_err::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
    }

    /// Every released schema version keeps loading: fixtures written by that version.
    #[test]
    fn released_run_files_keep_loading() {
        for (name, text) in [
            (
                "run-v1-ingested.json",
                include_str!("../tests/fixtures/run-v1-ingested.json"),
            ),
            (
                "run-v1-every-state.json",
                include_str!("../tests/fixtures/run-v1-every-state.json"),
            ),
        ] {
            let run = parse(text.as_bytes(), Path::new(name))
                .unwrap_or_else(|err| panic!("{name}: {err}"));
            assert_eq!(run.schema_version, 1, "{name}");
        }
        let every = parse(
            include_str!("../tests/fixtures/run-v1-every-state.json").as_bytes(),
            Path::new("every"),
        )
        .unwrap();
        let kinds: Vec<&str> = every
            .batches
            .iter()
            .map(|b| b.state.kind().as_str())
            .collect();
        assert_eq!(
            kinds,
            [
                "planned",
                "uploaded",
                "submitted",
                "queued",
                "expired",
                "cancelled",
                "failed",
                "downloaded",
                "ingested"
            ]
        );
    }

    fn fixture() -> RunFile {
        parse(
            include_str!("../tests/fixtures/run-v1-every-state.json").as_bytes(),
            Path::new("every"),
        )
        .unwrap()
    }

    /// After every save, `run.json.bak` holds exactly the bytes `run.json` had before it.
    #[test]
    fn every_save_keeps_the_previous_file_as_backup() {
        let dir = tempfile::tempdir().unwrap();
        let mut run = fixture();
        save(dir.path(), &run).unwrap();
        assert!(
            !dir.path().join(BACKUP_FILE).exists(),
            "no backup of nothing"
        );
        for round in 0..4 {
            let before = fs_err::read(dir.path().join(RUN_FILE)).unwrap();
            run.retry_given_up = round + 1;
            save(dir.path(), &run).unwrap();
            assert_eq!(fs_err::read(dir.path().join(BACKUP_FILE)).unwrap(), before);
            assert_eq!(load(dir.path()).unwrap(), run);
            let backup = parse(&before, Path::new("bak")).unwrap();
            assert_ne!(
                backup, run,
                "round {round}: the backup is the previous state"
            );
        }
    }

    #[test]
    fn the_way_out_depends_on_the_backup() {
        let dir = tempfile::tempdir().unwrap();
        let run = fixture();
        save(dir.path(), &run).unwrap();
        fs_err::write(dir.path().join(RUN_FILE), b"{\"schema_version\": 1, \"run").unwrap();
        let message = load(dir.path()).unwrap_err().to_string();
        assert!(message.contains("there is no"), "{message}");
        assert!(message.contains("plan the run again"), "{message}");
        save_backup(dir.path(), &run);
        let message = load(dir.path()).unwrap_err().to_string();
        assert!(message.contains("restore it from"), "{message}");
        assert!(message.contains("`cp "), "{message}");
        fs_err::write(dir.path().join(BACKUP_FILE), b"garbage").unwrap();
        let message = load(dir.path()).unwrap_err().to_string();
        assert!(message.contains("run.json.bak is damaged too"), "{message}");
        assert_eq!(message.lines().count(), 1, "{message}");
    }

    fn save_backup(dir: &Path, run: &RunFile) {
        let json = serde_json::to_vec_pretty(run).unwrap();
        fs_err::write(dir.join(BACKUP_FILE), json).unwrap();
    }

    #[test]
    fn batch_names_that_are_not_batch_nnn_are_refused() {
        let good = include_str!("../tests/fixtures/run-v1-ingested.json");
        for bad in ["../../escape", "batch_1", "batch_00a", "/etc"] {
            let text = good.replacen("\"name\": \"batch_001\"", &format!("\"name\": {bad:?}"), 1);
            assert_ne!(text, good);
            let err = parse(text.as_bytes(), Path::new("/r/run.json")).unwrap_err();
            assert!(matches!(err, StoreError::Damaged { .. }), "{bad}: {err}");
        }
    }

    fn assert_clear(result: Result<RunFile, StoreError>) {
        if let Err(err) = result {
            assert!(
                matches!(err, StoreError::Damaged { .. } | StoreError::TooNew { .. }),
                "{err}"
            );
            let message = err.to_string();
            assert!(message.contains("/r/run.json"), "{message}");
            assert_eq!(message.lines().count(), 1, "{message}");
        }
    }

    /// A JSON value of any shape, nested a few levels.
    fn any_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            ".{0,20}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(".{0,8}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Replaces the value at a random place of `value` (chosen by `path`) with `with`.
    fn replace_somewhere(value: &mut serde_json::Value, path: &[usize], with: serde_json::Value) {
        let Some((&first, rest)) = path.split_first() else {
            *value = with;
            return;
        };
        let child = match value {
            serde_json::Value::Object(map) if !map.is_empty() => {
                let n = map.len();
                map.values_mut().nth(first % n)
            }
            serde_json::Value::Array(items) if !items.is_empty() => {
                let n = items.len();
                items.get_mut(first % n)
            }
            _ => None,
        };
        match child {
            Some(child) => replace_somewhere(child, rest, with),
            None => *value = with,
        }
    }

    use proptest::prelude::*;

    proptest! {
        /// Arbitrary bytes never panic the loader: Ok, or a one-line error naming the file.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            assert_clear(parse(&bytes, Path::new("/r/run.json")));
        }

        /// A valid file cut short, with bytes flipped, or with any value replaced by a value
        /// of any type: never a panic, always Ok or a clear error.
        #[test]
        fn mutated_valid_files_never_panic(
            cut in any::<prop::sample::Index>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            path in proptest::collection::vec(any::<usize>(), 0..6),
            with in any_json(),
        ) {
            let text = include_str!("../tests/fixtures/run-v1-every-state.json").as_bytes();
            assert_clear(parse(&text[..cut.index(text.len() + 1)], Path::new("/r/run.json")));
            let mut flipped = text.to_vec();
            for (at, byte) in &flips {
                let at = at.index(flipped.len());
                flipped[at] = *byte;
            }
            assert_clear(parse(&flipped, Path::new("/r/run.json")));
            let mut value: serde_json::Value = serde_json::from_slice(text).unwrap();
            replace_somewhere(&mut value, &path, with);
            let bytes = serde_json::to_vec(&value).unwrap();
            assert_clear(parse(&bytes, Path::new("/r/run.json")));
        }
    }

    #[test]
    fn huge_and_deep_files_are_refused_without_a_crash() {
        let path = Path::new("/r/run.json");
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_clear(parse(deep.as_bytes(), path));
        let deep_object = format!(
            "{{\"schema_version\": 1, \"run_id\": {}{}}}",
            "{\"a\":".repeat(50_000),
            "}".repeat(50_000)
        );
        assert_clear(parse(deep_object.as_bytes(), path));
        let huge_number = format!("{{\"schema_version\": 1{}}}", "0".repeat(100_000));
        assert!(matches!(
            parse(huge_number.as_bytes(), path),
            Err(StoreError::Damaged { .. })
        ));
        let huge_version = "{\"schema_version\": 99999999999999999999999}";
        assert!(matches!(
            parse(huge_version.as_bytes(), path),
            Err(StoreError::Damaged { .. })
        ));
        assert!(matches!(
            parse(b"{\"schema_version\": 4294967295}", path),
            Err(StoreError::TooNew { .. })
        ));
    }

    #[test]
    fn damaged_and_newer_files_are_refused_with_the_way_out() {
        let path = Path::new("/r/run.json");
        let err = parse(b"{\"schema_version\": 1, \"run_id\"", path).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/r/run.json is damaged"), "{msg}");
        assert!(msg.contains("/r/run.json.bak"), "{msg}");
        let err = parse(b"not json", path).unwrap_err();
        assert!(matches!(err, StoreError::Damaged { .. }));
        let err = parse(b"{\"schema_version\": 99}", path).unwrap_err();
        assert!(err.to_string().contains("upgrade embatch"), "{err}");
    }
}
