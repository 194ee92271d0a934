//! The control server: accepts connections on the control socket, one thread per connection,
//! one request line in, one response line out.
//!
//! ```text
//! accept thread: poll(listener, wake) ──▶ accept ──▶ SO_PEERCRED ──▶ spawn connection thread
//!                        ▲                                              │ read line
//!   stop(): write wake ──┘  then shut every connection down, join all   │ handle(pool, request)
//!                                                                       ▼ write line
//! ```
//!
//! Peers are checked once, at accept: the daemon's own user and root are served; anyone else
//! (possible only if the socket's mode or its folder were loosened) gets one
//! `permission_denied` answer and is disconnected.

use std::collections::HashMap;
use std::io::{BufReader, Write as _};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use thinpool_control::{
    ErrorKind, FrameError, Hello, MAX_REQUEST_LEN, MetadataSnapStep, PROTOCOL_VERSION, Request,
    Response, read_frame, write_frame,
};
use thinpool_engine::Pool;

use crate::handler::handle;
use crate::layers::Layers;
use crate::mounts::Mounts;
use crate::policy::Policy;
use crate::socket::{self, FileId};
use crate::{Error, Result};

/// How long a refused peer has to send its first request before it is answered anyway.
const REFUSED_PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// What every connection thread shares.
struct Shared {
    pool: Arc<Pool>,
    mounts: Arc<Mounts>,
    layers: Arc<Layers>,
    /// The space policy's events ([`Request::PoolEvents`] is answered here).
    policy: Arc<Policy>,
    root: PathBuf,
    uid: u32,
    /// The answer to `hello`; the NBD endpoints are filled in once that server runs.
    hello: Mutex<Hello>,
    /// Open connections by id (clones of their streams), so that stop can shut them down.
    conns: Mutex<HashMap<u64, UnixStream>>,
    /// The metadata snapshot a `pool check` reserved, and the connection that reserved it.
    lease: Mutex<Option<Lease>>,
}

/// A metadata snapshot reserved for `thinpool pool check`, tied to the control connection
/// that reserved it: when that connection closes with the snapshot still held (the check was
/// killed outright, SIGKILL, where its signal handler cannot release it), the daemon releases
/// it, so that later checks are not refused as busy until a restart. A release from any
/// connection (the check's own, or the one its signal handler opens) ends the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    conn: u64,
    held_root: u64,
}

/// A running control server.
pub(crate) struct ControlServer {
    shared: Arc<Shared>,
    path: PathBuf,
    id: FileId,
    wake: UnixStream,
    thread: JoinHandle<()>,
}

impl ControlServer {
    /// Bind `path` (mode 0600) and start accepting.
    pub fn start(
        pool: Arc<Pool>,
        mounts: Arc<Mounts>,
        layers: Arc<Layers>,
        policy: Arc<Policy>,
        root: &Path,
        path: &Path,
    ) -> Result<ControlServer> {
        let (listener, id) = socket::bind(path)?;
        let (wake, wake_rx) = UnixStream::pair().map_err(|source| Error::Socket {
            what: "creating the stop channel for",
            path: path.to_path_buf(),
            source,
        })?;
        let uid = rustix::process::geteuid().as_raw();
        let shared = Arc::new(Shared {
            pool,
            mounts,
            layers,
            policy,
            root: root.to_path_buf(),
            uid,
            hello: Mutex::new(Hello {
                protocol: PROTOCOL_VERSION,
                version: env!("CARGO_PKG_VERSION").to_string(),
                pid: std::process::id(),
                uid,
                root: root.to_path_buf(),
                nbd_socket: None,
                nbd_tcp: None,
            }),
            conns: Mutex::new(HashMap::new()),
            lease: Mutex::new(None),
        });
        let served = shared.clone();
        let thread = std::thread::Builder::new()
            .name("thinpool-control".into())
            .spawn(move || accept_loop(&listener, &wake_rx, &served))
            .map_err(|source| {
                socket::remove_if_ours(path, id);
                Error::Thread {
                    what: "control server",
                    source,
                }
            })?;
        Ok(ControlServer {
            shared,
            path: path.to_path_buf(),
            id,
            wake,
            thread,
        })
    }

