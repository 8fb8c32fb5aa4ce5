//! Crash points for the crash-at-every-step tests: with `EMBATCH_CRASH_AT=<name>:<n>` in the
//! environment, the process SIGKILLs itself the n-th time it reaches the point `<name>`
//! (1-based). Without the variable this is one relaxed atomic load.
//!
//! A real SIGKILL (not a panic or an exit) so that nothing — no destructor, no buffered
//! write — runs after it, exactly as when a user's machine dies.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

const ENV: &str = "EMBATCH_CRASH_AT";

struct Target {
    name: String,
    nth: u64,
    seen: AtomicU64,
}

fn target() -> Option<&'static Target> {
    static TARGET: OnceLock<Option<Target>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let value = std::env::var(ENV).ok()?;
            let (name, nth) = value.rsplit_once(':').unwrap_or((&value, "1"));
            Some(Target {
                name: name.to_owned(),
                nth: nth.parse().ok()?,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Marks a point where a crash must be survivable.
pub fn crashpoint(name: &str) {
    let Some(target) = target() else { return };
    if target.name != name {
        return;
    }
    if target.seen.fetch_add(1, Ordering::Relaxed) + 1 == target.nth {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
