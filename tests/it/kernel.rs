//! Pools exchanged with the Linux kernel's dm-thin (v1.22.0, booted in a VM by
//! `../shared/tools/kernel-dm-thin/run`): one VM per direction.
//!
//! - `kernel_reads_pool_we_restored`: we write the metadata (`thinpool meta restore`) of a random
//!   pool with snapshots sharing data blocks, put a distinct pattern in every mapped data block,
//!   and the kernel must read each mapped virtual block's pattern and zeros elsewhere; afterwards
//!   our check, `thin_check` and both dumps still agree with the XML.
//! - `kernel_writes_pool_we_read`: the kernel formats zeroed files and provisions, snapshots,
//!   copies on write, discards, deletes and holds a metadata snapshot
//!   (`tests/kernel/kernel-writes-pool.guest.sh`); our dump, ls and delta must equal the
//!   oracles', the mappings must be those the guest's operations imply, and every block the
//!   guest read must be in the data file where our dump says.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rand::SeedableRng as _;
use rand::rngs::StdRng;
use rand::seq::IteratorRandom as _;
use thinpool_tests::kernel::{assert_kernel_reads, kernel_run, md5_hex, pattern, zeros_md5};
use thinpool_tests::pool::{GenOptions, Pool, generate};
use thinpool_tests::{
    Failures, kernel_scripts_dir, require_tools, run, run_ok, scratch, stdout_of, test_seed, text,
    thinpool, tool, zeroed_file,
};

const BS: usize = 64 * 1024;

fn oracles() -> bool {
    require_tools(&["thin_check", "thin_dump", "thin_ls", "thin_delta"])
}

/// The content we put in data block `d`: `pattern("D<d>")`, unique while `d` < 100000.
fn data_block_content(d: u64, len: usize) -> Vec<u8> {
    assert!(
        d < 100_000,
        "data block {d}: the 6-character tag would not be unique"
    );
    pattern(&format!("D{d}"), len)
}

fn read_block(data: &Path, d: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::File::open(data).expect("open the data file");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, d * len as u64)
        .expect("read a data block");
    buf
}

#[test]
fn kernel_reads_pool_we_restored() {
    if !oracles() {
        return;
    }
    let seed = test_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    // A small pool (the guest reads block by block): origins and snapshots sharing data blocks,
    // 64 KiB blocks, ids up to 2^24 - 1, runs and singles. Few enough mappings to read them all.
    let pool = loop {
        let g = generate(
            &mut rng,
            &GenOptions {
                devices: 6,
                big_device: false,
                data_block_size: Some(128),
            },
        );
        if (1..=250).contains(&g.pool.total_mappings())
            && !g.snapshots.is_empty()
            && g.pool.nr_data_blocks < 60_000
        {
            break g.pool;
        }
    };
    let xml = pool.to_xml();
    eprintln!(
        "pool: {} devices, {} mappings, {} data blocks",
        pool.devices.len(),
        pool.total_mappings(),
        pool.nr_data_blocks
    );

    let dir = scratch();
    let xml_path = dir.path().join("pool.xml");
    std::fs::write(&xml_path, &xml).expect("write the XML");
    let meta = zeroed_file(&dir.path().join("meta"), pool.metadata_size());
    run_ok(
        thinpool(["meta", "restore", "-i"])
            .arg(&xml_path)
            .arg("-o")
            .arg(&meta),
    );
    // no point booting a kernel on metadata the tools reject
    run_ok(tool("thin_check").arg("-q").arg(&meta));
    assert_eq!(
        stdout_of(tool("thin_dump").arg(&meta)),
        xml,
        "thin_dump of our restore before the kernel"
    );

    // the data file: exactly nr_data_blocks blocks (else the kernel grows the pool), a pattern in
    // every mapped data block and in one block nothing maps
    let data = zeroed_file(&dir.path().join("data"), pool.nr_data_blocks * BS as u64);
    {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&data)
            .expect("open data");
        let used = pool.used_data_blocks();
        for &d in &used {
            f.write_all_at(&data_block_content(d, BS), d * BS as u64)
                .expect("write a pattern");
        }
        if let Some(stray) = (0..pool.nr_data_blocks).find(|d| !used.contains(d)) {
            f.write_all_at(&pattern("STRAY", BS), stray * BS as u64)
                .expect("write the stray pattern");
        }
    }

    // every mapping, plus unmapped neighbours of mapped blocks
    let mut expected: Vec<(u32, u64, String)> = Vec::new();
    for (dev, d) in &pool.devices {
        for (v, m) in &d.mappings {
            expected.push((*dev, *v, md5_hex(&data_block_content(m.data_block, BS))));
        }
        let zeros = zeros_md5(BS);
        let unmapped: BTreeSet<u64> = d
            .mappings
            .keys()
            .flat_map(|v| [v.saturating_sub(1), v + 1])
            .chain([0, 1])
            .filter(|v| !d.mappings.contains_key(v))
            .choose_multiple(&mut rng, 6)
            .into_iter()
            .collect();
        for v in unmapped {
            expected.push((*dev, v, zeros.clone()));
        }
    }
    if !assert_kernel_reads(&meta, &data, pool.data_block_size, &expected, false) {
        return;
    }

    // the kernel activated, read and tore down the pool (committing): still the same pool
    let mut f = Failures::new();
    let check = run(thinpool(["meta", "check"]).arg(&meta));
    f.check(
        &format!("meta check after the kernel exits {}", check.status),
        check.status.code() == Some(0),
    );
    let tc = run(tool("thin_check").arg(&meta));
    f.check(
        &format!("thin_check after the kernel exits {}", tc.status),
        tc.status.success(),
    );
    f.eq_text(
        "thin_dump after the kernel vs the input",
        &text(&run(tool("thin_dump").arg(&meta)).stdout),
        &xml,
    );
    f.eq_text(
        "meta dump after the kernel vs the input",
        &text(&run(thinpool(["meta", "dump"]).arg(&meta)).stdout),
        &xml,
    );
    f.finish();
}

