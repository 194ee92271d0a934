//! In-process half of `bench/scale-bench` (not a test): volume operations of the engine at a
//! given number of volumes.
//!
//! - `scale-bench gen ROOT VOLUMES MAPPED MAPPINGS`: a pool in ROOT holding VOLUMES thin
//!   devices, the first MAPPED of them with MAPPINGS mappings each (mostly sequential runs),
//!   written straight into the metadata and then adopted by `Pool::open` (`thin-<id>`), so
//!   that 10 000 volumes and 1 000 000 mappings take seconds, not the hour of writing them.
//! - `scale-bench ops ROOT ROUNDS`: opens the pool (timed), then ROUNDS times: create a volume,
//!   snapshot it, remove the snapshot, remove the volume, and lists the volumes; prints one
//!   line per measure: `name median_ms p99_ms count`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use thinpool_engine::{Pool, PoolConfig, PoolOptions};
use thinpool_io::FileDevice;
use thinpool_thin::{ThinId, ThinMetadata};

const BS: u64 = 64 << 10;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: scale-bench gen ROOT VOLUMES MAPPED MAPPINGS | ops ROOT ROUNDS";
    let num = |i: usize, what: &str| -> u64 {
        args.get(i)
            .unwrap_or_else(|| fail(usage))
            .parse()
            .unwrap_or_else(|e| fail(&format!("{what} {:?}: {e}", args[i])))
    };
    match args.first().map(String::as_str) {
        Some("gen") => {
            let root = PathBuf::from(args.get(1).unwrap_or_else(|| fail(usage)));
            generate(
                &root,
                num(2, "VOLUMES"),
                num(3, "MAPPED"),
                num(4, "MAPPINGS"),
            );
        }
        Some("ops") => {
            let root = PathBuf::from(args.get(1).unwrap_or_else(|| fail(usage)));
            ops(&root, num(2, "ROUNDS") as usize);
        }
        _ => fail(usage),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("scale-bench: {msg}");
    std::process::exit(2)
}

fn generate(root: &Path, volumes: u64, mapped: u64, per: u64) {
    let mapped = mapped.min(volumes);
    let cfg = PoolConfig {
        // Room for the mappings and for the volumes the `ops` rounds write nothing to.
        data_size: (mapped * per * 2 + 1024) * BS,
        metadata_size: 2 << 30,
        ..Default::default()
    };
    let pool = Pool::create(root, &cfg, PoolOptions::default())
        .unwrap_or_else(|e| fail(&format!("creating a pool in {}: {e}", root.display())));
    pool.close()
        .unwrap_or_else(|e| fail(&format!("closing: {e}")));
    let meta = root.join("pool/metadata");
    let dev = Arc::new(
        FileDevice::open(&meta).unwrap_or_else(|e| fail(&format!("{}: {e}", meta.display()))),
    );
    let mut md = ThinMetadata::open(dev).unwrap_or_else(|e| fail(&format!("metadata: {e}")));
    let t = Instant::now();
    for i in 0..volumes {
        let id = ThinId::new(i).unwrap();
        md.create_thin(id).unwrap();
        if i < mapped {
            let mut v = 0u64;
            for j in 0..per {
                let b = md.alloc_data_block().unwrap().expect("data space");
                md.insert_block(id, v, b).unwrap();
                v += if j % 97 == 0 { 13 } else { 1 };
            }
        }
        if i % 256 == 255 {
            md.commit().unwrap();
        }
    }
    let tid = md.transaction_id();
    md.set_transaction_id(tid, tid + 1).unwrap();
    md.commit().unwrap();
    drop(md);
    let built = t.elapsed();
    let t = Instant::now();
    let pool = Pool::open(root, PoolOptions::default())
        .unwrap_or_else(|e| fail(&format!("opening the generated pool: {e}")));
    let n = pool.volumes().unwrap().len();
    pool.close().unwrap();
    eprintln!(
        "generated {n} volumes, {} mappings: metadata {:.1} s, first open (adoption) {:.0} ms",
        mapped * per,
        built.as_secs_f64(),
        t.elapsed().as_secs_f64() * 1e3
    );
}

fn ops(root: &Path, rounds: usize) {
    let mut open = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let pool = Pool::open(root, PoolOptions::default())
            .unwrap_or_else(|e| fail(&format!("opening {}: {e}", root.display())));
        open.push(ms(t));
        pool.close().unwrap();
    }
    print("open", &mut open);
    let pool = Pool::open(root, PoolOptions::default()).unwrap();
    let (mut create, mut snap, mut rm, mut ls) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        let (v, s) = (format!("sb-v{i}"), format!("sb-s{i}"));
        let t = Instant::now();
        pool.create_volume(&v, 1 << 30).unwrap();
        create.push(ms(t));
        let t = Instant::now();
        pool.snapshot(&v, &s).unwrap();
        snap.push(ms(t));
        let t = Instant::now();
        pool.remove_volume(&s).unwrap();
        rm.push(ms(t));
        let t = Instant::now();
        pool.remove_volume(&v).unwrap();
        rm.push(ms(t));
        if i % 5 == 0 {
            let t = Instant::now();
            let _ = pool.volumes().unwrap();
            ls.push(ms(t));
        }
    }
    pool.close().unwrap();
    print("create", &mut create);
    print("snapshot", &mut snap);
    print("remove", &mut rm);
    print("list", &mut ls);
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn print(name: &str, v: &mut [f64]) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    println!("{name} {:.3} {:.3} {}", at(0.5), at(0.99), v.len());
}
