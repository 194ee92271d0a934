//! `Pool::stats`: each public request is counted once with its bytes, new blocks and
//! copy-on-writes are counted where they are mapped, and commits where metadata is written.

use thinpool_engine::{IoOp, Pool, PoolConfig, PoolOptions, PoolStats};

use crate::common::BS;

fn pool(dir: &std::path::Path) -> Pool {
    let cfg = PoolConfig {
        data_size: 64 << 20,
        metadata_size: 4 << 20,
        ..Default::default()
    };
    // No commit timer: every commit below is one the test asked for.
    let opts = PoolOptions {
        commit_interval: None,
        ..Default::default()
    };
    Pool::create(dir, &cfg, opts).unwrap()
}

/// `after - before` for every counter that a test looks at.
fn delta(before: &PoolStats, after: &PoolStats) -> PoolStats {
    let mut d = PoolStats::default();
    for op in IoOp::ALL {
        let (b, a) = (before.op(op), after.op(op));
        let out = match op {
            IoOp::Read => &mut d.read,
            IoOp::Write => &mut d.write,
            IoOp::Discard => &mut d.discard,
            IoOp::WriteZeroes => &mut d.write_zeroes,
            IoOp::Flush => &mut d.flush,
        };
        out.count = a.count - b.count;
        out.bytes = a.bytes - b.bytes;
        out.latency_us = a.latency_us - b.latency_us;
    }
    d.provisioned_blocks = after.provisioned_blocks - before.provisioned_blocks;
    d.cow_copies = after.cow_copies - before.cow_copies;
    d.commits = after.commits - before.commits;
    d
}

#[test]
fn requests_provisioning_cow_and_commits_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(dir.path());
    pool.create_volume("a", 16 << 20).unwrap();
    let a = pool.open_volume("a").unwrap();
    let s0 = pool.stats();
    assert_eq!(s0.write.count, 0);
    assert!(s0.commits >= 1, "creating a volume commits: {s0:?}");

    // N 4 KiB writes into N fresh blocks, then the same blocks again (in place).
    const N: u64 = 10;
    for i in 0..N {
        a.write_at(&[7u8; 4096], i * BS).unwrap();
    }
    for i in 0..N {
        a.write_at(&[8u8; 4096], i * BS + 4096).unwrap();
    }
    let d = delta(&s0, &pool.stats());
    assert_eq!((d.write.count, d.write.bytes), (2 * N, 2 * N * 4096));
    assert_eq!((d.provisioned_blocks, d.cow_copies), (N, 0));
    assert_eq!(d.commits, 0, "no commit before a flush: {d:?}");

    // One read over two blocks is one request (read_at goes through read_sparse).
    let mut buf = vec![0u8; 2 * BS as usize];
    a.read_at(&mut buf, 0).unwrap();
    a.read_sparse(&mut buf[..512], 3 * BS).unwrap();
    let s1 = pool.stats();
    let d = delta(&s0, &s1);
    assert_eq!((d.read.count, d.read.bytes), (2, 2 * BS + 512));

    // A flush of a dirty pool: one flush request, one commit; a flush with nothing to write
    // is a request but no commit.
    a.flush().unwrap();
    a.flush().unwrap();
    let s2 = pool.stats();
    let d = delta(&s1, &s2);
    assert_eq!((d.flush.count, d.flush.bytes, d.commits), (2, 0, 1));
    assert_eq!(s2.commit_buckets.iter().sum::<u64>(), s2.commits);

    // A snapshot, then a partial write to a shared block: one copy-on-write. A second write
    // to the same block finds it exclusive: none.
    pool.snapshot("a", "snap").unwrap();
    let s3 = pool.stats();
    a.write_at(&[9u8; 100], 10).unwrap();
    a.write_at(&[9u8; 100], 1000).unwrap();
    let d = delta(&s3, &pool.stats());
    assert_eq!(
        (d.write.count, d.provisioned_blocks, d.cow_copies),
        (2, 1, 1)
    );

    // FUA: a write and a flush, one commit.
    let s4 = pool.stats();
    a.write_fua(&[1u8; 4096], 20 * BS).unwrap();
    let d = delta(&s4, &pool.stats());
    assert_eq!((d.write.count, d.flush.count, d.commits), (1, 1, 1));
    assert_eq!(d.provisioned_blocks, 1);

    // Discard and write-zeroes count the length asked for, whatever they unmap.
    let s5 = pool.stats();
    a.discard(0, 2 * BS).unwrap();
    a.write_zeroes(5 * BS, 3 * BS + 10).unwrap();
    let d = delta(&s5, &pool.stats());
    assert_eq!((d.discard.count, d.discard.bytes), (1, 2 * BS));
    assert_eq!(
        (d.write_zeroes.count, d.write_zeroes.bytes),
        (1, 3 * BS + 10)
    );
    assert_eq!(d.write.count, 0, "write-zeroes is not also a write");

    // A failed request is counted too.
    let s6 = pool.stats();
    assert!(a.write_at(&[0u8; 10], 16 << 20).is_err());
    assert_eq!(delta(&s6, &pool.stats()).write.count, 1);

    let json = serde_json::to_value(pool.stats()).unwrap();
    assert!(json["write_zeroes"]["count"].is_u64(), "{json}");
    drop(a);
    pool.close().unwrap();
}
