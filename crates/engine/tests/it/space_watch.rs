//! The space watch the daemon's space policy waits on (`Pool::watch_space`,
//! `Pool::wait_space`, `Pool::space_usage`), on a 64-block pool watched at 50 %:
//!
//! - below the level nothing rings; the allocation that reaches it rings once, and further
//!   allocations over the level do not ring again;
//! - a grow re-arms it: filling the grown pool to the level rings again;
//! - `space_usage` agrees with `status` (which commits) and reads without a commit.

use std::time::Duration;

use thinpool_engine::{Pool, PoolOptions, Volume};

use crate::common::*;

const BLOCKS: u64 = 64;
/// Long enough for a ring that is due to be seen; a ring that is not due never comes.
const WAIT: Duration = Duration::from_millis(200);

fn fill(v: &Volume, from: u64, to: u64) {
    for b in from..to {
        v.write_at(&pattern(b + 1, b * BS, BS as usize), b * BS)
            .unwrap_or_else(|e| panic!("filling block {b}: {e}"));
    }
}

#[test]
fn the_watch_rings_once_per_crossing_and_a_grow_rearms_it() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(
        dir.path(),
        &small_config(BLOCKS, 4),
        PoolOptions {
            commit_interval: None,
            ..PoolOptions::default()
        },
    )
    .unwrap();
    pool.create_volume("a", 8 * BLOCKS * BS).unwrap();
    let a = pool.open_volume("a").unwrap();
    pool.watch_space(50);

    fill(&a, 0, 31);
    assert_eq!(pool.wait_space(0, WAIT), 0, "31 of 64 blocks: below 50 %");
    let u = pool.space_usage();
    assert_eq!((u.used_data_blocks, u.total_data_blocks), (31, BLOCKS));
    assert_eq!(u.block_size, BS);
    assert_eq!(u.at_or_over(50), [false, false]);

    fill(&a, 31, 32);
    assert_eq!(pool.wait_space(0, WAIT), 1, "32 of 64: the level");
    fill(&a, 32, 40);
    assert_eq!(
        pool.wait_space(1, WAIT),
        1,
        "over the level: no second ring"
    );

    // The status commits; the usage read without one agrees with it.
    let st = pool.status().unwrap();
    let u = pool.space_usage();
    assert_eq!(u.used_data_blocks, st.used_data_blocks);
    assert_eq!(u.used_metadata_blocks, st.used_metadata_blocks);
    assert_eq!(u.total_metadata_blocks, st.total_metadata_blocks);

    // 40 of 128 after the grow: under the level, re-armed; 64 of 128 rings again.
    pool.grow(Some(2 * BLOCKS * BS), None).unwrap();
    assert_eq!(pool.wait_space(1, WAIT), 1);
    fill(&a, 40, 63);
    assert_eq!(pool.wait_space(1, WAIT), 1, "63 of 128");
    fill(&a, 63, 64);
    assert_eq!(pool.wait_space(1, WAIT), 2, "64 of 128");

    // Off: nothing rings.
    pool.watch_space(0);
    pool.grow(Some(4 * BLOCKS * BS), None).unwrap();
    fill(&a, 64, 200);
    assert_eq!(pool.wait_space(2, WAIT), 2);
    drop(a);
    pool.close().unwrap();
    check_closed_pool(dir.path(), have_tool("thin_check"), "after the watch");
}

/// `Pool::grow_uncommitted` leaves the commit to the timer; a crash before it leaves the data
/// file grown and the metadata at its last commit: the next open takes the file's size, and
/// what was committed is there.
#[test]
fn an_uncommitted_grow_is_taken_at_the_next_open_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let opts = PoolOptions {
        commit_interval: None,
        ..PoolOptions::default()
    };
    let pool = Pool::create(dir.path(), &small_config(BLOCKS, 4), opts.clone()).unwrap();
    pool.create_volume("a", 8 * BLOCKS * BS).unwrap();
    let a = pool.open_volume("a").unwrap();
    fill(&a, 0, 10);
    pool.commit().unwrap();
    pool.grow_uncommitted(Some(2 * BLOCKS * BS), None).unwrap();
    assert_eq!(pool.space_usage().total_data_blocks, 2 * BLOCKS);
    // The files as a crash now leaves them (nothing was committed since the grow).
    let crash = tempfile::tempdir().unwrap();
    std::fs::create_dir(crash.path().join("pool")).unwrap();
    for f in ["pool/data", "pool/metadata", "volumes.json"] {
        std::fs::copy(dir.path().join(f), crash.path().join(f))
            .unwrap_or_else(|e| panic!("copying {f}: {e}"));
    }
    assert_eq!(
        std::fs::metadata(crash.path().join("pool/data"))
            .unwrap()
            .len(),
        2 * BLOCKS * BS
    );
    drop(a);
    pool.close().unwrap();

    // Read-only, the metadata's own size shows: the grow was not committed.
    let look = Pool::open(
        crash.path(),
        PoolOptions {
            read_only: true,
            ..opts.clone()
        },
    )
    .unwrap();
    assert_eq!(look.space_usage().total_data_blocks, BLOCKS);
    drop(look);
    let back = Pool::open(crash.path(), opts).unwrap();
    assert_eq!(back.status().unwrap().total_data_blocks, 2 * BLOCKS);
    let a = back.open_volume("a").unwrap();
    for b in 0..10 {
        let mut buf = vec![0u8; BS as usize];
        a.read_at(&mut buf, b * BS).unwrap();
        assert!(
            first_diff(&buf, &pattern(b + 1, b * BS, BS as usize)).is_none(),
            "block {b}"
        );
    }
    drop(a);
    back.close().unwrap();
    check_closed_pool(crash.path(), have_tool("thin_check"), "after the crash");
}
