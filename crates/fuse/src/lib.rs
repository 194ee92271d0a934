//! thinpool-fuse: the FUSE export — every volume of a pool as a regular file
//! (`../shared/docs/design.md`, "From blocks to filesystems and containers").
//!
//! A front-end beside `thinpool-nbd`, using only the engine's public API ([`Pool`],
//! [`thinpool_engine::Volume`]). [`FuseServer::start`] mounts a folder (the daemon's default is
//! `ROOT/files`) in which each volume is a file named after it, of its virtual size, mode 0600
//! (0400 when served read-only), owned by the daemon's user. The files come and go with the
//! volumes: every lookup and listing asks the pool, and the kernel is told to cache no entry
//! or attribute (zero TTLs), so `vol create`, `vol rm` and `vol resize` show at once.
//!
//! ```text
//! open        → Pool::open_volume (a handle per open file; `vol rm` is refused while open)
//! read/write  → Volume::read_at / write_at (write_fua under O_SYNC/O_DSYNC)
//! flush/fsync → Volume::flush: data sync + metadata commit (durable)
//! fallocate   → PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE → Volume::write_zeroes (whole blocks
//!               unmapped, mapped partial blocks zero-filled); plain allocation: EOPNOTSUPP
//! lseek       → SEEK_DATA / SEEK_HOLE from Volume::mapped_extents (the mapping tree)
//! stat        → size = virtual size, blocks = mapped bytes / 512 (`du` tells the truth)
//! truncate    → larger: Pool::resize_volume (online grow); smaller: EPERM (shrinking is
//!               `thinpool vol resize`'s job); equal: nothing
//! statfs      → the pool's data blocks (`df` shows the pool)
//! ```
//!
//! Every file is opened with `FOPEN_DIRECT_IO`: the kernel keeps no page cache for it, so a
//! loop device (itself with `--direct-io=on`) or a filesystem above it does not cache the
//! same bytes twice, and a write is in the pool when `write(2)` returns. Concurrent direct
//! writes to one file are allowed (`FOPEN_PARALLEL_DIRECT_WRITES`), and requests are served by
//! several threads, each with its own `/dev/fuse` descriptor (fuser's `n_threads` and
//! `clone_fd`). `mmap` works only where the kernel offers `FUSE_DIRECT_IO_ALLOW_MMAP` (6.6 and
//! later), which is asked for.
//!
//! A mount left behind by a daemon that was killed answers `ENOTCONN`; [`FuseServer::start`]
//! detaches it (lazy unmount) before mounting again. [`FuseServer::stop`] unmounts; when a
//! file is still open (a loop device over it, say) it says which, detaches the mount lazily
//! and lets go of the pool: later I/O on those files fails with EIO.
//!
//! ```no_run
//! use std::sync::Arc;
//! use thinpool_engine::{Pool, PoolOptions};
//! use thinpool_fuse::{FuseConfig, FuseServer};
//!
//! let pool = Arc::new(Pool::open("/var/lib/thinpool".as_ref(), PoolOptions::default())?);
//! let fuse = FuseServer::start(pool.clone(), &FuseConfig::new("/var/lib/thinpool/files"))?;
//! // /var/lib/thinpool/files/NAME is each volume, until:
//! fuse.stop();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod fs;
mod mountpoint;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use thinpool_engine::Pool;

use crate::fs::{Shared, VolumeFs};

/// Where and how to serve the volumes as files.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FuseConfig {
    /// The folder to mount on: created (mode 0700) when missing; must be empty and not a
    /// mount point, except for a stale mount of a dead daemon, which is detached.
    pub mount_dir: PathBuf,
    /// Every file read-only (mode 0400; opening for writing fails with EROFS).
    pub read_only: bool,
    /// Snapshots read-only (their origins stay writable), as NBD's `--snapshots-read-only`.
    pub snapshots_read_only: bool,
    /// Threads serving requests (default: twice the CPUs, between 4 and 16).
    pub threads: Option<usize>,
}

impl FuseConfig {
    /// Serve on `mount_dir`, read-write, with the default number of threads.
    pub fn new(mount_dir: impl Into<PathBuf>) -> FuseConfig {
        FuseConfig {
            mount_dir: mount_dir.into(),
            read_only: false,
            snapshots_read_only: false,
            threads: None,
        }
    }
}

