//! The metrics endpoint: `GET /metrics` in the OpenMetrics text format (prometheus-client's
//! encoder) on a loopback TCP port, for Prometheus to scrape.
//!
//! ```text
//! accept thread: poll(listener, wake) ──▶ accept ──▶ read the request head (≤ 8 KiB, 5 s)
//!                        ▲                              │ GET /metrics: status, volumes, stats
//!   stop(): write wake ──┘                              ▼ one response, FIN, drain, close
//! ```
//!
//! Collect on scrape: each `GET /metrics` reads [`Pool::status`] (which commits, as the kernel
//! does when its status is read), [`Pool::volumes`] and [`Pool::stats`] and encodes them
//! through a one-off registry, so nothing runs between scrapes and nothing is kept. Requests
//! are answered one at a time on the accept thread: scrapes are rare, and a stalled client
//! holds it for at most the timeout.
//!
//! After the response the server shuts down its sending side and reads whatever the client
//! still sends until the client closes (for at most [`LINGER`]): closing a socket with unread
//! input makes the kernel reset the connection, and a reset can destroy the response before
//! the client reads it. A 431 (a head over the limit) always leaves input unread.
//!
//! Only loopback addresses are accepted: the endpoint has no authentication, and it shows the
//! pool's usage and every volume's name.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use thinpool_engine::{COMMIT_BUCKETS_MS, IoOp, Pool, PoolMode, PoolStats, PoolStatus, VolumeInfo};

use crate::policy::{Policy, PolicyCounters};
use crate::{Error, Result, SpacePolicy};

/// The longest request head read; a longer one gets 431.
const MAX_REQUEST_HEAD: usize = 8 << 10;
/// How long a client has to send its request head, and to take the response.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection's unread input is drained, at most (see [`close_gently`]).
const LINGER: Duration = Duration::from_secs(1);
/// The most unread input drained before closing anyway.
const LINGER_MAX_BYTES: usize = 1 << 20;
/// The content type of prometheus-client's text encoding.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Refuse an address that is not loopback (see the module doc).
pub(crate) fn check_loopback(addr: SocketAddr) -> Result<()> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(Error::MetricsNotLoopback { addr })
    }
}

/// A running metrics endpoint.
pub(crate) struct MetricsServer {
    addr: SocketAddr,
    wake: UnixStream,
    thread: JoinHandle<()>,
}

impl MetricsServer {
    /// Bind `addr` (loopback only) and start answering scrapes of `pool`.
    pub fn start(pool: Arc<Pool>, policy: Arc<Policy>, addr: SocketAddr) -> Result<MetricsServer> {
        check_loopback(addr)?;
        let bind_err = |source| Error::MetricsBind { addr, source };
        let listener = TcpListener::bind(addr).map_err(bind_err)?;
        let bound = listener.local_addr().map_err(bind_err)?;
        let (wake, wake_rx) = UnixStream::pair().map_err(bind_err)?;
        let thread = std::thread::Builder::new()
            .name("thinpool-metrics".into())
            .spawn(move || accept_loop(&listener, &wake_rx, &pool, &policy))
            .map_err(|source| Error::Thread {
                what: "metrics",
                source,
            })?;
        tracing::info!(addr = %bound, "serving metrics on http://{bound}/metrics");
        Ok(MetricsServer {
            addr: bound,
            wake,
            thread,
        })
    }

    /// The bound address (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting (a scrape being answered finishes first) and join the thread, which
    /// lets go of the pool.
    pub fn stop(mut self) {
        if let Err(e) = self.wake.write_all(b"x") {
            tracing::error!("waking the metrics server to stop it: {e}");
        }
        if self.thread.join().is_err() {
            tracing::error!("the metrics server thread panicked");
        }
    }
}

