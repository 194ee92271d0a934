//! The control server over its real socket.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};

use thinpool_control::{Client, ErrorKind, Request, Response};
use thinpool_daemon::{Daemon, DaemonOptions, Error};
use thinpool_engine::{Pool, PoolOptions};

use crate::make_pool;

fn started() -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    make_pool(dir.path());
    let d = Daemon::start(dir.path(), DaemonOptions::default()).expect("start the daemon");
    (dir, d)
}

#[test]
fn socket_is_0600_and_removed_on_stop() {
    let (dir, d) = started();
    let sock = dir.path().join("control.sock");
    assert_eq!(d.socket_path(), sock);
    let m = sock.symlink_metadata().unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    let mut c = Client::connect(&sock).unwrap();
    assert_eq!(c.daemon().pid, std::process::id());
    assert_eq!(c.daemon().root, dir.path());
    c.create_volume("a", 1 << 20).unwrap();
    drop(c);
    d.stop().unwrap();
    assert!(!sock.exists(), "the socket is removed on stop");
    // The pool was closed: it opens again, with the volume.
    let p = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    assert_eq!(p.volume_info("a").unwrap().size, 1 << 20);
    p.close().unwrap();
    // No daemon now: the client says so.
    assert!(Client::connect_if_running(&sock).unwrap().is_none());
}

#[test]
fn a_second_daemon_is_refused_with_the_first_ones_pid() {
    let (dir, d) = started();
    let e = Daemon::start(dir.path(), DaemonOptions::default())
        .err()
        .expect("a second daemon on the same root must fail");
    assert!(
        matches!(e, Error::AlreadyRunning { pid, .. } if pid == std::process::id()),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "another thinpool daemon is serving {} (pid {})",
            dir.path().display(),
            std::process::id()
        )
    );
    // The first one is unharmed.
    let mut c = Client::connect(d.socket_path()).unwrap();
    c.pool_status().unwrap();
    drop(c);
    d.stop().unwrap();
}

#[test]
fn a_held_lock_without_a_daemon_gives_the_lock_error() {
    let dir = tempfile::tempdir().unwrap();
    make_pool(dir.path());
    let p = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let e = Daemon::start(dir.path(), DaemonOptions::default())
        .err()
        .expect("the pool is held");
    assert!(matches!(e, Error::Pool { .. }), "{e:?}");
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(chain.contains("in use"), "{chain}");
    assert!(!dir.path().join("control.sock").exists());
    p.close().unwrap();
}

#[test]
fn a_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    make_pool(dir.path());
    let sock = dir.path().join("control.sock");
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let d = Daemon::start(dir.path(), DaemonOptions::default()).unwrap();
    let mut c = Client::connect(&sock).unwrap();
    assert!(c.volumes().unwrap().is_empty());
    drop(c);
    d.stop().unwrap();
    assert!(!sock.exists());
}

#[test]
fn a_file_at_the_socket_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    make_pool(dir.path());
    let sock = dir.path().join("control.sock");
    std::fs::write(&sock, b"keep me").unwrap();
    let e = Daemon::start(dir.path(), DaemonOptions::default())
        .err()
        .expect("a regular file at control.sock");
    assert!(matches!(e, Error::NotASocket { .. }), "{e:?}");
    assert!(e.to_string().contains("is not a socket"), "{e}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"keep me");
    // The pool was let go.
    Pool::open(dir.path(), PoolOptions::default())
        .unwrap()
        .close()
        .unwrap();
}

/// Raw lines, to send what the client would never send.
fn raw(d: &Daemon) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(d.socket_path()).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

fn answer(r: &mut BufReader<UnixStream>) -> Option<Response> {
    let mut line = String::new();
    if r.read_line(&mut line).unwrap() == 0 {
        return None;
    }
    Some(serde_json::from_str(&line).expect("the daemon answers JSON"))
}

