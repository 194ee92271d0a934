//! Crash safety of the metadata layer: a deterministic workload of transactions runs on a
//! [`FaultyDevice`] that fails every I/O after a chosen count (a kill at that instant); the
//! medium then keeps what was synced plus none, all, a torn prefix, or a random subset of what
//! came after. Reopening must always give exactly the last committed state — or, when the
//! crash came after the new superblock was issued, the state being committed — and never an
//! error. At least 1000 cut points per run (`THINPOOL_CRASH_POINTS`).

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use thinpool_io::{BlockDevice, CrashMode, FaultyDevice, MemDevice};
use thinpool_thin::dump::{DumpOptions, dump};
use thinpool_thin::xml::XmlWriter;
use thinpool_thin::{ThinId, ThinMetadata};

const META_SIZE: u64 = 4 << 20;

fn xml_of(dev: Arc<dyn BlockDevice>) -> Result<String, String> {
    let mut out = Vec::new();
    dump(dev, DumpOptions::default(), &mut XmlWriter::new(&mut out)).map_err(|e| e.to_string())?;
    Ok(String::from_utf8(out).unwrap())
}

/// Runs the workload; returns the XML after each completed commit (index 0 = formatted), or
/// stops at the first error with the states seen so far.
fn workload(dev: Arc<dyn BlockDevice>, seed: u64, record: bool) -> (Vec<String>, bool) {
    let mut states = Vec::new();
    let mut rng = StdRng::seed_from_u64(seed);
    let Ok(mut md) = ThinMetadata::format(dev.clone(), 128, 20_000) else {
        return (states, false);
    };
    // Odd workloads write changed nodes back early, between commits.
    if seed % 2 == 1 {
        md.set_dirty_limit(8);
    }
    if record {
        states.push(xml_of(dev.clone()).unwrap());
    }
    let mut next_id = 0u32;
    for _txn in 0..12 {
        let r: thinpool_thin::Result<()> = (|| {
            for _ in 0..rng.random_range(1..6) {
                let ids: Vec<u32> = md.devices()?.iter().map(|(i, _)| i.get()).collect();
                match rng.random_range(0..10) {
                    0 | 1 => {
                        md.create_thin(ThinId::new(next_id as u64)?)?;
                        next_id += 1;
                    }
                    2 if !ids.is_empty() => {
                        let o = ids[rng.random_range(0..ids.len())];
                        md.create_snap(ThinId::new(next_id as u64)?, ThinId::new(o as u64)?)?;
                        next_id += 1;
                    }
                    3 if ids.len() > 2 => {
                        md.delete_thin(ThinId::new(ids[rng.random_range(0..ids.len())] as u64)?)?;
                    }
                    4..=7 if !ids.is_empty() => {
                        let id = ThinId::new(ids[rng.random_range(0..ids.len())] as u64)?;
                        let start = rng.random_range(0..3000u64);
                        for v in start..start + rng.random_range(1..400) {
                            if let Some(b) = md.alloc_data_block()? {
                                md.insert_block(id, v, b)?;
                            }
                        }
                    }
                    8 if !ids.is_empty() => {
                        let id = ThinId::new(ids[rng.random_range(0..ids.len())] as u64)?;
                        let start = rng.random_range(0..3000u64);
                        md.remove_range(id, start, start + rng.random_range(1..300))?;
                    }
                    _ => {
                        let t = md.transaction_id();
                        md.set_transaction_id(t, t + 1)?;
                    }
                }
            }
            md.commit()
        })();
        if r.is_err() {
            return (states, false);
        }
        if record {
            states.push(xml_of(dev.clone()).unwrap());
        }
    }
    (states, true)
}

