//! The layer store as the daemon runs it (`thinpool-layers`): opened once the FUSE export is
//! up, since its loop devices sit over the export's files, and shared by the control API
//! (`thinpool snapshot …`) and containerd's snapshotter socket.

use std::sync::{Arc, RwLock};

use thinpool_control::{ErrorKind, LayerMount, LayerSnapshot, LayerUsage};
use thinpool_layers::{LayerStore, Mount, Snapshot};

use crate::mounts::Refusal;

/// The store, once open.
#[derive(Default)]
pub(crate) struct Layers {
    store: RwLock<Option<Arc<LayerStore>>>,
}

impl From<thinpool_layers::Error> for Refusal {
    fn from(e: thinpool_layers::Error) -> Refusal {
        use thinpool_layers::Error as E;
        match e {
            E::Engine(e) => e.into(),
            E::Fs(e) => e.into(),
            e => {
                let kind = match &e {
                    E::NotFound(_) => ErrorKind::NotFound,
                    E::AlreadyExists(_) => ErrorKind::Exists,
                    E::FailedPrecondition(_) => ErrorKind::Busy,
                    E::InvalidArgument(_) => ErrorKind::InvalidArgument,
                    _ => ErrorKind::Io,
                };
                Refusal {
                    kind,
                    message: e.to_string(),
                }
            }
        }
    }
}

impl Layers {
    /// Serve `store` from now on.
    pub fn set(&self, store: Arc<LayerStore>) {
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = Some(store);
    }

    /// Stop serving the store (it lets go of the pool once the last call returns).
    pub fn take(&self) -> Option<Arc<LayerStore>> {
        self.store.write().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The store, or why there is none.
    pub fn get(&self) -> Result<Arc<LayerStore>, Refusal> {
        self.store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Refusal {
                kind: ErrorKind::Io,
                message: "the layer store is not open in this daemon (it failed to open: see the daemon's log)".into(),
            })
    }

    /// Every snapshot, as the protocol carries it.
    pub fn list(&self) -> Result<Vec<LayerSnapshot>, Refusal> {
        Ok(self.get()?.list().iter().map(to_protocol).collect())
    }

    /// The space of every snapshot, by key.
    pub fn usage(&self) -> Result<std::collections::BTreeMap<String, LayerUsage>, Refusal> {
        Ok(self
            .get()?
            .usage_all()?
            .into_iter()
            .map(|(k, u)| {
                let u = LayerUsage {
                    exclusive_bytes: u.exclusive_bytes,
                    mapped_bytes: u.mapped_bytes,
                };
                (k, u)
            })
            .collect())
    }

    /// Remove a snapshot.
    pub fn remove(&self, key: &str) -> Result<(), Refusal> {
        Ok(self.get()?.remove(key)?)
    }

    /// A new snapshot (or view) of `parent`, and its mounts.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: thinpool_engine::Labels,
        view: bool,
    ) -> Result<Vec<LayerMount>, Refusal> {
        let store = self.get()?;
        let mounts = if view {
            store.view(key, parent, labels)?
        } else {
            store.prepare(key, parent, labels)?
        };
        Ok(mounts.iter().map(mount_to_protocol).collect())
    }

    /// The mounts of an active snapshot or view.
    pub fn mounts(&self, key: &str) -> Result<Vec<LayerMount>, Refusal> {
        Ok(self
            .get()?
            .mounts(key)?
            .iter()
            .map(mount_to_protocol)
            .collect())
    }

    /// Commit `key` as `name`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: thinpool_engine::Labels,
    ) -> Result<(), Refusal> {
        Ok(self.get()?.commit(name, key, labels)?)
    }

    /// Grow `key` with its filesystem.
    pub fn resize(&self, key: &str, size: u64) -> Result<LayerSnapshot, Refusal> {
        Ok(to_protocol(&self.get()?.resize(key, size)?))
    }
}

fn mount_to_protocol(m: &Mount) -> LayerMount {
    LayerMount {
        fstype: m.fstype.clone(),
        source: m.source.clone(),
        options: m.options.clone(),
    }
}

fn to_protocol(s: &Snapshot) -> LayerSnapshot {
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    LayerSnapshot {
        key: s.key.clone(),
        parent: s.parent.clone(),
        kind: s.kind.as_str().into(),
        labels: s.labels.clone(),
        created: secs(s.created),
        updated: secs(s.updated),
        volume: s.volume.clone(),
        size: s.size,
    }
}
