//! The difference between two trees as a layer tar with whiteouts (`container commit`): the
//! reverse of the applier, so that `apply_layer(lower, diff_layer(lower, upper))` gives `upper`.
//!
//! `upper` is a writable snapshot that started as a copy of `lower`. Both trees are walked
//! together, each directory's names sorted bytewise and merged (containerd's double walk):
//!
//! - a name **only in upper** is written with everything below it (a directory's entry, then
//!   its whole subtree, as [`crate::export_tree`] writes it);
//! - a name **only in lower** becomes one whiteout `DIR/.wh.NAME` — a deleted directory is a
//!   single whiteout, its children are not listed;
//! - a name **in both** is written when the upper object differs from the lower one in type,
//!   mode (`0o7777`), uid, gid, size (not for directories: a directory's size is a file-system
//!   artefact the tar does not carry), mtime (seconds *and* nanoseconds), device number,
//!   symlink target, or the carried xattrs (`user.*`, `trusted.*`, `security.capability`).
//!   **Content is not compared when all of that is equal**: a file rewritten in place with the
//!   same size and the very same mtime to the nanosecond is not seen, as with containerd's double
//!   walk on file systems with nanosecond timestamps. A changed type (file → directory, directory
//!   → symlink, ...) is written as the new object: the applier replaces whatever is in the way
//!   (a directory with its subtree), so no whiteout precedes it. Directories present in both are
//!   always descended into.
//! - Whenever anything below a directory is written (an entry or a whiteout), the directory's own
//!   entry is written first — changed or not, once — as Docker does, so a reader creates
//!   parents before children and the applier restores the directory's mode, owner and mtime
//!   after the layer's changes below it touched the mtime. The root itself is never an entry.
//! - **Hardlinks.** Among the entries written, the second and later paths of an upper inode
//!   are hardlink entries to the first one written. When the first path of an inode is
//!   unchanged (so not written) and a new path of it is, the new path is written as a full file:
//!   a layer then never links to an entry it does not hold, at the price of the applied tree
//!   having two inodes with equal content where upper has one. Unchanged paths are never
//!   written, so an unchanged later path of a written inode keeps its lower inode too. Sockets
//!   are skipped in both trees (a socket replacing an object deletes it).
//!
//! Entries are written in the format of [`crate::export`] (PAX records, old GNU sparse files)
//! by the same writer.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use rustix::fs::FileType;

use crate::error::{Error, Result};
use crate::export::{Node, TarWriter, child_path, io_error, open_root};
use crate::resolve;

/// What [`diff_layer`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Paths only in upper, each entry below a new directory counted.
    pub added: u64,
    /// Paths in both trees whose entry was written because they differ.
    pub changed: u64,
    /// Whiteouts written (a deleted directory counts once).
    pub deleted: u64,
    /// Tar entries written: the above plus unchanged parent directories written before their
    /// changed children (PAX headers not counted).
    pub entries: u64,
    /// Bytes of regular-file content stored (data regions only for sparse files).
    pub bytes: u64,
}

/// Writes to `out` the layer that turns the tree `lower` into the tree `upper`.
///
/// The criteria and the format are in the module documentation; an unchanged `upper` gives an
/// archive with no entries (just the end-of-archive blocks). O(entries of both trees + bytes
/// written), streaming; the memory held is one directory listing per level and the paths of
/// multiply-linked inodes written. Needs read access to both trees (root for other users'
/// files and `trusted.*` xattrs); neither tree should change meanwhile.
///
/// Errors: [`Error::Root`] if a root cannot be opened; [`Error::Io`] naming the path (relative
/// to the roots) for a failed `stat`, `open`, read, `readlink`, xattr call or write to `out`;
/// [`Error::Invalid`] for a tree deeper than the applier accepts.
pub fn diff_layer(lower: &Path, upper: &Path, out: impl Write) -> Result<DiffStats> {
    let lower_fd = open_root(lower)?;
    let upper_fd = open_root(upper)?;
    let mut differ = Differ {
        tar: TarWriter::new(out),
        stats: DiffStats::default(),
        parents: Vec::new(),
    };
    differ.dir(lower_fd.as_fd(), upper_fd.as_fd(), b"", 0)?;
    let mut stats = differ.stats;
    stats.entries = differ.tar.stats.entries;
    stats.bytes = differ.tar.stats.bytes;
    differ.tar.finish()?;
    tracing::debug!(
        lower = %lower.display(),
        upper = %upper.display(),
        added = stats.added,
        changed = stats.changed,
        deleted = stats.deleted,
        entries = stats.entries,
        bytes = stats.bytes,
        "layer diffed"
    );
    Ok(stats)
}

/// A directory of upper on the current walk path, written or waiting to be written before
/// its first written descendant.
struct Parent {
    rel: Vec<u8>,
    node: Node,
    written: bool,
}

struct Differ<W: Write> {
    tar: TarWriter<W>,
    stats: DiffStats,
    /// The directories from the root's child down to the one being walked.
    parents: Vec<Parent>,
}

impl<W: Write> Differ<W> {
    /// Writes the entries of the waiting parent directories, outermost first.
    fn flush_parents(&mut self) -> Result<()> {
        for parent in self.parents.iter_mut().filter(|p| !p.written) {
            self.tar.emit_dir(&parent.rel, &parent.node)?;
            parent.written = true;
        }
        Ok(())
    }

