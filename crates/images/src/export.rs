//! A directory tree as a tar stream: the flattened filesystem (`container export`), and the
//! tar-entry writer the diff ([`crate::diff`]) shares.
//!
//! The stream is what [`crate::apply_layer`] reads back (and GNU tar, and Docker):
//!
//! - **Order.** Depth first, the names of each directory sorted bytewise, a directory's entry
//!   before its children; the root itself is not an entry. Paths are relative, without `./`;
//!   directories end with `/`. The same tree always gives the same bytes.
//! - **Headers.** POSIX ustar headers; a path or symlink/hardlink target longer than the
//!   100-byte field goes into a PAX `path`/`linkpath` record (the header field holds its first
//!   100 bytes); numbers too large for octal (sizes ≥ 8 GiB, big uids) use the base-256 numeric
//!   extension GNU tar, Go and the `tar` crate read.
//! - **Metadata.** Mode bits `0o7777` (setuid, setgid, sticky included), numeric uid/gid (no
//!   user names), mtime in the header in seconds plus a PAX `mtime` record
//!   (`SECONDS.NANOSECONDS`, trailing zeros trimmed) when the nanoseconds are not zero or the
//!   time is before 1970, as Docker writes it. Extended attributes as PAX
//!   `SCHILY.xattr.NAME` records, only the names the applier sets: `user.*`, `trusted.*`,
//!   `security.capability` (so `security.selinux` and ACLs are not carried).
//! - **Types.** Regular files, directories, symlinks, character and block devices, FIFOs; the
//!   second and later paths of an inode with more than one link become hardlink entries to the
//!   first path written. Sockets are skipped (a tar cannot hold one).
//! - **Sparse files.** A regular file's data regions are found with `SEEK_DATA`/`SEEK_HOLE`;
//!   a file with holes is written as an *old GNU sparse* entry (type `S`: the map of
//!   `(offset, length)` pairs in the header and in 512-byte extension headers, the apparent
//!   size in `realsize`) whose stored data is only the data regions, so a 15 GiB image file
//!   holding a few MiB stores a few MiB. GNU tar (`-S`) and the `tar` crate (hence the
//!   applier) restore it; every region but the last is widened to 512-byte boundaries, as the
//!   `tar` crate requires, and a file ending in a hole ends its map with `(size, 0)`, as GNU
//!   tar writes it.
//! - **`lost+found`.** At the top level only, an *empty* `lost+found` directory is skipped:
//!   it is what `mkfs.ext4` leaves on every volume, not content. A non-empty one (fsck put
//!   something there) is exported like any directory.
//!
//! Every object is reached as the applier reaches it: directories opened one at a time
//! relative to their parent with `O_DIRECTORY | O_NOFOLLOW`, files opened with `O_NOFOLLOW`,
//! the final component of everything else only handed to `*at` calls that do not follow it, so
//! nothing outside the root is ever read. File content is streamed through a 64 KiB buffer.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, SeekFrom};
use rustix::io::Errno;
use tar::{EntryType, GnuExtSparseHeader, Header};

use crate::error::{Error, Result};
use crate::resolve;

/// What [`export_tree`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Tar entries written (PAX headers not counted).
    pub entries: u64,
    /// Bytes of regular-file content stored in the tar (for a sparse file, its data regions
    /// only).
    pub bytes: u64,
    /// Regular files written with their content (hardlinks not counted).
    pub files: u64,
    /// Of those, files written as GNU sparse entries.
    pub sparse_files: u64,
}

