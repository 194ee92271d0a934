//! One control request against the pool: [`handle`] turns a [`Request`] into its
//! [`Response`], mapping the engine's error kinds onto the protocol's.

use serde::Serialize;
use thinpool_control::{CommittedMetadata, ErrorKind, Hello, MetadataSnapStep, Request, Response};
use thinpool_engine::Pool;

use crate::layers::Layers;
use crate::mounts::{Mounts, Refusal};

/// The protocol's kind for an engine error kind (one exhaustive match, so a new engine kind
/// must be given a protocol kind here).
pub(crate) fn kind_of(kind: thinpool_engine::ErrorKind) -> ErrorKind {
    use thinpool_engine::ErrorKind as E;
    match kind {
        E::NoSpace => ErrorKind::NoSpace,
        E::Corrupt => ErrorKind::Corrupt,
        E::Io => ErrorKind::Io,
        E::NotFound => ErrorKind::NotFound,
        E::Exists => ErrorKind::Exists,
        E::Busy => ErrorKind::Busy,
        E::ReadOnly => ErrorKind::ReadOnly,
        E::InvalidArgument => ErrorKind::InvalidArgument,
    }
}

/// An error and its sources as one line, `outer: inner: …` — what the CLI prints for the
/// same error when it has the pool open itself.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn answer<T: Serialize, E: Into<Refusal>>(r: Result<T, E>) -> Response {
    match r {
        Ok(v) => match serde_json::to_value(&v) {
            Ok(value) => Response::Ok { value },
            Err(e) => Response::Error {
                kind: ErrorKind::Io,
                message: format!("encoding the answer: {e}"),
            },
        },
        Err(e) => {
            let Refusal { kind, message } = e.into();
            match kind {
                // A user's mistake, answered: not the daemon's failure.
                ErrorKind::NotFound
                | ErrorKind::Exists
                | ErrorKind::InvalidArgument
                | ErrorKind::Busy => {
                    tracing::debug!(?kind, "request refused: {message}");
                }
                _ => tracing::error!(?kind, "request failed: {message}"),
            }
            Response::Error { kind, message }
        }
    }
}

/// A volume or a list of them, with the loop devices and mount points of `mounts` added.
fn decorated<T: Serialize>(r: thinpool_engine::Result<T>, mounts: &Mounts) -> Response {
    let mut resp = answer(r);
    if let Response::Ok { value } = &mut resp {
        mounts.decorate(value);
    }
    resp
}

/// Run `req` on `pool` and the daemon's `mounts`; `hello` is this daemon's answer to
/// [`Request::Hello`]. Blocks for as long as the operation takes (commits, a mkfs included).
pub(crate) fn handle(
    pool: &Pool,
    mounts: &Mounts,
    layers: &Layers,
    hello: &Hello,
    req: Request,
) -> Response {
    tracing::debug!(op = req.op(), request = ?req, "control request");
    match req {
        // A client of another protocol version gets our hello and decides (it knows both
        // numbers, so its message can say what to do).
        Request::Hello { .. } => answer::<_, Refusal>(Ok(hello)),
        Request::PoolStatus => answer(pool.status()),
        Request::VolumeList => decorated(pool.volumes(), mounts),
        Request::VolumeInfo { name } => decorated(pool.volume_info(&name), mounts),
        Request::VolumeCreate { name, size } => answer(pool.create_volume(&name, size)),
        Request::VolumeSnapshot { origin, name } => answer(mounts.snapshot(pool, &origin, &name)),
        Request::VolumeRemove { name } => {
            match mounts
                .refuse_removal(&name)
                .or_else(|| layer_owned(pool, &name))
            {
                Some(r) => answer::<(), _>(Err(r)),
                None => answer(pool.remove_volume(&name)),
            }
        }
        Request::VolumeResize {
            name,
            size,
            resize_fs,
        } => answer(mounts.resize(pool, &name, size, resize_fs)),
        Request::VolumeAttach { name, read_only } => answer(mounts.attach(pool, &name, read_only)),
        Request::VolumeDetach { name } => answer(mounts.detach(&name)),
        req @ Request::Mount { .. } => answer(mounts.mount(pool, req)),
        Request::Umount { target } => answer(mounts.umount(&target)),
        Request::SnapshotList => answer(layers.list()),
        Request::SnapshotUsage => answer(layers.usage()),
        Request::SnapshotRemove { key } => answer(layers.remove(&key)),
        Request::SnapshotPrepare {
            key,
            parent,
            labels,
            view,
        } => answer(layers.prepare(&key, &parent, labels, view)),
        Request::SnapshotMounts { key } => answer(layers.mounts(&key)),
        Request::SnapshotCommit { name, key, labels } => answer(layers.commit(&name, &key, labels)),
        Request::SnapshotResize { key, size } => answer(layers.resize(&key, size)),
        Request::PoolGrow {
            data_size,
            metadata_size,
        } => answer(pool.grow(data_size, metadata_size)),
        Request::Commit => answer(pool.commit()),
        Request::PoolCheck { metadata_snap } => match metadata_snap {
            None => answer(committed_metadata(pool)),
            Some(MetadataSnapStep::Reserve) => answer(reserve_for_check(pool)),
            Some(MetadataSnapStep::Release { held_root }) => {
                answer(release_after_check(pool, held_root))
            }
        },
        Request::PoolMoveData { path } => answer(pool.move_data(&path, &|_, _| {})),
        // The space policy belongs to the daemon, not the pool: the control server answers.
        Request::PoolEvents { .. } => answer::<(), _>(Err(Refusal {
            kind: ErrorKind::InvalidArgument,
            message: "pool events are answered by the daemon's control server".into(),
        })),
    }
}

