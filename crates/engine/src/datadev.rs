//! [`DataDev`]: the pool's data device, switchable online; and the data move built on it
//! ([`Pool::move_data`](crate::Pool::move_data), `thinpool pool move-data`).
//!
//! Every data I/O of the pool goes through one `DataDev`. Normally it passes each call to the
//! one device it holds. While the data moves to another device it *mirrors*:
//!
//! ```text
//!            reads ──────────────────────────▶ old
//! writes, punches, copies ──▶ stripe lock ──▶ old, then new   (same bytes on both)
//!                    sync ──────────────────▶ old, then new
//! background copy of block b ──▶ stripe lock(b) ──▶ read old, write new
//! ```
//!
//! A mirrored call and the background copy of the same data block hold the same stripe lock,
//! so a copy can never put older bytes on the new device over a newer write: whichever runs
//! second leaves `new[b] == old[b]`, and every later mirrored call keeps it so.
//!
//! # The move, and why an interruption loses nothing
//!
//! 1. Mirror on. Turning it on takes the mode lock exclusively, which waits for every device
//!    call issued before (a write that went to the old device only has completed).
//! 2. Forget which free blocks are known to read zeros (`zeroed`): that knowledge was about
//!    the old device. Done after step 1, so every bit set from now on comes from a mirrored
//!    punch and holds for both devices.
//! 3. List the data blocks in use (reference count > 0, which includes blocks allocated and
//!    not yet mapped). A block not listed was free at that moment: if it is used later it is
//!    allocated again, after step 1, and every byte it gets is mirrored.
//! 4. Copy each listed block, old to new, under its stripe lock; sync the new device.
//! 5. Verify: every block in use now is read from both devices and compared.
//! 6. Commit (syncs both data devices, then the metadata). From here every mapping in the
//!    durable metadata points at a block that holds the same bytes on both devices.
//! 7. Cut over: the mirror becomes *strict* (a failure on either device fails the caller's
//!    I/O; before this, a failure on the new device only aborts the move). Then
//!    `<root>/pool/data.new` → dest is made, the directory synced, renamed over
//!    `<root>/pool/data`, the directory synced again.
//! 8. Single(new). The old device is closed.
//!
//! A crash before the rename reaches the disk leaves `pool/data` → old: the old device got
//! every write (it is written first, and a failure there fails the write), the metadata was
//! committed against it, and the half-copied new device is simply not used. A crash after
//! it: the new device holds every block the durable metadata maps (steps 3–6), and every later
//! write reached it before being acknowledged (steps 7–8). A stale `pool/data.new` is
//! removed by the next move. If the old data was a regular file in `pool/` (the default
//! sparse file), it gets a second name `pool/data.old` before the rename, so at no moment has
//! it no name; it is kept for the user to delete (the CLI says so): a move is a migration
//! and the user may want the old copy until they trust the new device.
//!
//! Costs: in single mode each call takes one uncontended shared lock more; while mirroring
//! writes cost two device writes and a stripe lock. The move itself reads the used blocks
//! twice and writes them once; it never holds the metadata lock during I/O.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use serde::Serialize;
use thinpool_io::{BlockDevice, FileDevice};

use crate::pool::{Inner, PoolMode};
use crate::zeroed::ZeroMap;
use crate::{Error, Result};

/// Stripes of the per-block lock: data block `b` is guarded by stripe `b % STRIPES`.
const STRIPES: usize = 256;

/// Blocks whose reference counts are read per hold of the metadata lock while listing the
/// blocks in use (so that I/O is not held off for long on a large pool).
const SCAN_CHUNK: u64 = 16384;

/// Where a move stops early, for tests of interruptions: the move returns at that point
/// as a crash would leave it (the pool keeps mirroring until it is dropped).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveStage {
    /// Mirroring, half of the blocks copied.
    HalfCopied,
    /// All blocks copied and verified, committed.
    Verified,
    /// `pool/data.new` made (and `pool/data.old`), not yet renamed over `pool/data`.
    Linked,
    /// Renamed: `pool/data` leads to the new device; still mirroring.
    Renamed,
}

