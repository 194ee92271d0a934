//! The layer applier: one tar entry at a time onto the root, then the directories' mtimes.
//!
//! For each entry:
//! 1. its path is split and checked ([`resolve::components`]); `..` or an absolute path refuses
//!    the layer;
//! 2. a whiteout (`DIR/.wh.NAME`) removes `DIR/NAME` unless this layer itself put it there; the
//!    opaque marker (`DIR/.wh..wh..opq`) removes from `DIR`, recursively, everything this layer
//!    did not add so far — what it adds later is added after the pruning, so the marker may come
//!    before or after the directory's new entries;
//! 3. anything else gets its parent opened (missing parents created 0755) without following
//!    symlinks, whatever is in the way removed (an existing directory is kept when the entry is a
//!    directory), and is created and given owner, mode, xattrs and mtime — in that order, since
//!    `chown` clears setuid/setgid bits and file capabilities;
//! 4. directories' mtimes are set last, once nothing more is written below them;
//! 5. the root's file system is synced (`syncfs`), so that a write-back error — a full pool
//!    under a snapshot — fails the layer instead of being lost in the page cache.
//!
//! The paths this layer created (and their ancestors) are remembered so whiteouts and opaque
//! markers only ever hide lower layers' content, as the OCI image spec requires.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::Timespec;
use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Timestamps, Uid, XattrFlags};
use rustix::io::Errno;
use tar::EntryType;

use crate::error::{Error, Result};
use crate::resolve::{self, Component, Missing, WalkError};

/// What [`apply_layer`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Tar entries applied (PAX and GNU long-name headers not counted), whiteouts included.
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
}

/// Applies the layer tar stream `layer` (uncompressed or gzip) onto the tree at `root`.
///
/// `root` holds the parent layers' tree (a mounted snapshot). Needs root privileges for owners,
/// device nodes and `trusted.*` xattrs. On error the tree may be partly changed — discard it —
/// but nothing outside `root` has been created, changed or removed.
pub fn apply_layer(root: &Path, layer: impl Read) -> Result<ApplyStats> {
    let root_fd = crate::export::open_root(root)?;
    let mut reader = BufReader::with_capacity(1 << 16, layer);
    let gzip = reader
        .fill_buf()
        .map_err(|source| Error::Read {
            entry: "the first header".into(),
            source,
        })?
        .starts_with(&[0x1f, 0x8b]);
    let mut applier = Applier {
        root: root_fd,
        stats: ApplyStats::default(),
        added: HashSet::new(),
        added_ancestors: HashSet::new(),
        dir_times: Vec::new(),
    };
    if gzip {
        applier.run(flate2::read::GzDecoder::new(reader))?;
    } else {
        applier.run(reader)?;
    }
    applier.set_dir_times()?;
    // What was written may still sit in the page cache, and a write-back error (the pool full
    // under a snapshot's loop device, an I/O error) shows only here: it must fail the layer,
    // not be lost with it.
    rustix::fs::syncfs(&applier.root).map_err(|errno| Error::Io {
        entry: "(all entries, written back)".into(),
        op: "syncfs",
        path: PathBuf::from("."),
        source: errno.into(),
    })?;
    let stats = applier.stats;
    tracing::debug!(
        root = %root.display(),
        entries = stats.entries,
        bytes = stats.bytes,
        whiteouts = stats.whiteouts,
        gzip,
        "layer applied"
    );
    Ok(stats)
}

struct Applier {
    root: OwnedFd,
    stats: ApplyStats,
    /// Paths (joined with `/`) this layer created or updated.
    added: HashSet<Vec<u8>>,
    /// Every proper ancestor of a path in `added`.
    added_ancestors: HashSet<Vec<u8>>,
    /// Directories whose mtime is set at the end.
    dir_times: Vec<(Vec<Component>, Timestamps)>,
}

