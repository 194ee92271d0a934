//! containerd's snapshots API over a real unix socket: a tonic client generated from the same
//! proto against a `Server` over the in-memory model.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use common::{Harness, labels};
use prost_types::FieldMask;
use thinpool_snapshotter::Server;
use thinpool_snapshotter::proto::containerd::services::snapshots::v1 as api;
use tonic::Code;

fn prepare(key: &str, parent: &str) -> api::PrepareSnapshotRequest {
    api::PrepareSnapshotRequest {
        snapshotter: "ignored".into(),
        key: key.into(),
        parent: parent.into(),
        labels: Default::default(),
    }
}

fn commit(name: &str, key: &str) -> api::CommitSnapshotRequest {
    api::CommitSnapshotRequest {
        snapshotter: String::new(),
        name: name.into(),
        key: key.into(),
        labels: Default::default(),
    }
}

fn stat_req(key: &str) -> api::StatSnapshotRequest {
    api::StatSnapshotRequest {
        snapshotter: String::new(),
        key: key.into(),
    }
}

fn to_time(ts: Option<prost_types::Timestamp>) -> SystemTime {
    let ts = ts.expect("timestamp present");
    SystemTime::UNIX_EPOCH + Duration::new(ts.seconds as u64, ts.nanos as u32)
}

