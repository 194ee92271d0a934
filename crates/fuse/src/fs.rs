//! The filesystem: one folder (inode 1) holding one regular file per volume.
//!
//! Nothing about volumes is cached: a lookup, a `stat` or a listing asks the pool, and the
//! kernel is told to keep entries and attributes for zero seconds. What is kept is the inode
//! number given to each volume (a counter, never reused in a mount), tied to the volume's
//! thin id and creation time: a volume removed and made again under the same name is a new
//! inode, and the old one answers ENOENT.
//!
//! Requests run on several threads at once. Each holds the `gate` (a read lock) while it
//! works; [`Shared::close`] takes it for writing, so it waits for requests in flight and then
//! drops the pool and every open volume handle.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use thinpool_engine::{ErrorKind, Pool, Volume, VolumeInfo, VolumeKind};

use crate::FuseConfig;

/// Entries and attributes are not cached: volumes come, go and change size from elsewhere.
const TTL: Duration = Duration::ZERO;

/// `fallocate(2)` mode bits (linux/falloc.h).
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;
/// `lseek(2)` whence values for sparse files (linux/fs.h).
const SEEK_DATA: i32 = 3;
const SEEK_HOLE: i32 = 4;

/// The engine's error as an errno, by its kind.
fn errno_of(e: &thinpool_engine::Error) -> Errno {
    match e.kind() {
        ErrorKind::NoSpace => Errno::ENOSPC,
        ErrorKind::ReadOnly => Errno::EROFS,
        ErrorKind::InvalidArgument => Errno::EINVAL,
        ErrorKind::NotFound => Errno::ENOENT,
        ErrorKind::Exists => Errno::EEXIST,
        ErrorKind::Busy => Errno::EBUSY,
        ErrorKind::Io | ErrorKind::Corrupt => Errno::EIO,
    }
}

/// Log an engine error of a request and turn it into an errno: device and metadata failures
/// are errors, the rest (full pool, read-only pool, ...) an answer the client gets.
fn failed(what: &str, name: &str, e: &thinpool_engine::Error) -> Errno {
    match e.kind() {
        ErrorKind::Io | ErrorKind::Corrupt => {
            tracing::error!(target: "thinpool::datapath", volume = name, "{what}: {e}");
        }
        _ => tracing::debug!(target: "thinpool::datapath", volume = name, "{what}: {e}"),
    }
    errno_of(e)
}

