//! Out of data space (format spec 16.1) on a 64-block pool:
//!
//! - `error_if_no_space`: a write that needs a block (new mapping, or copy-on-write of a
//!   shared block) fails at once with kind NoSpace; reads and in-place writes go on; the pool
//!   reports `OutOfDataSpace`; what was written before is intact; freeing blocks (discard +
//!   commit) brings it back to `Write`; the metadata passes `thin_check` and our check.
//! - queueing with a 2 s `no_space_timeout`: the write waits, then fails with NoSpace, not
//!   before the timeout.
//! - queueing: a waiting write completes when another thread grows the pool
//!   (`Pool::grow`), without a restart, and its data is there after a reopen.
//! - queueing: while a write waits, an in-place write and a read complete; the waiting write
//!   completes when a discard (and a commit) frees blocks.
//!
//! The tests assert order and outcome, never how fast something was (CI machines are loaded):
//! "at once" means "before anything freed space", and a waiting write that is meant to be
//! released by a grow or a discard has a timeout of an hour, so only the release can complete
//! it. [`HANG_GUARD`] only keeps a wrong wait from hanging the test.
//! - `min_free_percent`: new volumes and snapshots are refused (NoSpace) below the free
//!   percentage, and allowed again once blocks are freed.

use std::sync::mpsc;
use std::thread::Scope;
use std::time::{Duration, Instant};

use thinpool_engine::{ErrorKind, Pool, PoolMode, PoolOptions, Volume};

use crate::common::*;

const BLOCKS: u64 = 64;

/// The no-space timeout of writes that only a grow or a discard may release.
const NEVER: Duration = Duration::from_secs(3600);

/// How long an operation that must not wait for space may take before the test calls it
/// waiting. A bound against hanging the test, far above any real duration; no assertion is
/// made about durations below it.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// Run `op` on a thread of `s` and return its result — the operation must complete while the
/// pool stays full. If it is still running after [`HANG_GUARD`], `release` frees space (so the
/// thread can end) and the test fails with `what`.
fn without_waiting<'scope, T: Send + 'scope>(
    s: &'scope Scope<'scope, '_>,
    op: impl FnOnce() -> T + Send + 'scope,
    release: impl FnOnce(),
    what: &str,
) -> T {
    let (tx, rx) = mpsc::channel();
    s.spawn(move || tx.send(op()));
    match rx.recv_timeout(HANG_GUARD) {
        Ok(r) => r,
        Err(_) => {
            release();
            panic!("{what}: still waiting for space after {HANG_GUARD:?}");
        }
    }
}

/// A pool of [`BLOCKS`] blocks with one over-provisioned volume "a" (256 blocks).
fn pool_with_volume(opts: PoolOptions) -> (tempfile::TempDir, Pool, Volume) {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(dir.path(), &small_config(BLOCKS, 4), opts).unwrap();
    pool.create_volume("a", 4 * BLOCKS * BS).unwrap();
    let a = pool.open_volume("a").unwrap();
    (dir, pool, a)
}

/// Write virtual blocks `from..to` of `v` whole, block b with pattern b + 1.
fn fill(v: &Volume, from: u64, to: u64) {
    for b in from..to {
        v.write_at(&pattern(b + 1, b * BS, BS as usize), b * BS)
            .unwrap_or_else(|e| panic!("filling block {b}: {e}"));
    }
}

/// Virtual block `b` of `v` holds pattern `id`.
fn expect_block(v: &Volume, b: u64, id: u64, what: &str) {
    let mut buf = vec![0u8; BS as usize];
    v.read_at(&mut buf, b * BS)
        .unwrap_or_else(|e| panic!("{what}: read block {b}: {e}"));
    let want = pattern(id, b * BS, BS as usize);
    if let Some((i, g, w)) = first_diff(&buf, &want) {
        panic!("{what}: block {b} byte {i} is {g:#04x}, want {w:#04x} (pattern {id})");
    }
}

fn mode(pool: &Pool) -> PoolMode {
    pool.status().unwrap().mode
}

