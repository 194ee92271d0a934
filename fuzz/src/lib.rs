//! Shared code of the fuzz targets. The harness itself lives with the NBD crate's tests
//! (`crates/nbd/tests/fuzz/harness.rs`) so that CI runs it on stable as a bounded property
//! test; this crate includes the same file, so both drive exactly the same checks.

#[path = "../../crates/nbd/tests/fuzz/harness.rs"]
pub mod harness;

use std::sync::OnceLock;

/// The server every `nbd_session` input talks to: created once per process (a pool, a volume,
/// a listener and its threads are too costly per input).
pub fn fixture() -> &'static harness::Fixture {
    static FIXTURE: OnceLock<harness::Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        ignore_sigpipe();
        harness::Fixture::new()
    })
}

/// libFuzzer's `main` is not Rust's, so SIGPIPE keeps its default action (kill the process);
/// a server writing to a client that already left would then end the run. Rust programs,
/// the daemon included, ignore it.
fn ignore_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code and is done
    // before any socket is used.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}
