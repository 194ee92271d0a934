//! Out of data space (format spec 16.1) on a 64-block pool:
//!
//! - `error_if_no_space`: a write that needs a block (new mapping, or copy-on-write of a
//!   shared block) fails at once with kind NoSpace; reads and in-place writes go on; the pool
//!   reports `OutOfDataSpace`; what was written before is intact; freeing blocks (discard +
//!   commit) brings it back to `Write`; the metadata passes `thin_check` and our check.
//! - queueing with a 2 s `no_space_timeout`: the write waits, then fails with NoSpace after
//!   the timeout (not before, not much later).
//! - queueing: a waiting write completes when another thread grows the pool
//!   (`Pool::grow`), without a restart, and its data is there after a reopen.
//! - queueing: a waiting write also completes when a discard (and a commit) frees blocks.
//! - `min_free_percent`: new volumes and snapshots are refused (NoSpace) below the free
//!   percentage, and allowed again once blocks are freed.

use std::time::{Duration, Instant};

use thinpool_engine::{ErrorKind, Pool, PoolMode, PoolOptions, Volume};

use crate::common::*;

const BLOCKS: u64 = 64;

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
        let t = Instant::now();
        let r = a.write_at(&pattern(999, off, len as usize), off);
        assert_kind(
            r,
            ErrorKind::NoSpace,
            &format!("write [{off}, +{len}) on a full pool"),
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "error_if_no_space: the write took {:?} to fail",
            t.elapsed()
        );
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
    assert!(
        waited >= timeout - Duration::from_millis(100) && waited < timeout * 4,
        "queued write failed after {waited:?}, want about {timeout:?}"
    );
    assert_eq!(mode(&pool), PoolMode::OutOfDataSpace);
    // Reads and in-place writes are not queued.
    let t = Instant::now();
    a.write_at(&pattern(5, 4 * BS, BS as usize), 4 * BS)
        .unwrap();
    expect_block(&a, 4, 5, "in-place write while out of space");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "in-place write waited"
    );
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
        no_space_timeout: Duration::from_secs(30),
        min_free_percent: 0,
        commit_interval: None,
        ..Default::default()
    };
    let (dir, pool, a) = pool_with_volume(opts.clone());
    fill(&a, 0, BLOCKS);
    let t = Instant::now();
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let r = a.write_at(&pattern(BLOCKS + 1, BLOCKS * BS, BS as usize), BLOCKS * BS);
            (r, t.elapsed())
        });
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
        let grown = t.elapsed();
        let (r, done) = writer.join().unwrap();
        r.expect("the queued write after the pool grew");
        assert!(
            done < Duration::from_secs(25),
            "the queued write completed only after {done:?} (grown at {grown:?}): it waited for the timeout, not the growth"
        );
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
        no_space_timeout: Duration::from_secs(30),
        min_free_percent: 0,
        commit_interval: None,
        ..Default::default()
    };
    let (dir, pool, a) = pool_with_volume(opts);
    fill(&a, 0, BLOCKS);
    let t = Instant::now();
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let r = a.write_at(&pattern(BLOCKS + 1, BLOCKS * BS, BS as usize), BLOCKS * BS);
            (r, t.elapsed())
        });
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
        // Free four blocks; the commit makes them allocatable (section 16.1).
        a.discard(0, 4 * BS).unwrap();
        pool.commit().unwrap();
        let (r, done) = writer.join().unwrap();
        r.expect("the queued write after a discard freed space");
        assert!(
            done < Duration::from_secs(25),
            "the queued write completed only after {done:?}: it waited for the timeout"
        );
    });
    assert_eq!(mode(&pool), PoolMode::Write);
    for b in 4..=BLOCKS {
        expect_block(&a, b, b + 1, "after the queued write");
    }
    drop(a);
    pool.close().unwrap();
    check_closed_pool(dir.path(), oracle, "pool after a queued write");
}
