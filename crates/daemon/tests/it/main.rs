//! The daemon in-process: a pool created in a temporary root, a [`Daemon`] started on it, and
//! [`Client`]s talking to it over the real socket.
//!
//! - `mirror`: the control crate's copies of the engine's answer types give the same JSON and
//!   the same kernel status line as the engine's own (the CLI prints either).
//! - `metrics`: `GET /metrics` over TCP agrees with the I/O done and with the pool's status;
//!   other paths and non-loopback addresses are refused.
//! - `server`: starting twice, stale and foreign files at the socket's path, the socket's mode,
//!   bad requests, concurrent clients, stopping with clients connected.

mod metrics;
mod mirror;
mod server;

use std::path::Path;

use thinpool_engine::{Pool, PoolConfig, PoolOptions};

/// A 64 MiB / 4 MiB pool in `root`, created and closed.
pub fn make_pool(root: &Path) {
    let cfg = PoolConfig {
        data_size: 64 << 20,
        metadata_size: 4 << 20,
        ..Default::default()
    };
    Pool::create(root, &cfg, PoolOptions::default())
        .expect("create a pool")
        .close()
        .expect("close the new pool");
}
