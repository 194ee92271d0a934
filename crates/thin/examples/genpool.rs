//! Generate a pool for the metadata benchmark: ORIGINS thin devices with MAPPINGS mappings
//! each, plus one snapshot of each origin in which every fifth block was rewritten
//! (copy-on-write), so that half the devices share most of their trees with another.
//!
//! Usage: `genpool META_FILE [ORIGINS=50] [MAPPINGS=10000]` (META_FILE is created, 1 GiB sparse).

use std::sync::Arc;

use thinpool_io::FileDevice;
use thinpool_thin::{ThinId, ThinMetadata};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(
        args.get(1)
            .expect("usage: genpool META_FILE [ORIGINS] [MAPPINGS]"),
    );
    let origins: u32 = args.get(2).map_or(50, |s| s.parse().expect("ORIGINS"));
    let per: u64 = args.get(3).map_or(10_000, |s| s.parse().expect("MAPPINGS"));
    let dev = Arc::new(FileDevice::create(&path, 1 << 30).expect("create metadata file"));
    let nr_data = (origins as u64) * per * 2;
    let mut md = ThinMetadata::format(dev, 128, nr_data).expect("format");
    for o in 0..origins {
        let id = ThinId::new(2 * o as u64).unwrap();
        md.create_thin(id).unwrap();
        // Mostly sequential runs with gaps, as a file system leaves them.
        let mut v = 0u64;
        for i in 0..per {
            let b = md.alloc_data_block().unwrap().expect("data space");
            md.insert_block(id, v, b).unwrap();
            v += if i % 97 == 0 { 13 } else { 1 };
        }
        let snap = ThinId::new(2 * o as u64 + 1).unwrap();
        md.create_snap(snap, id).unwrap();
        let mut n = 0;
        md.commit().unwrap();
        let mut keys = Vec::new();
        md.mappings(snap, 0, &mut |k, _, _| {
            keys.push(k);
            true
        })
        .unwrap();
        for k in keys.into_iter().step_by(5) {
            let b = md.alloc_data_block().unwrap().expect("data space");
            md.insert_block(snap, k, b).unwrap();
            n += 1;
        }
        let _ = n;
        md.commit().unwrap();
    }
    let t = md.transaction_id();
    md.set_transaction_id(t, t + 1).unwrap();
    md.commit().unwrap();
    let mapped: u64 = md
        .devices()
        .unwrap()
        .iter()
        .map(|(_, d)| d.mapped_blocks)
        .sum();
    eprintln!(
        "{}: {} devices, {} mappings, {} of {} metadata blocks used",
        path.display(),
        md.devices().unwrap().len(),
        mapped,
        md.nr_metadata_blocks() - md.nr_free_metadata_blocks(),
        md.nr_metadata_blocks()
    );
}
