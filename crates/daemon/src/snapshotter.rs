//! containerd's snapshots API over the layer store: [`Adapter`] answers the
//! `thinpool-snapshotter` server's calls with the store's operations, and maps the store's
//! errors onto the gRPC codes containerd turns back into its own (`errdefs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use thinpool_layers::{Kind, LayerStore, Snapshot};
use thinpool_snapshotter as api;

/// The layer store as containerd's snapshotter.
pub(crate) struct Adapter(pub Arc<LayerStore>);

fn error(e: thinpool_layers::Error) -> api::Error {
    use thinpool_engine::ErrorKind as K;
    use thinpool_layers::Error as E;
    let message = crate::handler::chain(&e);
    match e {
        E::NotFound(m) => api::Error::NotFound(m),
        E::AlreadyExists(m) => api::Error::AlreadyExists(m),
        E::FailedPrecondition(m) => api::Error::FailedPrecondition(m),
        E::InvalidArgument(m) => api::Error::InvalidArgument(m),
        E::Unavailable(m) => api::Error::Unavailable(m),
        E::Engine(e) => match e.kind() {
            K::NotFound => api::Error::NotFound(message),
            K::Exists => api::Error::AlreadyExists(message),
            K::Busy => api::Error::FailedPrecondition(message),
            K::InvalidArgument => api::Error::InvalidArgument(message),
            K::NoSpace | K::ReadOnly => api::Error::Unavailable(message),
            K::Corrupt | K::Io => api::Error::Internal(message),
        },
        E::Fs(thinpool_fs::Error::NoFreeLoop | thinpool_fs::Error::Busy { .. }) => {
            api::Error::Unavailable(message)
        }
        E::Fs(_) => api::Error::Internal(message),
    }
}

fn info(s: Snapshot) -> api::Info {
    api::Info {
        name: s.key,
        parent: s.parent.unwrap_or_default(),
        kind: match s.kind {
            Kind::View => api::Kind::View,
            Kind::Active => api::Kind::Active,
            Kind::Committed => api::Kind::Committed,
        },
        labels: s.labels,
        created: s.created,
        updated: s.updated,
    }
}

fn mounts(m: Vec<thinpool_layers::Mount>) -> Vec<api::Mount> {
    m.into_iter()
        .map(|m| api::Mount {
            kind: m.fstype,
            source: m.source.display().to_string(),
            options: m.options,
        })
        .collect()
}

impl api::Snapshots for Adapter {
    fn stat(&self, key: &str) -> Result<api::Info, api::Error> {
        self.0.stat(key).map(info).map_err(error)
    }

    fn update(&self, i: api::Info, fieldpaths: &[String]) -> Result<api::Info, api::Error> {
        self.0
            .update(&i.name, i.labels, fieldpaths)
            .map(info)
            .map_err(error)
    }

    fn usage(&self, key: &str) -> Result<api::Usage, api::Error> {
        let u = self.0.usage(key).map_err(error)?;
        Ok(api::Usage {
            size: i64::try_from(u.exclusive_bytes).unwrap_or(i64::MAX),
            inodes: 0,
        })
    }

    fn mounts(&self, key: &str) -> Result<Vec<api::Mount>, api::Error> {
        self.0.mounts(key).map(mounts).map_err(error)
    }

    fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<api::Mount>, api::Error> {
        self.0
            .prepare(key, parent, labels)
            .map(mounts)
            .map_err(error)
    }

    fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<api::Mount>, api::Error> {
        self.0.view(key, parent, labels).map(mounts).map_err(error)
    }

    fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), api::Error> {
        self.0.commit(name, key, labels).map_err(error)
    }

    fn remove(&self, key: &str) -> Result<(), api::Error> {
        self.0.remove(key).map_err(error)
    }

    fn list(&self) -> Result<Vec<api::Info>, api::Error> {
        Ok(self.0.list().into_iter().map(info).collect())
    }

    fn cleanup(&self) -> Result<(), api::Error> {
        self.0.cleanup().map_err(error)
    }
}
