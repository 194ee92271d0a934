//! thinpool-layers: the layer store (`../shared/docs/design.md`, "Layers and data flow").
//!
//! Snapshots in containerd's model — a key, a parent, a kind ([`Kind::Committed`] layer,
//! [`Kind::Active`] writable container, read-only [`Kind::View`]), labels, created and updated
//! times — each one a thin volume of the pool:
//!
//! ```text
//!   layer-base (ext4, base size, made once)
//!     └─ layer-1  committed  key sha256:aaa…        (a snapshot without parent: of the base)
//!          └─ layer-2  committed  key sha256:bbb…   (parent sha256:aaa…)
//!               ├─ layer-3  active  key ctr-1       (a container: writable)
//!               └─ layer-4  view    key ctr-2-ro    (read-only)
//! ```
//!
//! **Records live in the pool's catalog**, as labels of the volumes ([`Pool::create_labeled`],
//! [`Pool::set_labels`]), so each change is one atomic step of the engine and a crash leaves
//! every snapshot whole or absent:
//!
//! - prepare/view = one labelled snapshot of the parent's volume (or of the base); when it must
//!   also grow (a size asked bigger than the parent), it carries `layer.state=preparing` until
//!   its filesystem is resized, and [`LayerStore::open`] removes such a leftover (rolled back);
//! - commit = a commit of the pool (the data and mappings written so far are durable), then one
//!   label change (kind and key) — the volume stays the same;
//! - remove = the engine's removal, which its catalog rolls forward after a crash.
//!
//! So `thin_check` and the store always agree: every store snapshot is a thin device, and a
//! thin device is a store snapshot exactly when its catalog entry says so.
//!
//! **Mounts**: an active snapshot or a view is handed out as `ext4` on a loop device over the
//! volume's file in the FUSE export (direct I/O; read-only for views). The loop device is made
//! on demand and found again by its backing file, so nothing about it needs recording; it is
//! detached on commit and remove (refused while mounted).
//!
//! The **base device** (`layer-base`): one volume of the base size with ext4, made on first use
//! (`mkfs.ext4` with the inode tables and journal written out at once, so a snapshot's first
//! mount does not write them per container). A snapshot asked bigger than its parent (label
//! [`SIZE_LABEL`]) grows, and its filesystem with it (`e2fsck -f` + `resize2fs`), before it is
//! handed out.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thinpool_engine::{Labels, Pool, VolumeInfo};
use thinpool_fs::{FsType, filesystem, loopdev, mount};

/// The label (on prepare or view) asking for a snapshot of at least this many bytes (a size
/// like `20G` or a byte count): it is grown, with its filesystem, before it is handed out.
/// containerd hands a snapshotter only the labels under `containerd.io/snapshot/`, so the
/// label lives there: `ctr run --snapshotter-label containerd.io/snapshot/thinpool.size=20G`.
pub const SIZE_LABEL: &str = "containerd.io/snapshot/thinpool.size";

/// Name of the base device's volume.
pub const BASE_VOLUME: &str = "layer-base";

/// Docker's default base size: 10 GiB.
pub const DEFAULT_BASE_SIZE: u64 = 10 << 30;

// Keys of the catalog labels that hold a store record.
const KEY: &str = "layer.key";
const KIND: &str = "layer.kind";
const PARENT: &str = "layer.parent";
const UPDATED: &str = "layer.updated";
const STATE: &str = "layer.state";
const ROLE: &str = "layer.role";
/// containerd's labels are kept under this prefix.
const LABEL: &str = "label:";

/// What a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A read-only snapshot of a committed one.
    View,
    /// A writable snapshot: a container, or a layer being unpacked.
    Active,
    /// A committed layer: read-only, a parent for others.
    Committed,
}

impl Kind {
    /// The name containerd uses (`ctr snapshots ls`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        [Kind::View, Kind::Active, Kind::Committed]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One snapshot of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// containerd's key (active, view) or name (committed).
    pub key: String,
    /// The committed snapshot it was made from; `None` = from the base device.
    pub parent: Option<String>,
    /// What it is.
    pub kind: Kind,
    /// containerd's labels.
    pub labels: Labels,
    /// Creation time.
    pub created: SystemTime,
    /// Last change (commit, label update).
    pub updated: SystemTime,
    /// The pool volume holding it.
    pub volume: String,
    /// Its virtual size in bytes.
    pub size: u64,
}

