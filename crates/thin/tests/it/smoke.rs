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
    assert!(dump.contains("<device dev_id=\"1\" mapped_blocks=\"20000\""), "{}", &dump[..300]);
    drop(md);
    let mut md = ThinMetadata::open(m.dev()).unwrap();
    assert_eq!(md.devices().unwrap().len(), 1);
    assert_eq!(md.nr_free_data_blocks(), 100_000 - 20_000);
}
