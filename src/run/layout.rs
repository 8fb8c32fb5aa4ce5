//! The run folder's layout (DESIGN.md §4): every file and folder name of a run, and the paths
//! made of them. Nothing else spells one.
//!
//! ```text
//! <runs-dir>/<family_id>/run_<YYYYMMDD_HHMMSS>_<suffix>/
//!   run.json  run.json.bak  run.lock  skipped.tsv
//!   batches/batch_001/
//!     input.jsonl  chunks.tsv  batch.json  output.jsonl  errors.jsonl  failed_chunk_ids.tsv
//! ```

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// Every run folder's name starts so.
pub const RUN_PREFIX: &str = "run_";
/// A run folder being planned is named so until it is complete.
pub const PARTIAL_PREFIX: &str = ".partial-";

/// The state machine: the one source of truth, written atomically by `store`.
pub const RUN_FILE: &str = "run.json";
/// The previous `run.json`.
pub const BACKUP_FILE: &str = "run.json.bak";
/// Held by the command writing the run.
pub const LOCK_FILE: &str = "run.lock";
/// Held by `plan` in the family folder while it reads which chunks unfinished runs hold.
pub const PLAN_LOCK_FILE: &str = "plan.lock";
/// In the runs dir: held by the one `embatch sync` running on it.
pub const SYNC_LOCK_FILE: &str = "sync.lock";
/// In the runs dir: the families `sync` left waiting for `--max-cost`, served first next time.
pub const SYNC_WAITING_FILE: &str = "sync-waiting.json";
/// Chunks never sent: id, reason.
pub const SKIPPED_FILE: &str = "skipped.tsv";
/// The folder of the batch folders.
pub const BATCHES_DIR: &str = "batches";

/// A batch's requests, one chunk each.
pub const INPUT_FILE: &str = "input.jsonl";
/// A batch's chunks: id, sha256 of the content, tokens — recorded at plan time.
pub const CHUNKS_FILE: &str = "chunks.tsv";
/// The last Batch object seen from the provider.
pub const BATCH_JSON: &str = "batch.json";
/// The provider's output file, after download.
pub const OUTPUT_FILE: &str = "output.jsonl";
/// The provider's error file, if it wrote one.
pub const ERRORS_FILE: &str = "errors.jsonl";
/// id, reason, retryable — of every request of the batch that failed.
pub const FAILED_FILE: &str = "failed_chunk_ids.tsv";
/// `--provider direct`: the answers received so far, one Batch API output (or error) line per
/// input, appended and synced as they come; cut into the output and error files when the
/// batch is done.
pub const DIRECT_ANSWERS_FILE: &str = "answers.jsonl";
/// Chunks a retry batch left out: id, reason.
pub const RETRY_SKIPPED_FILE: &str = "retry_skipped.tsv";

/// Characters kept as they are in a family's folder name; the rest is percent-encoded.
const FAMILY_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'.').remove(b'_').remove(b'-');

/// `<runs-dir>/<family id, percent-encoded if not [A-Za-z0-9._-]>`.
pub fn family_dir(runs_dir: &Path, family_id: &str) -> PathBuf {
    let mut name = utf8_percent_encode(family_id, FAMILY_ESCAPE).to_string();
    // `.` and `..` are valid ids but not usable folder names.
    if name == "." || name == ".." {
        name = name.replace('.', "%2E");
    }
    runs_dir.join(name)
}

/// The family id a folder under the runs dir was named after (the inverse of
/// [`family_dir`]); `None` for a name no family id gives.
pub fn family_folder_id(folder_name: &str) -> Option<String> {
    let id = percent_decode_str(folder_name)
        .decode_utf8()
        .ok()?
        .into_owned();
    // Only names that family_dir writes: anything else is not a family folder.
    let runs_dir = Path::new("");
    (family_dir(runs_dir, &id) == runs_dir.join(folder_name)).then_some(id)
}

/// A new run's id and folder name, from the clock and a random suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunName {
    /// `20261124T104500Z-7f3a`
    pub run_id: String,
    /// `run_20261124_104500_7f3a`
    pub folder: String,
}

pub fn run_name(now: DateTime<Utc>, suffix: u16) -> RunName {
    RunName {
        run_id: format!("{}-{suffix:04x}", now.format("%Y%m%dT%H%M%SZ")),
        folder: format!("{RUN_PREFIX}{}_{suffix:04x}", now.format("%Y%m%d_%H%M%S")),
    }
}

/// The folder of batch `name` (`batch_001`) of the run in `run_dir`.
pub fn batch_dir(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(BATCHES_DIR).join(name)
}

/// The name of the batch numbered `number` (1-based): `batch_001`.
pub fn batch_name(number: usize) -> String {
    format!("batch_{number:03}")
}

/// `--batch-file PATH/batch.json` (or the batch folder) → (run folder, batch name).
pub fn locate_batch(batch_file: &Path) -> Option<(PathBuf, String)> {
    let batch_dir = if batch_file.file_name().is_some_and(|n| n == BATCH_JSON) {
        batch_file.parent()?
    } else {
        batch_file
    };
    let name = batch_dir.file_name()?.to_string_lossy().into_owned();
    let batches = batch_dir.parent()?;
    if batches.file_name()? != BATCHES_DIR {
        return None;
    }
    Some((batches.parent()?.to_path_buf(), name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_file_locates_its_run() {
        let (run, name) =
            locate_batch(Path::new("/r/fam/run_x/batches/batch_002/batch.json")).unwrap();
        assert_eq!(run, PathBuf::from("/r/fam/run_x"));
        assert_eq!(name, "batch_002");
        let (run, _) = locate_batch(Path::new("/r/fam/run_x/batches/batch_002")).unwrap();
        assert_eq!(run, PathBuf::from("/r/fam/run_x"));
        assert!(locate_batch(Path::new("/r/batch.json")).is_none());
    }
}
