//! Listeners, connection threads and a clean stop.
//!
//! Bounded resources: at most `max_connections` connections are open at once (a client past
//! the limit is closed as soon as it is accepted, before any thread is started for it, and
//! refusals are logged once per burst); a watchdog thread closes connections that have not
//! finished the handshake by their deadline; thread creation failures close the connection
//! they were for. A thread that cannot be created must be turned down here: the Rust runtime
//! aborts the process when a thread it did create cannot get its signal stack (the memory
//! map limit, about 16 000 threads, is what about 1 000 connections of 16 threads each met).
//!
//! ```text
//! accept thread: poll(listener, wake) ──▶ accept all waiting ──▶ admit? ──▶ connection thread
//!        ▲                                                     └ no: close
//!   stop(): write wake, join acceptors, shut connections' reads, join them, remove our socket
//! ```
//!
//! The stop wakes the accept threads through a socket pair of their own, not through the
//! listening socket's path: that path may have been removed, or taken by another file, while
//! the server ran. For the same reason the socket file is removed at the end only if it is
//! still the one the server bound (same device and inode).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::io::Write as _;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thinpool_engine::Pool;

use crate::handshake::{Outcome, negotiate};
use crate::sock::Sock;
use crate::tls::Pump;
use crate::transmit::{Budget, Conn, GLOBAL_BYTES};
use crate::{Error, NbdConfig};

/// Refusals past the connection limit are reported at most this often.
const REFUSAL_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Connections refused since the last report.
#[derive(Default)]
struct Refusals {
    /// Refused and not reported yet.
    count: u64,
    /// When the last report was made (`None`: not refusing now).
    reported: Option<Instant>,
}

/// State shared by the listeners and connections.
pub(crate) struct Shared {
    pub pool: Arc<Pool>,
    pub read_only: bool,
    pub snapshots_read_only: bool,
    pub tls: Option<Pump>,
    /// PSK identities restricted to some volumes ([`NbdConfig::psk_exports`]).
    pub psk_exports: BTreeMap<String, Vec<String>>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    /// Sockets of live connections (clones), to shut them down on stop.
    live: Mutex<HashMap<u64, Sock>>,
    /// Connection threads, joined on stop (so no thread holds the pool afterwards).
    threads: Mutex<Vec<JoinHandle<()>>>,
    max_connections: usize,
    pub handshake_timeout: Duration,
    /// Connections open (accepted and not yet ended).
    open: AtomicUsize,
    /// The places under the limit of the connections open: a connection's thread gives its
    /// own back when it ends, the watchdog before it closes a late one (so that a client who
    /// sees that close finds the place free).
    slots: Mutex<HashMap<u64, Slot>>,
    refusals: Mutex<Refusals>,
    /// Handshake deadlines of the connections still handshaking, for the watchdog.
    deadlines: Mutex<HashMap<u64, Instant>>,
    /// Wakes the watchdog: a new deadline, or stop.
    deadline_added: Condvar,
    /// Workers running besides the connections' own threads.
    extra_workers: Arc<AtomicUsize>,
    /// Request data in flight over all connections.
    in_flight: Arc<Budget>,
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
    /// The socket file the server bound at `unix`, to remove only that one.
    unix_file: Option<FileId>,
    tcp: Option<SocketAddr>,
    acceptors: Vec<JoinHandle<()>>,
    /// Written to on stop: its peer, which the accept threads poll, becomes readable.
    wake: UnixStream,
}

/// Which file a socket is: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(path: &Path) -> io::Result<FileId> {
        let m = path.symlink_metadata()?;
        Ok(FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

fn bind_err(what: String) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Bind { what, source }
}

