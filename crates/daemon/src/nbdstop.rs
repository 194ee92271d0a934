//! Stopping the NBD server within a bound (issue 15).
//!
//! `NbdServer::stop` wakes its accept threads through a socket pair of its own, so removing
//! or replacing `ROOT/nbd.sock` while the daemon runs no longer keeps it from stopping. What
//! can still hold a stop is a connection: its requests already read are answered first, and a
//! client that stopped reading its replies leaves that answer blocked on a full socket. The
//! daemon therefore waits at most [`NBD_STOP_TIMEOUT`]; past it, it says so and goes on to
//! commit the pool. The server keeps its handle on the pool, so the daemon reports that it
//! could not close it.

use std::sync::mpsc;
use std::time::Duration;

use thinpool_nbd::NbdServer;

/// How long the daemon waits for the NBD server to stop.
pub(crate) const NBD_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Stop `nbd` on a thread of its own. Returns `false` when it did not stop within
/// [`NBD_STOP_TIMEOUT`] (the server, and its handle on the pool, are then left to the
/// process's exit).
pub(crate) fn stop(nbd: NbdServer) -> bool {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("nbd-stop".into())
        .spawn(move || {
            nbd.stop();
            let _ = tx.send(());
        });
    if let Err(e) = spawned {
        // The closure (and the server in it) is gone with the error: dropping the server
        // stopped it on this thread, as `stop` would have.
        tracing::warn!("no thread to stop the NBD server on ({e}); it was stopped in place");
        return true;
    }
    match rx.recv_timeout(NBD_STOP_TIMEOUT) {
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => true,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            tracing::error!(
                "the NBD server did not stop within {} s: a client is not reading the replies \
                 to requests it sent; giving up on it",
                NBD_STOP_TIMEOUT.as_secs()
            );
            false
        }
    }
}