/// Writes the whole tree under `root` to `out` as a tar stream (`docker export`).
///
/// The format is described in the module documentation (an empty top-level `lost+found` is
/// skipped, sockets too); `out` receives the complete archive,
/// end-of-archive blocks included, and is not flushed or closed. O(entries + stored bytes), one
/// file's 64 KiB buffer in memory at a time (plus the paths of multiply-linked inodes).
/// Needs read access to everything below `root` (root privileges for other users' files and
/// `trusted.*` xattrs). The tree should not change meanwhile: a file that shrinks while it is
/// read fails the export instead of giving a corrupt archive.
///
/// Errors: [`Error::Root`] if `root` cannot be opened; [`Error::Io`] naming the path for a
/// failed `stat`, `open`, read, `readlink`, xattr call or write to `out`; [`Error::Invalid`]
/// for a tree deeper than the applier accepts.
pub fn export_tree(root: &Path, out: impl Write) -> Result<ExportStats> {
    let root_fd = open_root(root)?;
    let mut tar = TarWriter::new(out);
    tar.emit_tree(root_fd.as_fd(), b"", 0, true)?;
    let stats = tar.stats;
    tar.finish()?;
    tracing::debug!(
        root = %root.display(),
        entries = stats.entries,
        bytes = stats.bytes,
        sparse_files = stats.sparse_files,
        "tree exported"
    );
    Ok(stats)
}

/// Opens `root` as a directory (following a symlink there: the caller names it).
pub(crate) fn open_root(root: &Path) -> Result<rustix::fd::OwnedFd> {
    rustix::fs::openat(
        rustix::fs::CWD,
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| Error::Root {
        path: root.to_path_buf(),
        source: errno.into(),
    })
}

/// The xattr names carried, the set the applier accepts (`apply.rs`, `xattr_allowed`).
fn xattr_carried(name: &[u8]) -> bool {
    name.starts_with(b"user.") || name.starts_with(b"trusted.") || name == b"security.capability"
}

/// `prefix/name` (or `name` at the top).
pub(crate) fn child_path(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    if prefix.is_empty() {
        name.to_vec()
    } else {
        [prefix, b"/", name].concat()
    }
}

/// An [`Error::Io`] on the tree path `rel`.
pub(crate) fn io_error(rel: &[u8], op: &'static str, source: io::Error) -> Error {
    let entry = String::from_utf8_lossy(rel).into_owned();
    Error::Io {
        entry,
        op,
        path: PathBuf::from(resolve::os(rel)),
        source,
    }
}

/// Extended attributes: (name, value) pairs.
pub(crate) type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// One directory entry's metadata, as the tar carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    pub(crate) kind: FileType,
    /// Permission bits with setuid, setgid and sticky (`0o7777`).
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Apparent size (regular files; other types' sizes are not carried).
    pub(crate) size: u64,
    pub(crate) mtime_sec: i64,
    pub(crate) mtime_nsec: u32,
    pub(crate) rdev: u64,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) nlink: u64,
    /// A symlink's target.
    pub(crate) target: Option<Vec<u8>>,
    /// The carried xattrs, sorted by name.
    pub(crate) xattrs: Xattrs,
}

impl Node {
    /// Reads `name` in `dir` (tree path `rel`, for errors) without following it: `lstat`,
    /// `readlink` for a symlink, the carried xattrs.
    pub(crate) fn read(dir: BorrowedFd<'_>, name: &[u8], rel: &[u8]) -> Result<Node> {
        let os = resolve::os(name);
        let st = rustix::fs::statat(dir, os, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_error(rel, "lstat", e.into()))?;
        let mut node = Node::from_stat(&st);
        if node.kind == FileType::Symlink {
            let target = rustix::fs::readlinkat(dir, os, Vec::new())
                .map_err(|e| io_error(rel, "readlink", e.into()))?;
            node.target = Some(target.into_bytes());
        }
        if node.kind != FileType::Socket {
            node.xattrs = read_xattrs(dir, name).map_err(|(op, e)| io_error(rel, op, e.into()))?;
        }
        Ok(node)
    }

    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    fn from_stat(st: &rustix::fs::Stat) -> Node {
        Node {
            kind: FileType::from_raw_mode(st.st_mode as _),
            mode: (st.st_mode as u32) & 0o7777,
            uid: st.st_uid as u32,
            gid: st.st_gid as u32,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime_sec: st.st_mtime as i64,
            mtime_nsec: st.st_mtime_nsec as u32,
            rdev: st.st_rdev as u64,
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            nlink: st.st_nlink as u64,
            target: None,
            xattrs: Vec::new(),
        }
    }
}