/// A mount for containerd: `mount -t FSTYPE -o OPTIONS SOURCE DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type (`ext4`).
    pub fstype: String,
    /// The loop device.
    pub source: PathBuf,
    /// Mount options (`ro` for views).
    pub options: Vec<String>,
}

/// Space a snapshot uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of the data blocks only it maps (`thin_ls`'s EXCLUSIVE_BYTES).
    pub exclusive_bytes: u64,
    /// Bytes of all the data blocks it maps.
    pub mapped_bytes: u64,
}

/// Errors of the store, in the classes containerd's API answers with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No snapshot with that key.
    #[error("{0}")]
    NotFound(String),
    /// The key or name is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The snapshot is not in a state that allows it (commit of a view, remove with children,
    /// still mounted).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A malformed request (empty key, bad size label, parent not committed).
    #[error("{0}")]
    InvalidArgument(String),
    /// The store cannot work here (no FUSE export to put loop devices over).
    #[error("{0}")]
    Unavailable(String),
    /// The pool failed.
    #[error(transparent)]
    Engine(#[from] thinpool_engine::Error),
    /// A loop device, mount or filesystem tool failed.
    #[error(transparent)]
    Fs(#[from] thinpool_fs::Error),
}

/// Result of the store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the store needs besides the pool.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Where the FUSE export shows each volume as a file (`ROOT/files`); `None` = no export,
    /// so no mounts and no base device (records can still be listed and removed).
    pub files: Option<PathBuf>,
    /// Size of the base device when it is made.
    pub base_size: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            files: None,
            base_size: DEFAULT_BASE_SIZE,
        }
    }
}

/// The layer store over an open pool. Calls are serialised (one lock).
pub struct LayerStore {
    pool: Arc<Pool>,
    opts: StoreOptions,
    state: Mutex<State>,
}

struct State {
    /// Key → snapshot.
    snapshots: BTreeMap<String, Snapshot>,
    /// The next `layer-N`.
    next: u64,
    /// Active snapshots whose ext4 is smaller than their volume: grown while mounted, the
    /// kernel refused to grow the filesystem. It is grown offline before the next mount.
    unfilled: BTreeSet<String>,
}

