//! The tonic service: requests to trait calls on the blocking pool, answers and errors back.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::{Request, Response, Status};

use crate::filter::Filters;
use crate::proto::containerd::services::snapshots::v1 as api;
use crate::proto::containerd::types as types_api;
use crate::{Error, Info, Kind, Mount, Snapshots};

/// Infos per `ListSnapshotsResponse`, like containerd's own server.
pub(crate) const LIST_BATCH: usize = 100;

pub(crate) struct Service {
    snapshots: Arc<dyn Snapshots>,
}

impl Service {
    pub(crate) fn new(snapshots: Arc<dyn Snapshots>) -> Service {
        Service { snapshots }
    }

    /// Runs `f` on the blocking pool; a panic becomes `Internal`.
    async fn call<T, F>(&self, rpc: &'static str, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Snapshots) -> Result<T, Error> + Send + 'static,
    {
        let snapshots = Arc::clone(&self.snapshots);
        match tokio::task::spawn_blocking(move || f(&*snapshots)).await {
            Ok(result) => result.map_err(status),
            Err(e) => {
                let why = if e.is_panic() {
                    format!("panicked: {}", panic_message(e.into_panic()))
                } else {
                    "cancelled".to_owned()
                };
                tracing::error!(rpc, "snapshotter call {why}");
                Err(Status::internal(format!("snapshotter {rpc} {why}")))
            }
        }
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// The gRPC status for an error: the code of the same name and the bare message.
pub(crate) fn status(e: Error) -> Status {
    match e {
        Error::NotFound(m) => Status::not_found(m),
        Error::AlreadyExists(m) => Status::already_exists(m),
        Error::FailedPrecondition(m) => Status::failed_precondition(m),
        Error::InvalidArgument(m) => Status::invalid_argument(m),
        Error::Unavailable(m) => Status::unavailable(m),
        Error::Internal(m) => Status::internal(m),
    }
}

fn require(what: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!(
            "{what} must not be empty"
        )))
    } else {
        Ok(())
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let (seconds, nanos) = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i32),
        Err(e) => {
            // Before 1970: a negative second count and non-negative nanos.
            let d = e.duration();
            let mut secs = -(d.as_secs() as i64);
            let mut nanos = d.subsec_nanos() as i32;
            if nanos > 0 {
                secs -= 1;
                nanos = 1_000_000_000 - nanos;
            }
            (secs, nanos)
        }
    };
    prost_types::Timestamp { seconds, nanos }
}

fn system_time(t: Option<prost_types::Timestamp>) -> SystemTime {
    let Some(t) = t else {
        return SystemTime::UNIX_EPOCH;
    };
    let nanos = Duration::from_nanos(t.nanos.clamp(0, 999_999_999) as u64);
    let at = if t.seconds >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(t.seconds as u64))
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(t.seconds.unsigned_abs()))
    };
    at.and_then(|at| at.checked_add(nanos))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn kind_to_api(k: Kind) -> api::Kind {
    match k {
        Kind::View => api::Kind::View,
        Kind::Active => api::Kind::Active,
        Kind::Committed => api::Kind::Committed,
    }
}

pub(crate) fn info_to_api(i: Info) -> api::Info {
    api::Info {
        name: i.name,
        parent: i.parent,
        kind: kind_to_api(i.kind) as i32,
        created_at: Some(timestamp(i.created)),
        updated_at: Some(timestamp(i.updated)),
        labels: i.labels,
    }
}

/// An info from the wire. An unknown kind (clients send none with `Update`) reads as active.
fn info_from_api(i: api::Info) -> Info {
    let kind = match api::Kind::try_from(i.kind) {
        Ok(api::Kind::View) => Kind::View,
        Ok(api::Kind::Committed) => Kind::Committed,
        _ => Kind::Active,
    };
    Info {
        name: i.name,
        parent: i.parent,
        kind,
        labels: i.labels,
        created: system_time(i.created_at),
        updated: system_time(i.updated_at),
    }
}

fn mounts_to_api(mounts: Vec<Mount>) -> Vec<types_api::Mount> {
    mounts
        .into_iter()
        .map(|m| types_api::Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

type ListStream =
    tokio_stream::Iter<std::vec::IntoIter<Result<api::ListSnapshotsResponse, Status>>>;

#[tonic::async_trait]
impl api::snapshots_server::Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        require("key", &r.key)?;
        let mounts = self
            .call("Prepare", move |s| s.prepare(&r.key, &r.parent, r.labels))
            .await?;
        Ok(Response::new(api::PrepareSnapshotResponse {
            mounts: mounts_to_api(mounts),
        }))
    }

    async fn view(
        &self,
        request: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        require("key", &r.key)?;
        let mounts = self
            .call("View", move |s| s.view(&r.key, &r.parent, r.labels))
            .await?;
        Ok(Response::new(api::ViewSnapshotResponse {
            mounts: mounts_to_api(mounts),
        }))
    }

    async fn mounts(
        &self,
        request: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let r = request.into_inner();
        require("key", &r.key)?;
        let mounts = self.call("Mounts", move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(api::MountsResponse {
            mounts: mounts_to_api(mounts),
        }))
    }

    async fn commit(
        &self,
        request: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        require("name", &r.name)?;
        require("key", &r.key)?;
        self.call("Commit", move |s| s.commit(&r.name, &r.key, r.labels))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        require("key", &r.key)?;
        self.call("Remove", move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        require("key", &r.key)?;
        let info = self.call("Stat", move |s| s.stat(&r.key)).await?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(info_to_api(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = r
            .info
            .map(info_from_api)
            .ok_or_else(|| Status::invalid_argument("info must be given"))?;
        require("info.name", &info.name)?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        crate::check_update_paths(&paths).map_err(status)?;
        let info = self.call("Update", move |s| s.update(info, &paths)).await?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(info_to_api(info)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let filters = Filters::parse(&r.filters).map_err(status)?;
        let infos = self.call("List", |s| s.list()).await?;
        let mut batches = Vec::new();
        let mut batch = Vec::with_capacity(LIST_BATCH);
        for info in infos.into_iter().filter(|i| filters.matches(i)) {
            batch.push(info_to_api(info));
            if batch.len() == LIST_BATCH {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(LIST_BATCH));
                batches.push(Ok(api::ListSnapshotsResponse { info: full }));
            }
        }
        if !batch.is_empty() {
            batches.push(Ok(api::ListSnapshotsResponse { info: batch }));
        }
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn usage(
        &self,
        request: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let r = request.into_inner();
        require("key", &r.key)?;
        let u = self.call("Usage", move |s| s.usage(&r.key)).await?;
        Ok(Response::new(api::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(
        &self,
        _request: Request<api::CleanupRequest>,
    ) -> Result<Response<()>, Status> {
        self.call("Cleanup", |s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        for t in [
            SystemTime::UNIX_EPOCH,
            SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            SystemTime::UNIX_EPOCH - Duration::new(5, 250),
        ] {
            let ts = timestamp(t);
            assert!((0..1_000_000_000).contains(&ts.nanos));
            assert_eq!(system_time(Some(ts)), t);
        }
        // Garbage from the wire does not panic.
        for (seconds, nanos) in [(i64::MAX, i32::MAX), (i64::MIN, -1), (0, i32::MIN)] {
            let _ = system_time(Some(prost_types::Timestamp { seconds, nanos }));
        }
    }
}