/// `/proc/self/fd/<dir>/<name>`: a path for the `l*xattr` calls, which have no `*at` form; the
/// final component is not followed by them.
fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> PathBuf {
    let mut path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    path.push(resolve::os(name));
    path
}

/// The carried xattrs of `name` in `dir`, sorted; the failed call's name.
fn read_xattrs(dir: BorrowedFd<'_>, name: &[u8]) -> Result<Xattrs, (&'static str, Errno)> {
    let path = proc_path(dir, name);
    let list = match with_buffer(|buf| rustix::fs::llistxattr(&path, buf)) {
        Ok(list) => list,
        Err(Errno::NOTSUP) => Vec::new(),
        Err(e) => return Err(("llistxattr", e)),
    };
    let mut out = Vec::new();
    for key in list.split(|&b| b == 0) {
        if key.is_empty() || !xattr_carried(key) {
            continue;
        }
        match with_buffer(|buf| rustix::fs::lgetxattr(&path, resolve::os(key), buf)) {
            Ok(value) => out.push((key.to_vec(), value)),
            // Removed in between.
            Err(Errno::NODATA) => {}
            Err(e) => return Err(("lgetxattr", e)),
        }
    }
    out.sort();
    Ok(out)
}

/// Runs an xattr call with a small buffer, then (`ERANGE`) with the largest one Linux needs
/// (`XATTR_LIST_MAX` = `XATTR_SIZE_MAX` = 64 KiB); answers the bytes it filled.
fn with_buffer(mut call: impl FnMut(&mut [u8]) -> Result<usize, Errno>) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; 256];
    let n = match call(&mut buf) {
        Err(Errno::RANGE) => {
            buf = vec![0u8; XATTR_MAX];
            call(&mut buf)?
        }
        other => other?,
    };
    buf.truncate(n);
    Ok(buf)
}

/// The largest xattr name list and value Linux has.
const XATTR_MAX: usize = 1 << 16;

/// Whether the directory `name` in `dir` has no entries.
fn dir_is_empty(dir: BorrowedFd<'_>, name: &[u8]) -> Result<bool, Errno> {
    let sub = resolve::open_subdir(dir, resolve::os(name))?;
    Ok(resolve::list_dir(sub.as_fd())?.is_empty())
}

/// The 512-byte tar block.
const BLOCK: u64 = 512;
/// Sparse-map pairs in an old GNU header.
const SPARSE_IN_HEADER: usize = 4;
/// Sparse-map pairs in each extension header.
const SPARSE_IN_EXTENSION: usize = 21;
/// Length of the ustar `name` and `linkname` fields.
const NAME_FIELD: usize = 100;