impl NbdServer {
    /// Start serving the pool's volumes on the configured sockets.
    pub fn start(pool: Arc<Pool>, cfg: &NbdConfig) -> Result<NbdServer, Error> {
        cfg.check()?;
        let tls = match (&cfg.tls_cert, &cfg.tls_key, &cfg.tls_psk) {
            (Some(c), Some(k), _) => Some(crate::tls::load_cert(c, k)?),
            (_, _, Some(p)) => Some(crate::tls::load_psk(p, &cfg.psk_exports)?),
            _ => None,
        };
        let pump = match tls {
            Some(cfg) => Some(Pump::new(cfg).map_err(bind_err("the TLS runtime".into()))?),
            None => None,
        };
        let shared = Arc::new(Shared {
            pool,
            read_only: cfg.read_only,
            snapshots_read_only: cfg.snapshots_read_only,
            tls: pump,
            psk_exports: cfg.psk_exports.clone(),
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            max_connections: cfg.max_connections,
            handshake_timeout: cfg.handshake_timeout,
            open: AtomicUsize::new(0),
            refusals: Mutex::new(Refusals::default()),
            deadlines: Mutex::new(HashMap::new()),
            deadline_added: Condvar::new(),
            extra_workers: Arc::new(AtomicUsize::new(0)),
            in_flight: Arc::new(Budget::new(GLOBAL_BYTES)),
        });
        let (wake, woken) =
            UnixStream::pair().map_err(bind_err("the stop signal's socket pair".into()))?;
        let woken = Arc::new(woken);
        let mut server = NbdServer {
            shared: shared.clone(),
            unix: None,
            unix_file: None,
            tcp: None,
            acceptors: Vec::new(),
            wake,
        };
        let sh = shared.clone();
        server
            .acceptors
            .push(spawn("nbd-watchdog", move || watch_handshakes(&sh))?);
        if let Some(path) = &cfg.unix_socket {
            let (l, id) = bind_unix(path)?;
            server.unix = Some(path.clone());
            server.unix_file = Some(id);
            let sh = shared.clone();
            let woken = woken.clone();
            server.acceptors.push(spawn("nbd-accept-unix", move || {
                accept_loop(&sh, &l, &woken, "unix socket", |l| {
                    l.accept().map(|(s, _)| (Sock::Unix(s), false))
                })
            })?);
            tracing::info!("NBD server listening on unix socket {}", path.display());
        }
        if let Some(addr) = cfg.tcp {
            let err = || bind_err(format!("TCP address {addr}"));
            let l = TcpListener::bind(addr).map_err(err())?;
            let local = l.local_addr().map_err(err())?;
            l.set_nonblocking(true).map_err(err())?;
            server.tcp = Some(local);
            let sh = shared.clone();
            let tls_required = sh.tls.is_some();
            server.acceptors.push(spawn("nbd-accept-tcp", move || {
                accept_loop(&sh, &l, &woken, "TCP", |l| {
                    let (s, _) = l.accept()?;
                    let _ = s.set_nodelay(true);
                    Ok((Sock::Tcp(s), tls_required))
                })
            })?);
            tracing::info!(tls = tls_required, "NBD server listening on TCP {local}");
            if !tls_required {
                // `check` let it through: the configuration asked for it in so many words.
                tracing::warn!(
                    "serving TCP {local} without TLS (--insecure-tcp): anyone who can reach \
                     {local} reads and writes every volume"
                );
            }
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
        // Wake the watchdog (taking its lock first, so the wake cannot fall between its check
        // of `stopping` and its wait).
        drop(self.shared.deadlines.lock());
        self.shared.deadline_added.notify_all();
        // Wake the acceptors: their poll sees the other end of the pair readable.
        if let Err(e) = self.wake.write_all(b"x") {
            // Cannot happen with an empty pair we own; without it the join below would hang.
            tracing::error!("cannot wake the NBD accept threads: {e}");
            return;
        }
        for a in self.acceptors.drain(..) {
            let _ = a.join();
        }
        if let (Some(p), Some(id)) = (&self.unix, self.unix_file) {
            remove_if_ours(p, id);
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

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, Error> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|source| Error::Thread {
            what: name.into(),
            source,
        })
}

/// Close the connections whose handshake deadline passed, until the server stops.
fn watch_handshakes(shared: &Shared) {
    let Ok(mut deadlines) = shared.deadlines.lock() else {
        return;
    };
    while !shared.is_stopping() {
        let now = Instant::now();
        let late: Vec<u64> = deadlines
            .iter()
            .filter(|&(_, &t)| t <= now)
            .map(|(&id, _)| id)
            .collect();
        if !late.is_empty() {
            for id in &late {
                deadlines.remove(id);
            }
            // Shutting the socket down wakes the connection's thread, which then ends (a TLS
            // connection's pump sees it too and closes the plaintext end).
            if let Ok(mut slots) = shared.slots.lock() {
                for id in &late {
                    slots.remove(id);
                }
            }
            if let Ok(live) = shared.live.lock() {
                for id in &late {
                    if let Some(s) = live.get(id) {
                        s.shutdown(Shutdown::Both);
                    }
                }
            }
            let secs = shared.handshake_timeout.as_secs_f64();
            match late.as_slice() {
                [id] => tracing::warn!(
                    conn = id,
                    "handshake not finished within {secs} s: closing the connection"
                ),
                _ => tracing::warn!(
                    connections = late.len(),
                    "handshakes not finished within {secs} s: closing the connections"
                ),
            }
        }
        let next = deadlines.values().min().copied();
        let woken = match next {
            Some(t) => shared
                .deadline_added
                .wait_timeout(deadlines, t.saturating_duration_since(Instant::now()))
                .ok()
                .map(|(g, _)| g),
            None => shared.deadline_added.wait(deadlines).ok(),
        };
        match woken {
            Some(g) => deadlines = g,
            None => return,
        }
    }
}

/// A connection's place under the limit: given back when dropped (its connection ended, was
/// closed by the watchdog, or its thread could not start). Weak: `Shared` holds the slots.
struct Slot(std::sync::Weak<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            shared.open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Shared {
    /// Take a place for a new connection, or `None` at the limit (the refusal is logged, once
    /// per burst).
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let max = self.max_connections;
        let admitted = self
            .open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        let Ok(mut r) = self.refusals.lock() else {
            return admitted.then(|| Slot(Arc::downgrade(self)));
        };
        if admitted {
            if r.reported.take().is_some() {
                tracing::info!(
                    refused = r.count,
                    "accepting connections again (below the limit of {max})"
                );
                r.count = 0;
            }
            return Some(Slot(Arc::downgrade(self)));
        }
        r.count += 1;
        if r.reported
            .is_none_or(|t| t.elapsed() >= REFUSAL_REPORT_EVERY)
        {
            tracing::warn!(
                refused = r.count,
                "connection limit reached ({max} open): refusing new connections (reported at \
                 most every {} s; --max-connections raises the limit)",
                REFUSAL_REPORT_EVERY.as_secs()
            );
            r.count = 0;
            r.reported = Some(Instant::now());
        }
        None
    }
}

/// Accept connections on `listener` (non-blocking) until `woken` becomes readable.
fn accept_loop<L: AsFd>(
    shared: &Arc<Shared>,
    listener: &L,
    woken: &UnixStream,
    what: &str,
    accept: impl Fn(&L) -> io::Result<(Sock, bool)>,
) {
    while wait_for_client(listener, woken, what) {
        // Take every connection waiting: a flood is turned down in one pass.
        while !shared.is_stopping() {
            match accept(listener) {
                Ok((s, tls_required)) => start_connection(shared, s, tls_required),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    accept_failed(&e);
                    break;
                }
            }
        }
    }
}

/// Block until `listener` has a connection to accept (`true`) or `woken` becomes readable,
/// the stop signal (`false`). A failing poll is logged and ends the accept loop.
fn wait_for_client(listener: &impl AsFd, woken: &UnixStream, what: &str) -> bool {
    use rustix::event::{PollFd, PollFlags, poll};
    loop {
        let mut fds = [
            PollFd::new(listener, PollFlags::IN),
            PollFd::new(woken, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => return fds[1].revents().is_empty(),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::error!("NBD server on {what}: poll failed, no longer accepting: {e}");
                return false;
            }
        }
    }
}

fn accept_failed(e: &io::Error) {
    tracing::warn!("accepting a connection failed: {e}");
    // Out of file descriptors and the like: do not spin.
    std::thread::sleep(Duration::from_millis(50));
}

/// Bind a unix socket: a stale socket file (nobody listening) is replaced; a live one is an
/// error. The socket is bound under a temporary name in the same folder, given mode 0600 and
/// renamed into place, so the path never shows a socket others may connect to (`umask` is
/// per process and would race with other threads). It does not block on accept. Returns
/// the listener and the socket file's identity.
fn bind_unix(path: &Path) -> Result<(UnixListener, FileId), Error> {
    let err = || bind_err(format!("unix socket {}", path.display()));
    if let Ok(m) = path.symlink_metadata() {
        if !m.file_type().is_socket() {
            return Err(Error::Config(format!(
                "{} exists and is not a socket: move it out of the way",
                path.display()
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::Config(format!(
                "{} is in use by another server",
                path.display()
            )));
        }
    }
    let name = path
        .file_name()
        .map_or_else(|| "nbd.sock".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    // Left over by an earlier process with our pid: nobody can be serving it.
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).map_err(err())?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| FileId::of(&tmp))
        .and_then(|id| std::fs::rename(&tmp, path).map(|()| id));
    let id = match placed {
        Ok(id) => id,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(err()(e));
        }
    };
    l.set_nonblocking(true).map_err(err())?;
    Ok((l, id))
}

/// Remove the socket file at `path` if it is still the one the server bound: a file someone
/// else put there after removing ours is left alone.
fn remove_if_ours(path: &Path, id: FileId) {
    match FileId::of(path) {
        Ok(now) if now == id => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!("removing the NBD socket {}: {e}", path.display());
            }
        }
        Ok(_) => tracing::warn!(
            "the NBD socket {} was replaced by another file; leaving it",
            path.display()
        ),
        Err(_) => {}
    }
}