/// Owner, mode, mtime and xattrs of an entry, from its header and PAX records.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: Timestamps,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The xattr namespaces a layer may set (`SCHILY.xattr.NAME`); others are skipped.
fn xattr_allowed(name: &[u8]) -> bool {
    name.starts_with(b"user.") || name.starts_with(b"trusted.") || name == b"security.capability"
}

impl Applier {
    fn run(&mut self, stream: impl Read) -> Result<()> {
        let mut archive = tar::Archive::new(stream);
        let entries = archive.entries().map_err(|source| Error::Read {
            entry: "the first header".into(),
            source,
        })?;
        let mut last = String::from("the first header");
        for entry in entries {
            let mut entry = entry.map_err(|source| Error::Read {
                entry: format!("the header after {last}"),
                source,
            })?;
            last = format!("entry {:?}", String::from_utf8_lossy(&entry.path_bytes()));
            self.entry(&mut entry)?;
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let mut kind = entry.header().entry_type();
        // Old tars mark directories as regular files whose name ends with '/'.
        if kind == EntryType::Regular && raw.last() == Some(&b'/') {
            kind = EntryType::Directory;
        }
        if matches!(
            kind,
            EntryType::XGlobalHeader | EntryType::GNULongName | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        self.stats.entries += 1;
        let comps = resolve::components(&raw).map_err(|reason| Error::PathTraversal {
            entry: name.clone(),
            reason: reason.into(),
        })?;
        if comps.len() > resolve::MAX_DEPTH {
            return Err(Error::Invalid {
                entry: name,
                what: format!("path deeper than {} components", resolve::MAX_DEPTH),
            });
        }
        let Some((base, parents)) = comps.split_last() else {
            return self.root_entry(entry, &name, kind);
        };
        // `.wh..wh.*` names other than the opaque marker are reserved (OCI image spec; AUFS
        // kept its metadata there): neither whiteouts nor content.
        if comps
            .iter()
            .any(|c| c.starts_with(b".wh..wh.") && c != b".wh..wh..opq")
        {
            tracing::debug!(entry = name, "reserved .wh..wh. entry skipped");
            return Ok(());
        }
        if let Some(victim) = base.strip_prefix(b".wh.") {
            return self.whiteout(&name, parents, victim);
        }
        // Validate, then act: nothing is created for an entry of a type we refuse.
        let Some(class) = Class::of(kind) else {
            return Err(Error::UnsupportedType {
                entry: name,
                kind: format!("{:?} ({:?})", kind, kind.as_byte() as char),
            });
        };
        let meta = read_meta(entry, &name)?;
        let parent = self.open_parent(&name, parents, Missing::Create)?;
        let parent = parent.expect("Missing::Create always yields a directory");
        let at = Target {
            entry: &name,
            dir: parent.as_fd(),
            base,
            comps: &comps,
        };
        match class {
            Class::File => self.regular(&at, entry, &meta)?,
            Class::Directory => self.directory(&at, &meta)?,
            Class::Symlink => symlink(&at, entry, &meta)?,
            Class::Hardlink => self.hardlink(&at, entry)?,
            Class::Node(file_type) => node(&at, entry, file_type, &meta)?,
        }
        self.record(&comps);
        Ok(())
    }

    /// Remembers that this layer created `comps` (and so its ancestors exist because of it).
    fn record(&mut self, comps: &[Component]) {
        for n in 1..comps.len() {
            self.added_ancestors.insert(resolve::join(&comps[..n]));
        }
        self.added.insert(resolve::join(comps));
    }

    /// Opens the directory `comps`, turning a walk failure into an error naming `entry`.
    fn open_parent(
        &self,
        entry: &str,
        comps: &[Component],
        missing: Missing,
    ) -> Result<Option<OwnedFd>> {
        resolve::open_dir(self.root.as_fd(), comps, missing).map_err(|e| match e {
            WalkError::Symlink { index } => Error::PathTraversal {
                entry: entry.into(),
                reason: format!(
                    "{:?} is a symlink, not followed",
                    resolve::rel_path(&comps[..=index])
                ),
            },
            WalkError::NotDir { index } => Error::Io {
                entry: entry.into(),
                op: "open as a directory",
                path: resolve::rel_path(&comps[..=index]),
                source: Errno::NOTDIR.into(),
            },
            WalkError::Io { index, op, errno } => Error::Io {
                entry: entry.into(),
                op,
                path: resolve::rel_path(&comps[..(index + 1).min(comps.len())]),
                source: errno.into(),
            },
        })
    }

    /// `./` itself: a directory entry updates the root's metadata; anything else is refused.
    fn root_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
        kind: EntryType,
    ) -> Result<()> {
        if kind != EntryType::Directory {
            return Err(Error::Invalid {
                entry: name.into(),
                what: format!("entry type {kind:?} for the root directory"),
            });
        }
        let meta = read_meta(entry, name)?;
        let io = |op, errno: Errno| Error::Io {
            entry: name.into(),
            op,
            path: PathBuf::from("."),
            source: errno.into(),
        };
        set_owner_mode_fd(self.root.as_fd(), &meta).map_err(|(op, e)| io(op, e))?;
        for (key, value) in &meta.xattrs {
            rustix::fs::fsetxattr(&self.root, resolve::os(key), value, XattrFlags::empty())
                .map_err(|e| io("fsetxattr", e))?;
        }
        self.dir_times.push((Vec::new(), meta.mtime.clone()));
        Ok(())
    }

    fn whiteout(&mut self, name: &str, parents: &[Component], victim: &[u8]) -> Result<()> {
        self.stats.whiteouts += 1;
        let opaque = victim == b".wh..opq";
        if !opaque && (victim.is_empty() || victim == b"." || victim == b"..") {
            return Err(Error::PathTraversal {
                entry: name.into(),
                reason: "whiteout of '.' or '..'".into(),
            });
        }
        // A whiteout whose directory does not exist has nothing to hide.
        let Some(dir) = self.open_parent(name, parents, Missing::Stop)? else {
            return Ok(());
        };
        let io = |op, path: Vec<u8>, source: io::Error| Error::Io {
            entry: name.into(),
            op,
            path: PathBuf::from(resolve::os(&path)),
            source,
        };
        if opaque {
            let prefix = resolve::join(parents);
            return self
                .prune(dir.as_fd(), &prefix)
                .map_err(|(path, e)| io("prune opaque directory", path, e));
        }
        let mut comps = parents.to_vec();
        comps.push(victim.to_vec());
        let key = resolve::join(&comps);
        if self.added.contains(&key) {
            // Whiteouts only hide lower layers' content.
            return Ok(());
        }
        if self.added_ancestors.contains(&key) {
            let sub = resolve::open_subdir(dir.as_fd(), resolve::os(victim))
                .map_err(|e| io("open", key.clone(), e.into()))?;
            return self
                .prune(sub.as_fd(), &key)
                .map_err(|(path, e)| io("prune", path, e));
        }
        resolve::remove_tree(dir.as_fd(), resolve::os(victim)).map_err(|e| io("remove", key, e))
    }

    /// Removes from `dir` (at `prefix`) everything this layer did not create, descending into
    /// the directories it created or wrote below.
    fn prune(&self, dir: BorrowedFd<'_>, prefix: &[u8]) -> Result<(), (Vec<u8>, io::Error)> {
        let names = resolve::list_dir(dir).map_err(|e| (prefix.to_vec(), e.into()))?;
        for child in names {
            let key = if prefix.is_empty() {
                child.clone()
            } else {
                [prefix, b"/", &child].concat()
            };
            let at = |e: Errno| (key.clone(), io::Error::from(e));
            let name = resolve::os(&child);
            if self.added.contains(&key) || self.added_ancestors.contains(&key) {
                if resolve::file_type_at(dir, name).map_err(at)? == Some(FileType::Directory) {
                    let sub = resolve::open_subdir(dir, name).map_err(at)?;
                    self.prune(sub.as_fd(), &key)?;
                }
            } else {
                resolve::remove_tree(dir, name).map_err(|e| (key.clone(), e))?;
            }
        }
        Ok(())
    }

    fn regular<R: Read>(
        &mut self,
        at: &Target<'_>,
        entry: &mut tar::Entry<'_, R>,
        meta: &Meta,
    ) -> Result<()> {
        at.clear(false)?;
        let fd = rustix::fs::openat(
            at.dir,
            at.name(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| at.io("create", e.into()))?;
        let file = File::from(fd);
        let size = copy_sparse(entry, &file).map_err(|e| match e {
            CopyError::Read(source) => Error::Read {
                entry: format!("the content of {:?}", at.entry),
                source,
            },
            CopyError::Write(source) => at.io("write", source),
        })?;
        file.set_len(size).map_err(|e| at.io("truncate", e))?;
        self.stats.bytes += size;
        set_owner_mode_fd(file.as_fd(), meta).map_err(|(op, e)| at.io(op, e.into()))?;
        for (key, value) in &meta.xattrs {
            rustix::fs::fsetxattr(&file, resolve::os(key), value, XattrFlags::empty())
                .map_err(|e| at.io("fsetxattr", e.into()))?;
        }
        rustix::fs::futimens(&file, &meta.mtime).map_err(|e| at.io("futimens", e.into()))
    }

    fn directory(&mut self, at: &Target<'_>, meta: &Meta) -> Result<()> {
        if !at.clear(true)? {
            rustix::fs::mkdirat(at.dir, at.name(), Mode::from_raw_mode(0o700))
                .map_err(|e| at.io("mkdir", e.into()))?;
        }
        let fd = resolve::open_subdir(at.dir, at.name()).map_err(|e| at.io("open", e.into()))?;
        set_owner_mode_fd(fd.as_fd(), meta).map_err(|(op, e)| at.io(op, e.into()))?;
        for (key, value) in &meta.xattrs {
            rustix::fs::fsetxattr(&fd, resolve::os(key), value, XattrFlags::empty())
                .map_err(|e| at.io("fsetxattr", e.into()))?;
        }
        self.dir_times.push((at.comps.to_vec(), meta.mtime.clone()));
        Ok(())
    }

    fn hardlink<R: Read>(&mut self, at: &Target<'_>, entry: &tar::Entry<'_, R>) -> Result<()> {
        let traversal = |reason: String| Error::PathTraversal {
            entry: at.entry.into(),
            reason,
        };
        let link = entry.link_name_bytes().ok_or_else(|| Error::Invalid {
            entry: at.entry.into(),
            what: "hardlink without a target".into(),
        })?;
        let target = resolve::components(&link)
            .map_err(|reason| traversal(format!("hardlink target: {reason}")))?;
        let Some((tbase, tparents)) = target.split_last() else {
            return Err(traversal("hardlink to the root directory".into()));
        };
        if target == at.comps {
            return Ok(());
        }
        let missing = || Error::Io {
            entry: at.entry.into(),
            op: "find hardlink target",
            path: resolve::rel_path(&target),
            source: Errno::NOENT.into(),
        };
        let tdir = self
            .open_parent(at.entry, tparents, Missing::Stop)
            .map_err(|e| match e {
                Error::PathTraversal { reason, .. } => {
                    traversal(format!("hardlink target: {reason}"))
                }
                other => other,
            })?
            .ok_or_else(missing)?;
        let tstat = rustix::fs::statat(&tdir, resolve::os(tbase), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| match e {
                Errno::NOENT => missing(),
                e => at.io("stat hardlink target", e.into()),
            })?;
        if let Ok(st) = rustix::fs::statat(at.dir, at.name(), AtFlags::SYMLINK_NOFOLLOW)
            && st.st_dev == tstat.st_dev
            && st.st_ino == tstat.st_ino
        {
            return Ok(());
        }
        at.clear(false)?;
        rustix::fs::linkat(
            &tdir,
            resolve::os(tbase),
            at.dir,
            at.name(),
            AtFlags::empty(),
        )
        .map_err(|e| at.io("link", e.into()))
    }

    /// Sets the recorded directories' mtimes, in tar order: setting a directory's times does
    /// not change its parent's, so no particular order is needed.
    fn set_dir_times(&self) -> Result<()> {
        for (comps, times) in &self.dir_times {
            let entry = String::from_utf8_lossy(&resolve::join(comps)).into_owned();
            let io = |errno: Errno| Error::Io {
                entry: entry.clone(),
                op: "utimensat",
                path: resolve::rel_path(comps),
                source: errno.into(),
            };
            let Some((base, parents)) = comps.split_last() else {
                rustix::fs::futimens(&self.root, times).map_err(io)?;
                continue;
            };
            // A directory removed by a later whiteout of this layer has no mtime to set.
            let Some(dir) = self.open_parent(&entry, parents, Missing::Stop)? else {
                continue;
            };
            match rustix::fs::utimensat(&dir, resolve::os(base), times, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(io(e)),
            }
        }
        Ok(())
    }
}

/// What an entry creates.
#[derive(Clone, Copy)]
enum Class {
    File,
    Directory,
    Symlink,
    Hardlink,
    /// A character or block device, or a FIFO.
    Node(FileType),
}

impl Class {
    /// `None` for the types a layer may not hold.
    fn of(kind: EntryType) -> Option<Class> {
        Some(match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => Class::File,
            EntryType::Directory => Class::Directory,
            EntryType::Symlink => Class::Symlink,
            EntryType::Link => Class::Hardlink,
            EntryType::Char => Class::Node(FileType::CharacterDevice),
            EntryType::Block => Class::Node(FileType::BlockDevice),
            EntryType::Fifo => Class::Node(FileType::Fifo),
            _ => return None,
        })
    }
}

/// The final component of an entry, inside its already opened parent directory.
struct Target<'a> {
    entry: &'a str,
    dir: BorrowedFd<'a>,
    base: &'a [u8],
    comps: &'a [Component],
}

