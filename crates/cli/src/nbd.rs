//! `thinpool nbd serve`: serve the pool's volumes over NBD until SIGTERM/SIGINT, then commit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Subcommand;
use thinpool_engine::{Pool, PoolOptions};
use thinpool_nbd::{NbdConfig, NbdServer};

#[derive(Subcommand)]
pub enum NbdCommand {
    /// Serve every volume by its name (`nbd+unix:///NAME?socket=ROOT/nbd.sock`); `NAME@ro`
    /// serves it read-only. Runs in the foreground; SIGTERM or SIGINT commits and stops.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Unix socket to listen on (default: ROOT/nbd.sock unless --listen is given).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Also (or only) listen on TCP, e.g. 127.0.0.1:10809. Addresses other than loopback are
    /// refused without TLS.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// TLS certificate chain (PEM): TCP clients must then use TLS (STARTTLS); unix socket
    /// clients may.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// TLS with a pre-shared key file (`identity:hexkey` lines, as nbdkit and qemu use).
    #[arg(long, value_name = "FILE", conflicts_with = "tls_cert")]
    tls_psk: Option<PathBuf>,
    /// Serve every volume read-only.
    #[arg(long)]
    read_only: bool,
    /// Serve snapshots read-only (their origins stay writable).
    #[arg(long)]
    snapshots_read_only: bool,
}

pub fn run(root: &Path, cmd: NbdCommand) -> Result<i32> {
    let NbdCommand::Serve(a) = cmd;
    let socket = match (&a.socket, &a.listen) {
        (Some(s), _) => Some(s.clone()),
        (None, None) => Some(root.join("nbd.sock")),
        (None, Some(_)) => None,
    };
    let cfg = NbdConfig {
        unix_socket: socket,
        tcp: a.listen,
        tls_cert: a.tls_cert,
        tls_key: a.tls_key,
        tls_psk: a.tls_psk,
        read_only: a.read_only,
        snapshots_read_only: a.snapshots_read_only,
    };
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("cannot install signal handlers")?;
    let pool = Arc::new(
        Pool::open(root, PoolOptions::default())
            .with_context(|| format!("cannot open the pool at {}", root.display()))?,
    );
    let server = NbdServer::start(pool.clone(), &cfg)?;
    if let Some(p) = server.unix_socket() {
        eprintln!(
            "thinpool: serving NBD on nbd+unix:///NAME?socket={}",
            p.display()
        );
    }
    if let Some(addr) = server.tcp_addr() {
        eprintln!("thinpool: serving NBD on nbd://{addr}/NAME");
    }
    let sig = signals.forever().next();
    tracing::info!(?sig, "stopping");
    server.stop();
    let pool = Arc::try_unwrap(pool).map_err(|_| anyhow::anyhow!("the pool is still in use"))?;
    pool.close().context("committing the pool on the way out")?;
    Ok(0)
}
