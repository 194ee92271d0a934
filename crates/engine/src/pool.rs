//! [`Pool`]: a pool in a root directory — devices, metadata, catalog, commit timer, status,
//! growth, and the volume operations (create, snapshot, remove, resize).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use thinpool_io::{BlockDevice, FileDevice};
use thinpool_thin::metadata::Lookup;
use thinpool_thin::{ThinId, ThinMetadata};

use crate::catalog::{Catalog, Entry, VolumeKind, check_name, now};
use crate::config::{PoolConfig, PoolOptions};
use crate::datadev::{DataDev, Dest, MoveReport, MoveStage};
use crate::prison::Prison;
use crate::private::make_private;
use crate::stats::{PoolStats, Stats};
use crate::volume::Volume;
use crate::zeroed::ZeroMap;
use crate::{Error, Result};

const SECTOR: u64 = 512;

/// How long opening a pool may spend asking the data file where its holes are (see
/// `ZeroMap::from_holes`): about 10 000 pieces of file (a data file after 130 000 random
/// 4 KiB writes took the 200 ms tried first; a fresh or sequentially written one takes
/// microseconds).
const HOLE_SCAN_BUDGET: Duration = Duration::from_millis(20);

/// The pool's mode (format spec section 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PoolMode {
    /// Normal.
    #[serde(rename = "rw")]
    Write,
    /// No free data block: writes that need one wait or fail.
    #[serde(rename = "out_of_data_space")]
    OutOfDataSpace,
    /// Metadata failed or ran out: no metadata changes until repaired or grown.
    #[serde(rename = "ro")]
    ReadOnly,
    /// Every I/O fails.
    #[serde(rename = "fail")]
    Fail,
}

/// The pool's status: the kernel's pool status fields plus ours.
#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    /// Metadata transaction id.
    pub transaction_id: u64,
    /// Used metadata blocks (4 KiB), counting the kernel's reserve as used.
    pub used_metadata_blocks: u64,
    /// Metadata blocks.
    pub total_metadata_blocks: u64,
    /// Used data blocks.
    pub used_data_blocks: u64,
    /// Data blocks.
    pub total_data_blocks: u64,
    /// Data block size in bytes.
    pub block_size: u64,
    /// Held metadata snapshot root.
    pub held_root: Option<u64>,
    /// Mode.
    pub mode: PoolMode,
    /// NEEDS_CHECK flag.
    pub needs_check: bool,
    /// Writes fail at once when full (else they queue).
    pub error_if_no_space: bool,
    /// Freed blocks are punched out of the data device.
    pub discard_passdown: bool,
    /// Metadata low watermark (blocks).
    pub metadata_low_watermark: u64,
    /// Data device path.
    pub data_path: PathBuf,
    /// Metadata device path.
    pub metadata_path: PathBuf,
    /// Thin volumes (not snapshots).
    pub volumes: usize,
    /// Snapshots.
    pub snapshots: usize,
    /// What went wrong, while it matters: the metadata failure that made the pool read-only
    /// or failed, or the host file system full under a pool file (writes needing space fail
    /// with ENOSPC until there is space again).
    pub failure: Option<String>,
}

impl PoolStatus {
    /// The kernel's status line (section 14.1, without dmsetup's prefix).
    pub fn kernel_line(&self) -> String {
        if self.mode == PoolMode::Fail {
            return "Fail".into();
        }
        format!(
            "{} {}/{} {}/{} {} {} {} {} {} {}",
            self.transaction_id,
            self.used_metadata_blocks,
            self.total_metadata_blocks,
            self.used_data_blocks,
            self.total_data_blocks,
            self.held_root.map_or("-".to_string(), |h| h.to_string()),
            match self.mode {
                PoolMode::Write => "rw",
                PoolMode::OutOfDataSpace => "out_of_data_space",
                _ => "ro",
            },
            if self.discard_passdown {
                "discard_passdown"
            } else {
                "no_discard_passdown"
            },
            if self.error_if_no_space {
                "error_if_no_space"
            } else {
                "queue_if_no_space"
            },
            if self.needs_check { "needs_check" } else { "-" },
            self.metadata_low_watermark
        )
    }
}

/// A volume as listed.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    /// Name.
    pub name: String,
    /// Thin device id in the metadata.
    pub thin_id: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Thin or snapshot.
    pub kind: VolumeKind,
    /// Origin of a snapshot.
    pub parent: Option<String>,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Mapped blocks.
    pub mapped_blocks: u64,
    /// Highest mapped virtual block.
    pub highest_mapped_block: Option<u64>,
    /// The owner's labels ([`Pool::create_labeled`], [`Pool::set_labels`]); absent from the
    /// JSON when there are none.
    #[serde(skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

/// Labels of a volume: what its owner records with it (key → value).
pub type Labels = std::collections::BTreeMap<String, String>;

pub(crate) struct MetaState {
    pub md: ThinMetadata,
    pub dirty: bool,
    pub mode: PoolMode,
    pub low_water_fired: bool,
    /// Whether the space watch rang for data and for metadata since it was last re-armed
    /// (see [`SpaceWatch`]).
    pub watch_fired: [bool; 2],
    /// Free data blocks known to read as zeros (see `zeroed`).
    pub zeroed: ZeroMap,
    /// Why the pool is read-only or failed, after a metadata operation failed (named in the
    /// errors of later requests).
    pub failure: Option<String>,
    /// How many aborts dropped uncommitted changes, and the last one's cause: a volume
    /// handle's next flush fails once for each it has not seen (see `Volume::flush`).
    pub dropped: (u64, String),
    /// The last failure of a write or commit because the host file system under a pool file
    /// is full, until a commit succeeds again.
    pub host_full: Option<String>,
    /// Whether the held metadata snapshot (if any) was reserved through this open of the
    /// pool; one found held at open was left by an earlier run.
    pub snap_reserved_here: bool,
    /// `Some` while a commit syncs the data of the open transaction's mappings (see
    /// [`Inner::commit`]): the transaction is sealed, and mappings made meanwhile wait here,
    /// by thin device and virtual block, for the next one. Their data blocks are allocated.
    pub pending: Option<BTreeMap<(ThinId, u64), u64>>,
}

impl MetaState {
    /// The mapping of `vblock` of `thin`, including one waiting for the next transaction.
    pub(crate) fn find(&mut self, thin: ThinId, vblock: u64) -> Result<Option<Lookup>> {
        if let Some(&data_block) = self.pending.as_ref().and_then(|p| p.get(&(thin, vblock))) {
            // Made after the device's last snapshot: not shared.
            return Ok(Some(Lookup {
                data_block,
                time: self.md.time(),
                shared: false,
            }));
        }
        Ok(self.md.find_block(thin, vblock)?)
    }

    /// Map `vblock` of `thin` to the allocated data block `new` (replacing, and releasing, any
    /// mapping it had): in the open transaction, or after it while it is sealed.
    pub(crate) fn map(&mut self, thin: ThinId, vblock: u64, new: u64) -> Result<()> {
        match &mut self.pending {
            Some(p) => {
                p.insert((thin, vblock), new);
            }
            None => {
                if let Err(e) = self.md.insert_block(thin, vblock, new) {
                    // Aborted: the block's allocation goes with the transaction.
                    return Err(self.failed("inserting a mapping", e.into()));
                }
                self.dirty = true;
            }
        }
        Ok(())
    }

    /// A metadata operation `op` failed with `e`. If it may have left a half-done change in
    /// the open transaction, abort the transaction (reopen at the last commit) and decide the
    /// pool's mode, as the kernel's `metadata_operation_failed` does:
    ///
    /// - the host file system under a pool file is full: the abort undid everything, the pool
    ///   stays writable and the same requests succeed once the host has space again;
    /// - any other failure (an I/O error, damaged metadata, metadata space exhausted part-way):
    ///   read-only, with the cause named in later errors; changes since the last commit are
    ///   forgotten (as for a crash: only flushed writes are promised);
    /// - the abort itself fails (the committed metadata cannot be read back): NEEDS_CHECK is
    ///   written if it can be, and the pool fails every request.
    ///
    /// Returns `e` for the caller. Errors that changed nothing (no such volume, pool full) pass
    /// through untouched.
    pub(crate) fn failed(&mut self, op: &str, e: Error) -> Error {
        let Some(why) = self.md.tainted().map(str::to_string) else {
            return e;
        };
        self.abort(op, why, e.is_host_full(), false);
        e
    }

