//! Crash points for the crash-at-every-step tests: with `EMBATCH_CRASH_AT=<name>:<n>` in the
//! environment, the process SIGKILLs itself the n-th time it reaches the point `<name>`
//! (1-based). With `EMBATCH_CRASH_AT=<name>:~<k>` it SIGKILLs itself at each reach with a
//! chance of one in k, drawn from `EMBATCH_CRASH_SEED` (default 0), so that a fault campaign
//! lands crashes anywhere among the many saves of one advance, repeatably. Without the
//! variable this is one relaxed atomic load.
//!
//! A real SIGKILL (not a panic or an exit) so that nothing — no destructor, no buffered
//! write — runs after it, exactly as when a user's machine dies.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

const ENV: &str = "EMBATCH_CRASH_AT";
const SEED_ENV: &str = "EMBATCH_CRASH_SEED";

/// When a reached point crashes.
enum When {
    /// The n-th reach.
    Nth(u64),
    /// Each reach, with a chance of one in `one_in`; `state` is a splitmix64 generator.
    Chance { one_in: u64, state: AtomicU64 },
}

struct Target {
    name: String,
    when: When,
    seen: AtomicU64,
}

impl Target {
    fn fires(&self) -> bool {
        let reach = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        match &self.when {
            When::Nth(nth) => reach == *nth,
            When::Chance { one_in, state } => {
                const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
                let mut z = state
                    .fetch_add(GAMMA, Ordering::Relaxed)
                    .wrapping_add(GAMMA);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (z ^ (z >> 31)) % (*one_in).max(1) == 0
            }
        }
    }
}

fn target() -> Option<&'static Target> {
    static TARGET: OnceLock<Option<Target>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let value = std::env::var(ENV).ok()?;
            let (name, when) = value.rsplit_once(':').unwrap_or((&value, "1"));
            let when = match when.strip_prefix('~') {
                Some(one_in) => When::Chance {
                    one_in: one_in.parse().ok()?,
                    state: AtomicU64::new(
                        std::env::var(SEED_ENV)
                            .ok()
                            .and_then(|seed| seed.parse().ok())
                            .unwrap_or(0),
                    ),
                },
                None => When::Nth(when.parse().ok()?),
            };
            Some(Target {
                name: name.to_owned(),
                when,
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
    if target.fires() {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
