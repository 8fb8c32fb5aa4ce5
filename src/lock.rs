//! `run.lock`: one writer per run at a time.
//!
//! The lock is an OS file lock (std `File::try_lock`) on a separate file, so the atomic rename
//! of `run.json` cannot defeat it, and the OS releases it when the holder dies, even by
//! SIGKILL. The file holds the holder's pid, host and command so a refused writer can name it.
//! This module does not read or write `run.json`.

use std::fs::TryLockError;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "run.lock";

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
    #[error("could not lock {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl RunLock {
    /// Takes the lock of the run in `run_dir` for `command`, or fails at once if another
    /// process holds it.
    pub fn acquire(run_dir: &Path, command: &str) -> Result<RunLock, LockError> {
        let path = run_dir.join(LOCK_FILE);
        let io_err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = fs_err::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        match file.file().try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                // Best effort: the holder may be between truncating and writing.
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(LockError::Held {
                    run_dir: run_dir.to_path_buf(),
                    holder: if holder.is_empty() {
                        "holder unknown".to_owned()
                    } else {
                        holder.to_owned()
                    },
                });
            }
            Err(TryLockError::Error(source)) => return Err(io_err(source)),
        }
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let note = format!("pid {} on {host}: {command}\n", std::process::id());
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        file.write_all(note.as_bytes()).map_err(io_err)?;
        file.flush().map_err(io_err)?;
        Ok(RunLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
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
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("embatch advance"), "{msg}");
        drop(first);
        RunLock::acquire(dir.path(), "embatch ingest").unwrap();
    }
}
