//! Waiting for SIGTERM or SIGINT, the signals that stop a daemon (systemd sends SIGTERM, a
//! terminal ^C sends SIGINT).

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::{Error, Result};

/// Handlers for SIGTERM and SIGINT, installed by [`ShutdownSignals::install`]. Once
/// installed, these signals no longer kill the process; they are queued for
/// [`ShutdownSignals::wait`]. Install before starting the daemon, so that a signal sent while
/// it starts is not lost (or fatal).
pub struct ShutdownSignals {
    signals: Signals,
}

impl ShutdownSignals {
    /// Install the handlers.
    pub fn install() -> Result<ShutdownSignals> {
        let signals = Signals::new([SIGTERM, SIGINT]).map_err(Error::Signals)?;
        Ok(ShutdownSignals { signals })
    }

    /// Block until SIGTERM or SIGINT arrives (or has arrived since [`ShutdownSignals::install`]);
    /// returns the signal's number.
    pub fn wait(&mut self) -> i32 {
        let sig = self.signals.forever().next().unwrap_or(SIGTERM);
        tracing::info!(signal = sig, "shutdown signal received");
        sig
    }
}

impl ShutdownSignals {
    /// Wait up to `timeout` for SIGTERM or SIGINT; `None` when none came.
    pub fn wait_timeout(&mut self, timeout: std::time::Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(sig) = self.signals.pending().next() {
                tracing::info!(signal = sig, "shutdown signal received");
                return Some(sig);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return None;
            }
            std::thread::sleep((deadline - now).min(std::time::Duration::from_millis(100)));
        }
    }
}

/// Install the handlers and block until SIGTERM or SIGINT arrives; returns the signal's
/// number. Prefer [`ShutdownSignals`] when the daemon starts after this would be called.
pub fn wait_for_shutdown_signal() -> Result<i32> {
    Ok(ShutdownSignals::install()?.wait())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raised_sigterm_is_seen() {
        let mut s = ShutdownSignals::install().unwrap();
        signal_hook::low_level::raise(SIGTERM).unwrap();
        assert_eq!(s.wait(), SIGTERM);
    }
}
