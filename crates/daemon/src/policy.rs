//! The space policy: what the daemon does when the pool fills (issue 15; LVM's
//! `thin_pool_autoextend_threshold` / `_percent`, for pools on sparse files).
//!
//! ```text
//! write path ──alloc──▶ SpaceWatch (engine): usage ≥ threshold? ──ring──┐
//!                                                                       ▼
//! policy thread: wait_space (≤ 250 ms) ──▶ space_usage() per space ──▶ crossed? ──▶ low_water event
//!                                                   │ autogrow set, still over
//!                                                   ▼
//!   block device? ──▶ cannot_grow event (extend it, then `thinpool pool grow`)
//!   size = min(current + step, max, what the host file system can hold) ──▶ Pool::grow
//!        └─▶ grown / limited / grow_failed event; again while still over the threshold
//! ```
//!
//! - A **low-water event** is recorded for data and for metadata each time usage reaches the
//!   threshold (default 80 %) from below; it is re-armed when usage is below it again, or the
//!   device grew.
//! - With **autogrow** set for a space, the device is grown by the step while usage is at or
//!   over the threshold, up to the maximum (data: none but dm-thin's 2^40 blocks unless
//!   given; metadata: dm-thin's 15.87 GiB).
//! - **Never past the host file system's free space**: after a grow, the bytes the pool's
//!   sparse files on that file system may still take (virtual size − allocated) must fit in
//!   its free space (`f_bavail`). A step that does not fit is cut to what fits (a whole number
//!   of blocks) and a `limited` event says so; when nothing fits, nothing is grown.
//! - A **block device** is never grown: a `cannot_grow` event and a warning say to extend the
//!   device and run `thinpool pool grow`.
//! - A **failed grow** is recorded and logged; the engine aborts its transaction, so the pool
//!   keeps its last commit. It is tried again after [`RETRY_AFTER`].
//!
//! Events are kept in a ring of [`MAX_EVENTS`], numbered from 1, for
//! [`Request::PoolEvents`](thinpool_control::Request); counters go to the metrics endpoint.
//!
//! The pause a grow causes: [`Pool::grow_uncommitted`] holds the metadata lock while it
//! extends the file and the space map (microseconds), and leaves the commit to the commit
//! timer, so no data sync stands between a full pool and its queued writers. Each event of a
//! grow carries how long it took (`took_ms`).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thinpool_control::{EventKind, PoolEvent, Space};
use thinpool_engine::{MAX_METADATA_SIZE, Pool, PoolConfig, SpaceUsage};

use crate::{Error, Result};

/// Events kept for [`Request::PoolEvents`](thinpool_control::Request).
pub const MAX_EVENTS: usize = 1024;
/// How long a failed grow waits before it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);
/// The longest the policy thread sleeps between two looks at the pool's usage.
const POLL: Duration = Duration::from_millis(250);
/// The default low-water threshold, percent.
pub const DEFAULT_THRESHOLD: u8 = 80;
/// Metadata blocks are 4 KiB.
const META_BLOCK: u64 = 4096;

/// Autogrow for one space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autogrow {
    /// Bytes added per grow.
    pub step: u64,
    /// The largest size, bytes (`None`: dm-thin's limit only).
    pub max: Option<u64>,
}

/// What the daemon does when the pool fills (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpacePolicy {
    /// Usage, percent of a space's blocks, at which a low-water event is recorded and
    /// autogrow grows (1–99).
    pub threshold: u8,
    /// Autogrow of the data device.
    pub data: Option<Autogrow>,
    /// Autogrow of the metadata device.
    pub metadata: Option<Autogrow>,
}

impl Default for SpacePolicy {
    fn default() -> Self {
        SpacePolicy {
            threshold: DEFAULT_THRESHOLD,
            data: None,
            metadata: None,
        }
    }
}

