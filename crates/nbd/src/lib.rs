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
    /// TCP address. Non-loopback addresses need TLS.
    pub tcp: Option<SocketAddr>,
    /// TLS certificate chain (PEM). With TLS configured, TCP clients must use STARTTLS; unix
    /// socket clients may.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// TLS with pre-shared keys instead of a certificate: `identity:hexkey` lines.
    pub tls_psk: Option<PathBuf>,
    /// Every export read-only.
    pub read_only: bool,
    /// Snapshots read-only (their origins stay writable).
    pub snapshots_read_only: bool,
    /// Connections open at once, handshaking or established, over both sockets. A client
    /// past the limit is closed as soon as it is accepted (no thread is started for it) and
    /// the server goes on serving the others. Each connection has one thread, and up to
    /// 16 while its client keeps that many requests in flight (4 096 such extra threads at most
    /// over all connections).
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
            tls_cert: None,
            tls_key: None,
            tls_psk: None,
            read_only: false,
            snapshots_read_only: false,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket could not be bound.
    #[error("cannot listen on {what}: {source}")]
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
