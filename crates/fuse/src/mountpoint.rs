//! The mount folder: made ready before mounting (a dead daemon's mount detached, the folder
//! created, checked empty and not a mount point), unmounted or detached at the end.
//!
//! A FUSE mount whose server died stays in the mount table; every access to it fails with
//! `ENOTCONN` ("Transport endpoint is not connected") until it is unmounted. A lazy unmount
//! (`umount -l`, `MNT_DETACH`) removes it even while a process (a loop device, a shell) still
//! has something open there. As a user, `fusermount3 -u`/`-uz` does the same.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use rustix::mount::UnmountFlags;

use crate::Error;

fn bad(dir: &Path, message: impl Into<String>) -> Error {
    Error::MountPoint {
        path: dir.to_path_buf(),
        message: message.into(),
    }
}

/// Make `dir` ready to mount on: detach a stale mount, create it (0700) when missing, refuse
/// a non-folder, a live mount point or a folder with something in it.
pub(crate) fn prepare(dir: &Path) -> Result<(), Error> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => {
            tracing::warn!(
                dir = %dir.display(),
                "a FUSE mount left by a daemon that did not stop cleanly is still there: detaching it"
            );
            detach(dir).map_err(|e| bad(dir, format!("cannot detach the stale mount: {e}")))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| bad(dir, format!("cannot create it: {e}")))?;
        }
        Err(e) => return Err(bad(dir, e.to_string())),
        Ok(_) => {}
    }
    let md = std::fs::metadata(dir).map_err(|e| bad(dir, e.to_string()))?;
    if !md.is_dir() {
        return Err(bad(dir, "not a folder"));
    }
    let parent = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.parent().map(Path::to_path_buf));
    let parent_dev = parent
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.dev());
    if parent_dev != Some(md.dev()) {
        return Err(bad(
            dir,
            "already a mount point (something else is mounted there): unmount it or pick another folder",
        ));
    }
    let mut entries = std::fs::read_dir(dir).map_err(|e| bad(dir, e.to_string()))?;
    if entries.next().is_some() {
        return Err(bad(
            dir,
            "not empty: the volumes' files would hide what is there; empty it or pick another folder",
        ));
    }
    Ok(())
}

/// Unmount `dir` (fails with EBUSY while a file under it is open).
pub(crate) fn unmount(dir: &Path) -> io::Result<()> {
    match rustix::mount::unmount(dir, UnmountFlags::empty()) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::PERM) => fusermount(dir, "-u"),
        Err(e) => Err(e.into()),
    }
}

/// Detach `dir` lazily: gone from the tree now, released when nothing uses it.
pub(crate) fn detach(dir: &Path) -> io::Result<()> {
    match rustix::mount::unmount(dir, UnmountFlags::DETACH) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::PERM) => fusermount(dir, "-uz"),
        Err(e) => Err(e.into()),
    }
}

/// As a user, unmounting goes through the setuid helper.
fn fusermount(dir: &Path, flag: &str) -> io::Result<()> {
    let out = Command::new("fusermount3").arg(flag).arg(dir).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "fusermount3 {flag} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
