//! One failed operation, then the pool goes on (issue 11): a workload of whole-block writes,
//! discards, flushes and snapshots runs on memory devices, and exactly one I/O — the n-th, on
//! the metadata or the data device, n random — fails. Either like a full host file system
//! (`ENOSPC`) or like a failing disk (`EIO`). Afterwards the engine must behave as the kernel's
//! `metadata_operation_failed`:
//!
//! - the open metadata transaction is aborted, never committed half-done;
//! - host full: the pool stays writable, later requests succeed;
//!   I/O error: read-only when metadata was being changed, with errors naming the cause;
//! - a flush after the failure reports it once per handle if acknowledged writes may be lost;
//! - every block reads either its last flushed content or a write made since (never foreign
//!   bytes, never zeros where a flush promised data), before and after a reopen;
//! - the metadata on "disk" passes `thin_check` and our check after close.
//!
//! `THINPOOL_FAULT_CASES` (default 150) cases; seed printed (`THINPOOL_TEST_SEED`).
//!
//! And one set piece: a metadata device that stops taking writes but still reads (a disk
//! failing writes, a host file system gone bad for writes only). The commit of a flush fails,
//! the abort reads the last commit back, the pool goes read-only; then a new handle (a new NBD
//! client) opens the volume and reads everything flushed, while writes that need metadata and
//! every flush fail with errors naming the cause, and the status shows it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use thinpool_engine::{ErrorKind, Pool, PoolOptions, Volume};
use thinpool_io::{BlockDevice, MemDevice};

use crate::common::*;

const DATA_BLOCKS: u64 = 128;
const VOL_BLOCKS: u64 = 48;