/// The data regions of a regular file of apparent size `size`: `(offset, length)` pairs in
/// order, non-overlapping; all but the last start and end on 512-byte boundaries (widened into
/// the holes around them, which read as zeros). A file system without `SEEK_DATA` gives one
/// region, the whole file.
fn data_regions(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut regions: Vec<(u64, u64)> = Vec::new();
    let mut offset = 0;
    while offset < size {
        let start = match rustix::fs::seek(file, SeekFrom::Data(offset)) {
            Ok(start) => start,
            // No data after `offset`.
            Err(Errno::NXIO) => break,
            Err(Errno::INVAL | Errno::NOTSUP) if offset == 0 => return Ok(vec![(0, size)]),
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match rustix::fs::seek(file, SeekFrom::Hole(start)) {
            Ok(end) => end.min(size),
            Err(Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        let start = start / BLOCK * BLOCK;
        let end = end.div_ceil(BLOCK).saturating_mul(BLOCK).min(size);
        match regions.last_mut() {
            Some((prev_off, prev_len)) if *prev_off + *prev_len >= start => {
                *prev_len = end - *prev_off;
            }
            _ => regions.push((start, end - start)),
        }
        offset = end.max(offset + 1);
    }
    Ok(regions)
}

/// A tar stream being written: headers, PAX records, file content, whiteouts, and the inodes
/// already written (for hardlinks). Shared by [`export_tree`] and [`crate::diff_layer`].
pub(crate) struct TarWriter<W: Write> {
    out: W,
    pub(crate) stats: ExportStats,
    /// `(dev, ino)` of each multiply-linked non-directory written with content → its path.
    links: HashMap<(u64, u64), Vec<u8>>,
    buf: Vec<u8>,
}

impl<W: Write> TarWriter<W> {
    pub(crate) fn new(out: W) -> Self {
        TarWriter {
            out,
            stats: ExportStats::default(),
            links: HashMap::new(),
            buf: Vec::new(),
        }
    }

    /// Writes the end-of-archive blocks; answers the writer.
    pub(crate) fn finish(mut self) -> Result<W> {
        self.out
            .write_all(&[0; 2 * BLOCK as usize])
            .and_then(|()| self.out.flush())
            .map_err(|e| io_error(b"", "write the end of the tar stream", e))?;
        Ok(self.out)
    }

    /// Writes every entry below the directory `dir` (tree path `prefix`, `depth` directories
    /// below the root), sorted, parents before children; answers the number of entries.
    /// `top` skips an empty `lost+found` (the caller is at the root of an export).
    pub(crate) fn emit_tree(
        &mut self,
        dir: BorrowedFd<'_>,
        prefix: &[u8],
        depth: usize,
        top: bool,
    ) -> Result<u64> {
        if depth >= resolve::MAX_DEPTH {
            return Err(Error::Invalid {
                entry: String::from_utf8_lossy(prefix).into_owned(),
                what: format!("directory tree deeper than {} levels", resolve::MAX_DEPTH),
            });
        }
        let mut names =
            resolve::list_dir(dir).map_err(|e| io_error(prefix, "readdir", e.into()))?;
        names.sort();
        let before = self.stats.entries;
        for name in names {
            let rel = child_path(prefix, &name);
            let node = Node::read(dir, &name, &rel)?;
            if top
                && name == b"lost+found"
                && node.kind == FileType::Directory
                && dir_is_empty(dir, &name).map_err(|e| io_error(&rel, "readdir", e.into()))?
            {
                tracing::debug!("empty top-level lost+found skipped");
                continue;
            }
            self.emit(dir, &name, &rel, &node)?;
            if node.kind == FileType::Directory {
                let sub = resolve::open_subdir(dir, resolve::os(&name))
                    .map_err(|e| io_error(&rel, "open", e.into()))?;
                self.emit_tree(sub.as_fd(), &rel, depth + 1, false)?;
            }
        }
        Ok(self.stats.entries - before)
    }

    /// Writes the entry for `name` in `dir` (tree path `rel`) described by `node`: a hardlink
    /// entry if another path of its inode was written already, else the object with its
    /// content. A socket writes nothing (answers `false`).
    pub(crate) fn emit(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        rel: &[u8],
        node: &Node,
    ) -> Result<bool> {
        if node.kind != FileType::Directory
            && node.nlink > 1
            && let Some(first) = self.links.get(&(node.dev, node.ino))
        {
            let first = first.clone();
            self.header(rel, node, EntryType::Link, Some(&first), 0)?;
            return Ok(true);
        }
        match node.kind {
            FileType::Socket => {
                tracing::debug!(path = %String::from_utf8_lossy(rel), "socket skipped");
                return Ok(false);
            }
            FileType::RegularFile => self.file(dir, name, rel, node)?,
            FileType::Directory => self.emit_dir(rel, node)?,
            FileType::Symlink => {
                self.header(rel, node, EntryType::Symlink, node.target.as_deref(), 0)?
            }
            FileType::CharacterDevice => self.header(rel, node, EntryType::Char, None, 0)?,
            FileType::BlockDevice => self.header(rel, node, EntryType::Block, None, 0)?,
            FileType::Fifo => self.header(rel, node, EntryType::Fifo, None, 0)?,
            FileType::Unknown => {
                return Err(Error::UnsupportedType {
                    entry: String::from_utf8_lossy(rel).into_owned(),
                    kind: "unknown file type".into(),
                });
            }
        }
        if node.kind != FileType::Directory && node.nlink > 1 {
            self.links.insert((node.dev, node.ino), rel.to_vec());
        }
        Ok(true)
    }

    /// Writes the entry of the directory at tree path `rel` (`rel/`), described by `node`.
    pub(crate) fn emit_dir(&mut self, rel: &[u8], node: &Node) -> Result<()> {
        let mut path = rel.to_vec();
        path.push(b'/');
        self.header(&path, node, EntryType::Directory, None, 0)
    }

    /// Writes a whiteout for tree path `rel` (`DIR/.wh.NAME`): an empty regular file, mode 0,
    /// owner 0:0, mtime 0 (the same bytes every time).
    pub(crate) fn whiteout(&mut self, rel: &[u8]) -> Result<()> {
        let (dir, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (&rel[..=i], &rel[i + 1..]),
            None => (&b""[..], rel),
        };
        let path = [dir, b".wh.", name].concat();
        let node = Node {
            kind: FileType::RegularFile,
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            rdev: 0,
            dev: 0,
            ino: 0,
            nlink: 1,
            target: None,
            xattrs: Vec::new(),
        };
        self.header(&path, &node, EntryType::Regular, None, 0)
    }

    /// The PAX records and the ustar header for `path`; writes both. `size` is the header's
    /// size field (content follows, written by the caller).
    fn header(
        &mut self,
        path: &[u8],
        node: &Node,
        kind: EntryType,
        link: Option<&[u8]>,
        size: u64,
    ) -> Result<()> {
        let mut header = Header::new_ustar();
        self.prepare(&mut header, path, node, kind, link, size)?;
        header.set_cksum();
        self.write(path, header.as_bytes())
    }

    /// Fills `header` (ustar or GNU) and writes the PAX records it needs.
    fn prepare(
        &mut self,
        header: &mut Header,
        path: &[u8],
        node: &Node,
        kind: EntryType,
        link: Option<&[u8]>,
        size: u64,
    ) -> Result<()> {
        let mut pax = Vec::new();
        let name_field = &mut header.as_old_mut().name;
        if path.len() <= NAME_FIELD {
            name_field[..path.len()].copy_from_slice(path);
        } else {
            name_field.copy_from_slice(&path[..NAME_FIELD]);
            pax_record(&mut pax, b"path", path);
        }
        if let Some(link) = link {
            let field = &mut header.as_old_mut().linkname;
            if link.len() <= NAME_FIELD {
                field[..link.len()].copy_from_slice(link);
            } else {
                field.copy_from_slice(&link[..NAME_FIELD]);
                pax_record(&mut pax, b"linkpath", link);
            }
        }
        header.set_entry_type(kind);
        header.set_mode(node.mode);
        header.set_uid(u64::from(node.uid));
        header.set_gid(u64::from(node.gid));
        header.set_size(size);
        header.set_mtime(u64::try_from(node.mtime_sec).unwrap_or(0));
        if node.mtime_nsec != 0 || node.mtime_sec < 0 {
            pax_record(&mut pax, b"mtime", pax_time(node).as_bytes());
        }
        if matches!(kind, EntryType::Char | EntryType::Block) {
            let invalid = |_| Error::Invalid {
                entry: String::from_utf8_lossy(path).into_owned(),
                what: "device number (too large for the header)".into(),
            };
            header
                .set_device_major(rustix::fs::major(node.rdev))
                .map_err(invalid)?;
            header
                .set_device_minor(rustix::fs::minor(node.rdev))
                .map_err(invalid)?;
        }
        if kind != EntryType::Link {
            for (key, value) in &node.xattrs {
                pax_record(&mut pax, &[b"SCHILY.xattr.", &key[..]].concat(), value);
            }
        }
        if !pax.is_empty() {
            let mut xheader = Header::new_ustar();
            xheader.set_entry_type(EntryType::XHeader);
            xheader.set_size(pax.len() as u64);
            xheader.set_mode(0o644);
            xheader.set_cksum();
            self.write(path, xheader.as_bytes())?;
            self.write(path, &pax)?;
            self.pad(path, pax.len() as u64)?;
        }
        self.stats.entries += 1;
        Ok(())
    }

    /// A regular file: plain or GNU sparse, content streamed from a descriptor opened without
    /// following a symlink.
    fn file(&mut self, dir: BorrowedFd<'_>, name: &[u8], rel: &[u8], node: &Node) -> Result<()> {
        let fd = rustix::fs::openat(
            dir,
            resolve::os(name),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
        )
        .map_err(|e| io_error(rel, "open", e.into()))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| io_error(rel, "fstat", e.into()))?;
        let now = Node::from_stat(&st);
        if now.kind != FileType::RegularFile || now.ino != node.ino || now.dev != node.dev {
            return Err(io_error(
                rel,
                "open",
                io::Error::other("replaced by another file while being exported"),
            ));
        }
        let file = File::from(fd);
        let size = node.size;
        let regions = if size == 0 {
            Vec::new()
        } else {
            data_regions(&file, size).map_err(|e| io_error(rel, "seek data/hole", e))?
        };
        let stored: u64 = regions.iter().map(|&(_, len)| len).sum();
        self.stats.files += 1;
        if stored == size {
            self.header(rel, node, EntryType::Regular, None, size)?;
            self.copy(rel, &file, &[(0, size)])?;
        } else {
            self.stats.sparse_files += 1;
            self.sparse_header(rel, node, &regions, stored)?;
            self.copy(rel, &file, &regions)?;
        }
        self.pad(rel, stored)
    }

    /// The old GNU sparse header (type `S`) and its extension headers. The map ends at the
    /// apparent size: a file ending in a hole gets a final `(size, 0)` pair.
    fn sparse_header(
        &mut self,
        rel: &[u8],
        node: &Node,
        regions: &[(u64, u64)],
        stored: u64,
    ) -> Result<()> {
        let mut map = regions.to_vec();
        if map.last().is_none_or(|&(off, len)| off + len < node.size) {
            map.push((node.size, 0));
        }
        let mut header = Header::new_gnu();
        self.prepare(&mut header, rel, node, EntryType::GNUSparse, None, stored)?;
        let gnu = header
            .as_gnu_mut()
            .expect("Header::new_gnu makes a GNU header");
        gnu.set_real_size(node.size);
        for (slot, &(off, len)) in gnu.sparse.iter_mut().zip(&map) {
            slot.set_offset(off);
            slot.set_length(len);
        }
        gnu.set_is_extended(map.len() > SPARSE_IN_HEADER);
        header.set_cksum();
        self.write(rel, header.as_bytes())?;
        let mut rest = map
            .get(SPARSE_IN_HEADER..)
            .unwrap_or(&[])
            .chunks(SPARSE_IN_EXTENSION);
        let mut chunk = rest.next();
        while let Some(pairs) = chunk {
            let mut ext = GnuExtSparseHeader::new();
            for (slot, &(off, len)) in ext.sparse.iter_mut().zip(pairs) {
                slot.set_offset(off);
                slot.set_length(len);
            }
            chunk = rest.next();
            ext.set_is_extended(chunk.is_some());
            self.write(rel, ext.as_bytes())?;
        }
        Ok(())
    }

    /// Copies the `regions` of `file` to the stream; a file shorter than its regions (it
    /// shrank) is an error, as a short entry would corrupt the archive.
    fn copy(&mut self, rel: &[u8], file: &File, regions: &[(u64, u64)]) -> Result<()> {
        if self.buf.is_empty() {
            self.buf = vec![0; 1 << 16];
        }
        for &(offset, len) in regions {
            let mut done = 0;
            while done < len {
                let want = usize::try_from(len - done)
                    .unwrap_or(usize::MAX)
                    .min(self.buf.len());
                let n = match file.read_at(&mut self.buf[..want], offset + done) {
                    Ok(0) => {
                        return Err(io_error(
                            rel,
                            "read",
                            io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "file shrank while being exported",
                            ),
                        ));
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io_error(rel, "read", e)),
                };
                self.out
                    .write_all(&self.buf[..n])
                    .map_err(|e| io_error(rel, "write to the tar stream", e))?;
                done += n as u64;
            }
            self.stats.bytes += len;
        }
        Ok(())
    }

    /// Zeros up to the next 512-byte boundary after `len` bytes of content.
    fn pad(&mut self, rel: &[u8], len: u64) -> Result<()> {
        let rem = (len % BLOCK) as usize;
        if rem == 0 {
            return Ok(());
        }
        self.write(rel, &[0; BLOCK as usize][rem..])
    }

    fn write(&mut self, rel: &[u8], bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| io_error(rel, "write to the tar stream", e))
    }
}

