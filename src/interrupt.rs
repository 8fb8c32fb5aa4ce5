//! SIGINT and SIGTERM while a plan runs: noticed, so the plan can remove its partial folder and
//! cancel its query before the process exits (130 or 143, as a shell reports a death by those
//! signals).
//!
//! The handlers are installed only while a [`Guard`] lives and the previous ones come back
//! when it is dropped, so the commands after a plan (`submit`'s and `run`'s advance) are
//! stopped by these signals as before. A signal that was ignored when the guard was made (a
//! background job of a non-interactive shell ignores SIGINT) stays ignored.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

/// The signal received while a guard was installed; 0 for none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// How often [`Guard::wait`] looks for a signal.
const POLL: Duration = Duration::from_millis(50);

extern "C" fn on_signal(signal: libc::c_int) {
    // An atomic store is async-signal-safe.
    RECEIVED.store(signal, Ordering::SeqCst);
}

/// The command was stopped by a signal; `main` exits with 128 + the signal's number.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {name}{what}", name = signal_name(*.signal))]
pub struct Interrupted {
    pub signal: i32,
    /// What was cleaned up or left, for the message (starts with "; ").
    pub what: String,
}

impl Interrupted {
    /// The exit code: 128 + the signal, as shells report a death by that signal.
    pub fn exit_code(&self) -> u8 {
        u8::try_from(128 + self.signal).unwrap_or(1)
    }
}

fn signal_name(signal: i32) -> String {
    Signal::try_from(signal)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("signal {signal}"))
}

/// SIGINT and SIGTERM are caught while this lives.
pub struct Guard {
    previous: Vec<(Signal, SigAction)>,
}

impl Guard {
    pub fn install() -> std::io::Result<Guard> {
        RECEIVED.store(0, Ordering::SeqCst);
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut previous = Vec::new();
        for signal in [Signal::SIGINT, Signal::SIGTERM] {
            // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
            let old = unsafe { sigaction(signal, &action) }.map_err(std::io::Error::from)?;
            if old.handler() == SigHandler::SigIgn {
                // SAFETY: puts back the disposition that was there a moment ago.
                unsafe { sigaction(signal, &old) }.map_err(std::io::Error::from)?;
                continue;
            }
            previous.push((signal, old));
        }
        Ok(Guard { previous })
    }

    /// The signal received so far, if any.
    pub fn received(&self) -> Option<i32> {
        match RECEIVED.load(Ordering::SeqCst) {
            0 => None,
            signal => Some(signal),
        }
    }

    /// Resolves with the signal's number when one arrives.
    pub async fn wait(&self) -> i32 {
        loop {
            if let Some(signal) = self.received() {
                return signal;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for (signal, old) in &self.previous {
            // SAFETY: restores the disposition saved by `install`.
            let _ = unsafe { sigaction(*signal, old) };
        }
    }
}
