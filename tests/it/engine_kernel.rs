//! Kernel interop of the pool engine, end to end: a pool made and written by `thinpool-engine`
//! (volumes, a snapshot of a snapshot, copy-on-write, discards) is activated by the real kernel,
//! which must read every volume with the same md5; the kernel then snapshots, writes
//! (copy-on-write and a fresh block) and discards, and the engine, reopening the pool, must read
//! exactly the kernel's view (the kernel's new snapshot adopted as `thin-<id>`).

use std::collections::BTreeMap;

use thinpool_engine::{Pool, PoolConfig, PoolOptions, Volume};
use thinpool_tests::kernel::{kernel_run, md5_hex};
use thinpool_tests::{kernel_scripts_dir, require_tools, run_ok, scratch, text, tool};

const BS: u64 = 64 << 10;

fn fill(v: &Volume, tag: u64, offset: u64, len: usize) {
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let buf: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    v.write_at(&buf, offset).unwrap();
}

fn md5_of(v: &Volume, len: u64) -> String {
    let mut buf = vec![0u8; len as usize];
    v.read_at(&mut buf, 0).unwrap();
    md5_hex(&buf)
}

#[test]
fn kernel_and_engine_read_each_others_pools() {
    if !require_tools(&["thin_check"]) {
        return;
    }
    let dir = scratch();
    let root = dir.path().join("root");
    let cfg = PoolConfig {
        data_size: 128 << 20,
        metadata_size: 16 << 20,
        block_size: BS,
        ..Default::default()
    };
    let opts = PoolOptions {
        commit_interval: None,
        ..Default::default()
    };
    let pool = Pool::create(&root, &cfg, opts.clone()).unwrap();
    pool.create_volume("base", 48 << 20).unwrap();
    pool.create_volume("other", 16 << 20).unwrap();
    let base = pool.open_volume("base").unwrap();
    let other = pool.open_volume("other").unwrap();
    fill(&base, 1, 0, 3 << 20);
    fill(&base, 2, 10 << 20, 100_000); // partial blocks at both ends
    fill(&base, 3, (47 << 20) + 12345, 50_000);
    fill(&other, 4, 0, 2 << 20);
    pool.snapshot("base", "snap1").unwrap();
    fill(&base, 5, 4096, 8192); // copy-on-write, partial
    fill(&base, 6, 2 << 20, BS as usize); // copy-on-write, whole block
    let snap1 = pool.open_volume("snap1").unwrap();
    snap1.discard(BS * 5, BS * 10).unwrap();
    pool.snapshot("snap1", "snap2").unwrap();
    let snap2 = pool.open_volume("snap2").unwrap();
    fill(&snap2, 7, 20 << 20, 300_000);
    other.write_zeroes(BS, 3 * BS + 100).unwrap();
    let vols = [
        ("base", &base),
        ("other", &other),
        ("snap1", &snap1),
        ("snap2", &snap2),
    ];
    let mut ours = BTreeMap::new();
    let mut args = vec!["128".to_string(), "999".to_string()];
    for (name, v) in vols {
        let info = pool.volume_info(name).unwrap();
        ours.insert(info.thin_id, md5_of(v, info.size));
        args.push(format!("{}:{}", info.thin_id, info.size / 512));
    }
    let base_id = pool.volume_info("base").unwrap().thin_id;
    let other_id = pool.volume_info("other").unwrap().thin_id;
    drop((base, other, snap1, snap2));
    pool.close().unwrap();
    let meta = root.join("pool/metadata");
    let data = root.join("pool/data");
    run_ok(tool("thin_check").arg(&meta));

    let script = kernel_scripts_dir().join("engine-roundtrip.guest.sh");
    let Some(out) = kernel_run(&meta, &data, &script, &args) else {
        return;
    };
    assert!(
        out.status.success(),
        "guest failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let mut before = BTreeMap::new();
    let mut after = BTreeMap::new();
    for line in text(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let ["MD5", phase, id, md5] = f[..] {
            let id: u32 = id.parse().unwrap();
            match phase {
                "before" => before.insert(id, md5.to_string()),
                _ => after.insert(id, md5.to_string()),
            };
        }
    }
    assert_eq!(
        before, ours,
        "the kernel reads every volume as the engine wrote it"
    );
    run_ok(tool("thin_check").arg(&meta));

    // The engine reads the kernel's view.
    let pool = Pool::open(&root, opts).unwrap();
    let adopted = pool
        .volume_info("thin-999")
        .expect("the kernel's snapshot is adopted");
    assert_eq!(adopted.thin_id, 999);
    let base_size = pool.volume_info("base").unwrap().size;
    let mut got = BTreeMap::new();
    for info in pool.volumes().unwrap() {
        let v = pool.open_volume(&info.name).unwrap();
        let len = if info.thin_id == 999 {
            base_size
        } else {
            info.size
        };
        got.insert(info.thin_id, md5_of(&v, len));
    }
    assert_eq!(
        got, after,
        "the engine reads the kernel's writes, snapshot and discard"
    );
    assert_ne!(after[&base_id], before[&base_id], "the kernel changed base");
    assert_ne!(
        after[&other_id], before[&other_id],
        "the kernel discarded in other"
    );
    assert_eq!(
        after[&999], before[&base_id],
        "the kernel's snapshot keeps base's old content"
    );
    // And goes on writing it.
    let base = pool.open_volume("base").unwrap();
    fill(&base, 8, 3 * BS, 1000);
    drop(base);
    pool.close().unwrap();
    run_ok(tool("thin_check").arg(&meta));
}
