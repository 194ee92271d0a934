//! Bounded resources of the NBD server (issue 15): about 1 000 connections used to abort
//! `thinpool nbd serve` (exit 134, "failed to set up alternative stack guard page: Cannot
//! allocate memory": 16 threads per connection ran into the memory map limit), and a client
//! that never spoke held its threads forever. Now `--max-connections` closes the clients past
//! the limit at once, `--handshake-timeout` closes the ones that do not finish the handshake,
//! and a connection starts with one thread, adding workers only while its client pipelines.
//! Raw sockets and the hand-written client play the clients; `nbdinfo` and `qemu-io` check
//! that the server still serves.
//!
//! Memory (issue 15, "memory stays bounded under 10 000 pipelined requests and 1 000
//! connections"): a client that pipelines without reading its replies is stopped by the
//! kernel's socket buffers once the server holds its bounded share of requests in flight,
//! and 1 500-connection floods on the unix socket and on TCP leave a client connected before
//! them served throughout. Each test prints the daemon's RSS and threads.

// NBD is big-endian on the wire.
#![allow(clippy::big_endian_bytes)]

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    greeting(s)
}

/// [`greeted`] for a TCP connection.
fn tcp_greeted(s: &mut TcpStream, wait: Duration) -> Option<bool> {
    s.set_read_timeout(Some(wait)).expect("set timeout");
    greeting(s)
}

/// What the server sends first on `s` (whose read timeout is set): see [`greeted`].
fn greeting(s: &mut impl Read) -> Option<bool> {
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

/// The bytes the tests write at `offset..offset + len` (`seed` tells two data sets apart).
fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|o| ((o >> 12) as u8).wrapping_mul(31) ^ (o as u8) ^ seed)
        .collect()
}

/// Samples `pid`'s RSS (KiB) every 20 ms until dropped; `peak` is the largest seen.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                p.fetch_max(rss_kib(pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        RssSampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bytes past the RSS before them that 16 pipelined 32 MiB reads may take: the 64 MiB a
/// connection may have in flight, and a margin.
const BIG_RSS_BOUND_KIB: u64 = 96 << 10;

/// One pipelined request of [`pipelined_requests_hold_bounded_memory`].
#[derive(Clone, Copy)]
struct Piped {
    write: bool,
    offset: u64,
    len: u32,
}

/// Bytes past idle the daemon's RSS may grow by while a client pipelines (measured: see the
/// test's output; a connection holds at most 16 requests in flight, of at most 64 MiB
/// together, and each of its workers keeps a buffer of at most 1 MiB).
const PIPELINE_RSS_BOUND_KIB: u64 = 64 << 10;

