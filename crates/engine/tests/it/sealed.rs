//! Commits whose data syncs are slow while writers keep provisioning: the commit seals its
//! transaction for a second data sync, mappings made meanwhile wait for the next one (see
//! `Inner::commit`). What must hold:
//!
//! - a write reads back at once, whether its mapping waits or not;
//! - at every commit's end, a crash keeps every write acknowledged before the commit began,
//!   every committed mapping points at data that was synced, and the blocks of the mappings
//!   that waited are not left allocated in the committed metadata (leaked): at most one
//!   block per writer (allocated, its data not yet written) is;
//! - the pool closes and reopens with every write, and both checkers find it clean.
//!
//! The data device here ([`Hooked`]) syncs what was written before the sync starts and then
//! takes a while (as a real sync of many dirty pages does), so writes made during it are not
//! covered.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use thinpool_engine::{Pool, PoolOptions};
use thinpool_io::{BlockDevice, FaultyDevice, MemDevice};
use thinpool_thin::{ThinId, ThinMetadata};

use crate::common::*;

const BLOCKS: u64 = 1024;
const WRITERS: u64 = 2;
const WRITE: usize = 4096;

/// Where writer `t`'s `i`-th write goes: its own virtual block, at an offset inside it that
/// varies.
fn place(t: u64, i: u64) -> (u64, u64) {
    let vblock = i * WRITERS + t;
    (vblock, vblock * BS + (vblock % 16) * WRITE as u64)
}

/// Check the state a crash now would leave: the durable images of both devices.
fn check_crash_state(
    data: &FaultyDevice,
    meta: &FaultyDevice,
    acked: &[u64],
    oracle: bool,
    round: usize,
) {
    let meta_image = meta.durable_image();
    let data_image = data.durable_image();
    let meta_dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(meta_image.clone()));
    // Our checker counts leaked data blocks as non-fatal errors; their number is checked
    // below.
    let report = thinpool_thin::check::check(meta_dev.clone(), &Default::default(), &mut |_, _| {})
        .unwrap_or_else(|e| panic!("round {round}: our check could not read the metadata: {e}"));
    assert!(
        !report.has_fatal(),
        "round {round}: our check:\n{}",
        report.render()
    );
    if oracle {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &meta_image).unwrap();
        if let Err(e) = thin_check(f.path()) {
            panic!("round {round}: {e}");
        }
    }
    let mut md = ThinMetadata::open(meta_dev).unwrap();
    let thin = ThinId::new(0).unwrap();
    // Every committed mapping points at its write's bytes in the durable data (each block is
    // written once, with its own pattern), and every write acknowledged before the commit
    // began is mapped.
    let mut committed = BTreeMap::new();
    md.mappings(thin, 0, &mut |v, d, _| {
        committed.insert(v, d);
        true
    })
    .unwrap();
    for (&vblock, &d) in &committed {
        let offset = vblock * BS + (vblock % 16) * WRITE as u64;
        let at = (d * BS + offset % BS) as usize;
        let want = pattern(vblock + 1, offset, WRITE);
        if let Some((j, g, w)) = first_diff(&data_image[at..at + WRITE], &want) {
            panic!(
                "round {round}: block {vblock} is mapped to data block {d}, whose byte {j} is {g:#04x} after a crash, want {w:#04x}: its data was not synced before the mapping was committed"
            );
        }
    }
    for (t, &n) in acked.iter().enumerate() {
        for i in 0..n {
            let (vblock, _) = place(t as u64, i);
            assert!(
                committed.contains_key(&vblock),
                "round {round}: block {vblock}, written before the commit, is not mapped"
            );
        }
    }
    let mapped = committed.len() as u64;
    let allocated = md.nr_data_blocks() - md.nr_free_data_blocks();
    assert!(
        allocated >= mapped && allocated - mapped <= WRITERS,
        "round {round}: {allocated} data blocks allocated for {mapped} mappings in the committed metadata: \
         blocks of mappings made during the commit leaked"
    );
}

