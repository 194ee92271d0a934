//! Concurrency: 8 threads on one pool (background commits on). Each thread owns two volumes
//! and the snapshots it takes of them, and writes, reads (checked exactly), discards, flushes,
//! grows, snapshots and removes them; all threads also write their own, disjoint region of
//! one shared volume through one shared handle (the regions are not block-aligned, so neighbours share blocks:
//! provisioning and copy-on-write of one block race), read the other threads' regions, and
//! snapshot the shared volume while the others write to it.
//!
//! A read of another thread's region (or a snapshot of the shared volume) that overlaps its
//! writes may see, byte by byte, the last write completed before the read started or any write
//! that started before the read ended, and nothing else. Every write registers itself (with
//! a global sequence number) before it is issued, so that check is exact.
//!
//! At the end every byte of every volume and snapshot is checked, the pool is closed,
//! `thin_check` and our check must pass, and after reopening everything is checked again.
//!
//! Seed: `THINPOOL_TEST_SEED`; operations per thread: `THINPOOL_ENGINE_CONC_OPS` (default 400).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use thinpool_engine::{Pool, PoolOptions, Volume};

use crate::common::*;

const THREADS: usize = 8;
/// Size of each thread's region of the shared volume (not a multiple of the block size).
const REGION: u64 = 40_000 + 123;
const OWN_SIZE: u64 = 16 * BS + 1234;

/// One write to a region of the shared volume.
#[derive(Clone, Copy, Debug)]
struct Logged {
    id: u64,
    start: u64,
    end: u64,
    /// Sequence number taken just before the write was issued.
    seq_start: u64,
    /// Taken just after it returned; `u64::MAX` while in flight.
    seq_end: u64,
}

/// The writes of one thread to its region, in issue order.
type RegionLog = Mutex<Vec<Logged>>;

struct Shared {
    pool: Pool,
    shared: Volume,
    seq: AtomicU64,
    logs: Vec<RegionLog>,
    /// Snapshots of the shared volume: name, sequence numbers before and after.
    shared_snaps: Mutex<Vec<(String, u64, u64)>>,
}

/// Check `buf` (read from the shared volume at `off`, between sequence numbers `r0` and
/// `r1`) against the logs: byte by byte, the last write completed before `r0` or any write
/// started before `r1`; zeros only if no write completed before `r0`. Returns a description
/// of the first impossible byte.
fn check_shared(logs: &[RegionLog], off: u64, buf: &[u8], r0: u64, r1: u64) -> Option<String> {
    let mut i = 0usize;
    while i < buf.len() {
        let pos = off + i as u64;
        let owner = (pos / REGION) as usize;
        let region_end = ((owner as u64 + 1) * REGION).min(off + buf.len() as u64);
        if owner >= THREADS {
            // Past the regions (not written by anyone).
            if buf[i] != 0 {
                return Some(format!("byte {pos} past the regions is {:#04x}", buf[i]));
            }
            i += 1;
            continue;
        }
        let log = logs[owner].lock().unwrap();
        while off + (i as u64) < region_end {
            let pos = off + i as u64;
            let v = buf[i];
            let covering = log.iter().filter(|w| w.start <= pos && pos < w.end);
            let mut last_done: Option<&Logged> = None;
            for w in covering.clone() {
                if w.seq_end < r0 {
                    last_done = Some(w);
                }
            }
            let mut ok = match last_done {
                None => v == 0,
                Some(w) => v == pat(w.id, pos),
            };
            if !ok {
                ok = covering
                    .filter(|w| w.seq_start < r1 && last_done.is_none_or(|l| w.id > l.id))
                    .any(|w| v == pat(w.id, pos));
            }
            if !ok {
                return Some(format!(
                    "byte {pos} (region of thread {owner}, block {}) is {v:#04x}: last write completed before is {:?}, writes in flight or later: {:?}",
                    pos / BS,
                    last_done,
                    log.iter()
                        .filter(|w| w.start <= pos
                            && pos < w.end
                            && w.seq_start < r1
                            && last_done.is_none_or(|l| w.id > l.id))
                        .collect::<Vec<_>>()
                ));
            }
            i += 1;
        }
    }
    None
}