#[test]
fn error_if_no_space_fails_at_once_and_keeps_data() {
    let oracle = have_tool("thin_check");
    let opts = PoolOptions {
        error_if_no_space: true,
        // If the write queued instead of failing, only the test's release could end it.
        no_space_timeout: NEVER,
        min_free_percent: 0,
        commit_interval: None,
        ..Default::default()
    };
    let (dir, pool, a) = pool_with_volume(opts);
    fill(&a, 0, BLOCKS);
    let st = pool.status().unwrap();
    assert_eq!(
        (st.used_data_blocks, st.total_data_blocks),
        (BLOCKS, BLOCKS),
        "{st:?}"
    );

    // A whole new block, a partial new block: NoSpace at once.
    for (off, len) in [(BLOCKS * BS, BS), ((BLOCKS + 1) * BS + 512, 4096)] {
        let what = format!("write [{off}, +{len}) on a full pool with error_if_no_space");
        let r = std::thread::scope(|s| {
            without_waiting(
                s,
                || a.write_at(&pattern(999, off, len as usize), off),
                || {
                    pool.grow(Some(2 * BLOCKS * BS), None).unwrap();
                },
                &what,
            )
        });
        assert_kind(r, ErrorKind::NoSpace, &what);
    }
    assert_eq!(mode(&pool), PoolMode::OutOfDataSpace, "mode after NoSpace");
    // The failed writes left nothing behind.
    let mut buf = vec![0xEEu8; 2 * BS as usize];
    a.read_at(&mut buf, BLOCKS * BS).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "blocks whose writes failed with NoSpace are not zero"
    );
    assert_eq!(
        a.mapped_extents(BLOCKS * BS, 4 * BS).unwrap(),
        vec![],
        "failed writes left mappings"
    );

    // In-place overwrite of an exclusive block works; reads work.
    a.write_at(&pattern(1000, 10 * BS + 100, 300), 10 * BS + 100)
        .expect("in-place write on a full pool");
    let mut got = vec![0u8; 300];
    a.read_at(&mut got, 10 * BS + 100).unwrap();
    assert_eq!(got, pattern(1000, 10 * BS + 100, 300));

    // Copy-on-write needs a block: NoSpace, and neither side changes.
    pool.snapshot("a", "snap")
        .expect("snapshot (min_free_percent 0)");
    let snap = pool.open_volume("snap").unwrap();
    assert_kind(
        a.write_at(&pattern(1001, 3 * BS, 512), 3 * BS),
        ErrorKind::NoSpace,
        "copy-on-write of a shared block on a full pool",
    );
    expect_block(&a, 3, 4, "origin after the failed copy-on-write");
    expect_block(&snap, 3, 4, "snapshot after the failed copy-on-write");
    drop(snap);
    pool.remove_volume("snap").unwrap();

    // Everything written before is intact.
    for b in 0..BLOCKS {
        if b != 10 {
            expect_block(&a, b, b + 1, "after NoSpace");
        }
    }

    // Free 8 blocks: after a commit the pool is writable again.
    a.discard(0, 8 * BS).unwrap();
    pool.commit().unwrap();
    fill(&a, BLOCKS, BLOCKS + 8);
    assert_eq!(mode(&pool), PoolMode::Write, "mode after freeing blocks");
    assert_kind(
        a.write_at(&[1u8; 512], (BLOCKS + 8) * BS),
        ErrorKind::NoSpace,
        "full again",
    );
    for b in 8..BLOCKS + 8 {
        if b != 10 {
            expect_block(&a, b, b + 1, "at the end");
        }
    }
    drop(a);
    pool.close().unwrap();
    check_closed_pool(dir.path(), oracle, "error_if_no_space pool");
    let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
    let a = pool.open_volume("a").unwrap();
    for b in 11..BLOCKS + 8 {
        expect_block(&a, b, b + 1, "after reopen");
    }
}

#[test]
fn queued_write_fails_after_no_space_timeout() {
    let oracle = have_tool("thin_check");
    let timeout = Duration::from_secs(2);
    let opts = PoolOptions {
        error_if_no_space: false,
        no_space_timeout: timeout,
        min_free_percent: 0,
        commit_interval: None,
        ..Default::default()
    };
    let (dir, pool, a) = pool_with_volume(opts);
    fill(&a, 0, BLOCKS);
    let t = Instant::now();
    let r = a.write_at(&pattern(999, BLOCKS * BS, 4096), BLOCKS * BS);
    let waited = t.elapsed();
    assert_kind(r, ErrorKind::NoSpace, "queued write on a full pool");
    // Not before the timeout (a monotonic clock: load only makes this longer).
    assert!(
        waited >= timeout,
        "queued write failed after {waited:?}, before its {timeout:?} timeout"
    );
    assert_eq!(mode(&pool), PoolMode::OutOfDataSpace);
    // In-place writes still work while out of space.
    a.write_at(&pattern(5, 4 * BS, BS as usize), 4 * BS)
        .unwrap();
    expect_block(&a, 4, 5, "in-place write while out of space");
    for b in 0..BLOCKS {
        expect_block(&a, b, b + 1, "after the timeout");
    }
    drop(a);
    pool.close().unwrap();
    check_closed_pool(dir.path(), oracle, "queue_if_no_space pool");
}