#[test]
fn writes_during_a_slow_commit_wait_for_the_next_one_and_nothing_is_lost() {
    let oracle = have_tool("thin_check");
    let dir = tempfile::tempdir().unwrap();
    let data = Arc::new(FaultyDevice::new(BLOCKS * BS));
    let meta = Arc::new(FaultyDevice::new(4 << 20));
    let slow: Arc<dyn BlockDevice> = Arc::new(Hooked {
        sync_delay: Duration::from_millis(15),
        ..Hooked::new(data.clone())
    });
    let opts = PoolOptions {
        commit_interval: None,
        min_free_percent: 0,
        ..Default::default()
    };
    let pool = Pool::create_on(dir.path(), slow.clone(), meta.clone(), BS, opts.clone()).unwrap();
    pool.create_volume("v", BLOCKS * BS).unwrap();
    let per_writer = BLOCKS / WRITERS;
    let done: Vec<AtomicU64> = (0..WRITERS).map(|_| AtomicU64::new(0)).collect();
    let stop = AtomicBool::new(false);
    let mut rounds = 0;
    std::thread::scope(|s| {
        for t in 0..WRITERS {
            let (v, done, stop) = (pool.open_volume("v").unwrap(), &done, &stop);
            s.spawn(move || {
                let mut got = vec![0u8; WRITE];
                for i in 0..per_writer {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let (vblock, offset) = place(t, i);
                    let want = pattern(vblock + 1, offset, WRITE);
                    v.write_at(&want, offset).unwrap();
                    v.read_at(&mut got, offset).unwrap();
                    if let Some((j, g, w)) = first_diff(&got, &want) {
                        panic!("block {vblock} byte {j} reads {g:#04x} right after its write, want {w:#04x}");
                    }
                    done[t as usize].store(i + 1, Ordering::SeqCst);
                    // Slow enough that a commit sees many writes, fast enough to fill the
                    // volume in a few dozen commits.
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while done.iter().map(|d| d.load(Ordering::SeqCst)).sum::<u64>() < BLOCKS - 2 * WRITERS {
            assert!(std::time::Instant::now() < deadline, "the writers stopped");
            let acked: Vec<u64> = done.iter().map(|d| d.load(Ordering::SeqCst)).collect();
            pool.commit().unwrap();
            check_crash_state(&data, &meta, &acked, oracle, rounds);
            rounds += 1;
        }
        stop.store(true, Ordering::SeqCst);
    });
    let stats = pool.stats();
    eprintln!(
        "{rounds} commits checked; sealed {} times, {} mappings made while sealed",
        stats.sealed_commits, stats.mappings_made_while_sealed
    );
    assert!(
        stats.sealed_commits > 0 && stats.mappings_made_while_sealed > 0,
        "no commit was sealed with mappings waiting: the test did not test the path"
    );
    let written: BTreeMap<u64, u64> = done
        .iter()
        .enumerate()
        .map(|(t, d)| (t as u64, d.load(Ordering::SeqCst)))
        .collect();
    pool.close().unwrap();
    let pool = Pool::open_on(dir.path(), slow, meta.clone(), opts).unwrap();
    let v = pool.open_volume("v").unwrap();
    let mut got = vec![0u8; WRITE];
    for (&t, &n) in &written {
        for i in 0..n {
            let (vblock, offset) = place(t, i);
            v.read_at(&mut got, offset).unwrap();
            assert!(
                got == pattern(vblock + 1, offset, WRITE),
                "block {vblock} lost after close and reopen"
            );
        }
    }
    let mapped: u64 = written.values().sum();
    assert_eq!(
        pool.status().unwrap().used_data_blocks,
        mapped,
        "every allocated block is mapped after a clean close"
    );
    drop(v);
    pool.close().unwrap();
    let meta_dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(meta.durable_image()));
    our_check(meta_dev).unwrap();
}
