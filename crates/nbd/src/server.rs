//! Listeners, connection threads and a clean stop.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use thinpool_engine::Pool;

use crate::handshake::{Outcome, negotiate};
use crate::sock::Sock;
use crate::tls::Pump;
use crate::transmit::Conn;
use crate::{Error, NbdConfig};

/// A client has this long to finish the handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// State shared by the listeners and connections.
pub(crate) struct Shared {
    pub pool: Arc<Pool>,
    pub read_only: bool,
    pub snapshots_read_only: bool,
    pub tls: Option<Pump>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    /// Sockets of live connections (clones), to shut them down on stop.
    live: Mutex<HashMap<u64, Sock>>,
    /// Connection threads, joined on stop (so no thread holds the pool afterwards).
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Workers running besides the connections' own threads.
    extra_workers: Arc<AtomicUsize>,
}

impl Shared {
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// A running NBD server. Dropping it stops it like [`NbdServer::stop`].
pub struct NbdServer {
    shared: Arc<Shared>,
    unix: Option<PathBuf>,
    tcp: Option<SocketAddr>,
    acceptors: Vec<JoinHandle<()>>,
}

fn bind_err(what: String) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Bind { what, source }
}

impl NbdServer {
    /// Start serving the pool's volumes on the configured sockets.
    pub fn start(pool: Arc<Pool>, cfg: &NbdConfig) -> Result<NbdServer, Error> {
        if cfg.unix_socket.is_none() && cfg.tcp.is_none() {
            return Err(Error::Config(
                "give a unix socket, a TCP address or both".into(),
            ));
        }
        let tls = match (&cfg.tls_cert, &cfg.tls_key, &cfg.tls_psk) {
            (Some(c), Some(k), None) => Some(crate::tls::load_cert(c, k)?),
            (None, None, Some(p)) => Some(crate::tls::load_psk(p)?),
            (None, None, None) => None,
            (_, _, Some(_)) => {
                return Err(Error::Config(
                    "give either a certificate (--tls-cert/--tls-key) or a PSK file (--tls-psk), not both".into(),
                ));
            }
            _ => {
                return Err(Error::Config(
                    "TLS needs both a certificate (--tls-cert) and its key (--tls-key)".into(),
                ));
            }
        };
        if let Some(addr) = cfg.tcp
            && !addr.ip().is_loopback()
            && tls.is_none()
        {
            return Err(Error::Config(format!(
                "refusing to listen on {addr} without TLS: anyone who can reach it could read and write every volume; give --tls-cert/--tls-key or --tls-psk, or listen on loopback or a unix socket"
            )));
        }
        let pump = match tls {
            Some(cfg) => Some(Pump::new(cfg).map_err(bind_err("the TLS runtime".into()))?),
            None => None,
        };
        let shared = Arc::new(Shared {
            pool,
            read_only: cfg.read_only,
            snapshots_read_only: cfg.snapshots_read_only,
            tls: pump,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            extra_workers: Arc::new(AtomicUsize::new(0)),
        });
        let mut server = NbdServer {
            shared: shared.clone(),
            unix: None,
            tcp: None,
            acceptors: Vec::new(),
        };
        if let Some(path) = &cfg.unix_socket {
            let l = bind_unix(path)?;
            server.unix = Some(path.clone());
            let sh = shared.clone();
            server.acceptors.push(spawn("nbd-accept-unix", move || {
                for s in l.incoming() {
                    if sh.is_stopping() {
                        break;
                    }
                    match s {
                        Ok(s) => start_connection(&sh, Sock::Unix(s), false),
                        Err(e) => accept_failed(&e),
                    }
                }
            }));
            tracing::info!("NBD server listening on unix socket {}", path.display());
        }
        if let Some(addr) = cfg.tcp {
            let l = TcpListener::bind(addr).map_err(bind_err(format!("TCP address {addr}")))?;
            let local = l
                .local_addr()
                .map_err(bind_err(format!("TCP address {addr}")))?;
            server.tcp = Some(local);
            let sh = shared.clone();
            let tls_required = sh.tls.is_some();
            server.acceptors.push(spawn("nbd-accept-tcp", move || {
                for s in l.incoming() {
                    if sh.is_stopping() {
                        break;
                    }
                    match s {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            start_connection(&sh, Sock::Tcp(s), tls_required)
                        }
                        Err(e) => accept_failed(&e),
                    }
                }
            }));
            tracing::info!(tls = tls_required, "NBD server listening on TCP {local}");
        }
        Ok(server)
    }

    /// The unix socket's path, if serving on one.
    pub fn unix_socket(&self) -> Option<&Path> {
        self.unix.as_deref()
    }

    /// The bound TCP address (with the real port when 0 was asked for).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.shared.live.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Stop: refuse new connections, let every request already read finish and be answered,
    /// close the connections. The caller commits the pool afterwards.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the acceptors with a connection of our own.
        if let Some(p) = &self.unix {
            let _ = UnixStream::connect(p);
        }
        if let Some(a) = self.tcp {
            let _ = TcpStream::connect_timeout(&a, Duration::from_secs(1));
        }
        for a in self.acceptors.drain(..) {
            let _ = a.join();
        }
        if let Some(p) = &self.unix {
            let _ = std::fs::remove_file(p);
        }
        for s in self
            .shared
            .live
            .lock()
            .expect("connection table poisoned")
            .values()
        {
            // Workers see end-of-file after the requests they already read.
            s.shutdown(Shutdown::Read);
        }
        let threads =
            std::mem::take(&mut *self.shared.threads.lock().expect("thread list poisoned"));
        for t in threads {
            let _ = t.join();
        }
        tracing::info!("NBD server stopped");
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("cannot start a thread")
}

