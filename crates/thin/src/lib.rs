//! thinpool-thin: the Linux kernel's dm-thin metadata (v2), read and written byte for byte.
//!
//! Layer above `thinpool-pdata` (see `../shared/docs/design.md`). It gives the pool engine a
//! writable API ([`metadata::ThinMetadata`]: create thin devices and snapshots, map and unmap
//! blocks, commit in the kernel's order, metadata snapshots, growing) and holds the logic of the
//! `thinpool meta` toolbox: dump, restore, check, repair, ls, delta, size.
//!
//! - [`superblock`]: the superblock, device details and mapping values;
//! - [`metadata`]: [`ThinMetadata`], the writable API over `thinpool-pdata`;
//! - [`ir`]: the event stream between readers and writers of a pool's content, with
//!   [`xml`] and [`json`] writers, the XML reader, [`dump`] and [`restore`];
//! - [`check`], [`ls`], [`delta`], [`repair`], [`size`]: the toolbox, each reading metadata
//!   independently of [`metadata`] so that damaged pools can still be examined.
//!
//! ```
//! use std::sync::Arc;
//! use thinpool_io::FileDevice;
//! use thinpool_thin::{ThinId, ThinMetadata};
//! let path = std::env::temp_dir().join(format!("thin-doc-{}", std::process::id()));
//! let dev = Arc::new(FileDevice::create(&path, 4 << 20).unwrap());
//! // 64 KiB data blocks, 1000 of them.
//! let mut md = ThinMetadata::format(dev, 128, 1000).unwrap();
//! let origin = ThinId::new(0).unwrap();
//! md.create_thin(origin).unwrap();
//! let b = md.alloc_data_block().unwrap().unwrap();
//! md.insert_block(origin, 7, b).unwrap();
//! md.create_snap(ThinId::new(1).unwrap(), origin).unwrap();
//! // The block is now shared: a write to it must copy.
//! assert!(md.find_block(origin, 7).unwrap().unwrap().shared);
//! md.commit().unwrap();
//! std::fs::remove_file(&path).unwrap();
//! ```

#![forbid(unsafe_code)]

pub mod check;
pub mod delta;
pub mod dump;
pub mod ir;
pub mod json;
pub mod ls;
pub mod metadata;
pub mod repair;
pub mod restore;
pub mod size;
mod staged;
pub mod superblock;
mod walk;
pub mod xml;

pub use metadata::{ThinId, ThinMetadata};
pub use thinpool_pdata::Error as PdataError;

/// Errors of the thin metadata layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A fault of the persistent-data layer (names the block).
    #[error(transparent)]
    Pdata(#[from] thinpool_pdata::Error),
    /// Device I/O failed.
    #[error(transparent)]
    Io(#[from] thinpool_io::Error),
    /// The superblock is not a usable dm-thin superblock.
    #[error("superblock (metadata block 0): {0}")]
    BadSuperblock(String),
    /// The metadata contradicts itself.
    #[error("inconsistent metadata: {0}")]
    Inconsistent(String),
    /// No such thin device.
    #[error("thin device {0} does not exist")]
    NoSuchDevice(u32),
    /// The device id is taken.
    #[error("thin device {0} already exists")]
    DeviceExists(u32),
    /// Bad argument (id out of range, wrong transaction id, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A metadata snapshot is already held / none is held.
    #[error("{0}")]
    MetadataSnap(String),
    /// No free data block.
    #[error("no free data block (all {0} in use)")]
    NoDataSpace(u64),
    /// The open transaction failed part-way and must be aborted before anything is committed.
    #[error(
        "the open metadata transaction failed part-way ({0}): it must be aborted, not committed"
    )]
    Tainted(String),
    /// Writing to a read-only metadata handle.
    #[error("metadata is open read-only")]
    ReadOnly,
    /// Reading XML or other input failed.
    #[error("{0}")]
    Input(String),
    /// Output failed.
    #[error("writing output failed")]
    Output(#[source] std::io::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
