//! Bounded resources of the NBD server (issue 15): about 1 000 connections used to abort
//! `thinpool nbd serve` (exit 134, "failed to set up alternative stack guard page: Cannot
//! allocate memory": 16 threads per connection ran into the memory map limit), and a client
//! that never spoke held its threads forever. Now `--max-connections` closes the clients past
//! the limit at once, `--handshake-timeout` closes the ones that do not finish the handshake,
//! and a connection starts with one thread, adding workers only while its client pipelines.
//! Raw sockets and the hand-written client play the clients; `nbdinfo` and `qemu-io` check
//! that the server still serves.

// NBD is big-endian on the wire.
#![allow(clippy::big_endian_bytes)]

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use thinpool_tests::nbd::*;
use thinpool_tests::{require_tools, run, tool};

/// Threads of process `pid`.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What the server does to a fresh connection within `wait`: `Some(true)` it greets (18
/// bytes, the NBD magic), `Some(false)` it closes, `None` it says nothing.
fn greeted(s: &mut UnixStream, wait: Duration) -> Option<bool> {
    s.set_read_timeout(Some(wait)).expect("set timeout");
    let mut g = [0u8; 18];
    let mut got = 0;
    while got < g.len() {
        match s.read(&mut g[got..]) {
            Ok(0) => return Some(false),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Some(false),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None;
            }
            Err(e) => panic!("reading the greeting: {e}"),
        }
    }
    assert_eq!(&g[..8], &NBDMAGIC.to_be_bytes(), "greeting magic");
    Some(true)
}

/// Wait (up to `wait`) for the server to close `s`; returns how long it took, `None` if it
/// stayed open.
fn closed_within(s: &mut UnixStream, wait: Duration) -> Option<Duration> {
    let t = Instant::now();
    s.set_read_timeout(Some(wait)).expect("set timeout");
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Some(t.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Some(t.elapsed()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None;
            }
            Err(e) => panic!("waiting for the server to close: {e}"),
        }
    }
}

/// `nbdinfo --size` of the export `uri`: the size, or `None` if it failed.
fn nbdinfo_size(uri: &str) -> Option<u64> {
    let out = run(tool("nbdinfo").args(["--size", uri]));
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// `nbdinfo` until it succeeds (the server frees a place only when it has seen the client
/// leave), for up to 10 s.
fn nbdinfo_eventually(uri: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(n) = nbdinfo_size(uri) {
            return n;
        }
        assert!(Instant::now() < deadline, "nbdinfo {uri} kept failing");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn connect(sock: &Path) -> UnixStream {
    UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()))
}