#[test]
fn bad_requests_get_protocol_errors() {
    let (_dir, d) = started();
    let (mut w, mut r) = raw(&d);
    w.write_all(b"{\"op\":\"format_everything\"}\n").unwrap();
    let a = answer(&mut r).unwrap();
    assert!(
        matches!(&a, Response::Error { kind: ErrorKind::Protocol, message } if message.contains("malformed request")),
        "{a:?}"
    );
    // The connection goes on after a malformed request.
    w.write_all(b"\n{\"op\":\"volume_list\"}\n").unwrap();
    assert_eq!(
        answer(&mut r).unwrap(),
        Response::Ok {
            value: serde_json::json!([])
        }
    );
    // A line past the limit is refused and the connection closed.
    let long = vec![b'x'; thinpool_control::MAX_REQUEST_LEN + 10];
    w.write_all(&long).unwrap();
    let a = answer(&mut r).unwrap();
    assert!(
        matches!(&a, Response::Error { kind: ErrorKind::Protocol, message } if message.contains("longer than")),
        "{a:?}"
    );
    assert!(answer(&mut r).is_none());
    d.stop().unwrap();
}

#[test]
fn engine_errors_reach_the_client_with_their_kind() {
    let (_dir, d) = started();
    let mut c = Client::connect(d.socket_path()).unwrap();
    let e = c.remove_volume("nope").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(
        e.to_string(),
        d.pool().remove_volume("nope").unwrap_err().to_string()
    );
    c.create_volume("a", 1 << 20).unwrap();
    assert_eq!(
        c.create_volume("a", 1 << 20).unwrap_err().kind(),
        ErrorKind::Exists
    );
    assert_eq!(
        c.resize_volume("a", 0, false).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        c.grow(Some(1 << 20), None).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    // An open volume handle (a front-end's) keeps it from being removed.
    let v = d.pool().open_volume("a").unwrap();
    assert_eq!(c.remove_volume("a").unwrap_err().kind(), ErrorKind::Busy);
    drop(v);
    c.remove_volume("a").unwrap();
    drop(c);
    d.stop().unwrap();
}

#[test]
fn concurrent_clients() {
    let (_dir, d) = started();
    let sock = d.socket_path().to_path_buf();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&sock).unwrap();
                for i in 0..5 {
                    let name = format!("v{t}-{i}");
                    c.create_volume(&name, 1 << 20).unwrap();
                    c.snapshot(&name, &format!("{name}-snap")).unwrap();
                    c.resize_volume(&name, 2 << 20, false).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut c = Client::connect(&sock).unwrap();
    let vols = c.volumes().unwrap();
    assert_eq!(vols.len(), 80);
    let st = c.pool_status().unwrap();
    // The engine counts thin volumes and snapshots apart.
    assert_eq!((st.volumes, st.snapshots), (40, 40));
    d.stop().unwrap();
    // The client's connection was closed by the stop.
    assert!(c.commit().is_err());
}

#[test]
fn stop_does_not_wait_for_idle_clients() {
    let (_dir, d) = started();
    // Connected and silent: must not keep stop from returning.
    let (_w, mut r) = raw(&d);
    let _c = Client::connect(d.socket_path()).unwrap();
    d.stop().unwrap();
    assert!(answer(&mut r).is_none());
}

#[test]
fn stop_reports_a_pool_still_shared() {
    let (dir, d) = started();
    let held = d.pool();
    let e = d.stop().unwrap_err();
    assert!(
        matches!(e, Error::PoolStillShared { holders: 1, .. }),
        "{e:?}"
    );
    // The socket is gone all the same, and the pool closes when the last handle goes.
    assert!(!dir.path().join("control.sock").exists());
    drop(held);
    Pool::open(dir.path(), PoolOptions::default())
        .unwrap()
        .close()
        .unwrap();
}

#[test]
fn commit_and_hello_requests() {
    let (_dir, d) = started();
    let mut c = Client::connect(d.socket_path()).unwrap();
    c.commit().unwrap();
    let v = c
        .call(&Request::Hello {
            protocol: thinpool_control::PROTOCOL_VERSION,
        })
        .unwrap();
    assert_eq!(v["pid"], std::process::id());
    assert_eq!(v["protocol"], thinpool_control::PROTOCOL_VERSION);
    drop(c);
    d.stop().unwrap();
}
