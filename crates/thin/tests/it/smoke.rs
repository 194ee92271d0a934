//! The writable API end to end: what we write, thin_check accepts and thin_dump reads back.

use crate::common::*;
use thinpool_thin::{ThinId, ThinMetadata};

#[test]
fn thins_snapshots_and_cow_pass_thin_check() {
    if !have_tool("thin_check") {
        return;
    }
    let m = TempMeta::new(8 << 20);
    let mut md = ThinMetadata::format(m.dev(), 128, 100_000).unwrap();
    let t0 = ThinId::new(0).unwrap();
    md.create_thin(t0).unwrap();
    for v in 0..30_000u64 {
        let b = md.alloc_data_block().unwrap().unwrap();
        md.insert_block(t0, v * 3, b).unwrap();
    }
    md.commit().unwrap();
    let (ok, out) = thin_check(&m.path);
    assert!(ok, "{out}");
    let t1 = ThinId::new(1).unwrap();
    md.create_snap(t1, t0).unwrap();
    md.commit().unwrap();
    let (ok, out) = thin_check(&m.path);
    assert!(ok, "{out}");
    // Break sharing: remap some blocks in the origin, remove some from the snapshot.
    for v in (0..30_000u64).step_by(7) {
        let l = md.find_block(t0, v * 3).unwrap().unwrap();
        assert!(l.shared);
        let b = md.alloc_data_block().unwrap().unwrap();
        md.insert_block(t0, v * 3, b).unwrap();
    }
    assert_eq!(md.remove_range(t1, 0, 30_000).unwrap(), 10_000);
    md.reserve_metadata_snap().unwrap();
    md.delete_thin(t0).unwrap();
    md.commit().unwrap();
    let (ok, out) = thin_check(&m.path);
    assert!(ok, "{out}");
    md.release_metadata_snap().unwrap();
    let (ok, out) = thin_check(&m.path);
    assert!(ok, "{out}");
    let dump = thin_dump(&m.path, &[]);
    assert!(
        dump.contains("<device dev_id=\"1\" mapped_blocks=\"20000\""),
        "{}",
        &dump[..300]
    );
    drop(md);
    let mut md = ThinMetadata::open(m.dev()).unwrap();
    assert_eq!(md.devices().unwrap().len(), 1);
    assert_eq!(md.nr_free_data_blocks(), 100_000 - 20_000);
}

#[test]
fn growing_data_and_metadata_keeps_the_pool_valid() {
    if !have_tool("thin_check") {
        return;
    }
    // 4 MiB of metadata, 10 000 data blocks (one bitmap) to start with.
    let m = TempMeta::new(4 << 20);
    let mut md = ThinMetadata::format(m.dev(), 128, 10_000).unwrap();
    let t = ThinId::new(3).unwrap();
    md.create_thin(t).unwrap();
    for v in 0..10_000u64 {
        let b = md.alloc_data_block().unwrap().unwrap();
        md.insert_block(t, v, b).unwrap();
    }
    assert_eq!(md.alloc_data_block().unwrap(), None, "the pool is full");
    md.commit().unwrap();
    // Grow data across several bitmaps (16 320 blocks each).
    md.resize_data_dev(50_000).unwrap();
    assert!(md.resize_data_dev(40_000).is_err(), "shrinking is refused");
    for v in 10_000..50_000u64 {
        let b = md.alloc_data_block().unwrap().unwrap();
        md.insert_block(t, v, b).unwrap();
    }
    md.commit().unwrap();
    let (ok, out) = thin_check(&m.path);
    assert!(ok, "{out}");
    // Grow the metadata device past one metadata bitmap (16 320 blocks = 63.75 MiB).
    let dev = m.dev();
    dev.set_size(80 << 20).unwrap();
    md.resize_metadata_dev((80 << 20) / 4096).unwrap();
    md.commit().unwrap();
    let (ok, out) = thin_check(&m.path);
    assert!(ok, "{out}");
    assert_eq!(md.nr_metadata_blocks(), 20480);
    // Use the new metadata space: a second device with many mappings and a snapshot.
    let t2 = ThinId::new(4).unwrap();
    md.resize_data_dev(400_000).unwrap();
    md.create_thin(t2).unwrap();
    for v in 0..300_000u64 {
        let b = md.alloc_data_block().unwrap().unwrap();
        md.insert_block(t2, v * 2, b).unwrap();
    }
    md.create_snap(ThinId::new(5).unwrap(), t2).unwrap();
    md.commit().unwrap();
    let (ok, out) = thin_check(&m.path);
    assert!(ok, "{out}");
    drop(md);
    let mut md = ThinMetadata::open(m.dev()).unwrap();
    assert_eq!(md.nr_metadata_blocks(), 20480);
    assert_eq!(md.nr_free_data_blocks(), 400_000 - 350_000);
    assert_eq!(
        md.device_details(ThinId::new(5).unwrap())
            .unwrap()
            .mapped_blocks,
        300_000
    );
    let dump = thin_dump(&m.path, &[]);
    assert!(dump.contains("nr_data_blocks=\"400000\""));
}

