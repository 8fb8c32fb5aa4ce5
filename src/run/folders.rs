//! The runs dir: the family folders and the run folders in them, found again (`embatch runs`,
//! and the chunks that unfinished runs still hold). Their names are `layout`'s.
//!
//! Read-only over existing runs; creating a run folder is the plan's job.

use std::collections::HashMap;

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::run::evidence;
use crate::run::layout::{self, CHUNKS_FILE, INPUT_FILE, RUN_PREFIX, family_folder_id};
use crate::run::store::{self, BatchRecord, FileDigest, RunFile, StoreError};
use crate::tsv;

/// Every family folder under `runs_dir`, with the family id it was named after.
pub fn family_folders(runs_dir: &Path) -> std::io::Result<Vec<(PathBuf, String)>> {
    let entries = match fs_err::read_dir(runs_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut folders: Vec<(PathBuf, String)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let id = family_folder_id(e.file_name().to_str()?)?;
            Some((e.path(), id))
        })
        .collect();
    folders.sort();
    Ok(folders)
}

/// What `runs --family-id` compares family ids by, without a database: a uuid spelled any way
/// Postgres's uuid input accepts (upper case, no hyphens, braces) becomes its canonical
/// lower-case hyphenated text, a decimal integer loses its sign `+`, leading zeros and
/// surrounding white space, and anything else stays as it is. (`plan` asks the database
/// instead, by the family column's type.)
pub fn spelling_key(id: &str) -> String {
    if let Some(uuid) = parse_pg_uuid(id) {
        return uuid.to_string();
    }
    if let Some(int) = parse_decimal_int(id) {
        return int;
    }
    id.to_owned()
}

/// Postgres's `uuid_in`: optional braces around 32 hex digits, with an optional hyphen after
/// any group of four digits but the last.
pub fn parse_pg_uuid(text: &str) -> Option<uuid::Uuid> {
    let inner = match text.strip_prefix('{') {
        Some(rest) => rest.strip_suffix('}')?,
        None => text,
    };
    let bytes = inner.as_bytes();
    let mut value: u128 = 0;
    let mut pos = 0;
    for i in 0..16 {
        let pair = bytes.get(pos..pos + 2)?;
        let hex = std::str::from_utf8(pair).ok()?;
        if !pair.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        value = (value << 8) | u128::from(u8::from_str_radix(hex, 16).ok()?);
        pos += 2;
        if bytes.get(pos) == Some(&b'-') && i % 2 == 1 && i < 15 {
            pos += 1;
        }
    }
    (pos == bytes.len()).then(|| uuid::Uuid::from_u128(value))
}