impl Target<'_> {
    fn name(&self) -> &std::ffi::OsStr {
        resolve::os(self.base)
    }

    fn io(&self, op: &'static str, source: io::Error) -> Error {
        Error::Io {
            entry: self.entry.into(),
            op,
            path: resolve::rel_path(self.comps),
            source,
        }
    }

    /// Removes whatever is at the target, except a directory when `keep_dir`; answers whether
    /// a directory was kept.
    fn clear(&self, keep_dir: bool) -> Result<bool> {
        match resolve::file_type_at(self.dir, self.name()) {
            Ok(None) => Ok(false),
            Ok(Some(FileType::Directory)) if keep_dir => Ok(true),
            Ok(Some(_)) => resolve::remove_tree(self.dir, self.name())
                .map(|()| false)
                .map_err(|e| self.io("remove", e)),
            Err(e) => Err(self.io("stat", e.into())),
        }
    }

    /// `/proc/self/fd/<dir>/<name>`: a path to the target (the final component not followed by
    /// the `l*` calls) for what has no `*at` form (`lsetxattr`).
    fn proc_path(&self) -> PathBuf {
        let mut path = PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()));
        path.push(self.name());
        path
    }

    /// Owner, then xattrs, then mtime of a non-directory that cannot be opened safely
    /// (symlink, device, FIFO); `chmod` too unless it is a symlink.
    fn set_meta_at(&self, meta: &Meta, symlink: bool) -> Result<()> {
        rustix::fs::chownat(
            self.dir,
            self.name(),
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io("lchown", e.into()))?;
        if !symlink {
            rustix::fs::chmodat(
                self.dir,
                self.name(),
                Mode::from_raw_mode(meta.mode),
                AtFlags::empty(),
            )
            .map_err(|e| self.io("chmod", e.into()))?;
        }
        if !meta.xattrs.is_empty() {
            let path = self.proc_path();
            for (key, value) in &meta.xattrs {
                rustix::fs::lsetxattr(&path, resolve::os(key), value, XattrFlags::empty())
                    .map_err(|e| self.io("lsetxattr", e.into()))?;
            }
        }
        rustix::fs::utimensat(
            self.dir,
            self.name(),
            &meta.mtime,
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io("utimensat", e.into()))
    }
}