fn accept_loop(listener: &TcpListener, wake: &UnixStream, pool: &Pool, policy: &Policy) {
    while crate::socket::wait_for_client(listener, wake, "metrics server") {
        match listener.accept() {
            Ok((mut stream, peer)) => match answer(&mut stream, pool, policy) {
                Ok(()) => close_gently(&stream),
                Err(e) => tracing::debug!(%peer, "metrics request: {e}"),
            },
            Err(e) => tracing::warn!("metrics server: accept failed: {e}"),
        }
    }
}

/// Read one request head, write one response.
fn answer(stream: &mut TcpStream, pool: &Pool, policy: &Policy) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head_complete(&head) {
        if head.len() >= MAX_REQUEST_HEAD {
            return respond(stream, "431 Request Header Fields Too Large", "", b"");
        }
        if Instant::now() >= deadline {
            return respond(stream, "408 Request Timeout", "", b"");
        }
        let room = (MAX_REQUEST_HEAD - head.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) => return Ok(()), // the client went away
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_ascii_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return respond(stream, "400 Bad Request", "", b"");
    };
    if !version.starts_with("HTTP/1.") {
        return respond(stream, "400 Bad Request", "", b"");
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return respond(
            stream,
            "404 Not Found",
            "text/plain; charset=utf-8",
            b"not found: metrics are at /metrics\n",
        );
    }
    if method != "GET" && method != "HEAD" {
        return respond(stream, "405 Method Not Allowed", "", b"");
    }
    let (status, content_type, body) = match render(pool, policy) {
        Ok(text) => ("200 OK", CONTENT_TYPE, text),
        Err(e) => {
            tracing::warn!("metrics scrape: reading the pool's status failed: {e}");
            (
                "500 Internal Server Error",
                "text/plain; charset=utf-8",
                format!("reading the pool's status failed: {e}\n"),
            )
        }
    };
    let body = if method == "HEAD" { "" } else { body.as_str() };
    respond(stream, status, content_type, body.as_bytes())
}

/// End a connection whose response is written: FIN, then read and drop what the client still
/// sends until it closes, for at most [`LINGER`] and [`LINGER_MAX_BYTES`], so that the close
/// does not turn into a reset that destroys the response (see the module doc).
fn close_gently(stream: &TcpStream) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut input: &TcpStream = stream;
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_MAX_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match input.read(&mut sink) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Has the blank line that ends a request head arrived? (Bare `\n` line ends are accepted.)
fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    if status.starts_with("405") {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    if !content_type.is_empty() {
        out.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes)?;
    stream.flush()
}

/// The exposition text of `pool` now. Commits the pool (through [`Pool::status`]) and walks
/// every volume's mappings (through [`Pool::volumes`]): O(mapped blocks), not on the I/O path.
pub(crate) fn render(pool: &Pool, policy: &Policy) -> thinpool_engine::Result<String> {
    let scrape = Scrape {
        status: pool.status()?,
        volumes: pool.volumes()?,
        stats: pool.stats(),
        policy: (policy.cfg, policy.counters()),
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("encoding into a String does not fail");
    Ok(text)
}

/// What one scrape read from the pool; encoded once, then dropped.
#[derive(Debug)]
struct Scrape {
    status: PoolStatus,
    volumes: Vec<VolumeInfo>,
    stats: PoolStats,
    /// The space policy and its counters.
    policy: (SpacePolicy, PolicyCounters),
}

fn mode_name(mode: PoolMode) -> &'static str {
    match mode {
        PoolMode::Write => "rw",
        PoolMode::OutOfDataSpace => "out_of_data_space",
        PoolMode::ReadOnly => "ro",
        PoolMode::Fail => "fail",
    }
}

const MODES: [PoolMode; 4] = [
    PoolMode::Write,
    PoolMode::OutOfDataSpace,
    PoolMode::ReadOnly,
    PoolMode::Fail,
];