thread_local! {
    /// The buffer reads are answered from, one per serving thread, kept at the largest read
    /// seen (the kernel sends at most max_pages pages, 1 MiB by default): a read neither
    /// allocates nor zero-fills (a fresh zeroed 1 MiB buffer per request cost as much CPU as
    /// the copy to the kernel).
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An open file: a volume handle and what the opener may do.
struct OpenFile {
    vol: Volume,
    writable: bool,
    /// Opened with O_SYNC or O_DSYNC: every write is made durable before it is answered.
    sync: bool,
}

/// The inode given to a volume, and which volume it was.
#[derive(Clone, Copy)]
struct Node {
    ino: u64,
    thin_id: u32,
    created: u64,
}

#[derive(Default)]
struct Nodes {
    by_name: HashMap<String, Node>,
    names: HashMap<u64, String>,
    next: u64,
}

/// State shared by the serving threads and the [`crate::FuseServer`].
pub(crate) struct Shared {
    /// The pool, until [`Shared::close`].
    gate: RwLock<Option<Arc<Pool>>>,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    nodes: Mutex<Nodes>,
    next_fh: AtomicU64,
    block_size: u64,
    read_only: bool,
    snapshots_read_only: bool,
    uid: u32,
    gid: u32,
    started: SystemTime,
}

impl Shared {
    pub(crate) fn new(pool: Arc<Pool>, block_size: u64, cfg: &FuseConfig) -> Shared {
        Shared {
            gate: RwLock::new(Some(pool)),
            files: Mutex::new(HashMap::new()),
            nodes: Mutex::new(Nodes {
                next: 2,
                ..Nodes::default()
            }),
            next_fh: AtomicU64::new(1),
            block_size,
            read_only: cfg.read_only,
            snapshots_read_only: cfg.snapshots_read_only,
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            started: SystemTime::now(),
        }
    }

    /// Wait for the requests in flight, then drop the pool and every open volume handle.
    /// Later requests fail with EIO.
    pub(crate) fn close(&self) {
        let mut gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        gate.take();
        self.files.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The volumes with an open file, with how many handles each ("web (2)").
    pub(crate) fn open_files(&self) -> Vec<String> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let mut count: HashMap<&str, usize> = HashMap::new();
        for f in files.values() {
            *count.entry(f.vol.name()).or_default() += 1;
        }
        let mut out: Vec<String> = count.iter().map(|(n, c)| format!("{n} ({c})")).collect();
        out.sort();
        out
    }

    /// Run `f` with the pool, unless the export is closed (EIO).
    fn with_pool<T>(&self, f: impl FnOnce(&Pool) -> Result<T, Errno>) -> Result<T, Errno> {
        let gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        match gate.as_ref() {
            Some(p) => f(p),
            None => Err(Errno::EIO),
        }
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<OpenFile>, Errno> {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    /// The inode of this volume: the one it had, or a new one if the name now belongs to
    /// another volume (or was never seen).
    fn node_for(&self, info: &VolumeInfo) -> u64 {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = nodes.by_name.get(&info.name)
            && n.thin_id == info.thin_id
            && n.created == info.created
        {
            return n.ino;
        }
        let ino = nodes.next;
        nodes.next += 1;
        if let Some(old) = nodes.by_name.insert(
            info.name.clone(),
            Node {
                ino,
                thin_id: info.thin_id,
                created: info.created,
            },
        ) {
            nodes.names.remove(&old.ino);
        }
        nodes.names.insert(ino, info.name.clone());
        ino
    }

    /// The volume behind inode `ino`, as it is now; ENOENT when it is gone or its name now
    /// belongs to another volume.
    fn volume_of(&self, pool: &Pool, ino: u64) -> Result<VolumeInfo, Errno> {
        let (name, node) = {
            let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
            let name = nodes.names.get(&ino).ok_or(Errno::ENOENT)?.clone();
            let node = *nodes.by_name.get(&name).ok_or(Errno::ENOENT)?;
            (name, node)
        };
        let info = pool.volume_info(&name).map_err(|e| match e.kind() {
            ErrorKind::NotFound => Errno::ENOENT,
            _ => failed("looking up", &name, &e),
        })?;
        if info.thin_id != node.thin_id || info.created != node.created {
            return Err(Errno::ENOENT);
        }
        Ok(info)
    }

    fn is_read_only(&self, info: &VolumeInfo) -> bool {
        self.read_only || (self.snapshots_read_only && info.kind == VolumeKind::Snapshot)
    }

    fn file_attr(&self, ino: u64, info: &VolumeInfo) -> FileAttr {
        let t = UNIX_EPOCH + Duration::from_secs(info.created);
        FileAttr {
            ino: INodeNo(ino),
            size: info.size,
            blocks: info.mapped_blocks.saturating_mul(self.block_size) / 512,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: FileType::RegularFile,
            perm: if self.is_read_only(info) {
                0o400
            } else {
                0o600
            },
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: u32::try_from(self.block_size).unwrap_or(1 << 20),
            flags: 0,
        }
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo::ROOT,
            size: 0,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::Directory,
            perm: 0o700,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

/// Where `SEEK_DATA` (`data`) or `SEEK_HOLE` from `offset` lands in a file of `size` bytes,
/// given `extents(start, len)`: the mapped ranges inside `start..start+len`, ascending and
/// merged. `None` is "no data past offset" (ENXIO); a hole is always found, at `size` at the
/// latest. The file is looked at in windows that double (64 MiB first), so a seek near
/// `offset` costs little on a large volume.
pub(crate) fn seek<E>(
    size: u64,
    offset: u64,
    data: bool,
    mut extents: impl FnMut(u64, u64) -> Result<Vec<(u64, u64)>, E>,
) -> Result<Option<u64>, E> {
    let mut pos = offset;
    let mut window: u64 = 64 << 20;
    while pos < size {
        let len = window.min(size - pos);
        let ext = extents(pos, len)?;
        if data {
            if let Some(&(s, _)) = ext.first() {
                return Ok(Some(s.max(pos)));
            }
        } else {
            let mut at = pos;
            for (s, l) in ext {
                if s > at {
                    return Ok(Some(at));
                }
                at = at.max(s + l);
            }
            if at < pos + len {
                return Ok(Some(at));
            }
        }
        pos += len;
        window = window.saturating_mul(2).min(1 << 40);
    }
    Ok(if data { None } else { Some(size) })
}

/// What a `fallocate(2)` mode asks of a volume file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fallocate {
    /// Make the range read zeros (clipped to the size when `keep_size`).
    Zero { keep_size: bool },
    /// Not offered: plain allocation cannot reserve blocks in a thin pool, and the rest
    /// (collapse, insert, unshare) does not apply.
    Unsupported,
}

pub(crate) fn fallocate_mode(mode: i32) -> Fallocate {
    if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE {
        Fallocate::Zero { keep_size: true }
    } else if mode & !FALLOC_FL_KEEP_SIZE == FALLOC_FL_ZERO_RANGE {
        Fallocate::Zero {
            keep_size: mode & FALLOC_FL_KEEP_SIZE != 0,
        }
    } else {
        Fallocate::Unsupported
    }
}

/// The filesystem fuser serves; all state is in [`Shared`].
pub(crate) struct VolumeFs {
    shared: Arc<Shared>,
}

impl VolumeFs {
    pub(crate) fn new(shared: Arc<Shared>) -> VolumeFs {
        VolumeFs { shared }
    }

    fn getattr_of(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        let sh = &self.shared;
        if ino == INodeNo::ROOT {
            return Ok(sh.root_attr());
        }
        sh.with_pool(|pool| {
            let info = sh.volume_of(pool, ino.0)?;
            Ok(sh.file_attr(ino.0, &info))
        })
    }

    fn set_size(&self, ino: INodeNo, size: u64) -> Result<FileAttr, Errno> {
        let sh = &self.shared;
        sh.with_pool(|pool| {
            let info = sh.volume_of(pool, ino.0)?;
            if size == info.size {
                return Ok(sh.file_attr(ino.0, &info));
            }
            if sh.is_read_only(&info) {
                return Err(Errno::EROFS);
            }
            if size < info.size {
                tracing::warn!(
                    volume = %info.name,
                    from = info.size,
                    to = size,
                    "refused to shrink a volume through its file (truncate): that cuts data; shrink it with `thinpool vol resize {} SIZE`",
                    info.name
                );
                return Err(Errno::EPERM);
            }
            pool.resize_volume(&info.name, size)
                .map_err(|e| failed("growing", &info.name, &e))?;
            let info = sh.volume_of(pool, ino.0)?;
            Ok(sh.file_attr(ino.0, &info))
        })
    }

    fn do_write(&self, fh: FileHandle, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let sh = &self.shared;
        sh.with_pool(|_| {
            let f = sh.file(fh)?;
            if !f.writable {
                return Err(Errno::EBADF);
            }
            let size = f.vol.size();
            if offset >= size && !data.is_empty() {
                tracing::debug!(
                    target: "thinpool::datapath",
                    volume = f.vol.name(),
                    offset,
                    size,
                    "write past the end of the volume refused (grow it with truncate or vol resize)"
                );
                return Err(Errno::EFBIG);
            }
            // A write running past the end is cut there, as a block device does.
            let n = (data.len() as u64).min(size.saturating_sub(offset)) as usize;
            let data = &data[..n];
            let r = if f.sync {
                f.vol.write_fua(data, offset)
            } else {
                f.vol.write_at(data, offset)
            };
            r.map_err(|e| failed("write", f.vol.name(), &e))?;
            Ok(n as u32)
        })
    }

    fn do_fallocate(&self, fh: FileHandle, offset: u64, len: u64, mode: i32) -> Result<(), Errno> {
        let sh = &self.shared;
        let Fallocate::Zero { keep_size } = fallocate_mode(mode) else {
            return Err(Errno::EOPNOTSUPP);
        };
        sh.with_pool(|_| {
            let f = sh.file(fh)?;
            if !f.writable {
                return Err(Errno::EBADF);
            }
            let size = f.vol.size();
            let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
            if end > size && !keep_size {
                // Zeroing past the end would grow the file: grow it with truncate first.
                return Err(Errno::EOPNOTSUPP);
            }
            let end = end.min(size);
            if offset >= end {
                return Ok(());
            }
            f.vol
                .write_zeroes(offset, end - offset)
                .map_err(|e| failed("fallocate", f.vol.name(), &e))
        })
    }

    fn do_lseek(&self, fh: FileHandle, offset: i64, whence: i32) -> Result<i64, Errno> {
        let sh = &self.shared;
        let data = match whence {
            SEEK_DATA => true,
            SEEK_HOLE => false,
            _ => return Err(Errno::EINVAL),
        };
        let offset = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
        sh.with_pool(|_| {
            let f = sh.file(fh)?;
            let size = f.vol.size();
            if offset >= size {
                return Err(Errno::ENXIO);
            }
            let found = seek(size, offset, data, |s, l| f.vol.mapped_extents(s, l))
                .map_err(|e| failed("lseek", f.vol.name(), &e))?;
            let at = found.ok_or(Errno::ENXIO)?;
            i64::try_from(at).map_err(|_| Errno::EOVERFLOW)
        })
    }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Loop devices and O_DIRECT users send many requests at once: let them queue.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        for cap in [
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ] {
            if config.add_capabilities(cap).is_err() {
                tracing::debug!(?cap, "the kernel does not offer this FUSE capability");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let sh = &self.shared;
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        let r = sh.with_pool(|pool| {
            let info = pool.volume_info(name).map_err(|e| match e.kind() {
                ErrorKind::NotFound | ErrorKind::InvalidArgument => Errno::ENOENT,
                _ => failed("looking up", name, &e),
            })?;
            let ino = sh.node_for(&info);
            Ok(sh.file_attr(ino, &info))
        });
        match r {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.getattr_of(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Owner and mode are the export's; times are not kept (touch succeeds, changes
        // nothing).
        let r = if mode.is_some() || uid.is_some() || gid.is_some() {
            Err(Errno::EPERM)
        } else if let Some(size) = size {
            if ino == INodeNo::ROOT {
                Err(Errno::EISDIR)
            } else {
                self.set_size(ino, size)
            }
        } else {
            self.getattr_of(ino)
        };
        match r {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let sh = &self.shared;
        let writable = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let sync = flags.0 & rustix::fs::OFlags::DSYNC.bits() as i32 != 0;
        let r = sh.with_pool(|pool| {
            if ino == INodeNo::ROOT {
                return Err(Errno::EISDIR);
            }
            let info = sh.volume_of(pool, ino.0)?;
            if writable && sh.is_read_only(&info) {
                return Err(Errno::EROFS);
            }
            let vol = pool
                .open_volume(&info.name)
                .map_err(|e| failed("open", &info.name, &e))?;
            let fh = sh.next_fh.fetch_add(1, Ordering::Relaxed);
            let file = Arc::new(OpenFile {
                vol,
                writable,
                sync,
            });
            sh.files
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(fh, file);
            tracing::debug!(volume = %info.name, fh, writable, sync, "file opened");
            Ok(fh)
        });
        match r {
            Ok(fh) => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let sh = &self.shared;
        READ_BUF.with_borrow_mut(|buf| {
            let r = sh.with_pool(|_| {
                let f = sh.file(fh)?;
                let vsize = f.vol.size();
                let n = u64::from(size).min(vsize.saturating_sub(offset)) as usize;
                if buf.len() < n {
                    buf.resize(n, 0);
                }
                if n > 0 {
                    // Every byte of buf[..n] is written (data or zeros) when this succeeds;
                    // on an error nothing of the buffer is sent.
                    f.vol
                        .read_at(&mut buf[..n], offset)
                        .map_err(|e| failed("read", f.vol.name(), &e))?;
                }
                Ok(n)
            });
            match r {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(e),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.do_write(fh, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) of a file opened for writing makes what it wrote durable, as fsync does:
        // `dd`, `cp` and `qemu-img` then leave nothing to the 1 s commit.
        let sh = &self.shared;
        let r = sh.with_pool(|_| {
            let f = sh.file(fh)?;
            if f.writable {
                f.vol
                    .flush()
                    .map_err(|e| failed("flush", f.vol.name(), &e))?;
            }
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.shared
            .files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        let sh = &self.shared;
        let r = sh.with_pool(|_| {
            let f = sh.file(fh)?;
            f.vol.flush().map_err(|e| failed("fsync", f.vol.name(), &e))
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let sh = &self.shared;
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let r = sh.with_pool(|pool| {
            let vols = pool
                .volumes()
                .map_err(|e| failed("listing volumes", "-", &e))?;
            let mut entries = vec![
                (INodeNo::ROOT, FileType::Directory, ".".to_string()),
                (INodeNo::ROOT, FileType::Directory, "..".to_string()),
            ];
            for v in &vols {
                entries.push((
                    INodeNo(sh.node_for(v)),
                    FileType::RegularFile,
                    v.name.clone(),
                ));
            }
            Ok(entries)
        });
        match r {
            Ok(entries) => {
                let skip = usize::try_from(offset).unwrap_or(usize::MAX);
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
                    if reply.add(ino, i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let r = self
            .shared
            .with_pool(|pool| pool.status().map_err(|e| failed("statfs", "-", &e)));
        match r {
            Ok(s) => {
                let files = (s.volumes + s.snapshots) as u64;
                let free = s.total_data_blocks.saturating_sub(s.used_data_blocks);
                let bsize = u32::try_from(s.block_size).unwrap_or(1 << 20);
                reply.statfs(
                    s.total_data_blocks,
                    free,
                    free,
                    files,
                    (1u64 << 24).saturating_sub(files),
                    bsize,
                    255,
                    bsize,
                );
            }
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.do_fallocate(fh, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.do_lseek(fh, offset, whence) {
            Ok(at) => reply.offset(at),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        tracing::debug!(name = ?name, "unlink refused: volumes are removed with `thinpool vol rm`");
        reply.error(Errno::EPERM);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        // Volumes are made with `thinpool vol create`.
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    /// `extents` over a fixed map (ascending, merged), clipped as the engine clips them.
    fn map(m: &[(u64, u64)]) -> impl FnMut(u64, u64) -> Result<Vec<(u64, u64)>, ()> + '_ {
        |s, l| {
            Ok(m.iter()
                .filter_map(|&(a, n)| {
                    let (b, e) = (a.max(s), (a + n).min(s + l));
                    (b < e).then_some((b, e - b))
                })
                .collect())
        }
    }

    #[test]
    fn seek_data_and_hole_follow_the_map() {
        let size = 1 << 30;
        let m = [(0, M), (100 * M, 2 * M), (900 * M, 124 * M)];
        assert_eq!(seek(size, 0, true, map(&m)), Ok(Some(0)));
        assert_eq!(seek(size, 0, false, map(&m)), Ok(Some(M)));
        assert_eq!(seek(size, M, true, map(&m)), Ok(Some(100 * M)));
        assert_eq!(seek(size, 101 * M, true, map(&m)), Ok(Some(101 * M)));
        assert_eq!(seek(size, 101 * M, false, map(&m)), Ok(Some(102 * M)));
        // The last extent runs to the end: the hole is at the end of the file.
        assert_eq!(seek(size, 950 * M, false, map(&m)), Ok(Some(size)));
        assert_eq!(seek(size, 103 * M, true, map(&m)), Ok(Some(900 * M)));
    }

    #[test]
    fn seek_across_window_edges() {
        // One extent straddling the first 64 MiB window: the hole is after it, not at the
        // window's edge.
        let size = 512 * M;
        let m = [(60 * M, 10 * M)];
        assert_eq!(seek(size, 61 * M, false, map(&m)), Ok(Some(70 * M)));
        assert_eq!(seek(size, 0, true, map(&m)), Ok(Some(60 * M)));
        assert_eq!(seek(size, 70 * M, true, map(&m)), Ok(None));
        let empty: [(u64, u64); 0] = [];
        assert_eq!(seek(size, 5, true, map(&empty)), Ok(None));
        assert_eq!(seek(size, 5, false, map(&empty)), Ok(Some(5)));
        // Fully mapped: no hole before the end.
        let full = [(0, size)];
        assert_eq!(seek(size, 7, false, map(&full)), Ok(Some(size)));
    }

    #[test]
    fn fallocate_modes() {
        assert_eq!(
            fallocate_mode(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE),
            Fallocate::Zero { keep_size: true }
        );
        assert_eq!(
            fallocate_mode(FALLOC_FL_ZERO_RANGE),
            Fallocate::Zero { keep_size: false }
        );
        assert_eq!(
            fallocate_mode(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE),
            Fallocate::Zero { keep_size: true }
        );
        // Punch without KEEP_SIZE is invalid for Linux too; plain allocation is refused.
        assert_eq!(fallocate_mode(FALLOC_FL_PUNCH_HOLE), Fallocate::Unsupported);
        assert_eq!(fallocate_mode(0), Fallocate::Unsupported);
        assert_eq!(fallocate_mode(FALLOC_FL_KEEP_SIZE), Fallocate::Unsupported);
        assert_eq!(fallocate_mode(0x08), Fallocate::Unsupported); // COLLAPSE_RANGE
    }
}
