//! In-process benchmark of the pool engine against the physical limit here: `pwrite`/`pread`
//! on a raw sparse file with the same pattern, interleaved in one run (not a test).
//!
//! `cargo run --release -p thinpool-engine --example engine-bench [DIR] [OPS]`
//!
//! Prints, for each pattern, operations per second of the engine and of the raw file and their
//! ratio (engine / raw), then snapshot creation times at 1 000, 100 000 and 1 000 000 mappings.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use thinpool_engine::{Pool, PoolConfig, PoolOptions};
use thinpool_io::FileDevice;
use thinpool_thin::{ThinId, ThinMetadata};

const BS: u64 = 64 << 10;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn report(name: &str, ops: usize, ours: f64, raw: f64) {
    let (a, b) = (ops as f64 / ours, ops as f64 / raw);
    println!("{name:<34} {a:>12.0} {b:>12.0} {:>8.2}", a / b);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).map_or_else(std::env::temp_dir, |d| d.into());
    let ops: usize = args.get(2).map_or(20_000, |s| s.parse().expect("OPS"));
    let root = dir.join(format!("engine-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let vol_size: u64 = 8 << 30; // 131072 blocks
    let cfg = PoolConfig {
        data_size: 16 << 30,
        metadata_size: 256 << 20,
        ..Default::default()
    };
    let opts = PoolOptions::default();
    let pool = Pool::create(&root, &cfg, opts).expect("create pool");
    pool.create_volume("v", vol_size).unwrap();
    let v = pool.open_volume("v").unwrap();
    let raw_path = root.join("raw");
    let raw = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&raw_path)
        .unwrap();
    raw.set_len(vol_size).unwrap();
    let nblocks = vol_size / BS;
    let mut rng = Rng(0x1234_5678_9abc_def1);
    // Distinct random blocks, a random 4 KiB slot in each.
    let mut blocks: Vec<u64> = (0..nblocks).collect();
    for i in (1..blocks.len()).rev() {
        blocks.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let offs: Vec<u64> = blocks[..ops]
        .iter()
        .map(|b| b * BS + (rng.next() % 16) * 4096)
        .collect();
    let buf4 = vec![0xa5u8; 4096];
    println!("pattern ({ops} ops)                   engine ops/s    raw ops/s  ratio");

    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    let ours = time(&mut || {
        for &o in &offs {
            v.write_at(&buf4, o).unwrap();
        }
        v.flush().unwrap();
    });
    let rawt = time(&mut || {
        for &o in &offs {
            raw.write_all_at(&buf4, o).unwrap();
        }
        raw.sync_data().unwrap();
    });
    report("4K random write, fresh blocks", ops, ours, rawt);

    let offs2: Vec<u64> = offs
        .iter()
        .map(|o| (o / BS) * BS + (rng.next() % 16) * 4096)
        .collect();
    let ours = time(&mut || {
        for &o in &offs2 {
            v.write_at(&buf4, o).unwrap();
        }
        v.flush().unwrap();
    });
    let rawt = time(&mut || {
        for &o in &offs2 {
            raw.write_all_at(&buf4, o).unwrap();
        }
        raw.sync_data().unwrap();
    });
    report("4K random write, provisioned", ops, ours, rawt);

    let mut rbuf = vec![0u8; 4096];
    let ours = time(&mut || {
        for &o in &offs2 {
            v.read_at(&mut rbuf, o).unwrap();
        }
    });
    let rawt = time(&mut || {
        for &o in &offs2 {
            raw.read_exact_at(&mut rbuf, o).unwrap();
        }
    });
    report("4K random read, provisioned", ops, ours, rawt);

    pool.snapshot("v", "snap").unwrap();
    let ours = time(&mut || {
        for &o in &offs {
            v.write_at(&buf4, o).unwrap();
        }
        v.flush().unwrap();
    });
    let rawt = time(&mut || {
        for &o in &offs {
            raw.write_all_at(&buf4, o).unwrap();
        }
        raw.sync_data().unwrap();
    });
    report("4K random write, shared (COW)", ops, ours, rawt);

    pool.create_volume("seq", 2 << 30).unwrap();
    let s = pool.open_volume("seq").unwrap();
    let mb = vec![0x5au8; 1 << 20];
    let n = 1024usize;
    let raw2 = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(root.join("raw2"))
        .unwrap();
    raw2.set_len(2 << 30).unwrap();
    let ours = time(&mut || {
        for i in 0..n {
            s.write_at(&mb, (i as u64) << 20).unwrap();
        }
        s.flush().unwrap();
    });
    let rawt = time(&mut || {
        for i in 0..n {
            raw2.write_all_at(&mb, (i as u64) << 20).unwrap();
        }
        raw2.sync_data().unwrap();
    });
    report("1M sequential write (fresh)", n, ours, rawt);
    let mut rb = vec![0u8; 1 << 20];
    let ours = time(&mut || {
        for i in 0..n {
            s.read_at(&mut rb, (i as u64) << 20).unwrap();
        }
    });
    let rawt = time(&mut || {
        for i in 0..n {
            raw2.read_exact_at(&mut rb, (i as u64) << 20).unwrap();
        }
    });
    report("1M sequential read", n, ours, rawt);
    drop((v, s));
    pool.close().unwrap();

    // Snapshot creation: metadata only (ThinMetadata::create_snap + commit) and the whole
    // engine operation (catalog write + commit, both fsynced), at growing mapping counts.
    println!("\nsnapshot creation      create_snap (in memory)   + commit (fsync)");
    for &maps in &[1_000u64, 100_000, 1_000_000] {
        let p = root.join(format!("snapmeta-{maps}"));
        let dev = Arc::new(FileDevice::create(&p, 1 << 30).unwrap());
        let mut md = ThinMetadata::format(dev, 128, maps + 10).unwrap();
        let t0 = ThinId::new(0).unwrap();
        md.create_thin(t0).unwrap();
        for i in 0..maps {
            let b = md.alloc_data_block().unwrap().unwrap();
            md.insert_block(t0, i, b).unwrap();
        }
        md.commit().unwrap();
        let t = Instant::now();
        md.create_snap(ThinId::new(1).unwrap(), t0).unwrap();
        let snap = t.elapsed();
        md.commit().unwrap();
        let total = t.elapsed();
        println!(
            "{maps:>9} mappings   {:>10.3} ms               {:>8.3} ms",
            snap.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3
        );
        let _ = std::fs::remove_file(&p);
    }
    remove(&root);
}

fn remove(root: &Path) {
    let _ = std::fs::remove_dir_all(root);
}
