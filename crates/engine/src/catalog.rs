//! `volumes.json`: what the kernel's metadata does not keep — names, virtual sizes, parents,
//! kinds (design: "The pool on disk").
//!
//! Written atomically (temp file, fsync, rename, fsync of the directory) and tagged with the
//! metadata transaction id it describes. Every operation writes the catalog *before* the
//! metadata commit that makes it real, so that after a crash the pool's `reconcile` can tell an
//! operation half done and roll it forward or back.
//!
//! **The metadata is the truth for mappings; the catalog is a cache of names and sizes.** It
//! may be older than the metadata (restored from a backup, or the kernel changed the pool), or
//! missing. So nothing the catalog says removes a mapping, except a recorded intent:
//!
//! - an entry marked `removing`: a removal that may or may not have committed → the device is
//!   deleted if still there, the entry dropped;
//! - an entry with `shrinking` (the transaction id the shrink was recorded at): a shrink that
//!   may not have committed → the mappings past the size are removed, the mark cleared.
//!
//! Everything else only adds to the catalog or drops entries that own nothing:
//!
//! - an entry whose thin device is not in the metadata: a create/snapshot that never committed
//!   (the catalog is ahead of the metadata's transaction id), or a device deleted outside
//!   thinpool → dropped;
//! - an entry whose device maps blocks past its size (the kernel grew the device by reloading
//!   a longer table, or the catalog is older than a `vol resize`) → the size grows to cover
//!   them;
//! - a thin device with no entry (a pool made by the kernel or another tool, or a lost
//!   catalog) → adopted as `thin-<id>`, sized to cover its highest mapping.
//!
//! A catalog that names a volume twice, gives two volumes one thin id, or holds an invalid
//! name is refused before anything is written.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Whether a volume was created empty or as a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    /// An empty thin volume.
    Thin,
    /// A snapshot of another volume.
    Snapshot,
}

/// One volume in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub name: String,
    pub thin_id: u32,
    pub size: u64,
    pub kind: VolumeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub created: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removing: bool,
    /// A shrink to `size` recorded at this transaction id and maybe not committed yet: the
    /// mappings past `size` are to be removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shrinking: Option<u64>,
    /// Free-form labels of the volume's owner (the layer store keeps its snapshot records
    /// here, so they change in the same atomic write as the volume itself).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CatalogFile {
    version: u32,
    transaction_id: u64,
    volumes: Vec<Entry>,
}

/// The catalog in memory, with its file.
#[derive(Debug)]
pub(crate) struct Catalog {
    path: PathBuf,
    pub transaction_id: u64,
    pub volumes: BTreeMap<String, Entry>,
}

impl Catalog {
    /// Path of the catalog in a pool root.
    pub fn path_in(root: &Path) -> PathBuf {
        root.join("volumes.json")
    }

    /// An empty catalog (not yet written).
    pub fn new(root: &Path, transaction_id: u64) -> Self {
        Catalog {
            path: Self::path_in(root),
            transaction_id,
            volumes: BTreeMap::new(),
        }
    }

    /// Load the catalog; a missing file is an empty catalog.
    pub fn load(root: &Path) -> Result<Self> {
        let path = Self::path_in(root);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Catalog::new(root, 0));
            }
            Err(source) => {
                return Err(Error::File {
                    what: "reading",
                    path,
                    source,
                });
            }
        };
        let file: CatalogFile = serde_json::from_slice(&text).map_err(|e| Error::Catalog {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if file.version != 1 {
            return Err(Error::Catalog {
                path,
                message: format!("unknown version {}", file.version),
            });
        }
        let mut volumes: BTreeMap<String, Entry> = BTreeMap::new();
        let mut ids: BTreeMap<u32, String> = BTreeMap::new();
        for e in file.volumes {
            let refuse = |message: String| Error::Catalog {
                path: path.clone(),
                message,
            };
            check_name(&e.name).map_err(|err| refuse(err.to_string()))?;
            if e.thin_id > thinpool_thin::ThinId::MAX {
                return Err(refuse(format!(
                    "volume {}: thin id {} is not below 2^24",
                    e.name, e.thin_id
                )));
            }
            if let Some(other) = ids.insert(e.thin_id, e.name.clone()) {
                return Err(refuse(format!(
                    "volumes {other} and {} both claim thin device {}: fix or remove the file \
                     (the metadata keeps the mappings; a lost catalog only loses names)",
                    e.name, e.thin_id
                )));
            }
            if volumes.contains_key(&e.name) {
                return Err(refuse(format!("the volume name {} appears twice", e.name)));
            }
            volumes.insert(e.name.clone(), e);
        }
        Ok(Catalog {
            path,
            transaction_id: file.transaction_id,
            volumes,
        })
    }

    /// Write the catalog atomically and durably.
    pub fn save(&self) -> Result<()> {
        let file = CatalogFile {
            version: 1,
            transaction_id: self.transaction_id,
            volumes: self.volumes.values().cloned().collect(),
        };
        let mut text = serde_json::to_vec_pretty(&file).expect("catalog serializes");
        text.push(b'\n');
        let tmp = self.path.with_extension("json.tmp");
        let io = |what, source| Error::File {
            what,
            path: tmp.clone(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(crate::private::FILE_MODE)
            .open(&tmp)
            .map_err(|e| io("creating", e))?;
        f.write_all(&text).map_err(|e| io("writing", e))?;
        f.sync_all().map_err(|e| io("syncing", e))?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(|source| Error::File {
            what: "renaming into place",
            path: self.path.clone(),
            source,
        })?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The entry of a thin id.
    pub fn by_thin_id(&self, id: u32) -> Option<&Entry> {
        self.volumes.values().find(|e| e.thin_id == id)
    }

    /// Number of volumes of each kind (thin, snapshot).
    pub fn counts(&self) -> (usize, usize) {
        let snaps = self
            .volumes
            .values()
            .filter(|e| e.kind == VolumeKind::Snapshot)
            .count();
        (self.volumes.len() - snaps, snaps)
    }
}

/// Check a volume name: 1..=128 bytes of letters, digits, `-`, `_`, `.`, not starting with `.`.
pub(crate) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid volume name {name:?}: use 1 to 128 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

/// Seconds since the epoch.
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
