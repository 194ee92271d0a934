//! `thinpool nbd serve`: run the daemon on an existing pool with the NBD front-end, until
//! SIGTERM/SIGINT; then the requests in flight are answered, the pool is committed and closed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use thinpool_daemon::{Daemon, DaemonOptions, ShutdownSignals};
use thinpool_nbd::NbdConfig;

#[derive(Subcommand)]
pub enum NbdCommand {
    /// Serve every volume by its name (`nbd+unix:///NAME?socket=ROOT/nbd.sock`); `NAME@ro`
    /// serves it read-only. Runs in the foreground with the control socket, so `thinpool vol
    /// ...` commands keep working; SIGTERM or SIGINT commits and stops.
    Serve(ServeArgs),
}

/// Where and how to serve NBD (shared by `nbd serve` and `up`).
#[derive(clap::Args, Default)]
pub struct ServeArgs {
    /// Unix socket to listen on (default: ROOT/nbd.sock unless --listen is given).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Also (or only) listen on TCP, e.g. 127.0.0.1:10809. Refused without TLS (--tls-cert or
    /// --tls-psk) unless --insecure-tcp is given.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Serve --listen without TLS: anyone who can reach ADDR:PORT reads and writes every
    /// volume (on loopback, every local user). A warning in the log says so. No effect with
    /// TLS.
    #[arg(long)]
    pub insecure_tcp: bool,
    /// TLS certificate chain (PEM): TCP clients must then use TLS (STARTTLS); unix socket
    /// clients may.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// TLS with a pre-shared key file (`identity:hexkey` lines, as GnuTLS psktool writes and
    /// qemu and nbdkit read).
    #[arg(long, value_name = "FILE", conflicts_with = "tls_cert")]
    pub tls_psk: Option<PathBuf>,
    /// Restrict a PSK identity of --tls-psk to these volumes: it lists and opens only them
    /// (NAME@ro included); other names are unknown to it. Repeat for more identities;
    /// identities not named see every volume.
    #[arg(long, value_name = "IDENTITY=VOL[,VOL...]", value_parser = parse_psk_export)]
    pub psk_exports: Vec<PskExport>,
    /// Serve every volume read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Serve snapshots read-only (their origins stay writable).
    #[arg(long)]
    pub snapshots_read_only: bool,
    /// Serve Prometheus metrics (`GET /metrics`, OpenMetrics text) on this TCP address, e.g.
    /// 127.0.0.1:9464. Loopback only: the endpoint has no authentication.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// NBD connections open at once, over all sockets (default 256). A client past the limit
    /// is closed as soon as it connects; the others are served on.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,
    /// Seconds an NBD client has to finish the handshake before it is closed (default 10).
    /// Connections past the handshake are kept however long they stay idle.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub handshake_timeout: Option<u64>,
}

/// One `--psk-exports IDENTITY=VOL,VOL` value.
#[derive(Clone, Debug, PartialEq)]
pub struct PskExport {
    pub identity: String,
    pub volumes: Vec<String>,
}

/// Parse `IDENTITY=VOL[,VOL...]` (also the TOML key's strings).
pub fn parse_psk_export(s: &str) -> Result<PskExport, String> {
    let Some((identity, list)) = s.split_once('=') else {
        return Err(format!("expected IDENTITY=VOL[,VOL...], found {s:?}"));
    };
    if identity.is_empty() || identity.contains(':') {
        return Err(format!(
            "{s:?}: the PSK identity before '=' must be non-empty, without ':'"
        ));
    }
    let volumes: Vec<String> = list.split(',').map(|v| v.trim().to_string()).collect();
    if volumes.iter().any(String::is_empty) {
        return Err(format!(
            "{s:?}: give one or more volume names after '=', separated by ','"
        ));
    }
    Ok(PskExport {
        identity: identity.to_string(),
        volumes,
    })
}