    /// Abort the open transaction after `op` failed for `why` and decide the mode (see
    /// [`MetaState::failed`]). `lost_writes`: data already acknowledged may be lost even where
    /// no mapping changes (a failed data sync), so every handle's next flush must fail.
    pub(crate) fn abort(&mut self, op: &str, why: String, host_full: bool, lost_writes: bool) {
        tracing::error!("{op} failed ({why}): aborting the open metadata transaction");
        // Mappings waiting for the next transaction go too: their blocks were allocated in
        // this one.
        let waiting = self.pending.take().is_some_and(|p| !p.is_empty());
        if std::mem::take(&mut self.dirty) || lost_writes || waiting {
            self.dropped = (self.dropped.0 + 1, why.clone());
        }
        match self.md.abort() {
            Ok(()) if host_full => {
                self.host_full = Some(format!("host file system full: {why}"));
                tracing::warn!(
                    "the host file system is full: the pool stays writable; requests that need space fail until there is space"
                );
            }
            Ok(()) => {
                let failure = format!("{op} failed: {why}");
                tracing::error!("the pool is now read-only: {failure}");
                self.mode = PoolMode::ReadOnly;
                self.failure = Some(failure);
            }
            Err(abort) => {
                let failure = format!(
                    "{op} failed ({why}) and the last commit cannot be read back ({abort})"
                );
                tracing::error!("the pool has failed: {failure}");
                if let Err(flag) = self.md.set_needs_check() {
                    tracing::error!("setting NEEDS_CHECK failed too: {flag}");
                }
                self.mode = PoolMode::Fail;
                self.failure = Some(failure);
            }
        }
    }
}

/// The pool's sparse files may take more than their host file system has free (see
/// [`Pool::host_space_shortfall`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostShortfall {
    /// A pool file on that file system.
    pub path: PathBuf,
    /// Bytes the sparse files there may still take.
    pub may_take: u64,
    /// Bytes free there.
    pub free: u64,
}

/// Space in use, read from the open transaction without a commit ([`Pool::space_usage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SpaceUsage {
    /// Used data blocks.
    pub used_data_blocks: u64,
    /// Data blocks.
    pub total_data_blocks: u64,
    /// Used metadata blocks (4 KiB), the kernel's reserve counted as used (as in
    /// [`PoolStatus`]).
    pub used_metadata_blocks: u64,
    /// Metadata blocks.
    pub total_metadata_blocks: u64,
    /// Data block size in bytes.
    pub block_size: u64,
}

impl SpaceUsage {
    fn of(md: &ThinMetadata, block_size: u64) -> SpaceUsage {
        let total_meta = md.nr_metadata_blocks();
        let free_meta = md
            .nr_free_metadata_blocks()
            .saturating_sub((total_meta / 10).min(4096));
        SpaceUsage {
            used_data_blocks: md.nr_data_blocks() - md.nr_free_data_blocks(),
            total_data_blocks: md.nr_data_blocks(),
            used_metadata_blocks: total_meta - free_meta,
            total_metadata_blocks: total_meta,
            block_size,
        }
    }

    /// Whether data (`[0]`) and metadata (`[1]`) use at least `percent` of their blocks.
    pub fn at_or_over(&self, percent: u8) -> [bool; 2] {
        let over = |used: u64, total: u64| {
            u128::from(used) * 100 >= u128::from(percent) * u128::from(total.max(1))
        };
        [
            over(self.used_data_blocks, self.total_data_blocks),
            over(self.used_metadata_blocks, self.total_metadata_blocks),
        ]
    }
}

/// The usage level a watcher waits for ([`Pool::watch_space`], [`Pool::wait_space`]): the
/// allocation path rings once when data or metadata usage reaches it, and is re-armed when a
/// watcher finds usage below the level again, or the pool grows. Per allocation: an atomic
/// load, then (while a space has not rung) a comparison of the space maps' counters, O(1)
/// under the metadata lock the allocation already holds.
#[derive(Default)]
pub(crate) struct SpaceWatch {
    /// Percent of the blocks in use (0: off).
    pub percent: std::sync::atomic::AtomicU8,
    /// How many times it rang.
    rung: Mutex<u64>,
    cv: Condvar,
}

impl SpaceWatch {
    /// Ring if usage in `st` reached the level and this space has not rung since re-armed.
    /// Called with the metadata lock held, after an allocation.
    pub(crate) fn check(&self, st: &mut MetaState, block_size: u64) {
        let percent = self.percent.load(Ordering::Relaxed);
        if percent == 0 || st.watch_fired == [true, true] {
            return;
        }
        let over = SpaceUsage::of(&st.md, block_size).at_or_over(percent);
        let mut ring = false;
        for (fired, over) in st.watch_fired.iter_mut().zip(over) {
            if over && !*fired {
                *fired = true;
                ring = true;
            }
        }
        if ring {
            *self.rung.lock().expect("space watch poisoned") += 1;
            self.cv.notify_all();
        }
    }
}

/// Per-volume runtime state, shared by its handles.
pub(crate) struct VolState {
    pub name: String,
    pub thin: ThinId,
    pub size: AtomicU64,
    /// I/O holds it shared; a snapshot of this volume holds it alone (quiesce).
    pub quiesce: RwLock<()>,
    pub handles: AtomicUsize,
}

pub(crate) struct Inner {
    pub root: PathBuf,
    /// The data device: `datadev`, seen through the trait.
    pub data: Arc<dyn BlockDevice>,
    /// The data device, switchable online (see `datadev`).
    datadev: Arc<DataDev>,
    pub meta_dev: Arc<dyn BlockDevice>,
    pub data_path: PathBuf,
    pub metadata_path: PathBuf,
    pub block_size: u64,
    pub opts: PoolOptions,
    pub md: Mutex<MetaState>,
    /// Signalled when data space may have become available (commit, grow).
    pub space: Condvar,
    /// Signalled when a sealed transaction is committed (or aborted) and the mappings made
    /// meanwhile are in the next one (`MetaState::pending` is `None` again).
    settled: Condvar,
    /// Held by a commit from its first data sync to its end: one commit at a time.
    committing: Mutex<()>,
    catalog: Mutex<Catalog>,
    vols: Mutex<HashMap<u32, Arc<VolState>>>,
    pub prison: Prison,
    /// Mappings inserted so far (a commit re-syncs data if one came in during its sync).
    pub inserts: AtomicU64,
    /// Request, provisioning and commit counters (see `stats`).
    pub stats: Stats,
    /// Wakes a watcher of the pool's usage (see [`SpaceWatch`]).
    pub watch: SpaceWatch,
    stop: Mutex<bool>,
    stop_cv: Condvar,
    _lock: File,
}

/// The two devices of a pool with the names shown for them, and the held lock.
struct Devices {
    data: Arc<dyn BlockDevice>,
    meta: Arc<dyn BlockDevice>,
    data_path: PathBuf,
    metadata_path: PathBuf,
    lock: File,
    /// The data device is a sparse file we have just created: it reads zeros everywhere.
    fresh_data: bool,
}

impl Devices {
    /// Devices handed in by the caller: named after themselves.
    fn given(data: Arc<dyn BlockDevice>, meta: Arc<dyn BlockDevice>, lock: File) -> Self {
        let (data_path, metadata_path) = (PathBuf::from(data.name()), PathBuf::from(meta.name()));
        Devices {
            data,
            meta,
            data_path,
            metadata_path,
            lock,
            fresh_data: false,
        }
    }
}

/// An open pool. Dropping it commits (errors are logged); [`Pool::close`] reports them.
pub struct Pool {
    inner: Arc<Inner>,
    timer: Option<JoinHandle<()>>,
}

fn file_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::File {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn take_lock(root: &Path) -> Result<File> {
    let path = root.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(crate::private::FILE_MODE)
        .open(&path)
        .map_err(file_err("opening lock file", &path))?;
    // A child process forked by another thread of this process holds a copy of the lock's
    // open file description from fork until exec (close-on-exec), so a pool just closed here
    // can look held for a few microseconds: try again briefly before calling it busy.
    let mut tries = 0;
    let held = loop {
        match f.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) if tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            r => break r,
        }
    };
    match held {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Busy(format!(
            "the pool in {} is in use (lock {} is held by another process, or by this one while a pool or volume handle is still open)",
            root.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(file_err("locking", &path)(e)),
    }
}

/// The largest volume: 2^63 − 2^30 bytes (8 EiB less 1 GiB). qemu opens no image larger than
/// `INT64_MAX` rounded down to its largest alignment, 1 GiB (`BDRV_MAX_LENGTH`: it refuses
/// 2^63 − 512 with "File too large"), and the kernel's byte offsets are signed 64-bit too; a
/// larger volume could be made here but not used.
pub const MAX_VOLUME_SIZE: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

fn check_volume_size(name: &str, size: u64) -> Result<()> {
    if size == 0 {
        return Err(Error::InvalidArgument(format!(
            "volume {name}: the size must be more than 0 bytes"
        )));
    }
    if size > MAX_VOLUME_SIZE {
        return Err(Error::InvalidArgument(format!(
            "volume {name}: size {size} bytes is past the largest clients can open, \
             {MAX_VOLUME_SIZE} bytes (2^63 - 1 GiB, qemu's limit)"
        )));
    }
    Ok(())
}

/// The most metadata dm-thin uses: 255 bitmaps of 16 320 blocks of 4 KiB (format spec 11.3,
/// ≈ 15.87 GiB); the kernel ignores a device's excess, so a larger file made here is waste.
pub const MAX_METADATA_SIZE: u64 = 255 * 16_320 * 4096;

/// Data block numbers are 40 bits in a mapping (format spec 5.3): a data device of `size`
/// bytes in blocks of `bs` must have fewer than 2^40 blocks.
fn check_data_blocks(size: u64, bs: u64) -> Result<()> {
    if size / bs >= 1 << 40 {
        return Err(Error::InvalidArgument(format!(
            "data size {size} bytes is {} blocks of {bs} bytes: dm-thin addresses fewer than \
             2^40 data blocks (give at most {} bytes, or larger blocks)",
            size / bs,
            ((1u64 << 40) - 1) * bs
        )));
    }
    Ok(())
}

fn check_block_size(bs: u64) -> Result<()> {
    if !(65536..=1 << 30).contains(&bs) || !bs.is_multiple_of(65536) {
        return Err(Error::InvalidArgument(format!(
            "block size {bs} bytes: must be a multiple of 64 KiB between 64 KiB and 1 GiB"
        )));
    }
    Ok(())
}

/// What a device given for a pool must be: a regular file or a block device, or a symlink to
/// one. Checked before anything is made: a FIFO would block the open (or take the pool's
/// bytes into a pipe), `/dev/null` and other character devices swallow writes, and a folder
/// cannot hold a device.
fn check_device_path(what: &str, path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let meta = std::fs::metadata(path).map_err(file_err("checking the device", path))?;
    let t = meta.file_type();
    if t.is_file() || t.is_block_device() {
        return Ok(());
    }
    let kind = if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "neither a regular file nor a block device"
    };
    Err(Error::InvalidArgument(format!(
        "{what} device {} is {kind}: give a regular file or a block device (or a symlink to one)",
        path.display()
    )))
}