type Fmt = std::fmt::Result;

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: impl EncodeGaugeValue,
) -> Fmt {
    enc.encode_descriptor(name, help, unit, MetricType::Gauge)?
        .encode_gauge(&v)
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: impl EncodeCounterValue,
) -> Fmt {
    enc.encode_descriptor(name, help, unit, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

/// A counter family with one label `key`: one sample per `(label value, value)`.
fn counters<V: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    key: &str,
    samples: impl IntoIterator<Item = (&'static str, V)>,
) -> Fmt {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (label, v) in samples {
        m.encode_family(&[(key, label)])?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    Ok(())
}

/// A gauge family with one label `key`.
fn gauges<'a, V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    key: &str,
    samples: impl IntoIterator<Item = (&'a str, V)>,
) -> Fmt {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (label, v) in samples {
        m.encode_family(&[(key, label)])?.encode_gauge(&v)?;
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Fmt {
        let (st, stats) = (&self.status, &self.stats);
        let e = &mut enc;
        gauge(
            e,
            "thinpool_data_blocks_used",
            "Data blocks in use.",
            None,
            st.used_data_blocks,
        )?;
        gauge(
            e,
            "thinpool_data_blocks_total",
            "Data blocks in the pool.",
            None,
            st.total_data_blocks,
        )?;
        gauge(
            e,
            "thinpool_metadata_blocks_used",
            "Metadata blocks (4 KiB) in use, the kernel's reserve counted as used.",
            None,
            st.used_metadata_blocks,
        )?;
        gauge(
            e,
            "thinpool_metadata_blocks_total",
            "Metadata blocks (4 KiB) in the pool.",
            None,
            st.total_metadata_blocks,
        )?;
        gauge(
            e,
            "thinpool_block_size",
            "Data block size.",
            Some(&Unit::Bytes),
            st.block_size,
        )?;
        gauge(
            e,
            "thinpool_transaction_id",
            "Metadata transaction id.",
            None,
            st.transaction_id,
        )?;
        gauge(
            e,
            "thinpool_volumes",
            "Thin volumes (snapshots not counted).",
            None,
            st.volumes as u64,
        )?;
        gauge(
            e,
            "thinpool_snapshots",
            "Snapshots.",
            None,
            st.snapshots as u64,
        )?;
        gauges(
            e,
            "thinpool_mode",
            "The pool's mode: 1 for the current one (rw, out_of_data_space, ro, fail), 0 for the others.",
            None,
            "mode",
            MODES.map(|m| (mode_name(m), u64::from(m == st.mode))),
        )?;
        counters(
            e,
            "thinpool_io_requests",
            "Volume requests by kind, failed ones included (a FUA write counts as a write and a flush).",
            None,
            "op",
            IoOp::ALL.map(|op| (op.as_str(), stats.op(op).count)),
        )?;
        counters(
            e,
            "thinpool_io",
            "Bytes asked for by volume requests (the range's length for discard and write_zeroes).",
            Some(&Unit::Bytes),
            "op",
            IoOp::ALL.map(|op| (op.as_str(), stats.op(op).bytes)),
        )?;
        counters(
            e,
            "thinpool_io_latency",
            "Time spent in volume requests, summed.",
            Some(&Unit::Seconds),
            "op",
            IoOp::ALL.map(|op| (op.as_str(), stats.op(op).latency_us as f64 / 1e6)),
        )?;
        counter(
            e,
            "thinpool_provisioned_blocks",
            "Data blocks mapped by writes, copy-on-write included.",
            None,
            stats.provisioned_blocks,
        )?;
        counter(
            e,
            "thinpool_cow_copies",
            "Writes to a block shared with a snapshot that moved it to a new block.",
            None,
            stats.cow_copies,
        )?;
        counter(
            e,
            "thinpool_sealed_commits",
            "Commits that synced the data twice because mappings were made during the first sync (I/O goes on during both).",
            None,
            stats.sealed_commits,
        )?;
        counter(
            e,
            "thinpool_mappings_made_while_sealed",
            "Mappings made during a commit's second data sync, put in the next transaction.",
            None,
            stats.mappings_made_while_sealed,
        )?;
        counter(
            e,
            "thinpool_commits",
            "Metadata commits.",
            None,
            stats.commits,
        )?;
        let buckets: Vec<(f64, u64)> = COMMIT_BUCKETS_MS
            .iter()
            .map(|ms| ms / 1e3)
            .chain([f64::INFINITY])
            .zip(stats.commit_buckets)
            .collect();
        enc.encode_descriptor(
            "thinpool_commit_duration",
            "Time a commit took (data sync and metadata write).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(
            stats.commit_latency_us as f64 / 1e6,
            stats.commits,
            &buckets,
            None,
        )?;
        let e = &mut enc;
        gauges(
            e,
            "thinpool_volume_mapped_blocks",
            "Data blocks mapped by a volume (shared ones included).",
            None,
            "volume",
            self.volumes
                .iter()
                .map(|v| (v.name.as_str(), v.mapped_blocks)),
        )?;
        gauges(
            e,
            "thinpool_volume_size",
            "A volume's virtual size.",
            Some(&Unit::Bytes),
            "volume",
            self.volumes.iter().map(|v| (v.name.as_str(), v.size)),
        )?;
        encode_policy(&mut enc, &self.policy.0, &self.policy.1)
    }
}

const SPACES: [&str; 2] = ["data", "metadata"];

/// The space policy's counters and settings (see `policy`).
fn encode_policy(e: &mut DescriptorEncoder, cfg: &SpacePolicy, c: &PolicyCounters) -> Fmt {
    let per = |v: [u64; 2]| SPACES.into_iter().zip(v);
    counters(
        e,
        "thinpool_low_water_events",
        "Times a space's usage reached the low-water threshold.",
        None,
        "space",
        per(c.low_water),
    )?;
    counters(
        e,
        "thinpool_autogrow_grows",
        "Grows the space policy made (limited ones included).",
        None,
        "space",
        per(c.grown),
    )?;
    counters(
        e,
        "thinpool_autogrow_grown",
        "Bytes the space policy added to a device.",
        Some(&Unit::Bytes),
        "space",
        per(c.grown_bytes),
    )?;
    counters(
        e,
        "thinpool_autogrow_limited",
        "Grows cut short or not made: the maximum or the host file system's free space was reached.",
        None,
        "space",
        per(c.limited),
    )?;
    counters(
        e,
        "thinpool_autogrow_failed",
        "Grows that failed.",
        None,
        "space",
        per(c.failed),
    )?;
    counters(
        e,
        "thinpool_autogrow_block_device",
        "Times a space over the threshold was a block device, which is not grown.",
        None,
        "space",
        per(c.cannot_grow),
    )?;
    gauge(
        e,
        "thinpool_autogrow_longest_grow",
        "The longest grow the space policy made.",
        Some(&Unit::Seconds),
        c.longest_grow_ms as f64 / 1e3,
    )?;
    gauge(
        e,
        "thinpool_low_water_threshold_percent",
        "Usage, percent of a space's blocks, at which low-water events are recorded and autogrow grows.",
        None,
        u64::from(cfg.threshold),
    )?;
    let ag = [cfg.data, cfg.metadata];
    gauges(
        e,
        "thinpool_autogrow_step",
        "Bytes added per grow (0: autogrow off).",
        Some(&Unit::Bytes),
        "space",
        SPACES.into_iter().zip(ag.map(|a| a.map_or(0, |a| a.step))),
    )?;
    gauges(
        e,
        "thinpool_autogrow_max",
        "The largest size autogrow grows to (0: no maximum but dm-thin's, or autogrow off).",
        Some(&Unit::Bytes),
        "space",
        SPACES
            .into_iter()
            .zip(ag.map(|a| a.and_then(|a| a.max).unwrap_or(0))),
    )
}
