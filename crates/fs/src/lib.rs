//! thinpool-fs: from a volume's file to a mounted filesystem
//! (`../shared/docs/design.md`, "From blocks to filesystems and containers").
//!
//! This host's kernel has no device-mapper, nbd or ublk, but it has loop devices, FUSE and
//! ext4/xfs. So a volume becomes a filesystem in three steps, each undone in reverse:
//!
//! ```text
//! ROOT/files/NAME  (thinpool-fuse: the volume as a file, direct I/O)
//!      │  loop::attach      losetup --find --show --direct-io=on [--read-only]
//!      ▼
//! /dev/loopN       (no page cache of its own: direct I/O to the file)
//!      │  mount::mount      mount -t ext4|xfs [-o OPTIONS] /dev/loopN DIR
//!      ▼
//! DIR              grow: losetup -c + resize2fs / xfs_growfs (online)
//!                  snapshot: fsfreeze -f … -u around it
//! ```
//!
//! Everything here drives the system's own tools (util-linux `losetup`, `mount`, `umount`,
//! `fsfreeze`, `blkid`; e2fsprogs; xfsprogs), which are the reference behaviour for these
//! operations, and reads the kernel's tables (`/sys/block/loop*/loop/backing_file`,
//! `/proc/self/mountinfo`). Nothing here knows about pools: the daemon decides what to attach
//! and mount, and records it.
//!
//! Errors say which tool failed on what, with its own message ([`Error::Tool`]), or why the
//! step cannot be done ([`Error::Busy`], [`Error::Missing`], …).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod filesystem;
pub mod loopdev;
pub mod mount;
mod tool;

use std::path::PathBuf;

pub use filesystem::FsType;

/// Errors of this crate; each says what was being done and on what.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tool ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Tool {
        /// The command line, as typed.
        command: String,
        /// How it ended ("exit status 1").
        status: String,
        /// What it said on stderr (trimmed), or on stdout when stderr was empty.
        stderr: String,
    },
    /// A tool is not installed.
    #[error("`{tool}` is not installed: install {package}")]
    Missing {
        /// The program.
        tool: String,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// No loop device is free (and none could be made).
    #[error(
        "no free loop device: detach one (`losetup -a` lists them) or load more (`modprobe loop max_loop=N`)"
    )]
    NoFreeLoop,
    /// A mount is in use.
    #[error("{} is busy: {}", dir.display(), mount::describe_users(users))]
    Busy {
        /// The mount point.
        dir: PathBuf,
        /// Processes using it: pid and command name.
        users: Vec<(u32, String)>,
    },
    /// The filesystem type cannot do what was asked.
    #[error("{0}")]
    Unsupported(String),
    /// A system call or file access failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