impl SpacePolicy {
    /// Refuse values that cannot work, before any pool is opened: a threshold outside 1–99,
    /// a zero step, a metadata step or maximum that is not a multiple of 4 KiB, a metadata
    /// maximum past dm-thin's, a maximum smaller than one step.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Policy(m));
        if !(1..=99).contains(&self.threshold) {
            return bad(format!(
                "autogrow threshold {}%: give a percentage from 1 to 99",
                self.threshold
            ));
        }
        for (what, ag) in [("data", &self.data), ("metadata", &self.metadata)] {
            let Some(ag) = ag else { continue };
            let flag = flag_prefix(what);
            if ag.step == 0 {
                return bad(format!(
                    "{flag}autogrow-step 0: the step must be more than 0 bytes"
                ));
            }
            if what == "metadata" {
                for (name, v) in [("autogrow-step", Some(ag.step)), ("max-size", ag.max)] {
                    if let Some(v) = v
                        && !v.is_multiple_of(META_BLOCK)
                    {
                        return bad(format!(
                            "--metadata-{name} {v} bytes is not a multiple of 4 KiB (metadata blocks)"
                        ));
                    }
                }
                if let Some(m) = ag.max
                    && m > MAX_METADATA_SIZE
                {
                    return bad(format!(
                        "--max-metadata-size {m} bytes: dm-thin uses at most {MAX_METADATA_SIZE} \
                         bytes of metadata and ignores the rest"
                    ));
                }
            }
            if let Some(m) = ag.max
                && m < ag.step
            {
                return bad(format!(
                    "--max-{what}-size {m} bytes is smaller than one {flag}autogrow-step ({} \
                     bytes)",
                    ag.step
                ));
            }
        }
        Ok(())
    }

    /// [`check_pool`](Self::check_pool) against the pool `cfg` is about to make, so that a
    /// refused `up` leaves no pool behind. A device handed in (`data_path`, `metadata_path`)
    /// keeps its own size, known once open: only the block size is checked for it here.
    pub(crate) fn check_new(&self, cfg: &PoolConfig) -> Result<()> {
        let blocks = |path: &Option<std::path::PathBuf>, size: u64, unit: u64| {
            if path.is_some() {
                0
            } else {
                size / unit.max(1)
            }
        };
        self.check_pool(&SpaceUsage {
            used_data_blocks: 0,
            total_data_blocks: blocks(&cfg.data_path, cfg.data_size, cfg.block_size),
            used_metadata_blocks: 0,
            total_metadata_blocks: blocks(&cfg.metadata_path, cfg.metadata_size, META_BLOCK),
            block_size: cfg.block_size,
        })
    }

    /// Refuse values that do not fit the open pool: a data step or maximum that is not a
    /// multiple of its block size, a maximum below a device's current size.
    fn check_pool(&self, u: &SpaceUsage) -> Result<()> {
        let bad = |m: String| Err(Error::Policy(m));
        if let Some(ag) = &self.data {
            let bs = u.block_size;
            for (name, v) in [
                ("--autogrow-step", Some(ag.step)),
                ("--max-data-size", ag.max),
            ] {
                if let Some(v) = v
                    && !v.is_multiple_of(bs)
                {
                    return bad(format!(
                        "{name} {v} bytes is not a multiple of the pool's block size ({bs} bytes)"
                    ));
                }
            }
            if let Some(m) = ag.max
                && m < u.total_data_blocks * bs
            {
                return bad(format!(
                    "--max-data-size {m} bytes is smaller than the data device already is ({} \
                     bytes)",
                    u.total_data_blocks * bs
                ));
            }
        }
        if let Some(ag) = &self.metadata
            && let Some(m) = ag.max
            && m < u.total_metadata_blocks * META_BLOCK
        {
            return bad(format!(
                "--max-metadata-size {m} bytes is smaller than the metadata device already is \
                 ({} bytes)",
                u.total_metadata_blocks * META_BLOCK
            ));
        }
        Ok(())
    }

    fn autogrow(&self, space: Space) -> Option<&Autogrow> {
        match space {
            Space::Data => self.data.as_ref(),
            Space::Metadata => self.metadata.as_ref(),
        }
    }
}

fn flag_prefix(what: &str) -> &'static str {
    if what == "data" { "--" } else { "--metadata-" }
}