    /// Say in `hello` where NBD is served, so that commands can name the endpoint that exists.
    pub fn set_nbd(&self, socket: Option<&Path>, tcp: Option<std::net::SocketAddr>) {
        let mut h = self.shared.hello.lock().expect("hello poisoned");
        h.nbd_socket = socket.map(Path::to_path_buf);
        h.nbd_tcp = tcp;
    }

    /// Stop accepting, shut down every connection (a request being handled finishes first),
    /// join all threads, remove the socket.
    pub fn stop(mut self) {
        if let Err(e) = self.wake.write_all(b"x") {
            // Without the wake-up the accept thread would never return: fail loudly.
            tracing::error!("waking the control server to stop it: {e}");
        }
        if self.thread.join().is_err() {
            tracing::error!("the control server thread panicked");
        }
        socket::remove_if_ours(&self.path, self.id);
    }
}

fn accept_loop(listener: &UnixListener, wake: &UnixStream, shared: &Arc<Shared>) {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    while crate::socket::wait_for_client(listener, wake, "control server") {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and friends: log, and try again on the next event rather than spin
                // on the same error forever.
                tracing::warn!("control server: accept failed: {e}");
                std::thread::yield_now();
                continue;
            }
        };
        threads.retain(|t| !t.is_finished());
        next_id += 1;
        let id = next_id;
        match stream.try_clone() {
            Ok(c) => {
                shared
                    .conns
                    .lock()
                    .expect("connection table poisoned")
                    .insert(id, c);
            }
            Err(e) => {
                tracing::warn!("control connection {id}: cannot set it up: {e}");
                continue;
            }
        }
        let sh = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("thinpool-control-{id}"))
            .spawn(move || {
                serve(&sh, stream, id);
                sh.conns
                    .lock()
                    .expect("connection table poisoned")
                    .remove(&id);
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                tracing::warn!("control connection {id}: cannot start its thread: {e}");
                shared
                    .conns
                    .lock()
                    .expect("connection table poisoned")
                    .remove(&id);
            }
        }
    }
    // Wake every connection blocked in a read; one busy with a request finishes it first.
    for s in shared
        .conns
        .lock()
        .expect("connection table poisoned")
        .values()
    {
        let _ = s.shutdown(Shutdown::Both);
    }
    for t in threads {
        let _ = t.join();
    }
}

/// Whether the user `peer` may use a daemon running as `daemon`: the same user, or root.
/// `Err` holds the refusal to send.
pub(crate) fn authorize(peer: u32, daemon: u32, root: &Path) -> std::result::Result<(), String> {
    if peer == daemon || peer == 0 {
        return Ok(());
    }
    Err(format!(
        "uid {peer} may not use the control socket of the thinpool daemon serving {}, which \
         runs as uid {daemon}: run as that user or root",
        root.display()
    ))
}

/// Serve one connection until the peer hangs up or the server stops.
fn serve(shared: &Shared, stream: UnixStream, id: u64) {
    let cred = rustix::net::sockopt::socket_peercred(&stream);
    let (peer_uid, peer_pid) = match &cred {
        Ok(c) => (
            Some(c.uid.as_raw()),
            Some(rustix::process::Pid::as_raw(Some(c.pid))),
        ),
        Err(_) => (None, None),
    };
    let span = tracing::debug_span!("control", conn = id, peer_uid, peer_pid);
    let _entered = span.enter();
    let refusal = match cred {
        Ok(c) => authorize(c.uid.as_raw(), shared.uid, &shared.root).err(),
        Err(e) => Some(format!(
            "the thinpool daemon serving {} cannot learn who you are (SO_PEERCRED: {e})",
            shared.root.display()
        )),
    };
    if let Some(r) = &refusal {
        tracing::warn!("control connection refused: {r}");
        let _ = stream.set_read_timeout(Some(REFUSED_PEER_TIMEOUT));
    } else {
        tracing::debug!("control connection accepted");
    }
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("control connection: cannot set it up: {e}");
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    loop {
        let frame = read_frame(&mut reader, MAX_REQUEST_LEN);
        let (response, last) = match &refusal {
            // A refused peer gets one answer, to its first request or when it sent none.
            Some(msg) => match frame {
                Ok(None) => break,
                _ => (
                    Response::Error {
                        kind: ErrorKind::PermissionDenied,
                        message: msg.clone(),
                    },
                    true,
                ),
            },
            None => match frame {
                Ok(None) => break,
                Ok(Some(line)) if line.trim().is_empty() => continue,
                Ok(Some(line)) => match serde_json::from_str::<Request>(&line) {
                    Ok(req) => (serve_request(shared, req, id), false),
                    Err(e) => (
                        Response::Error {
                            kind: ErrorKind::Protocol,
                            message: format!("malformed request: {e}"),
                        },
                        false,
                    ),
                },
                Err(FrameError::Io(e)) => {
                    tracing::debug!("control connection: read failed: {e}");
                    break;
                }
                // Too long or not UTF-8: where the next request starts is unknown.
                Err(e) => (
                    Response::Error {
                        kind: ErrorKind::Protocol,
                        message: format!("bad request: {e}"),
                    },
                    true,
                ),
            },
        };
        if let Err(e) = write_frame(&mut writer, &response) {
            tracing::debug!("control connection: write failed: {e}");
            break;
        }
        if last {
            break;
        }
    }
    end_lease(shared, id);
    tracing::debug!("control connection closed");
}

