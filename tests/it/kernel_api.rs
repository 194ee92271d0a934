//! Kernel interop through the writable API: thinpool's metadata layer builds a pool (thin
//! devices, snapshots of snapshots, copy-on-write remaps, unmapped ranges, a deleted device),
//! the data is written straight into the data file at the mapped offsets, and the real kernel
//! activates the pool and must read every virtual block with the expected content (zeros where
//! unmapped). Afterwards `thin_check` and `thinpool meta check` pass on what the kernel left.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use thinpool_io::FileDevice;
use thinpool_tests::kernel::{assert_kernel_reads, md5_hex, pattern, zeros_md5};
use thinpool_tests::{require_tools, run, scratch, thinpool, tool};
use thinpool_thin::{ThinId, ThinMetadata};

#[test]
fn kernel_reads_a_pool_written_through_the_api() {
    if !require_tools(&["thin_check"]) {
        return;
    }
    const DBS: u32 = 128; // 64 KiB
    const BS: usize = DBS as usize * 512;
    const NR_DATA: u64 = 2048; // 128 MiB data file
    let dir = scratch();
    let meta = dir.path().join("meta");
    let data = dir.path().join("data");
    let mdev = Arc::new(FileDevice::create(&meta, 16 << 20).unwrap());
    let ddev = std::fs::File::create(&data).unwrap();
    ddev.set_len(NR_DATA * BS as u64).unwrap();

    let mut md = ThinMetadata::format(mdev, DBS, NR_DATA).unwrap();
    // Expected content per (dev, vblock): a tag written to a data block.
    let mut view: BTreeMap<u32, BTreeMap<u64, String>> = BTreeMap::new();
    let write = |md: &mut ThinMetadata,
                 view: &mut BTreeMap<u32, BTreeMap<u64, String>>,
                 dev: u32,
                 v: u64| {
        let b = md.alloc_data_block().unwrap().unwrap();
        let tag = format!("d{dev}v{v}");
        ddev.write_all_at(&pattern(&tag, BS), b * BS as u64)
            .unwrap();
        md.insert_block(ThinId::new(dev as u64).unwrap(), v, b)
            .unwrap();
        view.entry(dev).or_default().insert(v, tag);
    };
    let id = |n: u32| ThinId::new(n as u64).unwrap();
    md.create_thin(id(1)).unwrap();
    for v in (0..40).chain([100, 1000, 16383]) {
        write(&mut md, &mut view, 1, v);
    }
    md.commit().unwrap();
    md.create_snap(id(2), id(1)).unwrap();
    view.insert(2, view[&1].clone());
    // Copy-on-write on both sides, then a snapshot of the snapshot.
    for v in [0, 5, 100] {
        write(&mut md, &mut view, 1, v);
    }
    for v in [1, 6, 2000] {
        write(&mut md, &mut view, 2, v);
    }
    md.create_snap(id(3), id(2)).unwrap();
    view.insert(3, view[&2].clone());
    md.remove_range(id(3), 10, 20).unwrap();
    for v in 10..20 {
        view.get_mut(&3).unwrap().remove(&v);
    }
    write(&mut md, &mut view, 3, 12);
    md.create_thin(id(7)).unwrap();
    write(&mut md, &mut view, 7, 3);
    md.create_thin(id(9)).unwrap();
    write(&mut md, &mut view, 9, 0);
    md.delete_thin(id(9)).unwrap();
    view.remove(&9);
    md.set_transaction_id(0, 5).unwrap();
    md.commit().unwrap();
    drop(md);
    ddev.sync_all().unwrap();

    let out = run(tool("thin_check").arg(&meta));
    assert!(out.status.success(), "thin_check rejects our pool");

    let mut expected = Vec::new();
    for (dev, blocks) in &view {
        for v in [0u64, 1, 5, 6, 10, 12, 15, 39, 40, 100, 1000, 2000, 16383] {
            let md5 = match blocks.get(&v) {
                Some(tag) => md5_hex(&pattern(tag, BS)),
                None => zeros_md5(BS),
            };
            expected.push((*dev, v, md5));
        }
    }
    if !assert_kernel_reads(&meta, &data, DBS, &expected, true) {
        return;
    }
    let out = run(thinpool(["meta", "check"]).arg(&meta));
    assert!(out.status.success(), "meta check rejects our pool");
}