/// A thread's volumes (name, content) and its region, without handles.
type Models = (Vec<(String, Vec<u8>)>, Vec<u8>);

/// What one thread knows exactly: its volumes and snapshots (name, handle, content), and its
/// region of the shared volume.
struct Mine {
    vols: Vec<(String, Volume, Vec<u8>)>,
    region: Vec<u8>,
}

fn verify_exact(h: &Volume, want: &[u8], what: &str) {
    let mut buf = vec![0u8; want.len()];
    h.read_at(&mut buf, 0)
        .unwrap_or_else(|e| panic!("{what}: read: {e}"));
    if let Some((i, g, w)) = first_diff(&buf, want) {
        panic!(
            "{what}: byte {i} (block {}) is {g:#04x}, want {w:#04x}; {} bytes differ",
            i as u64 / BS,
            buf.iter().zip(want).filter(|(a, b)| a != b).count()
        );
    }
}

fn worker(s: &Shared, t: usize, seed: u64, ops: u64) -> Mine {
    let mut rng = StdRng::seed_from_u64(seed ^ (t as u64).wrapping_mul(0x9E37_79B9));
    let mut counter = 0u64;
    let mut next_id = || {
        counter += 1;
        ((t as u64 + 1) << 32) | counter
    };
    let mut mine = Mine {
        vols: Vec::new(),
        region: vec![0; REGION as usize],
    };
    for j in 0..2 {
        let name = format!("t{t}v{j}");
        s.pool
            .create_volume(&name, OWN_SIZE)
            .unwrap_or_else(|e| panic!("thread {t}: create {name}: {e}"));
        let h = s.pool.open_volume(&name).unwrap();
        mine.vols.push((name, h, vec![0; OWN_SIZE as usize]));
    }
    let range = |rng: &mut StdRng, size: u64| -> (u64, u64) {
        let len = match rng.random_range(0..3) {
            0 => rng.random_range(1..=4096u64),
            1 => rng.random_range(1..=2 * BS),
            _ => BS,
        }
        .min(size);
        (rng.random_range(0..=size - len), len)
    };
    let base = t as u64 * REGION;
    let mut nsnap = 0;
    for step in 0..ops {
        let ctx = |what: &str| format!("thread {t} step {step}: {what}");
        match rng.random_range(0..100) {
            // Write one of my volumes.
            0..=34 => {
                let k = rng.random_range(0..mine.vols.len());
                let (name, h, model) = &mut mine.vols[k];
                let (off, len) = range(&mut rng, model.len() as u64);
                let id = next_id();
                let data = pattern(id, off, len as usize);
                h.write_at(&data, off)
                    .unwrap_or_else(|e| panic!("{}", ctx(&format!("write {name}: {e}"))));
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            // Read one of my volumes: exact.
            35..=49 => {
                let k = rng.random_range(0..mine.vols.len());
                let (name, h, model) = &mine.vols[k];
                let (off, len) = range(&mut rng, model.len() as u64);
                let mut buf = vec![0u8; len as usize];
                h.read_at(&mut buf, off)
                    .unwrap_or_else(|e| panic!("{}", ctx(&format!("read {name}: {e}"))));
                let want = &model[off as usize..(off + len) as usize];
                if let Some((i, g, w)) = first_diff(&buf, want) {
                    panic!(
                        "{}",
                        ctx(&format!(
                            "read {name} [{off}, +{len}): byte {} is {g:#04x}, want {w:#04x}",
                            off + i as u64
                        ))
                    );
                }
            }
            // Write my region of the shared volume.
            50..=69 => {
                let (o, len) = range(&mut rng, REGION);
                let id = next_id();
                let (start, end) = (base + o, base + o + len);
                let idx = {
                    let mut log = s.logs[t].lock().unwrap();
                    let seq_start = s.seq.fetch_add(1, Ordering::SeqCst);
                    log.push(Logged {
                        id,
                        start,
                        end,
                        seq_start,
                        seq_end: u64::MAX,
                    });
                    log.len() - 1
                };
                let data = pattern(id, start, len as usize);
                s.shared
                    .write_at(&data, start)
                    .unwrap_or_else(|e| panic!("{}", ctx(&format!("write shared: {e}"))));
                s.logs[t].lock().unwrap()[idx].seq_end = s.seq.fetch_add(1, Ordering::SeqCst);
                mine.region[o as usize..(o + len) as usize].copy_from_slice(&data);
            }
            // Read anywhere in the shared volume (others' regions too).
            70..=84 => {
                let (off, len) = range(&mut rng, THREADS as u64 * REGION);
                let mut buf = vec![0u8; len as usize];
                let r0 = s.seq.fetch_add(1, Ordering::SeqCst);
                s.shared
                    .read_at(&mut buf, off)
                    .unwrap_or_else(|e| panic!("{}", ctx(&format!("read shared: {e}"))));
                let r1 = s.seq.fetch_add(1, Ordering::SeqCst);
                if let Some(m) = check_shared(&s.logs, off, &buf, r0, r1) {
                    panic!("{}", ctx(&format!("read shared [{off}, +{len}): {m}")));
                }
            }
            // Snapshot one of my volumes (or snapshots), checked at once.
            85..=88 if mine.vols.len() < 6 => {
                let k = rng.random_range(0..mine.vols.len());
                nsnap += 1;
                let snap = format!("t{t}s{nsnap}");
                let (origin, _, model) = &mine.vols[k];
                let model = model.clone();
                s.pool
                    .snapshot(origin, &snap)
                    .unwrap_or_else(|e| panic!("{}", ctx(&format!("snapshot {origin}: {e}"))));
                let h = s.pool.open_volume(&snap).unwrap();
                verify_exact(&h, &model, &ctx(&format!("new snapshot {snap}")));
                mine.vols.push((snap, h, model));
            }
            // Snapshot the shared volume while the others write to it.
            89..=90 => {
                nsnap += 1;
                let snap = format!("t{t}shared{nsnap}");
                let r0 = s.seq.fetch_add(1, Ordering::SeqCst);
                s.pool
                    .snapshot("shared", &snap)
                    .unwrap_or_else(|e| panic!("{}", ctx(&format!("snapshot shared: {e}"))));
                let r1 = s.seq.fetch_add(1, Ordering::SeqCst);
                s.shared_snaps.lock().unwrap().push((snap, r0, r1));
            }
            // Discard in one of my volumes: whole blocks read zeros, the rest is kept.
            91..=94 => {
                let k = rng.random_range(0..mine.vols.len());
                let (name, h, model) = &mut mine.vols[k];
                let (off, len) = range(&mut rng, model.len() as u64);
                h.discard(off, len)
                    .unwrap_or_else(|e| panic!("{}", ctx(&format!("discard {name}: {e}"))));
                for b in off.div_ceil(BS)..(off + len) / BS {
                    model[(b * BS) as usize..((b + 1) * BS) as usize].fill(0);
                }
            }
            // Flush.
            95 => {
                let k = rng.random_range(0..mine.vols.len());
                mine.vols[k]
                    .1
                    .flush()
                    .unwrap_or_else(|e| panic!("{}", ctx(&format!("flush: {e}"))));
            }
            // Remove one of my snapshots.
            96 if mine.vols.len() > 2 => {
                let k = rng.random_range(2..mine.vols.len());
                let (name, h, _) = mine.vols.remove(k);
                drop(h);
                s.pool
                    .remove_volume(&name)
                    .unwrap_or_else(|e| panic!("{}", ctx(&format!("remove {name}: {e}"))));
            }
            // Grow one of my volumes through the pool; my handle sees the new size.
            97 => {
                let k = rng.random_range(0..mine.vols.len());
                let (name, h, model) = &mut mine.vols[k];
                if model.len() as u64 > 3 * OWN_SIZE {
                    continue;
                }
                let new = model.len() as u64 + rng.random_range(1..=3 * BS);
                s.pool
                    .resize_volume(name, new)
                    .unwrap_or_else(|e| panic!("{}", ctx(&format!("resize {name}: {e}"))));
                model.resize(new as usize, 0);
                assert_eq!(
                    h.size(),
                    new,
                    "{}",
                    ctx(&format!("size of {name} after resize"))
                );
            }
            _ => {
                s.pool
                    .status()
                    .unwrap_or_else(|e| panic!("{}", ctx(&format!("status: {e}"))));
            }
        }
    }
    mine
}

fn verify_all(
    pool: &Pool,
    shared: &Volume,
    logs: &[RegionLog],
    snaps: &[(String, u64, u64)],
    mines: &[Mine],
    when: &str,
) {
    for (t, m) in mines.iter().enumerate() {
        for (name, _, model) in &m.vols {
            let h = pool.open_volume(name).unwrap();
            verify_exact(&h, model, &format!("{when}: thread {t}'s {name}"));
        }
        let mut buf = vec![0u8; REGION as usize];
        shared.read_at(&mut buf, t as u64 * REGION).unwrap();
        if let Some((i, g, w)) = first_diff(&buf, &m.region) {
            panic!(
                "{when}: shared volume, region of thread {t}: byte {} is {g:#04x}, want {w:#04x}",
                t as u64 * REGION + i as u64
            );
        }
    }
    for (snap, r0, r1) in snaps {
        let h = pool.open_volume(snap).unwrap();
        let mut buf = vec![0u8; h.size() as usize];
        h.read_at(&mut buf, 0).unwrap();
        if let Some(m) = check_shared(logs, 0, &buf, *r0, *r1) {
            panic!("{when}: snapshot {snap} of the shared volume: {m}");
        }
    }
}

#[test]
fn eight_threads_many_volumes_one_shared() {
    let oracle = have_tool("thin_check");
    let seed = seed("engine concurrency");
    let ops = env_u64("THINPOOL_ENGINE_CONC_OPS", 400);
    let dir = tempfile::tempdir().unwrap();
    let opts = PoolOptions {
        min_free_percent: 0,
        commit_interval: Some(std::time::Duration::from_millis(50)),
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let pool = Pool::create(dir.path(), &small_config(2048, 16), opts.clone()).unwrap();
    pool.create_volume("shared", THREADS as u64 * REGION + 777)
        .unwrap();
    let shared = pool.open_volume("shared").unwrap();
    let s = Shared {
        pool,
        shared,
        seq: AtomicU64::new(0),
        logs: (0..THREADS).map(|_| Mutex::new(Vec::new())).collect(),
        shared_snaps: Mutex::new(Vec::new()),
    };
    let mines: Vec<Mine> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                let s = &s;
                sc.spawn(move || worker(s, t, seed, ops))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let Shared {
        pool,
        shared,
        logs,
        shared_snaps,
        ..
    } = s;
    let snaps = shared_snaps.into_inner().unwrap();
    verify_all(&pool, &shared, &logs, &snaps, &mines, "after the threads");
    let st = pool.status().unwrap();
    let n = mines.iter().map(|m| m.vols.len()).sum::<usize>() + 1 + snaps.len();
    assert_eq!(st.volumes + st.snapshots, n, "status counts: {st:?}");
    drop(shared);
    // Handles must be gone before close: keep only the models.
    let models: Vec<Models> = mines
        .into_iter()
        .map(|m| {
            (
                m.vols.into_iter().map(|(n, _, d)| (n, d)).collect(),
                m.region,
            )
        })
        .collect();
    pool.close().unwrap();
    check_closed_pool(dir.path(), oracle, "after the concurrency run");
    let pool = Pool::open(dir.path(), opts).unwrap();
    let shared = pool.open_volume("shared").unwrap();
    let mines: Vec<Mine> = models
        .into_iter()
        .map(|(vols, region)| Mine {
            vols: vols
                .into_iter()
                .map(|(n, d)| {
                    let h = pool.open_volume(&n).unwrap();
                    (n, h, d)
                })
                .collect(),
            region,
        })
        .collect();
    verify_all(&pool, &shared, &logs, &snaps, &mines, "after reopen");
    drop(mines);
    drop(shared);
    pool.close().unwrap();
    check_closed_pool(dir.path(), oracle, "after reopen");
    eprintln!(
        "engine concurrency: {THREADS} threads x {ops} operations, {} snapshots of the shared volume, {:.1?}",
        snaps.len(),
        t0.elapsed()
    );
}
