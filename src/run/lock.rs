//! The locks: `run.lock`, one writer per run at a time; and the family lock, one plan per
//! family at a time (a `plan.lock` file beside the family's runs and a Postgres advisory lock
//! keyed by table and family, so plans on two machines against one database exclude each
//! other too).
//!
//! File locks are OS file locks (std `File::try_lock`) on a separate file, so the atomic
//! rename of `run.json` cannot defeat them, and the OS releases them when the holder dies,
//! even by SIGKILL; Postgres releases an advisory lock when its session ends. A lock file
//! holds the holder's pid, host and command so a refused process can name it. This module
//! does not read or write `run.json`.

use std::fs::TryLockError;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::run::layout::{LOCK_FILE, PLAN_LOCK_FILE, SYNC_LOCK_FILE};
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

/// How long a plan waits for another plan of the same family before it gives up (exit 75).
/// Long enough for a small plan started a moment earlier to finish, so overlapping cron jobs
/// usually see the first one's run; short enough not to stall a cron job behind a plan of a
/// large family, which can take minutes.
pub const PLAN_LOCK_WAIT: Duration = Duration::from_secs(10);
/// How often a waiting plan tries the family lock again.
const PLAN_LOCK_POLL: Duration = Duration::from_millis(100);

/// Held while a command writes a run; released on drop.
#[derive(Debug)]
pub struct RunLock {
    _file: fs_err::File,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the run in {run_dir} is locked by another embatch ({holder}); wait for it to finish and run this again"
    )]
    Held { run_dir: PathBuf, holder: String },
    /// `cancel` found the run held: it cannot cancel under a running advance, whose steps
    /// would go on creating batches, so the user stops that process first.
    #[error(
        "the run in {run_dir} is in use by another embatch ({holder}); stop that process first (ctrl-c in its terminal{}), then run `embatch cancel --run-dir {run_dir}` again",
        holder_pid(holder).map(|pid| format!(", or `kill {pid}`")).unwrap_or_default()
    )]
    HeldAgainstCancel { run_dir: PathBuf, holder: String },
    #[error(
        "another plan of family {family_id} is running ({holder}); waited {} s for it — wait for it to finish and run this again",
        PLAN_LOCK_WAIT.as_secs()
    )]
    FamilyHeld { family_id: String, holder: String },
    #[error(
        "another embatch sync is running on the runs dir {runs_dir} ({holder}); it will do this work: run sync again later"
    )]
    SyncHeld { runs_dir: PathBuf, holder: String },
    #[error("could not lock {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not take the plan's advisory lock in the database")]
    Db {
        #[source]
        source: tokio_postgres::Error,
    },
}

impl LockError {
    /// Another process holds the lock: not done yet, run again later (exit 75).
    pub fn is_held(&self) -> bool {
        matches!(
            self,
            LockError::Held { .. }
                | LockError::HeldAgainstCancel { .. }
                | LockError::FamilyHeld { .. }
                | LockError::SyncHeld { .. }
        )
    }

    /// The same refusal, worded for `cancel`: stop the holder first.
    pub fn for_cancel(self) -> LockError {
        match self {
            LockError::Held { run_dir, holder } => LockError::HeldAgainstCancel { run_dir, holder },
            other => other,
        }
    }
}

/// The pid in a holder's note (`pid 4242 on host: embatch advance`), when it names one.
fn holder_pid(holder: &str) -> Option<u32> {
    holder.strip_prefix("pid ")?.split(' ').next()?.parse().ok()
}

/// Tries once to lock the file at `path` for `command`: the locked file, or the holder's note
/// when another open file (another process) holds it.
fn try_lock_file(path: &Path, command: &str) -> Result<Result<fs_err::File, String>, LockError> {
    let io_err = |source| LockError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs_err::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err)?;
    match file.file().try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            // Best effort: the holder may be between truncating and writing.
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Ok(Err(if holder.is_empty() {
                "holder unknown".to_owned()
            } else {
                holder.to_owned()
            }));
        }
        Err(TryLockError::Error(source)) => return Err(io_err(source)),
    }
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let note = format!("pid {} on {host}: {command}\n", std::process::id());
    file.set_len(0).map_err(io_err)?;
    file.rewind().map_err(io_err)?;
    file.write_all(note.as_bytes()).map_err(io_err)?;
    file.flush().map_err(io_err)?;
    Ok(Ok(file))
}

