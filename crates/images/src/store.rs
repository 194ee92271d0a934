//! The image store: images and containers on the layer store, without containerd (docker's
//! `load`, `save`, `images`, `rmi`, `create`, `commit`, `export`, `import`).
//!
//! **Where things are.** Every layer is a committed snapshot named `thinpool.layer/<chain id>`
//! (the OCI chain id: the same layer on the same parents is one snapshot, shared by every image
//! that has it); every container an active snapshot `thinpool.container/<name>` of its image's
//! top layer, labelled with its image. What a snapshot cannot hold lives in the folder the store
//! is opened on (`ROOT/images`): `images.json` (each image's id, names and layers, written
//! atomically) and `blobs/sha256/` (each image's config and each layer's uncompressed tar, by
//! digest, so that `save` gives back the very bytes `load` took and image ids survive a round
//! trip).
//!
//! **Order of writes.** A layer's blob is renamed into place after its snapshot is committed,
//! and an image's record is written last: a crash leaves at most unreferenced snapshots and
//! blobs, which the next change under the store's lock (`load`, `import`, `commit`, `rm`,
//! `prune`) removes. Loads, commits and removals take `ROOT/images/lock`, so two commands never
//! change the store at once.
//!
//! **Sizes.** A layer's snapshot is made big enough for everything under it: the contents of
//! all layers so far, rounded up per file, plus ext4's overhead ([`needed_size`]). Docker's
//! devicemapper driver unpacked everything into the 10 GB base size, so an export of a grown
//! container could not be imported ("no space left on device"); here the snapshot grows first.
//!
//! The snapshots themselves are reached through [`Snapshots`]: the daemon's control API, or a
//! layer store in the same process.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::archive::{
    Archive, SaveImage, SaveLayer, decompressed, host_arch, sha256_digest, write_archive,
};
use crate::{apply_layer, diff_layer, export_tree};

/// The layer store's label that sizes a new snapshot (`thinpool-layers`' `SIZE_LABEL`).
pub const SIZE_LABEL: &str = "containerd.io/snapshot/thinpool.size";
/// Prefix of the snapshot names of layers.
pub const LAYER_PREFIX: &str = "thinpool.layer/";
/// Prefix of the snapshot keys of containers.
pub const CONTAINER_PREFIX: &str = "thinpool.container/";
/// Prefix of the keys of snapshots being filled (left over only by a crash).
const WORK_PREFIX: &str = "thinpool.work/";
/// Label: the image a container was made from (its id).
const IMAGE_LABEL: &str = "thinpool.io/image";
/// Label: the image reference a container was made from, as given.
const IMAGE_REF_LABEL: &str = "thinpool.io/image-ref";
/// Label: a layer's diff id.
const DIFF_ID_LABEL: &str = "thinpool.io/diff-id";

/// Labels of a snapshot.
pub type Labels = BTreeMap<String, String>;

/// An error of the snapshot service behind [`Snapshots`].
pub type SnapshotError = Box<dyn std::error::Error + Send + Sync>;

/// A snapshot as [`Snapshots::list`] gives it.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// Key (active, view) or name (committed).
    pub key: String,
    /// The committed snapshot it was made from.
    pub parent: Option<String>,
    /// `committed`, `active` or `view`.
    pub kind: String,
    /// Its labels.
    pub labels: Labels,
    /// Virtual size in bytes.
    pub size: u64,
    /// Creation time, seconds since the epoch.
    pub created: u64,
}

/// The layer store's operations the image store needs (containerd's snapshotter API, less
/// what it does not use). Mount sources are the snapshots' loop devices.
pub trait Snapshots {
    /// Every snapshot.
    fn list(&mut self) -> Result<Vec<SnapshotInfo>, SnapshotError>;
    /// A new snapshot `key` of the committed `parent` (`""`: the base device), writable or a
    /// view; its device.
    fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: Labels,
        view: bool,
    ) -> Result<PathBuf, SnapshotError>;
    /// The device of an active snapshot or view.
    fn device(&mut self, key: &str) -> Result<PathBuf, SnapshotError>;
    /// Commit the active `key` as `name`.
    fn commit(&mut self, name: &str, key: &str, labels: Labels) -> Result<(), SnapshotError>;
    /// Remove a snapshot.
    fn remove(&mut self, key: &str) -> Result<(), SnapshotError>;
    /// Grow an active snapshot with its filesystem (online when mounted); its new size.
    fn resize(&mut self, key: &str, size: u64) -> Result<u64, SnapshotError>;
    /// The pool's used and total data blocks, where known: a failure under a full pool says
    /// so.
    fn data_blocks(&mut self) -> Option<(u64, u64)> {
        None
    }
}

/// What went wrong in the image store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No such image or container.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken.
    #[error("{0}")]
    Exists(String),
    /// Refused: in use, mounted, still needed.
    #[error("{0}")]
    Refused(String),
    /// A bad argument (name, size).
    #[error("{0}")]
    Invalid(String),
    /// The snapshot service failed.
    #[error("{what}")]
    Snapshot {
        /// What was being done.
        what: String,
        /// The service's error.
        source: SnapshotError,
    },
    /// A layer could not be applied.
    #[error("{what}")]
    Apply {
        /// Which layer.
        what: String,
        /// The applier's error.
        #[source]
        source: crate::Error,
    },
    /// An archive could not be read or written.
    #[error(transparent)]
    Archive(#[from] crate::ArchiveError),
    /// A file of the store, or a mount, failed.
    #[error("{what} {path}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The pool ran out of data space under the work.
    #[error(
        "the pool is out of data space ({used} of {total} blocks used): grow it (`thinpool pool grow --data-size SIZE`) and try again"
    )]
    PoolFull {
        /// Used data blocks.
        used: u64,
        /// Data blocks.
        total: u64,
        /// What failed.
        #[source]
        source: Box<StoreError>,
    },
    /// Mounting or unmounting a snapshot failed.
    #[error("{0}")]
    Mount(String),
}

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError + use<> {
    let path = path.to_path_buf();
    move |source| StoreError::Io { what, path, source }
}