/// What a finished move did.
#[derive(Debug, Clone, Serialize)]
pub struct MoveReport {
    /// The device the data is on now (canonical path; the device's name for
    /// [`Pool::move_data_on`](crate::Pool::move_data_on)).
    pub data_path: PathBuf,
    /// Data blocks copied.
    pub copied_blocks: u64,
    /// Data blocks compared after the copy.
    pub verified_blocks: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// The old data file, kept under this name (a regular file that was inside `pool/`).
    pub old_data_kept: Option<PathBuf>,
}

struct Mirror {
    old: Arc<dyn BlockDevice>,
    new: Arc<dyn BlockDevice>,
    /// After the cut-over: a failure on either device fails the call.
    strict: bool,
    /// The first failure of the new device before the cut-over (the call itself succeeded
    /// on the old device; the move is aborted).
    failed: Mutex<Option<thinpool_io::Error>>,
}

enum Mode {
    Single(Arc<dyn BlockDevice>),
    Mirror(Mirror),
}

/// The pool's data device (see the module doc).
pub(crate) struct DataDev {
    name: String,
    block_size: u64,
    mode: RwLock<Mode>,
    stripes: Vec<Mutex<()>>,
    moving: AtomicBool,
}

impl Mirror {
    /// The result of a call on the new device: before the cut-over a failure is recorded
    /// (the move will stop) and the call succeeds, as it did on the old device.
    fn on_new(&self, r: thinpool_io::Result<()>) -> thinpool_io::Result<()> {
        match r {
            Err(e) if !self.strict => {
                let mut f = self.failed.lock().expect("mirror failure slot poisoned");
                if f.is_none() {
                    tracing::error!("the new data device failed, the data move will stop: {e}");
                    *f = Some(e);
                }
                Ok(())
            }
            r => r,
        }
    }

    /// Whether calls still go to the new device.
    fn new_alive(&self) -> bool {
        self.strict
            || self
                .failed
                .lock()
                .expect("mirror failure slot poisoned")
                .is_none()
    }
}

impl DataDev {
    pub fn new(dev: Arc<dyn BlockDevice>, block_size: u64) -> Self {
        DataDev {
            name: dev.name().to_string(),
            block_size,
            mode: RwLock::new(Mode::Single(dev)),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            moving: AtomicBool::new(false),
        }
    }

    fn mode(&self) -> RwLockReadGuard<'_, Mode> {
        self.mode.read().expect("data device mode poisoned")
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.write().expect("data device mode poisoned") = mode;
    }

    /// The stripe locks of the data blocks `offset..offset+len` touches, in ascending order
    /// (the only order anyone takes several in).
    fn lock_range(&self, offset: u64, len: u64) -> Vec<MutexGuard<'_, ()>> {
        let first = offset / self.block_size;
        let last = (offset + len.max(1) - 1) / self.block_size;
        let mut idx: Vec<usize> = if last - first + 1 >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            (first..=last)
                .map(|b| (b % STRIPES as u64) as usize)
                .collect()
        };
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| self.stripe(i)).collect()
    }

    fn stripe(&self, i: usize) -> MutexGuard<'_, ()> {
        self.stripes[i].lock().expect("stripe lock poisoned")
    }

    fn block_lock(&self, b: u64) -> MutexGuard<'_, ()> {
        self.stripe((b % STRIPES as u64) as usize)
    }
}

