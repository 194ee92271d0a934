//! New blocks read zeros where a write does not cover them, whatever the block held before.
//!
//! Provisioning skips zeroing (punching) a block only when the pool knows it reads zeros: a
//! fresh data file it created, or a block it punched after freeing it. These tests make every
//! data block hold old bytes first (whole-block writes over the whole pool), free them all,
//! and then provision with partial writes and copy-on-write, with and without discard
//! passdown (without it, freed blocks keep their bytes), before and after a reopen (which
//! forgets what was known), and on a pool created on a given, non-blank data file.

use thinpool_engine::{Pool, PoolConfig, PoolOptions, Volume};

use crate::common::*;

const BLOCKS: u64 = 32;

fn opts(discard_passdown: bool) -> PoolOptions {
    PoolOptions {
        commit_interval: None,
        discard_passdown,
        min_free_percent: 0,
        ..Default::default()
    }
}

/// Whole-block writes to every data block of the pool through volume `v` (as big as the
/// pool), then a discard of it all and a commit: every block is free and holds old bytes
/// (unless discard passdown punched it).
fn dirty_every_block(pool: &Pool, v: &Volume) {
    for b in 0..BLOCKS {
        v.write_at(&pattern(1000 + b, b * BS, BS as usize), b * BS)
            .unwrap();
    }
    pool.commit().unwrap();
    assert_eq!(pool.status().unwrap().used_data_blocks, BLOCKS);
    v.discard(0, BLOCKS * BS).unwrap();
    pool.commit().unwrap();
    assert_eq!(pool.status().unwrap().used_data_blocks, 0);
}

/// Block `b` of `v` reads `want`.
#[track_caller]
fn expect(v: &Volume, b: u64, want: &[u8], what: &str) {
    let mut got = vec![0u8; BS as usize];
    v.read_at(&mut got, b * BS).unwrap();
    if let Some((i, g, w)) = first_diff(&got, want) {
        panic!("{what}: block {b} byte {i} is {g:#04x}, want {w:#04x}");
    }
}

/// Partial writes into reused blocks, then copy-on-write of those into reused blocks; every
/// block must read the writes and zeros elsewhere.
fn provision_and_check(pool: &Pool, what: &str) {
    let v = pool.open_volume("v").unwrap();
    let half = BLOCKS / 2;
    let mut want = vec![vec![0u8; BS as usize]; half as usize];
    for b in 0..half {
        let off = (b % 16) * 4096;
        let data = pattern(b + 1, b * BS + off, 4096);
        v.write_at(&data, b * BS + off).unwrap();
        want[b as usize][off as usize..off as usize + 4096].copy_from_slice(&data);
    }
    for b in 0..half {
        expect(&v, b, &want[b as usize], &format!("{what}: provisioned"));
    }
    pool.snapshot("v", "s").unwrap();
    let s = pool.open_volume("s").unwrap();
    for b in 0..half {
        let off = ((b + 5) % 16) * 4096 + 100;
        let data = pattern(b + 500, b * BS + off, 3000);
        v.write_at(&data, b * BS + off).unwrap();
        let w = &mut want[b as usize];
        let mut old = w.clone();
        w[off as usize..off as usize + 3000].copy_from_slice(&data);
        expect(&v, b, w, &format!("{what}: copied on write"));
        std::mem::swap(w, &mut old);
        expect(&s, b, w, &format!("{what}: snapshot after copy-on-write"));
        std::mem::swap(w, &mut old);
    }
    drop(s);
    pool.remove_volume("s").unwrap();
    v.discard(0, BLOCKS * BS).unwrap();
    pool.commit().unwrap();
}

/// Volume `v` over the whole pool, every block dirtied and freed, then two rounds of
/// [`provision_and_check`] (the second on blocks the first freed).
fn dirty_then_provision_twice(pool: &Pool, what: &str) {
    pool.create_volume("v", BLOCKS * BS).unwrap();
    let v = pool.open_volume("v").unwrap();
    dirty_every_block(pool, &v);
    drop(v);
    provision_and_check(pool, what);
    provision_and_check(pool, &format!("{what}, second round"));
}

#[test]
fn reused_blocks_read_zeros_around_partial_writes() {
    for passdown in [false, true] {
        let what = format!("discard_passdown {passdown}");
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::create(dir.path(), &small_config(BLOCKS, 4), opts(passdown)).unwrap();
        dirty_then_provision_twice(&pool, &what);
        pool.close().unwrap();
        let pool = Pool::open(dir.path(), opts(passdown)).unwrap();
        provision_and_check(&pool, &format!("{what}, reopened"));
        let v = pool.open_volume("v").unwrap();
        dirty_every_block(&pool, &v);
        drop(v);
        provision_and_check(&pool, &format!("{what}, reopened and dirtied"));
        pool.close().unwrap();
    }
}