/// The device at `path`: created as a sparse file of `size`, or an existing file / block
/// device linked from `link`.
fn make_device(link: &Path, given: Option<&Path>, size: u64) -> Result<Arc<dyn BlockDevice>> {
    match given {
        None => Ok(Arc::new(FileDevice::create(link, size)?)),
        Some(p) => {
            let target = std::fs::canonicalize(p).map_err(file_err("resolving", p))?;
            std::os::unix::fs::symlink(&target, link).map_err(file_err("linking", link))?;
            Ok(Arc::new(FileDevice::open(&target)?))
        }
    }
}

impl Pool {
    /// Create a pool in `root`: sparse data and metadata files (or links to the given
    /// devices), an empty catalog, and the lock. Refuses a root that already has a pool.
    pub fn create(root: &Path, cfg: &PoolConfig, opts: PoolOptions) -> Result<Pool> {
        check_block_size(cfg.block_size)?;
        // Before anything is made, so that a refused create leaves the root as it was.
        if let Some(p) = &cfg.metadata_path {
            check_device_path("metadata", p)?;
        }
        if let Some(p) = &cfg.data_path {
            check_device_path("data", p)?;
        }
        if let (Some(d), Some(m)) = (&cfg.data_path, &cfg.metadata_path)
            && let (Ok(dc), Ok(mc)) = (d.canonicalize(), m.canonicalize())
            && dc == mc
        {
            return Err(Error::InvalidArgument(format!(
                "data device {} and metadata device {} are the same file ({}): give two",
                d.display(),
                m.display(),
                dc.display()
            )));
        }
        if cfg.data_size < cfg.block_size {
            return Err(Error::InvalidArgument(format!(
                "data size {} bytes is smaller than one block ({} bytes)",
                cfg.data_size, cfg.block_size
            )));
        }
        if cfg.data_path.is_none() {
            check_data_blocks(cfg.data_size, cfg.block_size)?;
        }
        if cfg.metadata_path.is_none() && cfg.metadata_size > MAX_METADATA_SIZE {
            return Err(Error::InvalidArgument(format!(
                "metadata size {} bytes: dm-thin uses at most {MAX_METADATA_SIZE} bytes \
                 (4 161 600 blocks of 4 KiB) and ignores the rest",
                cfg.metadata_size
            )));
        }
        if cfg.metadata_size < 1 << 20 {
            return Err(Error::InvalidArgument(format!(
                "metadata size {} bytes: at least 1 MiB is needed",
                cfg.metadata_size
            )));
        }
        let pool_dir = root.join("pool");
        std::fs::create_dir_all(&pool_dir).map_err(file_err("creating", &pool_dir))?;
        make_private(root)?;
        let lock = take_lock(root)?;
        let (data_link, meta_link) = (pool_dir.join("data"), pool_dir.join("metadata"));
        if meta_link.symlink_metadata().is_ok() || data_link.symlink_metadata().is_ok() {
            return Err(Error::Exists(format!(
                "{} already holds a pool (pool/data or pool/metadata exists)",
                root.display()
            )));
        }
        let meta = make_device(&meta_link, cfg.metadata_path.as_deref(), cfg.metadata_size)?;
        if cfg.metadata_path.is_some() {
            let mut first = [0u8; 4096];
            meta.read_at(&mut first, 0)?;
            if first.iter().any(|&b| b != 0) {
                let _ = std::fs::remove_file(&meta_link);
                // Only if empty: a folder someone filled is theirs.
                let _ = std::fs::remove_dir(&pool_dir);
                return Err(Error::Exists(format!(
                    "metadata device {} is not blank (its first 4 KiB are not zero): refusing to overwrite it",
                    meta.name()
                )));
            }
        }
        let made =
            make_device(&data_link, cfg.data_path.as_deref(), cfg.data_size).and_then(|data| {
                let devs = Devices {
                    data,
                    meta,
                    data_path: data_link.clone(),
                    metadata_path: meta_link.clone(),
                    lock,
                    fresh_data: cfg.data_path.is_none(),
                };
                Self::create_inner(root, devs, cfg.block_size, opts)
            });
        if made.is_err() {
            // Leave nothing half made behind.
            let _ = std::fs::remove_file(&data_link);
            let _ = std::fs::remove_file(&meta_link);
            let _ = std::fs::remove_dir(&pool_dir);
        }
        made
    }

    /// Create a pool on given devices; `root` keeps the catalog and the lock.
    pub fn create_on(
        root: &Path,
        data: Arc<dyn BlockDevice>,
        metadata: Arc<dyn BlockDevice>,
        block_size: u64,
        opts: PoolOptions,
    ) -> Result<Pool> {
        check_block_size(block_size)?;
        std::fs::create_dir_all(root).map_err(file_err("creating", root))?;
        make_private(root)?;
        let lock = take_lock(root)?;
        Self::create_inner(root, Devices::given(data, metadata, lock), block_size, opts)
    }

    fn create_inner(
        root: &Path,
        devs: Devices,
        block_size: u64,
        opts: PoolOptions,
    ) -> Result<Pool> {
        check_data_blocks(devs.data.size()?, block_size)?;
        let nr_data = devs.data.size()? / block_size;
        let cache_blocks = opts.metadata_cache_blocks()?;
        let mut md =
            ThinMetadata::format(devs.meta.clone(), (block_size / SECTOR) as u32, nr_data)?;
        md.set_cache_limit(cache_blocks)?;
        md.set_dirty_limit(cache_blocks);
        let mut catalog = Catalog::new(root, md.transaction_id());
        catalog.journal_from = opts.catalog_journal_from;
        catalog.save()?;
        tracing::info!(root = %root.display(), nr_data, block_size, "pool created");
        Ok(Self::start(root, devs, block_size, opts, md, catalog))
    }

    /// Open the pool in `root` (made by `create`, or a root whose `pool/` holds a kernel
    /// pool's files). Reconciles the catalog with the metadata.
    pub fn open(root: &Path, opts: PoolOptions) -> Result<Pool> {
        let pool_dir = root.join("pool");
        let (data_link, meta_link) = (pool_dir.join("data"), pool_dir.join("metadata"));
        if !meta_link.exists() {
            return Err(Error::NotFound(format!(
                "no pool in {}: {} does not exist (create one with `thinpool pool create`)",
                root.display(),
                meta_link.display()
            )));
        }
        if !data_link.exists() {
            return Err(Error::NotFound(format!(
                "the pool in {} has no data device: {} does not exist",
                root.display(),
                data_link.display()
            )));
        }
        let lock = take_lock(root)?;
        make_private(root)?;
        let open = |p: &Path| {
            if opts.read_only {
                FileDevice::open_read_only(p)
            } else {
                FileDevice::open(p)
            }
        };
        let meta: Arc<dyn BlockDevice> = Arc::new(open(&meta_link)?);
        let data: Arc<dyn BlockDevice> = Arc::new(open(&data_link)?);
        let devs = Devices {
            data,
            meta,
            data_path: data_link,
            metadata_path: meta_link,
            lock,
            fresh_data: false,
        };
        Self::open_inner(root, devs, opts)
    }

    /// Open a pool on given devices; `root` keeps the catalog and the lock.
    pub fn open_on(
        root: &Path,
        data: Arc<dyn BlockDevice>,
        metadata: Arc<dyn BlockDevice>,
        opts: PoolOptions,
    ) -> Result<Pool> {
        std::fs::create_dir_all(root).map_err(file_err("creating", root))?;
        make_private(root)?;
        let lock = take_lock(root)?;
        Self::open_inner(root, Devices::given(data, metadata, lock), opts)
    }