/// Errors starting the FUSE export.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// FUSE cannot be used here: no `/dev/fuse`, no permission to mount, no `fusermount3`.
    #[error("FUSE is not available: {reason}")]
    Unavailable {
        /// What is missing, and what to do about it.
        reason: String,
    },
    /// The mount folder is unusable.
    #[error("FUSE mount folder {}: {message}", path.display())]
    MountPoint {
        /// The folder.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Mounting failed for another reason.
    #[error("mounting the FUSE export on {}", path.display())]
    Mount {
        /// The folder.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The pool could not be asked for its block size.
    #[error("reading the pool's status")]
    Pool(#[source] thinpool_engine::Error),
}

impl Error {
    /// True when FUSE itself is missing or forbidden here (as opposed to a bad folder): a
    /// daemon may go on without the export.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A mounted FUSE export. Dropping it stops it as [`FuseServer::stop`] does.
pub struct FuseServer {
    dir: PathBuf,
    shared: Arc<Shared>,
    session: Option<fuser::BackgroundSession>,
}

impl FuseServer {
    /// Mount the export of `pool`'s volumes on `cfg.mount_dir` and serve it from background
    /// threads. Blocks until the kernel has finished the FUSE handshake.
    pub fn start(pool: Arc<Pool>, cfg: &FuseConfig) -> Result<FuseServer> {
        let dir = cfg.mount_dir.clone();
        if !Path::new("/dev/fuse").exists() {
            return Err(Error::Unavailable {
                reason: "/dev/fuse does not exist (load the fuse module: modprobe fuse)".into(),
            });
        }
        mountpoint::prepare(&dir)?;
        // Symlinks resolved: the kernel names a loop device's file by its real path, so the
        // loop devices over these files are found by this folder only in that form.
        let dir = dir.canonicalize().unwrap_or(dir);
        let block_size = pool.status().map_err(Error::Pool)?.block_size;
        let shared = Arc::new(Shared::new(pool, block_size, cfg));
        let threads = cfg.threads.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
            (cpus * 2).clamp(4, 16)
        });
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("thinpool".into()),
            fuser::MountOption::Subtype("thinpool".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoExec,
            fuser::MountOption::NoAtime,
        ];
        config.n_threads = Some(threads.max(1));
        config.clone_fd = true;
        let fs = VolumeFs::new(shared.clone());
        let session = fuser::Session::new(fs, &dir, &config)
            .map_err(|e| mount_error(&dir, e))?
            .spawn()
            .map_err(|source| Error::Mount {
                path: dir.clone(),
                source,
            })?;
        tracing::info!(dir = %dir.display(), threads, "serving volumes as files (FUSE)");
        Ok(FuseServer {
            dir,
            shared,
            session: Some(session),
        })
    }

    /// The folder the volumes' files are in.
    pub fn mount_dir(&self) -> &Path {
        &self.dir
    }

    /// Unmount and let go of the pool. Requests in flight are answered first. When a file is
    /// still open the mount is detached lazily (logged with the names of the open files);
    /// I/O on those files then fails with EIO. Blocks until the serving threads have ended
    /// (a normal unmount) or the pool is let go (a lazy one).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        match mountpoint::unmount(&self.dir) {
            Ok(()) => {
                // The kernel ends the connection: the serving threads see it and return.
                self.shared.close();
                if let Err(e) = session.join() {
                    tracing::warn!(dir = %self.dir.display(), "FUSE session ended with: {e}");
                }
            }
            Err(e) => {
                let open = self.shared.open_files();
                tracing::warn!(
                    dir = %self.dir.display(),
                    open = %open.join(", "),
                    "cannot unmount the volumes' files ({e}): detaching the mount lazily; I/O on files still open fails from now on"
                );
                if let Err(e) = mountpoint::detach(&self.dir) {
                    tracing::error!(dir = %self.dir.display(), "lazy unmount failed: {e}");
                }
                self.shared.close();
                // The threads end when the last open file is closed (or with this process);
                // they hold no pool any more.
                drop(session);
            }
        }
        tracing::info!(dir = %self.dir.display(), "stopped serving volumes as files");
    }
}

impl Drop for FuseServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Sort a mount failure: permission and missing helpers mean FUSE is unavailable here.
fn mount_error(dir: &Path, e: std::io::Error) -> Error {
    use std::io::ErrorKind;
    let root = rustix::process::geteuid().is_root();
    match e.kind() {
        ErrorKind::PermissionDenied => Error::Unavailable {
            reason: if root {
                format!("mounting on {} was refused: {e}", dir.display())
            } else {
                format!(
                    "no permission to use /dev/fuse or to mount ({e}): run as root, or install fuse3 (fusermount3) and allow access to /dev/fuse"
                )
            },
        },
        ErrorKind::NotFound if !root => Error::Unavailable {
            reason: format!("fusermount3 is needed to mount as a user ({e}): install fuse3"),
        },
        _ => Error::Mount {
            path: dir.to_path_buf(),
            source: e,
        },
    }
}