fn snap_err(what: impl Into<String>) -> impl FnOnce(SnapshotError) -> StoreError {
    let what = what.into();
    move |source| StoreError::Snapshot { what, source }
}

/// How long work reports itself (`thinpool` draws a progress bar on a terminal).
pub trait Progress {
    /// A step begins: `what`, with `total` bytes to go when known.
    fn begin(&self, what: &str, total: Option<u64>);
    /// `n` more bytes done.
    fn advance(&self, n: u64);
    /// The step is done.
    fn end(&self);
}

/// Progress nobody watches.
pub struct Quiet;

impl Progress for Quiet {
    fn begin(&self, _: &str, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}

/// An image of the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// `sha256:…` of its config: its id.
    pub id: String,
    /// Its names (`name:tag`); none for a dangling image.
    pub names: Vec<String>,
    /// Its layers' diff ids, bottom first.
    pub diff_ids: Vec<String>,
    /// Each layer's uncompressed tar size in bytes.
    pub layer_sizes: Vec<u64>,
    /// When it came into the store, seconds since the epoch.
    pub created: u64,
}

impl Image {
    /// Its layers' chain ids, bottom first.
    pub fn chain_ids(&self) -> Vec<String> {
        chain_ids(&self.diff_ids)
    }

    /// The sum of its layers' sizes.
    pub fn size(&self) -> u64 {
        self.layer_sizes.iter().sum()
    }
}

/// An image in `image ls`: the image and how much of it other images share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageSummary {
    /// The image.
    #[serde(flatten)]
    pub image: Image,
    /// Bytes of its layers that another image has too.
    pub shared_size: u64,
    /// Containers made from it.
    pub containers: u64,
}

/// A container of the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Container {
    /// Its name.
    pub name: String,
    /// The image id it was made from.
    pub image: String,
    /// The image reference it was made from, as given.
    pub image_ref: String,
    /// Its filesystem's size in bytes.
    pub size: u64,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// The snapshot key.
    pub snapshot: String,
}

/// What a load made so far for one image: undone when it fails.
#[derive(Default)]
struct Made {
    /// Layer snapshots, bottom first.
    layers: Vec<String>,
    /// Blobs renamed into `blobs/sha256`.
    blobs: Vec<PathBuf>,
}

/// What `load` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Loaded {
    /// The images loaded: id and names.
    pub images: Vec<(String, Vec<String>)>,
    /// Layers unpacked.
    pub layers_applied: u64,
    /// Layers already in the store (shared).
    pub layers_shared: u64,
    /// Bytes of layer tar read.
    pub bytes: u64,
}

/// What `prune` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Images removed (ids).
    pub images: Vec<String>,
    /// Layer snapshots removed.
    pub layers: u64,
    /// Blobs removed.
    pub blobs: u64,
    /// Bytes of blobs removed.
    pub blob_bytes: u64,
}

/// `images.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Records {
    images: BTreeMap<String, Image>,
}

/// The image store in `dir` (`ROOT/images`) over the snapshots `S`.
pub struct ImageStore<S: Snapshots> {
    dir: PathBuf,
    snaps: S,
    /// Held while the store changes.
    _lock: Option<File>,
    /// A number for the names of work snapshots and mount folders.
    seq: u64,
}

