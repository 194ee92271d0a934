//! How a command reaches the pool: through the daemon that holds it, when one answers on
//! `<root>/control.sock`, or else by opening the pool itself for the one command.
//!
//! Both ways give the same answers in the same types (`thinpool-control`'s mirrors of the
//! engine's), so what a command prints does not depend on the way taken.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thinpool_control::{Client, PoolStatus, Resized, VolumeInfo};
use thinpool_engine::Pool;

/// The daemon serving the pool at `root`, if one answers on its control socket. A socket
/// nobody answers on (left by a daemon that died) counts as no daemon.
pub fn daemon(root: &Path) -> Result<Option<Client>> {
    let path = thinpool_control::socket_path(root);
    Client::connect_if_running(&path).with_context(|| {
        format!(
            "looking for a daemon serving the pool at {}",
            root.display()
        )
    })
}

/// Where a command's operations go.
pub enum Target<'a> {
    /// A running daemon.
    Daemon(&'a mut Client),
    /// The pool, opened by this command.
    Local(&'a Pool),
}

/// An engine answer as the control protocol would carry it.
pub fn mirror<E: Serialize, C: DeserializeOwned>(v: E) -> Result<C> {
    let value = serde_json::to_value(&v).context("encoding the engine's answer")?;
    serde_json::from_value(value).context("decoding the engine's answer")
}

impl Target<'_> {
    /// The process id of the daemon this target goes through; `None` for a pool opened here.
    pub fn daemon_pid(&self) -> Option<u32> {
        match self {
            Target::Daemon(c) => Some(c.daemon().pid),
            Target::Local(_) => None,
        }
    }

    /// The pool's status.
    pub fn status(&mut self) -> Result<PoolStatus> {
        match self {
            Target::Daemon(c) => Ok(c.pool_status()?),
            Target::Local(p) => mirror(p.status()?),
        }
    }

    /// Every volume, by name.
    pub fn volumes(&mut self) -> Result<Vec<VolumeInfo>> {
        match self {
            Target::Daemon(c) => Ok(c.volumes()?),
            Target::Local(p) => mirror(p.volumes()?),
        }
    }

    /// One volume.
    pub fn volume_info(&mut self, name: &str) -> Result<VolumeInfo> {
        match self {
            Target::Daemon(c) => Ok(c.volume_info(name)?),
            Target::Local(p) => mirror(p.volume_info(name)?),
        }
    }

    /// Create an empty volume.
    pub fn create_volume(&mut self, name: &str, size: u64) -> Result<VolumeInfo> {
        match self {
            Target::Daemon(c) => Ok(c.create_volume(name, size)?),
            Target::Local(p) => mirror(p.create_volume(name, size)?),
        }
    }

    /// Snapshot a volume.
    pub fn snapshot(&mut self, origin: &str, name: &str) -> Result<VolumeInfo> {
        match self {
            Target::Daemon(c) => Ok(c.snapshot(origin, name)?),
            Target::Local(p) => mirror(p.snapshot(origin, name)?),
        }
    }

    /// Remove a volume.
    pub fn remove_volume(&mut self, name: &str) -> Result<()> {
        match self {
            Target::Daemon(c) => Ok(c.remove_volume(name)?),
            Target::Local(p) => Ok(p.remove_volume(name)?),
        }
    }

    /// Resize a volume. Filesystems are the daemon's business: without one, a volume holding
    /// a filesystem is resized as any other, and `resize_fs` is refused.
    pub fn resize_volume(&mut self, name: &str, size: u64, resize_fs: bool) -> Result<Resized> {
        match self {
            Target::Daemon(c) => Ok(c.resize_volume(name, size, resize_fs)?),
            Target::Local(p) => {
                if resize_fs {
                    anyhow::bail!(
                        "--resize-fs needs the daemon (it serves the volume's file that e2fsck \
                         and resize2fs work on): start `thinpool up`"
                    );
                }
                let old_size = p.volume_info(name)?.size;
                p.resize_volume(name, size)?;
                Ok(Resized {
                    old_size,
                    new_size: size,
                    filesystem: None,
                })
            }
        }
    }

    /// Grow the pool's devices.
    pub fn grow(&mut self, data_size: Option<u64>, metadata_size: Option<u64>) -> Result<()> {
        match self {
            Target::Daemon(c) => Ok(c.grow(data_size, metadata_size)?),
            Target::Local(p) => Ok(p.grow(data_size, metadata_size)?),
        }
    }
}