/// `find_block` remembers each device's bottom-tree root and snapshot time; every change to a
/// device (its own mappings, a snapshot of it or of a sibling, deletion and re-creation under
/// the same id, a metadata snapshot) must show in the next lookup.
#[test]
fn find_block_follows_every_change_to_a_device() {
    let m = TempMeta::new(8 << 20);
    let mut md = ThinMetadata::format(m.dev(), 128, 10_000).unwrap();
    let (t0, t1, t2) = (
        ThinId::new(0).unwrap(),
        ThinId::new(1).unwrap(),
        ThinId::new(2).unwrap(),
    );
    let find = |md: &mut ThinMetadata, t, v| {
        md.find_block(t, v)
            .unwrap()
            .map(|l| (l.data_block, l.shared))
    };
    md.create_thin(t0).unwrap();
    assert_eq!(find(&mut md, t0, 5), None);
    // Enough mappings that the bottom tree has internal nodes (its root splits).
    let mut first = Vec::new();
    for v in 0..2000u64 {
        let b = md.alloc_data_block().unwrap().unwrap();
        md.insert_block(t0, v, b).unwrap();
        first.push(b);
        assert_eq!(find(&mut md, t0, v), Some((b, false)));
    }
    md.commit().unwrap();
    assert_eq!(find(&mut md, t0, 1999), Some((first[1999], false)));
    md.create_snap(t1, t0).unwrap();
    assert_eq!(find(&mut md, t0, 7), Some((first[7], true)));
    assert_eq!(find(&mut md, t1, 7), Some((first[7], true)));
    // Break sharing in the origin: its root moves, the snapshot keeps the old tree.
    let b = md.alloc_data_block().unwrap().unwrap();
    md.insert_block(t0, 7, b).unwrap();
    assert_eq!(find(&mut md, t0, 7), Some((b, false)));
    assert_eq!(find(&mut md, t1, 7), Some((first[7], true)));
    assert_eq!(find(&mut md, t0, 8), Some((first[8], true)));
    // A snapshot of the snapshot changes the snapshot's time, not the origin's.
    md.create_snap(t2, t1).unwrap();
    assert_eq!(find(&mut md, t0, 7), Some((b, false)));
    assert_eq!(find(&mut md, t2, 7), Some((first[7], true)));
    // Removal, then the rest of the tree is still found.
    assert_eq!(md.remove_range(t1, 0, 1000).unwrap(), 1000);
    assert_eq!(find(&mut md, t1, 7), None);
    assert_eq!(find(&mut md, t1, 1500), Some((first[1500], true)));
    assert_eq!(find(&mut md, t2, 7), Some((first[7], true)));
    // A metadata snapshot shares the top level; lookups and changes go on as before.
    md.reserve_metadata_snap().unwrap();
    let c = md.alloc_data_block().unwrap().unwrap();
    md.insert_block(t1, 3, c).unwrap();
    assert_eq!(find(&mut md, t1, 3), Some((c, false)));
    assert_eq!(find(&mut md, t2, 3), Some((first[3], true)));
    md.release_metadata_snap().unwrap();
    assert_eq!(find(&mut md, t1, 3), Some((c, false)));
    // Deleted and created again under the same id: empty.
    assert_eq!(find(&mut md, t0, 7), Some((b, false)));
    md.delete_thin(t0).unwrap();
    assert!(md.find_block(t0, 7).is_err());
    md.create_thin(t0).unwrap();
    assert_eq!(find(&mut md, t0, 7), None);
    assert_eq!(find(&mut md, t0, 8), None);
    // Reopen without commit: the open transaction is gone, and so is what was remembered.
    md.commit().unwrap();
    let d = md.alloc_data_block().unwrap().unwrap();
    md.insert_block(t2, 9, d).unwrap();
    drop(md);
    let mut md = ThinMetadata::open(m.dev()).unwrap();
    assert_eq!(find(&mut md, t2, 9), Some((first[9], true)));
}

