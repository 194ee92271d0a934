//! thinpool-engine: the pool engine — thin volumes and snapshots with the kernel's dm-thin
//! semantics, in user space (format spec part 3; `../shared/docs/design.md`).
//!
//! Layer above `thinpool-thin` (metadata) and `thinpool-io` (devices). Front-ends (NBD, FUSE,
//! CLI) use only this crate's API: [`Pool`] (create/open a pool in a root directory, volumes,
//! status, growth, commits) and [`Volume`] (reads, writes, discards, write-zeroes, flushes).
//!
//! ```text
//! <root>/pool/data       data device: sparse file, or a symlink to a block device
//! <root>/pool/metadata   metadata device (dm-thin v2 format)
//! <root>/volumes.json    names, sizes, parents, kinds; tagged with the transaction id
//! <root>/volumes.journal changes since volumes.json, appended (catalogs of 1 024+ volumes)
//! <root>/lock            held by the one process that has the pool open
//! ```
//!
//! Concurrency: metadata changes and lookups go through one mutex that guards only the
//! B-trees (as the kernel's `pmd->root_lock`); data I/O runs outside it. Overlapping requests
//! on the same virtual block are ordered by a per-block lock table (the kernel's bio prison);
//! a snapshot briefly quiesces its origin.
//!
//! ```
//! use thinpool_engine::{Pool, PoolConfig, PoolOptions};
//! let dir = tempfile::tempdir().unwrap();
//! let cfg = PoolConfig { data_size: 64 << 20, metadata_size: 4 << 20, ..Default::default() };
//! let pool = Pool::create(dir.path(), &cfg, PoolOptions::default()).unwrap();
//! pool.create_volume("vol", 16 << 20).unwrap();
//! let v = pool.open_volume("vol").unwrap();
//! v.write_at(b"hello", 4096).unwrap();
//! let mut buf = [0u8; 5];
//! v.read_at(&mut buf, 4096).unwrap();
//! assert_eq!(&buf, b"hello");
//! drop(v);
//! pool.close().unwrap();
//! ```

#![forbid(unsafe_code)]

mod catalog;
mod config;
mod datadev;
mod pool;
mod prison;
mod private;
mod stats;
mod volume;
mod zeroed;

use std::path::PathBuf;

pub use catalog::VolumeKind;
pub use config::{PoolConfig, PoolOptions};
pub use datadev::{MoveReport, MoveStage};
pub use pool::{
    HostShortfall, Labels, MAX_METADATA_SIZE, Pool, PoolMode, PoolStatus, SpaceUsage, VolumeInfo,
};
pub use stats::{COMMIT_BUCKETS_MS, IoOp, OpStats, PoolStats};
pub use volume::Volume;

/// What kind of failure an [`Error`] is: what callers match on (NBD errno, exit status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The pool (data or metadata) is full.
    NoSpace,
    /// Metadata is damaged.
    Corrupt,
    /// A device failed.
    Io,
    /// No such volume or pool.
    NotFound,
    /// The name or pool already exists.
    Exists,
    /// In use (open volume, pool locked by another process).
    Busy,
    /// The pool is read-only (after a metadata failure, or out of metadata space).
    ReadOnly,
    /// Bad request (range past the end, bad size, bad name).
    InvalidArgument,
}

/// Errors of the pool engine. Messages say what and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Metadata layer error. Its message is part of this one's and it is not also returned
    /// as `source()`, so a printed chain says it once ("pool metadata: metadata block 12:
    /// …"); what it could carry further down is in its own message (the I/O errors below it
    /// name their cause in their text).
    #[error("pool metadata: {0}")]
    Metadata(thinpool_thin::Error),
    /// Device error.
    #[error(transparent)]
    Io(#[from] thinpool_io::Error),
    /// File-system error on the pool's root directory.
    #[error("{what} {}", path.display())]
    File {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The catalog (volumes.json) is unreadable.
    #[error("catalog {}: {message}", path.display())]
    Catalog {
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// No space left.
    #[error("{0}")]
    NoSpace(String),
    /// Not found.
    #[error("{0}")]
    NotFound(String),
    /// Already exists.
    #[error("{0}")]
    Exists(String),
    /// Busy.
    #[error("{0}")]
    Busy(String),
    /// Read-only.
    #[error("{0}")]
    ReadOnly(String),
    /// Bad argument.
    #[error("{0}")]
    InvalidArgument(String),
}

impl From<thinpool_thin::Error> for Error {
    fn from(e: thinpool_thin::Error) -> Error {
        Error::Metadata(e)
    }
}

impl Error {
    /// True when the host file system under the pool's data or metadata file is full (see
    /// [`thinpool_io::Error::is_host_full`]): the request can succeed once there is space.
    pub fn is_host_full(&self) -> bool {
        use thinpool_thin::{Error as Thin, PdataError as Pdata};
        match self {
            Error::Io(e)
            | Error::Metadata(Thin::Io(e))
            | Error::Metadata(Thin::Pdata(Pdata::Io(e))) => e.is_host_full(),
            _ => false,
        }
    }

    /// The stable kind of this error.
    pub fn kind(&self) -> ErrorKind {
        if self.is_host_full() {
            return ErrorKind::NoSpace;
        }
        match self {
            Error::Metadata(e) => match e {
                thinpool_thin::Error::NoDataSpace(_) => ErrorKind::NoSpace,
                thinpool_thin::Error::NoSuchDevice(_) => ErrorKind::NotFound,
                thinpool_thin::Error::DeviceExists(_) => ErrorKind::Exists,
                thinpool_thin::Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
                thinpool_thin::Error::Io(_) => ErrorKind::Io,
                thinpool_thin::Error::Tainted(_) => ErrorKind::ReadOnly,
                thinpool_thin::Error::Pdata(thinpool_pdata_error) => match thinpool_pdata_error {
                    thinpool_thin::PdataError::Io(_) => ErrorKind::Io,
                    thinpool_thin::PdataError::NoMetadataSpace { .. } => ErrorKind::NoSpace,
                    thinpool_thin::PdataError::ReadOnly => ErrorKind::ReadOnly,
                    _ => ErrorKind::Corrupt,
                },
                _ => ErrorKind::Corrupt,
            },
            Error::Io(_) | Error::File { .. } => ErrorKind::Io,
            Error::Catalog { .. } => ErrorKind::Corrupt,
            Error::NoSpace(_) => ErrorKind::NoSpace,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Exists(_) => ErrorKind::Exists,
            Error::Busy(_) => ErrorKind::Busy,
            Error::ReadOnly(_) => ErrorKind::ReadOnly,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The default pool root: `$THINPOOL_ROOT`, else `/var/lib/thinpool` for root, else
/// `$XDG_DATA_HOME/thinpool` (`~/.local/share/thinpool`).
pub fn default_root() -> PathBuf {
    if let Some(r) = std::env::var_os("THINPOOL_ROOT").filter(|s| !s.is_empty()) {
        return PathBuf::from(r);
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/thinpool");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(x).join("thinpool");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/thinpool")
}
