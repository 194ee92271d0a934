//! Opening a pool never loses a mapping (issue 11): the metadata is the truth for mappings and
//! `volumes.json` a cache of names and sizes. Each test reproduces a way the catalog and the
//! metadata used to disagree destructively, and checks every byte written is still there:
//!
//! - a catalog older than a `resize_volume` that grew the volume (restored from a backup), or
//!   a volume grown outside thinpool (the kernel reloading a longer `thin` table: the
//!   catalog's size is simply smaller than the mappings) → the size grows, nothing is trimmed;
//! - a lost catalog → the devices are adopted with a size covering their highest mapping;
//! - an interrupted shrink (recorded intent) → rolled forward; the same smaller size without
//!   the intent → not a shrink;
//! - duplicate thin ids, invalid names → refused before anything is written;
//! - NEEDS_CHECK, or a read-only open → nothing written at all (files byte-identical);
//! - removing a snapshot's origin clears the snapshot's parent.

use std::path::Path;

use thinpool_engine::{ErrorKind, Pool, PoolMode, PoolOptions};
use thinpool_io::{BlockDevice, FileDevice};
use thinpool_thin::ThinMetadata;

use crate::common::*;

const GIB: u64 = 1 << 30;

fn opts() -> PoolOptions {
    PoolOptions {
        commit_interval: None,
        min_free_percent: 0,
        ..Default::default()
    }
}

/// Every file of a pool root, by name, with its bytes.
fn files(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for name in ["pool/data", "pool/metadata", "volumes.json"] {
        let p = root.join(name);
        if let Ok(b) = std::fs::read(&p) {
            out.push((name.to_string(), b));
        }
    }
    out
}

fn assert_same_files(before: &[(String, Vec<u8>)], root: &Path, what: &str) {
    let after = files(root);
    assert_eq!(
        before.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        after.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "{what}: files"
    );
    for ((n, a), (_, b)) in before.iter().zip(&after) {
        assert!(a == b, "{what}: {n} changed");
    }
}

fn write(pool: &Pool, vol: &str, id: u64, offset: u64, len: usize) {
    let v = pool.open_volume(vol).unwrap();
    v.write_at(&pattern(id, offset, len), offset).unwrap();
}

fn expect(pool: &Pool, vol: &str, id: u64, offset: u64, len: usize, what: &str) {
    let v = pool.open_volume(vol).unwrap();
    let mut buf = vec![0u8; len];
    v.read_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("{what}: read {vol} at {offset}: {e}"));
    if let Some((i, g, w)) = first_diff(&buf, &pattern(id, offset, len)) {
        panic!(
            "{what}: {vol} byte {} is {g:#04x}, want {w:#04x}",
            offset + i as u64
        );
    }
}

fn check(root: &Path, what: &str) {
    check_closed_pool(root, have_tool("thin_check"), what);
}

#[test]
fn an_older_catalog_does_not_trim_a_grown_volume() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pool = Pool::create(root, &small_config(64, 4), opts()).unwrap();
    pool.create_volume("v", GIB).unwrap();
    write(&pool, "v", 1, 4096, 8192);
    pool.commit().unwrap();
    let old_catalog = std::fs::read(root.join("volumes.json")).unwrap();
    pool.resize_volume("v", 8 * GIB).unwrap();
    write(&pool, "v", 2, 6 * GIB, BS as usize);
    pool.close().unwrap();
    // The catalog is restored from the copy taken before the grow.
    std::fs::write(root.join("volumes.json"), &old_catalog).unwrap();
    let pool = Pool::open(root, opts()).unwrap();
    let info = pool.volume_info("v").unwrap();
    assert_eq!(
        info.size,
        6 * GIB + BS,
        "the size covers the highest mapping"
    );
    expect(&pool, "v", 1, 4096, 8192, "first write");
    expect(
        &pool,
        "v",
        2,
        6 * GIB,
        BS as usize,
        "write past the old size",
    );
    pool.close().unwrap();
    check(root, "after an older catalog");
    // The raised size was saved: the next open agrees without another change.
    let pool = Pool::open(root, opts()).unwrap();
    assert_eq!(pool.volume_info("v").unwrap().size, 6 * GIB + BS);
}