fn index(space: Space) -> usize {
    match space {
        Space::Data => 0,
        Space::Metadata => 1,
    }
}

/// Counters for the metrics endpoint, per space (`[data, metadata]`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PolicyCounters {
    pub low_water: [u64; 2],
    pub grown: [u64; 2],
    pub grown_bytes: [u64; 2],
    pub limited: [u64; 2],
    pub cannot_grow: [u64; 2],
    pub failed: [u64; 2],
    /// The longest grow, milliseconds.
    pub longest_grow_ms: u64,
}

#[derive(Default)]
struct Log {
    events: VecDeque<PoolEvent>,
    next: u64,
    counters: PolicyCounters,
}

/// Per space, across looks.
#[derive(Default, Clone)]
struct SpaceState {
    /// At or over the threshold at the last look.
    over: bool,
    /// The last `limited` / `cannot_grow` message of this crossing (not repeated).
    blocked: Option<String>,
    /// When a grow last failed.
    failed_at: Option<Instant>,
}

/// The policy's configuration, events and counters, shared by its thread, the control server
/// and the metrics endpoint.
pub(crate) struct Policy {
    pub cfg: SpacePolicy,
    log: Mutex<Log>,
}

impl Policy {
    pub fn new(cfg: SpacePolicy) -> Arc<Policy> {
        Arc::new(Policy {
            cfg,
            log: Mutex::new(Log {
                next: 1,
                ..Log::default()
            }),
        })
    }

    /// Events numbered above `since`, oldest first.
    pub fn events(&self, since: u64) -> Vec<PoolEvent> {
        let log = self.log.lock().expect("policy log poisoned");
        log.events
            .iter()
            .filter(|e| e.seq > since)
            .cloned()
            .collect()
    }

    pub fn counters(&self) -> PolicyCounters {
        self.log.lock().expect("policy log poisoned").counters
    }

    fn record(&self, mut e: PoolEvent) {
        let i = index(e.space);
        let mut log = self.log.lock().expect("policy log poisoned");
        e.seq = log.next;
        log.next += 1;
        let c = &mut log.counters;
        match e.kind {
            EventKind::LowWater => c.low_water[i] += 1,
            EventKind::Grown | EventKind::Limited => {
                if let (Some(a), Some(b)) = (e.old_size, e.new_size)
                    && b > a
                {
                    c.grown[i] += 1;
                    c.grown_bytes[i] += b - a;
                }
                if e.kind == EventKind::Limited {
                    c.limited[i] += 1;
                }
            }
            EventKind::CannotGrow => c.cannot_grow[i] += 1,
            EventKind::GrowFailed => c.failed[i] += 1,
        }
        if let Some(ms) = e.took_ms {
            c.longest_grow_ms = c.longest_grow_ms.max(ms);
        }
        let space = e.space;
        match e.kind {
            EventKind::Grown => tracing::info!(?space, seq = e.seq, "{}", e.message),
            EventKind::GrowFailed => tracing::error!(?space, seq = e.seq, "{}", e.message),
            _ => tracing::warn!(?space, seq = e.seq, "{}", e.message),
        }
        if log.events.len() == MAX_EVENTS {
            log.events.pop_front();
        }
        log.events.push_back(e);
    }
}

/// The running policy thread.
pub(crate) struct PolicyThread {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl PolicyThread {
    /// Check `policy` against the open pool and start watching it.
    pub fn start(pool: Arc<Pool>, policy: Arc<Policy>) -> Result<PolicyThread> {
        policy.cfg.check()?;
        policy.cfg.check_pool(&pool.space_usage())?;
        pool.watch_space(policy.cfg.threshold);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("thinpool-policy".into())
            .spawn(move || run(&pool, &policy, &stopping))
            .map_err(|source| Error::Thread {
                what: "space policy",
                source,
            })?;
        Ok(PolicyThread { stop, thread })
    }

    /// Stop (a grow under way finishes first) and join, which lets go of the pool.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        if self.thread.join().is_err() {
            tracing::error!("the space policy thread panicked");
        }
    }
}