    fn open_inner(root: &Path, devs: Devices, opts: PoolOptions) -> Result<Pool> {
        let cache_blocks = opts.metadata_cache_blocks()?;
        let mut md = ThinMetadata::open(devs.meta.clone())?;
        md.set_cache_limit(cache_blocks)?;
        md.set_dirty_limit(cache_blocks);
        let block_size = md.data_block_size() as u64 * SECTOR;
        let data = &devs.data;
        let dev_blocks = data.size()? / block_size;
        if dev_blocks < md.nr_data_blocks() {
            return Err(Error::InvalidArgument(format!(
                "data device {} has {} blocks of {} bytes, fewer than the {} the metadata describes",
                data.name(),
                dev_blocks,
                block_size,
                md.nr_data_blocks()
            )));
        }
        // A pool that needs a check is opened read-only whatever was asked (as the kernel
        // does), and a read-only open writes nothing at all.
        let writable = !opts.read_only && !md.needs_check();
        if dev_blocks > md.nr_data_blocks() && writable {
            // The kernel grows the pool on resume when the data device grew.
            md.resize_data_dev(dev_blocks)?;
        }
        let mut catalog = Catalog::load(root)?;
        catalog.journal_from = opts.catalog_journal_from;
        reconcile(
            &mut md,
            &mut catalog,
            block_size,
            dev_blocks * block_size,
            writable,
        )?;
        tracing::info!(root = %root.display(), transaction_id = md.transaction_id(), "pool opened");
        Ok(Self::start(root, devs, block_size, opts, md, catalog))
    }

    fn start(
        root: &Path,
        devs: Devices,
        block_size: u64,
        opts: PoolOptions,
        md: ThinMetadata,
        catalog: Catalog,
    ) -> Pool {
        // A read-only open reports the pool's own mode; `md_writable` refuses its changes.
        let mode = if md.needs_check() {
            PoolMode::ReadOnly
        } else {
            PoolMode::Write
        };
        let interval = opts.commit_interval;
        let zeroed = if devs.fresh_data {
            ZeroMap::all_zero(md.nr_data_blocks())
        } else if opts.read_only {
            // Nothing is provisioned.
            ZeroMap::unknown()
        } else {
            let t = Instant::now();
            let mut failed = None;
            let map = ZeroMap::from_holes(
                md.nr_data_blocks(),
                block_size,
                t + HOLE_SCAN_BUDGET,
                |f| failed = devs.data.holes(f).err(),
                |b| md.data_block_count(b) == 0,
            );
            match failed {
                // Provisioning then punches each block first, as without the map.
                Some(e) => {
                    tracing::warn!("finding the data file's holes failed: {e}");
                    ZeroMap::unknown()
                }
                None => {
                    tracing::debug!(took = ?t.elapsed(), "free blocks in the data file's holes found");
                    map
                }
            }
        };
        let datadev = Arc::new(DataDev::new(devs.data, block_size));
        let inner = Arc::new(Inner {
            root: root.to_path_buf(),
            data: datadev.clone(),
            datadev,
            meta_dev: devs.meta,
            data_path: devs.data_path,
            metadata_path: devs.metadata_path,
            block_size,
            opts,
            md: Mutex::new(MetaState {
                md,
                dirty: false,
                mode,
                low_water_fired: false,
                watch_fired: [false; 2],
                zeroed,
                failure: None,
                dropped: (0, String::new()),
                host_full: None,
                snap_reserved_here: false,
                pending: None,
            }),
            space: Condvar::new(),
            settled: Condvar::new(),
            committing: Mutex::new(()),
            catalog: Mutex::new(catalog),
            vols: Mutex::new(HashMap::new()),
            prison: Prison::new(),
            inserts: AtomicU64::new(0),
            stats: Stats::default(),
            watch: SpaceWatch::default(),
            stop: Mutex::new(false),
            stop_cv: Condvar::new(),
            _lock: devs.lock,
        });
        let timer = interval.map(|period| {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("thinpool-commit".into())
                .spawn(move || commit_timer(weak, period))
                .expect("spawn the commit thread")
        });
        Pool { inner, timer }
    }

    /// The pool's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// When the pool's sparse files could outgrow their host file system: the bytes they
    /// may still take (virtual size minus what is allocated, summed per file system) and the
    /// bytes free there, for the first file system where the first exceeds the second. `None`
    /// when they fit, or for block devices. A few `stat`/`statvfs` calls.
    pub fn host_space_shortfall(&self) -> Option<HostShortfall> {
        use std::os::unix::fs::MetadataExt as _;
        let mut by_fs: Vec<(u64, PathBuf, u64)> = Vec::new();
        for p in [&self.inner.data_path, &self.inner.metadata_path] {
            let Ok(m) = std::fs::metadata(p) else {
                continue;
            };
            if !m.is_file() {
                continue;
            }
            let more = m.len().saturating_sub(m.blocks() * 512);
            match by_fs.iter_mut().find(|(dev, _, _)| *dev == m.dev()) {
                Some(e) => e.2 += more,
                None => by_fs.push((m.dev(), p.clone(), more)),
            }
        }
        by_fs.into_iter().find_map(|(_, path, may_take)| {
            let st = rustix::fs::statvfs(&path).ok()?;
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            (may_take > free).then_some(HostShortfall {
                path,
                may_take,
                free,
            })
        })
    }

    /// Status, after a commit (as the kernel does when its status is read). A commit that
    /// fails does not hide the status: its cause is in [`PoolStatus::failure`].
    pub fn status(&self) -> Result<PoolStatus> {
        if let Err(e) = self.inner.commit() {
            tracing::debug!("commit before the status failed: {e}");
        }
        let (volumes, snapshots) = self.inner.catalog().counts();
        let st = self.inner.md();
        let md = &st.md;
        let total_meta = md.nr_metadata_blocks();
        let reserve = (total_meta / 10).min(4096);
        let free_meta = md.nr_free_metadata_blocks().saturating_sub(reserve);
        Ok(PoolStatus {
            transaction_id: md.transaction_id(),
            used_metadata_blocks: total_meta - free_meta,
            total_metadata_blocks: total_meta,
            used_data_blocks: md.nr_data_blocks() - md.nr_free_data_blocks(),
            total_data_blocks: md.nr_data_blocks(),
            block_size: self.inner.block_size,
            held_root: md.held_root(),
            mode: st.mode,
            needs_check: md.needs_check(),
            error_if_no_space: self.inner.opts.error_if_no_space,
            discard_passdown: self.inner.opts.discard_passdown,
            metadata_low_watermark: (total_meta / 4).min(1024),
            data_path: self.inner.data_path.clone(),
            metadata_path: self.inner.metadata_path.clone(),
            volumes,
            snapshots,
            failure: st.failure.clone().or_else(|| st.host_full.clone()),
        })
    }

    /// Counters of requests, provisioning and commits since the pool was opened. O(1), no
    /// lock, no I/O (unlike [`status`](Self::status), which commits).
    pub fn stats(&self) -> PoolStats {
        self.inner.stats.snapshot()
    }

    /// Data and metadata blocks in use and in the pool, in the open transaction. O(1): takes
    /// the metadata lock for a moment, no I/O, no commit (unlike [`status`](Self::status)).
    pub fn space_usage(&self) -> SpaceUsage {
        SpaceUsage::of(&self.inner.md().md, self.inner.block_size)
    }

    /// Watch the pool's usage: from now on the allocation path wakes
    /// [`wait_space`](Self::wait_space) once when data or metadata usage reaches `percent` of its blocks
    /// (0 turns the watch off). Cheap on the write path: an atomic load and a comparison of
    /// counters per allocation.
    pub fn watch_space(&self, percent: u8) {
        self.inner
            .watch
            .percent
            .store(percent.min(100), Ordering::Relaxed);
    }

    /// Block until the space watch rings after `seen` (the count a previous call returned;
    /// 0 at first) or `timeout` passes; returns the count. A space whose usage is below the
    /// watched level now is re-armed first, so that reaching the level again rings again (a
    /// grow re-arms both).
    pub fn wait_space(&self, seen: u64, timeout: Duration) -> u64 {
        let w = &self.inner.watch;
        let percent = w.percent.load(Ordering::Relaxed);
        if percent > 0 {
            let mut st = self.inner.md();
            let over = SpaceUsage::of(&st.md, self.inner.block_size).at_or_over(percent);
            for (fired, over) in st.watch_fired.iter_mut().zip(over) {
                *fired &= over;
            }
        }
        let rung = w.rung.lock().expect("space watch poisoned");
        let (rung, _) =
            w.cv.wait_timeout_while(rung, timeout, |r| *r == seen)
                .expect("space watch poisoned");
        *rung
    }

    /// The data and metadata devices' paths (`<root>/pool/data` and `<root>/pool/metadata`,
    /// or the names of devices handed in).
    pub fn device_paths(&self) -> (&Path, &Path) {
        (&self.inner.data_path, &self.inner.metadata_path)
    }

    /// Every volume, sorted by name.
    pub fn volumes(&self) -> Result<Vec<VolumeInfo>> {
        let cat = self.inner.catalog();
        let mut st = self.inner.md();
        cat.volumes
            .values()
            .filter(|e| !e.removing)
            .map(|e| info_of(&mut st.md, e))
            .collect()
    }