#[test]
fn reopen_after_a_crash_gives_the_last_commit() {
    let seed: u64 = std::env::var("THINPOOL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let points: u64 = std::env::var("THINPOOL_CRASH_POINTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    eprintln!("crash test: seed {seed} (THINPOOL_TEST_SEED), {points} cut points");
    // Ten workloads (seeds seed..seed+9), each cut at points/10 random I/Os.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut seen_new = 0;
    let mut all_ios = 0;
    let per = points.div_ceil(10);
    for w in 0..10 {
        let wseed = seed.wrapping_add(w);
        let (new, ios) = cut_workload(wseed, per, &mut rng);
        seen_new += new;
        all_ios += ios;
    }
    eprintln!(
        "crash test: {} cuts over 10 workloads of {all_ios} I/Os in all, {seen_new} reopened at the in-flight commit",
        per * 10
    );
}

/// Cut workload `seed` at `points` random I/Os; returns how many reopened at the in-flight
/// commit and the workload's number of I/Os.
fn cut_workload(seed: u64, points: u64, rng: &mut StdRng) -> (u64, u64) {
    // Reference run: the states and the number of I/Os.
    let reference = Arc::new(FaultyDevice::new(META_SIZE));
    let (states, done) = workload(reference.clone(), seed, true);
    assert!(done);
    let total_ios = count_ios(seed);
    let modes = [
        CrashMode::DropAll,
        CrashMode::KeepAll,
        CrashMode::TornPrefix,
        CrashMode::RandomSubset,
    ];
    let mut seen_new = 0;
    for point in 0..points {
        let cut = rng.random_range(1..total_ios);
        let mode = modes[(point % 4) as usize];
        let dev = Arc::new(FaultyDevice::new(META_SIZE));
        dev.fail_after(cut);
        let (_, finished) = workload(dev.clone(), seed, false);
        assert!(
            !finished,
            "cut {cut} of {total_ios} did not interrupt the workload"
        );
        // Count the commits that completed before the cut: their superblocks were synced.
        let image = dev.crash_image(mode, rng);
        let durable = Arc::new(MemDevice::from_bytes(dev.durable_image()));
        let committed = if durable.to_bytes()[..4096].iter().all(|&b| b == 0) {
            None
        } else {
            Some(xml_of(durable).expect("the durable image opens"))
        };
        let crashed: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(image));
        let all_zero = {
            let mut b = [0u8; 4096];
            crashed.read_at(&mut b, 0).unwrap();
            b.iter().all(|&x| x == 0)
        };
        if all_zero {
            // The crash came before the first superblock reached the medium: nothing to open.
            assert!(committed.is_none());
            continue;
        }
        ThinMetadata::open(crashed.clone())
            .unwrap_or_else(|e| panic!("cut {cut} ({mode:?}): reopen failed: {e}"));
        let report =
            thinpool_thin::check::check(crashed.clone(), &Default::default(), &mut |_, _| {})
                .unwrap();
        assert!(
            report.errors.is_empty(),
            "cut {cut} ({mode:?}): meta check of the reopened image:\n{}",
            report.render()
        );
        let got = xml_of(crashed).unwrap();
        // The durable state must be one the reference run committed (or nothing yet). A
        // transaction may change nothing visible, so equal states can follow each other: the
        // last equal one is the one to compare the in-flight commit with.
        let k = committed.as_ref().map(|c| {
            states.iter().rposition(|s| s == c).unwrap_or_else(|| {
                panic!("cut {cut}: the synced image holds a state no commit produced")
            })
        });
        let ok = Some(&got) == committed.as_ref()
            || k.is_some_and(|k| states.get(k + 1) == Some(&got))
            || (committed.is_none() && states.first() == Some(&got));
        if Some(&got) != committed.as_ref() {
            seen_new += 1;
        }
        if !ok {
            let gi = states.iter().position(|s| *s == got);
            let dir = std::env::temp_dir().join(format!("thinpool-crash-{seed}-{cut}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("got.xml"), &got).unwrap();
            if let Some(c) = &committed {
                std::fs::write(dir.join("committed.xml"), c).unwrap();
            }
            panic!(
                "cut {cut} ({mode:?}): reopened state (commit {gi:?}) is neither the last commit ({k:?}) nor the one in flight; XML kept in {}",
                dir.display()
            );
        }
    }
    (seen_new, total_ios)
}

fn count_ios(seed: u64) -> u64 {
    // Binary search the smallest countdown that lets the workload finish.
    let finishes = |n: u64| {
        let dev = Arc::new(FaultyDevice::new(META_SIZE));
        dev.fail_after(n);
        workload(dev, seed, false).1
    };
    let (mut lo, mut hi) = (1u64, 1u64 << 20);
    assert!(finishes(hi));
    while lo < hi {
        let mid = (lo + hi) / 2;
        if finishes(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}
