//! The metrics endpoint over real TCP: values agree with the I/O done through the pool and
//! with `Pool::status`; other paths, methods and oversized requests are refused; a non-loopback
//! address is refused before the pool is opened.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};

use thinpool_daemon::{Daemon, DaemonOptions, Error};
use thinpool_engine::{Pool, PoolOptions};

use crate::make_pool;

/// Send `request` as is, read until the server closes: (status line, headers, body).
fn http(addr: SocketAddr, request: &[u8]) -> (String, String, String) {
    let first = String::from_utf8_lossy(request.split(|&b| b == b'\n').next().unwrap_or_default())
        .into_owned();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(request)
        .unwrap_or_else(|e| panic!("sending {first:?}…: {e}"));
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("reading the response to {first:?}…: {e}"));
    let (head, body) = out
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head for {first:?}…: {out:?}"));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n");
    http(addr, req.as_bytes())
}

/// `name{labels}` → value, for every sample line.
fn samples(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("name and value");
            (k.to_string(), v.parse().expect("a number"))
        })
        .collect()
}

fn started(metrics: &str) -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    make_pool(dir.path());
    let mut opts = DaemonOptions::default();
    opts.metrics = Some(metrics.parse().unwrap());
    let d = Daemon::start(dir.path(), opts).expect("start the daemon");
    (dir, d)
}

#[test]
fn scrape_reports_io_usage_and_volumes() {
    let (_dir, d) = started("127.0.0.1:0");
    let addr = d.metrics_addr().expect("metrics were asked for");
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    let pool = d.pool();
    pool.create_volume("vol", 16 << 20).unwrap();
    pool.create_volume("other.1", 1 << 20).unwrap();
    let v = pool.open_volume("vol").unwrap();
    let bs = v.block_size();
    for i in 0..7 {
        v.write_at(&[5u8; 4096], i * bs).unwrap();
    }
    let mut buf = [0u8; 4096];
    for i in 0..3 {
        v.read_at(&mut buf, i * bs).unwrap();
    }
    v.flush().unwrap();

    let (status, headers, body) = get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("Content-Type: application/openmetrics-text"),
        "{headers}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    let m = samples(&body);
    let at = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("no sample {k} in\n{body}"))
    };
    let st = pool.status().unwrap();
    assert_eq!(at(r#"thinpool_io_requests_total{op="write"}"#), 7.0);
    assert_eq!(at(r#"thinpool_io_bytes_total{op="write"}"#), 7.0 * 4096.0);
    assert_eq!(at(r#"thinpool_io_requests_total{op="read"}"#), 3.0);
    assert_eq!(at(r#"thinpool_io_requests_total{op="flush"}"#), 1.0);
    assert_eq!(at(r#"thinpool_io_requests_total{op="discard"}"#), 0.0);
    assert!(at(r#"thinpool_io_latency_seconds_total{op="flush"}"#) >= 0.0);
    assert_eq!(at("thinpool_provisioned_blocks_total"), 7.0);
    assert_eq!(at("thinpool_cow_copies_total"), 0.0);
    assert_eq!(at("thinpool_data_blocks_used"), st.used_data_blocks as f64);
    assert_eq!(at("thinpool_data_blocks_used"), 7.0);
    assert_eq!(
        at("thinpool_data_blocks_total"),
        st.total_data_blocks as f64
    );
    assert_eq!(
        at("thinpool_metadata_blocks_used"),
        st.used_metadata_blocks as f64
    );
    assert_eq!(
        at("thinpool_metadata_blocks_total"),
        st.total_metadata_blocks as f64
    );
    assert_eq!(at("thinpool_block_size_bytes"), bs as f64);
    assert_eq!(at("thinpool_transaction_id"), st.transaction_id as f64);
    assert_eq!(
        (at("thinpool_volumes"), at("thinpool_snapshots")),
        (2.0, 0.0)
    );
    assert_eq!(at(r#"thinpool_mode{mode="rw"}"#), 1.0);
    assert_eq!(at(r#"thinpool_mode{mode="ro"}"#), 0.0);
    assert_eq!(at(r#"thinpool_volume_mapped_blocks{volume="vol"}"#), 7.0);
    assert_eq!(
        at(r#"thinpool_volume_size_bytes{volume="vol"}"#),
        (16 << 20) as f64
    );
    assert_eq!(
        at(r#"thinpool_volume_mapped_blocks{volume="other.1"}"#),
        0.0
    );
    let commits = at("thinpool_commits_total");
    assert!(commits >= 1.0, "the flush committed");
    assert_eq!(at("thinpool_commit_duration_seconds_count"), commits);
    assert_eq!(
        at(r#"thinpool_commit_duration_seconds_bucket{le="+Inf"}"#),
        commits
    );
    assert!(body.contains("# TYPE thinpool_commit_duration_seconds histogram"));
    assert!(body.contains("# TYPE thinpool_io_requests counter"));

    // A query string is ignored; HEAD has the headers and no body.
    assert_eq!(get(addr, "/metrics?x=1").0, "HTTP/1.1 200 OK");
    let (status, headers, body) = http(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(headers.contains("Content-Length: 0"), "{headers}");
    assert!(body.is_empty());

    drop(v);
    drop(pool);
    d.stop().unwrap();
    assert!(
        TcpStream::connect(addr).is_err(),
        "nothing listens after stop"
    );
}

#[test]
fn other_paths_methods_and_bad_requests_are_refused() {
    let (_dir, d) = started("127.0.0.1:0");
    let addr = d.metrics_addr().unwrap();
    let (status, _, body) = get(addr, "/");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert!(body.contains("/metrics"));
    assert_eq!(get(addr, "/metrics/x").0, "HTTP/1.1 404 Not Found");
    let (status, headers, _) = http(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    assert!(headers.contains("Allow: GET, HEAD"));
    assert_eq!(http(addr, b"hello\r\n\r\n").0, "HTTP/1.1 400 Bad Request");
    // A head that never ends within the limit: refused with 431, not read forever. The server
    // reads 8 KiB of the 64; it must still deliver the 431 (closing with input unread would
    // reset the connection and lose it).
    let mut big = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
    big.resize(64 << 10, b'a');
    let (status, _, body) = http(addr, &big);
    assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");
    assert!(body.is_empty(), "{body:?}");
    // The server still answers.
    assert_eq!(get(addr, "/metrics").0, "HTTP/1.1 200 OK");
    d.stop().unwrap();
}

#[test]
fn non_loopback_address_is_refused_before_opening_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    make_pool(dir.path());
    for a in ["0.0.0.0:0", "192.0.2.1:9464", "[::]:9464"] {
        let mut opts = DaemonOptions::default();
        opts.metrics = Some(a.parse().unwrap());
        let e = Daemon::start(dir.path(), opts).err().expect("refused");
        assert!(matches!(e, Error::MetricsNotLoopback { .. }), "{a}: {e}");
        assert!(e.to_string().contains("loopback"), "{e}");
    }
    // Nothing was left open or listening: the pool opens.
    Pool::open(dir.path(), PoolOptions::default())
        .unwrap()
        .close()
        .unwrap();
}