#[test]
fn round_trips() {
    let h = Harness::new();
    let mut c = h.client();
    h.rt.block_on(async {
        let before = SystemTime::now() - Duration::from_secs(1);

        // Prepare an empty active snapshot: the model's mounts come back as they are.
        let mut req = prepare("base-active", "");
        req.labels = labels(&[("stage", "unpack")]);
        let mounts = c.prepare(req).await.unwrap().into_inner().mounts;
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].r#type, "ext4");
        assert_eq!(mounts[0].source, "/dev/model/base-active");
        assert_eq!(mounts[0].options, vec!["rw", "discard"]);
        assert_eq!(mounts[0].target, "");

        let info = c
            .stat(stat_req("base-active"))
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(info.name, "base-active");
        assert_eq!(info.parent, "");
        assert_eq!(info.kind, api::Kind::Active as i32);
        assert_eq!(info.labels, labels(&[("stage", "unpack")]));
        assert!(to_time(info.created_at) >= before);
        assert!(to_time(info.updated_at) >= before);

        let mounts = c
            .mounts(api::MountsRequest {
                snapshotter: String::new(),
                key: "base-active".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .mounts;
        assert_eq!(mounts[0].source, "/dev/model/base-active");

        // Commit with labels; the key is gone, the name is committed.
        let mut req = commit("base", "base-active");
        req.labels = labels(&[("containerd.io/snapshot.ref", "sha256:abc")]);
        c.commit(req).await.unwrap();
        let err = c.stat(stat_req("base-active")).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        let info = c
            .stat(stat_req("base"))
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(info.kind, api::Kind::Committed as i32);
        assert_eq!(
            info.labels,
            labels(&[("containerd.io/snapshot.ref", "sha256:abc")])
        );

        // A child and a view over the committed one.
        c.prepare(prepare("child", "base")).await.unwrap();
        let view = c
            .view(api::ViewSnapshotRequest {
                snapshotter: String::new(),
                key: "ro".into(),
                parent: "base".into(),
                labels: labels(&[("v", "1")]),
            })
            .await
            .unwrap()
            .into_inner()
            .mounts;
        assert_eq!(view[0].options, vec!["ro", "discard"]);
        let info = c
            .stat(stat_req("ro"))
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(
            (info.kind, info.parent.as_str()),
            (api::Kind::View as i32, "base")
        );
        let info = c
            .stat(stat_req("child"))
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(
            (info.kind, info.parent.as_str()),
            (api::Kind::Active as i32, "base")
        );

        // Usage as the model computes it.
        let u = c
            .usage(api::UsageRequest {
                snapshotter: String::new(),
                key: "base".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((u.size, u.inodes), (4096 * 4, 1));

        // Update: one label by path, all labels with "labels", all with no mask.
        let update = |labels, paths: &[&str]| api::UpdateSnapshotRequest {
            snapshotter: String::new(),
            info: Some(api::Info {
                name: "base".into(),
                labels,
                ..Default::default()
            }),
            update_mask: if paths.is_empty() {
                None
            } else {
                Some(FieldMask {
                    paths: paths.iter().map(|p| p.to_string()).collect(),
                })
            },
        };
        let info = c
            .update(update(labels(&[("a", "1"), ("b", "2")]), &["labels.a"]))
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(
            info.labels,
            labels(&[("a", "1"), ("containerd.io/snapshot.ref", "sha256:abc")])
        );
        assert_eq!(
            info.kind,
            api::Kind::Committed as i32,
            "kind is not updatable"
        );
        let info = c
            .update(update(labels(&[]), &["labels.containerd.io/snapshot.ref"]))
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(
            info.labels,
            labels(&[("a", "1")]),
            "labels.KEY absent: removed"
        );
        let info = c
            .update(update(labels(&[("x", "y")]), &["labels"]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.info.unwrap().labels, labels(&[("x", "y")]));
        let info = c
            .update(update(labels(&[("z", "")]), &[]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            info.info.unwrap().labels,
            labels(&[]),
            "empty values are dropped"
        );

        // List: everything, in one message.
        let mut stream = c
            .list(api::ListSnapshotsRequest {
                snapshotter: String::new(),
                filters: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        let mut names = Vec::new();
        while let Some(msg) = stream.message().await.unwrap() {
            names.extend(msg.info.into_iter().map(|i| i.name));
        }
        names.sort();
        assert_eq!(names, vec!["base", "child", "ro"]);

        // Remove the leaves, then the base; Cleanup reaches the model.
        for key in ["child", "ro", "base"] {
            c.remove(api::RemoveSnapshotRequest {
                snapshotter: String::new(),
                key: key.into(),
            })
            .await
            .unwrap();
        }
        c.cleanup(api::CleanupRequest {
            snapshotter: "x".into(),
        })
        .await
        .unwrap();
    });
    assert_eq!(h.model.cleanups.load(Ordering::SeqCst), 1);
    assert!(h.model.list_is_empty());
}

#[test]
fn error_codes() {
    let h = Harness::new();
    let mut c = h.client();
    h.rt.block_on(async {
        c.prepare(prepare("a", "")).await.unwrap();
        c.commit(commit("base", "a")).await.unwrap();
        c.prepare(prepare("active", "base")).await.unwrap();
        c.view(api::ViewSnapshotRequest {
            key: "view".into(),
            parent: "base".into(),
            ..Default::default()
        })
        .await
        .unwrap();

        let code = |r: Result<(), tonic::Status>| -> (Code, String) {
            let e = r.unwrap_err();
            (e.code(), e.message().to_owned())
        };
        macro_rules! fails {
            ($call:expr) => {
                code($call.await.map(|_| ()))
            };
        }

        // NotFound, with the model's message as it is.
        let (c1, m) = fails!(c.stat(stat_req("nope")));
        assert_eq!((c1, m.as_str()), (Code::NotFound, "snapshot nope"));
        assert_eq!(fails!(c.prepare(prepare("x", "missing"))).0, Code::NotFound);
        assert_eq!(fails!(c.commit(commit("n", "missing"))).0, Code::NotFound);
        assert_eq!(
            fails!(c.remove(api::RemoveSnapshotRequest {
                key: "missing".into(),
                ..Default::default()
            }))
            .0,
            Code::NotFound
        );
        assert_eq!(
            fails!(c.usage(api::UsageRequest {
                key: "missing".into(),
                ..Default::default()
            }))
            .0,
            Code::NotFound
        );

        // AlreadyExists.
        assert_eq!(
            fails!(c.prepare(prepare("active", "base"))).0,
            Code::AlreadyExists
        );
        assert_eq!(
            fails!(c.commit(commit("base", "active"))).0,
            Code::AlreadyExists
        );

        // FailedPrecondition: parent not committed, commit of a view, remove with children,
        // mounts of a committed snapshot.
        assert_eq!(
            fails!(c.prepare(prepare("x", "active"))).0,
            Code::FailedPrecondition
        );
        assert_eq!(
            fails!(c.commit(commit("n", "view"))).0,
            Code::FailedPrecondition
        );
        let (c1, m) = fails!(c.remove(api::RemoveSnapshotRequest {
            key: "base".into(),
            ..Default::default()
        }));
        assert_eq!(
            (c1, m.as_str()),
            (
                Code::FailedPrecondition,
                "cannot remove snapshot base with children"
            )
        );
        assert_eq!(
            fails!(c.mounts(api::MountsRequest {
                key: "base".into(),
                ..Default::default()
            }))
            .0,
            Code::FailedPrecondition
        );

        // InvalidArgument: empty keys and names, missing info, fields that cannot be updated.
        assert_eq!(fails!(c.prepare(prepare("", ""))).0, Code::InvalidArgument);
        assert_eq!(fails!(c.stat(stat_req(""))).0, Code::InvalidArgument);
        assert_eq!(
            fails!(c.commit(commit("", "active"))).0,
            Code::InvalidArgument
        );
        assert_eq!(fails!(c.commit(commit("n", ""))).0, Code::InvalidArgument);
        assert_eq!(
            fails!(c.update(api::UpdateSnapshotRequest::default())).0,
            Code::InvalidArgument
        );
        for path in ["parent", "name", "kind", "labels.", "created_at"] {
            let req = api::UpdateSnapshotRequest {
                snapshotter: String::new(),
                info: Some(api::Info {
                    name: "base".into(),
                    parent: "other".into(),
                    ..Default::default()
                }),
                update_mask: Some(FieldMask {
                    paths: vec!["labels.a".into(), path.into()],
                }),
            };
            assert_eq!(fails!(c.update(req)).0, Code::InvalidArgument, "{path}");
        }
        // Nothing changed through the refused updates.
        let info = c
            .stat(stat_req("base"))
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!((info.parent.as_str(), info.labels.len()), ("", 0));
    });
}

/// Names of a List answer, sorted, and how many messages carried them.
fn list(h: &Harness, filters: &[&str]) -> Result<(Vec<String>, usize), tonic::Status> {
    let mut c = h.client();
    h.rt.block_on(async {
        let mut stream = c
            .list(api::ListSnapshotsRequest {
                snapshotter: String::new(),
                filters: filters.iter().map(|f| f.to_string()).collect(),
            })
            .await?
            .into_inner();
        let (mut names, mut messages) = (Vec::new(), 0);
        while let Some(msg) = stream.message().await? {
            messages += 1;
            names.extend(msg.info.into_iter().map(|i| i.name));
        }
        names.sort();
        Ok((names, messages))
    })
}

fn names(h: &Harness, filters: &[&str]) -> Vec<String> {
    list(h, filters)
        .unwrap_or_else(|e| panic!("{filters:?}: {e}"))
        .0
}

#[test]
fn list_filters() {
    let h = Harness::new();
    let mut c = h.client();
    h.rt.block_on(async {
        let mut req = prepare("l1-key", "");
        req.labels = labels(&[("containerd.io/snapshot.ref", "sha256:111")]);
        c.prepare(req).await.unwrap();
        let mut req = commit("layer1", "l1-key");
        req.labels = labels(&[
            ("containerd.io/snapshot.ref", "sha256:111"),
            ("containerd.io/gc.root", "2024"),
            ("tier", "base"),
        ]);
        c.commit(req).await.unwrap();
        let mut req = prepare("ctr-a", "layer1");
        req.labels = labels(&[("tier", "app"), ("owner", "alice smith")]);
        c.prepare(req).await.unwrap();
        let mut req = prepare("ctr-b", "layer1");
        req.labels = labels(&[("tier", "app"), ("a.b", "dotted")]);
        c.prepare(req).await.unwrap();
        c.view(api::ViewSnapshotRequest {
            key: "peek".into(),
            parent: "layer1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    });

    let all = ["ctr-a", "ctr-b", "layer1", "peek"];
    assert_eq!(names(&h, &[]), all);
    assert_eq!(names(&h, &[""]), all);
    assert_eq!(names(&h, &["name==ctr-a"]), ["ctr-a"]);
    assert_eq!(names(&h, &["name!=ctr-a"]), ["ctr-b", "layer1", "peek"]);
    assert_eq!(names(&h, &["kind==committed"]), ["layer1"]);
    assert_eq!(names(&h, &["kind==view"]), ["peek"]);
    assert_eq!(
        names(&h, &["parent==layer1,kind==active"]),
        ["ctr-a", "ctr-b"]
    );
    // OR of filters, AND inside one.
    assert_eq!(names(&h, &["kind==view", "name==ctr-b"]), ["ctr-b", "peek"]);
    assert_eq!(
        names(&h, &["kind==active,labels.a.b", "kind==committed"]),
        ["ctr-b", "layer1"]
    );
    assert_eq!(
        names(&h, &["kind==active,name==layer1"]),
        Vec::<String>::new()
    );
    // Labels: presence, equality, quoted keys with dots and slashes, quoted values, regexps.
    assert_eq!(names(&h, &["labels.tier"]), ["ctr-a", "ctr-b", "layer1"]);
    assert_eq!(names(&h, &["labels.tier==app"]), ["ctr-a", "ctr-b"]);
    assert_eq!(
        names(&h, &[r#"labels."containerd.io/gc.root""#]),
        ["layer1"]
    );
    assert_eq!(
        names(&h, &[r#"labels."containerd.io/snapshot.ref"==sha256:111"#]),
        ["layer1"]
    );
    assert_eq!(names(&h, &[r#"labels.owner=="alice smith""#]), ["ctr-a"]);
    assert_eq!(names(&h, &[r#"labels."a.b"==dotted"#]), ["ctr-b"]);
    assert_eq!(names(&h, &["labels.a.b==dotted"]), ["ctr-b"]);
    assert_eq!(names(&h, &["labels.tier!=app"]), ["layer1", "peek"]);
    assert_eq!(names(&h, &["name~=^ctr-"]), ["ctr-a", "ctr-b"]);
    assert_eq!(
        names(
            &h,
            &[r#"labels."containerd.io/snapshot.ref"~=/^sha256:1+$/"#]
        ),
        ["layer1"]
    );
    assert_eq!(
        names(&h, &[" labels . tier == app , name ~= b$ "]),
        ["ctr-b"]
    );

    // Malformed filters and unknown fields: InvalidArgument, even next to a good filter.
    for bad in [
        "nme==ctr-a",
        "labels",
        "name=ctr-a",
        "name==",
        "name==a,",
        r#"labels."unterminated==x"#,
        "name~=(",
        "name==a b",
        "==x",
    ] {
        let err = list(&h, &["kind==view", bad]).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err}");
    }
}

#[test]
fn list_streams_in_batches() {
    let h = Harness::new();
    let mut c = h.client();
    h.rt.block_on(async {
        for i in 0..260 {
            c.prepare(prepare(&format!("s{i:03}"), "")).await.unwrap();
        }
    });
    let (all, messages) = list(&h, &[]).unwrap();
    assert_eq!(all.len(), 260);
    assert_eq!(all.first().map(String::as_str), Some("s000"));
    assert_eq!(all.last().map(String::as_str), Some("s259"));
    assert_eq!(messages, 3, "100 + 100 + 60");
    let (some, messages) = list(&h, &["name~=^s1"]).unwrap();
    assert_eq!((some.len(), messages), (100, 1));
    let (none, messages) = list(&h, &["name==nope"]).unwrap();
    assert_eq!((none.len(), messages), (0, 0));
}

#[test]
fn panic_is_internal_and_the_server_goes_on() {
    let h = Harness::new();
    let mut c = h.client();
    h.rt.block_on(async {
        for _ in 0..3 {
            let err = c.prepare(prepare("panic", "")).await.unwrap_err();
            assert_eq!(err.code(), Code::Internal);
            assert!(
                err.message().contains("the model was asked to panic"),
                "{}",
                err.message()
            );
        }
        c.prepare(prepare("fine", "")).await.unwrap();
        c.stat(stat_req("fine")).await.unwrap();
    });
    // A new connection is served too.
    let mut c2 = h.client();
    h.rt.block_on(async { c2.stat(stat_req("fine")).await.unwrap() });
}

#[test]
fn socket_mode_stale_socket_and_stop() {
    let mut h = Harness::new();
    let meta = std::fs::metadata(&h.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // A second server on a live socket is refused, and the first one keeps it.
    let err = Server::start(&h.socket, h.model.clone()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    let mut c = h.client();
    h.rt.block_on(async { c.prepare(prepare("k", "")).await.unwrap() });

    // Stop with a client still connected: prompt, and the socket file is gone.
    let t = Instant::now();
    h.server.take().unwrap().stop();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t.elapsed()
    );
    assert!(!h.socket.exists());
    let err =
        h.rt.block_on(async { c.stat(stat_req("k")).await.unwrap_err() });
    assert_eq!(err.code(), Code::Unavailable);

    // A stale socket (bound, nobody listening) is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&h.socket).unwrap();
    drop(stale);
    assert!(h.socket.exists());
    let server = Server::start(&h.socket, h.model.clone()).unwrap();
    let mut c = h.client();
    h.rt.block_on(async { c.stat(stat_req("k")).await.unwrap() });
    assert_eq!(
        std::fs::metadata(&h.socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    drop(server); // dropping stops too
    assert!(!h.socket.exists());

    // Something else than a socket at the path is left alone.
    std::fs::write(&h.socket, b"not a socket").unwrap();
    let err = Server::start(&h.socket, h.model.clone()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&h.socket).unwrap(), b"not a socket");

    // A path in a missing directory is an error, not a panic.
    assert!(Server::start(&h.dir.path().join("no/such/dir.sock"), h.model.clone()).is_err());
}

#[test]
fn concurrent_clients() {
    let h = Harness::new();
    h.rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..8 {
            let mut c = common::connect(&h.socket).await;
            tasks.push(tokio::spawn(async move {
                for i in 0..20 {
                    c.prepare(prepare(&format!("t{t}-{i}"), "")).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert_eq!(list(&h, &[]).unwrap().0.len(), 160);
}

#[test]
fn stop_waits_for_calls_in_flight() {
    let mut h = Harness::new();
    let mut c = h.client();
    let call =
        h.rt.spawn(async move { c.prepare(prepare("slow", "")).await });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !h.model.slow_started.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the slow call never reached the model"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = Instant::now();
    h.server.take().unwrap().stop();
    let took = t.elapsed();
    let answer = h.rt.block_on(call).unwrap();
    assert!(
        answer.is_ok(),
        "the call in flight was answered: {answer:?}"
    );
    assert!(
        took >= Duration::from_millis(400),
        "stop waited for it: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(h.model.stat_ok("slow"));
    assert!(!h.socket.exists());
}