/// A pool created on a data file we did not make (here: full of old bytes) knows nothing
/// about its blocks.
#[test]
fn a_given_data_file_is_not_assumed_blank() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("given-data");
    std::fs::write(&data, vec![0x5au8; (BLOCKS * BS) as usize]).unwrap();
    let cfg = PoolConfig {
        data_path: Some(data),
        ..small_config(BLOCKS, 4)
    };
    let root = dir.path().join("root");
    let pool = Pool::create(&root, &cfg, opts(false)).unwrap();
    pool.create_volume("v", BLOCKS * BS).unwrap();
    provision_and_check(&pool, "given data file");
    pool.close().unwrap();
}

/// Copy-on-write both ways: a block read and written whole (file systems that copy bytes),
/// and copied in parts around the write by `copy_file_range` (those that share extents: the
/// device here only says so, the copy is the same call), over blocks that hold old bytes.
#[test]
fn copy_on_write_by_bytes_and_by_reference_reads_right() {
    use std::sync::Arc;
    for by_reference in [false, true] {
        let what = format!("copies by reference: {by_reference}");
        let dir = tempfile::tempdir().unwrap();
        let file = thinpool_io::FileDevice::create(&dir.path().join("data"), BLOCKS * BS).unwrap();
        let data = Arc::new(Hooked {
            by_reference,
            ..Hooked::new(Arc::new(file))
        });
        let meta: Arc<dyn thinpool_io::BlockDevice> =
            Arc::new(thinpool_io::FileDevice::create(&dir.path().join("meta"), 4 << 20).unwrap());
        let root = dir.path().join("root");
        let pool = Pool::create_on(&root, data, meta, BS, opts(false)).unwrap();
        dirty_then_provision_twice(&pool, &what);
        pool.close().unwrap();
    }
}

/// A pool on a given sparse file, and one opened again, know the free blocks that lie in the
/// file's holes: provisioning punches exactly the free blocks that hold data (freed without
/// passdown), never a hole, and every new block reads zeros around its write.
#[test]
fn free_blocks_in_the_data_files_holes_are_not_punched() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let (data_path, meta_path) = (dir.path().join("data"), dir.path().join("meta"));
    let file = thinpool_io::FileDevice::create(&data_path, BLOCKS * BS).unwrap();
    let data = Arc::new(Hooked::new(Arc::new(file)));
    let meta: Arc<dyn thinpool_io::BlockDevice> =
        Arc::new(thinpool_io::FileDevice::create(&meta_path, 4 << 20).unwrap());
    let root = dir.path().join("root");
    let pool = Pool::create_on(&root, data.clone(), meta.clone(), BS, opts(false)).unwrap();
    pool.create_volume("v", BLOCKS * BS).unwrap();
    let v = pool.open_volume("v").unwrap();
    // Partial writes into blocks of a file that is all hole: nothing to punch.
    let partial = |v: &Volume, b: u64| {
        let off = (b % 16) * 4096;
        let data = pattern(b + 1, b * BS + off, 4096);
        v.write_at(&data, b * BS + off).unwrap();
        let mut want = vec![0u8; BS as usize];
        want[off as usize..off as usize + 4096].copy_from_slice(&data);
        want
    };
    let mut want = Vec::new();
    for b in 0..8 {
        want.push(partial(&v, b));
    }
    assert_eq!(data.punches(), 0, "holes punched");
    // Eight blocks that hold data and are then freed without passdown: not holes.
    for b in 8..16 {
        v.write_at(&pattern(100 + b, b * BS, BS as usize), b * BS)
            .unwrap();
    }
    pool.commit().unwrap();
    v.discard(8 * BS, 8 * BS).unwrap();
    pool.commit().unwrap();
    drop(v);
    pool.close().unwrap();
    let pool = Pool::open_on(&root, data.clone(), meta, opts(false)).unwrap();
    let v = pool.open_volume("v").unwrap();
    for b in 8..BLOCKS {
        want.push(partial(&v, b));
    }
    for (b, w) in want.iter().enumerate() {
        expect(&v, b as u64, w, "after reopening");
    }
    assert_eq!(
        data.punches(),
        8,
        "exactly the free blocks holding data were punched before reuse"
    );
    drop(v);
    pool.close().unwrap();
}