impl BlockDevice for DataDev {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> thinpool_io::Result<u64> {
        match &*self.mode() {
            Mode::Single(d) => d.size(),
            Mode::Mirror(m) => m.old.size(),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> thinpool_io::Result<()> {
        match &*self.mode() {
            Mode::Single(d) => d.read_at(buf, offset),
            // Both hold the same bytes for every mapped block; the old one is complete.
            Mode::Mirror(m) => m.old.read_at(buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> thinpool_io::Result<()> {
        match &*self.mode() {
            Mode::Single(d) => d.write_at(buf, offset),
            Mode::Mirror(m) => {
                let _g = self.lock_range(offset, buf.len() as u64);
                m.old.write_at(buf, offset)?;
                if m.new_alive() {
                    m.on_new(m.new.write_at(buf, offset))?;
                }
                Ok(())
            }
        }
    }

    fn sync(&self) -> thinpool_io::Result<()> {
        match &*self.mode() {
            Mode::Single(d) => d.sync(),
            Mode::Mirror(m) => {
                m.old.sync()?;
                if m.new_alive() {
                    m.on_new(m.new.sync())?;
                }
                Ok(())
            }
        }
    }

    fn set_size(&self, size: u64) -> thinpool_io::Result<()> {
        match &*self.mode() {
            Mode::Single(d) => d.set_size(size),
            Mode::Mirror(m) => Err(thinpool_io::Error::Io {
                device: m.old.name().to_string(),
                op: "resize",
                offset: size,
                len: 0,
                cause: std::io::Error::other(
                    "the pool's data is being moved to another device: grow it afterwards",
                ),
            }),
        }
    }

    fn punch_hole(&self, offset: u64, len: u64) -> thinpool_io::Result<()> {
        match &*self.mode() {
            Mode::Single(d) => d.punch_hole(offset, len),
            Mode::Mirror(m) => {
                let _g = self.lock_range(offset, len);
                m.old.punch_hole(offset, len)?;
                if m.new_alive() {
                    m.on_new(m.new.punch_hole(offset, len))?;
                }
                Ok(())
            }
        }
    }

    fn copy_into_zeroed(&self, src: u64, dst: u64, len: u64) -> thinpool_io::Result<()> {
        match &*self.mode() {
            Mode::Single(d) => d.copy_into_zeroed(src, dst, len),
            Mode::Mirror(m) => {
                // The source block may not have reached the new device yet: copy on the old
                // one, then give the new one the result, zeros included (its `dst` range is
                // equal to the old one's or about to be overwritten by the block's copy; either
                // way it ends equal).
                let _g = self.lock_range(dst, len);
                m.old.copy_into_zeroed(src, dst, len)?;
                if m.new_alive() {
                    m.on_new(copy_across(&*m.old, &*m.new, dst, len, false))?;
                }
                Ok(())
            }
        }
    }

    fn all_data(&self, offset: u64, len: u64) -> thinpool_io::Result<bool> {
        match &*self.mode() {
            Mode::Single(d) => d.all_data(offset, len),
            Mode::Mirror(m) => m.old.all_data(offset, len),
        }
    }

    fn copies_by_reference(&self) -> bool {
        match &*self.mode() {
            Mode::Single(d) => d.copies_by_reference(),
            // A copy is also sent across to the new device, byte by byte.
            Mode::Mirror(_) => false,
        }
    }

    fn holes(&self, f: &mut dyn FnMut(u64, u64) -> bool) -> thinpool_io::Result<()> {
        match &*self.mode() {
            Mode::Single(d) => d.holes(f),
            // The two devices' holes differ: none known.
            Mode::Mirror(_) => Ok(()),
        }
    }
}

/// Copy `offset..offset+len` from `from` to `to`. `sparse`: `to` is a regular file, so zero
/// runs are punched rather than written.
fn copy_across(
    from: &dyn BlockDevice,
    to: &dyn BlockDevice,
    offset: u64,
    len: u64,
    sparse: bool,
) -> thinpool_io::Result<()> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        let chunk = &mut buf[..n];
        from.read_at(chunk, offset + done)?;
        if sparse {
            to.punch_hole(offset + done, n as u64)?;
            thinpool_io::write_nonzero(to, chunk, offset + done)?;
        } else {
            to.write_at(chunk, offset + done)?;
        }
        done += n as u64;
    }
    Ok(())
}

/// Where the data goes.
pub(crate) enum Dest<'a> {
    /// A file or block device by path: `pool/data` is switched to it.
    Path(&'a Path),
    /// A device handed in (a pool on given devices): nothing on disk names it.
    Device(Arc<dyn BlockDevice>),
}

/// The destination, opened and checked.
struct Prepared {
    dev: Arc<dyn BlockDevice>,
    /// Canonical path, for a destination given by path.
    path: Option<PathBuf>,
    /// A regular file: zeros are punched, not written.
    sparse: bool,
    /// We created the file: removed again if the move fails.
    created: bool,
}

/// Releases the one-move-at-a-time flag.
struct MovingFlag<'a>(&'a AtomicBool);

impl Drop for MovingFlag<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Move the pool's data (see the module doc). Blocks until done; `progress(done, total)` is
/// called with bytes: the copy counts for the first half of `total`, the verification for
/// the second.
pub(crate) fn move_data(
    inner: &Inner,
    dd: &DataDev,
    dest: Dest<'_>,
    progress: &dyn Fn(u64, u64),
    stop: Option<MoveStage>,
) -> Result<MoveReport> {
    if dd
        .moving
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Err(Error::Busy("the pool's data is already being moved".into()));
    }
    let _flag = MovingFlag(&dd.moving);
    {
        let st = inner.md_writable()?;
        if st.mode == PoolMode::Fail {
            return Err(Error::ReadOnly("the pool has failed".into()));
        }
    }
    let need = dd.size()?;
    let prep = match dest {
        Dest::Path(p) => prepare_path(inner, p, need)?,
        Dest::Device(dev) => {
            let size = dev.size()?;
            if size < need {
                return Err(Error::InvalidArgument(format!(
                    "{} has {size} bytes, fewer than the {need} of the pool's data device",
                    dev.name()
                )));
            }
            Prepared {
                dev,
                path: None,
                sparse: false,
                created: false,
            }
        }
    };
    let r = run(inner, dd, &prep, progress, stop);
    if r.is_err()
        && prep.created
        && let Some(p) = &prep.path
    {
        let _ = std::fs::remove_file(p);
    }
    r
}

fn run(
    inner: &Inner,
    dd: &DataDev,
    prep: &Prepared,
    progress: &dyn Fn(u64, u64),
    stop: Option<MoveStage>,
) -> Result<MoveReport> {
    let old = match &*dd.mode() {
        Mode::Single(d) => d.clone(),
        // Left by a move that could not tell whether its switch is durable: writes go to both
        // devices until the pool is closed.
        Mode::Mirror(_) => {
            return Err(Error::Busy(
                "a previous data move did not finish: close and reopen the pool first".into(),
            ));
        }
    };
    let new = prep.dev.clone();
    let target = prep
        .path
        .clone()
        .unwrap_or_else(|| PathBuf::from(new.name()));
    tracing::info!(from = old.name(), to = %target.display(), "moving the pool's data");
    // 1. Mirror on (waits for calls issued before).
    dd.set_mode(Mode::Mirror(Mirror {
        old: old.clone(),
        new: new.clone(),
        strict: false,
        failed: Mutex::new(None),
    }));
    let r = copy_verify_switch(inner, dd, prep, &old, &new, progress, stop);
    match r {
        Ok(Some(report)) => {
            tracing::info!(to = %target.display(), blocks = report.copied_blocks, "pool data moved");
            Ok(report)
        }
        // Stopped early for a test: left as a crash would leave it.
        Ok(None) => Ok(MoveReport {
            data_path: target,
            copied_blocks: 0,
            verified_blocks: 0,
            block_size: inner.block_size,
            old_data_kept: None,
        }),
        Err((e, back_to_old)) => {
            if back_to_old {
                // The old device has every write (it is written first and its failures fail
                // the write), and `pool/data` still leads to it.
                dd.set_mode(Mode::Single(old));
                tracing::error!(
                    "moving the pool's data failed, it stays on {}: {e}",
                    dd.name
                );
            } else {
                tracing::error!(
                    "moving the pool's data: {e}; writes still go to both devices until the pool is closed"
                );
            }
            Err(e)
        }
    }
}

/// Steps 2–8. `Err((e, true))`: abort, back to the old device; `Err((e, false))`: the rename
/// may be durable, keep mirroring strictly. `Ok(None)`: stopped at `stop`.
#[allow(clippy::too_many_arguments)]
fn copy_verify_switch(
    inner: &Inner,
    dd: &DataDev,
    prep: &Prepared,
    old: &Arc<dyn BlockDevice>,
    new: &Arc<dyn BlockDevice>,
    progress: &dyn Fn(u64, u64),
    stop: Option<MoveStage>,
) -> std::result::Result<Option<MoveReport>, (Error, bool)> {
    let abort = |e: Error| (e, true);
    let bs = inner.block_size;
    // 2. What was known zero was known of the old device only.
    inner.md().zeroed = ZeroMap::unknown();
    // 3. The blocks in use now.
    let used = used_blocks(inner).map_err(abort)?;
    let total = used.len() as u64 * bs * 2;
    progress(0, total);
    // 4. Copy.
    let failed = || -> Result<()> {
        if let Mode::Mirror(m) = &*dd.mode()
            && let Some(e) = m
                .failed
                .lock()
                .expect("mirror failure slot poisoned")
                .take()
        {
            return Err(e.into());
        }
        Ok(())
    };
    let mut done = 0;
    for (i, &b) in used.iter().enumerate() {
        if stop == Some(MoveStage::HalfCopied) && i == used.len() / 2 {
            return Ok(None);
        }
        {
            let _g = dd.block_lock(b);
            copy_across(&**old, &**new, b * bs, bs, prep.sparse).map_err(|e| abort(e.into()))?;
        }
        done += bs;
        progress(done, total);
        if i % 256 == 0 {
            failed().map_err(abort)?;
        }
    }
    new.sync().map_err(|e| abort(e.into()))?;
    failed().map_err(abort)?;
    // 5. Verify every block in use now (some were allocated during the copy, through the
    // mirror). With zeroing of new blocks off, the bytes of a new block that were never
    // written are undefined and may differ: only the copied blocks are compared then.
    let now_used = used_blocks(inner).map_err(abort)?;
    let to_verify: Vec<u64> = if inner.opts.zero_new_blocks {
        now_used
    } else {
        now_used
            .into_iter()
            .filter(|b| used.binary_search(b).is_ok())
            .collect()
    };
    let vtotal = done + to_verify.len() as u64 * bs;
    let (mut a, mut c) = (vec![0u8; bs as usize], vec![0u8; bs as usize]);
    for &b in &to_verify {
        {
            let _g = dd.block_lock(b);
            old.read_at(&mut a, b * bs).map_err(|e| abort(e.into()))?;
            new.read_at(&mut c, b * bs).map_err(|e| abort(e.into()))?;
        }
        if a != c {
            let at = a.iter().zip(&c).position(|(x, y)| x != y).unwrap_or(0);
            return Err(abort(Error::Io(thinpool_io::Error::Io {
                device: new.name().to_string(),
                op: "verify",
                offset: b * bs + at as u64,
                len: bs - at as u64,
                cause: std::io::Error::other(format!(
                    "data block {b} reads back different from the old device: the new device does not keep what is written to it"
                )),
            })));
        }
        done += bs;
        progress(done, vtotal);
    }
    // 6. Commit: the durable metadata now maps only blocks that both devices hold.
    inner.commit().map_err(abort)?;
    // 7. Cut over: from here on, both devices must take every write.
    {
        let mut mode = dd.mode.write().expect("data device mode poisoned");
        let Mode::Mirror(m) = &mut *mode else {
            unreachable!("mirroring during the move")
        };
        if let Some(e) = m
            .failed
            .lock()
            .expect("mirror failure slot poisoned")
            .take()
        {
            return Err(abort(e.into()));
        }
        m.strict = true;
    }
    if stop == Some(MoveStage::Verified) {
        return Ok(None);
    }
    let mut old_kept = None;
    if let Some(path) = &prep.path {
        let pool_dir = inner.root.join("pool");
        old_kept = link_new(&pool_dir, path).map_err(abort)?;
        if stop == Some(MoveStage::Linked) {
            return Ok(None);
        }
        let (from, to) = (pool_dir.join("data.new"), pool_dir.join("data"));
        if let Err(source) = std::fs::rename(&from, &to) {
            if let Some(k) = &old_kept {
                let _ = std::fs::remove_file(k);
            }
            let _ = std::fs::remove_file(&from);
            return Err(abort(Error::File {
                what: "renaming over",
                path: to,
                source,
            }));
        }
        sync_dir(&pool_dir).map_err(|e| (e, false))?;
        if stop == Some(MoveStage::Renamed) {
            return Ok(None);
        }
    }
    // 8. Single(new).
    dd.set_mode(Mode::Single(new.clone()));
    Ok(Some(MoveReport {
        data_path: prep
            .path
            .clone()
            .unwrap_or_else(|| PathBuf::from(new.name())),
        copied_blocks: used.len() as u64,
        verified_blocks: to_verify.len() as u64,
        block_size: bs,
        old_data_kept: old_kept,
    }))
}

/// The data blocks with a reference count above zero, ascending. Reads the counts a chunk at
/// a time under the metadata lock.
fn used_blocks(inner: &Inner) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let mut b = 0;
    loop {
        let st = inner.md();
        if st.mode == PoolMode::Fail {
            return Err(Error::ReadOnly("the pool has failed".into()));
        }
        let nr = st.md.nr_data_blocks();
        if b >= nr {
            return Ok(out);
        }
        let end = (b + SCAN_CHUNK).min(nr);
        out.extend((b..end).filter(|&x| st.md.data_block_count(x) > 0));
        b = end;
    }
}

