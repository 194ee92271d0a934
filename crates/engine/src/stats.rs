//! Pool statistics: lock-free counters bumped on the I/O path, read as a [`PoolStats`]
//! snapshot (by the daemon's metrics endpoint, or anyone holding the [`Pool`](crate::Pool)).
//!
//! Cost on the I/O path: one `Instant::now()` when a public [`Volume`](crate::Volume) request
//! starts, one `elapsed()` and three `Relaxed` `fetch_add`s when it ends (an [`OpTimer`]
//! guard), one or two more per newly provisioned block. No lock, no allocation. Each kind of
//! request has its counters on a cache line of its own, so readers and writers on different
//! threads do not bounce one line between them.
//!
//! The counters are independent atomics: a snapshot taken while requests run may count a
//! request in one field and not yet in another. Each field is exact once the I/O stops.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde::Serialize;

/// A kind of [`Volume`](crate::Volume) request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IoOp {
    /// `read_at`, `read_sparse`.
    Read,
    /// `write_at`, and the write of `write_fua`.
    Write,
    /// `discard`.
    Discard,
    /// `write_zeroes`.
    WriteZeroes,
    /// `flush`, and the commit of `write_fua`.
    Flush,
}

impl IoOp {
    /// Every kind, in the order of [`PoolStats`]' fields.
    pub const ALL: [IoOp; 5] = [
        IoOp::Read,
        IoOp::Write,
        IoOp::Discard,
        IoOp::WriteZeroes,
        IoOp::Flush,
    ];

    /// Its name: `read`, `write`, `discard`, `write_zeroes`, `flush`.
    pub fn as_str(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Discard => "discard",
            IoOp::WriteZeroes => "write_zeroes",
            IoOp::Flush => "flush",
        }
    }
}

/// Upper bounds of the commit-latency histogram's buckets, in milliseconds; a last bucket
/// (+Inf) takes the slower commits.
pub const COMMIT_BUCKETS_MS: [f64; 10] = [0.5, 1., 2., 5., 10., 20., 50., 100., 200., 500.];

/// [`COMMIT_BUCKETS_MS`] in microseconds, as the histogram compares them.
const COMMIT_BUCKETS_US: [u64; 10] = [
    500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
];

/// Counters of one kind of request, on a cache line of their own.
#[derive(Default)]
#[repr(align(64))]
struct OpCounters {
    count: AtomicU64,
    bytes: AtomicU64,
    /// Nanoseconds: a 4 KiB read from the page cache takes a few microseconds, so summing
    /// whole microseconds would lose a large share of it.
    nanos: AtomicU64,
}

/// The live counters of a pool (one per `Inner`).
#[derive(Default)]
pub(crate) struct Stats {
    ops: [OpCounters; 5],
    provisioned: AtomicU64,
    cow: AtomicU64,
    sealed: AtomicU64,
    waited: AtomicU64,
    commit_micros: AtomicU64,
    /// Commits per bucket of [`COMMIT_BUCKETS_US`] (not cumulative); the last is +Inf.
    commit_buckets: [AtomicU64; 11],
}

/// Counts one request when dropped: its bytes, and the time since it was made.
#[must_use = "the request is counted when the timer is dropped"]
pub(crate) struct OpTimer<'a> {
    counters: &'a OpCounters,
    bytes: u64,
    start: Instant,
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        let c = self.counters;
        c.count.fetch_add(1, Relaxed);
        c.bytes.fetch_add(self.bytes, Relaxed);
        c.nanos
            .fetch_add(self.start.elapsed().as_nanos() as u64, Relaxed);
    }
}