    /// One volume.
    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        let cat = self.inner.catalog();
        let e = entry(&cat, name)?;
        let mut st = self.inner.md();
        info_of(&mut st.md, e)
    }

    fn check_free_space(&self, st: &MetaState) -> Result<()> {
        let md = &st.md;
        let free_pct = md.nr_free_data_blocks() * 100 / md.nr_data_blocks().max(1);
        if free_pct < self.inner.opts.min_free_percent as u64 {
            return Err(Error::NoSpace(format!(
                "only {free_pct}% of the pool's data blocks are free, below the minimum of {}%: grow the pool (`thinpool pool grow`) or remove volumes",
                self.inner.opts.min_free_percent
            )));
        }
        Ok(())
    }

    /// Create an empty volume of `size` bytes.
    pub fn create_volume(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        self.create_labeled(name, size, None, Labels::new())
    }

    /// Snapshot `origin` as `name` (O(1)). The origin is quiesced for the moment of the
    /// snapshot: writes in flight finish first, later ones see the new sharing.
    pub fn snapshot(&self, origin: &str, name: &str) -> Result<VolumeInfo> {
        self.create_labeled(name, 0, Some(origin), Labels::new())
    }

    /// Create `name` — a snapshot of `origin`, or else an empty volume of `size` bytes — with
    /// `labels`, all in one step: after a crash the volume exists with its labels or not at
    /// all.
    pub fn create_labeled(
        &self,
        name: &str,
        size: u64,
        origin: Option<&str>,
        labels: Labels,
    ) -> Result<VolumeInfo> {
        check_name(name)?;
        // New names only: a pool made before this rule keeps opening with its volumes.
        if name.starts_with('-') {
            return Err(Error::InvalidArgument(format!(
                "invalid volume name {name:?}: a name may not start with '-' (commands would \
                 read it as an option)"
            )));
        }
        if origin.is_none() {
            check_volume_size(name, size)?;
        }
        let mut cat = self.inner.catalog();
        if cat.volumes.contains_key(name) {
            return Err(Error::Exists(format!(
                "a volume named {name} already exists"
            )));
        }
        let origin_entry = origin.map(|o| entry(&cat, o).cloned()).transpose()?;
        let origin_state = origin_entry.as_ref().map(|o| self.inner.vol_state(o));
        // Quiesce the origin: wait for its in-flight I/O, hold new I/O.
        let _quiesced = origin_state
            .as_ref()
            .map(|v| v.quiesce.write().expect("quiesce lock poisoned"));
        let mut st = self.inner.md_writable()?;
        self.check_free_space(&st)?;
        // The lowest id neither the metadata nor the catalog uses (one set: a snapshot's cost
        // stays flat in the number of volumes).
        let mut used: HashSet<u32> = st.md.devices()?.iter().map(|(i, _)| i.get()).collect();
        used.extend(cat.volumes.values().map(|e| e.thin_id));
        let thin_id = (0..=ThinId::MAX)
            .find(|i| !used.contains(i))
            .ok_or_else(|| Error::NoSpace("all 2^24 thin device ids are in use".into()))?;
        let tid = st.md.transaction_id();
        let size = match &origin_state {
            Some(o) => o.size.load(Ordering::SeqCst),
            None => size,
        };
        let e = Entry {
            name: name.to_string(),
            thin_id,
            size,
            kind: if origin.is_some() {
                VolumeKind::Snapshot
            } else {
                VolumeKind::Thin
            },
            parent: origin.map(str::to_string),
            created: now(),
            removing: false,
            shrinking: None,
            labels,
        };
        // Catalog first (rolled back on open if the metadata commit does not happen).
        cat.volumes.insert(name.to_string(), e.clone());
        cat.transaction_id = tid + 1;
        if let Err(err) = cat.save() {
            cat.volumes.remove(name);
            return Err(err);
        }
        let id = ThinId::new(thin_id as u64)?;
        let r = match &origin_entry {
            Some(o) => st.md.create_snap(id, ThinId::new(o.thin_id as u64)?),
            None => st.md.create_thin(id),
        };
        let r = r.and_then(|()| st.md.set_transaction_id(tid, tid + 1));
        if let Err(err) = r {
            cat.volumes.remove(name);
            cat.transaction_id = tid;
            let _ = cat.save();
            return Err(st.failed("creating a thin device", err.into()));
        }
        st.dirty = true;
        drop(st);
        self.inner.commit()?;
        tracing::info!(volume = name, thin_id, size, origin, "volume created");
        let mut st = self.inner.md();
        info_of(&mut st.md, &e)
    }

    /// Replace the labels of `name` in one atomic write of the catalog (the metadata is not
    /// touched). Refused on a read-only pool, like every change.
    pub fn set_labels(&self, name: &str, labels: Labels) -> Result<VolumeInfo> {
        let mut cat = self.inner.catalog();
        entry(&cat, name)?;
        let mut st = self.inner.md_writable()?;
        let e = cat.volumes.get_mut(name).expect("entry looked up above");
        let old = std::mem::replace(&mut e.labels, labels);
        if let Err(err) = cat.save() {
            cat.volumes
                .get_mut(name)
                .expect("entry looked up above")
                .labels = old;
            return Err(err);
        }
        info_of(&mut st.md, &cat.volumes[name])
    }

    /// For every volume, the data blocks it maps that no other mapping shares (`thin_ls`'s
    /// EXCLUSIVE_BLOCKS: a block two devices reach through a shared subtree counts for both),
    /// from the live metadata. One walk of every device's mappings, twice.
    pub fn exclusive_blocks(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let cat = self.inner.catalog();
        let mut st = self.inner.md();
        let devices = st.md.devices()?;
        let mut refs: HashMap<u64, u8> = HashMap::new();
        for (id, _) in &devices {
            st.md.mappings(*id, 0, &mut |_, b, _| {
                let n = refs.entry(b).or_insert(0);
                *n = n.saturating_add(1);
                true
            })?;
        }
        let mut out = std::collections::BTreeMap::new();
        for e in cat.volumes.values() {
            let id = ThinId::new(e.thin_id as u64)?;
            let mut n = 0u64;
            st.md.mappings(id, 0, &mut |_, b, _| {
                n += u64::from(refs.get(&b) == Some(&1));
                true
            })?;
            out.insert(e.name.clone(), n);
        }
        Ok(out)
    }

    /// Remove a volume; its blocks return to the pool. Busy while a handle is open.
    pub fn remove_volume(&self, name: &str) -> Result<()> {
        let mut cat = self.inner.catalog();
        let e = entry(&cat, name)?.clone();
        {
            let vols = self.inner.vols.lock().expect("volume table poisoned");
            if let Some(v) = vols.get(&e.thin_id) {
                let n = v.handles.load(Ordering::SeqCst);
                if n > 0 {
                    return Err(Error::Busy(format!(
                        "volume {name} is open ({n} handle(s)); close it before removing it"
                    )));
                }
            }
        }
        let mut st = self.inner.md_writable()?;
        let tid = st.md.transaction_id();
        cat.volumes
            .get_mut(name)
            .expect("entry looked up above")
            .removing = true;
        cat.transaction_id = tid + 1;
        cat.save()?;
        let id = ThinId::new(e.thin_id as u64)?;
        if let Err(err) = st
            .md
            .delete_thin(id)
            .and_then(|()| st.md.set_transaction_id(tid, tid + 1))
        {
            // The entry stays marked `removing`: the next open finishes the removal.
            return Err(st.failed("deleting a thin device", err.into()));
        }
        st.dirty = true;
        drop(st);
        self.inner.commit()?;
        cat.volumes.remove(name);
        // Snapshots of it no longer have a parent (as LVM shows an origin that is gone).
        for child in cat.volumes.values_mut() {
            if child.parent.as_deref() == Some(name) {
                child.parent = None;
            }
        }
        cat.save()?;
        self.inner
            .vols
            .lock()
            .expect("volume table poisoned")
            .remove(&e.thin_id);
        tracing::info!(volume = name, "volume removed");
        Ok(())
    }

    /// Change a volume's virtual size. Shrinking unmaps every block past the new end.
    pub fn resize_volume(&self, name: &str, size: u64) -> Result<()> {
        check_volume_size(name, size)?;
        let mut cat = self.inner.catalog();
        let e = entry(&cat, name)?.clone();
        let vs = self.inner.vol_state(&e);
        let _quiesced = vs.quiesce.write().expect("quiesce lock poisoned");
        let shrink = size < e.size;
        // Refused on a read-only pool before the catalog changes.
        let tid = self.inner.md_writable()?.md.transaction_id();
        // Catalog first. A shrink is recorded as an intent: if the commit below does not
        // happen, the next open removes the mappings past the size (rolled forward). A grow
        // needs no intent: the metadata has nothing past the old size.
        {
            let c = cat.volumes.get_mut(name).expect("looked up above");
            c.size = size;
            c.shrinking = shrink.then_some(tid);
        }
        cat.save()?;
        vs.size.store(size, Ordering::SeqCst);
        if shrink {
            let first = size.div_ceil(self.inner.block_size);
            let mut st = self.inner.md_writable()?;
            let n = match st.md.remove_range(vs.thin, first, u64::MAX) {
                Ok(n) => n,
                // The recorded intent finishes the shrink at the next open.
                Err(err) => return Err(st.failed("shrinking a volume", err.into())),
            };
            if n > 0 {
                st.dirty = true;
            }
            // A partial last block keeps its bytes past the end; zero them so a later grow
            // reads zeros there, as a fresh volume would.
            drop(st);
            let tail = size % self.inner.block_size;
            if tail != 0 {
                // (No range check on this path: the tail lies past the new size.)
                let v = Volume::new(self.inner.clone(), vs.clone());
                v.write_zeroes_unquiesced(size, first * self.inner.block_size - size)?;
            }
            self.inner.commit()?;
            // Done: the intent is spent (a crash before this save only repeats the removal of
            // mappings that are already gone).
            cat.volumes
                .get_mut(name)
                .expect("looked up above")
                .shrinking = None;
            cat.save()?;
        }
        tracing::info!(volume = name, from = e.size, to = size, "volume resized");
        Ok(())
    }

    /// A handle for I/O on a volume.
    pub fn open_volume(&self, name: &str) -> Result<Volume> {
        let cat = self.inner.catalog();
        let e = entry(&cat, name)?;
        let vs = self.inner.vol_state(e);
        Ok(Volume::new(self.inner.clone(), vs))
    }

    /// Grow the data and/or metadata device online (bytes; `None` = take the device's
    /// current size, for block devices grown underneath). Shrinking is refused. Durable when
    /// it returns (one commit).
    pub fn grow(&self, data_size: Option<u64>, metadata_size: Option<u64>) -> Result<()> {
        self.grow_inner(data_size, metadata_size, true)
    }

    /// [`grow`](Self::grow) without its commit: returns once the open transaction holds the
    /// new size (the metadata lock is held for the file's extension and the space map's, a
    /// few microseconds to milliseconds), and writers queued on a full pool go on at once.
    /// The commit timer, or the next flush, makes it durable; a crash before that leaves
    /// the data file larger than the metadata says, which the next open takes (as for a block
    /// device grown underneath), and a metadata file larger, which the next grow takes. For
    /// the daemon's autogrow, whose pause must not include a data sync.
    pub fn grow_uncommitted(
        &self,
        data_size: Option<u64>,
        metadata_size: Option<u64>,
    ) -> Result<()> {
        self.grow_inner(data_size, metadata_size, false)
    }

    fn grow_inner(
        &self,
        data_size: Option<u64>,
        metadata_size: Option<u64>,
        commit: bool,
    ) -> Result<()> {
        let inner = &self.inner;
        if inner.opts.read_only {
            return Err(inner.read_only_error());
        }
        if let Some(size) = data_size {
            check_data_blocks(size, inner.block_size)?;
        }
        let mut st = inner.md();
        // How long writers needing a block wait on the metadata lock for this grow (the
        // commit's own hold comes on top, as for any commit).
        let locked = Instant::now();
        if st.md.needs_check() {
            return Err(Error::ReadOnly(
                "the metadata needs a check (NEEDS_CHECK): with no daemon running, `thinpool pool \
                 check --clear-needs-check-flag` clears the flag if the metadata is clean; then grow"
                    .into(),
            ));
        }
        if let Some(size) = metadata_size.or_else(|| inner.meta_dev.size().ok()) {
            let cur = inner.meta_dev.size()?;
            if size < st.md.nr_metadata_blocks() * 4096 {
                return Err(Error::InvalidArgument(format!(
                    "the metadata device cannot shrink (it is {} bytes)",
                    st.md.nr_metadata_blocks() * 4096
                )));
            }
            if size > cur {
                inner.meta_dev.set_size(size)?;
            }
            let blocks = size / 4096;
            if blocks > st.md.nr_metadata_blocks() {
                if let Err(e) = st.md.resize_metadata_dev(blocks) {
                    return Err(st.failed("growing the metadata device", e.into()));
                }
                st.dirty = true;
            }
        }
        if let Some(size) = data_size.or_else(|| inner.data.size().ok()) {
            let bs = inner.block_size;
            if size / bs < st.md.nr_data_blocks() {
                return Err(Error::InvalidArgument(format!(
                    "the data device cannot shrink (it is {} bytes)",
                    st.md.nr_data_blocks() * bs
                )));
            }
            if size > inner.data.size()? {
                inner.data.set_size(size)?;
            }
            if size / bs > st.md.nr_data_blocks() {
                if let Err(e) = st.md.resize_data_dev(size / bs) {
                    return Err(st.failed("growing the data device", e.into()));
                }
                st.dirty = true;
            }
        }
        if matches!(st.mode, PoolMode::OutOfDataSpace)
            || (st.mode == PoolMode::ReadOnly && !st.md.needs_check())
        {
            st.mode = PoolMode::Write;
        }
        st.low_water_fired = false;
        st.watch_fired = [false; 2];
        drop(st);
        let locked_us = locked.elapsed().as_micros() as u64;
        // Writers queued on a full pool go on now, in the open transaction that holds the
        // new size, not after the commit's data sync (hundreds of milliseconds under load):
        // if the commit fails, the abort drops the size and their mappings together.
        inner.space.notify_all();
        let committing = Instant::now();
        if commit {
            inner.commit()?;
        }
        tracing::info!(
            data_size,
            metadata_size,
            locked_us,
            commit_us = committing.elapsed().as_micros() as u64,
            committed = commit,
            "pool grown"
        );
        Ok(())
    }

    /// Make everything written so far durable: sync data, commit metadata.
    pub fn commit(&self) -> Result<()> {
        self.inner.commit()
    }

    /// Move the pool's data onto `dest` online: an existing block device, or a file (made,
    /// sparse, if missing; an existing one must hold no data). `<root>/pool/data` becomes a
    /// symlink to it. Volumes stay in use throughout: writes are mirrored to both devices
    /// while the used blocks are copied and verified. Blocks until done (O(used data));
    /// `progress(done, total)` gets bytes (copy, then verification). Durable when it returns.
    /// A failure, or a crash at any point, leaves the pool whole on one of the two devices
    /// (see `datadev`). A default data file in `pool/` is kept as `pool/data.old`
    /// ([`MoveReport::old_data_kept`]).
    ///
    /// Errors: `InvalidArgument` (dest too small, inside the pool's directory, the pool's own
    /// device, a pool on handed-in devices, a file that holds data), `Busy` (a move is
    /// running, or the block device is mounted or held), `Io`
    /// (either device failed, or the copy read back different).
    pub fn move_data(&self, dest: &Path, progress: &dyn Fn(u64, u64)) -> Result<MoveReport> {
        crate::datadev::move_data(
            &self.inner,
            &self.inner.datadev,
            Dest::Path(dest),
            progress,
            None,
        )
    }

    /// [`move_data`](Self::move_data) onto a device handed in, for a pool opened on given
    /// devices ([`Pool::open_on`]): nothing on disk is switched, the caller opens the pool on
    /// `dest` from now on.
    pub fn move_data_on(
        &self,
        dest: Arc<dyn BlockDevice>,
        progress: &dyn Fn(u64, u64),
    ) -> Result<MoveReport> {
        crate::datadev::move_data(
            &self.inner,
            &self.inner.datadev,
            Dest::Device(dest),
            progress,
            None,
        )
    }

    /// For tests of interruptions: a move that stops at `stage`, as a crash there would
    /// leave it (writes keep being mirrored until the pool is dropped).
    #[doc(hidden)]
    pub fn move_data_until(
        &self,
        dest: &Path,
        dev: Option<Arc<dyn BlockDevice>>,
        stage: MoveStage,
    ) -> Result<MoveReport> {
        let dest = match dev {
            Some(d) => Dest::Device(d),
            None => Dest::Path(dest),
        };
        crate::datadev::move_data(
            &self.inner,
            &self.inner.datadev,
            dest,
            &|_, _| {},
            Some(stage),
        )
    }

    /// Take a metadata snapshot for live backups (`meta dump --metadata-snap`).
    pub fn reserve_metadata_snap(&self) -> Result<u64> {
        self.inner.sync_data()?;
        let mut st = self.inner.md_writable()?;
        if let Some(h) = st.md.held_root() {
            return Err(Error::Busy(format!(
                "a metadata snapshot is already held (block {h}); release it first"
            )));
        }
        let h = match st.md.reserve_metadata_snap() {
            Ok(h) => h,
            Err(e) => return Err(st.failed("reserving a metadata snapshot", e.into())),
        };
        st.dirty = false;
        st.snap_reserved_here = true;
        Ok(h)
    }

    /// The held metadata snapshot, if any: its block (the superblock's `held_root`) and
    /// whether it was reserved through this open of the pool (`false`: it was found held when
    /// the pool was opened, left by an earlier run that did not release it, e.g. a crash; the
    /// kernel keeps such a snapshot across restarts, and so does the engine: it only pins
    /// metadata blocks). O(1), no I/O.
    pub fn held_metadata_snap(&self) -> Option<(u64, bool)> {
        let st = self.inner.md();
        st.md.held_root().map(|h| (h, st.snap_reserved_here))
    }

    /// Drop the metadata snapshot and commit. A snapshot reserved through this open of the
    /// pool is released without reading its superblock copy (the roots were kept from the
    /// reserve), so damage there, which nothing else reaches, does not keep it held. A
    /// failure part-way aborts the open transaction (nothing half-done is committed) and
    /// makes the pool read-only, as any failed metadata change does.
    pub fn release_metadata_snap(&self) -> Result<()> {
        self.inner.sync_data()?;
        let mut st = self.inner.md_writable()?;
        if st.md.held_root().is_none() {
            return Err(Error::InvalidArgument(
                "no metadata snapshot is held".into(),
            ));
        }
        if let Err(e) = st.md.release_metadata_snap() {
            return Err(st.failed("releasing the metadata snapshot", e.into()));
        }
        st.dirty = false;
        st.snap_reserved_here = false;
        Ok(())
    }

    /// Commit and close, reporting a failure of the last commit.
    pub fn close(mut self) -> Result<()> {
        self.stop_timer();
        self.inner.commit()
    }

    fn stop_timer(&mut self) {
        *self.inner.stop.lock().expect("stop flag poisoned") = true;
        self.inner.stop_cv.notify_all();
        if let Some(t) = self.timer.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.timer.is_some() {
            self.stop_timer();
        }
        if let Err(e) = self.inner.commit() {
            tracing::error!(
                "commit while closing the pool in {} failed: {e}",
                self.inner.root.display()
            );
        }
    }
}