/// A refusal to remove a volume of the layer store with `vol rm`.
fn layer_owned(pool: &Pool, name: &str) -> Option<Refusal> {
    let v = pool.volume_info(name).ok()?;
    thinpool_layers::owner_of(&v).map(|message| Refusal {
        kind: ErrorKind::Busy,
        message,
    })
}

/// Commit, then name the committed metadata for the client to check read-only.
///
/// The check itself runs in the client: the daemon sees only the engine's API, which has no
/// check, and holding writes off while checking would need an engine hook (a check under the
/// metadata lock). Without one, the client checks while writes go on and tells a commit that
/// raced with it by the superblock changing under it (`thinpool pool check` retries once).
fn committed_metadata(pool: &Pool) -> thinpool_engine::Result<CommittedMetadata> {
    // `status` commits first, so what it reports is what is on disk.
    let status = pool.status()?;
    Ok(CommittedMetadata {
        metadata_path: status.metadata_path,
        transaction_id: status.transaction_id,
        held_root: None,
    })
}

/// Commit and reserve a metadata snapshot for `thinpool pool check` to check while writes go
/// on (the kernel's `reserve_metadata_snap`; the engine commits before and after it).
///
/// A snapshot found held when the pool was opened was left by an earlier run (a daemon or a
/// check that died before releasing it): nothing can still be reading it through this daemon,
/// so it is released and a new one reserved. One reserved since this daemon opened the pool
/// belongs to a check still running; that is refused as busy. (One whose check was killed
/// is released by the control server when the check's connection closes: see
/// `server::Lease`.)
fn reserve_for_check(pool: &Pool) -> thinpool_engine::Result<CommittedMetadata> {
    use thinpool_engine::Error;
    match pool.held_metadata_snap() {
        Some((h, false)) => {
            tracing::warn!(
                held_root = h,
                "releasing the metadata snapshot an earlier run left held (at block {h})"
            );
            pool.release_metadata_snap()?;
        }
        Some((h, true)) => {
            return Err(Error::Busy(format!(
                "a metadata snapshot is already held (block {h}) by another `thinpool pool \
                 check`, still running: try again when it is done (the daemon releases the \
                 snapshot when that check's control connection closes)"
            )));
        }
        None => {}
    }
    let held_root = pool.reserve_metadata_snap()?;
    let status = pool.status()?;
    Ok(CommittedMetadata {
        metadata_path: status.metadata_path,
        transaction_id: status.transaction_id,
        held_root: Some(held_root),
    })
}

