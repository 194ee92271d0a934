//! thinpool-daemon: the process that owns a pool while it is in use
//! (`../shared/docs/design.md`, "Layers and data flow").
//!
//! The pool's lock lets one process have it open; the daemon is that process, and everything
//! else reaches the pool through it: the CLI over the control API (`thinpool-control`), and
//! clients of the front-ends it runs.
//!
//! - [`Daemon::start`] opens the pool in a root and serves the control API on
//!   `<root>/control.sock` (mode 0600; peers of another user are refused, root excepted).
//!   [`Daemon::pool`] hands the open pool to front-ends; [`Daemon::stop`] stops serving,
//!   removes the socket, commits and closes the pool.
//! - With [`DaemonOptions::fuse`], every volume is also a file in a FUSE mount
//!   (`thinpool-fuse`; [`Daemon::fuse`]). Where FUSE is unavailable the daemon goes on without
//!   it ([`Daemon::fuse_unavailable`] says why) unless [`DaemonOptions::fuse_required`].
//! - With [`DaemonOptions::metrics`], `GET /metrics` answers in the OpenMetrics text format
//!   on a loopback TCP address ([`Daemon::metrics_addr`]), read from the pool at each scrape.
//! - [`ShutdownSignals`] / [`wait_for_shutdown_signal`]: block until SIGTERM or SIGINT.
//!
//! ```text
//! <root>/control.sock ──accept──▶ one thread per connection ──▶ Arc<Pool>
//!                                  (SO_PEERCRED uid check,       ▲
//!                                   one JSON line in, one out)   └── front-ends (Daemon::pool)
//! ```
//!
//! ```
//! use thinpool_control::Client;
//! use thinpool_daemon::{Daemon, DaemonOptions};
//! use thinpool_engine::{Pool, PoolConfig, PoolOptions};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let cfg = PoolConfig { data_size: 64 << 20, metadata_size: 4 << 20, ..Default::default() };
//! Pool::create(dir.path(), &cfg, PoolOptions::default()).unwrap().close().unwrap();
//!
//! let daemon = Daemon::start(dir.path(), DaemonOptions::default()).unwrap();
//! let mut client = Client::connect(daemon.socket_path()).unwrap();
//! client.create_volume("vol", 16 << 20).unwrap();
//! assert_eq!(daemon.pool().volume_info("vol").unwrap().size, 16 << 20);
//! drop(client);
//! daemon.stop().unwrap();
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod handler;
mod layers;
mod lockholder;
mod metrics;
mod mounts;
mod nbdstop;
mod policy;
mod server;
mod signals;
mod snapshotter;
mod socket;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thinpool_control::Client;
use thinpool_engine::{Pool, PoolConfig, PoolOptions};
use thinpool_fuse::{FuseConfig, FuseServer};
use thinpool_layers::{LayerStore, StoreOptions};
use thinpool_nbd::{NbdConfig, NbdServer};

pub use policy::{Autogrow, DEFAULT_THRESHOLD, MAX_EVENTS, SpacePolicy};
pub use signals::{ShutdownSignals, wait_for_shutdown_signal};

use crate::layers::Layers;
use crate::metrics::MetricsServer;
use crate::mounts::Mounts;
use crate::policy::{Policy, PolicyThread};
use crate::server::ControlServer;