fn symlink<R: Read>(at: &Target<'_>, entry: &tar::Entry<'_, R>, meta: &Meta) -> Result<()> {
    let link = entry.link_name_bytes().ok_or_else(|| Error::Invalid {
        entry: at.entry.into(),
        what: "symlink without a target".into(),
    })?;
    if link.is_empty() || link.contains(&0) {
        return Err(Error::Invalid {
            entry: at.entry.into(),
            what: "symlink target (empty or with a NUL byte)".into(),
        });
    }
    at.clear(false)?;
    rustix::fs::symlinkat(resolve::os(&link), at.dir, at.name())
        .map_err(|e| at.io("symlink", e.into()))?;
    at.set_meta_at(meta, true)
}

fn node<R: Read>(
    at: &Target<'_>,
    entry: &tar::Entry<'_, R>,
    file_type: FileType,
    meta: &Meta,
) -> Result<()> {
    let header = entry.header();
    let invalid = |what: &str| Error::Invalid {
        entry: at.entry.into(),
        what: what.into(),
    };
    let dev = if file_type == FileType::Fifo {
        0
    } else {
        let major = header
            .device_major()
            .map_err(|_| invalid("device major number"))?
            .unwrap_or(0);
        let minor = header
            .device_minor()
            .map_err(|_| invalid("device minor number"))?
            .unwrap_or(0);
        rustix::fs::makedev(major, minor)
    };
    at.clear(false)?;
    rustix::fs::mknodat(
        at.dir,
        at.name(),
        file_type,
        Mode::from_raw_mode(meta.mode),
        dev,
    )
    .map_err(|e| at.io("mknod", e.into()))?;
    at.set_meta_at(meta, false)
}