/// Release the snapshot [`reserve_for_check`] reserved at `held_root`; refused (invalid
/// argument) when that is not the one held, so a late release from a check never drops
/// another check's snapshot.
fn release_after_check(pool: &Pool, held_root: u64) -> thinpool_engine::Result<()> {
    match pool.held_metadata_snap() {
        Some((h, _)) if h == held_root => pool.release_metadata_snap(),
        other => Err(thinpool_engine::Error::InvalidArgument(format!(
            "no metadata snapshot is held at block {held_root} ({})",
            other.map_or("none is held".to_string(), |(h, _)| format!(
                "the one held is at block {h}"
            ))
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinpool_engine::{PoolConfig, PoolOptions};

    fn pool(dir: &std::path::Path) -> Pool {
        let cfg = PoolConfig {
            data_size: 64 << 20,
            metadata_size: 4 << 20,
            ..Default::default()
        };
        Pool::create(dir, &cfg, PoolOptions::default()).unwrap()
    }

    fn hello() -> Hello {
        Hello {
            protocol: thinpool_control::PROTOCOL_VERSION,
            version: "test".into(),
            pid: 1,
            uid: 0,
            root: "/r".into(),
            nbd_socket: None,
            nbd_tcp: None,
        }
    }

    #[test]
    fn every_request() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(dir.path());
        let m = Mounts::load(dir.path());
        let l = Layers::default();
        let h = hello();
        let ok = |r: Response| match r {
            Response::Ok { value } => value,
            Response::Error { kind, message } => panic!("{kind:?}: {message}"),
        };
        let v = ok(handle(&p, &m, &l, &h, Request::Hello { protocol: 1 }));
        assert_eq!(serde_json::from_value::<Hello>(v).unwrap(), h);
        let v = ok(handle(
            &p,
            &m,
            &l,
            &h,
            Request::VolumeCreate {
                name: "a".into(),
                size: 1 << 20,
            },
        ));
        assert_eq!(v["name"], "a");
        ok(handle(
            &p,
            &m,
            &l,
            &h,
            Request::VolumeSnapshot {
                origin: "a".into(),
                name: "b".into(),
            },
        ));
        ok(handle(
            &p,
            &m,
            &l,
            &h,
            Request::VolumeResize {
                name: "b".into(),
                size: 2 << 20,
                resize_fs: false,
            },
        ));
        let v = ok(handle(
            &p,
            &m,
            &l,
            &h,
            Request::VolumeInfo { name: "b".into() },
        ));
        assert_eq!(v["size"], 2 << 20);
        assert_eq!(v["parent"], "a");
        let v = ok(handle(&p, &m, &l, &h, Request::VolumeList));
        assert_eq!(v.as_array().unwrap().len(), 2);
        ok(handle(
            &p,
            &m,
            &l,
            &h,
            Request::VolumeRemove { name: "b".into() },
        ));
        ok(handle(
            &p,
            &m,
            &l,
            &h,
            Request::PoolGrow {
                data_size: Some(128 << 20),
                metadata_size: None,
            },
        ));
        ok(handle(&p, &m, &l, &h, Request::Commit));
        let check = |metadata_snap| Request::PoolCheck { metadata_snap };
        let v = ok(handle(&p, &m, &l, &h, check(None)));
        let c: CommittedMetadata = serde_json::from_value(v).unwrap();
        assert_eq!(c.metadata_path, dir.path().join("pool").join("metadata"));
        assert_eq!(c.transaction_id, p.status().unwrap().transaction_id);
        assert_eq!(c.held_root, None);
        let v = ok(handle(
            &p,
            &m,
            &l,
            &h,
            check(Some(MetadataSnapStep::Reserve)),
        ));
        let c: CommittedMetadata = serde_json::from_value(v).unwrap();
        let held = c.held_root.expect("a held root");
        assert_eq!(p.status().unwrap().held_root, Some(held));
        let busy = handle(&p, &m, &l, &h, check(Some(MetadataSnapStep::Reserve)));
        assert!(
            matches!(
                &busy,
                Response::Error {
                    kind: ErrorKind::Busy,
                    ..
                }
            ),
            "{busy:?}"
        );
        let wrong = MetadataSnapStep::Release {
            held_root: held + 1,
        };
        let r = handle(&p, &m, &l, &h, check(Some(wrong)));
        assert!(
            matches!(
                &r,
                Response::Error {
                    kind: ErrorKind::InvalidArgument,
                    ..
                }
            ),
            "{r:?}"
        );
        let release = MetadataSnapStep::Release { held_root: held };
        ok(handle(&p, &m, &l, &h, check(Some(release))));
        assert_eq!(p.status().unwrap().held_root, None);
        let v = ok(handle(&p, &m, &l, &h, Request::PoolStatus));
        assert_eq!(v["total_data_blocks"], 128 * 16);
        assert_eq!(v["volumes"], 1);
        p.close().unwrap();
    }

    #[test]
    fn errors_keep_kind_and_message() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(dir.path());
        let m = Mounts::load(dir.path());
        let l = Layers::default();
        let h = hello();
        let r = handle(&p, &m, &l, &h, Request::VolumeRemove { name: "zz".into() });
        let expected = p.remove_volume("zz").unwrap_err();
        assert_eq!(
            r,
            Response::Error {
                kind: ErrorKind::NotFound,
                message: expected.to_string()
            }
        );
        handle(
            &p,
            &m,
            &l,
            &h,
            Request::VolumeCreate {
                name: "a".into(),
                size: 1 << 20,
            },
        );
        let r = handle(
            &p,
            &m,
            &l,
            &h,
            Request::VolumeCreate {
                name: "a".into(),
                size: 1 << 20,
            },
        );
        assert!(
            matches!(&r, Response::Error { kind: ErrorKind::Exists, message } if message.contains("already exists")),
            "{r:?}"
        );
        let r = handle(
            &p,
            &m,
            &l,
            &h,
            Request::VolumeCreate {
                name: "b".into(),
                size: 0,
            },
        );
        assert!(
            matches!(
                r,
                Response::Error {
                    kind: ErrorKind::InvalidArgument,
                    ..
                }
            ),
            "{r:?}"
        );
        p.close().unwrap();
    }

    #[test]
    fn attach_without_the_fuse_export_and_layer_requests_without_a_store_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(dir.path());
        let m = Mounts::load(dir.path());
        let l = Layers::default();
        let h = hello();
        p.create_volume("a", 1 << 20).unwrap();
        let r = handle(
            &p,
            &m,
            &l,
            &h,
            Request::VolumeAttach {
                name: "a".into(),
                read_only: false,
            },
        );
        assert!(
            matches!(&r, Response::Error { message, .. } if message.contains("FUSE")),
            "{r:?}"
        );
        let r = handle(&p, &m, &l, &h, Request::SnapshotList);
        assert!(
            matches!(&r, Response::Error { message, .. } if message.contains("layer store is not open")),
            "{r:?}"
        );
        p.close().unwrap();
    }

    #[test]
    fn layer_store_volumes_are_listed_and_not_removed_as_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let p = std::sync::Arc::new(pool(dir.path()));
        let m = Mounts::load(dir.path());
        let l = Layers::default();
        let h = hello();
        let labels = [
            ("layer.key".to_string(), "sha256:abc".to_string()),
            ("layer.kind".to_string(), "committed".to_string()),
        ];
        p.create_labeled("layer-1", 1 << 20, None, labels.into())
            .unwrap();
        let store = thinpool_layers::LayerStore::open(p.clone(), Default::default()).unwrap();
        l.set(std::sync::Arc::new(store));
        let r = handle(&p, &m, &l, &h, Request::SnapshotList);
        let Response::Ok { value } = r else {
            panic!("{r:?}")
        };
        assert_eq!(value[0]["key"], "sha256:abc");
        assert_eq!(value[0]["kind"], "committed");
        assert_eq!(value[0]["volume"], "layer-1");
        let r = handle(
            &p,
            &m,
            &l,
            &h,
            Request::VolumeRemove {
                name: "layer-1".into(),
            },
        );
        assert!(
            matches!(&r, Response::Error { kind: ErrorKind::Busy, message } if message.contains("thinpool snapshot rm sha256:abc")),
            "{r:?}"
        );
        let r = handle(
            &p,
            &m,
            &l,
            &h,
            Request::SnapshotRemove { key: "nope".into() },
        );
        assert!(
            matches!(
                &r,
                Response::Error {
                    kind: ErrorKind::NotFound,
                    ..
                }
            ),
            "{r:?}"
        );
        let r = handle(
            &p,
            &m,
            &l,
            &h,
            Request::SnapshotRemove {
                key: "sha256:abc".into(),
            },
        );
        assert!(matches!(&r, Response::Ok { .. }), "{r:?}");
        assert!(p.volumes().unwrap().is_empty());
        drop(l.take());
        std::sync::Arc::try_unwrap(p).ok().unwrap().close().unwrap();
    }

    /// A snapshot left held by an earlier run (a daemon or a check that died) is released at
    /// the next reserve instead of making every later check busy.
    #[test]
    fn a_snapshot_an_earlier_run_left_held_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(dir.path());
        let left = p.reserve_metadata_snap().unwrap();
        assert_eq!(p.held_metadata_snap(), Some((left, true)));
        p.close().unwrap();
        let p = Pool::open(dir.path(), PoolOptions::default()).unwrap();
        assert_eq!(p.held_metadata_snap(), Some((left, false)));
        let (m, l, h) = (Mounts::load(dir.path()), Layers::default(), hello());
        let reserve = Request::PoolCheck {
            metadata_snap: Some(MetadataSnapStep::Reserve),
        };
        let Response::Ok { value } = handle(&p, &m, &l, &h, reserve) else {
            panic!("reserve refused");
        };
        let c: CommittedMetadata = serde_json::from_value(value).unwrap();
        let held = c.held_root.expect("a held root");
        assert_eq!(p.held_metadata_snap(), Some((held, true)));
        let release = Request::PoolCheck {
            metadata_snap: Some(MetadataSnapStep::Release { held_root: held }),
        };
        assert!(matches!(
            handle(&p, &m, &l, &h, release),
            Response::Ok { .. }
        ));
        assert_eq!(p.held_metadata_snap(), None);
        p.close().unwrap();
    }
}
