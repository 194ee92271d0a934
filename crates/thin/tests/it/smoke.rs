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