/// `fchown` then `fchmod` (in that order: `chown` clears setuid/setgid); the failed call's name.
fn set_owner_mode_fd(fd: BorrowedFd<'_>, meta: &Meta) -> Result<(), (&'static str, Errno)> {
    rustix::fs::fchown(
        fd,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
    )
    .map_err(|e| ("fchown", e))?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode)).map_err(|e| ("fchmod", e))
}

/// Owner, mode, mtime from the header, overridden by PAX `uid`, `gid`, `mtime`; xattrs from PAX
/// `SCHILY.xattr.*`.
fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>, name: &str) -> Result<Meta> {
    let invalid = |what: String| Error::Invalid {
        entry: name.into(),
        what,
    };
    let header = entry.header();
    let mode = header.mode().map_err(|_| invalid("mode field".into()))? & 0o7777;
    let mut uid = header.uid().map_err(|_| invalid("uid field".into()))?;
    let mut gid = header.gid().map_err(|_| invalid("gid field".into()))?;
    let mut mtime = Timespec {
        tv_sec: i64::try_from(header.mtime().map_err(|_| invalid("mtime field".into()))?)
            .map_err(|_| invalid("mtime field".into()))?,
        tv_nsec: 0,
    };
    let mut xattrs = Vec::new();
    let pax = entry.pax_extensions().map_err(|source| Error::Read {
        entry: format!("the PAX records of {name:?}"),
        source,
    })?;
    if let Some(pax) = pax {
        for record in pax {
            let record = record.map_err(|source| Error::Read {
                entry: format!("the PAX records of {name:?}"),
                source,
            })?;
            let key = record.key_bytes();
            let value = record.value_bytes();
            let number = |what: &str| {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| invalid(format!("PAX {what} record")))
            };
            match key {
                b"uid" => uid = number("uid")?,
                b"gid" => gid = number("gid")?,
                b"mtime" => {
                    mtime =
                        parse_pax_time(value).ok_or_else(|| invalid("PAX mtime record".into()))?
                }
                _ if key.starts_with(b"GNU.sparse.") => {
                    return Err(Error::UnsupportedType {
                        entry: name.into(),
                        kind: "PAX sparse file (GNU.sparse.* records)".into(),
                    });
                }
                _ => {
                    if let Some(xattr) = key.strip_prefix(b"SCHILY.xattr.") {
                        if xattr.is_empty() || xattr.contains(&0) {
                            return Err(invalid("xattr name".into()));
                        }
                        if xattr_allowed(xattr) {
                            xattrs.push((xattr.to_vec(), value.to_vec()));
                        } else {
                            tracing::warn!(
                                entry = name,
                                xattr = %String::from_utf8_lossy(xattr),
                                "xattr outside user.*, trusted.*, security.capability skipped"
                            );
                        }
                    }
                }
            }
        }
    }
    let uid = u32::try_from(uid).map_err(|_| invalid(format!("uid {uid}")))?;
    let gid = u32::try_from(gid).map_err(|_| invalid(format!("gid {gid}")))?;
    Ok(Meta {
        uid,
        gid,
        mode,
        mtime: Timestamps {
            last_access: mtime,
            last_modification: mtime,
        },
        xattrs,
    })
}