/// Handle `req` from connection `conn`, keeping [`Shared::lease`] in step with the metadata
/// snapshot steps of `pool check`. The lease lock is held across a reserve or release so that
/// a connection closing meanwhile sees the outcome.
fn serve_request(shared: &Shared, req: Request, conn: u64) -> Response {
    if let Request::PoolEvents { since } = req {
        return match serde_json::to_value(shared.policy.events(since)) {
            Ok(value) => Response::Ok { value },
            Err(e) => Response::Error {
                kind: ErrorKind::Io,
                message: format!("encoding the answer: {e}"),
            },
        };
    }
    let step = match &req {
        Request::PoolCheck {
            metadata_snap: Some(step),
        } => Some(*step),
        _ => None,
    };
    let hello = shared.hello.lock().expect("hello poisoned").clone();
    let Some(step) = step else {
        return handle(&shared.pool, &shared.mounts, &shared.layers, &hello, req);
    };
    let mut lease = shared.lease.lock().expect("lease poisoned");
    let response = handle(&shared.pool, &shared.mounts, &shared.layers, &hello, req);
    if let Response::Ok { value } = &response {
        match step {
            MetadataSnapStep::Reserve => {
                if let Some(held_root) = value.get("held_root").and_then(|v| v.as_u64()) {
                    *lease = Some(Lease { conn, held_root });
                }
            }
            MetadataSnapStep::Release { held_root } => {
                if lease.is_some_and(|l| l.held_root == held_root) {
                    *lease = None;
                }
            }
        }
    }
    response
}

/// Connection `conn` closed: release the metadata snapshot it reserved and left held.
fn end_lease(shared: &Shared, conn: u64) {
    let mut lease = shared.lease.lock().expect("lease poisoned");
    let Some(l) = lease.filter(|l| l.conn == conn) else {
        return;
    };
    *lease = None;
    if shared.pool.held_metadata_snap() != Some((l.held_root, true)) {
        return;
    }
    tracing::warn!(
        conn,
        held_root = l.held_root,
        "the control connection that reserved the metadata snapshot at block {} closed \
         without releasing it (its `pool check` ended without releasing it): releasing it",
        l.held_root
    );
    if let Err(e) = shared.pool.release_metadata_snap() {
        tracing::error!(
            held_root = l.held_root,
            "releasing the metadata snapshot at block {} left by a closed connection: {}",
            l.held_root,
            crate::handler::chain(&e)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_may_connect() {
        let root = Path::new("/var/lib/thinpool");
        assert!(authorize(1000, 1000, root).is_ok());
        assert!(authorize(0, 1000, root).is_ok());
        assert!(authorize(0, 0, root).is_ok());
        let e = authorize(1001, 1000, root).unwrap_err();
        assert!(
            e.contains("uid 1001")
                && e.contains("runs as uid 1000")
                && e.contains("/var/lib/thinpool"),
            "{e}"
        );
        assert!(authorize(65534, 0, root).is_err());
    }
}