#[test]
fn a_lost_catalog_adopts_every_device_with_its_mappings() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data_size = 64 * BS;
    let pool = Pool::create(root, &small_config(64, 4), opts()).unwrap();
    pool.create_volume("v", 8 * GIB).unwrap();
    write(&pool, "v", 3, 6 * GIB, 4096);
    pool.snapshot("v", "s").unwrap();
    write(&pool, "s", 4, 0, 4096);
    pool.close().unwrap();
    std::fs::remove_file(root.join("volumes.json")).unwrap();
    let pool = Pool::open(root, opts()).unwrap();
    let vols = pool.volumes().unwrap();
    let names: Vec<&str> = vols.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["thin-0", "thin-1"]);
    // A device with nothing mapped past the data device's size gets that size; one mapped
    // further gets a size covering its highest mapping.
    assert_eq!(vols[0].size, 6 * GIB + BS, "thin-0 (mapped at 6 GiB)");
    assert_eq!(
        vols[1].size,
        6 * GIB + BS,
        "thin-1 (the snapshot shares it)"
    );
    expect(&pool, "thin-0", 3, 6 * GIB, 4096, "origin after adoption");
    expect(&pool, "thin-1", 4, 0, 4096, "snapshot after adoption");
    expect(
        &pool,
        "thin-1",
        3,
        6 * GIB,
        4096,
        "shared block after adoption",
    );
    pool.create_volume("small", BS).unwrap();
    drop(pool);
    std::fs::remove_file(root.join("volumes.json")).unwrap();
    let pool = Pool::open(root, opts()).unwrap();
    let small = pool.volume_info("thin-2").unwrap();
    assert_eq!(small.size, data_size, "an empty device gets the data size");
    pool.close().unwrap();
    check(root, "after adoption");
}

#[test]
fn only_a_recorded_shrink_removes_mappings() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pool = Pool::create(root, &small_config(64, 4), opts()).unwrap();
    pool.create_volume("a", 32 * BS).unwrap();
    pool.create_volume("b", 32 * BS).unwrap();
    for v in ["a", "b"] {
        for b in [1, 20, 30] {
            write(&pool, v, b, b * BS, BS as usize);
        }
    }
    pool.close().unwrap();
    // Edit the catalog as a crash in the middle of `resize_volume a 10 blocks` leaves it (the
    // intent recorded, the metadata not committed), and give b the same smaller size without
    // an intent (an older catalog, or a kernel grow).
    let path = root.join("volumes.json");
    let mut cat: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let tid = cat["transaction_id"].as_u64().unwrap();
    for v in cat["volumes"].as_array_mut().unwrap() {
        v["size"] = (10 * BS).into();
        if v["name"] == "a" {
            v["shrinking"] = tid.into();
        }
    }
    std::fs::write(&path, serde_json::to_vec(&cat).unwrap()).unwrap();
    let pool = Pool::open(root, opts()).unwrap();
    let a = pool.volume_info("a").unwrap();
    let b = pool.volume_info("b").unwrap();
    assert_eq!(
        (a.size, a.mapped_blocks),
        (10 * BS, 1),
        "a: the shrink rolled forward"
    );
    assert_eq!(
        (b.size, b.mapped_blocks),
        (31 * BS, 3),
        "b: no intent, so the size grew to cover its mappings"
    );
    expect(&pool, "a", 1, BS, BS as usize, "a below the new end");
    for blk in [1, 20, 30] {
        expect(&pool, "b", blk, blk * BS, BS as usize, "b");
    }
    pool.close().unwrap();
    let saved = std::fs::read_to_string(&path).unwrap();
    assert!(!saved.contains("shrinking"), "the intent is spent: {saved}");
    check(root, "after reconcile");
}

