//! An in-memory model of a snapshotter with containerd's rules, and a harness that serves it on
//! a real unix socket and talks to it with the generated tonic client.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use thinpool_snapshotter::proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use thinpool_snapshotter::{Error, Info, Kind, Mount, Server, Snapshots, Usage};
use tonic::transport::{Channel, Endpoint, Uri};

/// Snapshots in a map, with containerd's rules: a parent must exist and be committed, only an
/// active snapshot can be committed, names are unique, a snapshot with children stays.
/// `prepare` with the key "panic" panics, with the key "slow" takes a second.
#[derive(Default)]
pub struct Model {
    snaps: Mutex<BTreeMap<String, Info>>,
    pub cleanups: AtomicUsize,
    pub slow_started: AtomicBool,
}

impl Model {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Info>> {
        // A panicking call (the "panic" key) must not poison the model for the next test step.
        self.snaps.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stat_ok(&self, key: &str) -> bool {
        self.lock().contains_key(key)
    }

    pub fn list_is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn create(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        let mut snaps = self.lock();
        if snaps.contains_key(key) {
            return Err(Error::AlreadyExists(format!("snapshot {key}")));
        }
        if !parent.is_empty() {
            match snaps.get(parent) {
                None => return Err(Error::NotFound(format!("parent snapshot {parent}"))),
                Some(p) if p.kind != Kind::Committed => {
                    return Err(Error::FailedPrecondition(format!(
                        "parent {parent} is not committed"
                    )));
                }
                Some(_) => {}
            }
        }
        let now = SystemTime::now();
        snaps.insert(
            key.to_owned(),
            Info {
                name: key.to_owned(),
                parent: parent.to_owned(),
                kind,
                labels,
                created: now,
                updated: now,
            },
        );
        Ok(mounts_of(key, kind))
    }
}

pub fn mounts_of(key: &str, kind: Kind) -> Vec<Mount> {
    let mode = if kind == Kind::View { "ro" } else { "rw" };
    vec![Mount {
        kind: "ext4".into(),
        source: format!("/dev/model/{key}"),
        options: vec![mode.into(), "discard".into()],
    }]
}

impl Snapshots for Model {
    fn stat(&self, key: &str) -> Result<Info, Error> {
        self.lock()
            .get(key)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("snapshot {key}")))
    }

    fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info, Error> {
        let mut snaps = self.lock();
        let current = snaps
            .get_mut(&info.name)
            .ok_or_else(|| Error::NotFound(format!("snapshot {}", info.name)))?;
        current.apply_update(&info, fieldpaths)?;
        current.updated = SystemTime::now();
        Ok(current.clone())
    }

    fn usage(&self, key: &str) -> Result<Usage, Error> {
        let info = self.stat(key)?;
        Ok(Usage {
            size: 4096 * (info.name.len() as i64),
            inodes: info.labels.len() as i64,
        })
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>, Error> {
        let info = self.stat(key)?;
        if info.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is committed: no mounts"
            )));
        }
        Ok(mounts_of(key, info.kind))
    }

    fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        if key == "panic" {
            panic!("the model was asked to panic");
        }
        if key == "slow" {
            self.slow_started.store(true, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        self.create(key, parent, Kind::Active, labels)
    }

    fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        self.create(key, parent, Kind::View, labels)
    }

    fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<(), Error> {
        let mut snaps = self.lock();
        let active = snaps
            .get(key)
            .ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
        if active.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        if snaps.contains_key(name) {
            return Err(Error::AlreadyExists(format!("snapshot {name}")));
        }
        let mut info = snaps.remove(key).expect("checked above");
        let now = SystemTime::now();
        info.name = name.to_owned();
        info.kind = Kind::Committed;
        info.labels = labels;
        info.created = now;
        info.updated = now;
        snaps.insert(name.to_owned(), info);
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<(), Error> {
        let mut snaps = self.lock();
        if !snaps.contains_key(key) {
            return Err(Error::NotFound(format!("snapshot {key}")));
        }
        if snaps.values().any(|i| i.parent == key) {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key} with children"
            )));
        }
        snaps.remove(key);
        Ok(())
    }

    fn list(&self) -> Result<Vec<Info>, Error> {
        Ok(self.lock().values().cloned().collect())
    }

    fn cleanup(&self) -> Result<(), Error> {
        self.cleanups.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A server over a [`Model`] on a socket in a temporary directory, and a client runtime.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub model: Arc<Model>,
    pub server: Option<Server>,
    /// The clients' runtime: its own worker thread, so the client side answers the server
    /// while the test thread blocks in `Server::stop`.
    pub rt: tokio::runtime::Runtime,
}

impl Harness {
    pub fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("snapshotter.sock");
        let model = Arc::new(Model::default());
        let server = Server::start(&socket, model.clone()).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        Harness {
            dir,
            socket,
            model,
            server: Some(server),
            rt,
        }
    }

    pub fn client(&self) -> SnapshotsClient<Channel> {
        self.rt.block_on(connect(&self.socket))
    }
}

/// A tonic client on the unix socket `path`.
pub async fn connect(path: &Path) -> SnapshotsClient<Channel> {
    let path = path.to_owned();
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .unwrap();
    SnapshotsClient::new(channel)
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
