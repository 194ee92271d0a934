//! thinpool's NBD server: every volume of a pool exported by name to real NBD clients
//! (qemu, libnbd tools, fio, the kernel's nbd-client).
//!
//! Protocol: the NBD project's `doc/proto.md`, fixed-newstyle only. Handshake options
//! `EXPORT_NAME`, `ABORT`, `LIST`, `STARTTLS`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT`/`SET_META_CONTEXT` (`base:allocation`); commands `READ` (structured
//! replies with hole chunks), `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES` (`NO_HOLE`,
//! `FAST_ZERO`), `CACHE`, `BLOCK_STATUS`, `DISC`, with `FUA`. Many requests in flight per
//! connection, answered as they finish; many connections (flush is global, so
//! `CAN_MULTI_CONN`).
//!
//! Export names: a volume's name serves it read-write (read-only with `--read-only`);
//! `NAME@ro` serves it read-only; an empty name picks the only volume of a one-volume pool.
//!
//! Who can reach what: the unix socket is its owner's only (mode 0600). TCP is served with TLS
//! (a certificate, or pre-shared keys), or without it only when the configuration says so in
//! so many words ([`NbdConfig::insecure_tcp`]): anyone who can connect to the port, loopback
//! included, would read and write every volume. A PSK identity may be restricted to some
//! volumes ([`NbdConfig::psk_exports`]): it lists and opens those only.

#![forbid(unsafe_code)]
// NBD is big-endian on the wire: big-endian conversions are the norm here.
#![allow(clippy::big_endian_bytes)]
#![deny(clippy::little_endian_bytes)]

pub mod proto;

mod handshake;
mod server;
mod sock;
mod tls;
mod transmit;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use server::NbdServer;

/// Connections served at once unless configured ([`NbdConfig::max_connections`]).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// Time a client has to finish the handshake unless configured
/// ([`NbdConfig::handshake_timeout`]).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// Unix socket path (created mode 0600; a stale file is replaced).
    pub unix_socket: Option<PathBuf>,
    /// TCP address. Served with TLS, or without it only with [`NbdConfig::insecure_tcp`].
    pub tcp: Option<SocketAddr>,
    /// Serve TCP without TLS: anyone who can reach the address (every local user on
    /// loopback) reads and writes every volume. Without TLS, TCP is refused unless this is
    /// set; with it, a warning says so when the server starts. No effect with TLS.
    pub insecure_tcp: bool,
    /// TLS certificate chain (PEM). With TLS configured, TCP clients must use STARTTLS; unix
    /// socket clients may.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// TLS with pre-shared keys instead of a certificate: `identity:hexkey` lines.
    pub tls_psk: Option<PathBuf>,
    /// PSK identities restricted to some volumes (identity → volume names). Such an identity
    /// sees only these in `NBD_OPT_LIST` and gets `NBD_REP_ERR_UNKNOWN` for any other name
    /// (`NAME@ro` of a listed volume is allowed; snapshots are volumes of their own). An
    /// identity not named here sees every volume. Each identity must have a key in
    /// [`NbdConfig::tls_psk`]. Clients on the unix socket that do not start TLS are not
    /// restricted (the socket is its owner's only).
    pub psk_exports: BTreeMap<String, Vec<String>>,
    /// Every export read-only.
    pub read_only: bool,
    /// Snapshots read-only (their origins stay writable).
    pub snapshots_read_only: bool,
    /// Connections open at once, handshaking or established, over both sockets. A client
    /// past the limit is closed as soon as it is accepted (no thread is started for it) and
    /// the server goes on serving the others. Each connection has one thread, and up to
    /// 16 while its client keeps that many requests in flight (4 096 such extra threads at most
    /// over all connections), and at most 64 MiB of request data in flight (1 GiB over all
    /// connections): past that the server stops reading the client's socket until replies
    /// have gone out.
    pub max_connections: usize,
    /// A client that has not picked an export by then (`NBD_OPT_GO`/`EXPORT_NAME`) is closed,
    /// however it trickles bytes. Established connections have no idle limit: NBD clients
    /// (the kernel's, qemu's) keep a connection open without traffic for as long as the
    /// device is in use, and the connection limit bounds what they hold.
    pub handshake_timeout: Duration,
}

impl Default for NbdConfig {
    fn default() -> NbdConfig {
        NbdConfig {
            unix_socket: None,
            tcp: None,
            insecure_tcp: false,
            tls_cert: None,
            tls_key: None,
            tls_psk: None,
            psk_exports: BTreeMap::new(),
            read_only: false,
            snapshots_read_only: false,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

impl NbdConfig {
    /// Refuse a configuration that cannot or must not be served, without touching a file or
    /// a socket (so a caller can check before it opens or creates a pool).
    /// [`NbdServer::start`] checks it again, and then reads the TLS files.
    pub fn check(&self) -> Result<(), Error> {
        let refuse = |m: String| Err(Error::Config(m));
        if self.unix_socket.is_none() && self.tcp.is_none() {
            return refuse("give a unix socket, a TCP address or both".into());
        }
        if self.max_connections == 0 {
            return refuse("the connection limit must be at least 1".into());
        }
        if self.handshake_timeout.is_zero() {
            return refuse("the handshake timeout must be more than 0".into());
        }
        let cert = self.tls_cert.is_some() || self.tls_key.is_some();
        if cert && self.tls_psk.is_some() {
            return refuse(
                "give either a certificate (--tls-cert/--tls-key) or a PSK file (--tls-psk), \
                 not both"
                    .into(),
            );
        }
        if cert && (self.tls_cert.is_none() || self.tls_key.is_none()) {
            return refuse(
                "TLS needs both a certificate (--tls-cert) and its key (--tls-key)".into(),
            );
        }
        let tls = cert || self.tls_psk.is_some();
        if let Some(addr) = self.tcp
            && !tls
            && !self.insecure_tcp
        {
            return refuse(format!(
                "refusing to listen on {addr} without TLS: anyone who can reach it (on loopback, \
                 every local user) could read and write every volume; give --tls-cert/--tls-key \
                 or --tls-psk, use the unix socket (its owner's only), or say --insecure-tcp to \
                 serve it so anyway"
            ));
        }
        if !self.psk_exports.is_empty() && self.tls_psk.is_none() {
            return refuse("--psk-exports restricts PSK identities: it needs --tls-psk".into());
        }
        if let Some((id, _)) = self.psk_exports.iter().find(|(_, v)| v.is_empty()) {
            return refuse(format!("--psk-exports: PSK identity {id} has no volumes"));
        }
        Ok(())
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket could not be bound.
    #[error("cannot listen on {what}")]
    Bind {
        /// Which socket.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A TLS file is unusable.
    #[error("TLS file {}: {message}", path.display())]
    Tls {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The configuration is refused.
    #[error("{0}")]
    Config(String),
    /// A thread of the server itself could not be started.
    #[error("cannot start the {what} thread")]
    Thread {
        /// Which thread.
        what: String,
        /// Why (usually out of memory or of the thread limit).
        #[source]
        source: std::io::Error,
    },
}