fn accept_failed(e: &io::Error) {
    tracing::warn!("accepting a connection failed: {e}");
    // Out of file descriptors and the like: do not spin.
    std::thread::sleep(Duration::from_millis(50));
}

/// Bind a unix socket: a stale socket file (nobody listening) is replaced; a live one is an
/// error. The socket is made accessible to its owner only.
fn bind_unix(path: &Path) -> Result<UnixListener, Error> {
    let err = || bind_err(format!("unix socket {}", path.display()));
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(Error::Config(format!(
                "{} is in use by another server",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(err())?;
    }
    let l = UnixListener::bind(path).map_err(err())?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err())?;
    Ok(l)
}

/// Run one connection on a thread of its own: the handshake, then transmission (which adds
/// workers as the client keeps requests in flight).
fn start_connection(shared: &Arc<Shared>, sock: Sock, tls_required: bool) {
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let Ok(clone) = sock.try_clone() else {
        return;
    };
    shared
        .live
        .lock()
        .expect("connection table poisoned")
        .insert(id, clone);
    let sh = shared.clone();
    let r = std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            run_connection(&sh, sock, tls_required, id);
            sh.live
                .lock()
                .expect("connection table poisoned")
                .remove(&id);
        });
    match r {
        Ok(h) => {
            let mut threads = shared.threads.lock().expect("thread list poisoned");
            threads.retain(|t| !t.is_finished());
            threads.push(h);
        }
        Err(_) => {
            tracing::warn!("cannot start a thread for connection {id}");
            let mut live = shared.live.lock().expect("connection table poisoned");
            if let Some(s) = live.remove(&id) {
                s.shutdown(Shutdown::Both);
            }
        }
    }
}

fn run_connection(shared: &Arc<Shared>, sock: Sock, tls_required: bool, id: u64) {
    let _ = sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let (sock, session) = match negotiate(sock, shared, tls_required) {
        Ok(Outcome::Transmit(s, session)) => (s, session),
        Ok(Outcome::Closed) => return,
        Err(e) => {
            tracing::debug!(conn = id, "handshake ended: {e}");
            return;
        }
    };
    let _ = sock.set_read_timeout(None);
    // A TLS connection now runs on the plaintext end: shut that one down on stop.
    if let Ok(c) = sock.try_clone() {
        shared
            .live
            .lock()
            .expect("connection table poisoned")
            .insert(id, c);
    }
    if shared.is_stopping() {
        sock.shutdown(Shutdown::Read);
    }
    tracing::info!(
        conn = id,
        volume = session.volume.name(),
        read_only = session.read_only,
        structured = session.structured,
        flags = session.flags,
        "client connected"
    );
    let conn = match Conn::new(sock, session, id, shared.extra_workers.clone()) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::warn!(conn = id, "cannot set up the connection: {e}");
            return;
        }
    };
    conn.serve();
    conn.join_workers();
    tracing::info!(conn = id, "client disconnected");
}