impl ServeArgs {
    /// The NBD configuration for a pool in `root`.
    pub fn config(self, root: &Path) -> NbdConfig {
        let unix_socket = match (&self.socket, &self.listen) {
            (Some(s), _) => Some(s.clone()),
            (None, None) => Some(root.join("nbd.sock")),
            (None, Some(_)) => None,
        };
        let mut c = NbdConfig {
            unix_socket,
            tcp: self.listen,
            insecure_tcp: self.insecure_tcp,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            tls_psk: self.tls_psk,
            read_only: self.read_only,
            snapshots_read_only: self.snapshots_read_only,
            ..NbdConfig::default()
        };
        for e in self.psk_exports {
            c.psk_exports
                .entry(e.identity)
                .or_default()
                .extend(e.volumes);
        }
        if let Some(n) = self.max_connections {
            c.max_connections = n as usize;
        }
        if let Some(t) = self.handshake_timeout {
            c.handshake_timeout = std::time::Duration::from_secs(t);
        }
        c
    }
}

pub fn run(root: &Path, cmd: NbdCommand) -> Result<i32> {
    let NbdCommand::Serve(a) = cmd;
    let mut opts = DaemonOptions::default();
    opts.metrics = a.metrics;
    opts.nbd = Some(a.config(root));
    serve(root, opts)
}

/// Start the daemon, say where it listens, wait for SIGTERM/SIGINT, stop it.
pub fn serve(root: &Path, mut opts: DaemonOptions) -> Result<i32> {
    // An offline command (`thinpool vol ls` with no daemon) holds the pool's lock for a
    // moment: wait for it rather than refuse to start.
    opts.lock_wait = std::time::Duration::from_secs(10);
    // Before the pool is opened (or made, by `up`).
    if let Some(nbd) = &opts.nbd {
        nbd.check()?;
    }
    let mut signals = ShutdownSignals::install().context("cannot install signal handlers")?;
    let daemon = Daemon::start(root, opts)?;
    if let Some(nbd) = daemon.nbd() {
        if let Some(p) = nbd.unix_socket() {
            eprintln!(
                "thinpool: serving NBD on nbd+unix:///NAME?socket={}",
                p.display()
            );
        }
        if let Some(addr) = nbd.tcp_addr() {
            eprintln!("thinpool: serving NBD on nbd://{addr}/NAME");
        }
    }
    if let Some(f) = daemon.fuse() {
        eprintln!(
            "thinpool: serving volumes as files in {}",
            f.mount_dir().display()
        );
    }
    if let Some(why) = daemon.fuse_unavailable() {
        eprintln!(
            "thinpool: not serving volumes as files: {why}; NBD goes on (--no-fuse skips FUSE)"
        );
    }
    if let Some(addr) = daemon.metrics_addr() {
        eprintln!("thinpool: serving metrics on http://{addr}/metrics");
    }
    eprintln!(
        "thinpool: control socket {} (pid {}); stop with SIGTERM or Ctrl-C",
        daemon.socket_path().display(),
        std::process::id()
    );
    let sig = signals.wait();
    tracing::info!(signal = sig, "stopping");
    // What the daemon mounted is unmounted first; a busy mount keeps it serving (its
    // filesystem needs the volume's file) until it is free or a second signal forces it.
    let mut said = String::new();
    while let Err(busy) = daemon.release_mounts() {
        if busy != said {
            eprintln!(
                "thinpool: not stopping yet: {busy}; still serving until it is free (stop again \
                 to detach it lazily)"
            );
            said = busy;
        }
        if signals
            .wait_timeout(std::time::Duration::from_secs(1))
            .is_some()
        {
            eprintln!("thinpool: stopping anyway: busy mounts are detached lazily");
            break;
        }
    }
    // From here a further signal forces the exit: no drain, no final commit. The pool keeps
    // its last commit, which holds everything clients flushed (the flush path commits); a
    // change the stop was making is never committed half-done, because nothing more is
    // committed at all, and a commit cut short leaves the previous one in place.
    let forcer = std::thread::Builder::new()
        .name("forced-exit".into())
        .spawn(move || {
            let sig = signals.wait();
            let msg = format!(
                "signal {sig} while stopping: exiting now without finishing the stop; the pool \
                 keeps its last commit (all that clients flushed), writes not flushed since are \
                 lost as after a crash, and a mount left behind is cleared by the next start"
            );
            tracing::warn!("{msg}");
            eprintln!("thinpool: {msg}");
            std::process::exit(128 + sig);
        });
    if let Err(e) = forcer {
        tracing::warn!("a further signal cannot force the exit (no thread: {e})");
    }
    daemon
        .stop()
        .context("stopping the daemon (the pool is committed on the way out)")?;
    Ok(0)
}