#[test]
fn kernel_writes_pool_we_read() {
    if !oracles() {
        return;
    }
    let dir = scratch();
    let meta = zeroed_file(&dir.path().join("meta"), 16 << 20);
    let data = zeroed_file(&dir.path().join("data"), 256 << 20);
    let script = kernel_scripts_dir().join("kernel-writes-pool.guest.sh");
    let Some(out) = kernel_run(&meta, &data, &script, &[]) else {
        return;
    };
    let guest = text(&out.stdout);
    assert!(
        out.status.success(),
        "guest script failed ({}):\n{guest}\n{}",
        out.status,
        text(&out.stderr)
    );

    // The oracles on the host, then ours against them.
    run_ok(tool("thin_check").arg(&meta));
    let host_dump = stdout_of(tool("thin_dump").arg(&meta));
    let guest_dump = between(&guest, "DUMP-BEGIN\n", "DUMP-END\n");
    assert_eq!(guest_dump, host_dump, "the guest's thin_dump vs the host's");

    let mut f = Failures::new();
    let ours = run(thinpool(["meta", "dump"]).arg(&meta));
    f.eq_text("meta dump vs thin_dump", &text(&ours.stdout), &host_dump);
    let check = run(thinpool(["meta", "check"]).arg(&meta));
    f.check(
        &format!("meta check exits {}", check.status),
        check.status.code() == Some(0),
    );
    // the held metadata snapshot the guest left behind
    let theirs_m = run_ok(tool("thin_dump").arg("-m").arg(&meta));
    let ours_m = run(thinpool(["meta", "dump", "--metadata-snap"]).arg(&meta));
    f.eq_text(
        "meta dump --metadata-snap vs thin_dump -m",
        &text(&ours_m.stdout),
        &text(&theirs_m.stdout),
    );
    for (fields, snap) in [
        (None, false),
        (
            Some(
                "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS,TRANSACTION,CREATE_TIME,SNAP_TIME",
            ),
            false,
        ),
        (
            Some("DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS"),
            true,
        ),
    ] {
        let mut theirs = tool("thin_ls");
        let mut ours = thinpool(["meta", "ls"]);
        if let Some(fl) = fields {
            theirs.args(["-o", fl]);
            ours.args(["-o", fl]);
        }
        if snap {
            theirs.arg("-m");
            ours.arg("--metadata-snap");
        }
        f.eq_text(
            &format!("meta ls {fields:?} snap={snap} vs thin_ls"),
            &text(&run(ours.arg(&meta)).stdout),
            &stdout_of(theirs.arg(&meta)),
        );
    }
    for (a, b) in [(0, 1), (1, 0), (1, 2), (0, 2), (5, 3), (3, 5), (0, 5)] {
        let (a, b) = (a.to_string(), b.to_string());
        let theirs = stdout_of(
            tool("thin_delta")
                .args(["--thin1", &a, "--thin2", &b])
                .arg(&meta),
        );
        let ours = run(thinpool(["meta", "delta", "--thin1", &a, "--thin2", &b]).arg(&meta));
        f.eq_text(
            &format!("meta delta {a} {b} vs thin_delta"),
            &text(&ours.stdout),
            &theirs,
        );
    }

    // What the guest's operations imply (whatever data blocks the kernel picked).
    let pool = Pool::from_xml(&host_dump).expect("parse thin_dump");
    let set = |dev: u32| -> BTreeSet<u64> {
        pool.devices
            .get(&dev)
            .map(|d| d.mappings.keys().copied().collect())
            .unwrap_or_default()
    };
    let want: BTreeMap<u32, Vec<u64>> = BTreeMap::from([
        (0, vec![0, 1, 2, 3, 4, 9, 100, 200, 300, 1000, 16383]),
        (
            1,
            vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 100, 1000, 2000, 16383],
        ),
        (2, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 100, 1000, 16383]),
        (3, vec![0, 1, 2, 3, 50]),
        (5, vec![0, 1, 2, 3, 50]),
    ]);
    let devs: Vec<u32> = pool.devices.keys().copied().collect();
    assert_eq!(
        devs,
        vec![0, 1, 2, 3, 5],
        "devices after the guest (9 was deleted)"
    );
    for (dev, vblocks) in &want {
        assert_eq!(
            set(*dev),
            vblocks.iter().copied().collect(),
            "mapped blocks of device {dev}"
        );
    }
    assert_eq!(
        (pool.time, pool.transaction),
        (3, 7),
        "superblock time and transaction"
    );
    let dblock = |dev: u32, v: u64| pool.devices[&dev].mappings[&v].data_block;
    for v in [0, 1, 2, 9, 100, 1000, 16383] {
        assert_eq!(
            dblock(0, v),
            dblock(1, v),
            "block {v} shared by thin 0 and snapshot 1"
        );
    }
    for v in [3, 4] {
        assert_ne!(dblock(0, v), dblock(1, v), "block {v} copied on write");
    }
    for v in &want[&2] {
        assert_eq!(
            dblock(1, *v),
            dblock(2, *v),
            "block {v} shared by snapshots 1 and 2"
        );
    }
    for v in [1, 2, 3, 50] {
        assert_eq!(
            dblock(3, v),
            dblock(5, v),
            "block {v} shared by thin 5 and snapshot 3"
        );
    }
    assert_ne!(
        dblock(3, 0),
        dblock(5, 0),
        "block 0 of thin 5 copied on write"
    );

    // Every block the guest read is in the data file where the dump says, or unmapped and zero.
    let zeros = zeros_md5(BS);
    let mut reads = 0;
    for line in guest.lines().filter(|l| l.starts_with("READ ")) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, dev, v, md5] = fields[..] else {
            panic!("bad READ line {line:?}");
        };
        let (dev, v): (u32, u64) = (dev.parse().expect("dev"), v.parse().expect("vblock"));
        reads += 1;
        match pool.devices[&dev].mappings.get(&v) {
            Some(m) => assert_eq!(
                md5_hex(&read_block(&data, m.data_block, BS)),
                md5,
                "dev {dev} block {v}: data block {} holds what the guest read",
                m.data_block
            ),
            None => assert_eq!(md5, zeros, "dev {dev} block {v} is unmapped and read zeros"),
        }
    }
    assert_eq!(reads, 5 * 19, "READ lines from the guest");

    // The writable API opens the kernel's pool, sees exactly its mappings, and can go on
    // writing it: a snapshot and a copy-on-write remap, committed, still pass thin_check.
    {
        use std::sync::Arc;
        use thinpool_thin::{ThinId, ThinMetadata};
        let dev = Arc::new(thinpool_io::FileDevice::open(&meta).expect("open metadata"));
        let mut md = ThinMetadata::open(dev).expect("ThinMetadata::open of the kernel's pool");
        let ids: Vec<u32> = md.devices().unwrap().iter().map(|(i, _)| i.get()).collect();
        assert_eq!(ids, devs, "devices seen by the API");
        for (dev, d) in &pool.devices {
            let mut seen = BTreeMap::new();
            md.mappings(ThinId::new(*dev as u64).unwrap(), 0, &mut |v, b, t| {
                seen.insert(v, (b, t));
                true
            })
            .unwrap();
            let want: BTreeMap<u64, (u64, u32)> = d
                .mappings
                .iter()
                .map(|(v, m)| (*v, (m.data_block, m.time)))
                .collect();
            assert_eq!(seen, want, "mappings of device {dev} through the API");
        }
        let origin = ThinId::new(0).unwrap();
        md.create_snap(ThinId::new(42).unwrap(), origin).unwrap();
        let l = md.find_block(origin, 0).unwrap().expect("block 0 mapped");
        assert!(l.shared, "block 0 is shared after the snapshot");
        let b = md.alloc_data_block().unwrap().expect("free data block");
        md.insert_block(origin, 0, b).unwrap();
        let t = md.transaction_id();
        md.set_transaction_id(t, t + 1).unwrap();
        md.commit().unwrap();
    }
    run_ok(tool("thin_check").arg(&meta));
    let check = run(thinpool(["meta", "check"]).arg(&meta));
    f.check(
        &format!("meta check after our writes exits {}", check.status),
        check.status.success(),
    );
    f.finish();
}

fn between<'a>(s: &'a str, begin: &str, end: &str) -> &'a str {
    let start = s.find(begin).map(|i| i + begin.len()).unwrap_or_else(|| {
        panic!("no {begin:?} in the guest output:\n{s}");
    });
    let stop = s[start..]
        .find(end)
        .map(|i| i + start)
        .unwrap_or_else(|| panic!("no {end:?} in the guest output"));
    &s[start..stop]
}