/// `highest_mapped_block` (down the last child of each level) agrees with a full scan while
/// keys are inserted in random order and removed, the maximum included, across tree levels.
#[test]
fn highest_mapped_block_matches_a_full_scan() {
    let m = TempMeta::new(16 << 20);
    let mut md = ThinMetadata::format(m.dev(), 128, 200_000).unwrap();
    let t = ThinId::new(3).unwrap();
    md.create_thin(t).unwrap();
    let scan = |md: &mut ThinMetadata| {
        let mut last = None;
        md.mappings(t, 0, &mut |v, _, _| {
            last = Some(v);
            true
        })
        .unwrap();
        last
    };
    assert_eq!(md.highest_mapped_block(t).unwrap(), None);
    // A simple LCG: deterministic, spread keys over 0..1M.
    let mut x: u64 = 12345;
    let mut keys = Vec::new();
    for i in 0..30_000u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v = (x >> 20) % 1_000_000;
        let b = md.alloc_data_block().unwrap().unwrap();
        md.insert_block(t, v, b).unwrap();
        keys.push(v);
        if i % 997 == 0 {
            assert_eq!(
                md.highest_mapped_block(t).unwrap(),
                scan(&mut md),
                "after {i} inserts"
            );
        }
    }
    md.commit().unwrap();
    assert_eq!(md.highest_mapped_block(t).unwrap(), scan(&mut md));
    keys.sort_unstable();
    keys.dedup();
    // Remove from the top: the answer must follow the new maximum each time.
    for &v in keys.iter().rev().take(300) {
        md.remove_block(t, v).unwrap();
        assert_eq!(
            md.highest_mapped_block(t).unwrap(),
            scan(&mut md),
            "after removing {v}"
        );
    }
    for &v in keys.iter() {
        md.remove_block(t, v).unwrap();
    }
    assert_eq!(md.highest_mapped_block(t).unwrap(), None);
}

/// Flip the uuid bytes of the superblock copy at metadata block `b` of the file at `path`
/// (its checksum no longer matches), behind any open handle's cache.
fn damage_superblock_copy(path: &std::path::Path, b: u64) {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut uuid = [0u8; 16];
    f.read_exact_at(&mut uuid, b * 4096 + 16).unwrap();
    for x in &mut uuid {
        *x ^= 0xA5;
    }
    f.write_all_at(&uuid, b * 4096 + 16).unwrap();
    f.sync_all().unwrap();
}

/// Issue 15: a metadata snapshot reserved through this handle is released without reading its
/// superblock copy (the roots are kept from the reserve, across an abort too), so damage there,
/// which nothing but the held root reaches, does not keep it held. One found held at open is
/// read there: its damage is an error naming the block.
#[test]
fn a_damaged_held_superblock_copy_is_still_released() {
    if !have_tool("thin_check") {
        return;
    }
    let m = TempMeta::new(8 << 20);
    let mut md = ThinMetadata::format(m.dev(), 128, 10_000).unwrap();
    let t0 = ThinId::new(0).unwrap();
    md.create_thin(t0).unwrap();
    for v in 0..500u64 {
        let b = md.alloc_data_block().unwrap().unwrap();
        md.insert_block(t0, v, b).unwrap();
    }
    md.commit().unwrap();
    let h = md.reserve_metadata_snap().unwrap();
    // Live changes after the reserve shadow the top of the held trees.
    for v in 500..1000u64 {
        let b = md.alloc_data_block().unwrap().unwrap();
        md.insert_block(t0, v, b).unwrap();
    }
    md.commit().unwrap();
    // A fresh cache: whatever is read from now on comes from the file.
    md.abort().unwrap();
    damage_superblock_copy(&m.path, h);
    md.release_metadata_snap().unwrap();
    assert_eq!(md.held_root(), None);
    let (ok, out) = thin_check(&m.path);
    assert!(ok, "{out}");

    // Found held at open (left by an earlier run): open reads the copy, so its damage is an
    // error naming the block (offline repair's business), not a silent release.
    let h = md.reserve_metadata_snap().unwrap();
    drop(md);
    damage_superblock_copy(&m.path, h);
    let e = ThinMetadata::open(m.dev())
        .err()
        .expect("open of a damaged held copy");
    assert!(
        e.to_string().contains(&format!("metadata block {h}")),
        "{e}"
    );
}