impl Stats {
    /// Start timing a request of `bytes` bytes; it is counted (failed or not) when the
    /// returned guard drops.
    #[inline]
    pub fn timer(&self, op: IoOp, bytes: u64) -> OpTimer<'_> {
        OpTimer {
            counters: &self.ops[op as usize],
            bytes,
            start: Instant::now(),
        }
    }

    /// A data block was mapped for a write; `cow` when it replaced a shared block.
    #[inline]
    pub fn provisioned(&self, cow: bool) {
        self.provisioned.fetch_add(1, Relaxed);
        if cow {
            self.cow.fetch_add(1, Relaxed);
        }
    }

    /// A commit sealed its transaction for a second data sync (see `Inner::commit`), and
    /// `waited` mappings made meanwhile went into the next transaction.
    pub fn sealed(&self, waited: u64) {
        self.sealed.fetch_add(1, Relaxed);
        self.waited.fetch_add(waited, Relaxed);
    }

    /// A metadata commit took `took`.
    pub fn commit(&self, took: Duration) {
        let us = took.as_micros() as u64;
        self.commit_micros.fetch_add(us, Relaxed);
        let i = COMMIT_BUCKETS_US.partition_point(|&le| le < us);
        self.commit_buckets[i].fetch_add(1, Relaxed);
    }

    /// A snapshot of every counter. O(1), no lock.
    pub fn snapshot(&self) -> PoolStats {
        let op = |op: IoOp| {
            let c = &self.ops[op as usize];
            OpStats {
                count: c.count.load(Relaxed),
                bytes: c.bytes.load(Relaxed),
                latency_us: c.nanos.load(Relaxed) / 1000,
            }
        };
        let commit_buckets = std::array::from_fn(|i| self.commit_buckets[i].load(Relaxed));
        PoolStats {
            read: op(IoOp::Read),
            write: op(IoOp::Write),
            discard: op(IoOp::Discard),
            write_zeroes: op(IoOp::WriteZeroes),
            flush: op(IoOp::Flush),
            provisioned_blocks: self.provisioned.load(Relaxed),
            cow_copies: self.cow.load(Relaxed),
            sealed_commits: self.sealed.load(Relaxed),
            mappings_made_while_sealed: self.waited.load(Relaxed),
            commits: commit_buckets.iter().sum(),
            commit_latency_us: self.commit_micros.load(Relaxed),
            commit_buckets,
        }
    }
}

/// Counters of one kind of request since the pool was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OpStats {
    /// Requests, failed ones included.
    pub count: u64,
    /// Bytes asked for (the range's length for discard and write-zeroes, 0 for flush).
    pub bytes: u64,
    /// Time spent in these requests, summed, in microseconds (from the call to the return,
    /// waits for locks and for free space included).
    pub latency_us: u64,
}

/// A snapshot of a pool's counters since it was opened ([`Pool::stats`](crate::Pool::stats)).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// Reads.
    pub read: OpStats,
    /// Writes (a FUA write counts as a write and a flush).
    pub write: OpStats,
    /// Discards.
    pub discard: OpStats,
    /// Write-zeroes.
    pub write_zeroes: OpStats,
    /// Flushes.
    pub flush: OpStats,
    /// Data blocks mapped by writes (copy-on-write included).
    pub provisioned_blocks: u64,
    /// Writes to a block shared with a snapshot that moved it to a new block (its other bytes
    /// copied; none when the write covered the whole block).
    pub cow_copies: u64,
    /// Commits that synced the data a second time because mappings were made during the
    /// first sync; I/O went on during both syncs.
    pub sealed_commits: u64,
    /// Mappings made while a commit's second data sync ran: they went into the next
    /// transaction.
    pub mappings_made_while_sealed: u64,
    /// Metadata commits (a commit with nothing to write is not counted).
    pub commits: u64,
    /// Time spent in those commits (data sync and metadata write), summed, in microseconds.
    pub commit_latency_us: u64,
    /// Commits per latency bucket, not cumulative: `commit_buckets[i]` took more than
    /// `COMMIT_BUCKETS_MS[i - 1]` and at most `COMMIT_BUCKETS_MS[i]`; the last one, more than
    /// 500 ms. They add up to `commits`.
    pub commit_buckets: [u64; 11],
}

impl PoolStats {
    /// The counters of one kind of request.
    pub fn op(&self, op: IoOp) -> &OpStats {
        match op {
            IoOp::Read => &self.read,
            IoOp::Write => &self.write,
            IoOp::Discard => &self.discard,
            IoOp::WriteZeroes => &self.write_zeroes,
            IoOp::Flush => &self.flush,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_counts_on_drop_and_buckets_split_at_bounds() {
        let s = Stats::default();
        {
            let _t = s.timer(IoOp::Write, 4096);
            assert_eq!(s.snapshot().write.count, 0);
        }
        drop(s.timer(IoOp::Write, 100));
        drop(s.timer(IoOp::Flush, 0));
        let snap = s.snapshot();
        assert_eq!((snap.write.count, snap.write.bytes), (2, 4196));
        assert_eq!((snap.flush.count, snap.read.count), (1, 0));
        assert_eq!(snap.op(IoOp::Write), &snap.write);

        s.commit(Duration::from_micros(500)); // le 0.5 ms
        s.commit(Duration::from_micros(501)); // le 1 ms
        s.commit(Duration::from_millis(500)); // le 500 ms
        s.commit(Duration::from_secs(2)); // +Inf
        s.provisioned(false);
        s.provisioned(true);
        let snap = s.snapshot();
        assert_eq!(snap.commits, 4);
        assert_eq!(snap.commit_buckets, [1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1]);
        assert_eq!(snap.commit_latency_us, 500 + 501 + 500_000 + 2_000_000);
        assert_eq!((snap.provisioned_blocks, snap.cow_copies), (2, 1));
    }
}