#[test]
fn a_catalog_with_a_duplicate_thin_id_or_a_bad_name_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pool = Pool::create(root, &small_config(64, 4), opts()).unwrap();
    pool.create_volume("a", GIB).unwrap();
    pool.create_volume("b", GIB).unwrap();
    write(&pool, "a", 5, 0, 4096);
    pool.close().unwrap();
    let path = root.join("volumes.json");
    let good: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 2] = [
        (
            "duplicate thin id",
            |c| c["volumes"][1]["thin_id"] = c["volumes"][0]["thin_id"].clone(),
            "volumes a and b both claim thin device 0",
        ),
        (
            "bad name",
            |c| c["volumes"][1]["name"] = "../../etc/x y".into(),
            "invalid volume name \"../../etc/x y\"",
        ),
    ];
    for (what, edit, message) in cases {
        let mut bad = good.clone();
        edit(&mut bad);
        std::fs::write(&path, serde_json::to_vec(&bad).unwrap()).unwrap();
        let before = files(root);
        let err = match Pool::open(root, opts()) {
            Ok(_) => panic!("{what}: the pool opened"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{what}: {err}");
        let text = err.to_string();
        assert!(
            text.contains(message) && text.contains(&path.display().to_string()),
            "{what}: {text}"
        );
        assert_same_files(&before, root, what);
    }
    std::fs::write(&path, serde_json::to_vec(&good).unwrap()).unwrap();
    let pool = Pool::open(root, opts()).unwrap();
    expect(&pool, "a", 5, 0, 4096, "after the refusals");
}

/// A pool whose catalog asks for every kind of repair (a removal to finish, a size to raise,
/// a device to adopt), closed; returns the files.
fn pool_needing_reconcile(root: &Path) {
    let pool = Pool::create(root, &small_config(64, 4), opts()).unwrap();
    for v in ["a", "b", "c"] {
        pool.create_volume(v, 4 * BS).unwrap();
        write(&pool, v, 7, 0, 4096);
    }
    pool.resize_volume("b", 16 * BS).unwrap();
    write(&pool, "b", 8, 12 * BS, 4096);
    pool.close().unwrap();
    let path = root.join("volumes.json");
    let mut cat: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let vols = cat["volumes"].as_array_mut().unwrap();
    vols[0]["removing"] = true.into(); // a
    vols[1]["size"] = (4 * BS).into(); // b
    vols.remove(2); // c
    std::fs::write(&path, serde_json::to_vec(&cat).unwrap()).unwrap();
}

#[test]
fn a_read_only_open_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    pool_needing_reconcile(root);
    let before = files(root);
    let ro = PoolOptions {
        read_only: true,
        ..opts()
    };
    let pool = Pool::open(root, ro).unwrap();
    let names: Vec<String> = pool
        .volumes()
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["b", "thin-2"], "a is being removed, c adopted");
    assert_eq!(pool.volume_info("b").unwrap().size, 13 * BS);
    expect(&pool, "b", 8, 12 * BS, 4096, "read-only read");
    assert_eq!(
        pool.status().unwrap().mode,
        PoolMode::Write,
        "the pool's own mode"
    );
    let v = pool.open_volume("b").unwrap();
    for (what, r) in [
        ("write", v.write_at(&[1; 512], 0)),
        ("discard", v.discard(0, BS)),
        ("write zeroes", v.write_zeroes(0, 512)),
        ("create", pool.create_volume("d", BS).map(|_| ())),
        ("resize", pool.resize_volume("b", BS)),
        ("remove", pool.remove_volume("thin-2")),
        ("grow", pool.grow(Some(128 * BS), None)),
    ] {
        assert_kind(r, ErrorKind::ReadOnly, what);
    }
    drop(v);
    pool.close().unwrap();
    assert_same_files(&before, root, "read-only open");
    // A writable open then does the repairs.
    let pool = Pool::open(root, opts()).unwrap();
    assert_eq!(pool.volumes().unwrap().len(), 2);
    pool.close().unwrap();
    check(root, "after the writable open");
}

#[test]
fn a_pool_that_needs_a_check_opens_read_only_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    pool_needing_reconcile(root);
    {
        let dev: std::sync::Arc<dyn BlockDevice> =
            std::sync::Arc::new(FileDevice::open(&root.join("pool/metadata")).unwrap());
        let mut md = ThinMetadata::open(dev).unwrap();
        md.set_needs_check().unwrap();
    }
    // Grown data device: the kernel would grow the pool on resume, not with NEEDS_CHECK.
    FileDevice::open(&root.join("pool/data"))
        .unwrap()
        .set_size(128 * BS)
        .unwrap();
    let before = files(root);
    let pool = Pool::open(root, opts()).unwrap();
    let st = pool.status().unwrap();
    assert_eq!((st.mode, st.needs_check), (PoolMode::ReadOnly, true));
    assert_eq!(st.total_data_blocks, 64);
    assert_eq!(pool.volumes().unwrap().len(), 2);
    assert_kind(
        pool.create_volume("d", BS).map(|_| ()),
        ErrorKind::ReadOnly,
        "create on a NEEDS_CHECK pool",
    );
    pool.close().unwrap();
    assert_same_files(&before, root, "NEEDS_CHECK pool");
    if have_tool("thin_check") {
        // thin_check 0.9.0 reports the flag but the trees are clean.
        let o = thinpool_testkit::tool("thin_check")
            .arg(root.join("pool/metadata"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
    }
}

#[test]
fn removing_an_origin_clears_its_snapshots_parent() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pool = Pool::create(root, &small_config(64, 4), opts()).unwrap();
    pool.create_volume("v", GIB).unwrap();
    pool.snapshot("v", "s1").unwrap();
    pool.snapshot("s1", "s2").unwrap();
    assert_eq!(
        pool.volume_info("s2").unwrap().parent.as_deref(),
        Some("s1")
    );
    pool.remove_volume("s1").unwrap();
    assert_eq!(pool.volume_info("s2").unwrap().parent, None);
    pool.close().unwrap();
    let pool = Pool::open(root, opts()).unwrap();
    assert_eq!(pool.volume_info("s2").unwrap().parent, None);
}

