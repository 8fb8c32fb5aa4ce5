//! Peak resident memory of a child process, for the memory tests and the benchmark.

use std::process::{Child, ExitStatus};
use std::time::Duration;

/// Waits for `child` and returns its exit status and its peak resident memory in KiB.
///
/// Sampled from `VmHWM` in `/proc/<pid>/status` every few milliseconds (a high-water mark,
/// so the last sample holds the peak up to then). Not `wait4`'s `ru_maxrss`: Linux carries
/// the forking process's high-water mark across `exec`, so a child of a large process would
/// report its parent's memory, not its own. 0 where `/proc` cannot be read.
///
/// # Errors
/// When waiting for the child fails.
pub fn wait_with_peak_rss(child: &mut Child) -> std::io::Result<(ExitStatus, u64)> {
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    loop {
        if let Ok(status) = fs_err::read_to_string(&status_path)
            && let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:"))
            && let Some(kib) = line.split_whitespace().nth(1).and_then(|v| v.parse().ok())
        {
            peak_kib = peak_kib.max(kib);
        }
        if let Some(exit) = child.try_wait()? {
            return Ok((exit, peak_kib));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