impl Drop for Inner {
    /// The last user of the pool (the `Pool` or a volume handle that outlived it) commits, so
    /// writes made through a handle after `close` are not lost.
    fn drop(&mut self) {
        if let Err(e) = self.commit() {
            tracing::error!(
                "final commit of the pool in {} failed: {e}",
                self.root.display()
            );
        }
    }
}

fn entry<'a>(cat: &'a Catalog, name: &str) -> Result<&'a Entry> {
    cat.volumes
        .get(name)
        .filter(|e| !e.removing)
        .ok_or_else(|| Error::NotFound(format!("no volume named {name}")))
}

fn info_of(md: &mut ThinMetadata, e: &Entry) -> Result<VolumeInfo> {
    let id = ThinId::new(e.thin_id as u64)?;
    let d = md.device_details(id)?;
    let highest = if d.mapped_blocks > 0 {
        md.highest_mapped_block(id)?
    } else {
        None
    };
    Ok(VolumeInfo {
        name: e.name.clone(),
        thin_id: e.thin_id,
        size: e.size,
        kind: e.kind,
        parent: e.parent.clone(),
        created: e.created,
        mapped_blocks: d.mapped_blocks,
        highest_mapped_block: highest,
        labels: e.labels.clone(),
    })
}

/// Bring the catalog and the metadata into agreement after open (the rules are in `catalog`):
/// roll recorded intents forward, drop entries that own no device, grow sizes to cover the
/// mappings, adopt devices the catalog does not know. Never removes a mapping without a
/// recorded intent. With `writable` false (a read-only open, or a pool that needs a check) it
/// changes only the catalog in memory and writes nothing.
fn reconcile(
    md: &mut ThinMetadata,
    cat: &mut Catalog,
    block_size: u64,
    default_size: u64,
    writable: bool,
) -> Result<()> {
    let devices: HashSet<u32> = md.devices()?.iter().map(|(i, _)| i.get()).collect();
    let md_tid = md.transaction_id();
    let mut changed_md = false;
    let mut changed_cat = false;
    // Devices whose removal was recorded but is not finished here (read-only): not adopted.
    let mut being_removed = Vec::new();
    let names: Vec<String> = cat.volumes.keys().cloned().collect();
    for name in names {
        let mut e = cat.volumes[&name].clone();
        let present = devices.contains(&e.thin_id);
        let id = ThinId::new(e.thin_id as u64)?;
        if e.removing {
            if present && writable {
                md.delete_thin(id)?;
                changed_md = true;
            } else if present {
                being_removed.push(e.thin_id);
            }
            tracing::warn!(volume = %name, "finishing an interrupted removal");
            cat.volumes.remove(&name);
            changed_cat = true;
            continue;
        }
        if !present {
            if cat.transaction_id > md_tid {
                tracing::warn!(volume = %name, thin_id = e.thin_id, "dropping a volume whose creation did not commit");
            } else {
                tracing::warn!(
                    volume = %name,
                    thin_id = e.thin_id,
                    "thin device {} of volume {name} is not in the metadata (deleted outside thinpool): dropping the volume",
                    e.thin_id
                );
            }
            cat.volumes.remove(&name);
            changed_cat = true;
            continue;
        }
        if let Some(since) = e.shrinking {
            if writable {
                let n = md.remove_range(id, e.size.div_ceil(block_size), u64::MAX)?;
                tracing::warn!(volume = %name, since, removed = n, "finishing an interrupted shrink");
                changed_md |= n > 0;
                e.shrinking = None;
            }
        } else if let Some(high) = md.highest_mapped_block(id)? {
            // A partial last block is inside the size; a block wholly past it is not.
            let needed = (high + 1) * block_size;
            if e.size.div_ceil(block_size) <= high {
                tracing::warn!(
                    volume = %name,
                    "volume {name} maps block {high}, past its recorded size of {} bytes (grown outside thinpool, or an older volumes.json): its size is now {needed} bytes",
                    e.size
                );
                e.size = needed;
            }
        }
        if e.parent
            .as_ref()
            .is_some_and(|p| !cat.volumes.contains_key(p))
        {
            e.parent = None;
        }
        if e != cat.volumes[&name] {
            cat.volumes.insert(name, e);
            changed_cat = true;
        }
    }
    let devices: Vec<u32> = md.devices()?.iter().map(|(i, _)| i.get()).collect();
    // Sets, not scans: O(n) at 10 000 volumes, not O(n²) (issue 16).
    let known: HashSet<u32> = cat.volumes.values().map(|e| e.thin_id).collect();
    for id in devices {
        if known.contains(&id) || being_removed.contains(&id) {
            continue;
        }
        let mut name = format!("thin-{id}");
        let mut n = 1;
        while cat.volumes.contains_key(&name) {
            n += 1;
            name = format!("thin-{id}-{n}");
        }
        let high = md.highest_mapped_block(ThinId::new(id as u64)?)?;
        let size = high.map_or(default_size, |h| default_size.max((h + 1) * block_size));
        tracing::info!(thin_id = id, volume = %name, size, "adopting a thin device the catalog did not know");
        cat.volumes.insert(
            name.clone(),
            Entry {
                name,
                thin_id: id,
                size,
                kind: VolumeKind::Thin,
                parent: None,
                created: now(),
                removing: false,
                shrinking: None,
                labels: Labels::new(),
            },
        );
        changed_cat = true;
    }
    if !writable {
        return Ok(());
    }
    if changed_md {
        md.set_transaction_id(md_tid, md_tid + 1)?;
        md.commit()?;
    }
    if changed_cat || cat.transaction_id != md.transaction_id() {
        cat.transaction_id = md.transaction_id();
        cat.save()?;
    }
    Ok(())
}