    /// Merges the sorted listings of `lower` and `upper` (tree path `prefix`).
    fn dir(
        &mut self,
        lower: BorrowedFd<'_>,
        upper: BorrowedFd<'_>,
        prefix: &[u8],
        depth: usize,
    ) -> Result<()> {
        if depth >= resolve::MAX_DEPTH {
            return Err(Error::Invalid {
                entry: String::from_utf8_lossy(prefix).into_owned(),
                what: format!("directory tree deeper than {} levels", resolve::MAX_DEPTH),
            });
        }
        let list = |fd: BorrowedFd<'_>| {
            resolve::list_dir(fd)
                .map(|mut names| {
                    names.sort();
                    names
                })
                .map_err(|e| io_error(prefix, "readdir", e.into()))
        };
        let lower_names = list(lower)?;
        let upper_names = list(upper)?;
        let (mut l, mut u) = (0, 0);
        while l < lower_names.len() || u < upper_names.len() {
            let order = match (lower_names.get(l), upper_names.get(u)) {
                (Some(a), Some(b)) => a.cmp(b),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match order {
                std::cmp::Ordering::Less => {
                    let name = &lower_names[l];
                    l += 1;
                    self.lower_only(lower, name, prefix)?;
                }
                std::cmp::Ordering::Greater => {
                    let name = &upper_names[u];
                    u += 1;
                    let rel = child_path(prefix, name);
                    let node = Node::read(upper, name, &rel)?;
                    self.added(upper, name, &rel, &node, depth)?;
                }
                std::cmp::Ordering::Equal => {
                    let name = &upper_names[u];
                    l += 1;
                    u += 1;
                    self.both(lower, upper, name, prefix, depth)?;
                }
            }
        }
        Ok(())
    }

    /// `name` is only in lower: a whiteout (nothing for a socket, never exported).
    fn lower_only(&mut self, lower: BorrowedFd<'_>, name: &[u8], prefix: &[u8]) -> Result<()> {
        let rel = child_path(prefix, name);
        let st = rustix::fs::statat(
            lower,
            resolve::os(name),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_error(&rel, "lstat", e.into()))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Socket {
            return Ok(());
        }
        self.flush_parents()?;
        self.tar.whiteout(&rel)?;
        self.stats.deleted += 1;
        Ok(())
    }

    /// `name` (described by `node`) is new in upper, or replaces an object of another type:
    /// written with its whole subtree.
    fn added(
        &mut self,
        upper: BorrowedFd<'_>,
        name: &[u8],
        rel: &[u8],
        node: &Node,
        depth: usize,
    ) -> Result<()> {
        if node.kind == FileType::Socket {
            return Ok(());
        }
        self.flush_parents()?;
        self.tar.emit(upper, name, rel, node)?;
        self.stats.added += 1;
        if node.kind == FileType::Directory {
            let sub = resolve::open_subdir(upper, resolve::os(name))
                .map_err(|e| io_error(rel, "open", e.into()))?;
            self.stats.added += self.tar.emit_tree(sub.as_fd(), rel, depth + 1, false)?;
        }
        Ok(())
    }

    /// `name` is in both trees: written if it differs, descended into if a directory in both.
    fn both(
        &mut self,
        lower: BorrowedFd<'_>,
        upper: BorrowedFd<'_>,
        name: &[u8],
        prefix: &[u8],
        depth: usize,
    ) -> Result<()> {
        let rel = child_path(prefix, name);
        let old = Node::read(lower, name, &rel)?;
        let new = Node::read(upper, name, &rel)?;
        if new.kind == FileType::Socket {
            // Not exportable: treat as gone.
            if old.kind != FileType::Socket {
                self.flush_parents()?;
                self.tar.whiteout(&rel)?;
                self.stats.deleted += 1;
            }
            return Ok(());
        }
        if old.kind != new.kind {
            // The applier replaces what is in the way; the old type's `changed` is this entry.
            self.flush_parents()?;
            self.tar.emit(upper, name, &rel, &new)?;
            self.stats.changed += 1;
            if new.kind == FileType::Directory {
                let sub = resolve::open_subdir(upper, resolve::os(name))
                    .map_err(|e| io_error(&rel, "open", e.into()))?;
                self.stats.added += self.tar.emit_tree(sub.as_fd(), &rel, depth + 1, false)?;
            }
            return Ok(());
        }
        let differs = differs(&old, &new);
        if new.kind != FileType::Directory {
            if differs {
                self.flush_parents()?;
                self.tar.emit(upper, name, &rel, &new)?;
                self.stats.changed += 1;
            }
            return Ok(());
        }
        if differs {
            self.flush_parents()?;
            self.stats.changed += 1;
        }
        self.parents.push(Parent {
            rel: rel.clone(),
            node: new,
            written: false,
        });
        if differs {
            self.flush_parents()?;
        }
        let lower_sub = resolve::open_subdir(lower, resolve::os(name))
            .map_err(|e| io_error(&rel, "open", e.into()))?;
        let upper_sub = resolve::open_subdir(upper, resolve::os(name))
            .map_err(|e| io_error(&rel, "open", e.into()))?;
        let walked = self.dir(lower_sub.as_fd(), upper_sub.as_fd(), &rel, depth + 1);
        self.parents.pop();
        walked
    }
}

/// Whether the upper object's carried metadata differs from the lower one's (same type).
fn differs(old: &Node, new: &Node) -> bool {
    old.kind != new.kind
        || old.mode != new.mode
        || old.uid != new.uid
        || old.gid != new.gid
        || (new.kind != FileType::Directory && old.size != new.size)
        || old.mtime_sec != new.mtime_sec
        || old.mtime_nsec != new.mtime_nsec
        || (matches!(new.kind, FileType::CharacterDevice | FileType::BlockDevice)
            && old.rdev != new.rdev)
        || old.target != new.target
        || old.xattrs != new.xattrs
}
