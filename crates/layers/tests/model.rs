//! Model-based test of the layer store: random sequences of prepare, view, commit, remove,
//! label updates, stat and usage, mounts, real mounts (the tree read back, an active snapshot
//! written to), loop release, cleanup and reopen (store, FUSE export and pool stopped and opened
//! again from their files) run against [`LayerStore`] and an in-memory model of containerd's
//! snapshot semantics side by side.
//!
//! After every operation:
//! - the answer's error class is the model's;
//! - `list()` is the model (keys, kinds, parents, the caller's labels, sizes), and a second
//!   store opened on the pool's catalog alone lists the same (what is in memory is durable);
//! - every snapshot's volume exists and is a thin snapshot of its parent's volume (or of the
//!   base), and the pool holds no other volume (no orphan, no volume shared by two keys);
//! - every loop device over the export backs an active snapshot or a view, one per volume.
//!
//! At the end everything is removed, children first; the pool is closed, `thin_check` passes on
//! its metadata and only the base volume is left. Every reopen runs `thin_check` too.
//!
//! The model follows containerd's `snapshots/storage` (bolt metastore); in the one place
//! where the store takes containerd's metadata layer's order instead (a prepare's key before
//! its parent), the model takes the store's and says so in [`Model::create`].
//!
//! A second test runs the store with its export's folder reached through a symlink, where the
//! kernel names a loop device's file differently from the store (see its doc).
//!
//! Needs root, `/dev/fuse`, loop devices, e2fsprogs and `thin_check`: without them it skips
//! loudly (fails under `CI=true`).
//!
//! Seed: `THINPOOL_LAYERS_MODEL_SEED` (case `i` runs with seed + `i` and prints it: replay one
//! case with that seed and `THINPOOL_LAYERS_MODEL_CASES=1`); cases:
//! `THINPOOL_LAYERS_MODEL_CASES` (default 4); operations per case: `THINPOOL_LAYERS_MODEL_OPS`
//! (default 60).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use thinpool_engine::{Labels, Pool, PoolConfig, PoolOptions};
use thinpool_fs::{FsType, loopdev, mount};
use thinpool_fuse::{FuseConfig, FuseServer};
use thinpool_layers::{BASE_VOLUME, Error, Kind, LayerStore, Mount, SIZE_LABEL, StoreOptions};

const MIB: u64 = 1 << 20;
const BASE_SIZE: u64 = 32 * MIB;
/// Keys and committed names: few, so that collisions and parent/child chains are common; two
/// of them shaped as containerd's (namespace/id/digest) and as a user's.
const KEYS: [&str; 7] = [
    "a",
    "b",
    "c",
    "d",
    "e",
    "default/4/sha256:9f86d081884c7d65",
    "ctr 1 ü",
];
/// Size labels asked for, with the bytes each means (`None`: malformed).
const SIZES: [(&str, Option<u64>); 5] = [
    ("40M", Some(40 * MIB)),
    ("48MiB", Some(48 * MIB)),
    ("16M", Some(16 * MIB)),
    // Not a whole number of pool blocks, nor of filesystem blocks.
    ("33554945", Some(32 * MIB + 513)),
    ("10Q", None),
];
/// Label keys the caller sets.
const LABEL_KEYS: [&str; 3] = ["l1", "l2", "containerd.io/gc.root"];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// The model.

/// The class of an answer, as containerd's API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Ok,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
}

/// The class of the store's answer; any other error is a failure of the test.
fn class_of<T>(r: &Result<T, Error>, ctx: &str) -> Class {
    match r {
        Ok(_) => Class::Ok,
        Err(Error::NotFound(_)) => Class::NotFound,
        Err(Error::AlreadyExists(_)) => Class::AlreadyExists,
        Err(Error::FailedPrecondition(_)) => Class::FailedPrecondition,
        Err(Error::InvalidArgument(_)) => Class::InvalidArgument,
        Err(e) => panic!("{ctx}: the store failed: {e} ({e:?})"),
    }
}

/// A key or name the store takes: not empty, at most 4096 bytes, no NUL.
fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 4096 && !key.contains('\0')
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Snap {
    kind: Kind,
    parent: Option<String>,
    labels: Labels,
    size: u64,
    /// What its filesystem holds besides `lost+found`: file name → content seed.
    files: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default)]
struct Model {
    snaps: BTreeMap<String, Snap>,
    /// The base device is made by the first prepare or view without a parent, and stays.
    base_made: bool,
}

impl Model {
    fn has_children(&self, key: &str) -> bool {
        self.snaps
            .values()
            .any(|s| s.parent.as_deref() == Some(key))
    }