/// A memory device that asks `fail(op)` before each operation (`"read"`, `"write"`, `"sync"`,
/// `"resize"`, `"punch hole"`) and fails it with the errno that returns, if any.
struct Hooked {
    inner: Arc<MemDevice>,
    name: String,
    fail: Box<dyn Fn(&'static str) -> Option<i32> + Send + Sync>,
}

impl Hooked {
    fn new(
        inner: &Arc<MemDevice>,
        name: &str,
        fail: impl Fn(&'static str) -> Option<i32> + Send + Sync + 'static,
    ) -> Arc<Hooked> {
        Arc::new(Hooked {
            inner: inner.clone(),
            name: name.into(),
            fail: Box::new(fail),
        })
    }

    fn hook(&self, op: &'static str, offset: u64, len: u64) -> thinpool_io::Result<()> {
        match (self.fail)(op) {
            Some(errno) => Err(thinpool_io::Error::Io {
                device: self.name.clone(),
                op,
                offset,
                len,
                cause: std::io::Error::from_raw_os_error(errno),
            }),
            None => Ok(()),
        }
    }
}

impl BlockDevice for Hooked {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> thinpool_io::Result<u64> {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> thinpool_io::Result<()> {
        self.hook("read", offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> thinpool_io::Result<()> {
        self.hook("write", offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> thinpool_io::Result<()> {
        self.hook("sync", 0, 0)?;
        self.inner.sync()
    }
    fn set_size(&self, size: u64) -> thinpool_io::Result<()> {
        self.hook("resize", size, 0)?;
        self.inner.set_size(size)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> thinpool_io::Result<()> {
        self.hook("punch hole", offset, len)?;
        self.inner.punch_hole(offset, len)
    }
}

/// What a block may read: its content at the last successful flush of its volume's handle,
/// and every write made to it since (ids; 0 = zeros).
#[derive(Clone, Default)]
struct Block {
    flushed: u64,
    since: Vec<u64>,
}

impl Block {
    fn allowed(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.flushed).chain(self.since.iter().copied())
    }
}

type Model = BTreeMap<String, Vec<Block>>;

/// After a successful commit: the last write to each block is its durable content.
fn collapse(model: &mut Model) {
    for m in model.values_mut().flatten() {
        if let Some(&last) = m.since.last() {
            m.flushed = last;
            m.since.clear();
        }
    }
}

fn opts() -> PoolOptions {
    PoolOptions {
        commit_interval: None,
        min_free_percent: 0,
        error_if_no_space: true,
        ..Default::default()
    }
}

/// Read every block of every volume; each must hold one of its allowed contents. With
/// `narrow` (after a failed request, when an abort may have dropped writes for good), the
/// model keeps only what is there now: the flushed content, or the one write found.
fn verify(pool: &Pool, model: &mut Model, narrow: bool, what: &str) {
    let bs = BS as usize;
    for (name, blocks) in model.iter_mut() {
        let v = pool.open_volume(name).unwrap();
        let mut buf = vec![0u8; bs];
        for (b, m) in blocks.iter_mut().enumerate() {
            // The one injected fault may hit this read: it fails alone, the retry works.
            v.read_at(&mut buf, b as u64 * BS)
                .or_else(|_| v.read_at(&mut buf, b as u64 * BS))
                .unwrap_or_else(|e| panic!("{what}: read {name} block {b} twice: {e}"));
            let found = m
                .allowed()
                .find(|&id| buf == pattern(id, b as u64 * BS, bs));
            match found {
                Some(id) if narrow => {
                    m.since = if id == m.flushed {
                        Vec::new()
                    } else {
                        vec![id]
                    };
                }
                Some(_) => {}
                None => panic!(
                    "{what}: {name} block {b} holds bytes no write put there (allowed ids {:?})",
                    m.allowed().collect::<Vec<_>>()
                ),
            }
        }
    }
}

fn run_case(case: u64, seed: u64, thin_check_oracle: bool) -> (bool, bool) {
    let mut rng = StdRng::seed_from_u64(seed ^ case.wrapping_mul(0x9E37_79B9));
    let dir = tempfile::tempdir().unwrap();
    let data = Arc::new(MemDevice::new(DATA_BLOCKS * BS));
    let meta = Arc::new(MemDevice::new(4 << 20));
    let host_full = rng.random_bool(0.5);
    let left = Arc::new(AtomicU64::new(u64::MAX));
    let fired = Arc::new(AtomicBool::new(false));
    // The n-th I/O operation, counted across both devices, fails once.
    let errno = if host_full { 28 } else { 5 }; // ENOSPC, EIO
    let wrap = |d: &Arc<MemDevice>, name: &str| -> Arc<dyn BlockDevice> {
        let (left, fired) = (left.clone(), fired.clone());
        Hooked::new(d, name, move |_| {
            (left.fetch_sub(1, Ordering::SeqCst) == 1).then(|| {
                fired.store(true, Ordering::SeqCst);
                errno
            })
        })
    };
    let pool = Pool::create_on(
        dir.path(),
        wrap(&data, "data"),
        wrap(&meta, "metadata"),
        BS,
        opts(),
    )
    .unwrap();
    let mut model: Model = BTreeMap::new();
    let mut handles: BTreeMap<String, Volume> = BTreeMap::new();
    for name in ["a", "b"] {
        pool.create_volume(name, VOL_BLOCKS * BS).unwrap();
        model.insert(name.into(), vec![Block::default(); VOL_BLOCKS as usize]);
        handles.insert(name.into(), pool.open_volume(name).unwrap());
    }
    // Arm the fault somewhere in the next few hundred operations.
    left.store(rng.random_range(1..600), Ordering::SeqCst);
    let mut next_id = case << 32;
    let mut failures = 0;
    for step in 0..160 {
        let names: Vec<String> = model.keys().cloned().collect();
        let name = names[rng.random_range(0..names.len())].clone();
        let v = &handles[&name];
        let b = rng.random_range(0..VOL_BLOCKS);
        let op = rng.random_range(0..10);
        let ctx = format!(
            "case {case} step {step} ({} fault)",
            if host_full { "ENOSPC" } else { "EIO" }
        );
        let r = match op {
            0..=5 => {
                next_id += 1;
                let r = v.write_at(&pattern(next_id, b * BS, BS as usize), b * BS);
                if r.is_ok() {
                    model.get_mut(&name).unwrap()[b as usize]
                        .since
                        .push(next_id);
                }
                r
            }
            6 => {
                let r = v.discard(b * BS, BS);
                if r.is_ok() {
                    model.get_mut(&name).unwrap()[b as usize].since.push(0);
                }
                r
            }
            7 | 8 => {
                let r = v.flush();
                if r.is_ok() {
                    // A flush is a pool commit: every volume's writes are durable with it.
                    collapse(&mut model);
                }
                r
            }
            _ if model.len() < 5 => {
                let snap = format!("s{step}");
                let r = pool.snapshot(&name, &snap).map(|_| ());
                if r.is_ok() {
                    // Creating a snapshot commits the pool; the snapshot holds the origin.
                    collapse(&mut model);
                    let blocks = model[&name].clone();
                    model.insert(snap.clone(), blocks);
                    handles.insert(snap.clone(), pool.open_volume(&snap).unwrap());
                }
                r
            }
            _ => Ok(()),
        };
        if let Err(e) = r {
            failures += 1;
            let kind = e.kind();
            if host_full {
                assert!(
                    kind == ErrorKind::NoSpace,
                    "{ctx}: a full host must fail requests with NoSpace, got {kind:?}: {e}"
                );
            } else {
                assert!(
                    matches!(
                        kind,
                        ErrorKind::Io | ErrorKind::ReadOnly | ErrorKind::NoSpace
                    ),
                    "{ctx}: unexpected error kind {kind:?}: {e}"
                );
            }
            // Whatever failed, the pool still reads consistently.
            verify(&pool, &mut model, true, &format!("{ctx}, after {e}"));
        }
    }
    if host_full && fired.load(Ordering::SeqCst) {
        // The host has space again: new blocks can be mapped and flushed.
        let v = &handles["a"];
        let target = (0..VOL_BLOCKS).find(|&b| v.mapped_extents(b * BS, BS).unwrap().is_empty());
        if let Some(b) = target {
            next_id += 1;
            v.write_at(&pattern(next_id, b * BS, BS as usize), b * BS)
                .unwrap_or_else(|e| panic!("case {case}: a write after the host freed space: {e}"));
            model.get_mut("a").unwrap()[b as usize].since.push(next_id);
            if v.flush().is_err() {
                // It may report the earlier loss once; the commit itself went through.
                verify(
                    &pool,
                    &mut model,
                    true,
                    &format!("case {case}: flush after the fault"),
                );
            }
            v.flush()
                .unwrap_or_else(|e| panic!("case {case}: a flush after the host freed space: {e}"));
            collapse(&mut model);
        }
    }
    verify(
        &pool,
        &mut model,
        false,
        &format!("case {case} before close"),
    );
    // Final flush through each handle (reports a loss at most once per handle), then close.
    drop(handles);
    let _ = pool.close();
    let reopened = Pool::open_on(dir.path(), data.clone(), meta.clone(), opts())
        .unwrap_or_else(|e| panic!("case {case}: reopen after the fault: {e}"));
    verify(
        &reopened,
        &mut model,
        false,
        &format!("case {case} after reopen"),
    );
    reopened.close().unwrap();
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), meta.to_bytes()).unwrap();
    if thin_check_oracle {
        thin_check(f.path()).unwrap_or_else(|e| panic!("case {case}: {e}"));
    }
    our_check(meta.clone()).unwrap_or_else(|e| panic!("case {case}: {e}"));
    (fired.load(Ordering::SeqCst), failures > 0)
}

#[test]
fn one_failed_io_then_the_pool_goes_on() {
    let seed = seed("one_failed_io_then_the_pool_goes_on");
    let cases = env_u64("THINPOOL_FAULT_CASES", 150);
    let oracle = have_tool("thin_check");
    let (mut fired, mut failed) = (0, 0);
    for case in 0..cases {
        let (f, r) = run_case(case, seed, oracle);
        fired += f as u64;
        failed += r as u64;
    }
    eprintln!(
        "faults: {cases} cases, {fired} injected faults fired, {failed} cases where a request failed"
    );
    assert!(
        fired * 2 > cases,
        "too few faults fired: {fired} of {cases}"
    );
}

/// A metadata device whose writes, syncs, resizes and punches fail with EIO while `broken` is
/// set, and its reads too while `reads_broken` is.
fn writes_fail(
    inner: &Arc<MemDevice>,
    broken: &Arc<AtomicBool>,
    reads_broken: &Arc<AtomicBool>,
) -> Arc<Hooked> {
    let (broken, reads_broken) = (broken.clone(), reads_broken.clone());
    Hooked::new(inner, "metadata", move |op| {
        let fails =
            broken.load(Ordering::SeqCst) && (op != "read" || reads_broken.load(Ordering::SeqCst));
        fails.then_some(5) // EIO
    })
}

/// Open the pool in `root` again on working devices: blocks `0..flushed` of volume `v` read
/// their first write (`pattern(1, …)`), the rest of `0..upto` zeros; then close it.
fn reopen_and_read(
    root: &std::path::Path,
    data: &Arc<MemDevice>,
    meta: &Arc<MemDevice>,
    flushed: u64,
    upto: u64,
) {
    let reopened = Pool::open_on(root, data.clone(), meta.clone(), opts()).unwrap();
    let v = reopened.open_volume("v").unwrap();
    let mut buf = vec![0u8; BS as usize];
    for b in 0..upto {
        v.read_at(&mut buf, b * BS).unwrap();
        let want = if b < flushed {
            pattern(1, b * BS, BS as usize)
        } else {
            vec![0; BS as usize]
        };
        assert!(buf == want, "block {b} after the reopen");
    }
    drop(v);
    reopened.close().unwrap();
}

#[test]
fn after_a_read_only_abort_new_handles_read_what_was_flushed_and_errors_name_the_cause() {
    use thinpool_engine::PoolMode;
    let dir = tempfile::tempdir().unwrap();
    let data = Arc::new(MemDevice::new(DATA_BLOCKS * BS));
    let meta = Arc::new(MemDevice::new(4 << 20));
    let broken = Arc::new(AtomicBool::new(false));
    let meta_dev = writes_fail(&meta, &broken, &Arc::new(AtomicBool::new(false)));
    let pool = Pool::create_on(dir.path(), data.clone(), meta_dev, BS, opts()).unwrap();
    pool.create_volume("v", VOL_BLOCKS * BS).unwrap();
    let v = pool.open_volume("v").unwrap();
    let block = |id: u64, b: u64| pattern(id, b * BS, BS as usize);
    for b in 0..8 {
        v.write_at(&block(1, b), b * BS).unwrap();
    }
    v.flush().unwrap();
    // Acknowledged, never flushed: new mappings.
    for b in 8..12 {
        v.write_at(&block(2, b), b * BS).unwrap();
    }

    broken.store(true, Ordering::SeqCst);
    let e = v.flush().expect_err("a flush whose commit cannot write");
    assert_eq!(
        e.kind(),
        ErrorKind::Io,
        "a failed commit is an I/O error: {e}"
    );
    assert!(e.to_string().contains("metadata"), "names the device: {e}");

    let st = pool.status().expect("status after the abort");
    let failure = st.failure.clone().unwrap_or_default();
    assert_eq!(st.mode, PoolMode::ReadOnly, "{st:?}");
    assert!(
        !st.needs_check,
        "the abort read the last commit back: {st:?}"
    );
    assert!(
        failure.starts_with("commit failed: ") && failure.contains("write of metadata"),
        "status names the failed operation and the device: {failure:?}"
    );

    // A new client: opens the volume and reads what was flushed; the unflushed new mappings
    // went with the aborted transaction.
    let info = pool.volume_info("v").expect("volume info after the abort");
    assert_eq!(info.mapped_blocks, 8, "{info:?}");
    let fresh = pool.open_volume("v").expect("open after the abort");
    let mut buf = vec![0u8; BS as usize];
    for b in 0..12 {
        fresh.read_at(&mut buf, b * BS).unwrap();
        let want = if b < 8 {
            block(1, b)
        } else {
            vec![0; BS as usize]
        };
        assert!(
            buf == want,
            "block {b} after the abort: {:?}",
            first_diff(&buf, &want)
        );
    }

    // Requests that need the metadata fail, naming the cause; so does every later flush.
    for (who, h) in [("the old handle", &v), ("the new handle", &fresh)] {
        let e = h
            .write_at(&block(3, 20), 20 * BS)
            .expect_err("a write that needs a new mapping");
        assert_eq!(e.kind(), ErrorKind::ReadOnly, "{who}: {e}");
        assert!(e.to_string().contains(&failure), "{who}: {e}");
        for _ in 0..2 {
            let e = h.flush().expect_err("a flush in read-only mode");
            assert!(e.to_string().contains(&failure), "{who}: {e}");
        }
        assert!(pool.create_volume("w", BS).is_err(), "{who}");
    }
    drop((v, fresh));
    assert!(
        pool.close().is_err(),
        "closing cannot commit a read-only pool"
    );

    // The disk works again: the pool opens at its last commit, the metadata is clean.
    broken.store(false, Ordering::SeqCst);
    reopen_and_read(dir.path(), &data, &meta, 8, 12);
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), meta.to_bytes()).unwrap();
    if have_tool("thin_check") {
        thin_check(f.path()).unwrap();
    }
    our_check(meta.clone()).unwrap();
}

#[test]
fn after_a_failed_abort_every_io_fails_naming_the_cause() {
    use thinpool_engine::PoolMode;
    let dir = tempfile::tempdir().unwrap();
    let data = Arc::new(MemDevice::new(DATA_BLOCKS * BS));
    let meta = Arc::new(MemDevice::new(4 << 20));
    let broken = Arc::new(AtomicBool::new(false));
    let reads_broken = Arc::new(AtomicBool::new(false));
    let meta_dev = writes_fail(&meta, &broken, &reads_broken);
    let pool = Pool::create_on(dir.path(), data.clone(), meta_dev, BS, opts()).unwrap();
    pool.create_volume("v", VOL_BLOCKS * BS).unwrap();
    let v = pool.open_volume("v").unwrap();
    let block = |id: u64, b: u64| pattern(id, b * BS, BS as usize);
    for b in 0..4 {
        v.write_at(&block(1, b), b * BS).unwrap();
    }
    v.flush().unwrap();
    v.write_at(&block(2, 5), 5 * BS).unwrap();

    // A shut-down host file system: writes and reads of the metadata fail.
    broken.store(true, Ordering::SeqCst);
    reads_broken.store(true, Ordering::SeqCst);
    let e = v.flush().expect_err("a flush whose commit cannot write");
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    let st = pool.status().expect("status of a failed pool");
    let failure = st.failure.clone().unwrap_or_default();
    assert_eq!(st.mode, PoolMode::Fail, "{st:?}");
    assert!(
        failure.contains("the last commit cannot be read back"),
        "{failure:?}"
    );
    // Every I/O fails (the open transaction was not aborted: nothing may be read from it),
    // and says why.
    let mut buf = vec![0u8; BS as usize];
    for b in [0, 5, 9] {
        let e = v
            .read_at(&mut buf, b * BS)
            .expect_err("a read on a failed pool");
        assert!(e.to_string().contains(&failure), "read of block {b}: {e}");
    }
    let e = v
        .write_at(&block(3, 0), 0)
        .expect_err("a write on a failed pool");
    assert!(e.to_string().contains(&failure), "{e}");
    let e = v.flush().expect_err("a flush on a failed pool");
    assert!(e.to_string().contains(&failure), "{e}");
    drop(v);
    assert!(
        pool.close().is_err(),
        "a failed pool cannot commit on close"
    );

    // The device works again: the pool opens at its last commit, the metadata is clean.
    broken.store(false, Ordering::SeqCst);
    reads_broken.store(false, Ordering::SeqCst);
    reopen_and_read(dir.path(), &data, &meta, 4, 6);
    our_check(meta.clone()).unwrap();
}