fn run(pool: &Pool, policy: &Policy, stop: &AtomicBool) {
    let mut state = [SpaceState::default(), SpaceState::default()];
    let mut seen = 0;
    while !stop.load(Ordering::SeqCst) {
        for space in [Space::Data, Space::Metadata] {
            look(pool, policy, space, &mut state[index(space)]);
        }
        seen = pool.wait_space(seen, POLL);
    }
    pool.watch_space(0);
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Used and total blocks of `space`, and the bytes of one block.
fn blocks(u: &SpaceUsage, space: Space) -> (u64, u64, u64) {
    match space {
        Space::Data => (u.used_data_blocks, u.total_data_blocks, u.block_size),
        Space::Metadata => (u.used_metadata_blocks, u.total_metadata_blocks, META_BLOCK),
    }
}

fn name(space: Space) -> &'static str {
    match space {
        Space::Data => "data",
        Space::Metadata => "metadata",
    }
}

/// One look at `space`: record a crossing, grow while over the threshold.
fn look(pool: &Pool, policy: &Policy, space: Space, st: &mut SpaceState) {
    let cfg = &policy.cfg;
    // Bounded: each pass grows or returns; a pool filling faster than steps come is looked
    // at again at the next wake.
    for _ in 0..64 {
        let u = pool.space_usage();
        let (used, total, unit) = blocks(&u, space);
        if !u.at_or_over(cfg.threshold)[index(space)] {
            st.over = false;
            st.blocked = None;
            return;
        }
        let event = |kind, message: String| PoolEvent {
            seq: 0,
            time: now(),
            kind,
            space,
            used,
            total,
            old_size: None,
            new_size: None,
            took_ms: None,
            message,
        };
        let path = device_path(pool, space);
        let is_file = std::fs::metadata(path).is_ok_and(|m| m.is_file());
        if !st.over {
            st.over = true;
            let what = name(space);
            let advice = match (cfg.autogrow(space), is_file) {
                (Some(_), true) => String::new(),
                (_, false) => format!(
                    ": {} is a block device, extend it, then run `thinpool pool grow`",
                    path.display()
                ),
                (None, true) => format!(
                    ": grow it with `thinpool pool grow --{what}-size SIZE`, or set \
                     --{}autogrow-step",
                    if space == Space::Data {
                        ""
                    } else {
                        "metadata-"
                    }
                ),
            };
            policy.record(event(
                EventKind::LowWater,
                format!(
                    "{what} usage reached the {}% threshold: {used} of {total} blocks in use{advice}",
                    cfg.threshold
                ),
            ));
        }
        let Some(ag) = cfg.autogrow(space) else {
            return;
        };
        let blocked = |st: &mut SpaceState, kind, msg: String| {
            if st.blocked.as_deref() != Some(&msg) {
                policy.record(event(kind, msg.clone()));
                st.blocked = Some(msg);
            }
        };
        if !is_file {
            blocked(
                st,
                EventKind::CannotGrow,
                format!(
                    "the {} device {} is a block device: thinpool does not grow it; extend the \
                     device (e.g. lvextend), then run `thinpool pool grow`",
                    name(space),
                    path.display()
                ),
            );
            return;
        }
        if st.failed_at.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
            return;
        }
        let cur = total * unit;
        let (limit, limit_why) = match (space, ag.max) {
            (_, Some(m)) => (
                m,
                format!("its maximum, --max-{}-size {m} bytes", name(space)),
            ),
            (Space::Data, None) => (
                ((1u64 << 40) - 1) * unit,
                "dm-thin's limit of 2^40 - 1 data blocks".to_string(),
            ),
            (Space::Metadata, None) => (
                MAX_METADATA_SIZE,
                format!("dm-thin's metadata limit of {MAX_METADATA_SIZE} bytes"),
            ),
        };
        let want = cur.saturating_add(ag.step);
        let mut new = want.min(limit);
        let mut why = (new < want).then(|| limit_why.clone());
        let host = host_room(pool, space);
        if let Some(h) = &host
            && h.allowed < new
        {
            new = h.allowed;
            why = Some(format!(
                "the host file system holding {} has {} bytes free and the pool's files there \
                 may still take {} bytes before this grow",
                path.display(),
                h.free,
                h.may_take
            ));
        }
        let new = new / unit * unit;
        if new <= cur {
            let why = why.unwrap_or(limit_why);
            blocked(
                st,
                EventKind::Limited,
                format!(
                    "{} usage is at or over {}% but the device cannot grow past {cur} bytes: {why}",
                    name(space),
                    cfg.threshold
                ),
            );
            return;
        }
        let (data, meta) = match space {
            Space::Data => (Some(new), None),
            Space::Metadata => (None, Some(new)),
        };
        let t = Instant::now();
        // Without a commit: the pause is the metadata lock's part only (see
        // `Pool::grow_uncommitted`); the commit timer makes it durable within a second.
        let r = pool.grow_uncommitted(data, meta);
        let took_ms = Some(t.elapsed().as_millis() as u64);
        let sized = |mut e: PoolEvent| {
            e.old_size = Some(cur);
            e.new_size = Some(new);
            e.took_ms = took_ms;
            e
        };
        match r {
            Ok(()) => {
                st.blocked = None;
                st.failed_at = None;
                let (kind, msg) = match why {
                    None => (
                        EventKind::Grown,
                        format!(
                            "grew the {} device from {cur} to {new} bytes (usage {used} of {total} \
                             blocks, at or over {}%)",
                            name(space),
                            cfg.threshold
                        ),
                    ),
                    Some(why) => (
                        EventKind::Limited,
                        format!(
                            "grew the {} device from {cur} to {new} bytes only, less than the \
                             step of {} bytes: {why}",
                            name(space),
                            ag.step
                        ),
                    ),
                };
                policy.record(sized(event(kind, msg)));
            }
            Err(e) => {
                st.failed_at = Some(Instant::now());
                policy.record(sized(event(
                    EventKind::GrowFailed,
                    format!(
                        "growing the {} device from {cur} to {new} bytes failed: {}; the pool \
                         keeps its last commit, the grow is tried again in {} s",
                        name(space),
                        crate::handler::chain(&e),
                        RETRY_AFTER.as_secs()
                    ),
                )));
                return;
            }
        }
    }
}