/// Issue 15: 10 000 pipelined requests (64 KiB reads and writes, one in 50 of 1 MiB) sent
/// without reading a reply until the client is stalled: the server stops reading the socket
/// once its share is in flight (so the client's writes block instead of the server buffering
/// them), its RSS stays within [`PIPELINE_RSS_BOUND_KIB`] of idle, and once the client reads,
/// every reply comes, right: the reads return the data written before, the writes read back.
/// Then 16 reads of 32 MiB at once, replies unread: at most two buffers of them are made at a
/// time ([`BIG_RSS_BOUND_KIB`]).
#[test]
fn pipelined_requests_hold_bounded_memory() {
    if !require_tools(&["thin_check"]) {
        return;
    }
    const N: u64 = 10_000;
    // Region B (read in the pipeline): filled first. Region A (written): each byte once,
    // about 280 MiB, so that A and B fit in the 512 MiB pool.
    const B_LEN: u64 = 64 << 20;
    let r = PoolRoot::new(&[("v", "1G")]);
    let srv = r.serve(&[]);
    let sock = srv.socket.clone().expect("unix socket");
    let pid = srv.pid();
    let mut c = RawClient::connect(&sock, 3);
    c.go("v");
    for (k, off) in (0..B_LEN).step_by(1 << 20).enumerate() {
        c.request(
            CMD_WRITE,
            0,
            k as u64,
            off,
            1 << 20,
            &pattern(0, off, 1 << 20),
        );
        assert_eq!(c.simple_reply(), (0, k as u64));
    }
    let idle_rss = rss_kib(pid);
    let idle_threads = threads(pid);

    let mut plan: Vec<Piped> = Vec::with_capacity(N as usize);
    let mut a_end = B_LEN;
    for i in 0..N {
        let len: u32 = if i % 50 == 7 { 1 << 20 } else { 64 << 10 };
        if i % 3 == 0 {
            plan.push(Piped {
                write: true,
                offset: a_end,
                len,
            });
            a_end += u64::from(len);
        } else {
            // A read somewhere in region B.
            let offset = (i * 7 * 65536) % (B_LEN - u64::from(len));
            plan.push(Piped {
                write: false,
                offset,
                len,
            });
        }
    }
    let total: u64 = plan
        .iter()
        .map(|p| 28 + if p.write { u64::from(p.len) } else { 0 })
        .sum();
    let sent = Arc::new(AtomicU64::new(0));
    let mut out = match &c.s {
        RawSock::Unix(s) => s.try_clone().expect("clone the socket"),
        RawSock::Tcp(_) => unreachable!("a unix socket client"),
    };
    let rss = RssSampler::start(pid);
    let writer = {
        let plan = plan.clone();
        let sent = sent.clone();
        std::thread::spawn(move || {
            for (k, p) in plan.iter().enumerate() {
                let kind = if p.write { CMD_WRITE } else { CMD_READ };
                let mut b = request_header(REQUEST_MAGIC, kind, 0, k as u64, p.offset, p.len);
                if p.write {
                    b.extend_from_slice(&pattern(1, p.offset, p.len as usize));
                }
                out.write_all(&b).expect("send a request");
                sent.fetch_add(b.len() as u64, Ordering::SeqCst);
            }
        })
    };
    // Not reading: wait until the client's sending stalls (nothing more sent for 2 s).
    let mut last = 0;
    let mut still_since = Instant::now();
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = sent.load(Ordering::SeqCst);
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() >= Duration::from_secs(2) {
            break;
        }
        assert!(
            !writer.is_finished(),
            "the server took all {total} bytes of 10 000 requests while no reply was read: it \
             buffers without bound"
        );
        assert!(start.elapsed() < Duration::from_secs(120), "never stalled");
    }
    let stalled_rss = rss_kib(pid);
    let stalled_threads = threads(pid);
    eprintln!(
        "client stalled after sending {last} of {total} bytes; daemon RSS {idle_rss} KiB idle → \
         {stalled_rss} KiB, threads {idle_threads} → {stalled_threads}"
    );
    assert!(last < total);
    // Now read every reply, as the rest is sent.
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let (err, k) = c.simple_reply();
        assert!(k < N, "unknown cookie {k}");
        assert!(!seen[k as usize], "a second reply for cookie {k}");
        seen[k as usize] = true;
        assert_eq!(err, 0, "request {k} failed");
        let p = plan[k as usize];
        if !p.write {
            let got = c.read_n(p.len as usize);
            assert!(
                got == pattern(0, p.offset, p.len as usize),
                "read {k} at {} returned other data",
                p.offset
            );
        }
    }
    writer.join().expect("the writer thread");
    let peak = rss.peak();
    drop(rss);
    eprintln!(
        "10 000 pipelined requests: daemon RSS idle {idle_rss} KiB, peak {peak} KiB (+{} KiB, \
         bound +{PIPELINE_RSS_BOUND_KIB} KiB), threads {} at most 16 per connection",
        peak.saturating_sub(idle_rss),
        threads(pid)
    );
    assert!(
        peak <= idle_rss + PIPELINE_RSS_BOUND_KIB,
        "RSS grew by {} KiB (bound {PIPELINE_RSS_BOUND_KIB} KiB)",
        peak - idle_rss
    );
    assert!(threads(pid) <= idle_threads + 15, "more than 16 workers");

    // The largest requests: 16 reads of 32 MiB asked for at once, no reply read for 2 s.
    // Without a byte bound all 16 buffers (512 MiB) would be made; with it, two at a time.
    const BIG: u32 = 32 << 20;
    let before = rss_kib(pid);
    let rss = RssSampler::start(pid);
    for k in 0..16u64 {
        c.request(CMD_READ, 0, N + k, (k % 2) * u64::from(BIG), BIG, &[]);
    }
    std::thread::sleep(Duration::from_secs(2));
    let big_peak = rss.peak();
    let mut seen = [false; 16];
    for _ in 0..16 {
        let (err, k) = c.simple_reply();
        assert_eq!(err, 0, "request {k} failed");
        let i = (k - N) as usize;
        assert!(i < 16 && !seen[i], "unexpected cookie {k}");
        seen[i] = true;
        let off = (k % 2) * u64::from(BIG);
        assert!(
            c.read_n(BIG as usize) == pattern(0, off, BIG as usize),
            "32 MiB read {k} returned other data"
        );
    }
    drop(rss);
    eprintln!(
        "16 pipelined 32 MiB reads: daemon RSS {before} KiB before, peak {big_peak} KiB (+{} \
         KiB, bound +{BIG_RSS_BOUND_KIB} KiB)",
        big_peak.saturating_sub(before)
    );
    assert!(
        big_peak <= before + BIG_RSS_BOUND_KIB,
        "RSS grew by {} KiB with 32 MiB reads in flight (bound {BIG_RSS_BOUND_KIB} KiB)",
        big_peak - before
    );

    // What was written reads back.
    for (k, off) in (B_LEN..a_end).step_by(1 << 20).enumerate() {
        let len = (a_end - off).min(1 << 20) as u32;
        c.request(CMD_READ, 0, k as u64, off, len, &[]);
        assert_eq!(c.simple_reply(), (0, k as u64));
        assert!(
            c.read_n(len as usize) == pattern(1, off, len as usize),
            "the data written at {off} does not read back"
        );
    }
    drop(c);
    srv.stop();
    r.thin_check();
}