/// Appends the PAX record `LEN KEY=VALUE\n` (LEN counts itself).
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// A PAX time `[-]SECONDS[.FRACTION]`, trailing zeros of the fraction trimmed (Go's format).
fn pax_time(node: &Node) -> String {
    let (negative, secs, nsec) = if node.mtime_sec >= 0 {
        (false, node.mtime_sec.unsigned_abs(), node.mtime_nsec)
    } else if node.mtime_nsec == 0 {
        (true, node.mtime_sec.unsigned_abs(), 0)
    } else {
        (
            true,
            (node.mtime_sec + 1).unsigned_abs(),
            1_000_000_000 - node.mtime_nsec,
        )
    };
    let sign = if negative { "-" } else { "" };
    if nsec == 0 {
        return format!("{sign}{secs}");
    }
    let frac = format!("{nsec:09}");
    format!("{sign}{secs}.{}", frac.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_count_their_own_length() {
        let mut out = Vec::new();
        pax_record(&mut out, b"path", b"a");
        assert_eq!(out, b"9 path=a\n");
        let mut out = Vec::new();
        // 10 bytes without the length, whose 2 digits make 12.
        pax_record(&mut out, b"path", b"abc");
        assert_eq!(out, b"12 path=abc\n");
        let mut out = Vec::new();
        let value = vec![b'x'; 92];
        // 99 bytes without the length, whose 3 digits make 102.
        pax_record(&mut out, b"path", &value);
        assert_eq!(out.len(), 102);
        assert!(out.starts_with(b"102 path="));
        // 98 bytes: "100" would make 101, so the length is 101.
        let mut out = Vec::new();
        pax_record(&mut out, b"path", &value[..91]);
        assert_eq!(out.len(), 101);
        assert!(out.starts_with(b"101 path="));
    }

    #[test]
    fn pax_times_match_the_applier() {
        let mut node = Node {
            kind: FileType::RegularFile,
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 500_000_000,
            rdev: 0,
            dev: 0,
            ino: 0,
            nlink: 1,
            target: None,
            xattrs: Vec::new(),
        };
        assert_eq!(pax_time(&node), "1700000000.5");
        node.mtime_sec = -2;
        node.mtime_nsec = 750_000_000;
        assert_eq!(pax_time(&node), "-1.25");
        node.mtime_nsec = 0;
        assert_eq!(pax_time(&node), "-2");
        node.mtime_sec = 5;
        node.mtime_nsec = 1;
        assert_eq!(pax_time(&node), "5.000000001");
    }
}