impl<S: Snapshots> ImageStore<S> {
    /// Open the store in `dir` (made if needed, mode 0700). `exclusive`: this command changes
    /// the store, wait for others that do (and clean up what a crash left).
    pub fn open(dir: &Path, snaps: S, exclusive: bool) -> Result<ImageStore<S>> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join("blobs/sha256"))
            .map_err(io_err("creating", dir))?;
        let lock = if exclusive {
            let path = dir.join("lock");
            let f = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io_err("opening", &path))?;
            f.lock().map_err(io_err("locking", &path))?;
            Some(f)
        } else {
            None
        };
        let mut store = ImageStore {
            dir: dir.to_path_buf(),
            snaps,
            _lock: lock,
            seq: 0,
        };
        if exclusive {
            store.clean_work()?;
        }
        Ok(store)
    }

    fn records_path(&self) -> PathBuf {
        self.dir.join("images.json")
    }

    fn read_records(&self) -> Result<Records> {
        let path = self.records_path();
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Io {
                what: "parsing",
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Records::default()),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    fn write_records(&self, r: &Records) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(r).expect("records serialise");
        write_atomic(&self.records_path(), &bytes)
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir.join("blobs/sha256").join(hex)
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Remove work snapshots and mount folders a crash left (under the lock: no other command
    /// is working).
    fn clean_work(&mut self) -> Result<()> {
        let mnt = self.dir.join("mnt");
        if let Ok(entries) = fs::read_dir(&mnt) {
            for e in entries.flatten() {
                let p = e.path();
                if thinpool_fs_is_mounted(&p) {
                    let _ = unmount(&p);
                }
                let _ = fs::remove_dir(&p);
            }
        }
        let work: Vec<String> = self
            .snaps
            .list()
            .map_err(snap_err("listing snapshots"))?
            .into_iter()
            .filter(|s| s.key.starts_with(WORK_PREFIX))
            .map(|s| s.key)
            .collect();
        for key in work {
            tracing::warn!(key, "removing a work snapshot an interrupted command left");
            self.snaps
                .remove(&key)
                .map_err(snap_err(format!("removing the leftover snapshot {key}")))?;
        }
        for e in fs::read_dir(self.dir.join("blobs/sha256"))
            .map_err(io_err("reading", &self.dir))?
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(".tmp") {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    /// A fresh folder to mount a snapshot on.
    fn mount_dir(&mut self) -> Result<PathBuf> {
        use std::os::unix::fs::DirBuilderExt;
        let n = self.next_seq();
        let dir = self
            .dir
            .join("mnt")
            .join(format!("{}-{n}", std::process::id()));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("creating", &dir))?;
        Ok(dir)
    }

    fn work_key(&mut self, what: &str) -> String {
        let n = self.next_seq();
        format!("{WORK_PREFIX}{what}-{}-{n}", std::process::id())
    }

    // ----- images -----

    /// Every image, with shared sizes and container counts.
    pub fn images(&mut self) -> Result<Vec<ImageSummary>> {
        let records = self.read_records()?;
        let containers = self.containers()?;
        let mut users: BTreeMap<String, u64> = BTreeMap::new();
        for img in records.images.values() {
            for c in img.chain_ids().into_iter().collect::<BTreeSet<_>>() {
                *users.entry(c).or_default() += 1;
            }
        }
        let mut out = Vec::new();
        for img in records.images.values() {
            let shared = img
                .chain_ids()
                .iter()
                .zip(&img.layer_sizes)
                .filter(|(c, _)| users.get(c.as_str()).copied().unwrap_or(0) > 1)
                .map(|(_, s)| s)
                .sum();
            out.push(ImageSummary {
                image: img.clone(),
                shared_size: shared,
                containers: containers.iter().filter(|c| c.image == img.id).count() as u64,
            });
        }
        out.sort_by(|a, b| {
            b.image
                .created
                .cmp(&a.image.created)
                .then(a.image.id.cmp(&b.image.id))
        });
        Ok(out)
    }

    /// The image `reference` names: `name:tag`, `name` (`:latest`), an id or an id prefix of
    /// at least 4 hex digits.
    pub fn image(&self, reference: &str) -> Result<Image> {
        let records = self.read_records()?;
        find_image(&records, reference).cloned()
    }

    /// Load every image of the archive at `path` (`-`: `stdin`).
    pub fn load(&mut self, path: &Path, progress: &dyn Progress) -> Result<Loaded> {
        let archive = if path == Path::new("-") {
            let spool = self.dir.join("blobs/sha256");
            Archive::from_reader(io::stdin().lock(), &spool)?
        } else {
            Archive::open(path)?
        };
        let mut loaded = Loaded::default();
        for i in 0..archive.images().len() {
            let mut made = Made::default();
            let r = self.load_image(&archive, i, &mut made, &mut loaded, progress);
            if let Err(e) = r {
                // Nothing half-loaded: the layers and blobs this image brought go again.
                for name in made.layers.iter().rev() {
                    if let Err(e2) = self.snaps.remove(name) {
                        tracing::error!(name, "removing a layer of a failed load: {e2}");
                    }
                }
                for blob in &made.blobs {
                    if let Err(e2) = fs::remove_file(blob) {
                        tracing::error!(blob = %blob.display(), "removing a blob of a failed load: {e2}");
                    }
                }
                return Err(e);
            }
        }
        Ok(loaded)
    }

    fn load_image(
        &mut self,
        archive: &Archive,
        i: usize,
        made: &mut Made,
        loaded: &mut Loaded,
        progress: &dyn Progress,
    ) -> Result<()> {
        let img = &archive.images()[i];
        let diff_ids = img.diff_ids.clone();
        let chains = chain_ids(&diff_ids);
        let mut sizes = Vec::new();
        let mut content = Content::default();
        for (j, chain) in chains.iter().enumerate() {
            let name = layer_name(chain);
            let blob = self.blob_path(&diff_ids[j]);
            let exists = self.snapshot_exists(&name)?;
            let what = format!(
                "image {} layer {}/{} ({})",
                display_names(&img.names, &img.config_digest),
                j + 1,
                chains.len(),
                short(&diff_ids[j])
            );
            if exists && blob.exists() {
                let size = blob.metadata().map_err(io_err("reading", &blob))?.len();
                content.add_tar_estimate(size);
                sizes.push(size);
                loaded.layers_shared += 1;
                continue;
            }
            let parent = match j {
                0 => String::new(),
                _ => layer_name(&chains[j - 1]),
            };
            // Sized for what is below and this layer's blob (its content when plain); a
            // compressed layer that does not fit is counted exactly and unpacked again.
            let mut estimate = content.clone();
            estimate.add_tar_estimate(img.layers[j].size);
            let mut attempt = 0;
            let (tmp, digests, stats) = loop {
                attempt += 1;
                let mut stream = archive.layer(i, j)?;
                let tmp = self.tmp_blob()?;
                progress.begin(&what, Some(img.layers[j].size));
                let mut tee = Tee::new(&mut stream, &tmp.1, progress);
                let stats = if exists {
                    // The snapshot is there (another image, or `import`), its blob is not:
                    // keep the bytes only.
                    io::copy(&mut tee, &mut io::sink())
                        .map(|_| None)
                        .map_err(io_err("reading", Path::new(&what)))
                } else {
                    self.apply_new(
                        &name,
                        &parent,
                        &diff_ids[j],
                        &mut tee,
                        estimate.needed(),
                        &what,
                    )
                    .map(Some)
                };
                let stats = stats.and_then(|s| tee.flush(&tmp.0).map(|()| s));
                progress.end();
                // A layer applied whose blob then fails its digest goes again.
                let done = stats.and_then(|s| match stream.finish() {
                    Ok(digests) => Ok((digests, s)),
                    Err(e) => {
                        if s.is_some() {
                            self.discard(&name);
                        }
                        Err(e.into())
                    }
                });
                match done {
                    Ok((digests, s)) => break (tmp, digests, s),
                    Err(e) => {
                        let _ = fs::remove_file(&tmp.0);
                        if attempt > 1 || !is_no_space(&e) {
                            return Err(e);
                        }
                        tracing::info!(
                            layer = what,
                            "a layer did not fit its estimate: counting it"
                        );
                        estimate = content.clone();
                        estimate.scan(archive.layer(i, j)?, &what)?;
                    }
                }
            };
            if digests.diff_id != diff_ids[j] {
                if stats.is_some() {
                    self.discard(&name);
                }
                let _ = fs::remove_file(&tmp.0);
                return Err(StoreError::Invalid(format!(
                    "{what}: its content hashes to {}, the config says {}",
                    digests.diff_id, diff_ids[j]
                )));
            }
            loaded.bytes += digests.uncompressed_size;
            sizes.push(digests.uncompressed_size);
            match stats {
                Some(s) => {
                    content.add(s.bytes, s.entries);
                    made.layers.push(name.clone());
                    loaded.layers_applied += 1;
                }
                None => {
                    content.add_tar_estimate(digests.uncompressed_size);
                    loaded.layers_shared += 1;
                }
            }
            fs::rename(&tmp.0, &blob).map_err(io_err("renaming into", &blob))?;
            made.blobs.push(blob);
        }
        let config_blob = self.blob_path(&img.config_digest);
        write_atomic(&config_blob, &img.config)?;
        let image = Image {
            id: img.config_digest.clone(),
            names: img.names.iter().map(|n| normalize_name(n)).collect(),
            diff_ids,
            layer_sizes: sizes,
            created: now(),
        };
        self.add_image(image.clone())?;
        loaded.images.push((image.id, image.names));
        Ok(())
    }

    /// Apply `layer` onto a new snapshot `name` of `parent`, `size` bytes big (or its
    /// parent's size, if bigger); committed when done, removed when not.
    fn apply_new(
        &mut self,
        name: &str,
        parent: &str,
        diff_id: &str,
        layer: &mut dyn Read,
        size: u64,
        what: &str,
    ) -> Result<crate::ApplyStats> {
        let key = self.work_key("layer");
        let mut labels = Labels::new();
        labels.insert(SIZE_LABEL.into(), size.to_string());
        self.snaps
            .prepare(&key, parent, labels, false)
            .map_err(snap_err(format!("{what}: making its snapshot")))?;
        // The device, by a second call: `prepare`'s may name a loop device the kernel has not
        // shown yet.
        let device = self
            .snaps
            .device(&key)
            .map_err(snap_err(format!("{what}: its snapshot's device")));
        let dir = self.mount_dir()?;
        let applied = device
            .and_then(|device| mount(&device, &dir, false))
            .and_then(|()| {
                let r = apply_layer(&dir, layer).map_err(|source| StoreError::Apply {
                    what: what.to_string(),
                    source,
                });
                let u = unmount(&dir);
                let stats = r?;
                u?;
                Ok(stats)
            });
        let _ = fs::remove_dir(&dir);
        let stats = match applied {
            Ok(s) => s,
            Err(e) => {
                // Said before the discard frees the blocks: the pool ran out under the layer.
                let e = match self.snaps.data_blocks() {
                    Some((used, total)) if used >= total => StoreError::PoolFull {
                        used,
                        total,
                        source: Box::new(e),
                    },
                    _ => e,
                };
                self.discard(&key);
                return Err(e);
            }
        };
        let mut labels = Labels::new();
        labels.insert(DIFF_ID_LABEL.into(), diff_id.into());
        if let Err(e) = self.snaps.commit(name, &key, labels) {
            self.discard(&key);
            return Err(snap_err(format!("{what}: committing its snapshot"))(e));
        }
        Ok(stats)
    }

    fn discard(&mut self, key: &str) {
        if let Err(e) = self.snaps.remove(key) {
            tracing::error!(key, "removing a snapshot of failed work: {e}");
        }
    }

    fn snapshot_exists(&mut self, key: &str) -> Result<bool> {
        Ok(self
            .snaps
            .list()
            .map_err(snap_err("listing snapshots"))?
            .iter()
            .any(|s| s.key == key))
    }

    /// A new temporary blob file: its path and the open file.
    fn tmp_blob(&mut self) -> Result<(PathBuf, File)> {
        let n = self.next_seq();
        let path = self
            .dir
            .join("blobs/sha256")
            .join(format!(".tmp-{}-{n}", std::process::id()));
        let f = File::create(&path).map_err(io_err("creating", &path))?;
        Ok((path, f))
    }

    /// Record `image`; names it takes are taken from other images (which stay, dangling, if
    /// they had no other name).
    fn add_image(&mut self, image: Image) -> Result<()> {
        let mut r = self.read_records()?;
        for other in r.images.values_mut() {
            other.names.retain(|n| !image.names.contains(n));
        }
        match r.images.get_mut(&image.id) {
            Some(old) => {
                for n in image.names {
                    if !old.names.contains(&n) {
                        old.names.push(n);
                    }
                }
            }
            None => {
                r.images.insert(image.id.clone(), image);
            }
        }
        self.write_records(&r)
    }

    /// Write the images `references` name to `out`: an archive `docker load`, `ctr images
    /// import`, `skopeo` and `thinpool image load` read (docker's `manifest.json` and an OCI
    /// layout).
    pub fn save(
        &mut self,
        references: &[String],
        out: impl Write,
        progress: &dyn Progress,
    ) -> Result<()> {
        let records = self.read_records()?;
        let mut images = Vec::new();
        for reference in references {
            let img = find_image(&records, reference)?;
            let names = if img.id.ends_with(reference.trim_start_matches("sha256:"))
                || img.id == *reference
            {
                img.names.clone()
            } else {
                vec![normalize_name(reference)]
            };
            let config = self.blob_path(&img.id);
            let config = fs::read(&config).map_err(io_err("reading the config blob", &config))?;
            let mut layers = Vec::new();
            for d in &img.diff_ids {
                let path = self.blob_path(d);
                let size = path
                    .metadata()
                    .map_err(io_err("reading the layer blob", &path))?
                    .len();
                layers.push(SaveLayer {
                    diff_id: d.clone(),
                    size,
                    path,
                });
            }
            images.push(SaveImage {
                names,
                config,
                layers,
            });
        }
        let total = images
            .iter()
            .flat_map(|i| i.layers.iter().map(|l| l.size))
            .sum();
        progress.begin("saving", Some(total));
        let mut w = CountingWriter {
            inner: out,
            progress,
        };
        write_archive(&mut w, &images)?;
        progress.end();
        Ok(())
    }

    /// Remove the name `reference` (or, given an id, the image): an image left with no name
    /// goes, with its layers that no other image or container needs. Refused while a
    /// container uses it (unless `force`: then only the name goes).
    pub fn remove_image(&mut self, reference: &str, force: bool) -> Result<Vec<String>> {
        let mut r = self.read_records()?;
        let img = find_image(&r, reference)?.clone();
        let by_id = !img.names.iter().any(|n| *n == normalize_name(reference));
        let users: Vec<String> = self
            .containers()?
            .into_iter()
            .filter(|c| c.image == img.id)
            .map(|c| c.name)
            .collect();
        let entry = r.images.get_mut(&img.id).expect("found above");
        if by_id {
            entry.names.clear();
        } else {
            let n = normalize_name(reference);
            entry.names.retain(|x| *x != n);
        }
        let mut removed = Vec::new();
        if entry.names.is_empty() {
            if !users.is_empty() && !force {
                return Err(StoreError::Refused(format!(
                    "image {} is used by container(s) {}: remove them first (`thinpool container rm`)",
                    short(&img.id),
                    users.join(", ")
                )));
            }
            if users.is_empty() {
                r.images.remove(&img.id);
                removed.push(img.id.clone());
            }
        }
        self.write_records(&r)?;
        if !removed.is_empty() {
            self.collect()?;
        }
        Ok(removed)
    }

    /// Remove dangling images no container uses, then every layer and blob nothing needs.
    pub fn prune(&mut self) -> Result<Pruned> {
        let mut r = self.read_records()?;
        let used: BTreeSet<String> = self.containers()?.into_iter().map(|c| c.image).collect();
        let gone: Vec<String> = r
            .images
            .values()
            .filter(|i| i.names.is_empty() && !used.contains(&i.id))
            .map(|i| i.id.clone())
            .collect();
        for id in &gone {
            r.images.remove(id);
        }
        self.write_records(&r)?;
        let mut p = self.collect()?;
        p.images = gone;
        Ok(p)
    }

    /// Remove the layer snapshots no image needs and no snapshot stands on (children first),
    /// and the blobs no image names.
    fn collect(&mut self) -> Result<Pruned> {
        let r = self.read_records()?;
        let mut wanted_layers = BTreeSet::new();
        let mut wanted_blobs = BTreeSet::new();
        for img in r.images.values() {
            wanted_blobs.insert(hex_of(&img.id).to_string());
            for d in &img.diff_ids {
                wanted_blobs.insert(hex_of(d).to_string());
            }
            for c in img.chain_ids() {
                wanted_layers.insert(layer_name(&c));
            }
        }
        let mut pruned = Pruned::default();
        loop {
            let snaps = self.snaps.list().map_err(snap_err("listing snapshots"))?;
            let parents: BTreeSet<&str> =
                snaps.iter().filter_map(|s| s.parent.as_deref()).collect();
            let doomed: Vec<String> = snaps
                .iter()
                .filter(|s| {
                    s.key.starts_with(LAYER_PREFIX)
                        && !wanted_layers.contains(&s.key)
                        && !parents.contains(s.key.as_str())
                })
                .map(|s| s.key.clone())
                .collect();
            if doomed.is_empty() {
                break;
            }
            for key in doomed {
                self.snaps
                    .remove(&key)
                    .map_err(snap_err(format!("removing layer {key}")))?;
                pruned.layers += 1;
            }
        }
        let blobs = self.dir.join("blobs/sha256");
        for e in fs::read_dir(&blobs)
            .map_err(io_err("reading", &blobs))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !wanted_blobs.contains(&name) && !name.starts_with(".tmp") {
                pruned.blob_bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(e.path()).map_err(io_err("removing", &e.path()))?;
                pruned.blobs += 1;
            }
        }
        Ok(pruned)
    }

    // ----- containers -----

    /// Every container.
    pub fn containers(&mut self) -> Result<Vec<Container>> {
        let snaps = self.snaps.list().map_err(snap_err("listing snapshots"))?;
        Ok(snaps.into_iter().filter_map(container_of).collect())
    }

    /// The container `name`.
    pub fn container(&mut self, name: &str) -> Result<Container> {
        self.containers()?
            .into_iter()
            .find(|c| c.name == name)
            .ok_or_else(|| {
                StoreError::NotFound(format!(
                    "container {name} not found (`thinpool container ls` lists them)"
                ))
            })
    }

    /// A new container `name` of `image`, `size` bytes if given (grown with its filesystem
    /// beyond the image's when bigger); its device.
    pub fn create_container(
        &mut self,
        reference: &str,
        name: &str,
        size: Option<u64>,
    ) -> Result<Container> {
        check_name(name)?;
        let img = self.image(reference)?;
        let key = format!("{CONTAINER_PREFIX}{name}");
        if self.snapshot_exists(&key)? {
            return Err(StoreError::Exists(format!(
                "container {name} already exists"
            )));
        }
        let top = img
            .chain_ids()
            .last()
            .map(|c| layer_name(c))
            .unwrap_or_default();
        let mut labels = Labels::new();
        labels.insert(IMAGE_LABEL.into(), img.id.clone());
        labels.insert(IMAGE_REF_LABEL.into(), reference.into());
        if let Some(s) = size {
            labels.insert(SIZE_LABEL.into(), s.to_string());
        }
        self.snaps
            .prepare(&key, &top, labels, false)
            .map_err(snap_err(format!("creating container {name}")))?;
        self.container(name)
    }

    /// Remove the container `name` (refused while mounted, unless `force`: then unmounted).
    pub fn remove_container(&mut self, name: &str, force: bool) -> Result<()> {
        let c = self.container(name)?;
        let device = self
            .snaps
            .device(&c.snapshot)
            .map_err(snap_err(format!("container {name}")))?;
        for dir in mounts_of(&device)? {
            if !force {
                return Err(StoreError::Refused(format!(
                    "container {name} is mounted on {}: `thinpool container umount {name}` first (or rm --force)",
                    dir.display()
                )));
            }
            unmount(&dir)?;
        }
        self.snaps
            .remove(&c.snapshot)
            .map_err(snap_err(format!("removing container {name}")))
    }

    /// Mount the container `name` on `dir` (read-write); where it is mounted already, that.
    pub fn mount_container(&mut self, name: &str, dir: &Path) -> Result<PathBuf> {
        let c = self.container(name)?;
        let device = self
            .snaps
            .device(&c.snapshot)
            .map_err(snap_err(format!("container {name}")))?;
        if let Some(d) = mounts_of(&device)?.into_iter().next() {
            return Err(StoreError::Refused(format!(
                "container {name} is already mounted on {}",
                d.display()
            )));
        }
        mount(&device, dir, false)?;
        Ok(dir.to_path_buf())
    }

    /// Unmount the container `name` wherever it is mounted; the folders it was on.
    pub fn umount_container(&mut self, name: &str) -> Result<Vec<PathBuf>> {
        let c = self.container(name)?;
        let device = self
            .snaps
            .device(&c.snapshot)
            .map_err(snap_err(format!("container {name}")))?;
        let dirs = mounts_of(&device)?;
        if dirs.is_empty() {
            return Err(StoreError::Refused(format!(
                "container {name} is not mounted"
            )));
        }
        for d in &dirs {
            unmount(d)?;
        }
        Ok(dirs)
    }

    /// The folders the container `name` is mounted on.
    pub fn container_mounts(&mut self, name: &str) -> Result<Vec<PathBuf>> {
        let c = self.container(name)?;
        let device = self
            .snaps
            .device(&c.snapshot)
            .map_err(snap_err(format!("container {name}")))?;
        mounts_of(&device)
    }

    /// Grow the container `name` to `size` bytes with its filesystem (online when mounted).
    pub fn resize_container(&mut self, name: &str, size: u64) -> Result<u64> {
        let c = self.container(name)?;
        self.snaps
            .resize(&c.snapshot, size)
            .map_err(snap_err(format!("container {name}")))
    }

    /// Run `f` on the container's tree: where it is mounted, or mounted here for the call.
    fn with_container_tree<T>(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut Self, &Path) -> Result<T>,
    ) -> Result<T> {
        let c = self.container(name)?;
        let device = self
            .snaps
            .device(&c.snapshot)
            .map_err(snap_err(format!("container {name}")))?;
        if let Some(dir) = mounts_of(&device)?.into_iter().next() {
            return f(self, &dir);
        }
        let dir = self.mount_dir()?;
        mount(&device, &dir, false)?;
        let r = f(self, &dir);
        let u = unmount(&dir);
        let _ = fs::remove_dir(&dir);
        let v = r?;
        u?;
        Ok(v)
    }

    /// Write the container's filesystem, flattened, as a tar to `out` (sparse files stay
    /// sparse).
    pub fn export_container(
        &mut self,
        name: &str,
        out: impl Write,
        progress: &dyn Progress,
    ) -> Result<crate::ExportStats> {
        self.with_container_tree(name, |_, dir| {
            progress.begin(&format!("exporting container {name}"), None);
            let w = CountingWriter {
                inner: out,
                progress,
            };
            let stats = export_tree(dir, w).map_err(|source| StoreError::Apply {
                what: format!("exporting container {name}"),
                source,
            })?;
            progress.end();
            Ok(stats)
        })
    }

    /// Commit the container `name` as a new image `reference`: its difference from its image
    /// becomes one more layer.
    pub fn commit_container(
        &mut self,
        name: &str,
        reference: &str,
        progress: &dyn Progress,
    ) -> Result<Image> {
        let c = self.container(name)?;
        let records = self.read_records()?;
        let base = records.images.get(&c.image).cloned().ok_or_else(|| {
            StoreError::NotFound(format!(
                "container {name}: its image {} is no longer in the store",
                short(&c.image)
            ))
        })?;
        drop(records);
        let parent = base
            .chain_ids()
            .last()
            .map(|s| layer_name(s))
            .unwrap_or_default();
        // The image's tree, read-only, beside the container's.
        let view = self.work_key("view");
        let lower_dev = self
            .snaps
            .prepare(&view, &parent, Labels::new(), true)
            .map_err(snap_err(format!(
                "committing container {name}: a view of its image"
            )))?;
        let lower = self.mount_dir()?;
        let tmp = self.tmp_blob()?;
        let diffed = mount(&lower_dev, &lower, true).and_then(|()| {
            progress.begin(&format!("committing container {name}: its changes"), None);
            let r = self.with_container_tree(name, |_, upper| {
                let mut w = HashingWriter::new(&tmp.1, progress);
                let stats =
                    diff_layer(&lower, upper, &mut w).map_err(|source| StoreError::Apply {
                        what: format!("committing container {name}"),
                        source,
                    })?;
                Ok((stats, w.finish(&tmp.0)?))
            });
            progress.end();
            let u = unmount(&lower);
            let v = r?;
            u?;
            Ok(v)
        });
        let _ = fs::remove_dir(&lower);
        self.discard(&view);
        let (_stats, (diff_id, size)) = match diffed {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_file(&tmp.0);
                return Err(e);
            }
        };
        let mut diff_ids = base.diff_ids.clone();
        diff_ids.push(diff_id.clone());
        let chains = chain_ids(&diff_ids);
        let name_of_layer = layer_name(chains.last().expect("one layer at least"));
        if !self.snapshot_exists(&name_of_layer)? {
            // As big as the container: what it holds fits.
            let mut content = Content::default();
            for s in &base.layer_sizes {
                content.add_tar_estimate(*s);
            }
            content.add_tar_estimate(size);
            let size_needed = content.needed().max(c.size);
            let mut layer = BufReader::new(File::open(&tmp.0).map_err(io_err("opening", &tmp.0))?);
            let what = format!("container {name}'s changes");
            progress.begin(
                &format!("committing container {name}: the new layer"),
                Some(size),
            );
            let mut counted = CountingReader {
                inner: &mut layer,
                progress,
            };
            let r = self.apply_new(
                &name_of_layer,
                &parent,
                &diff_id,
                &mut counted,
                size_needed,
                &what,
            );
            progress.end();
            if let Err(e) = r {
                let _ = fs::remove_file(&tmp.0);
                return Err(e);
            }
        }
        let blob = self.blob_path(&diff_id);
        fs::rename(&tmp.0, &blob).map_err(io_err("renaming into", &blob))?;
        let config = self.derived_config(
            &base.id,
            &diff_id,
            &format!("thinpool container commit {name}"),
        )?;
        let id = sha256_digest(&config);
        write_atomic(&self.blob_path(&id), &config)?;
        let mut sizes = base.layer_sizes.clone();
        sizes.push(size);
        let image = Image {
            id,
            names: vec![normalize_name(reference)],
            diff_ids,
            layer_sizes: sizes,
            created: now(),
        };
        self.add_image(image.clone())?;
        Ok(image)
    }

    /// The config of image `base` with one more layer `diff_id` and a history entry.
    fn derived_config(&self, base: &str, diff_id: &str, created_by: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(base);
        let bytes = fs::read(&path).map_err(io_err("reading the config blob", &path))?;
        let mut v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Io {
                what: "parsing the config",
                path: path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?;
        let created = rfc3339(now());
        v["created"] = created.clone().into();
        if !v["rootfs"]["diff_ids"].is_array() {
            v["rootfs"] = serde_json::json!({"type": "layers", "diff_ids": []});
        }
        v["rootfs"]["diff_ids"]
            .as_array_mut()
            .expect("made an array")
            .push(diff_id.into());
        if !v["history"].is_array() {
            v["history"] = serde_json::json!([]);
        }
        v["history"]
            .as_array_mut()
            .expect("made an array")
            .push(serde_json::json!({"created": created, "created_by": created_by}));
        Ok(serde_json::to_vec(&v).expect("a config serialises"))
    }

    /// Import the tar at `path` (`-`: stdin; plain, gzip or zstd) as a one-layer image
    /// `reference`, its snapshot sized to fit the content before it is unpacked.
    pub fn import(
        &mut self,
        path: &Path,
        reference: &str,
        progress: &dyn Progress,
    ) -> Result<Image> {
        let tmp = self.tmp_blob()?;
        // The layer's bytes, uncompressed, into a blob (hashed on the way).
        let input: Box<dyn Read> = if path == Path::new("-") {
            Box::new(io::stdin().lock())
        } else {
            Box::new(File::open(path).map_err(io_err("opening", path))?)
        };
        let total = if path == Path::new("-") {
            None
        } else {
            path.metadata().ok().map(|m| m.len())
        };
        progress.begin(&format!("importing {}", path.display()), total);
        let mut w = HashingWriter::new(&tmp.1, progress);
        let copied = decompressed(input).and_then(|mut r| io::copy(&mut r, &mut w));
        progress.end();
        if let Err(e) = copied {
            let _ = fs::remove_file(&tmp.0);
            return Err(io_err("reading", path)(e));
        }
        let (diff_id, size) = w.finish(&tmp.0)?;
        let r = (|| -> Result<Image> {
            let mut content = Content::default();
            let f = File::open(&tmp.0).map_err(io_err("opening", &tmp.0))?;
            content.scan(BufReader::new(f), &path.display().to_string())?;
            let chain = layer_name(&diff_id);
            if !self.snapshot_exists(&chain)? {
                let mut layer =
                    BufReader::new(File::open(&tmp.0).map_err(io_err("opening", &tmp.0))?);
                let what = format!("importing {}", path.display());
                progress.begin(&what, Some(size));
                let mut counted = CountingReader {
                    inner: &mut layer,
                    progress,
                };
                // Sized for all of its content before a byte is unpacked.
                self.apply_new(&chain, "", &diff_id, &mut counted, content.needed(), &what)?;
                progress.end();
            }
            let blob = self.blob_path(&diff_id);
            fs::rename(&tmp.0, &blob).map_err(io_err("renaming into", &blob))?;
            let created = rfc3339(now());
            let config = serde_json::json!({
                "architecture": host_arch(),
                "os": "linux",
                "created": created,
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                "history": [{"created": created, "created_by": format!("thinpool import {}", path.display())}],
            });
            let config = serde_json::to_vec(&config).expect("a config serialises");
            let id = sha256_digest(&config);
            write_atomic(&self.blob_path(&id), &config)?;
            let image = Image {
                id,
                names: vec![normalize_name(reference)],
                diff_ids: vec![diff_id.clone()],
                layer_sizes: vec![size],
                created: now(),
            };
            self.add_image(image.clone())?;
            Ok(image)
        })();
        if r.is_err() {
            let _ = fs::remove_file(&tmp.0);
        }
        r
    }
}