impl RunLock {
    /// Takes the lock of the run in `run_dir` for `command`, or fails at once if another
    /// process holds it.
    pub fn acquire(run_dir: &Path, command: &str) -> Result<RunLock, LockError> {
        let path = run_dir.join(LOCK_FILE);
        match try_lock_file(&path, command)? {
            Ok(file) => Ok(RunLock { _file: file, path }),
            Err(holder) => Err(LockError::Held {
                run_dir: run_dir.to_path_buf(),
                holder,
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the one lock of `sync` (`sync.lock` in the runs dir, which is created if
    /// missing), or fails at once naming the sync that holds it.
    pub fn acquire_sync(runs_dir: &Path, command: &str) -> Result<RunLock, LockError> {
        let io_err = |source| LockError::Io {
            path: runs_dir.to_path_buf(),
            source,
        };
        fs_err::create_dir_all(runs_dir).map_err(io_err)?;
        let path = runs_dir.join(SYNC_LOCK_FILE);
        match try_lock_file(&path, command)? {
            Ok(file) => Ok(RunLock { _file: file, path }),
            Err(holder) => Err(LockError::SyncHeld {
                runs_dir: runs_dir.to_path_buf(),
                holder,
            }),
        }
    }
}

/// The key of the Postgres advisory lock that plans of `family_id` (canonical spelling) over
/// the table `table` (its schema-qualified, quoted name) take: the first 8 bytes of a sha256,
/// so it is the same in every process, on every machine and in every version of embatch.
pub fn plan_lock_key(table: &str, family_id: &str) -> i64 {
    let mut hasher = Sha256::new();
    // Neither a table name nor a family id can hold a NUL byte: the fields cannot run together.
    for part in ["embatch-plan", table, family_id] {
        hasher.update(part.as_bytes());
        hasher.update([0u8]);
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// One plan per family: the file lock and the advisory lock, held until dropped (the
/// advisory lock until [`FamilyLock::release`], or the end of the database session).
#[derive(Debug)]
pub struct FamilyLock {
    _file: fs_err::File,
    key: i64,
}

impl FamilyLock {
    /// Takes the family's file lock (`plan.lock` in `family_dir`) and then the advisory lock
    /// `key` on `client`'s session, waiting up to [`PLAN_LOCK_WAIT`] for another plan to let
    /// them go; then fails naming the holder.
    pub async fn acquire(
        family_dir: &Path,
        client: &Client,
        key: i64,
        family_id: &str,
        command: &str,
    ) -> Result<FamilyLock, LockError> {
        let path = family_dir.join(PLAN_LOCK_FILE);
        let deadline = tokio::time::Instant::now() + PLAN_LOCK_WAIT;
        let mut file = None;
        loop {
            let holder = match file.take() {
                Some(locked) => Ok(locked),
                None => try_lock_file(&path, command)?,
            };
            let holder = match holder {
                Ok(locked) => {
                    if try_advisory_lock(client, key).await? {
                        return Ok(FamilyLock { _file: locked, key });
                    }
                    // Keep the file lock while waiting: every plan takes the file lock first.
                    file = Some(locked);
                    None
                }
                Err(holder) => Some(format!("{holder}; lock file {}", path.display())),
            };
            if tokio::time::Instant::now() >= deadline {
                let holder = match holder {
                    Some(holder) => holder,
                    None => advisory_lock_holder(client, key).await,
                };
                return Err(LockError::FamilyHeld {
                    family_id: family_id.to_owned(),
                    holder,
                });
            }
            tokio::time::sleep(PLAN_LOCK_POLL).await;
        }
    }

    /// Lets the advisory lock go now (the file lock goes when this is dropped). Best effort:
    /// the session's end releases it anyway.
    pub async fn release(self, client: &Client) {
        let _ = client
            .query_one("SELECT pg_advisory_unlock($1)", &[&self.key])
            .await;
    }
}

async fn try_advisory_lock(client: &Client, key: i64) -> Result<bool, LockError> {
    let row = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await
        .map_err(|source| LockError::Db { source })?;
    Ok(row.get(0))
}

/// Who holds the advisory lock `key`, as far as Postgres tells this role: the backend's pid,
/// and, when visible, its `application_name` and client address.
pub async fn advisory_lock_holder(client: &Client, key: i64) -> String {
    // A bigint advisory key shows in pg_locks as its high half in classid and its low half in
    // objid, with objsubid 1.
    let sql = "SELECT l.pid, a.application_name, host(a.client_addr), a.client_addr IS NULL AND a.pid IS NOT NULL
               FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                 AND l.classid = (($1::bigint >> 32) & 4294967295)::oid
                 AND l.objid = ($1::bigint & 4294967295)::oid
               LIMIT 1";
    let row = match client.query_opt(sql, &[&key]).await {
        Ok(Some(row)) => row,
        Ok(None) => return "the database's advisory lock; holder unknown (it let go)".to_owned(),
        Err(_) => return "the database's advisory lock; holder unknown".to_owned(),
    };
    let pid: Option<i32> = row.get(0);
    let app: Option<String> = row.get(1);
    let addr: Option<String> = row.get(2);
    let local: Option<bool> = row.get(3);
    let mut note = format!(
        "the database's advisory lock, held by backend pid {}",
        pid.map(|p| p.to_string()).unwrap_or_else(|| "?".to_owned())
    );
    match app.filter(|a| !a.is_empty()) {
        Some(app) => note.push_str(&format!(", application_name \"{app}\"")),
        None => note.push_str(", application_name not visible"),
    }
    match (addr, local) {
        (Some(addr), _) => note.push_str(&format!(", client {addr}")),
        (None, Some(true)) => note.push_str(", client on a local socket"),
        _ => {}
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_writer_is_refused_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path(), "embatch advance").unwrap();
        // Another open file description is a different lock owner, as another process is.
        let err = RunLock::acquire(dir.path(), "embatch ingest").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, LockError::Held { .. }));
        assert!(err.is_held());
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("embatch advance"), "{msg}");
        drop(first);
        RunLock::acquire(dir.path(), "embatch ingest").unwrap();
    }

    #[test]
    fn plan_lock_key_is_stable() {
        // Persisted across processes and versions: these values must never change.
        assert_eq!(
            plan_lock_key(
                "\"public\".\"knowledge_chunks\"",
                "33333333-3333-3333-3333-333333333333"
            ),
            PINNED_KEY
        );
    }

    /// Computed independently: Python's
    /// `struct.unpack(">q", sha256(b"embatch-plan\0\"public\".\"knowledge_chunks\"\x00333…\0").digest()[:8])`.
    const PINNED_KEY: i64 = -2_323_274_707_906_322_430;

    proptest::proptest! {
        #[test]
        fn plan_lock_keys_separate_tables_and_families(
            table in "[a-z\"._]{1,20}",
            family in "[a-z0-9-]{1,20}",
            other in "[a-z0-9-]{1,20}",
        ) {
            proptest::prop_assert_eq!(plan_lock_key(&table, &family), plan_lock_key(&table, &family));
            if other != family {
                proptest::prop_assert_ne!(plan_lock_key(&table, &family), plan_lock_key(&table, &other));
                // The fields cannot run together.
                let joined = format!("{table}{family}");
                proptest::prop_assert_ne!(plan_lock_key(&joined, &other), plan_lock_key(&table, &format!("{family}{other}")));
            }
        }
    }
}
