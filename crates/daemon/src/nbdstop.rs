//! Stopping the NBD server whatever happened to its socket file (issue 15).
//!
//! `NbdServer::stop` wakes its accept thread by connecting to the socket's path. When someone
//! removed `ROOT/nbd.sock` (or put another file there) while the daemon ran, that connection
//! goes nowhere, the accept thread sleeps on, and the stop used to wait for it forever.
//!
//! The daemon therefore keeps a second name for the socket it started: a hard link
//! `.<name>.wake.<pid>` beside it, made right after the server binds. A socket file is an
//! inode like any other; connecting through either name reaches the same listener. While the
//! stop runs, the daemon connects through that name now and then, which wakes the accept
//! thread (it sees the server stopping and returns); the link is removed at the end.
//!
//! The stop is also bounded: if the server has not stopped after [`NBD_STOP_TIMEOUT`] (the link
//! was removed too), the daemon stops waiting, says so, and goes on to commit the pool; the
//! server keeps its handle on the pool, so the daemon reports that it could not close it.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use thinpool_nbd::NbdServer;

/// How long the daemon waits for the NBD server to stop.
pub(crate) const NBD_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The second name of the NBD server's unix socket, removed on drop.
pub(crate) struct WakeLink {
    path: PathBuf,
}

impl WakeLink {
    /// Link `socket` to `.<name>.wake.<pid>` in its folder. Best effort: without it a stop
    /// after the socket file was removed waits the full timeout, so a failure is only logged.
    pub(crate) fn make(socket: &Path) -> Option<WakeLink> {
        let name = socket.file_name()?.to_string_lossy().into_owned();
        let prefix = format!(".{name}.wake.");
        remove_stale(socket, &prefix);
        let path = socket.with_file_name(format!("{prefix}{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        match std::fs::hard_link(socket, &path) {
            Ok(()) => Some(WakeLink { path }),
            Err(e) => {
                tracing::warn!(
                    "cannot link {} to {}: if the socket file is removed, stopping waits {} s \
                     for the NBD server: {e}",
                    socket.display(),
                    path.display(),
                    NBD_STOP_TIMEOUT.as_secs()
                );
                None
            }
        }
    }

    fn poke(&self) {
        // The accept thread takes the connection, sees the server stopping and returns.
        let _ = UnixStream::connect(&self.path);
    }
}

impl Drop for WakeLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Links a killed daemon left: those whose process is gone.
fn remove_stale(socket: &Path, prefix: &str) {
    let Some(dir) = socket.parent() else { return };
    let Ok(entries) = std::fs::read_dir(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    }) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix(prefix)
            && pid.parse::<u32>().is_ok()
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Stop `nbd`, waking its accept thread through `link` if the stop does not finish at once.
/// Returns `false` when it did not stop within [`NBD_STOP_TIMEOUT`] (the server, and its
/// handle on the pool, are then left to the process's exit).
pub(crate) fn stop(nbd: NbdServer, link: Option<WakeLink>) -> bool {
    let unix = nbd.unix_socket().map(Path::to_path_buf);
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
    let start = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return true,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if start.elapsed() >= NBD_STOP_TIMEOUT {
            tracing::error!(
                "the NBD server did not stop within {} s: its socket {} was removed or \
                 replaced and could not be reached another way; giving up on it",
                NBD_STOP_TIMEOUT.as_secs(),
                unix.as_deref().unwrap_or(Path::new("(none)")).display()
            );
            return false;
        }
        if let Some(l) = &link {
            l.poke();
        }
    }
}
