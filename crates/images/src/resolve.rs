//! Paths inside the root, resolved one component at a time.
//!
//! A tar path is split into components ([`components`]): an absolute path or a `..` component is
//! refused outright, `.` and empty components are dropped. The parent directories are then opened
//! one by one ([`open_dir`]), each relative to the descriptor of the one before, with
//! `O_DIRECTORY | O_NOFOLLOW`: a symlink in a parent position fails the open (`ELOOP`) instead of
//! being followed, wherever it came from. The final component is only ever handed to `*at` calls
//! that do not follow it (`unlinkat`, `mkdirat`, `symlinkat`, `linkat` without
//! `AT_SYMLINK_FOLLOW`, `mknodat`, `openat` with `O_NOFOLLOW | O_EXCL`, `statat`/`chownat`/
//! `utimensat` with `AT_SYMLINK_NOFOLLOW`). So every object touched is a directory entry inside
//! the root's tree, reached only through real directories.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

/// One path component, never empty, `.` or `..`, without `/` or NUL.
pub(crate) type Component = Vec<u8>;

/// Splits a tar path into components; `Err` says why it may not be used.
pub(crate) fn components(raw: &[u8]) -> Result<Vec<Component>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path");
    }
    if raw.contains(&0) {
        return Err("NUL byte in the path");
    }
    let mut out = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("'..' component"),
            _ => out.push(part.to_vec()),
        }
    }
    Ok(out)
}

/// The components joined with `/`, as a path relative to the root (for errors and the
/// this-layer bookkeeping).
pub(crate) fn join(comps: &[Component]) -> Vec<u8> {
    comps.join(&b'/')
}

/// [`join`] as a `PathBuf`.
pub(crate) fn rel_path(comps: &[Component]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(&join(comps)))
}

/// A component as a path argument for the `*at` calls.
pub(crate) fn os(comp: &[u8]) -> &OsStr {
    OsStr::from_bytes(comp)
}

/// What [`open_dir`] does with a missing directory.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missing {
    /// Create it (mode 0755, as containerd does for parents the layer does not list).
    Create,
    /// Stop and answer `None`, also when a component is not a directory (nothing can be
    /// below it). A symlink is still an error.
    Stop,
}

/// Why [`open_dir`] failed, with the index of the offending component.
#[derive(Debug)]
pub(crate) enum WalkError {
    /// Component `index` is a symlink.
    Symlink { index: usize },
    /// Component `index` exists and is not a directory.
    NotDir { index: usize },
    /// A system call on component `index` failed.
    Io {
        index: usize,
        op: &'static str,
        errno: Errno,
    },
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Opens the directory `comps` below `root`, one component at a time, never following a symlink.
/// An empty `comps` opens the root itself.
pub(crate) fn open_dir(
    root: BorrowedFd<'_>,
    comps: &[Component],
    missing: Missing,
) -> Result<Option<OwnedFd>, WalkError> {
    let mut cur =
        rustix::fs::openat(root, ".", DIR_FLAGS, Mode::empty()).map_err(|errno| WalkError::Io {
            index: 0,
            op: "open",
            errno,
        })?;
    for (index, comp) in comps.iter().enumerate() {
        let name = os(comp);
        cur = match rustix::fs::openat(&cur, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if missing == Missing::Stop => return Ok(None),
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(&cur, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(errno) => {
                        return Err(WalkError::Io {
                            index,
                            op: "mkdir",
                            errno,
                        });
                    }
                }
                let dir = rustix::fs::openat(&cur, name, DIR_FLAGS, Mode::empty())
                    .map_err(|errno| classify(&cur, name, index, errno))?;
                // 0755 whatever the umask.
                rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o755)).map_err(|errno| {
                    WalkError::Io {
                        index,
                        op: "chmod",
                        errno,
                    }
                })?;
                dir
            }
            Err(errno) => {
                return match classify(&cur, name, index, errno) {
                    WalkError::NotDir { .. } if missing == Missing::Stop => Ok(None),
                    e => Err(e),
                };
            }
        };
    }
    Ok(Some(cur))
}

/// Turns a failed directory open into a [`WalkError`]: symlink, non-directory or plain I/O.
fn classify(dir: &OwnedFd, name: &OsStr, index: usize, errno: Errno) -> WalkError {
    if matches!(errno, Errno::LOOP | Errno::NOTDIR)
        && let Ok(st) = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
    {
        return match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => WalkError::Symlink { index },
            _ => WalkError::NotDir { index },
        };
    }
    WalkError::Io {
        index,
        op: "open",
        errno,
    }
}

/// The type of `name` in `dir` (not following a symlink), `None` if it does not exist.
pub(crate) fn file_type_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Option<FileType>, Errno> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(errno) => Err(errno),
    }
}

/// The names in a directory, without `.` and `..`.
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> Result<Vec<Component>, Errno> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    Ok(names)
}

/// Opens the subdirectory `name` of `dir` without following a symlink.
pub(crate) fn open_subdir(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty())
}

/// The deepest directory tree [`remove_tree`] descends into, and the most components an entry's
/// path may have: enough for any real image (PATH_MAX allows 2048), few enough that the
/// recursion fits a thread's stack and a hostile layer cannot make each entry cost a million
/// `openat` calls.
pub(crate) const MAX_DEPTH: usize = 1024;

/// Removes `name` from `dir`: a file, a symlink (not its target) or a whole directory tree,
/// descending only through real directories. A missing `name` is not an error.
pub(crate) fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    remove_below(dir, name, 0)
}

fn remove_below(dir: BorrowedFd<'_>, name: &OsStr, depth: usize) -> io::Result<()> {
    match file_type_at(dir, name)? {
        None => Ok(()),
        Some(FileType::Directory) => {
            if depth >= MAX_DEPTH {
                return Err(io::Error::other(format!(
                    "directory tree deeper than {MAX_DEPTH} levels"
                )));
            }
            let sub = open_subdir(dir, name)?;
            for child in list_dir(sub.as_fd())? {
                remove_below(sub.as_fd(), os(&child), depth + 1)?;
            }
            drop(sub);
            Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
        }
        Some(_) => Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_refuse_escapes() {
        assert_eq!(components(b"/etc/passwd"), Err("absolute path"));
        assert_eq!(components(b"a/../../x"), Err("'..' component"));
        assert_eq!(components(b".."), Err("'..' component"));
        assert_eq!(components(b"a/b\0c"), Err("NUL byte in the path"));
        assert_eq!(
            components(b"./a//b/./c/"),
            Ok(vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()])
        );
        assert_eq!(components(b"./"), Ok(vec![]));
        assert_eq!(join(&components(b"a/b").unwrap()), b"a/b".to_vec());
    }
}