/// Errors of the daemon. Messages say what and where; the engine's error is the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A daemon already serves this root (it answered on the control socket).
    #[error("another thinpool daemon is serving {} (pid {pid})", root.display())]
    AlreadyRunning {
        /// The pool root.
        root: PathBuf,
        /// The other daemon's process id.
        pid: u32,
    },
    /// The pool could not be opened or closed.
    #[error("{what} the pool at {}", root.display())]
    Pool {
        /// What was being done ("opening", "closing").
        what: &'static str,
        /// The pool root.
        root: PathBuf,
        /// The engine's error.
        #[source]
        source: thinpool_engine::Error,
    },
    /// Something that is not a socket sits where the control socket goes.
    #[error("{} exists and is not a socket: move it out of the way", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Setting up the control socket failed.
    #[error("{what} {}", path.display())]
    Socket {
        /// What was being done.
        what: &'static str,
        /// The socket (or its temporary name).
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Probing an existing control socket failed (e.g. it belongs to another user).
    #[error("checking for a daemon on {}", path.display())]
    Probe {
        /// The socket.
        path: PathBuf,
        /// The client's error.
        #[source]
        source: thinpool_control::Error,
    },
    /// [`Daemon::stop`] committed the pool, but other holders of [`Daemon::pool`] keep it
    /// open until they drop their handles.
    #[error(
        "the pool at {} is committed but still held by {holders} other handle(s): it closes \
         when they are dropped",
        root.display()
    )]
    PoolStillShared {
        /// The pool root.
        root: PathBuf,
        /// How many other `Arc<Pool>` are alive.
        holders: usize,
    },
    /// The pool's lock stayed held by another process (not a daemon) for as long as the
    /// daemon waited.
    #[error(
        "the pool at {} is in use: its lock is held by {holder} (waited {secs} s); try again \
         when it is done",
        root.display()
    )]
    LockHeld {
        /// The pool root.
        root: PathBuf,
        /// Who holds it ("thinpool vol ls (pid 123)").
        holder: String,
        /// How long the daemon waited.
        secs: u64,
    },
    /// The NBD server did not stop in time (a client did not read the replies to requests
    /// it had sent): the pool was committed, but the server still holds it until the process
    /// exits.
    #[error(
        "the NBD server did not stop within {secs} s (a client is not reading its replies): \
         the pool at {} is committed and is let go when this process exits",
        root.display()
    )]
    NbdDidNotStop {
        /// The pool root.
        root: PathBuf,
        /// How long the daemon waited.
        secs: u64,
    },
    /// The NBD server could not start.
    #[error(transparent)]
    Nbd(#[from] thinpool_nbd::Error),
    /// The FUSE export could not start.
    #[error(transparent)]
    Fuse(#[from] thinpool_fuse::Error),
    /// Installing the signal handlers failed.
    #[error("installing the SIGTERM/SIGINT handlers")]
    Signals(#[source] std::io::Error),
    /// The metrics address is not a loopback address.
    #[error(
        "metrics address {addr} is not loopback: the metrics endpoint has no authentication and \
         exposes the pool's usage and volume names; bind a loopback address (127.0.0.1 or [::1]) \
         and let a proxy or an agent on this host export it"
    )]
    MetricsNotLoopback {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The metrics endpoint could not listen.
    #[error("serving metrics on {addr}")]
    MetricsBind {
        /// The address asked for.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A space policy setting is refused (the message names the setting and why).
    #[error("{0}")]
    Policy(String),
    /// A thread could not be started.
    #[error("starting the {what} thread")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a daemon runs. Build with `DaemonOptions::default()` and set fields.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct DaemonOptions {
    /// Engine options of the pool (default: the engine's, with its 1 s commit timer).
    pub pool: PoolOptions,
    /// Serve the pool's volumes over NBD (see `thinpool-nbd`).
    pub nbd: Option<NbdConfig>,
    /// Serve every volume as a file in a FUSE mount (see `thinpool-fuse`).
    pub fuse: Option<FuseConfig>,
    /// Fail to start when FUSE is unavailable (the user asked for the mount); otherwise the
    /// daemon goes on without it. A bad mount folder fails either way.
    pub fuse_required: bool,
    /// Create the pool with this configuration when the root has none yet (no `pool/`
    /// folder). A root whose `pool/` lacks a file is an error, never re-created.
    pub create: Option<PoolConfig>,
    /// Serve `GET /metrics` (OpenMetrics text) on this TCP address; loopback only, port 0
    /// picks a free port ([`Daemon::metrics_addr`]).
    pub metrics: Option<SocketAddr>,
    /// Size of the layer store's base device when it is made (default: 10 GiB, Docker's).
    pub base_size: Option<u64>,
    /// Serve containerd's snapshots API (a proxy snapshotter over the layer store) on this
    /// unix socket (mode 0600); usually `ROOT/`[`SNAPSHOTTER_SOCKET`].
    pub snapshotter: Option<PathBuf>,
    /// How long to wait for the pool's lock when a process that is not a daemon holds it
    /// (an offline CLI command, which lets go within moments). Zero: refuse at once.
    pub lock_wait: std::time::Duration,
    /// What to do when the pool fills: low-water events, autogrow (see [`SpacePolicy`]).
    /// Checked before the pool is opened or created, and against it once open.
    pub space: SpacePolicy,
}

/// The file name of containerd's snapshotter socket in a pool root.
pub const SNAPSHOTTER_SOCKET: &str = "containerd-snapshotter.sock";

/// Open the pool, waiting up to `opts.lock_wait` while a process that is not a daemon holds
/// its lock. Says once whom it waits for; after the wait, the error names the holder.
fn open_waiting(root: &Path, socket_path: &Path, opts: &DaemonOptions) -> Result<Pool> {
    let deadline = std::time::Instant::now() + opts.lock_wait;
    let mut said = false;
    loop {
        let e = match Pool::open(root, opts.pool.clone()) {
            Ok(p) => {
                if said {
                    tracing::warn!(root = %root.display(), "got the pool's lock");
                }
                return Ok(p);
            }
            Err(e) => e,
        };
        if e.kind() != thinpool_engine::ErrorKind::Busy {
            return Err(Error::Pool {
                what: "opening",
                root: root.to_path_buf(),
                source: e,
            });
        }
        if let Ok(Some(c)) = Client::connect_if_running(socket_path) {
            return Err(Error::AlreadyRunning {
                root: root.to_path_buf(),
                pid: c.daemon().pid,
            });
        }
        let holder = lockholder::describe(&root.join("lock"));
        if std::time::Instant::now() >= deadline {
            return Err(match holder {
                Some(holder) if !opts.lock_wait.is_zero() => Error::LockHeld {
                    root: root.to_path_buf(),
                    holder,
                    secs: opts.lock_wait.as_secs(),
                },
                _ => Error::Pool {
                    what: "opening",
                    root: root.to_path_buf(),
                    source: e,
                },
            });
        }
        if !said {
            said = true;
            tracing::warn!(
                "waiting up to {} s for {} holding the lock of the pool at {}",
                opts.lock_wait.as_secs(),
                holder.as_deref().unwrap_or("another process"),
                root.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A running daemon: the open pool and its control server. Dropping it stops it as
/// [`Daemon::stop`] does, logging errors instead of returning them.
pub struct Daemon {
    root: PathBuf,
    socket_path: PathBuf,
    /// `Some` until stopped.
    pool: Option<Arc<Pool>>,
    /// `Some` until stopped.
    server: Option<ControlServer>,
    nbd: Option<NbdServer>,
    /// The NBD server did not stop in time and still holds the pool.
    nbd_stuck: bool,
    fuse: Option<FuseServer>,
    /// What this daemon attached and mounted (and its record, `ROOT/mounts.json`).
    mounts: Arc<Mounts>,
    /// The layer store, once open.
    layers: Arc<Layers>,
    /// containerd's snapshotter socket, when served.
    snapshotter: Option<thinpool_snapshotter::Server>,
    /// Why FUSE is not served, when it was asked for and is unavailable.
    fuse_unavailable: Option<String>,
    metrics: Option<MetricsServer>,
    policy: Arc<Policy>,
    policy_thread: Option<PolicyThread>,
}

impl Daemon {
    /// Open the pool in `root` and serve the control API on `<root>/control.sock`.
    ///
    /// Blocks while the pool opens (catalog reconciliation included). Fails with
    /// [`Error::AlreadyRunning`] when another daemon answers on the socket,
    /// [`Error::Pool`] when the pool cannot be opened (no pool, or its lock is held by a
    /// process that is not a daemon, such as a CLI command in progress),
    /// [`Error::NotASocket`] when something else sits at the socket's path. A stale socket
    /// (nobody answers on it) is replaced.
    pub fn start(root: &Path, opts: DaemonOptions) -> Result<Daemon> {
        if let Some(addr) = opts.metrics {
            // Before anything is opened or created.
            metrics::check_loopback(addr)?;
        }
        opts.space.check()?;
        if let Some(cfg) = &opts.create
            && !root.join("pool").exists()
        {
            // A refused policy leaves no new pool behind.
            opts.space.check_new(cfg)?;
        }
        let policy = Policy::new(opts.space);
        let socket_path = thinpool_control::socket_path(root);
        if let Some(cfg) = &opts.create
            && !root.join("pool").exists()
        {
            let pool =
                Pool::create(root, cfg, opts.pool.clone()).map_err(|source| Error::Pool {
                    what: "creating",
                    root: root.to_path_buf(),
                    source,
                })?;
            tracing::info!(
                root = %root.display(),
                data_size = cfg.data_size,
                metadata_size = cfg.metadata_size,
                block_size = cfg.block_size,
                "created a new pool"
            );
            pool.close().map_err(|source| Error::Pool {
                what: "creating",
                root: root.to_path_buf(),
                source,
            })?;
        }
        let pool = match open_waiting(root, &socket_path, &opts) {
            Ok(p) => {
                // Docker's loop files filled /var/lib/docker without a word: say it up front.
                if let Some(s) = p.host_space_shortfall() {
                    tracing::warn!(
                        "the pool's sparse files may grow by {} bytes but their file system (holding {}) has {} bytes free: writes will fail with ENOSPC before the pool is full",
                        s.may_take,
                        s.path.display(),
                        s.free
                    );
                }
                p
            }
            Err(e) => return Err(e),
        };
        // We hold the pool's lock, so a daemon answering here would be serving a pool it
        // does not hold: refuse rather than take its socket away.
        match Client::connect_if_running(&socket_path) {
            Ok(None) => {}
            Ok(Some(c)) => {
                let pid = c.daemon().pid;
                drop(c);
                let _ = pool.close();
                return Err(Error::AlreadyRunning {
                    root: root.to_path_buf(),
                    pid,
                });
            }
            Err(source) => {
                let _ = pool.close();
                return Err(Error::Probe {
                    path: socket_path,
                    source,
                });
            }
        }
        let pool = Arc::new(pool);
        let mounts = Arc::new(Mounts::load(root));
        let layers = Arc::new(Layers::default());
        let server = match ControlServer::start(
            pool.clone(),
            mounts.clone(),
            layers.clone(),
            policy.clone(),
            root,
            &socket_path,
        ) {
            Ok(s) => s,
            Err(e) => {
                if let Ok(p) = Arc::try_unwrap(pool) {
                    let _ = p.close();
                }
                return Err(e);
            }
        };
        let mut daemon = Daemon {
            root: root.to_path_buf(),
            socket_path,
            pool: Some(pool),
            server: Some(server),
            nbd: None,
            nbd_stuck: false,
            fuse: None,
            mounts,
            layers,
            snapshotter: None,
            fuse_unavailable: None,
            metrics: None,
            policy,
            policy_thread: None,
        };
        // Checked against the open pool before anything is served; on failure dropping the
        // daemon stops the control server and closes the pool.
        daemon.policy_thread = Some(PolicyThread::start(daemon.pool(), daemon.policy.clone())?);
        if let Some(cfg) = &opts.nbd {
            // On failure, dropping the daemon stops the control server and closes the pool.
            let nbd = NbdServer::start(daemon.pool(), cfg)?;
            if let Some(s) = &daemon.server {
                s.set_nbd(nbd.unix_socket(), nbd.tcp_addr());
            }
            daemon.nbd = Some(nbd);
        }
        if let Some(cfg) = &opts.fuse {
            // Filesystems and loop devices a killed daemon left over its dead export go first,
            // so that the export mounts again and what was mounted is mounted over it anew.
            // (By the folder's real path: the kernel names a loop device's file so.)
            let stale_dir = cfg.mount_dir.canonicalize();
            daemon
                .mounts
                .clear_stale(stale_dir.as_deref().unwrap_or(&cfg.mount_dir));
            match FuseServer::start(daemon.pool(), cfg) {
                Ok(f) => {
                    daemon.mounts.restore(&daemon.pool(), f.mount_dir());
                    daemon.fuse = Some(f);
                }
                Err(e) if e.is_unavailable() && !opts.fuse_required => {
                    tracing::warn!("not serving volumes as files: {e}");
                    daemon.mounts.set_unserved(e.to_string());
                    daemon.fuse_unavailable = Some(e.to_string());
                }
                Err(e) => return Err(e.into()),
            }
        }
        let store = StoreOptions {
            files: daemon.fuse.as_ref().map(|f| f.mount_dir().to_path_buf()),
            base_size: opts.base_size.unwrap_or(thinpool_layers::DEFAULT_BASE_SIZE),
        };
        match LayerStore::open(daemon.pool(), store) {
            Ok(s) => {
                let s = Arc::new(s);
                daemon.layers.set(s.clone());
                if let Some(path) = &opts.snapshotter {
                    let adapter = Arc::new(snapshotter::Adapter(s));
                    let server =
                        thinpool_snapshotter::Server::start(path, adapter).map_err(|source| {
                            Error::Socket {
                                what: "serving containerd's snapshots API on",
                                path: path.clone(),
                                source,
                            }
                        })?;
                    tracing::info!(socket = %path.display(), "serving containerd's snapshots API");
                    daemon.snapshotter = Some(server);
                }
            }
            Err(e) => tracing::error!("the layer store did not open: {e}"),
        }
        if let Some(addr) = opts.metrics {
            daemon.metrics = Some(MetricsServer::start(
                daemon.pool(),
                daemon.policy.clone(),
                addr,
            )?);
        }
        tracing::info!(
            root = %root.display(),
            socket = %daemon.socket_path.display(),
            pid = std::process::id(),
            "daemon started"
        );
        Ok(daemon)
    }

    /// The open pool, for front-ends. Hand clones back (drop them) before [`Daemon::stop`].
    pub fn pool(&self) -> Arc<Pool> {
        self.pool
            .clone()
            .expect("the pool stays open until the daemon is stopped")
    }

    /// The NBD server, when one was asked for.
    pub fn nbd(&self) -> Option<&NbdServer> {
        self.nbd.as_ref()
    }

    /// The FUSE export, when one was asked for and is served.
    pub fn fuse(&self) -> Option<&FuseServer> {
        self.fuse.as_ref()
    }

    /// Why the FUSE export asked for is not served (FUSE unavailable here), if so.
    pub fn fuse_unavailable(&self) -> Option<&str> {
        self.fuse_unavailable.as_deref()
    }

    /// The address the metrics endpoint listens on, when one was asked for (with the real
    /// port when port 0 was given).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::addr)
    }

    /// The pool root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The control socket (`<root>/control.sock`).
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Unmount and detach what this daemon mounted and attached (it stays recorded, so the
    /// next start mounts it again). A busy mount stops this with a message naming who uses
    /// it (what was done so far stays done); call again when it is free, or stop anyway
    /// ([`Daemon::stop`] detaches busy mounts lazily).
    pub fn release_mounts(&self) -> std::result::Result<(), String> {
        self.mounts.release(false)
    }

    /// Stop: unmount what it mounted (lazily when busy), unmount the volumes' files, stop NBD, refuse new control connections, close the
    /// open ones (a request in progress finishes first), remove the socket, then commit and
    /// close the pool. Blocks until all of that is done. Fails with [`Error::PoolStillShared`] (after committing) when clones
    /// of [`Daemon::pool`] are still alive.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        // Front-ends first: the requests they already read are answered, then they let go
        // of the pool. The volumes' files are unmounted before the pool closes, and the
        // filesystems over them before that.
        if self.fuse.is_some()
            && let Err(busy) = self.mounts.release(true)
        {
            tracing::warn!("{busy}");
        }
        if let Some(server) = self.snapshotter.take() {
            server.stop();
        }
        if let Some(store) = self.layers.take() {
            store.release_loops();
        }
        if let Some(fuse) = self.fuse.take() {
            fuse.stop();
        }
        if let Some(nbd) = self.nbd.take()
            && !nbdstop::stop(nbd)
        {
            self.nbd_stuck = true;
        }
        if let Some(policy) = self.policy_thread.take() {
            policy.stop();
        }
        if let Some(metrics) = self.metrics.take() {
            metrics.stop();
        }
        if let Some(server) = self.server.take() {
            server.stop();
        }
        let Some(pool) = self.pool.take() else {
            return Ok(());
        };
        let r = match Arc::try_unwrap(pool) {
            Ok(p) => p.close().map_err(|source| Error::Pool {
                what: "closing",
                root: self.root.clone(),
                source,
            }),
            Err(shared) => match shared.commit() {
                Ok(()) if self.nbd_stuck => Err(Error::NbdDidNotStop {
                    root: self.root.clone(),
                    secs: nbdstop::NBD_STOP_TIMEOUT.as_secs(),
                }),
                Ok(()) => Err(Error::PoolStillShared {
                    root: self.root.clone(),
                    holders: Arc::strong_count(&shared) - 1,
                }),
                Err(source) => Err(Error::Pool {
                    what: "committing",
                    root: self.root.clone(),
                    source,
                }),
            },
        };
        tracing::info!(root = %self.root.display(), ok = r.is_ok(), "daemon stopped");
        r
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!("stopping the daemon for {}: {e}", self.root.display());
        }
    }
}