/// A client on its own thread: writes 64 KiB, reads it back and compares, over and over,
/// until told to stop; counts its rounds. It panics (failing the test at `join`) on any
/// error or mismatch.
struct SteadyClient {
    rounds: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl SteadyClient {
    fn start(mut c: RawClient) -> SteadyClient {
        let rounds = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, s) = (rounds.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut k = 0u64;
            while !s.load(Ordering::SeqCst) {
                let off = (k % 256) * 65536;
                let data = pattern(k as u8, off, 65536);
                c.request(CMD_WRITE, 0, 2 * k, off, 65536, &data);
                assert_eq!(c.simple_reply(), (0, 2 * k), "write {k}");
                c.request(CMD_READ, 0, 2 * k + 1, off, 65536, &[]);
                assert_eq!(c.simple_reply(), (0, 2 * k + 1), "read {k}");
                assert!(c.read_n(65536) == data, "round {k}: read back other data");
                k += 1;
                n.store(k, Ordering::SeqCst);
            }
            k
        });
        SteadyClient {
            rounds,
            stop,
            thread,
        }
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::SeqCst)
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the steady client failed")
    }
}

/// Issue 15: 1 500 connections at once on the unix socket, then on loopback TCP. The daemon
/// stays up, admits up to its limit (256, one of them taken by a client connected before),
/// closes the others at once, keeps serving the client connected before (verified writes and
/// reads, progressing during each flood), and serves new clients afterwards.
#[test]
fn floods_on_unix_and_tcp_leave_a_steady_client_served() {
    if !require_tools(&["nbdinfo", "thin_check"]) {
        return;
    }
    const FLOOD: usize = 1500;
    let r = PoolRoot::new(&[("v", "64M")]);
    let port = free_tcp_port();
    let listen = format!("127.0.0.1:{port}");
    let mut srv = r.serve(&["--listen", &listen, "--insecure-tcp"]);
    let sock = srv.socket.clone().expect("unix socket");
    let pid = srv.pid();
    let idle_rss = rss_kib(pid);
    let idle_threads = threads(pid);
    let mut steady = RawClient::connect(&sock, 3);
    steady.go("v");
    let steady = SteadyClient::start(steady);
    let rss = RssSampler::start(pid);
    for tcp in [false, true] {
        let what = if tcp { "TCP" } else { "unix socket" };
        // No place held by an earlier flood's handshakes: their threads are gone (a
        // connection's thread gives its place back before it ends).
        let deadline = Instant::now() + Duration::from_secs(10);
        while threads(pid) > idle_threads + 1 {
            assert!(
                Instant::now() < deadline,
                "places of the earlier flood not freed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let before = steady.rounds();
        let t = Instant::now();
        let mut greeted_n = 0;
        let mut refused = 0;
        let mut peak_threads = 0;
        let mut held: Vec<Box<dyn Read>> = Vec::with_capacity(FLOOD);
        for i in 0..FLOOD {
            let got = if tcp {
                let mut s = TcpStream::connect(("127.0.0.1", port))
                    .unwrap_or_else(|e| panic!("TCP connect {i}: {e}"));
                let g = tcp_greeted(&mut s, Duration::from_secs(10));
                held.push(Box::new(s));
                g
            } else {
                let mut s = connect(&sock);
                let g = greeted(&mut s, Duration::from_secs(10));
                held.push(Box::new(s));
                g
            };
            match got {
                Some(true) => greeted_n += 1,
                Some(false) => refused += 1,
                None => panic!("{what} connection {i} got neither a greeting nor a close"),
            }
            if i % 100 == 0 {
                peak_threads = peak_threads.max(threads(pid));
            }
        }
        let took = t.elapsed();
        let during = steady.rounds() - before;
        peak_threads = peak_threads.max(threads(pid));
        eprintln!(
            "{what} flood: {FLOOD} connections in {took:?}: {greeted_n} greeted, {refused} \
             closed at once; steady client {during} verified rounds meanwhile; daemon RSS \
             {idle_rss} KiB idle → {} KiB now (peak {} KiB), threads {idle_threads} → \
             {peak_threads} at most",
            rss_kib(pid),
            rss.peak()
        );
        assert_eq!(
            greeted_n, 255,
            "{what}: the limit (256) less the steady client"
        );
        assert_eq!(refused, FLOOD - 255, "{what}");
        assert!(
            during > 0,
            "{what}: the steady client made no progress during the flood"
        );
        assert!(srv.is_running(), "the daemon died in the {what} flood");
        assert!(
            peak_threads <= idle_threads + 256 + 4,
            "{what}: more than a thread per connection"
        );
        drop(held);
    }
    // New clients are served on both sockets once the flood is gone.
    assert_eq!(nbdinfo_eventually(&srv.uri("v")), 64 << 20);
    assert_eq!(
        nbdinfo_eventually(&format!("nbd://127.0.0.1:{port}/v")),
        64 << 20
    );
    let rounds = steady.finish();
    let peak = rss.peak();
    drop(rss);
    eprintln!("steady client: {rounds} rounds in all; daemon RSS peak {peak} KiB");
    assert!(srv.is_running());
    srv.stop();
    r.thin_check();
}

/// Issue 15: the connection limit on TCP: a client past it is closed at once without a
/// greeting, the ones inside are served on, and a place freed is taken by the next client.
#[test]
fn tcp_clients_past_the_limit_are_refused() {
    if !require_tools(&["nbdinfo", "thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("v", "64M")]);
    let port = free_tcp_port();
    let srv = r.serve_tcp(
        port,
        &[
            "--insecure-tcp",
            "--max-connections",
            "2",
            "--handshake-timeout",
            "120",
        ],
    );
    let uri = format!("nbd://127.0.0.1:{port}/v");
    let mut a = RawClient::connect_tcp(port, 3);
    a.go("v");
    let mut b = RawClient::connect_tcp(port, 3);
    b.go("v");
    for i in 0..10 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("TCP connect");
        assert_eq!(
            tcp_greeted(&mut s, Duration::from_secs(10)),
            Some(false),
            "TCP client {} past the limit of 2 was not closed at once",
            i + 3
        );
    }
    assert_eq!(nbdinfo_size(&uri), None, "nbdinfo served past the limit");
    let data = vec![0x3c; 4096];
    a.request(CMD_WRITE, 0, 1, 0, 4096, &data);
    assert_eq!(a.simple_reply(), (0, 1));
    b.request(CMD_READ, 0, 2, 0, 4096, &[]);
    assert_eq!(b.simple_reply(), (0, 2));
    assert_eq!(b.read_n(4096), data);
    drop(a);
    assert_eq!(nbdinfo_eventually(&uri), 64 << 20);
    let log = srv.log_text();
    assert_eq!(log.matches("connection limit reached").count(), 1, "{log}");
    drop(b);
    srv.stop();
    r.thin_check();
}

/// A socket that cannot be bound: the error names it, and the cause is printed once.
#[test]
fn an_unbindable_socket_is_named_with_its_cause_once() {
    let r = PoolRoot::new(&[("v", "64M")]);
    let sock = r.scratch_dir().join("no-such-dir").join("nbd.sock");
    let out = run(&mut r.cmd(&["nbd", "serve", "--socket", path_str(&sock)]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = format!(
        "cannot listen on unix socket {}: No such file or directory (os error 2)",
        sock.display()
    );
    assert!(err.contains(&line), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    r.thin_check();
}