    fn keys_of(&self, kinds: &[Kind]) -> Vec<String> {
        self.snaps
            .iter()
            .filter(|(_, s)| kinds.contains(&s.kind))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Prepare (active) or view. The store checks the key before the parent (as containerd's
    /// metadata layer does; its `storage.CreateSnapshot` checks the parent first), and a bad
    /// size label before both.
    fn create(&mut self, key: &str, parent: &str, labels: &Labels, kind: Kind) -> Class {
        if !valid_key(key) {
            return Class::InvalidArgument;
        }
        let want = match labels.get(SIZE_LABEL) {
            None => None,
            Some(v) => match SIZES.iter().find(|(s, _)| s == v) {
                Some((_, Some(bytes))) => Some(*bytes),
                _ => return Class::InvalidArgument,
            },
        };
        if self.snaps.contains_key(key) {
            return Class::AlreadyExists;
        }
        let (size, files) = if parent.is_empty() {
            self.base_made = true;
            (BASE_SIZE, BTreeMap::new())
        } else {
            match self.snaps.get(parent) {
                None => return Class::NotFound,
                // containerd: "parent is not committed snapshot", invalid argument.
                Some(p) if p.kind != Kind::Committed => return Class::InvalidArgument,
                Some(p) => (p.size, p.files.clone()),
            }
        };
        let snap = Snap {
            kind,
            parent: (!parent.is_empty()).then(|| parent.to_string()),
            labels: kept(labels),
            size: want.map_or(size, |w| w.max(size)),
            files,
        };
        self.snaps.insert(key.to_string(), snap);
        Class::Ok
    }

    /// Commit `key` as `name`, as containerd's `storage.CommitActive`: the name is checked
    /// first (a taken `name` is AlreadyExists even when `key` is missing or not active), and
    /// the labels are the commit's, empty or not ("do not inherit").
    fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: &Labels,
        mounted: &BTreeMap<String, PathBuf>,
    ) -> Class {
        if !valid_key(name) {
            return Class::InvalidArgument;
        }
        if self.snaps.contains_key(name) {
            return Class::AlreadyExists;
        }
        let Some(s) = self.snaps.get(key) else {
            return Class::NotFound;
        };
        if s.kind != Kind::Active {
            return Class::FailedPrecondition;
        }
        if mounted.contains_key(key) {
            return Class::FailedPrecondition;
        }
        let mut s = self.snaps.remove(key).expect("looked up above");
        s.kind = Kind::Committed;
        s.labels = kept(labels);
        self.snaps.insert(name.to_string(), s);
        Class::Ok
    }

    fn remove(&mut self, key: &str, mounted: &BTreeMap<String, PathBuf>) -> Class {
        if !self.snaps.contains_key(key) {
            return Class::NotFound;
        }
        if self.has_children(key) || mounted.contains_key(key) {
            return Class::FailedPrecondition;
        }
        self.snaps.remove(key);
        Class::Ok
    }

    /// containerd's `UpdateInfo`: no paths or `labels` replace them all, `labels.K` sets K
    /// (deletes it when absent from `labels`), any other path is an invalid argument and
    /// nothing changes. A label whose value is empty is not stored (containerd's
    /// `boltutil.WriteLabels` drops it, so `labels.K` with `K=""` deletes K), here and on
    /// prepare, view and commit.
    fn update(&mut self, key: &str, labels: &Labels, paths: &[String]) -> Class {
        let Some(s) = self.snaps.get_mut(key) else {
            return Class::NotFound;
        };
        let mut new = s.labels.clone();
        if paths.is_empty() {
            new = labels.clone();
        }
        for p in paths {
            if p == "labels" {
                new = labels.clone();
            } else if let Some(k) = p.strip_prefix("labels.") {
                match labels.get(k) {
                    Some(v) => new.insert(k.to_string(), v.clone()),
                    None => new.remove(k),
                };
            } else {
                return Class::InvalidArgument;
            }
        }
        s.labels = kept(&new);
        Class::Ok
    }
}

/// The labels containerd stores: those whose value is not empty.
fn kept(labels: &Labels) -> Labels {
    labels
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The store under test: a pool in a temporary folder, its FUSE export, the store.

struct Rig {
    _dir: tempfile::TempDir,
    root: PathBuf,
    /// The export's folder as the store is given it.
    files: PathBuf,
    /// The same with symlinks resolved, as the kernel names a loop device's file.
    files_real: PathBuf,
    mnt: PathBuf,
    pool: Option<Arc<Pool>>,
    fuse: Option<FuseServer>,
    store: Option<LayerStore>,
    /// Snapshots this test mounted: key → folder.
    mounted: BTreeMap<String, PathBuf>,
}

impl Rig {
    /// A 512 MiB pool (sparse), its export and the store; with `via_symlink`, all of them in
    /// a folder reached through a symlink.
    fn create(via_symlink: bool) -> Rig {
        let dir = tempfile::tempdir().expect("temporary folder");
        let base = if via_symlink {
            let real = dir.path().join("real");
            std::fs::create_dir(&real).expect("folder");
            let link = dir.path().join("link");
            std::os::unix::fs::symlink(&real, &link).expect("symlink");
            link
        } else {
            dir.path().to_path_buf()
        };
        let files_real = std::fs::canonicalize(&base)
            .expect("resolve the folder")
            .join("files");
        let root = base.join("root");
        let cfg = PoolConfig {
            data_size: 512 * MIB,
            metadata_size: 8 * MIB,
            ..Default::default()
        };
        let pool = Pool::create(&root, &cfg, PoolOptions::default()).expect("pool created");
        let mnt = base.join("mnt");
        std::fs::create_dir(&mnt).expect("mount folder");
        let mut rig = Rig {
            files: base.join("files"),
            files_real,
            root,
            mnt,
            _dir: dir,
            pool: Some(Arc::new(pool)),
            fuse: None,
            store: None,
            mounted: BTreeMap::new(),
        };
        rig.start();
        rig
    }

    fn start(&mut self) {
        let pool = self.pool().clone();
        self.fuse =
            Some(FuseServer::start(pool.clone(), &FuseConfig::new(&self.files)).expect("export"));
        let opts = StoreOptions {
            files: Some(self.files.clone()),
            base_size: BASE_SIZE,
        };
        self.store = Some(LayerStore::open(pool, opts).expect("store opened"));
    }

    fn pool(&self) -> &Arc<Pool> {
        self.pool.as_ref().expect("pool open")
    }

    fn store(&self) -> &LayerStore {
        self.store.as_ref().expect("store open")
    }

    fn metadata(&self) -> PathBuf {
        self.root.join("pool/metadata")
    }

    fn unmount_all(&mut self) {
        for (key, dir) in std::mem::take(&mut self.mounted) {
            mount::unmount(&dir).unwrap_or_else(|e| panic!("unmounting {key}: {e}"));
        }
    }

    /// Stop as the daemon does: release the loop devices, drop the store, stop the export,
    /// close the pool (which must not be held by anything any more).
    fn stop(&mut self) {
        self.unmount_all();
        let store = self.store.take().expect("store open");
        store.release_loops();
        drop(store);
        wait_for_no_loops(&self.files_real);
        self.fuse.take().expect("export running").stop();
        let pool = Arc::try_unwrap(self.pool.take().expect("pool open")).unwrap_or_else(|_| {
            panic!("the pool is still held after the store and export stopped")
        });
        pool.close().expect("pool closed");
    }

    /// Stop, check the metadata, open everything again from the files.
    fn reopen(&mut self) {
        self.stop();
        if let Err(e) = thinpool_testkit::thin_check(&self.metadata()) {
            panic!("{e}");
        }
        let pool = Pool::open(&self.root, PoolOptions::default()).expect("pool reopened");
        self.pool = Some(Arc::new(pool));
        self.start();
    }
}

impl Drop for Rig {
    /// After a failure: leave no mount, loop device or export behind.
    fn drop(&mut self) {
        for dir in self.mounted.values() {
            if mount::unmount(dir).is_err() {
                let _ = mount::detach(dir);
            }
        }
        self.store.take();
        for l in loopdev::backed_by_files_in(&self.files_real) {
            let _ = loopdev::detach(&l.device);
        }
        self.fuse.take();
        self.pool.take();
    }
}

/// The kernel lets go of a detached loop device's file once its last opener closes it (udev
/// probes new devices), so wait for that, with a bound.
fn wait_for_no_loops(files: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = loopdev::backed_by_files_in(files);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "loop devices still over the export 10 s after release_loops: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Checks.

/// What of a snapshot the model knows.
type Seen = (Kind, Option<String>, Labels, u64);

fn check(rig: &Rig, model: &Model, ctx: &str) {
    let listed = rig.store().list();
    let got: BTreeMap<String, Seen> = listed
        .iter()
        .map(|s| {
            let seen = (s.kind, s.parent.clone(), s.labels.clone(), s.size);
            (s.key.clone(), seen)
        })
        .collect();
    let want: BTreeMap<String, Seen> = model
        .snaps
        .iter()
        .map(|(k, s)| {
            let seen = (s.kind, s.parent.clone(), s.labels.clone(), s.size);
            (k.clone(), seen)
        })
        .collect();
    assert_eq!(got, want, "{ctx}: list() differs from the model");
    assert_eq!(listed.len(), got.len(), "{ctx}: a key listed twice");

    // The catalog alone says the same.
    let again = LayerStore::open(
        rig.pool().clone(),
        StoreOptions {
            files: None,
            base_size: BASE_SIZE,
        },
    )
    .expect("a second store on the catalog");
    let durable = |s: &thinpool_layers::Snapshot| {
        let seen = (s.kind, s.parent.clone(), s.labels.clone(), s.size);
        (s.key.clone(), s.volume.clone(), seen)
    };
    let from_catalog: Vec<_> = again.list().iter().map(durable).collect();
    let in_memory: Vec<_> = listed.iter().map(durable).collect();
    assert_eq!(
        from_catalog, in_memory,
        "{ctx}: the catalog's records differ from the store's memory"
    );
    drop(again);

    // One volume per snapshot, each a snapshot of its parent's (or the base), nothing else.
    let volume_of: BTreeMap<&str, &str> = listed
        .iter()
        .map(|s| (s.key.as_str(), s.volume.as_str()))
        .collect();
    let distinct: BTreeSet<&str> = volume_of.values().copied().collect();
    assert_eq!(
        distinct.len(),
        volume_of.len(),
        "{ctx}: two snapshots share a volume: {volume_of:?}"
    );
    let volumes: BTreeMap<String, thinpool_engine::VolumeInfo> = rig
        .pool()
        .volumes()
        .expect("pool volumes")
        .into_iter()
        .map(|v| (v.name.clone(), v))
        .collect();
    let mut expected: BTreeSet<&str> = distinct.clone();
    if model.base_made {
        expected.insert(BASE_VOLUME);
    }
    let present: BTreeSet<&str> = volumes.keys().map(String::as_str).collect();
    assert_eq!(
        present, expected,
        "{ctx}: the pool's volumes are not the snapshots' (+ base)"
    );
    for s in &listed {
        let v = &volumes[&s.volume];
        let origin = match &s.parent {
            None => BASE_VOLUME,
            Some(p) => volume_of[p.as_str()],
        };
        assert_eq!(
            v.parent.as_deref(),
            Some(origin),
            "{ctx}: {} ({}) is not a snapshot of its parent's volume",
            s.key,
            s.volume
        );
        assert_eq!(v.size, s.size, "{ctx}: size of {}", s.key);
    }

    // Loop devices only over active snapshots and views, one each.
    let mountable: BTreeSet<PathBuf> = listed
        .iter()
        .filter(|s| s.kind != Kind::Committed)
        .map(|s| rig.files_real.join(&s.volume))
        .collect();
    // A detached loop device that someone still holds open (a probe of the new device, the
    // last close of a mount) goes at its last close: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut seen = BTreeSet::new();
        let wrong = loopdev::backed_by_files_in(&rig.files_real)
            .into_iter()
            .find_map(|l| {
                if !mountable.contains(&l.backing_file) {
                    Some(format!(
                        "{} is left over {} (not an active snapshot or view)",
                        l.device.display(),
                        l.backing_file.display()
                    ))
                } else if !seen.insert(l.backing_file.clone()) {
                    Some(format!(
                        "two loop devices over {}",
                        l.backing_file.display()
                    ))
                } else {
                    None
                }
            });
        match wrong {
            None => break,
            Some(w) if Instant::now() >= deadline => panic!("{ctx}: {w} (for 2 s)"),
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The mounts handed out for `key`: ext4 on a loop device over its volume's file, read-only
/// (device and option) for a view.
fn check_mounts(rig: &Rig, model: &Model, key: &str, got: &[Mount], ctx: &str) {
    let view = model.snaps[key].kind == Kind::View;
    let volume = rig.store().stat(key).expect("stat").volume;
    assert_eq!(got.len(), 1, "{ctx}: mounts of {key}: {got:?}");
    let m = &got[0];
    assert_eq!(m.fstype, "ext4", "{ctx}: mounts of {key}");
    let options: &[&str] = if view { &["ro"] } else { &[] };
    assert_eq!(m.options, options, "{ctx}: mount options of {key}");
    let l = loopdev::list()
        .into_iter()
        .find(|l| l.device == m.source)
        .unwrap_or_else(|| panic!("{ctx}: {} is not a loop device", m.source.display()));
    assert_eq!(l.backing_file, rig.files_real.join(&volume), "{ctx}: {key}");
    let name = m.source.file_name().expect("device name");
    let ro = std::fs::read_to_string(Path::new("/sys/block").join(name).join("ro"))
        .expect("loop device's ro flag");
    assert_eq!(
        ro.trim() == "1",
        view,
        "{ctx}: read-only flag of {key}'s device"
    );
}

/// A file's bytes: from its seed, 20 KiB to about 120 KiB (several pool blocks).
fn content(seed: u64) -> Vec<u8> {
    let len = 20_000 + (seed % 100_000) as usize;
    (0..len)
        .map(|i| (i as u64).wrapping_mul(seed | 1).wrapping_add(seed >> 3) as u8)
        .collect()
}

fn check_tree(dir: &Path, files: &BTreeMap<String, u64>, ctx: &str) {
    let names: BTreeSet<String> = std::fs::read_dir(dir)
        .expect("read the mounted tree")
        .map(|e| e.expect("entry").file_name().into_string().expect("UTF-8"))
        .filter(|n| n != "lost+found")
        .collect();
    let want: BTreeSet<String> = files.keys().cloned().collect();
    assert_eq!(names, want, "{ctx}: the mounted tree's files");
    for (name, seed) in files {
        let bytes = std::fs::read(dir.join(name)).expect("read a file");
        assert!(bytes == content(*seed), "{ctx}: content of {name}");
    }
}

// ---------------------------------------------------------------------------------------------
// Random operations.

fn pick<'a>(rng: &mut StdRng, from: &'a [String]) -> Option<&'a String> {
    (!from.is_empty()).then(|| &from[rng.random_range(0..from.len())])
}

fn any_key(rng: &mut StdRng) -> String {
    KEYS[rng.random_range(0..KEYS.len())].to_string()
}

/// A key: one of `preferred` most of the time, else any (rarely a malformed one).
fn key_from(rng: &mut StdRng, preferred: &[String], p: f64) -> String {
    if rng.random_bool(0.04) {
        return match rng.random_range(0..4) {
            0 => String::new(),
            1 => "x\0y".into(),
            2 => "k".repeat(4097),
            // The longest key allowed.
            _ => "k".repeat(4096),
        };
    }
    if rng.random_bool(p)
        && let Some(k) = pick(rng, preferred)
    {
        return k.clone();
    }
    any_key(rng)
}

fn labels(rng: &mut StdRng, max: usize) -> Labels {
    let mut l = Labels::new();
    for _ in 0..rng.random_range(0..=max) {
        let k = LABEL_KEYS[rng.random_range(0..LABEL_KEYS.len())];
        // An empty value now and then: not stored (see `Model::update`).
        let v = ["v0", "v1", "v2", ""][rng.random_range(0..4)];
        l.insert(k.into(), v.into());
    }
    l
}

fn create_labels(rng: &mut StdRng) -> Labels {
    let mut l = labels(rng, 2);
    if rng.random_bool(0.12) {
        let (s, _) = SIZES[rng.random_range(0..SIZES.len())];
        l.insert(SIZE_LABEL.into(), s.into());
    }
    l
}

/// Counts of operations run and of their answers, for the summary line.
#[derive(Default)]
struct Tally(BTreeMap<String, usize>);

impl Tally {
    fn add(&mut self, op: &str, class: Class) {
        *self.0.entry(format!("{op}:{class:?}")).or_default() += 1;
    }
}

fn op_create(rig: &Rig, model: &mut Model, rng: &mut StdRng, kind: Kind, ctx: &str) -> Class {
    let absent: Vec<String> = KEYS
        .iter()
        .filter(|k| !model.snaps.contains_key(**k))
        .map(|k| k.to_string())
        .collect();
    let key = key_from(rng, &absent, 0.8);
    let committed = model.keys_of(&[Kind::Committed]);
    let uncommitted = model.keys_of(&[Kind::Active, Kind::View]);
    let parent = match rng.random_range(0..100) {
        0..25 => String::new(),
        25..75 => pick(rng, &committed).cloned().unwrap_or_default(),
        75..88 => pick(rng, &uncommitted)
            .cloned()
            .unwrap_or_else(|| any_key(rng)),
        _ => any_key(rng),
    };
    let labels = create_labels(rng);
    eprintln!("{ctx}: {kind:?} {key:?} of {parent:?} {labels:?}");
    let r = match kind {
        Kind::Active => rig.store().prepare(&key, &parent, labels.clone()),
        _ => rig.store().view(&key, &parent, labels.clone()),
    };
    let want = model.create(&key, &parent, &labels, kind);
    let got = class_of(&r, ctx);
    assert_eq!(got, want, "{ctx}: {kind:?} {key:?} of {parent:?}: {r:?}");
    if let Ok(m) = &r {
        check_mounts(rig, model, &key, m, ctx);
    }
    got
}

fn op_commit(rig: &Rig, model: &mut Model, rng: &mut StdRng, ctx: &str) -> Class {
    let active = model.keys_of(&[Kind::Active]);
    let key = key_from(rng, &active, 0.75);
    let free: Vec<String> = KEYS
        .iter()
        .filter(|k| !model.snaps.contains_key(**k))
        .map(|k| k.to_string())
        .collect();
    let name = key_from(rng, &free, 0.6);
    let labels = if rng.random_bool(0.5) {
        Labels::new()
    } else {
        labels(rng, 2)
    };
    eprintln!("{ctx}: commit {key:?} as {name:?} {labels:?}");
    let r = rig.store().commit(&name, &key, labels.clone());
    let want = model.commit(&name, &key, &labels, &rig.mounted);
    let got = class_of(&r, ctx);
    assert_eq!(got, want, "{ctx}: commit {key:?} as {name:?}: {r:?}");
    got
}

fn op_remove(rig: &Rig, model: &mut Model, rng: &mut StdRng, ctx: &str) -> Class {
    let all: Vec<String> = model.snaps.keys().cloned().collect();
    let leaves: Vec<String> = all
        .iter()
        .filter(|k| !model.has_children(k))
        .cloned()
        .collect();
    let key = if rng.random_bool(0.5) {
        key_from(rng, &leaves, 0.9)
    } else {
        key_from(rng, &all, 0.8)
    };
    eprintln!("{ctx}: remove {key:?}");
    let r = rig.store().remove(&key);
    let want = model.remove(&key, &rig.mounted);
    let got = class_of(&r, ctx);
    assert_eq!(got, want, "{ctx}: remove {key:?}: {r:?}");
    got
}

fn op_update(rig: &Rig, model: &mut Model, rng: &mut StdRng, ctx: &str) -> Class {
    let all: Vec<String> = model.snaps.keys().cloned().collect();
    let key = key_from(rng, &all, 0.85);
    let labels = labels(rng, 3);
    let paths: Vec<String> = match rng.random_range(0..6) {
        0 => vec![],
        1 => vec!["labels".into()],
        2 => vec!["labels.l1".into()],
        3 => vec!["labels.l2".into(), "labels.containerd.io/gc.root".into()],
        4 => vec!["labels.l1".into(), "parent".into()],
        _ => vec!["kind".into()],
    };
    eprintln!("{ctx}: update {key:?} {labels:?} {paths:?}");
    let r = rig.store().update(&key, labels.clone(), &paths);
    let want = model.update(&key, &labels, &paths);
    let got = class_of(&r, ctx);
    assert_eq!(got, want, "{ctx}: update {key:?} {paths:?}: {r:?}");
    if let Ok(s) = &r {
        assert_eq!(s.labels, model.snaps[&key].labels, "{ctx}: update's answer");
    }
    got
}

fn op_stat(rig: &Rig, model: &Model, rng: &mut StdRng, ctx: &str) -> Class {
    let all: Vec<String> = model.snaps.keys().cloned().collect();
    let key = key_from(rng, &all, 0.8);
    eprintln!("{ctx}: stat and usage {key:?}");
    let r = rig.store().stat(&key);
    let want = if model.snaps.contains_key(&key) {
        Class::Ok
    } else {
        Class::NotFound
    };
    let got = class_of(&r, ctx);
    assert_eq!(got, want, "{ctx}: stat {key:?}: {r:?}");
    if let Ok(s) = &r {
        let m = &model.snaps[&key];
        assert_eq!(
            (s.kind, &s.parent, &s.labels),
            (m.kind, &m.parent, &m.labels)
        );
    }
    let u = rig.store().usage(&key);
    assert_eq!(class_of(&u, ctx), want, "{ctx}: usage {key:?}: {u:?}");
    if let Ok(u) = u {
        assert!(u.exclusive_bytes <= u.mapped_bytes, "{ctx}: usage {u:?}");
        assert!(
            u.mapped_bytes <= model.snaps[&key].size,
            "{ctx}: usage {u:?}"
        );
    }
    let all_usage = rig.store().usage_all().expect("usage_all");
    assert!(
        all_usage.keys().eq(model.snaps.keys()),
        "{ctx}: usage_all keys"
    );
    got
}

fn op_mounts(rig: &Rig, model: &Model, rng: &mut StdRng, ctx: &str) -> Class {
    let all: Vec<String> = model.snaps.keys().cloned().collect();
    let key = key_from(rng, &all, 0.85);
    eprintln!("{ctx}: mounts {key:?}");
    let r = rig.store().mounts(&key);
    let want = match model.snaps.get(&key) {
        None => Class::NotFound,
        Some(s) if s.kind == Kind::Committed => Class::FailedPrecondition,
        Some(_) => Class::Ok,
    };
    let got = class_of(&r, ctx);
    assert_eq!(got, want, "{ctx}: mounts {key:?}: {r:?}");
    if let Ok(m) = &r {
        check_mounts(rig, model, &key, m, ctx);
    }
    got
}

/// Mount an active snapshot or a view as containerd would, check its files, and write to it
/// when it is active. It stays mounted: commit and remove must refuse it until unmounted.
fn op_mount(rig: &mut Rig, model: &mut Model, rng: &mut StdRng, step: u64, ctx: &str) {
    let free: Vec<String> = model
        .keys_of(&[Kind::Active, Kind::View])
        .into_iter()
        .filter(|k| !rig.mounted.contains_key(k))
        .collect();
    let Some(key) = pick(rng, &free).cloned() else {
        return;
    };
    eprintln!("{ctx}: mount {key:?}");
    let m = rig.store().mounts(&key).expect("mounts");
    check_mounts(rig, model, &key, &m, ctx);
    // Keys may hold slashes or be 4096 bytes long: the folder is named by the step.
    let dir = rig.mnt.join(format!("m{step}"));
    std::fs::create_dir(&dir).expect("mount folder");
    let options = m[0].options.join(",");
    mount::mount(&m[0].source, &dir, FsType::Ext4, Some(&options), false)
        .unwrap_or_else(|e| panic!("{ctx}: mount {key}: {e}"));
    rig.mounted.insert(key.clone(), dir.clone());
    let snap = model.snaps.get_mut(&key).expect("in the model");
    check_tree(&dir, &snap.files, ctx);
    if snap.kind == Kind::Active {
        if rng.random_bool(0.3)
            && let Some(old) = snap.files.keys().next().cloned()
        {
            std::fs::remove_file(dir.join(&old)).expect("remove a file");
            snap.files.remove(&old);
        }
        let seed = rng.random::<u64>();
        let name = format!("f{step}");
        std::fs::write(dir.join(&name), content(seed)).expect("write a file");
        snap.files.insert(name, seed);
    }
}

fn op_unmount(rig: &mut Rig, rng: &mut StdRng, ctx: &str) {
    let keys: Vec<String> = rig.mounted.keys().cloned().collect();
    let Some(key) = pick(rng, &keys).cloned() else {
        return;
    };
    eprintln!("{ctx}: unmount {key:?}");
    let dir = rig.mounted.remove(&key).expect("mounted");
    mount::unmount(&dir).unwrap_or_else(|e| panic!("{ctx}: unmount {key}: {e}"));
}

fn run_case(seed: u64, nr_ops: u64) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rig = Rig::create(false);
    let mut model = Model::default();
    let mut tally = Tally::default();
    for step in 0..nr_ops {
        let ctx = format!("seed {seed} step {step}");
        let class = match rng.random_range(0..100) {
            0..20 => (
                "prepare",
                op_create(&rig, &mut model, &mut rng, Kind::Active, &ctx),
            ),
            20..28 => (
                "view",
                op_create(&rig, &mut model, &mut rng, Kind::View, &ctx),
            ),
            28..43 => ("commit", op_commit(&rig, &mut model, &mut rng, &ctx)),
            43..57 => ("remove", op_remove(&rig, &mut model, &mut rng, &ctx)),
            57..65 => ("update", op_update(&rig, &mut model, &mut rng, &ctx)),
            65..69 => ("stat", op_stat(&rig, &model, &mut rng, &ctx)),
            69..75 => ("mounts", op_mounts(&rig, &model, &mut rng, &ctx)),
            75..83 => {
                op_mount(&mut rig, &mut model, &mut rng, step, &ctx);
                ("mount", Class::Ok)
            }
            83..88 => {
                op_unmount(&mut rig, &mut rng, &ctx);
                ("unmount", Class::Ok)
            }
            88..91 => {
                eprintln!("{ctx}: release_loops");
                rig.store().release_loops();
                ("release_loops", Class::Ok)
            }
            91..94 => {
                eprintln!("{ctx}: cleanup");
                rig.store().cleanup().expect("cleanup");
                ("cleanup", Class::Ok)
            }
            _ => {
                eprintln!("{ctx}: reopen");
                rig.reopen();
                ("reopen", Class::Ok)
            }
        };
        tally.add(class.0, class.1);
        check(&rig, &model, &ctx);
    }
    teardown(&mut rig, &mut model, &format!("seed {seed} teardown"));
    tally
}

/// Remove everything children first; then only the base is left, and `thin_check` passes.
fn teardown(rig: &mut Rig, model: &mut Model, ctx: &str) {
    rig.unmount_all();
    while let Some(leaf) = model.snaps.keys().find(|k| !model.has_children(k)).cloned() {
        rig.store()
            .remove(&leaf)
            .unwrap_or_else(|e| panic!("{ctx}: remove {leaf}: {e}"));
        model.snaps.remove(&leaf);
        check(rig, model, ctx);
    }
    assert!(rig.store().list().is_empty(), "{ctx}: snapshots left");
    rig.stop();
    if let Err(e) = thinpool_testkit::thin_check(&rig.metadata()) {
        panic!("{ctx}: {e}");
    }
    let pool = Pool::open(&rig.root, PoolOptions::default()).expect("pool reopened");
    let names: Vec<String> = pool
        .volumes()
        .expect("volumes")
        .into_iter()
        .map(|v| v.name)
        .collect();
    let want: &[&str] = if model.base_made { &[BASE_VOLUME] } else { &[] };
    assert_eq!(
        names, want,
        "{ctx}: volumes left after removing every snapshot"
    );
    pool.close().expect("pool closed");
}

/// Root, `/dev/fuse` and the programs the store and the checks run; if any is missing, a
/// loud skip (a failure under CI).
fn harness_ready() -> bool {
    if !rustix::process::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        return thinpool_testkit::skip_or_fail("the layer store tests need root and /dev/fuse");
    }
    thinpool_testkit::require_tools(&[
        "thin_check",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "resize2fs",
        "mount",
        "umount",
    ])
}

#[test]
fn random_operations_match_containerds_snapshot_model() {
    if !harness_ready() {
        return;
    }
    let seed = env_u64("THINPOOL_LAYERS_MODEL_SEED", rand::random());
    let cases = env_u64("THINPOOL_LAYERS_MODEL_CASES", 4);
    let ops = env_u64("THINPOOL_LAYERS_MODEL_OPS", 60);
    eprintln!(
        "layer store model: seed {seed} (THINPOOL_LAYERS_MODEL_SEED), {cases} cases x {ops} operations"
    );
    let mut total = Tally::default();
    for case in 0..cases {
        let case_seed = seed.wrapping_add(case);
        eprintln!(
            "case {case}: seed {case_seed} (replay: THINPOOL_LAYERS_MODEL_SEED={case_seed} THINPOOL_LAYERS_MODEL_CASES=1)"
        );
        for (k, n) in run_case(case_seed, ops).0 {
            *total.0.entry(k).or_default() += n;
        }
    }
    eprintln!("layer store model: answers {:?}", total.0);
}

/// The export's folder reached through a symlink (a root under a symlinked `/var/lib`, a
/// `--root` or `THINPOOL_ROOT` naming a link): the kernel records a loop device's file with the
/// symlinks resolved, so the store must find the loop device of a volume by that name too.
///
/// The store compares `files.join(volume)` as given with `/sys/block/loop*/loop/backing_file`,
/// so through a symlink it never finds its own devices: each `mounts` attaches one more, commit
/// leaves the device attached (read-write over a committed layer), remove fails with the volume
/// busy, `release_loops` and `cleanup` detach nothing. This test fails until the store resolves
/// the folder (or compares device and inode numbers) when it looks for a loop device.
#[test]
fn loop_devices_are_found_through_a_symlinked_files_folder() {
    if !harness_ready() {
        return;
    }
    let ctx = "files folder through a symlink";
    let mut rig = Rig::create(true);
    let mut model = Model::default();
    let none = Labels::new();
    let first = rig.store().prepare("a", "", none.clone()).expect("prepare");
    assert_eq!(model.create("a", "", &none, Kind::Active), Class::Ok);
    check_mounts(&rig, &model, "a", &first, ctx);
    let again = rig.store().mounts("a").expect("mounts");
    assert_eq!(again, first, "{ctx}: mounts() attached another loop device");
    check(&rig, &model, ctx);
    rig.store().commit("l", "a", none.clone()).expect("commit");
    assert_eq!(model.commit("l", "a", &none, &rig.mounted), Class::Ok);
    check(&rig, &model, ctx);
    let view = rig.store().view("v", "l", none.clone()).expect("view");
    assert_eq!(model.create("v", "l", &none, Kind::View), Class::Ok);
    check_mounts(&rig, &model, "v", &view, ctx);
    rig.store().release_loops();
    wait_for_no_loops(&rig.files_real);
    rig.store().mounts("v").expect("mounts");
    rig.store().remove("v").expect("remove a view");
    assert_eq!(model.remove("v", &rig.mounted), Class::Ok);
    check(&rig, &model, ctx);
    teardown(&mut rig, &mut model, ctx);
}