fn commit_timer(weak: Weak<Inner>, period: Duration) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        {
            let stop = inner.stop.lock().expect("stop flag poisoned");
            let (stop, _) = inner
                .stop_cv
                .wait_timeout_while(stop, period, |stop| !*stop)
                .expect("stop flag poisoned");
            if *stop {
                return;
            }
        }
        let dirty = inner.md().dirty;
        if dirty && let Err(e) = inner.commit() {
            tracing::error!("periodic commit failed: {e}");
        }
    }
}

impl Inner {
    /// The metadata, once no commit has its transaction sealed: every mapping is in the
    /// B-trees (`pending` is `None`). What reads or changes more than single mappings uses
    /// this.
    pub fn md(&self) -> MutexGuard<'_, MetaState> {
        let st = self.md_io();
        self.settled
            .wait_while(st, |st| st.pending.is_some())
            .expect("metadata lock poisoned")
    }

    /// The metadata as it is, possibly sealed by a commit: for looking up and making single
    /// mappings ([`MetaState::find`], [`MetaState::map`]) and allocating data blocks, which
    /// go on while a commit syncs the data.
    pub fn md_io(&self) -> MutexGuard<'_, MetaState> {
        self.md.lock().expect("metadata lock poisoned")
    }

    fn catalog(&self) -> MutexGuard<'_, Catalog> {
        self.catalog.lock().expect("catalog lock poisoned")
    }

    /// The metadata ([`md`](Self::md)), refusing changes in read-only or fail mode.
    pub fn md_writable(&self) -> Result<MutexGuard<'_, MetaState>> {
        let st = self.md();
        self.writable(st)
    }

    /// [`md_io`](Self::md_io), refusing changes in read-only or fail mode.
    pub fn md_io_writable(&self) -> Result<MutexGuard<'_, MetaState>> {
        let st = self.md_io();
        self.writable(st)
    }

    fn writable<'a>(&self, st: MutexGuard<'a, MetaState>) -> Result<MutexGuard<'a, MetaState>> {
        if self.opts.read_only {
            return Err(self.read_only_error());
        }
        if let Some(e) = self.failure_error(&st) {
            return Err(e);
        }
        match st.mode {
            PoolMode::ReadOnly | PoolMode::Fail => Err(Error::ReadOnly(format!(
                "the pool in {} is read-only{}: no metadata changes",
                self.root.display(),
                if st.md.needs_check() {
                    " (NEEDS_CHECK is set: check the metadata offline; with no daemon running, \
                     `thinpool pool check --clear-needs-check-flag` clears the flag if it is clean)"
                } else {
                    " (out of metadata space: grow the metadata device)"
                }
            ))),
            _ => Ok(st),
        }
    }

    /// The error for a change asked of a pool that a metadata failure made read-only or
    /// failed, naming the failure.
    fn failure_error(&self, st: &MetaState) -> Option<Error> {
        let why = st.failure.as_ref()?;
        let state = match st.mode {
            PoolMode::Fail => "failed",
            PoolMode::ReadOnly => "read-only",
            _ => return None,
        };
        Some(Error::ReadOnly(format!(
            "the pool in {} is {state} since a metadata operation failed: {why}",
            self.root.display()
        )))
    }

    /// The error for a change asked of a pool opened for reading only.
    pub(crate) fn read_only_error(&self) -> Error {
        Error::ReadOnly(format!(
            "the pool in {} is opened for reading only: no changes",
            self.root.display()
        ))
    }

    pub fn vol_state(&self, e: &Entry) -> Arc<VolState> {
        let mut vols = self.vols.lock().expect("volume table poisoned");
        vols.entry(e.thin_id)
            .or_insert_with(|| {
                Arc::new(VolState {
                    name: e.name.clone(),
                    thin: ThinId::new(e.thin_id as u64).expect("catalog ids are < 2^24"),
                    size: AtomicU64::new(e.size),
                    quiesce: RwLock::new(()),
                    handles: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    pub fn sync_data(&self) -> Result<()> {
        self.data.sync()?;
        Ok(())
    }

    /// Commit (section 9.2): data first, then the metadata; then punch the blocks this
    /// transaction freed (they cannot be reused before this point, and the committed metadata
    /// no longer maps them, so a crash cannot expose the hole).
    ///
    /// The data syncs run without the metadata lock, so that I/O goes on meanwhile; only the
    /// metadata write holds every request off. Mappings made during the first sync may point
    /// at data it missed, so if there are any the transaction is *sealed* and the data synced
    /// again. Mappings made while it is sealed point at data that sync may miss too: they
    /// wait outside the transaction (`MetaState::pending`: lookups see them, their blocks are
    /// allocated), the transaction is committed without them (their blocks given back for the
    /// moment, so that a crash right after leaks none), and they go into the next one at once.
    /// Commits run one at a time.
    pub fn commit(&self) -> Result<()> {
        let _one = self.committing.lock().expect("commit lock poisoned");
        let start = Instant::now();
        let before = self.inserts.load(Ordering::SeqCst);
        if let Err(e) = self.data.sync() {
            // What was written may not be on the device (a failed sync may even drop the
            // pages): never commit mappings to it, and fail every handle's next flush.
            let e = Error::from(e);
            self.md_io().abort(
                "syncing the data device",
                e.to_string(),
                e.is_host_full(),
                true,
            );
            return Err(e);
        }
        // Not sealed: only a commit seals, and this is the only one running.
        let mut st = self.md_io();
        // After an abort a flush fails, as the kernel fails flushes in read-only mode: what
        // was written since the last commit may be gone, and a flush must not say otherwise.
        if let Some(e) = self.failure_error(&st) {
            return Err(e);
        }
        if !st.dirty {
            return Ok(());
        }
        if self.inserts.load(Ordering::SeqCst) != before {
            st.pending = Some(BTreeMap::new());
            drop(st);
            let synced = self.data.sync();
            st = self.md_io();
            if let Err(e) = synced {
                let e = Error::from(e);
                // Also drops the mappings made meanwhile: their blocks were allocated in the
                // transaction now undone.
                st.abort(
                    "syncing the data device",
                    e.to_string(),
                    e.is_host_full(),
                    true,
                );
                drop(st);
                self.settled.notify_all();
                return Err(e);
            }
        }
        let r = self.commit_sealed(&mut st, start);
        drop(st);
        self.settled.notify_all();
        self.space.notify_all();
        r
    }

    /// Commit the metadata with the data synced, then make the mappings that waited.
    fn commit_sealed(&self, st: &mut MetaState, start: Instant) -> Result<()> {
        let sealed = st.pending.is_some();
        let pending = st.pending.take().unwrap_or_default();
        // A waiting mapping's block allocated before the last commit was committed as
        // allocated already; those of this transaction are given back until it is done.
        let given_back: Vec<u64> = pending
            .values()
            .copied()
            .filter(|&b| st.md.data_block_allocated_in_transaction(b))
            .collect();
        for &b in &given_back {
            if let Err(e) = st.md.release_data_block(b) {
                return Err(st.failed("committing", e.into()));
            }
        }
        let freed = if self.opts.discard_passdown {
            st.md.freed_data_blocks()
        } else {
            Vec::new()
        };
        if let Err(e) = st.md.commit() {
            return Err(st.failed("commit", e.into()));
        }
        st.dirty = false;
        st.host_full = None;
        self.stats.commit(start.elapsed());
        if sealed {
            self.stats.sealed(pending.len() as u64);
        }
        self.remap_pending(st, &given_back, pending);
        for b in freed {
            if st.md.data_block_count(b) == 0 {
                let bs = self.block_size;
                match self.data.punch_hole(b * bs, bs) {
                    Ok(()) => st.zeroed.set(b),
                    Err(e) => {
                        tracing::warn!("punching a hole for freed data block {b} failed: {e}")
                    }
                }
            }
        }
        if st.mode == PoolMode::OutOfDataSpace && st.md.nr_free_data_blocks() > 0 {
            st.mode = PoolMode::Write;
        }
        Ok(())
    }

    /// Make the mappings that waited during a commit in the new transaction. A failure
    /// aborts it (the pool's mode says what failed); the commit itself stands.
    fn remap_pending(
        &self,
        st: &mut MetaState,
        given_back: &[u64],
        pending: BTreeMap<(ThinId, u64), u64>,
    ) {
        if pending.is_empty() {
            return;
        }
        // Acknowledged writes are in these mappings: an abort from here on loses them.
        st.dirty = true;
        for &b in given_back {
            if let Err(e) = st.md.inc_data_block(b) {
                st.failed("allocating the blocks written during a commit", e.into());
                return;
            }
        }
        for ((thin, vblock), b) in pending {
            if st.map(thin, vblock, b).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> PoolConfig {
        PoolConfig {
            data_size: 16 << 20,
            metadata_size: 4 << 20,
            ..Default::default()
        }
    }

    #[test]
    fn write_snapshot_cow_discard_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let opts = PoolOptions {
            commit_interval: None,
            ..Default::default()
        };
        let pool = Pool::create(dir.path(), &small(), opts.clone()).unwrap();
        assert_eq!(
            Pool::open(dir.path(), opts.clone()).err().map(|e| e.kind()),
            Some(crate::ErrorKind::Busy)
        );
        pool.create_volume("a", 4 << 20).unwrap();
        let a = pool.open_volume("a").unwrap();
        a.write_at(&[1u8; 100_000], 1000).unwrap();
        pool.snapshot("a", "s").unwrap();
        a.write_at(&[2u8; 10], 5000).unwrap();
        let s = pool.open_volume("s").unwrap();
        let mut buf = vec![0u8; 20];
        s.read_at(&mut buf, 4995).unwrap();
        assert_eq!(buf, [1u8; 20]);
        a.read_at(&mut buf, 4995).unwrap();
        assert_eq!(&buf[..5], &[1u8; 5]);
        assert_eq!(&buf[5..15], &[2u8; 10]);
        // Discard: the whole block 1 (64 KiB..128 KiB) unmapped, partial block 0 kept.
        a.discard(60_000, 80_000).unwrap();
        let mut b2 = vec![9u8; 4];
        a.read_at(&mut b2, 70_000).unwrap();
        assert_eq!(b2, [0u8; 4]);
        a.read_at(&mut b2, 60_000).unwrap();
        assert_eq!(b2, [1u8; 4]);
        assert_eq!(a.mapped_extents(0, 4 << 20).unwrap(), vec![(0, 65536)]);
        assert_eq!(
            pool.remove_volume("a").err().map(|e| e.kind()),
            Some(crate::ErrorKind::Busy)
        );
        drop(a);
        drop(s);
        pool.close().unwrap();
        let pool = Pool::open(dir.path(), opts).unwrap();
        let names: Vec<String> = pool
            .volumes()
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["a", "s"]);
        let s = pool.open_volume("s").unwrap();
        s.read_at(&mut b2, 70_000).unwrap();
        assert_eq!(b2, [1u8; 4]);
        drop(s);
        pool.remove_volume("a").unwrap();
        let st = pool.status().unwrap();
        assert_eq!(st.volumes + st.snapshots, 1);
        assert!(
            st.kernel_line()
                .contains("rw discard_passdown queue_if_no_space")
        );
        pool.close().unwrap();
        if thinpool_testkit::require_tool("thin_check") {
            thinpool_testkit::thin_check(&dir.path().join("pool/metadata"))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