/// A decimal integer as Postgres's integer input reads it (white space around, a sign,
/// digits), in canonical form.
pub fn parse_decimal_int(text: &str) -> Option<String> {
    let trimmed =
        text.trim_matches(|c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c'));
    let (negative, digits) = match trimmed.as_bytes().first()? {
        b'-' => (true, &trimmed[1..]),
        b'+' => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = digits.trim_start_matches('0');
    Some(match (digits.is_empty(), negative) {
        (true, _) => "0".to_owned(),
        (false, true) => format!("-{digits}"),
        (false, false) => digits.to_owned(),
    })
}

/// A run folder found under the runs dir, with its `run.json` or why it could not be read.
pub struct FoundRun {
    pub dir: PathBuf,
    pub run: Result<RunFile, StoreError>,
}

/// Every run folder under `runs_dir` (of one family if given), sorted by folder path.
///
/// A family is matched by [`spelling_key`], so runs planned under another spelling of the
/// same uuid or integer (before plans used the database's spelling) are found too.
pub fn find_runs(runs_dir: &Path, family_id: Option<&str>) -> std::io::Result<Vec<FoundRun>> {
    let family_dirs: Vec<PathBuf> = match family_id {
        Some(family) => {
            let key = spelling_key(family);
            family_folders(runs_dir)?
                .into_iter()
                .filter(|(_, id)| spelling_key(id) == key)
                .map(|(dir, _)| dir)
                .collect()
        }
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
    find_runs_in(&family_dirs)
}

/// Every run folder in the given family folders, sorted by folder path.
pub fn find_runs_in(family_dirs: &[PathBuf]) -> std::io::Result<Vec<FoundRun>> {
    let mut found = Vec::new();
    for dir in family_dirs {
        let entries = match fs_err::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let is_run = entry.file_name().to_string_lossy().starts_with(RUN_PREFIX);
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
    /// The holding runs; the map's values index this.
    pub runs: Vec<HoldingRun>,
}

/// An unfinished run that holds chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldingRun {
    pub dir: PathBuf,
    /// Planned but never submitted: every batch still `planned` (nothing uploaded), not
    /// cancelled — what `plan` and `submit --dry-run` leave for `advance`.
    pub unsubmitted: bool,
}

impl HeldChunks {
    /// The index in `runs` of the run holding `chunk_id`, if one does.
    pub fn holder(&self, chunk_id: &str) -> Option<usize> {
        self.by_digest.get(&id_digest(chunk_id)).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// How many chunks are held.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }
}

fn id_digest(chunk_id: &str) -> u128 {
    let hash = Sha256::digest(chunk_id.as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&hash[..16]);
    u128::from_le_bytes(first)
}

/// Reads the chunk ids of every batch of every unfinished run in `family_dirs` (the folders
/// of one family, under every spelling its id was planned under).
///
/// Only from evidence that is intact (DESIGN.md §9): a batch's `chunks.tsv` when it matches
/// the digest `run.json` recorded, else the custom_ids of its `input.jsonl` when that one
/// matches; in a run planned before digests were recorded, `chunks.tsv` when it is complete
/// and well formed. A truncated or garbled list would let the new plan take chunks that run
/// still holds, and pay for them twice: when neither file is intact, this is an error naming
/// the file and the way out. Nothing is written (the plan does not hold that run's lock).
/// A run whose `run.json` cannot be read is an error too: it may hold chunks.
pub fn held_chunks(family_dirs: &[PathBuf]) -> anyhow::Result<HeldChunks> {
    let mut held = HeldChunks::default();
    for found in find_runs_in(family_dirs)? {
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
        held.runs.push(HoldingRun {
            dir: found.dir.clone(),
            unsubmitted: !run.cancelled
                && run
                    .batches
                    .iter()
                    .all(|b| b.state.kind() == crate::run::state::StateKind::Planned),
        });
        for batch in &run.batches {
            let mut add = |id: &str| {
                held.by_digest.insert(id_digest(id), run_idx);
            };
            read_held_ids(&found.dir, batch, &mut add).map_err(|problem| {
                anyhow::anyhow!(
                    "{problem}: the unfinished run {} no longer shows which chunks it holds, and planning them again could pay twice for them; restore that file from a copy, or cancel the run (embatch cancel --run-dir {}), or pass --force to plan without checking",
                    found.dir.display(),
                    found.dir.display()
                )
            })?;
        }
    }
    Ok(held)
}

/// Calls `add` with the id of every chunk `batch` holds, from whichever of its evidence files
/// is intact (see [`held_chunks`]); otherwise `Err` says which file is damaged and how.
fn read_held_ids(
    run_dir: &Path,
    batch: &BatchRecord,
    add: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let dir = layout::batch_dir(run_dir, &batch.name);
    let chunks_path = dir.join(CHUNKS_FILE);
    let input_path = dir.join(INPUT_FILE);
    let Some(files) = &batch.files else {
        // Planned before digests were recorded: only a complete, well-formed list is taken.
        evidence::check_unrecorded(&chunks_path, batch.requests).map_err(|problem| {
            format!(
                "{} {problem} (its run was planned before embatch recorded digests of its files)",
                chunks_path.display()
            )
        })?;
        return read_chunk_list(&chunks_path, add);
    };
    let found = evidence::digest_if_present(&chunks_path, FileDigest::CHUNKS_HEADER_LINES)
        .map_err(|err| format!("{err:#}"))?;
    if found.as_ref() == Some(&files.chunks) {
        return read_chunk_list(&chunks_path, add);
    }
    let input = evidence::digest_if_present(&input_path, 0).map_err(|err| format!("{err:#}"))?;
    if input.as_ref() == Some(&files.input) {
        // The custom_ids of the requests: the chunk ids, as `chunks.tsv` lists them.
        return evidence::for_each_request(&input_path, |custom_id, _| {
            add(custom_id);
            Ok(())
        })
        .map_err(|err| format!("{err:#}"));
    }
    Err(format!(
        "{} {}, and {} {} too",
        chunks_path.display(),
        evidence::damage(found.as_ref(), &files.chunks),
        input_path.display(),
        evidence::damage(input.as_ref(), &files.input)
    ))
}

/// The ids of a `chunks.tsv` (its first column). Streams.
fn read_chunk_list(path: &Path, add: &mut dyn FnMut(&str)) -> Result<(), String> {
    let file = fs_err::File::open(path).map_err(|err| err.to_string())?;
    tsv::for_each_record(std::io::BufReader::new(file), |fields| {
        if let Some(id) = fields.first() {
            add(id);
        }
        Ok(())
    })
    .map_err(|err| format!("{} cannot be read ({err})", path.display()))
}

/// A run's state in a word or three, as `status` and `runs` both say it: `finished`,
/// `cancelled`, `cancelled, batches still ending`, `in progress`.
pub fn run_state(finished: bool, cancelled: bool) -> &'static str {
    match (finished, cancelled) {
        (true, false) => "finished",
        (true, true) => "cancelled",
        (false, true) => "cancelled, batches still ending",
        (false, false) => "in progress",
    }
}

/// The one-line human form of a run summary: the folder (what `--run-dir` takes), its state,
/// then the family, when it was planned, and its chunks and batches.
pub fn summary_line(s: &RunSummary) -> String {
    if let Some(err) = &s.error {
        return format!("{}  unreadable: {err}", s.run_dir);
    }
    let states: Vec<String> = s
        .states
        .iter()
        .map(|(k, n)| format!("{} {k}", crate::printer::number(*n as u64)))
        .collect();
    format!(
        "{}  {}  family {}  {}  {} in {} ({})",
        s.run_dir,
        run_state(s.finished, s.cancelled),
        s.family_id.as_deref().unwrap_or("?"),
        s.created_at
            .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_default(),
        crate::printer::count(s.chunks, "chunk", "chunks"),
        crate::printer::count(s.batches as u64, "batch", "batches"),
        states.join(", "),
    )
}

#[cfg(test)]
mod tests;
