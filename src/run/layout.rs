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

/// The state machine: the one source of truth, written atomically by `store`.
pub const RUN_FILE: &str = "run.json";
/// The previous `run.json`.
pub const BACKUP_FILE: &str = "run.json.bak";
/// Held by the command writing the run.
pub const LOCK_FILE: &str = "run.lock";
/// Held by `plan` in the family folder while it reads which chunks unfinished runs hold.
pub const PLAN_LOCK_FILE: &str = "plan.lock";
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
/// Chunks a retry batch left out: id, reason.
pub const RETRY_SKIPPED_FILE: &str = "retry_skipped.tsv";

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