impl LayerStore {
    /// Open the store on `pool`: read the records from the catalog and roll back a prepare a
    /// crash interrupted (a volume still marked `preparing` is removed).
    pub fn open(pool: Arc<Pool>, mut opts: StoreOptions) -> Result<LayerStore> {
        // The kernel names a loop device's file by its real path: the store finds its loop
        // devices by the files' folder with symlinks resolved.
        opts.files = opts.files.map(|f| f.canonicalize().unwrap_or(f));
        let mut snapshots = BTreeMap::new();
        let mut next = 1;
        for v in pool.volumes()? {
            if let Some(n) = v
                .name
                .strip_prefix("layer-")
                .and_then(|n| n.parse::<u64>().ok())
            {
                next = next.max(n + 1);
            }
            if v.labels.contains_key(STATE) {
                tracing::warn!(
                    volume = v.name,
                    key = v.labels.get(KEY).map(String::as_str),
                    "removing a layer-store volume whose preparation a crash interrupted"
                );
                if let Err(e) = pool.remove_volume(&v.name) {
                    tracing::error!(volume = v.name, "rolling back an unfinished prepare: {e}");
                }
                continue;
            }
            if let Some(s) = record_of(&v) {
                if let Some(other) = snapshots.get(&s.key) {
                    let other: &Snapshot = other;
                    tracing::error!(
                        key = s.key,
                        volume = v.name,
                        other = other.volume,
                        "two volumes hold the same snapshot key; keeping the first"
                    );
                    continue;
                }
                snapshots.insert(s.key.clone(), s);
            }
        }
        tracing::info!(snapshots = snapshots.len(), "layer store open");
        Ok(LayerStore {
            pool,
            opts,
            state: Mutex::new(State {
                snapshots,
                next,
                unfilled: BTreeSet::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The snapshot `key`.
    pub fn stat(&self, key: &str) -> Result<Snapshot> {
        let st = self.lock();
        get(&st, key).cloned()
    }

    /// Every snapshot, by key.
    pub fn list(&self) -> Vec<Snapshot> {
        self.lock().snapshots.values().cloned().collect()
    }

    /// A writable snapshot `key` of the committed `parent` (`""`: of the base device), and its
    /// mounts.
    pub fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        self.create(key, parent, labels, Kind::Active)
    }

    /// A read-only snapshot `key` of the committed `parent`, and its mounts.
    pub fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        self.create(key, parent, labels, Kind::View)
    }

    fn create(&self, key: &str, parent: &str, labels: Labels, kind: Kind) -> Result<Vec<Mount>> {
        check_key(key)?;
        let files = self.files()?.to_path_buf();
        let want = labels.get(SIZE_LABEL).map(|s| parse_size(s)).transpose()?;
        let mut st = self.lock();
        if st.snapshots.contains_key(key) {
            return Err(Error::AlreadyExists(format!(
                "snapshot {key}: already exists"
            )));
        }
        let origin = if parent.is_empty() {
            self.base(&files)?
        } else {
            let p = st.snapshots.get(parent).ok_or_else(|| {
                Error::NotFound(format!("snapshot {key}: parent {parent} not found"))
            })?;
            if p.kind != Kind::Committed {
                return Err(Error::InvalidArgument(format!(
                    "snapshot {key}: parent {parent} is not a committed snapshot (it is {})",
                    p.kind
                )));
            }
            p.volume.clone()
        };
        let origin_size = self.pool.volume_info(&origin)?.size;
        let grow = want.filter(|&w| w > origin_size);
        let now = SystemTime::now();
        let mut record = Labels::new();
        record.insert(KEY.into(), key.into());
        record.insert(KIND.into(), kind.as_str().into());
        if !parent.is_empty() {
            record.insert(PARENT.into(), parent.into());
        }
        record.insert(UPDATED.into(), secs(now).to_string());
        for (k, v) in kept(labels) {
            record.insert(format!("{LABEL}{k}"), v);
        }
        let name = format!("layer-{}", st.next);
        st.next += 1;
        let mut marked = record.clone();
        if grow.is_some() {
            marked.insert(STATE.into(), "preparing".into());
        }
        let info = self.pool.create_labeled(&name, 0, Some(&origin), marked)?;
        let info = match grow {
            None => info,
            Some(size) => match self.grow_new(&files, &name, size, record) {
                Ok(info) => info,
                Err(e) => {
                    if let Err(e2) = self.pool.remove_volume(&name) {
                        tracing::error!(
                            volume = name,
                            "removing a snapshot that failed to grow: {e2}"
                        );
                    }
                    return Err(e);
                }
            },
        };
        let snap = record_of(&info).expect("the record was just written");
        st.snapshots.insert(key.to_string(), snap);
        // A new volume: no loop device can be over its file yet (names are never reused), so
        // attach without looking through every loop device (Prepare stays flat in the number
        // of snapshots).
        // Without a device (no free loop device) the prepare is undone: containerd may ask
        // again with the same key.
        let read_only = kind == Kind::View;
        let device = match loopdev::attach(&files.join(&name), read_only) {
            Ok(d) => d,
            Err(e) => {
                st.snapshots.remove(key);
                if let Err(e2) = self.pool.remove_volume(&name) {
                    tracing::error!(
                        volume = name,
                        "removing a snapshot with no loop device: {e2}"
                    );
                }
                return Err(e.into());
            }
        };
        drop(st);
        tracing::info!(key, parent, volume = name, %kind, "snapshot prepared");
        Ok(ext4_mount(device, read_only))
    }

    /// Grow the new, unmounted snapshot `name` to `size` with its filesystem, then clear its
    /// `preparing` mark.
    fn grow_new(&self, files: &Path, name: &str, size: u64, record: Labels) -> Result<VolumeInfo> {
        self.pool.resize_volume(name, size)?;
        let file = files.join(name);
        filesystem::resize_offline(FsType::Ext4, &file, size)?;
        Ok(self.pool.set_labels(name, record)?)
    }

    /// The mounts of an active snapshot or a view: ext4 on its loop device (attached now if it
    /// is not). A filesystem the kernel refused to grow while mounted ([`LayerStore::resize`])
    /// is grown offline here first, when nothing has it mounted.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let files = self.files()?.to_path_buf();
        let mut st = self.lock();
        let s = get(&st, key)?;
        if s.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is committed: committed snapshots are not mounted (make a view of it)"
            )));
        }
        let file = files.join(&s.volume);
        let read_only = s.kind == Kind::View;
        let device = match loop_of(&file) {
            Some(d) => d,
            None => loopdev::attach(&file, read_only)?,
        };
        if st.unfilled.contains(key) && !is_mounted(&device) {
            let size = s.size;
            filesystem::resize_offline(FsType::Ext4, &device, size)?;
            st.unfilled.remove(key);
            tracing::info!(
                key,
                size,
                "filesystem grown to fill its volume before a mount"
            );
        }
        Ok(ext4_mount(device, read_only))
    }

    /// Commit the active snapshot `key` as the committed `name` (same volume; its loop device
    /// is detached, refused while it is mounted), with `labels` (the active one's are not
    /// inherited).
    pub fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        check_key(name)?;
        let mut st = self.lock();
        // containerd's order: the name first, then the key.
        if st.snapshots.contains_key(name) {
            return Err(Error::AlreadyExists(format!(
                "cannot commit {key} as {name}: a snapshot {name} already exists"
            )));
        }
        let s = get(&st, key)?.clone();
        if s.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is {}, not active: only an active snapshot can be committed",
                s.kind
            )));
        }
        self.release_loop(&s)?;
        // Everything written to it is durable before it is called committed.
        self.pool.commit()?;
        // The committed snapshot has the commit's labels, none inherited (as containerd's).
        let c = Snapshot {
            key: name.to_string(),
            kind: Kind::Committed,
            updated: SystemTime::now(),
            labels: kept(labels),
            ..s.clone()
        };
        self.pool.set_labels(&s.volume, record_labels(&c))?;
        st.snapshots.remove(key);
        st.snapshots.insert(name.to_string(), c);
        tracing::info!(key, name, volume = s.volume, "snapshot committed");
        Ok(())
    }

    /// Remove `key` (refused while it has children or is mounted); its blocks return to the
    /// pool.
    pub fn remove(&self, key: &str) -> Result<()> {
        let mut st = self.lock();
        let s = get(&st, key)?.clone();
        let children: Vec<&str> = st
            .snapshots
            .values()
            .filter(|c| c.parent.as_deref() == Some(key))
            .map(|c| c.key.as_str())
            .collect();
        if !children.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key}: {} snapshot(s) are made from it ({}); remove them first",
                children.len(),
                children.join(", ")
            )));
        }
        self.release_loop(&s)?;
        // A loop device lets go of its file asynchronously: the volume may stay busy briefly.
        let mut tries = 0;
        loop {
            match self.pool.remove_volume(&s.volume) {
                Err(thinpool_engine::Error::Busy(_)) if tries < 40 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(thinpool_engine::Error::NotFound(_)) => break,
                r => break r?,
            }
        }
        st.snapshots.remove(key);
        st.unfilled.remove(key);
        tracing::info!(key, volume = s.volume, "snapshot removed");
        Ok(())
    }

    /// Grow the active snapshot or view `key` to `size` bytes with its ext4: online
    /// (`resize2fs` on its loop device) where it is mounted, offline (`e2fsck -f`, `resize2fs`)
    /// where not. The seeds' `dmsetup table/load/resume` + `resize2fs` as one step. Shrinking is
    /// refused, as is a committed snapshot (its children hold its filesystem). When the kernel
    /// refuses to grow the mounted ext4 (no CAP_SYS_RESOURCE), the volume keeps its new size,
    /// the error says so, and the filesystem is grown offline before its next mount (or by a
    /// resize to the same size while unmounted).
    pub fn resize(&self, key: &str, size: u64) -> Result<Snapshot> {
        let files = self.files()?.to_path_buf();
        let mut st = self.lock();
        let mut s = get(&st, key)?.clone();
        if s.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is committed: only an active snapshot or a view can be resized"
            )));
        }
        if size < s.size {
            return Err(Error::InvalidArgument(format!(
                "snapshot {key}: {size} bytes is smaller than its {} bytes: filesystems in the layer store only grow",
                s.size
            )));
        }
        let file = files.join(&s.volume);
        let device = loop_of(&file);
        let mounted = match &device {
            Some(d) => mount::mounts()?
                .into_iter()
                .find(|m| Path::new(&m.source) == d.as_path())
                .map(|m| m.dir),
            None => None,
        };
        if size == s.size {
            // Same size: an unmounted filesystem smaller than its volume (a growth the kernel
            // refused while mounted, even before a restart) is grown to fill it.
            let path = device.as_ref().unwrap_or(&file);
            if mounted.is_none() && filesystem::ext_size(path)? < size {
                filesystem::resize_offline(FsType::Ext4, path, size)?;
            }
            st.unfilled.remove(key);
            return Ok(s);
        }
        self.pool.resize_volume(&s.volume, size)?;
        // A mounted filesystem the kernel refuses to grow: the volume keeps its new size (the
        // filesystem fills it before its next mount, see `mounts`); the caller hears why.
        let mut refused = None;
        if let (Some(device), Some(dir)) = (&device, &mounted) {
            loopdev::refresh(device)?;
            if let Err(e) = filesystem::grow(FsType::Ext4, device, dir) {
                let why = match e.to_string().contains("Permission denied") {
                    true => format!(
                        "{e}: online ext4 growth needs CAP_SYS_RESOURCE, which this daemon does not have (a container without it?)"
                    ),
                    false => e.to_string(),
                };
                refused = Some(format!(
                    "snapshot {key}: its volume is now {size} bytes, but growing the ext4 mounted on {} failed ({why}); it grows to fill the volume when next mounted (unmount, then mount)",
                    dir.display(),
                ));
                st.unfilled.insert(key.to_string());
            }
        } else {
            filesystem::resize_offline(FsType::Ext4, &file, size)?;
            if let Some(device) = &device {
                loopdev::refresh(device)?;
            }
        }
        self.pool.commit()?;
        s.size = self.pool.volume_info(&s.volume)?.size;
        s.updated = SystemTime::now();
        st.snapshots.insert(key.to_string(), s.clone());
        if let Some(why) = refused {
            tracing::warn!(key, size, volume = s.volume, "{why}");
            return Err(Error::FailedPrecondition(why));
        }
        tracing::info!(key, size, volume = s.volume, "snapshot resized");
        Ok(s)
    }

    /// Change the labels of `key`: `fieldpaths` empty or `labels` replaces them all,
    /// `labels.K` sets (or, absent from `labels`, deletes) one. Other fields cannot change.
    pub fn update(&self, key: &str, labels: Labels, fieldpaths: &[String]) -> Result<Snapshot> {
        let mut st = self.lock();
        let mut s = get(&st, key)?.clone();
        let mut new = s.labels.clone();
        if fieldpaths.is_empty() {
            new = labels;
        } else {
            for path in fieldpaths {
                if path == "labels" {
                    new = labels.clone();
                } else if let Some(k) = path.strip_prefix("labels.") {
                    match labels.get(k) {
                        Some(v) => new.insert(k.to_string(), v.clone()),
                        None => new.remove(k),
                    };
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "snapshot {key}: cannot update field {path:?} (only labels and labels.KEY)"
                    )));
                }
            }
        }
        s.labels = kept(new);
        s.updated = SystemTime::now();
        self.pool.set_labels(&s.volume, record_labels(&s))?;
        st.snapshots.insert(key.to_string(), s.clone());
        Ok(s)
    }

    /// The space `key` uses: its exclusive blocks (what removing it would free) and all it maps.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let volume = self.stat(key)?.volume;
        let bs = self.pool.status()?.block_size;
        let exclusive = self.pool.exclusive_blocks()?;
        let info = self.pool.volume_info(&volume)?;
        Ok(Usage {
            exclusive_bytes: exclusive.get(&volume).copied().unwrap_or(0) * bs,
            mapped_bytes: info.mapped_blocks * bs,
        })
    }

    /// Usage of every snapshot, by key (one walk of the pool).
    pub fn usage_all(&self) -> Result<BTreeMap<String, Usage>> {
        let bs = self.pool.status()?.block_size;
        let exclusive = self.pool.exclusive_blocks()?;
        let mapped: BTreeMap<String, u64> = self
            .pool
            .volumes()?
            .into_iter()
            .map(|v| (v.name, v.mapped_blocks))
            .collect();
        Ok(self
            .list()
            .into_iter()
            .map(|s| {
                let u = Usage {
                    exclusive_bytes: exclusive.get(&s.volume).copied().unwrap_or(0) * bs,
                    mapped_bytes: mapped.get(&s.volume).copied().unwrap_or(0) * bs,
                };
                (s.key, u)
            })
            .collect())
    }

    /// containerd's garbage collection is done: detach the loop devices of committed
    /// snapshots and of volumes the store no longer has, and commit the pool (freed blocks are
    /// punched out of the data file).
    pub fn cleanup(&self) -> Result<()> {
        let st = self.lock();
        if let Some(files) = &self.opts.files {
            let wanted: Vec<PathBuf> = st
                .snapshots
                .values()
                .filter(|s| s.kind != Kind::Committed)
                .map(|s| files.join(&s.volume))
                .collect();
            detach_unmounted_loops(files, &wanted);
        }
        drop(st);
        self.pool.commit()?;
        Ok(())
    }

    /// The daemon stops: detach every loop device over a store volume that nothing mounts
    /// (mounts handed out are containerd's to undo; the next start detaches what is left).
    pub fn release_loops(&self) {
        let _st = self.lock();
        if let Some(files) = &self.opts.files {
            detach_unmounted_loops(files, &[]);
        }
    }

    /// The base device's volume, made (ext4 of the base size) if there is none yet.
    fn base(&self, files: &Path) -> Result<String> {
        if let Ok(v) = self.pool.volume_info(BASE_VOLUME) {
            if v.labels.get(ROLE).map(String::as_str) == Some("base") {
                return Ok(v.name);
            }
            return Err(Error::FailedPrecondition(format!(
                "volume {BASE_VOLUME} exists but is not the layer store's base device: rename or remove it"
            )));
        }
        let mut labels = Labels::new();
        labels.insert(ROLE.into(), "base".into());
        let mut marked = labels.clone();
        marked.insert(STATE.into(), "preparing".into());
        self.pool
            .create_labeled(BASE_VOLUME, self.opts.base_size, None, marked)?;
        let made = filesystem::mkfs_with(
            &files.join(BASE_VOLUME),
            FsType::Ext4,
            &[
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                "-L",
                "thinpool-base",
            ],
        )
        .map_err(Error::from)
        .and_then(|()| Ok(self.pool.set_labels(BASE_VOLUME, labels)?))
        .and_then(|_| Ok(self.pool.commit()?));
        if let Err(e) = made {
            if let Err(e2) = self.pool.remove_volume(BASE_VOLUME) {
                tracing::error!("removing a base device that failed to format: {e2}");
            }
            return Err(e);
        }
        tracing::info!(size = self.opts.base_size, "base device made");
        Ok(BASE_VOLUME.to_string())
    }

    fn files(&self) -> Result<&Path> {
        self.opts.files.as_deref().ok_or_else(|| {
            Error::Unavailable(
                "the layer store needs the FUSE export (ROOT/files) for its loop devices: start `thinpool up` without --no-fuse, as root"
                    .into(),
            )
        })
    }

    /// Detach the loop device over `s`'s file, refused while it is mounted.
    fn release_loop(&self, s: &Snapshot) -> Result<()> {
        let Some(files) = &self.opts.files else {
            return Ok(());
        };
        let Some(device) = loop_of(&files.join(&s.volume)) else {
            return Ok(());
        };
        if let Some(m) = mount::mounts()?
            .into_iter()
            .find(|m| Path::new(&m.source) == device)
        {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {} is still mounted on {} ({}): unmount it first",
                s.key,
                m.dir.display(),
                device.display()
            )));
        }
        loopdev::detach(&device)?;
        Ok(())
    }
}