/// Make `pool/data.new` → `target` durable; if `pool/data` is a regular file, give it the
/// second name `pool/data.old` (or `data.old.N`) first. Returns that name.
fn link_new(pool_dir: &Path, target: &Path) -> Result<Option<PathBuf>> {
    let data = pool_dir.join("data");
    let new = pool_dir.join("data.new");
    // Left by a move that was interrupted before its rename.
    if new.symlink_metadata().is_ok() {
        std::fs::remove_file(&new).map_err(file_err("removing the stale", &new))?;
    }
    let meta = data
        .symlink_metadata()
        .map_err(file_err("reading the attributes of", &data))?;
    let mut kept = None;
    if meta.file_type().is_file() {
        let mut n = 0;
        loop {
            let name = if n == 0 {
                pool_dir.join("data.old")
            } else {
                pool_dir.join(format!("data.old.{n}"))
            };
            match std::fs::hard_link(&data, &name) {
                Ok(()) => {
                    kept = Some(name);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(file_err("linking the old data file as", &name)(e)),
            }
        }
    }
    std::os::unix::fs::symlink(target, &new).map_err(file_err("linking", &new))?;
    sync_dir(pool_dir)?;
    Ok(kept)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(file_err("syncing the directory", dir))
}

fn file_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::File {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// (device, inode) of a file, or the device number of a block device: what tells whether
/// two paths are the same storage.
fn identity(m: &std::fs::Metadata) -> (u64, u64) {
    if m.file_type().is_block_device() {
        (u64::MAX, m.rdev())
    } else {
        (m.dev(), m.ino())
    }
}

/// Check and open a destination given by path. Nothing is changed when this fails (a file
/// it created is removed).
fn prepare_path(inner: &Inner, dest: &Path, need: u64) -> Result<Prepared> {
    let pool_dir = inner.root.join("pool");
    let data_link = pool_dir.join("data");
    if inner.data_path != data_link {
        return Err(Error::InvalidArgument(format!(
            "the pool's data device {} was handed in by the caller, not found in {}: nothing on disk can be switched to {}",
            inner.data_path.display(),
            pool_dir.display(),
            dest.display()
        )));
    }
    let invalid = |why: &str| Error::InvalidArgument(format!("{}: {why}", dest.display()));
    let exists = dest.symlink_metadata().is_ok();
    let canon = if exists {
        std::fs::canonicalize(dest).map_err(file_err("resolving", dest))?
    } else {
        let name = dest.file_name().ok_or_else(|| invalid("not a file name"))?;
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::canonicalize(parent)
            .map_err(file_err("resolving", parent))?
            .join(name)
    };
    let pool_canon = std::fs::canonicalize(&pool_dir).map_err(file_err("resolving", &pool_dir))?;
    if canon.starts_with(&pool_canon) {
        return Err(invalid(&format!(
            "inside the pool's directory {}: give a path outside it",
            pool_canon.display()
        )));
    }
    if !exists {
        let dev = FileDevice::create(&canon, need)?;
        return Ok(Prepared {
            dev: Arc::new(dev),
            path: Some(canon),
            sparse: true,
            created: true,
        });
    }
    let meta = std::fs::metadata(&canon).map_err(file_err("reading the attributes of", &canon))?;
    let id = identity(&meta);
    for (what, p) in [
        ("the pool's data device", &data_link),
        ("the pool's metadata device", &pool_dir.join("metadata")),
    ] {
        if let Ok(m) = std::fs::metadata(p)
            && identity(&m) == id
        {
            return Err(invalid(&format!("this is {what} ({})", p.display())));
        }
    }
    let ft = meta.file_type();
    if ft.is_block_device() {
        // An exclusive open fails while the device is mounted or held by another program.
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::EXCL.bits() as i32)
            .open(&canon)
        {
            return Err(
                if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) {
                    Error::Busy(format!(
                        "{} is in use (mounted, or held by another program)",
                        canon.display()
                    ))
                } else {
                    file_err("opening", &canon)(e)
                },
            );
        }
        let dev = FileDevice::open(&canon)?;
        let size = dev.size()?;
        if size < need {
            return Err(invalid(&format!(
                "the block device has {size} bytes, fewer than the {need} of the pool's data device"
            )));
        }
        Ok(Prepared {
            dev: Arc::new(dev),
            path: Some(canon),
            sparse: false,
            created: false,
        })
    } else if ft.is_file() {
        let dev = FileDevice::open(&canon)?;
        if meta.len() > 0 && has_data(&canon)? {
            return Err(invalid(
                "the file holds data: refusing to overwrite it (give a new path, an empty file, or a sparse one without data)",
            ));
        }
        if meta.len() < need {
            dev.set_size(need)?;
        }
        Ok(Prepared {
            dev: Arc::new(dev),
            path: Some(canon),
            sparse: true,
            created: false,
        })
    } else {
        Err(invalid("not a regular file or a block device"))
    }
}

/// Whether a regular file holds any data (not only holes), as the file system reports it. A
/// file system that cannot tell says data.
fn has_data(path: &Path) -> Result<bool> {
    use rustix::fs::{SeekFrom, seek};
    let f = File::open(path).map_err(file_err("opening", path))?;
    match seek(&f, SeekFrom::Data(0)) {
        Err(rustix::io::Errno::NXIO) => Ok(false),
        _ => Ok(true),
    }
}