/// Run one connection on a thread of its own: the handshake, then transmission (which adds
/// workers as the client keeps requests in flight). Past the connection limit the socket is
/// closed here, on the acceptor's thread, with no thread started.
fn start_connection(shared: &Arc<Shared>, sock: Sock, tls_required: bool) {
    let Some(slot) = shared.admit() else {
        sock.shutdown(Shutdown::Both);
        return;
    };
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let clone = match sock.try_clone() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(conn = id, "cannot set up the connection: {e}");
            return;
        }
    };
    shared
        .live
        .lock()
        .expect("connection table poisoned")
        .insert(id, clone);
    if let Ok(mut slots) = shared.slots.lock() {
        slots.insert(id, slot);
    }
    if let Ok(mut d) = shared.deadlines.lock() {
        d.insert(id, Instant::now() + shared.handshake_timeout);
    }
    shared.deadline_added.notify_one();
    let sh = shared.clone();
    let r = std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            run_connection(&sh, sock, tls_required, id);
            sh.live
                .lock()
                .expect("connection table poisoned")
                .remove(&id);
            if let Ok(mut slots) = sh.slots.lock() {
                slots.remove(&id);
            }
        });
    match r {
        Ok(h) => {
            let mut threads = shared.threads.lock().expect("thread list poisoned");
            threads.retain(|t| !t.is_finished());
            threads.push(h);
        }
        Err(e) => {
            tracing::warn!(conn = id, "cannot start a thread for the connection: {e}");
            if let Ok(mut d) = shared.deadlines.lock() {
                d.remove(&id);
            }
            if let Ok(mut slots) = shared.slots.lock() {
                slots.remove(&id);
            }
            let mut live = shared.live.lock().expect("connection table poisoned");
            if let Some(s) = live.remove(&id) {
                s.shutdown(Shutdown::Both);
            }
        }
    }
}