/// When `v` belongs to the layer store, what it is and how to remove it (for a refusal of
/// `thinpool vol rm`); `None` for an ordinary volume.
pub fn owner_of(v: &VolumeInfo) -> Option<String> {
    if v.labels.get(ROLE).map(String::as_str) == Some("base") {
        return Some(format!(
            "volume {} is the layer store's base device: every layer without a parent is a snapshot of it",
            v.name
        ));
    }
    let s = record_of(v)?;
    Some(format!(
        "volume {} holds the layer store's {} snapshot {}: remove it with `thinpool snapshot rm {}` (or through containerd)",
        v.name, s.kind, s.key, s.key
    ))
}

fn get<'a>(st: &'a State, key: &str) -> Result<&'a Snapshot> {
    st.snapshots
        .get(key)
        .ok_or_else(|| Error::NotFound(format!("snapshot {key} not found")))
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidArgument(
            "a snapshot key must not be empty".into(),
        ));
    }
    if key.len() > 4096 || key.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "snapshot key {:?}…: at most 4096 bytes and no NUL",
            key.chars().take(40).collect::<String>()
        )));
    }
    Ok(())
}

/// Detach the loop devices over store volumes in `files`, but those over `keep` and those
/// mounted.
fn detach_unmounted_loops(files: &Path, keep: &[PathBuf]) {
    for l in loopdev::backed_by_files_in(files) {
        let layer = l
            .backing_file
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("layer-"));
        if layer && !keep.contains(&l.backing_file) && !is_mounted(&l.device) {
            tracing::info!(device = %l.device.display(), file = %l.backing_file.display(), "detaching a layer's loop device");
            if let Err(e) = loopdev::detach(&l.device) {
                tracing::warn!("detaching {}: {e}", l.device.display());
            }
        }
    }
}