/// What is in a snapshot so far, to size the next one.
#[derive(Debug, Clone, Default)]
struct Content {
    /// File content bytes, each file rounded up to 4 KiB.
    bytes: u64,
    /// Entries (inodes).
    entries: u64,
}

impl Content {
    fn add(&mut self, bytes: u64, entries: u64) {
        self.bytes += bytes;
        self.entries += entries;
    }

    /// A layer known only by its tar's size: its content is at most that.
    fn add_tar_estimate(&mut self, tar_size: u64) {
        self.bytes += tar_size;
    }

    /// Count the entries and apparent file sizes of the layer tar `layer` (`what` names it).
    fn scan(&mut self, layer: impl Read, what: &str) -> Result<()> {
        let err = |e: io::Error| StoreError::Invalid(format!("{what}: reading its tar: {e}"));
        let mut a = tar::Archive::new(layer);
        for e in a.entries().map_err(err)? {
            let e = e.map_err(err)?;
            let h = e.header();
            // A sparse file takes its apparent size once written by someone else.
            let size = match h.as_gnu() {
                Some(g) if h.entry_type().is_gnu_sparse() => g.real_size().unwrap_or(0),
                _ => h.entry_size().unwrap_or(0),
            };
            self.bytes += size.div_ceil(4096) * 4096;
            self.entries += 1;
        }
        Ok(())
    }

