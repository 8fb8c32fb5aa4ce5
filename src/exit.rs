//! How a command ends. `main` turns it into the process's exit code, the only place that
//! decides one; commands only say whether they are done.

/// How a command ended, as the exit code of DESIGN.md §3 (decided in `main` only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: done.
    Done,
    /// 75: not done yet; run again later (or the run is locked by another command).
    NotYet,
}