/// A catalog of more than `JOURNAL_FROM` (1 024) volumes appends each change to
/// `volumes.journal` instead of rewriting `volumes.json` (issue 16), and the hand-over with the
/// metadata stays the same: reopened, the journal's records make the catalog; a metadata image
/// older than the journal's last records (the commit after the append never happened) gets
/// those entries dropped by the usual reconcile rules, a removal intent rolled forward, and
/// nothing written is lost.
#[test]
fn a_large_catalog_is_journaled_and_reconciled_like_a_whole_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pool = Pool::create(root, &small_config(256, 16), opts()).unwrap();
    for i in 0..1030 {
        pool.create_volume(&format!("v{i}"), GIB).unwrap();
    }
    write(&pool, "v7", 1, 0, 8192);
    pool.snapshot("v7", "s7").unwrap();
    write(&pool, "s7", 2, 4096, 4096);
    pool.commit().unwrap();
    let whole = std::fs::read(root.join("volumes.json")).unwrap();
    assert!(
        root.join("volumes.journal").exists(),
        "1 031 volumes: journaled"
    );
    // The metadata as it is now, committed.
    let meta = std::fs::read(root.join("pool/metadata")).unwrap();
    pool.create_volume("late", GIB).unwrap(); // in the journal and committed
    pool.resize_volume("v8", 2 * GIB).unwrap();
    pool.remove_volume("v9").unwrap();
    let list = |pool: &Pool| -> Vec<String> {
        let vols = pool.volumes().unwrap();
        vols.iter()
            .map(|v| format!("{} {} {} {:?}", v.name, v.thin_id, v.size, v.parent))
            .collect()
    };
    let want = list(&pool);
    assert_eq!(
        std::fs::read(root.join("volumes.json")).unwrap(),
        whole,
        "volumes.json is not rewritten per change"
    );
    pool.close().unwrap();
    let pool = Pool::open(root, opts()).unwrap();
    assert_eq!(list(&pool), want, "replayed from the journal");
    expect(&pool, "s7", 2, 4096, 4096, "snapshot after reopen");
    expect(&pool, "s7", 1, 0, 4096, "shared block after reopen");
    pool.close().unwrap();
    check(root, "after reopen");
    // The journal is ahead of an older metadata image: `late` is dropped (its device was
    // never committed there), v9 comes back (its removal did not commit: the journal's last
    // record dropped the entry, so the device is adopted by its thin id), v8 keeps the
    // catalog's 2 GiB (a size only ever grows on reconcile).
    std::fs::write(root.join("pool/metadata"), &meta).unwrap();
    let pool = Pool::open(root, opts()).unwrap();
    let names: Vec<String> = pool
        .volumes()
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert!(!names.contains(&"late".to_string()), "late is dropped");
    assert!(!names.contains(&"v9".to_string()));
    assert_eq!(
        names.len(),
        1031,
        "1 030 volumes, s7, and v9's device adopted"
    );
    assert!(names.iter().any(|n| n.starts_with("thin-")), "{names:?}");
    assert_eq!(pool.volume_info("v8").unwrap().size, 2 * GIB, "v8");
    expect(
        &pool,
        "s7",
        2,
        4096,
        4096,
        "snapshot after the older metadata",
    );
    pool.close().unwrap();
    check(root, "after the older metadata");
}