#[test]
fn connection_limit_refuses_the_extra_clients_and_serves_on() {
    if !require_tools(&["nbdinfo", "thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("v", "64M")]);
    // A long handshake deadline: the two clients left handshaking keep their places.
    let srv = r.serve(&["--max-connections", "4", "--handshake-timeout", "120"]);
    let sock = srv.socket.clone().expect("unix socket");
    // Four clients: two in transmission, two still handshaking (they count too).
    let mut held: Vec<RawClient> = (0..2)
        .map(|_| {
            let mut c = RawClient::connect(&sock, 3);
            c.go("v");
            c
        })
        .collect();
    held.push(RawClient::connect(&sock, 3));
    held.push(RawClient::connect(&sock, 3));
    // A burst of 20 more: each is closed without a greeting.
    for i in 0..20 {
        let mut s = connect(&sock);
        assert_eq!(
            greeted(&mut s, Duration::from_secs(10)),
            Some(false),
            "client {} past the limit of 4 was not closed at once",
            i + 5
        );
    }
    assert_eq!(
        nbdinfo_size(&srv.uri("v")),
        None,
        "nbdinfo served past the limit"
    );
    // The clients inside the limit are served on.
    let data = vec![0x5a; 4096];
    held[0].request(CMD_WRITE, 0, 7, 0, 4096, &data);
    assert_eq!(held[0].simple_reply(), (0, 7));
    held[1].request(CMD_READ, 0, 8, 0, 4096, &[]);
    assert_eq!(held[1].simple_reply(), (0, 8));
    assert_eq!(held[1].read_n(4096), data);
    // One leaves: a real client gets its place.
    held.truncate(3);
    assert_eq!(nbdinfo_eventually(&srv.uri("v")), 64 << 20);
    let log = srv.log_text();
    let reports = log.matches("connection limit reached").count();
    assert_eq!(
        reports, 1,
        "a burst of refusals is reported once, got {reports}:\n{log}"
    );
    assert!(log.contains("accepting connections again"), "{log}");
    drop(held);
    srv.stop();
    r.thin_check();
}

#[test]
fn handshake_deadline_closes_silent_and_trickling_clients() {
    if !require_tools(&["qemu-io", "thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("v", "64M")]);
    let srv = r.serve(&["--handshake-timeout", "3"]);
    let sock = srv.socket.clone().expect("unix socket");
    // In transmission before the deadline: kept however long it stays idle.
    let mut established = RawClient::connect(&sock, 3);
    established.go("v");
    // Connected, greeted, and then silent: closed after the deadline, not before.
    let t = Instant::now();
    let mut silent = connect(&sock);
    assert_eq!(greeted(&mut silent, Duration::from_secs(10)), Some(true));
    assert!(
        closed_within(&mut silent, Duration::from_secs(10)).is_some(),
        "a silent client was kept past the 3 s handshake deadline"
    );
    let silent_closed = t.elapsed();
    assert!(
        silent_closed >= Duration::from_millis(2900) && silent_closed < Duration::from_secs(8),
        "a silent client was closed after {silent_closed:?} (deadline 3 s)"
    );
    // A trickle: one byte of an option every 400 ms never finishes the handshake, and must
    // not reset the deadline.
    let mut trickle = RawClient::connect(&sock, 3);
    let mut header = IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&OPT_LIST.to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes());
    let start = Instant::now();
    let mut sent = 0;
    while sent + 1 < header.len() && start.elapsed() < Duration::from_secs(8) {
        if std::io::Write::write_all(&mut trickle.s, &header[sent..sent + 1]).is_err() {
            break;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(400));
    }
    let trickle_closed = start.elapsed();
    assert!(trickle.closed_by_server(), "a trickling client was kept");
    assert!(
        trickle_closed < Duration::from_secs(6),
        "the trickling client was served for {trickle_closed:?} (deadline 3 s)"
    );
    // The established client idled for more than the deadline and is still served.
    std::thread::sleep(Duration::from_millis(500));
    let data = vec![0xa5; 4096];
    established.request(CMD_WRITE, 0, 1, 65536, 4096, &data);
    assert_eq!(established.simple_reply(), (0, 1));
    let out = qemu_io_ok(
        &srv.uri("v"),
        true,
        &["read -P 0xa5 65536 4096".to_string()],
    );
    assert!(out.contains("read 4096/4096"), "{out}");
    let log = srv.log_text();
    assert!(
        log.matches("handshake not finished within 3 s").count() >= 2,
        "the closed handshakes are not logged:\n{log}"
    );
    drop(established);
    srv.stop();
    r.thin_check();
}

#[test]
fn thousand_connections_leave_the_daemon_serving() {
    if !require_tools(&["nbdinfo", "thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("v", "64M")]);
    let srv = r.serve(&[]);
    let sock = srv.socket.clone().expect("unix socket");
    let pid = srv.pid();
    let base = threads(pid);
    let t = Instant::now();
    let mut open: Vec<UnixStream> = (0..1000).map(|_| connect(&sock)).collect();
    let mut admitted: Vec<RawClient> = Vec::new();
    let mut refused = 0;
    for mut s in open.drain(..) {
        match greeted(&mut s, Duration::from_secs(10)) {
            Some(true) => {
                let mut c = RawClient {
                    s: RawSock::Unix(s),
                    server_flags: 3,
                };
                c.send(&3u32.to_be_bytes());
                admitted.push(c);
            }
            Some(false) => refused += 1,
            None => panic!("a connection got neither a greeting nor a close"),
        }
    }
    // The admitted ones pick the export: established connections, one thread each.
    for c in admitted.iter_mut() {
        c.go("v");
    }
    let established = admitted.len();
    let busy_threads = threads(pid);
    let rss = rss_kib(pid);
    eprintln!(
        "1000 connects in {:?}: {established} established, {refused} refused; threads {base} \
         → {busy_threads}, RSS {rss} KiB",
        t.elapsed()
    );
    assert_eq!(refused, 1000 - 256, "the default limit is 256");
    assert!(
        busy_threads <= base + 256 + 4,
        "idle connections take more than one thread each: {base} → {busy_threads}"
    );
    // A client that pipelines gets more workers, at most 16.
    {
        let c = &mut admitted[0];
        let data = vec![0x11u8; 65536];
        for k in 0..64u64 {
            c.request(CMD_WRITE, 0, k, k * 65536, 65536, &data);
        }
        let mut cookies: Vec<u64> = (0..64)
            .map(|_| {
                let (e, k) = c.simple_reply();
                assert_eq!(e, 0, "write {k} failed");
                k
            })
            .collect();
        cookies.sort_unstable();
        assert_eq!(cookies, (0..64).collect::<Vec<u64>>());
    }
    let piped = threads(pid);
    assert!(
        piped <= busy_threads + 15,
        "a connection grew past 16 threads: {busy_threads} → {piped}"
    );
    eprintln!("after a pipelining client: {piped} threads");
    drop(admitted);
    assert_eq!(nbdinfo_eventually(&srv.uri("v")), 64 << 20);
    srv.stop();
    r.thin_check();
}

#[test]
fn up_reads_the_limits_from_its_config_file() {
    if !require_tools(&["thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("v", "64M")]);
    std::fs::write(
        r.root.join("thinpool.toml"),
        "max_connections = 2\nhandshake_timeout = 3\n",
    )
    .expect("write thinpool.toml");
    let sock = r.root.join("nbd.sock");
    let log = r.scratch_dir().join("up.log");
    let srv = Server::start(
        r.cmd(&["up", "--no-fuse", "--no-snapshotter"]),
        log,
        Some(sock.clone()),
        None,
    );
    let mut established = RawClient::connect(&sock, 3);
    established.go("v");
    let t = Instant::now();
    let mut silent = connect(&sock);
    assert_eq!(greeted(&mut silent, Duration::from_secs(10)), Some(true));
    // The third is past max_connections = 2.
    let mut third = connect(&sock);
    assert_eq!(
        greeted(&mut third, Duration::from_secs(10)),
        Some(false),
        "a third client was served with max_connections = 2"
    );
    // handshake_timeout = 3 (not the default 10): the silent one goes, and its place is free
    // again.
    assert!(closed_within(&mut silent, Duration::from_secs(15)).is_some());
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "handshake_timeout = 3 not applied: closed after {:?}",
        t.elapsed()
    );
    let mut fourth = RawClient::connect(&sock, 3);
    fourth.go("v");
    established.request(CMD_FLUSH, 0, 3, 0, 0, &[]);
    assert_eq!(established.simple_reply(), (0, 3));
    drop((established, fourth));
    srv.stop();
    r.thin_check();
}
