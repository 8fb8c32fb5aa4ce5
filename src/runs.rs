//! The runs dir: where run folders live, how they are named, and finding them again
//! (`embatch runs`, and the chunks that unfinished runs still hold).
//!
//! Read-only over existing runs; creating a run folder is the plan's job.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::store::{self, RunFile, StoreError};
use crate::tsv;

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
        folder: format!("run_{}_{suffix:04x}", now.format("%Y%m%d_%H%M%S")),
    }
}

/// A run folder found under the runs dir, with its `run.json` or why it could not be read.
pub struct FoundRun {
    pub dir: PathBuf,
    pub run: Result<RunFile, StoreError>,
}

/// Every run folder under `runs_dir` (of one family if given), sorted by folder path.
pub fn find_runs(runs_dir: &Path, family_id: Option<&str>) -> std::io::Result<Vec<FoundRun>> {
    let family_dirs: Vec<PathBuf> = match family_id {
        Some(family) => vec![family_dir(runs_dir, family)],
        None => match fs_err::read_dir(runs_dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(err) => return Err(err),
        },
    };
    let mut found = Vec::new();
    for dir in family_dirs {
        let entries = match fs_err::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let is_run = entry.file_name().to_string_lossy().starts_with("run_");
            if is_run && path.is_dir() {
                let run = store::load(&path);
                found.push(FoundRun { dir: path, run });
            }
        }
    }
    found.sort_by(|a, b| a.dir.cmp(&b.dir));
    Ok(found)
}

/// One line of `embatch runs`.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run_id: Option<String>,
    pub family_id: Option<String>,
    pub run_dir: String,
    pub created_at: Option<DateTime<Utc>>,
    pub model: Option<String>,
    pub batches: usize,
    pub chunks: u64,
    pub finished: bool,
    pub cancelled: bool,
    /// State name → number of batches in it.
    pub states: std::collections::BTreeMap<String, usize>,
    /// Why `run.json` could not be read, if it could not.
    pub error: Option<String>,
}

pub fn summarize(found: &FoundRun) -> RunSummary {
    let run_dir = found.dir.display().to_string();
    match &found.run {
        Ok(run) => {
            let mut states = std::collections::BTreeMap::new();
            for batch in &run.batches {
                *states
                    .entry(batch.state.kind().as_str().to_owned())
                    .or_insert(0) += 1;
            }
            RunSummary {
                run_id: Some(run.run_id.clone()),
                family_id: Some(run.family_id.clone()),
                run_dir,
                created_at: Some(run.created_at),
                model: Some(run.settings.model.clone()),
                batches: run.batches.len(),
                chunks: run.plan.chunks,
                finished: run.is_finished(),
                cancelled: run.cancelled,
                states,
                error: None,
            }
        }
        Err(err) => RunSummary {
            run_id: None,
            family_id: None,
            run_dir,
            created_at: None,
            model: None,
            batches: 0,
            chunks: 0,
            finished: false,
            cancelled: false,
            states: Default::default(),
            error: Some(err.to_string()),
        },
    }
}

/// The chunks that unfinished runs of a family hold, so a new plan leaves them alone.
///
/// Ids are kept as 128-bit digests, not strings: a million held ids cost about 20 MB, and a
/// collision (odds around 2^-88 for a million ids) would only skip one chunk wrongly.
#[derive(Debug, Default)]
pub struct HeldChunks {
    by_digest: HashMap<u128, usize>,
    /// The holding runs' folders; the map's values index this.
    pub runs: Vec<PathBuf>,
}

impl HeldChunks {
    /// The index in `runs` of the run holding `chunk_id`, if one does.
    pub fn holder(&self, chunk_id: &str) -> Option<usize> {
        self.by_digest.get(&id_digest(chunk_id)).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

fn id_digest(chunk_id: &str) -> u128 {
    let hash = Sha256::digest(chunk_id.as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&hash[..16]);
    u128::from_le_bytes(first)
}

/// Reads the `chunks.tsv` of every batch of every unfinished run of `family_id`.
/// A run whose `run.json` cannot be read is an error: it may hold chunks, and guessing could
/// pay twice for them.
pub fn held_chunks(runs_dir: &Path, family_id: &str) -> anyhow::Result<HeldChunks> {
    let mut held = HeldChunks::default();
    for found in find_runs(runs_dir, Some(family_id))? {
        let run = match found.run {
            Ok(run) => run,
            Err(err) => {
                return Err(anyhow::anyhow!(
                    "{err}; or pass --force to plan without checking which chunks that run holds"
                ));
            }
        };
        if run.is_finished() {
            continue;
        }
        let run_idx = held.runs.len();
        held.runs.push(found.dir.clone());
        for batch in &run.batches {
            let path = found
                .dir
                .join("batches")
                .join(&batch.name)
                .join("chunks.tsv");
            let file = fs_err::File::open(&path).map_err(|err| {
                anyhow::anyhow!(
                    "{err}: the unfinished run {} no longer knows which chunks it holds; \
                     restore that file, or cancel the run (embatch cancel --run-dir {}), \
                     or pass --force to plan without checking",
                    found.dir.display(),
                    found.dir.display()
                )
            })?;
            let reader = std::io::BufReader::new(file);
            tsv::for_each_record(reader, |fields| {
                if let Some(id) = fields.first() {
                    held.by_digest.insert(id_digest(id), run_idx);
                }
                Ok(())
            })?;
        }
    }
    Ok(held)
}

/// The one-line human form of a run summary.
pub fn summary_line(s: &RunSummary) -> String {
    if let Some(err) = &s.error {
        return format!("{}  unreadable: {err}", s.run_dir);
    }
    let states: Vec<String> = s.states.iter().map(|(k, n)| format!("{k} {n}")).collect();
    format!(
        "{}  family {}  {}  {} chunks in {} batches ({})  {}{}",
        s.run_dir,
        s.family_id.as_deref().unwrap_or("?"),
        s.created_at
            .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_default(),
        s.chunks,
        s.batches,
        states.join(", "),
        if s.finished { "finished" } else { "unfinished" },
        if s.cancelled { ", cancelled" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_dirs_are_percent_encoded() {
        let root = Path::new("/r");
        assert_eq!(family_dir(root, "abc-1.2_x"), PathBuf::from("/r/abc-1.2_x"));
        assert_eq!(family_dir(root, "a/b c"), PathBuf::from("/r/a%2Fb%20c"));
        assert_eq!(family_dir(root, ".."), PathBuf::from("/r/%2E%2E"));
    }

    #[test]
    fn run_names_follow_the_layout() {
        let now = DateTime::parse_from_rfc3339("2026-11-24T10:45:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let name = run_name(now, 0x7f3a);
        assert_eq!(name.run_id, "20261124T104500Z-7f3a");
        assert_eq!(name.folder, "run_20261124_104500_7f3a");
    }
}