/// A PAX time: `[-]SECONDS[.FRACTION]`.
fn parse_pax_time(value: &[u8]) -> Option<Timespec> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nsec: i64 = digits.parse().ok()?;
    Some(if !negative {
        Timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        }
    } else if nsec == 0 {
        Timespec {
            tv_sec: -secs,
            tv_nsec: 0,
        }
    } else {
        Timespec {
            tv_sec: -secs - 1,
            tv_nsec: 1_000_000_000 - nsec,
        }
    })
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies `src` into `file`, leaving holes where whole 4 KiB blocks are zero; the size copied.
fn copy_sparse(mut src: impl Read, file: &File) -> Result<u64, CopyError> {
    const BLOCK: usize = 4096;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match src.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CopyError::Read(e)),
            }
        }
        if filled == 0 {
            return Ok(offset);
        }
        // Write each run of blocks that are not all zero.
        let data = &buf[..filled];
        let mut start = None;
        for (i, block) in data.chunks(BLOCK).enumerate() {
            let zero = is_zero(block);
            match (zero, start) {
                (false, None) => start = Some(i * BLOCK),
                (true, Some(s)) => {
                    file.write_all_at(&data[s..i * BLOCK], offset + s as u64)
                        .map_err(CopyError::Write)?;
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            file.write_all_at(&data[s..], offset + s as u64)
                .map_err(CopyError::Write)?;
        }
        offset += filled as u64;
        if filled < buf.len() {
            return Ok(offset);
        }
    }
}

/// Whether every byte of `block` is zero: an OR over 16-byte words, which the compiler turns
/// into vector instructions (a sparse file's holes come through here gigabytes at a time).
fn is_zero(block: &[u8]) -> bool {
    let mut words = block.chunks_exact(16);
    let acc = words.by_ref().fold(0u128, |acc, w| {
        acc | u128::from_le_bytes(w.try_into().expect("16 bytes"))
    });
    acc == 0 && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks() {
        let mut b = vec![0u8; 4096 + 5];
        assert!(is_zero(&b));
        for i in [0, 15, 16, 4095, 4100] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            b[i] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn pax_times() {
        let t = parse_pax_time(b"1700000000.5").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (1_700_000_000, 500_000_000));
        let t = parse_pax_time(b"-1.25").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (-2, 750_000_000));
        assert!(parse_pax_time(b"12x").is_none());
        assert!(parse_pax_time(b"1.2.3").is_none());
    }
}