fn run_connection(shared: &Arc<Shared>, sock: Sock, tls_required: bool, id: u64) {
    // Each read is bounded too, so the thread ends even if the watchdog could not run.
    let _ = sock.set_read_timeout(Some(shared.handshake_timeout));
    let negotiated = negotiate(sock, shared, tls_required);
    // Still there: the watchdog has not closed the connection (nor said so).
    let watched = match shared.deadlines.lock() {
        Ok(mut d) => d.remove(&id).is_some(),
        Err(_) => false,
    };
    let (sock, session) = match negotiated {
        Ok(Outcome::Transmit(s, session)) => (s, session),
        Ok(Outcome::Closed) => return,
        Err(e)
            if watched
                && matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
        {
            tracing::warn!(
                conn = id,
                "handshake not finished within {} s: closing the connection",
                shared.handshake_timeout.as_secs_f64()
            );
            return;
        }
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
        psk_identity = session.identity.as_deref(),
        read_only = session.read_only,
        structured = session.structured,
        flags = session.flags,
        "client connected"
    );
    let conn = match Conn::new(
        sock,
        session,
        id,
        shared.extra_workers.clone(),
        shared.in_flight.clone(),
    ) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use thinpool_engine::{PoolConfig, PoolOptions};

    fn pool(dir: &Path) -> Arc<Pool> {
        let cfg = PoolConfig {
            data_size: 64 << 20,
            metadata_size: 4 << 20,
            ..Default::default()
        };
        Arc::new(Pool::create(dir, &cfg, PoolOptions::default()).unwrap())
    }

    /// A server on `dir/nbd.sock` (and TCP) for a new pool in a folder of its own in `dir`.
    fn serve(dir: &Path, tcp: bool) -> NbdServer {
        let root = (0..)
            .map(|n| dir.join(format!("pool{n}")))
            .find(|p| std::fs::create_dir(p).is_ok())
            .unwrap();
        let cfg = NbdConfig {
            unix_socket: Some(dir.join("nbd.sock")),
            tcp: tcp.then(|| "127.0.0.1:0".parse().unwrap()),
            insecure_tcp: true,
            ..Default::default()
        };
        NbdServer::start(pool(&root), &cfg).unwrap()
    }

    /// The stop used to wake its accept thread by connecting to the socket's path: with the
    /// file gone it waited forever.
    #[test]
    fn stops_with_its_socket_file_removed_and_leaves_another_file_there() {
        for tcp in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let srv = serve(dir.path(), tcp);
            let sock = dir.path().join("nbd.sock");
            std::fs::remove_file(&sock).unwrap();
            std::fs::write(&sock, b"someone else's").unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                srv.stop();
                tx.send(()).unwrap();
            });
            rx.recv_timeout(Duration::from_secs(10))
                .expect("stop did not return within 10 s");
            assert_eq!(std::fs::read(&sock).unwrap(), b"someone else's");
        }
    }

    /// The socket appears at its path with mode 0600 (bound under a temporary name first,
    /// which does not stay behind); a stale socket is replaced, anything else refused.
    #[test]
    fn the_socket_is_private_from_the_start_and_replaces_only_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let stale = UnixListener::bind(&sock).unwrap();
        drop(stale);
        let srv = serve(dir.path(), false);
        let meta = sock.symlink_metadata().unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("sock"))
            .collect();
        assert_eq!(names, ["nbd.sock"]);
        srv.stop();
        std::fs::write(&sock, b"not a socket").unwrap();
        let cfg = NbdConfig {
            unix_socket: Some(sock.clone()),
            ..Default::default()
        };
        let root = dir.path().join("pool-x");
        std::fs::create_dir(&root).unwrap();
        let e = NbdServer::start(pool(&root), &cfg).err().expect("refused");
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&sock).unwrap(), b"not a socket");
    }

    #[test]
    fn stop_removes_its_own_socket_only() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let srv = serve(dir.path(), false);
        assert!(sock.symlink_metadata().unwrap().file_type().is_socket());
        srv.stop();
        assert!(!sock.exists(), "the server's own socket is removed");
        // Another listener put in its place (moved away first, so the inode is not reused).
        let srv = serve(dir.path(), false);
        std::fs::rename(&sock, dir.path().join("old.sock")).unwrap();
        let _other = UnixListener::bind(&sock).unwrap();
        srv.stop();
        assert!(sock.symlink_metadata().unwrap().file_type().is_socket());
    }
}