    /// The snapshot size that holds this content in ext4.
    fn needed(&self) -> u64 {
        needed_size(self.bytes, self.entries)
    }
}

/// The size of an ext4 that holds `bytes` of file content in `entries` files: the content
/// plus a block per entry, an eighth more for ext4's metadata, journal and reserved blocks,
/// and 256 MiB; rounded up to a MiB.
pub fn needed_size(bytes: u64, entries: u64) -> u64 {
    let raw = bytes + entries * 4096;
    let total = raw + raw / 8 + (256 << 20);
    total.div_ceil(1 << 20) << 20
}

/// Copies what it reads into a file, advancing the progress.
struct Tee<'a, R: Read> {
    inner: R,
    file: &'a File,
    progress: &'a dyn Progress,
    error: Option<io::Error>,
}

impl<'a, R: Read> Tee<'a, R> {
    fn new(inner: R, file: &'a File, progress: &'a dyn Progress) -> Self {
        Tee {
            inner,
            file,
            progress,
            error: None,
        }
    }

    /// Flush to disk; the first write error, if any.
    fn flush(self, path: &Path) -> Result<()> {
        if let Some(e) = self.error {
            return Err(io_err("writing", path)(e));
        }
        self.file.sync_all().map_err(io_err("syncing", path))
    }
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.error.is_none()
            && let Err(e) = (&*self.file).write_all(&buf[..n])
        {
            self.error = Some(e);
        }
        self.progress.advance(n as u64);
        Ok(n)
    }
}