#[test]
fn queued_write_completes_when_the_pool_grows() {
    let oracle = have_tool("thin_check");
    let opts = PoolOptions {
        error_if_no_space: false,
        no_space_timeout: NEVER,
        min_free_percent: 0,
        commit_interval: None,
        ..Default::default()
    };
    let (dir, pool, a) = pool_with_volume(opts.clone());
    fill(&a, 0, BLOCKS);
    std::thread::scope(|s| {
        let writer =
            s.spawn(|| a.write_at(&pattern(BLOCKS + 1, BLOCKS * BS, BS as usize), BLOCKS * BS));
        // Wait until the pool says it is out of space (the writer is then queued).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = false;
        while Instant::now() < deadline && !writer.is_finished() {
            if mode(&pool) == PoolMode::OutOfDataSpace {
                seen = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !writer.is_finished(),
            "the write on a full pool did not wait: {:?}",
            writer.join().unwrap()
        );
        assert!(
            seen,
            "the pool never reported OutOfDataSpace while a write waited for space"
        );
        pool.grow(Some(2 * BLOCKS * BS), None)
            .expect("grow while a write waits");
        // With a timeout of an hour, only the growth can have completed it.
        writer
            .join()
            .unwrap()
            .expect("the queued write after the pool grew");
    });
    let st = pool.status().unwrap();
    assert_eq!(st.total_data_blocks, 2 * BLOCKS, "{st:?}");
    assert_eq!(st.mode, PoolMode::Write, "{st:?}");
    fill(&a, BLOCKS + 1, 2 * BLOCKS);
    let st = pool.status().unwrap();
    assert_eq!(st.used_data_blocks, 2 * BLOCKS, "{st:?}");
    drop(a);
    pool.close().unwrap();
    check_closed_pool(dir.path(), oracle, "grown pool");
    let pool = Pool::open(dir.path(), opts).unwrap();
    assert_eq!(pool.status().unwrap().total_data_blocks, 2 * BLOCKS);
    let a = pool.open_volume("a").unwrap();
    for b in 0..2 * BLOCKS {
        expect_block(&a, b, b + 1, "grown pool after reopen");
    }
}

#[test]
fn min_free_percent_refuses_new_volumes() {
    let oracle = have_tool("thin_check");
    let opts = PoolOptions {
        error_if_no_space: true,
        min_free_percent: 10,
        commit_interval: None,
        ..Default::default()
    };
    let (dir, pool, a) = pool_with_volume(opts);
    // 57 of 64 used: 7 free = 10.9 %, still allowed.
    fill(&a, 0, 57);
    pool.create_volume("b", BS).expect("create at 10.9 % free");
    pool.snapshot("a", "s1").expect("snapshot at 10.9 % free");
    // 58 used: 6 free = 9.4 %, refused. Writes still go on.
    fill(&a, 57, 58);
    assert_kind(
        pool.create_volume("c", BS),
        ErrorKind::NoSpace,
        "create at 9.4 % free",
    );
    assert_kind(
        pool.snapshot("a", "s2"),
        ErrorKind::NoSpace,
        "snapshot at 9.4 % free",
    );
    assert!(
        pool.volume_info("c").is_err() && pool.volume_info("s2").is_err(),
        "refused volumes exist"
    );
    fill(&a, 58, 60);
    // Free blocks: allowed again after a commit.
    pool.remove_volume("s1").unwrap();
    a.discard(0, 10 * BS).unwrap();
    pool.commit().unwrap();
    pool.create_volume("c", BS)
        .expect("create after freeing blocks");
    pool.snapshot("a", "s2")
        .expect("snapshot after freeing blocks");
    let names: Vec<String> = pool
        .volumes()
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["a", "b", "c", "s2"]);
    for b in 10..60 {
        expect_block(&a, b, b + 1, "after the refusals");
    }
    drop(a);
    pool.close().unwrap();
    check_closed_pool(dir.path(), oracle, "min_free_percent pool");
}

#[test]
fn queued_write_completes_when_a_discard_frees_space() {
    let oracle = have_tool("thin_check");
    let opts = PoolOptions {
        error_if_no_space: false,
        no_space_timeout: NEVER,
        min_free_percent: 0,
        commit_interval: None,
        ..Default::default()
    };
    let (dir, pool, a) = pool_with_volume(opts);
    fill(&a, 0, BLOCKS);
    std::thread::scope(|s| {
        let writer =
            s.spawn(|| a.write_at(&pattern(BLOCKS + 1, BLOCKS * BS, BS as usize), BLOCKS * BS));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && !writer.is_finished()
            && mode(&pool) != PoolMode::OutOfDataSpace
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !writer.is_finished(),
            "the write on a full pool did not wait: {:?}",
            writer.join().unwrap()
        );
        assert_eq!(mode(&pool), PoolMode::OutOfDataSpace, "while a write waits");
        // Reads and in-place writes are not queued behind it: they complete while it waits.
        let free_four = || {
            a.discard(0, 4 * BS).unwrap();
            pool.commit().unwrap();
        };
        without_waiting(
            s,
            || {
                a.write_at(&pattern(6, 5 * BS, BS as usize), 5 * BS)
                    .expect("in-place write while a write waits for space");
                expect_block(&a, 5, 6, "in-place write while a write waits for space");
            },
            free_four,
            "an in-place write and a read while another write waits for space",
        );
        assert!(
            !writer.is_finished(),
            "the waiting write finished before any space was freed: {:?}",
            writer.join().unwrap()
        );
        // Free four blocks; the commit makes them allocatable (section 16.1).
        free_four();
        // With a timeout of an hour, only the freed blocks can have completed it.
        writer
            .join()
            .unwrap()
            .expect("the queued write after a discard freed space");
    });
    assert_eq!(mode(&pool), PoolMode::Write);
    for b in 4..=BLOCKS {
        let id = if b == 5 { 6 } else { b + 1 };
        expect_block(&a, b, id, "after the queued write");
    }
    drop(a);
    pool.close().unwrap();
    check_closed_pool(dir.path(), oracle, "pool after a queued write");
}