/// What containerd mounts for a snapshot on `device`: ext4, read-only for a view.
fn ext4_mount(device: PathBuf, read_only: bool) -> Vec<Mount> {
    vec![Mount {
        fstype: "ext4".into(),
        source: device,
        options: if read_only {
            vec!["ro".into()]
        } else {
            Vec::new()
        },
    }]
}

/// The loop device over `file`, if any.
fn loop_of(file: &Path) -> Option<PathBuf> {
    loopdev::list()
        .into_iter()
        .find(|l| l.backing_file == file)
        .map(|l| l.device)
}

fn is_mounted(device: &Path) -> bool {
    mount::mounts().is_ok_and(|t| t.iter().any(|m| Path::new(&m.source) == device))
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The store record a volume's labels hold, if they hold one.
fn record_of(v: &VolumeInfo) -> Option<Snapshot> {
    let key = v.labels.get(KEY)?.clone();
    let kind = Kind::parse(v.labels.get(KIND)?)?;
    let created = UNIX_EPOCH + Duration::from_secs(v.created);
    let updated = v
        .labels
        .get(UPDATED)
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(created, |s| UNIX_EPOCH + Duration::from_secs(s));
    let labels = v
        .labels
        .iter()
        .filter_map(|(k, val)| Some((k.strip_prefix(LABEL)?.to_string(), val.clone())))
        .collect();
    Some(Snapshot {
        key,
        parent: v.labels.get(PARENT).cloned(),
        kind,
        labels,
        created,
        updated,
        volume: v.name.clone(),
        size: v.size,
    })
}

/// containerd stores no label whose value is empty (`labels.K` updated to "" deletes K).
fn kept(labels: Labels) -> Labels {
    labels.into_iter().filter(|(_, v)| !v.is_empty()).collect()
}

/// The catalog labels that record `s`.
fn record_labels(s: &Snapshot) -> Labels {
    let mut l = Labels::new();
    l.insert(KEY.into(), s.key.clone());
    l.insert(KIND.into(), s.kind.as_str().into());
    if let Some(p) = &s.parent {
        l.insert(PARENT.into(), p.clone());
    }
    l.insert(UPDATED.into(), secs(s.updated).to_string());
    for (k, v) in &s.labels {
        l.insert(format!("{LABEL}{k}"), v.clone());
    }
    l
}

/// A size label: bytes, or a whole number with K/M/G/T (1024-based, optional `iB`/`B`).
fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let bad = || {
        Error::InvalidArgument(format!(
            "label {SIZE_LABEL}={s:?}: not a size (bytes, or a whole number with K/M/G/T, e.g. 20G)"
        ))
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift).filter(|&b| b > 0).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_or_say_why() {
        assert_eq!(parse_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "G", "1.5G", "10Q", "0", "99999999999T"] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains(SIZE_LABEL), "{bad}: {e}");
        }
    }

    #[test]
    fn records_round_trip_through_labels() {
        let s = Snapshot {
            key: "default/3/sha256:abc".into(),
            parent: Some("sha256:def".into()),
            kind: Kind::Committed,
            labels: [("containerd.io/gc.root".to_string(), "x".to_string())].into(),
            created: UNIX_EPOCH + Duration::from_secs(1000),
            updated: UNIX_EPOCH + Duration::from_secs(2000),
            volume: "layer-7".into(),
            size: 1 << 30,
        };
        let v = VolumeInfo {
            name: "layer-7".into(),
            thin_id: 7,
            size: 1 << 30,
            kind: thinpool_engine::VolumeKind::Snapshot,
            parent: Some("layer-3".into()),
            created: 1000,
            mapped_blocks: 0,
            highest_mapped_block: None,
            labels: record_labels(&s),
        };
        assert_eq!(record_of(&v), Some(s));
    }
}