struct CountingReader<'a, R: Read> {
    inner: R,
    progress: &'a dyn Progress,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

struct CountingWriter<'a, W: Write> {
    inner: W,
    progress: &'a dyn Progress,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes into a file while hashing (sha256) and counting.
struct HashingWriter<'a> {
    file: io::BufWriter<&'a File>,
    hash: Sha256,
    size: u64,
    progress: &'a dyn Progress,
}

impl<'a> HashingWriter<'a> {
    fn new(file: &'a File, progress: &'a dyn Progress) -> Self {
        HashingWriter {
            file: io::BufWriter::with_capacity(1 << 20, file),
            hash: Sha256::new(),
            size: 0,
            progress,
        }
    }

    /// Flush and sync; the digest and size written.
    fn finish(self, path: &Path) -> Result<(String, u64)> {
        let file = self
            .file
            .into_inner()
            .map_err(|e| io_err("writing", path)(e.into_error()))?;
        file.sync_all().map_err(io_err("syncing", path))?;
        Ok((format!("sha256:{:x}", self.hash.finalize()), self.size))
    }
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        self.progress.advance(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// The OCI chain ids of layers with `diff_ids`, bottom first.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256_digest(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Whether `e` is a file system out of space (the snapshot's ext4, not the pool).
fn is_no_space(e: &StoreError) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(28)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn layer_name(chain: &str) -> String {
    format!("{LAYER_PREFIX}{chain}")
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// The first 12 hex digits of a digest, as docker shows ids.
pub fn short(digest: &str) -> &str {
    let h = hex_of(digest);
    &h[..h.len().min(12)]
}

fn display_names(names: &[String], id: &str) -> String {
    names
        .first()
        .cloned()
        .unwrap_or_else(|| short(id).to_string())
}

/// `name` with `:latest` when it has no tag (docker's rule: a tag follows the last `:` after
/// the last `/`).
pub fn normalize_name(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') || name.contains('@') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

fn find_image<'a>(r: &'a Records, reference: &str) -> Result<&'a Image> {
    let name = normalize_name(reference);
    if let Some(i) = r.images.values().find(|i| i.names.contains(&name)) {
        return Ok(i);
    }
    let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
    if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        let hits: Vec<&Image> = r
            .images
            .values()
            .filter(|i| hex_of(&i.id).starts_with(hex))
            .collect();
        match hits.len() {
            1 => return Ok(hits[0]),
            0 => {}
            n => {
                return Err(StoreError::Invalid(format!(
                    "{reference} is the start of {n} image ids: give more digits"
                )));
            }
        }
    }
    Err(StoreError::NotFound(format!(
        "image {reference} not found (`thinpool image ls` lists them)"
    )))
}

fn container_of(s: SnapshotInfo) -> Option<Container> {
    let name = s.key.strip_prefix(CONTAINER_PREFIX)?.to_string();
    if s.kind != "active" {
        return None;
    }
    Some(Container {
        name,
        image: s.labels.get(IMAGE_LABEL).cloned().unwrap_or_default(),
        image_ref: s.labels.get(IMAGE_REF_LABEL).cloned().unwrap_or_default(),
        size: s.size,
        created: s.created,
        snapshot: s.key,
    })
}

/// A container name: 1–128 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "container name {name:?}: 1 to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
        )))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `secs` since the epoch as an RFC 3339 UTC time (`2024-02-29T13:05:09Z`).
pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
}

/// Write `bytes` to `path` atomically: a temporary file, fsync, rename, fsync of the folder.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f.write_all(bytes).map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("syncing", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("renaming into", path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing", dir))
}

fn mount(device: &Path, dir: &Path, read_only: bool) -> Result<()> {
    thinpool_fs::mount::mount(device, dir, thinpool_fs::FsType::Ext4, None, read_only).map_err(
        |e| {
            StoreError::Mount(format!(
                "mounting {} on {}: {e}",
                device.display(),
                dir.display()
            ))
        },
    )
}

fn unmount(dir: &Path) -> Result<()> {
    thinpool_fs::mount::unmount(dir)
        .map_err(|e| StoreError::Mount(format!("unmounting {}: {e}", dir.display())))
}

fn thinpool_fs_is_mounted(dir: &Path) -> bool {
    matches!(thinpool_fs::mount::mounted_at(dir), Ok(Some(_)))
}

/// The folders `device` is mounted on.
fn mounts_of(device: &Path) -> Result<Vec<PathBuf>> {
    Ok(thinpool_fs::mount::mounts()
        .map_err(|e| StoreError::Mount(format!("reading the mount table: {e}")))?
        .into_iter()
        .filter(|m| Path::new(&m.source) == device)
        .map(|m| m.dir)
        .collect())
}