fn device_path(pool: &Pool, space: Space) -> &Path {
    let (d, m) = pool.device_paths();
    match space {
        Space::Data => d,
        Space::Metadata => m,
    }
}

/// What the host file system under a device can take.
struct HostRoom {
    /// The largest size the device may have: its file's allocated bytes plus the free space,
    /// less what the pool's other file on the same file system may still take.
    allowed: u64,
    free: u64,
    /// What the pool's files there may still take now (virtual − allocated).
    may_take: u64,
}

/// `None` when the device is not a regular file or cannot be looked at.
fn host_room(pool: &Pool, space: Space) -> Option<HostRoom> {
    use std::os::unix::fs::MetadataExt as _;
    let path = device_path(pool, space);
    let other = match space {
        Space::Data => device_path(pool, Space::Metadata),
        Space::Metadata => device_path(pool, Space::Data),
    };
    let m = std::fs::metadata(path).ok().filter(|m| m.is_file())?;
    let st = rustix::fs::statvfs(path).ok()?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let alloc = m.blocks() * 512;
    let mut may_take = m.len().saturating_sub(alloc);
    let mut other_takes = 0;
    if let Ok(o) = std::fs::metadata(other)
        && o.is_file()
        && o.dev() == m.dev()
    {
        other_takes = o.len().saturating_sub(o.blocks() * 512);
        may_take += other_takes;
    }
    Some(HostRoom {
        allowed: (free + alloc).saturating_sub(other_takes),
        free,
        may_take,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ag(step: u64, max: Option<u64>) -> Option<Autogrow> {
        Some(Autogrow { step, max })
    }

    fn refused(p: SpacePolicy, want: &str) {
        let e = p.check().expect_err(want).to_string();
        assert!(e.contains(want), "{e}");
    }

    #[test]
    fn values_that_cannot_work_are_refused() {
        let ok = SpacePolicy::default();
        ok.check().unwrap();
        for t in [0, 100, 255] {
            refused(
                SpacePolicy { threshold: t, ..ok },
                "give a percentage from 1 to 99",
            );
        }
        refused(
            SpacePolicy {
                data: ag(0, None),
                ..ok
            },
            "--autogrow-step 0",
        );
        refused(
            SpacePolicy {
                metadata: ag(0, None),
                ..ok
            },
            "--metadata-autogrow-step 0",
        );
        refused(
            SpacePolicy {
                data: ag(1 << 30, Some(1 << 29)),
                ..ok
            },
            "smaller than one --autogrow-step",
        );
        refused(
            SpacePolicy {
                metadata: ag(4097, None),
                ..ok
            },
            "not a multiple of 4 KiB",
        );
        refused(
            SpacePolicy {
                metadata: ag(4096, Some(MAX_METADATA_SIZE + 4096)),
                ..ok
            },
            "dm-thin uses at most",
        );
        let u = SpaceUsage {
            used_data_blocks: 0,
            total_data_blocks: 1024,
            used_metadata_blocks: 0,
            total_metadata_blocks: 256,
            block_size: 1 << 20,
        };
        let pool_check = |p: SpacePolicy| p.check_pool(&u).map_err(|e| e.to_string());
        assert!(
            pool_check(SpacePolicy {
                data: ag(64 << 10, None),
                ..ok
            })
            .unwrap_err()
            .contains("not a multiple of the pool's block size (1048576 bytes)")
        );
        assert!(
            pool_check(SpacePolicy {
                data: ag(1 << 20, Some(512 << 20)),
                ..ok
            })
            .unwrap_err()
            .contains("smaller than the data device already is (1073741824 bytes)")
        );
        assert!(
            pool_check(SpacePolicy {
                metadata: ag(4096, Some(4096)),
                ..ok
            })
            .unwrap_err()
            .contains("smaller than the metadata device already is (1048576 bytes)")
        );
        pool_check(SpacePolicy {
            data: ag(1 << 20, Some(2 << 30)),
            metadata: ag(1 << 20, Some(2 << 20)),
            ..ok
        })
        .unwrap();
    }

    fn event(kind: EventKind, space: Space, sizes: Option<(u64, u64)>) -> PoolEvent {
        PoolEvent {
            seq: 0,
            time: 0,
            kind,
            space,
            used: 1,
            total: 2,
            old_size: sizes.map(|s| s.0),
            new_size: sizes.map(|s| s.1),
            took_ms: sizes.map(|_| 7),
            message: "m".into(),
        }
    }

    #[test]
    fn events_are_numbered_bounded_and_counted() {
        let p = Policy::new(SpacePolicy::default());
        p.record(event(EventKind::LowWater, Space::Data, None));
        p.record(event(EventKind::Grown, Space::Data, Some((10, 30))));
        p.record(event(EventKind::Limited, Space::Metadata, Some((8, 12))));
        p.record(event(EventKind::Limited, Space::Data, None));
        p.record(event(EventKind::CannotGrow, Space::Metadata, None));
        p.record(event(EventKind::GrowFailed, Space::Data, Some((30, 40))));
        let c = p.counters();
        assert_eq!(c.low_water, [1, 0]);
        assert_eq!(c.grown, [1, 1]);
        assert_eq!(c.grown_bytes, [20, 4]);
        assert_eq!(c.limited, [1, 1]);
        assert_eq!(c.cannot_grow, [0, 1]);
        assert_eq!(c.failed, [1, 0]);
        assert_eq!(c.longest_grow_ms, 7);
        let seqs: Vec<u64> = p.events(0).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
        assert_eq!(p.events(4).len(), 2);
        for _ in 0..MAX_EVENTS {
            p.record(event(EventKind::LowWater, Space::Data, None));
        }
        let all = p.events(0);
        assert_eq!(all.len(), MAX_EVENTS);
        assert_eq!(all[0].seq, 7, "the oldest went first");
        assert_eq!(all.last().unwrap().seq, 6 + MAX_EVENTS as u64);
    }
}
