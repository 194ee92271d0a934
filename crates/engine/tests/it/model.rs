//! Model-based test of the pool engine: random reads, writes (any size and alignment, inside
//! one block and across blocks), discards, write-zeroes, flushes and FUA writes, interleaved
//! with create, snapshot (of any volume, snapshots too), remove, resize (grow and shrink),
//! status, commit and reopen (close + open, or drop + open: both commit), all checked byte for
//! byte against an in-memory copy of every volume.
//!
//! The pool is file-backed (`Pool::create` in a temp dir) with 64 KiB blocks and only 256 data
//! blocks, so that freed blocks are soon reused. The model also tracks, per virtual block,
//! whether it must be mapped, must not be, or may be, and compares that with
//! `mapped_extents`, `volume_info` and (after each close) the metadata itself.
//!
//! Also: reserve/release of the metadata snapshot (checked with `thin_check -m` after a close
//! while held), and online growth of the data and metadata devices.
//!
//! Semantics checked (dm-thin-format.md section 15): unmapped blocks read zeros; a discard unmaps
//! the whole blocks inside its range and leaves partial blocks at either end untouched;
//! write-zeroes makes the whole range read zeros (whole blocks unmapped); a shrink discards
//! beyond the new end, and growing again shows zeros there; a snapshot is a copy of its origin
//! at that instant. After every close: `thin_check` and our check pass, and `volumes()` agrees
//! with the model (names, sizes, kinds, parents, thin ids).
//!
//! Odd cases run without discard passdown (freed blocks keep their old bytes, so a reused
//! block must be zeroed where a write does not cover it); every third case commits in the
//! background every 20 ms.
//!
//! Seed: `THINPOOL_TEST_SEED`. Cases: `THINPOOL_ENGINE_MODEL_CASES` (default 3); operations
//! per case: `THINPOOL_ENGINE_MODEL_OPS` (default 1500).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use thinpool_engine::{ErrorKind, Pool, PoolOptions, Volume, VolumeInfo, VolumeKind};
use thinpool_io::{BlockDevice, FileDevice};

use crate::common::*;

/// Data blocks of the pool at creation; it grows online up to [`MAX_DATA_BLOCKS`].
const DATA_BLOCKS: u64 = 256;
const MAX_DATA_BLOCKS: u64 = 448;
/// Metadata size at creation, in MiB; it grows online up to 16 MiB.
const META_MIB: u64 = 8;
/// Largest volume size in bytes (17 blocks, the last one partial).
const MAX_SIZE: u64 = 16 * BS + 5000;
/// Most live volumes at once.
const MAX_VOLS: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tri {
    No,
    Yes,
    Maybe,
}

#[derive(Clone, Debug)]
struct MVol {
    thin_id: u32,
    kind: VolumeKind,
    parent: Option<String>,
    data: Vec<u8>,
    mapped: Vec<Tri>,
}

impl MVol {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
}

fn nblocks(size: u64) -> u64 {
    size.div_ceil(BS)
}

struct Case {
    rng: StdRng,
    case: u64,
    step: u64,
    root: PathBuf,
    _dir: tempfile::TempDir,
    opts: PoolOptions,
    pool: Option<Pool>,
    vols: BTreeMap<String, MVol>,
    handles: HashMap<String, Volume>,
    next_name: u32,
    next_write: u64,
    /// Blocks that may have been freed (and so not be reusable) or allocated since the last
    /// commit: with the live volumes' sizes an upper bound of the data blocks in use.
    pending: u64,
    oracle: bool,
    history: VecDeque<String>,
    reopens: u64,
    /// Commits forced because the data blocks might run out (blocks are reused after them).
    room_commits: u64,
    /// Data blocks of the pool now.
    data_blocks: u64,
    /// Metadata size in bytes now.
    meta_size: u64,
    /// The held metadata snapshot's root block, if one is held.
    held: Option<u64>,
    /// Data blocks the held snapshot may keep allocated (its leaves keep references to the
    /// blocks they map when the live tree changes them, as in the kernel).
    held_blocks: u64,
}

#[test]
fn random_operations_match_the_model() {
    let oracle = have_tool("thin_check");
    let seed = seed("engine model");
    let cases = env_u64("THINPOOL_ENGINE_MODEL_CASES", 3);
    let ops = env_u64("THINPOOL_ENGINE_MODEL_OPS", 1500);
    eprintln!("engine model: {cases} cases x {ops} operations");
    for case in 0..cases {
        let t = std::time::Instant::now();
        let mut c = Case::new(seed.wrapping_mul(1000).wrapping_add(case), case, oracle);
        for _ in 0..ops {
            c.step();
        }
        c.reopen(true);
        eprintln!(
            "engine model: case {case} done in {:.1?}, {} reopens, {} commits to make room",
            t.elapsed(),
            c.reopens,
            c.room_commits
        );
    }
}

impl Case {
    fn new(seed: u64, case: u64, oracle: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        // Odd cases: no discard passdown, so reused blocks still hold old data (provisioning
        // must zero what a write does not cover). Every third case: background commits.
        let opts = PoolOptions {
            commit_interval: (case % 3 == 2).then(|| std::time::Duration::from_millis(20)),
            discard_passdown: case.is_multiple_of(2),
            min_free_percent: 0,
            ..Default::default()
        };
        let pool = Pool::create(&root, &small_config(DATA_BLOCKS, META_MIB), opts.clone())
            .unwrap_or_else(|e| panic!("case {case}: Pool::create: {e}"));
        Case {
            rng: StdRng::seed_from_u64(seed),
            case,
            step: 0,
            root,
            _dir: dir,
            opts,
            pool: Some(pool),
            vols: BTreeMap::new(),
            handles: HashMap::new(),
            next_name: 0,
            next_write: 1,
            pending: 0,
            oracle,
            history: VecDeque::new(),
            reopens: 0,
            room_commits: 0,
            data_blocks: DATA_BLOCKS,
            meta_size: META_MIB << 20,
            held: None,
            held_blocks: 0,
        }
    }

    fn pool(&self) -> &Pool {
        self.pool.as_ref().unwrap()
    }

    fn log(&mut self, s: String) {
        if self.history.len() == 60 {
            self.history.pop_front();
        }
        self.history.push_back(format!("step {}: {s}", self.step));
    }

    #[track_caller]
    fn fail(&self, msg: String) -> ! {
        let hist: Vec<&str> = self.history.iter().map(|s| s.as_str()).collect();
        panic!(
            "engine model case {} step {}: {msg}\nlast operations:\n  {}",
            self.case,
            self.step,
            hist.join("\n  ")
        );
    }

    #[track_caller]
    fn ok<T>(&self, r: thinpool_engine::Result<T>, what: &str) -> T {
        match r {
            Ok(v) => v,
            Err(e) => self.fail(format!("{what} failed: {e} (kind {:?})", e.kind())),
        }
    }

    fn handle(&mut self, name: &str) -> Volume {
        if let Some(h) = self.handles.get(name) {
            return h.clone();
        }
        let h = self.ok(
            self.pool().open_volume(name),
            &format!("open_volume {name}"),
        );
        let want = self.vols[name].size();
        if h.size() != want || h.block_size() != BS || h.name() != name {
            self.fail(format!(
                "open_volume {name}: handle says size {} block size {} name {}, want {want} {BS} {name}",
                h.size(),
                h.block_size(),
                h.name()
            ));
        }
        self.handles.insert(name.to_string(), h.clone());
        h
    }

    fn used_bound(&self) -> u64 {
        self.vols.values().map(|v| nblocks(v.size())).sum::<u64>() + self.pending + self.held_blocks
    }

    /// Make room for `need` more blocks in the bound (committing if that helps); false if
    /// the operation must be skipped.
    fn room(&mut self, need: u64) -> bool {
        let limit = self.data_blocks - 2;
        if self.used_bound() + need > limit && self.pending > 0 {
            self.log("commit (to reuse freed blocks)".into());
            self.ok(self.pool().commit(), "commit");
            self.pending = 0;
            self.room_commits += 1;
        }
        self.used_bound() + need <= limit
    }

    fn pick_vol(&mut self) -> Option<String> {
        if self.vols.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..self.vols.len());
        self.vols.keys().nth(i).cloned()
    }

    /// A random range of a volume of `size` bytes: small, cross-block, block-aligned or any.
    fn pick_range(&mut self, size: u64) -> (u64, u64) {
        let r = &mut self.rng;
        match r.random_range(0..10) {
            0..=3 => {
                let len = r.random_range(1..=4096u64).min(size);
                (r.random_range(0..=size - len), len)
            }
            4..=5 => {
                let len = r.random_range(4097..=2 * BS + 777).min(size);
                (r.random_range(0..=size - len), len)
            }
            6..=7 => {
                let b = r.random_range(0..nblocks(size));
                let len = (r.random_range(1..=3) * BS).min(size - b * BS);
                (b * BS, len)
            }
            _ => {
                let len = r.random_range(1..=size);
                (r.random_range(0..=size - len), len)
            }
        }
    }

    fn pick_size(&mut self) -> u64 {
        match self.rng.random_range(0..3) {
            0 => self.rng.random_range(1..=16) * BS,
            1 => self.rng.random_range(1..=MAX_SIZE),
            _ => self.rng.random_range(BS / 2..=4 * BS),
        }
    }

    fn step(&mut self) {
        self.step += 1;
        let choice = self.rng.random_range(0..1000);
        match choice {
            0..=299 => self.op_write(),
            300..=479 => self.op_read(),
            480..=559 => self.op_discard(),
            560..=619 => self.op_write_zeroes(),
            620..=659 => self.op_flush(),
            660..=709 => self.op_create(),
            710..=769 => self.op_snapshot(),
            770..=809 => self.op_remove(),
            810..=869 => self.op_resize(),
            870..=909 => self.op_extents(),
            910..=939 => self.op_info(),
            940..=959 => self.op_out_of_range(),
            960..=974 => self.op_status(),
            975..=979 => self.op_metadata_snap(),
            980..=982 => self.op_grow(),
            _ => self.reopen(false),
        }
    }

    fn op_write(&mut self) {
        let Some(name) = self.pick_vol() else {
            return self.op_create();
        };
        let size = self.vols[&name].size();
        let (off, len) = self.pick_range(size);
        let touched = (off + len).div_ceil(BS) - off / BS;
        if !self.room(touched) {
            return;
        }
        let id = self.next_write;
        self.next_write += 1;
        let data = pattern(id, off, len as usize);
        let fua = self.rng.random_bool(0.1);
        self.log(format!(
            "{} {name} [{off}, +{len}) pattern {id}",
            if fua { "write_fua" } else { "write" }
        ));
        let h = self.handle(&name);
        let r = if fua {
            h.write_fua(&data, off)
        } else {
            h.write_at(&data, off)
        };
        self.ok(r, &format!("write {name} [{off}, +{len})"));
        self.pending += touched;
        let v = self.vols.get_mut(&name).unwrap();
        v.data[off as usize..(off + len) as usize].copy_from_slice(&data);
        for b in off / BS..(off + len).div_ceil(BS) {
            v.mapped[b as usize] = Tri::Yes;
        }
    }

    fn read_check(&mut self, name: &str, off: u64, len: u64, what: &str) {
        let h = self.handle(name);
        let mut buf = vec![0xEEu8; len as usize];
        self.ok(
            h.read_at(&mut buf, off),
            &format!("{what}: read {name} [{off}, +{len})"),
        );
        let want = &self.vols[name].data[off as usize..(off + len) as usize];
        if let Some((i, g, w)) = first_diff(&buf, want) {
            let pos = off + i as u64;
            let bad = buf.iter().zip(want).filter(|(a, b)| a != b).count();
            self.fail(format!(
                "{what}: read {name} [{off}, +{len}): byte {pos} (block {}, offset {} in it) is {g:#04x}, model says {w:#04x}; {bad} bytes differ",
                pos / BS,
                pos % BS
            ));
        }
    }

    fn op_read(&mut self) {
        let Some(name) = self.pick_vol() else { return };
        let size = self.vols[&name].size();
        let (off, len) = if self.rng.random_bool(0.1) {
            (0, size)
        } else {
            self.pick_range(size)
        };
        self.log(format!("read {name} [{off}, +{len})"));
        self.read_check(&name, off, len, "read");
    }

    fn op_discard(&mut self) {
        let Some(name) = self.pick_vol() else { return };
        let size = self.vols[&name].size();
        let (off, len) = if self.rng.random_bool(0.2) {
            // To the end of the volume (its last block may be partial).
            let off = self.rng.random_range(0..size);
            (off, size - off)
        } else {
            self.pick_range(size)
        };
        self.log(format!("discard {name} [{off}, +{len})"));
        let h = self.handle(&name);
        self.ok(
            h.discard(off, len),
            &format!("discard {name} [{off}, +{len})"),
        );
        self.pending += (off + len).div_ceil(BS) - off / BS;
        let end = off + len;
        let first = off.div_ceil(BS);
        let last = end / BS; // exclusive: blocks wholly inside
        let v = self.vols.get_mut(&name).unwrap();
        for b in first..last {
            let s = (b * BS) as usize;
            let e = ((b + 1) * BS).min(size) as usize;
            v.data[s..e].fill(0);
            v.mapped[b as usize] = Tri::No;
        }
        // The last block of a volume whose size is not a multiple of the block size, when
        // the range runs to the end of the volume: the kernel leaves it (it is not wholly
        // inside the range); unmapping it is also defensible. Observe which, then it must be
        // one or the other as a whole.
        let tail = size / BS;
        if end == size && !size.is_multiple_of(BS) && off <= tail * BS {
            let s = tail * BS;
            let h = self.handle(&name);
            let mut buf = vec![0u8; (size - s) as usize];
            self.ok(h.read_at(&mut buf, s), "read after discard");
            let v = self.vols.get_mut(&name).unwrap();
            let old = &v.data[s as usize..];
            if buf.iter().all(|&b| b == 0) {
                v.data[s as usize..].fill(0);
                v.mapped[tail as usize] = Tri::Maybe;
            } else if buf != old {
                self.fail(format!(
                    "discard {name} [{off}, +{len}) to the end: the partial last block {tail} reads neither its old content nor zeros"
                ));
            }
        }
    }

    fn op_write_zeroes(&mut self) {
        let Some(name) = self.pick_vol() else { return };
        let size = self.vols[&name].size();
        let (off, len) = self.pick_range(size);
        let touched = (off + len).div_ceil(BS) - off / BS;
        if !self.room(touched) {
            return;
        }
        self.log(format!("write_zeroes {name} [{off}, +{len})"));
        let h = self.handle(&name);
        self.ok(
            h.write_zeroes(off, len),
            &format!("write_zeroes {name} [{off}, +{len})"),
        );
        self.pending += touched;
        let end = off + len;
        let v = self.vols.get_mut(&name).unwrap();
        v.data[off as usize..end as usize].fill(0);
        for b in off / BS..end.div_ceil(BS) {
            let whole = b * BS >= off && (b + 1) * BS <= end;
            let m = &mut v.mapped[b as usize];
            *m = if whole {
                Tri::No
            } else if *m == Tri::Yes {
                Tri::Yes
            } else {
                Tri::Maybe
            };
        }
    }

    fn op_flush(&mut self) {
        if self.rng.random_bool(0.3) {
            self.log("pool commit".into());
            self.ok(self.pool().commit(), "commit");
            self.pending = 0;
            return;
        }
        let Some(name) = self.pick_vol() else { return };
        self.log(format!("flush {name}"));
        let h = self.handle(&name);
        self.ok(h.flush(), &format!("flush {name}"));
    }

    fn new_name(&mut self, prefix: &str) -> String {
        self.next_name += 1;
        format!("{prefix}{:03}", self.next_name)
    }

    fn check_info(&self, info: &VolumeInfo, name: &str, what: &str) {
        let v = &self.vols[name];
        if info.name != name || info.size != v.size() || info.kind != v.kind {
            self.fail(format!(
                "{what}: info {info:?} disagrees with the model (size {}, kind {:?})",
                v.size(),
                v.kind
            ));
        }
        if v.kind == VolumeKind::Thin && info.parent.is_some() {
            self.fail(format!("{what}: a thin volume has a parent: {info:?}"));
        }
        if v.kind == VolumeKind::Snapshot {
            let p = v.parent.as_deref().unwrap();
            match info.parent.as_deref() {
                Some(q) if q == p => {}
                // Once the origin is gone, naming it or not are both fine.
                None if !self.vols.contains_key(p) => {}
                _ => self.fail(format!(
                    "{what}: parent of {name} is {:?}, want {p:?}: {info:?}",
                    info.parent
                )),
            }
        }
    }

    fn op_create(&mut self) {
        if self.vols.len() >= MAX_VOLS {
            return;
        }
        let size = self.pick_size();
        if !self.room(nblocks(size)) {
            return;
        }
        let name = self.new_name("v");
        self.log(format!("create {name} size {size}"));
        let info = self.ok(
            self.pool().create_volume(&name, size),
            &format!("create_volume {name} {size}"),
        );
        if self.vols.values().any(|v| v.thin_id == info.thin_id) {
            self.fail(format!("create {name}: thin id {} reused", info.thin_id));
        }
        self.vols.insert(
            name.clone(),
            MVol {
                thin_id: info.thin_id,
                kind: VolumeKind::Thin,
                parent: None,
                data: vec![0; size as usize],
                mapped: vec![Tri::No; nblocks(size) as usize],
            },
        );
        self.check_info(&info, &name, "create_volume");
        if info.mapped_blocks != 0 || info.highest_mapped_block.is_some() {
            self.fail(format!(
                "create {name}: new volume shows mappings: {info:?}"
            ));
        }
        // Creating an existing name is refused.
        if self.rng.random_bool(0.1) {
            let r = self.pool().create_volume(&name, BS);
            if !matches!(&r, Err(e) if e.kind() == ErrorKind::Exists) {
                self.fail(format!(
                    "create of existing {name}: {r:?}, want kind Exists"
                ));
            }
        }
    }

    fn op_snapshot(&mut self) {
        if self.vols.len() >= MAX_VOLS {
            return;
        }
        let Some(origin) = self.pick_vol() else {
            return;
        };
        let need = nblocks(self.vols[&origin].size());
        if !self.room(need) {
            return;
        }
        let name = self.new_name("s");
        self.log(format!("snapshot {origin} -> {name}"));
        let info = self.ok(
            self.pool().snapshot(&origin, &name),
            &format!("snapshot {origin} {name}"),
        );
        let mut v = self.vols[&origin].clone();
        v.kind = VolumeKind::Snapshot;
        v.parent = Some(origin.clone());
        if self.vols.values().any(|o| o.thin_id == info.thin_id) {
            self.fail(format!("snapshot {name}: thin id {} reused", info.thin_id));
        }
        v.thin_id = info.thin_id;
        self.vols.insert(name.clone(), v);
        self.check_info(&info, &name, "snapshot");
        if self.rng.random_bool(0.05) {
            let x = self.new_name("x");
            let r = self.pool().snapshot("no-such-volume", &x);
            if !matches!(&r, Err(e) if e.kind() == ErrorKind::NotFound) {
                self.fail(format!(
                    "snapshot of a missing origin: {r:?}, want NotFound"
                ));
            }
        }
    }

    fn op_remove(&mut self) {
        if self.vols.len() <= 1 {
            return;
        }
        let Some(name) = self.pick_vol() else { return };
        if self.handles.contains_key(&name) && self.rng.random_bool(0.3) {
            self.log(format!("remove {name} while open (Busy)"));
            let r = self.pool().remove_volume(&name);
            if !matches!(&r, Err(e) if e.kind() == ErrorKind::Busy) {
                self.fail(format!(
                    "remove of {name} with an open handle: {r:?}, want Busy"
                ));
            }
        }
        self.handles.remove(&name);
        self.log(format!("remove {name}"));
        self.ok(self.pool().remove_volume(&name), &format!("remove {name}"));
        let v = self.vols.remove(&name).unwrap();
        self.pending += nblocks(v.size());
        let r = self.pool().open_volume(&name);
        if !matches!(&r, Err(e) if e.kind() == ErrorKind::NotFound) {
            self.fail(format!(
                "open of removed {name}: {:?}, want NotFound",
                r.map(|_| ())
            ));
        }
    }

    fn op_resize(&mut self) {
        let Some(name) = self.pick_vol() else { return };
        let old = self.vols[&name].size();
        let new = self.pick_size();
        if new > old && !self.room(nblocks(new) - nblocks(old)) {
            return;
        }
        // Sometimes through an open handle, which must see the new size.
        let keep = self.rng.random_bool(0.5);
        if keep {
            self.handle(&name);
        }
        self.log(format!("resize {name} {old} -> {new}"));
        self.ok(
            self.pool().resize_volume(&name, new),
            &format!("resize {name} {old} -> {new}"),
        );
        if new < old {
            self.pending += nblocks(old) - nblocks(new);
        }
        let v = self.vols.get_mut(&name).unwrap();
        v.data.resize(new as usize, 0);
        v.mapped.resize(nblocks(new) as usize, Tri::No);
        if let Some(h) = self.handles.get(&name)
            && h.size() != new
        {
            self.fail(format!(
                "resize {name} {old} -> {new}: open handle says {}",
                h.size()
            ));
        }
        // Past the new end is out of range now.
        let h = self.handle(&name);
        let r = h.read_at(&mut [0u8; 1], new);
        if !matches!(&r, Err(e) if e.kind() == ErrorKind::InvalidArgument) {
            self.fail(format!(
                "read at the new end {new} of {name}: {r:?}, want InvalidArgument"
            ));
        }
        if new > old {
            // The grown part reads zeros, also where a shrink left a partial block behind.
            self.read_check(&name, old, new - old, "after grow");
        }
    }

    fn op_extents(&mut self) {
        let Some(name) = self.pick_vol() else { return };
        let size = self.vols[&name].size();
        let (off, len) = if self.rng.random_bool(0.5) {
            (0, size)
        } else {
            self.pick_range(size)
        };
        self.log(format!("mapped_extents {name} [{off}, +{len})"));
        let h = self.handle(&name);
        let ext = self.ok(
            h.mapped_extents(off, len),
            &format!("mapped_extents {name} [{off}, +{len})"),
        );
        let end = off + len;
        let mut prev_end = None;
        for &(o, l) in &ext {
            if l == 0 || o < off || o + l > end {
                self.fail(format!(
                    "mapped_extents {name} [{off}, +{len}): extent ({o}, {l}) empty or outside the range: {ext:?}"
                ));
            }
            if let Some(p) = prev_end
                && o <= p
            {
                self.fail(format!(
                    "mapped_extents {name} [{off}, +{len}): not sorted, overlapping or not merged: {ext:?}"
                ));
            }
            prev_end = Some(o + l);
        }
        let covered = |a: u64, b: u64| -> (bool, bool) {
            // (some byte of [a, b) covered, all covered)
            let mut n = 0;
            for &(o, l) in &ext {
                let s = o.max(a);
                let e = (o + l).min(b);
                if s < e {
                    n += e - s;
                }
            }
            (n > 0, n == b - a)
        };
        let v = &self.vols[&name];
        for b in off / BS..end.div_ceil(BS) {
            let a = (b * BS).max(off);
            let e = ((b + 1) * BS).min(end);
            let (any, all) = covered(a, e);
            match v.mapped[b as usize] {
                Tri::Yes if !all => self.fail(format!(
                    "mapped_extents {name} [{off}, +{len}): block {b} must be mapped, extents {ext:?}"
                )),
                Tri::No if any => self.fail(format!(
                    "mapped_extents {name} [{off}, +{len}): block {b} must not be mapped, extents {ext:?}"
                )),
                Tri::Maybe if any && !all => self.fail(format!(
                    "mapped_extents {name} [{off}, +{len}): block {b} partly mapped, extents {ext:?}"
                )),
                _ => {}
            }
        }
    }

    fn op_info(&mut self) {
        let Some(name) = self.pick_vol() else { return };
        self.log(format!("volume_info {name}"));
        let info = self.ok(
            self.pool().volume_info(&name),
            &format!("volume_info {name}"),
        );
        self.check_info(&info, &name, "volume_info");
        let v = &self.vols[&name];
        let yes = v.mapped.iter().filter(|&&m| m == Tri::Yes).count() as u64;
        let maybe = v.mapped.iter().filter(|&&m| m == Tri::Maybe).count() as u64;
        if info.mapped_blocks < yes || info.mapped_blocks > yes + maybe {
            self.fail(format!(
                "volume_info {name}: mapped_blocks {} but the model has {yes} mapped and {maybe} maybe",
                info.mapped_blocks
            ));
        }
        if maybe == 0 {
            let hi = v
                .mapped
                .iter()
                .rposition(|&m| m == Tri::Yes)
                .map(|i| i as u64);
            if info.highest_mapped_block != hi {
                self.fail(format!(
                    "volume_info {name}: highest_mapped_block {:?}, model {hi:?}",
                    info.highest_mapped_block
                ));
            }
        }
        if self.rng.random_bool(0.1) {
            let r = self.pool().volume_info("no-such-volume");
            if !matches!(&r, Err(e) if e.kind() == ErrorKind::NotFound) {
                self.fail(format!(
                    "volume_info of a missing volume: {r:?}, want NotFound"
                ));
            }
        }
    }

    fn op_out_of_range(&mut self) {
        let Some(name) = self.pick_vol() else { return };
        let size = self.vols[&name].size();
        let len = self.rng.random_range(1..=2 * BS);
        // Starts inside (or at the end) and runs past the end.
        let off = size.saturating_sub(self.rng.random_range(0..len));
        self.log(format!(
            "out of range ops on {name} [{off}, +{len}) size {size}"
        ));
        let h = self.handle(&name);
        let data = vec![0xABu8; len as usize];
        let mut buf = vec![0u8; len as usize];
        let results = [
            ("write_at", h.write_at(&data, off)),
            ("read_at", h.read_at(&mut buf, off)),
            ("discard", h.discard(off, len)),
            ("write_zeroes", h.write_zeroes(off, len)),
        ];
        for (what, r) in results {
            if !matches!(&r, Err(e) if e.kind() == ErrorKind::InvalidArgument) {
                self.fail(format!(
                    "{what} {name} [{off}, +{len}) past the end {size}: {r:?}, want InvalidArgument"
                ));
            }
        }
        // Nothing changed.
        let s = off.min(size).saturating_sub(BS);
        self.read_check(&name, s, size - s, "after refused out-of-range ops");
    }

    fn op_status(&mut self) {
        self.log("status".into());
        let st = self.ok(self.pool().status(), "status");
        self.pending = 0;
        let snaps = self
            .vols
            .values()
            .filter(|v| v.kind == VolumeKind::Snapshot)
            .count();
        let bound = self.used_bound();
        let most = self
            .vols
            .values()
            .map(|v| v.mapped.iter().filter(|&&m| m == Tri::Yes).count() as u64)
            .max()
            .unwrap_or(0);
        if st.total_data_blocks != self.data_blocks
            || st.total_metadata_blocks != self.meta_size / 4096
            || st.block_size != BS
            || st.used_data_blocks > bound
            || st.used_data_blocks < most
            || st.volumes + st.snapshots != self.vols.len()
            || st.snapshots != snaps
            || st.held_root != self.held
            || st.needs_check
            || st.mode != thinpool_engine::PoolMode::Write
        {
            self.fail(format!(
                "status disagrees with the model ({} volumes, {snaps} snapshots, used data blocks in [{most}, {bound}]): {st:?}",
                self.vols.len()
            ));
        }
        let line = st.kernel_line();
        let want_prefix = format!(
            "{} {}/{} {}/{} {} rw ",
            st.transaction_id,
            st.used_metadata_blocks,
            st.total_metadata_blocks,
            st.used_data_blocks,
            st.total_data_blocks,
            self.held.map_or("-".to_string(), |r| r.to_string())
        );
        if !line.starts_with(&want_prefix) || !line.contains("queue_if_no_space") {
            self.fail(format!(
                "status line {line:?}, want it to start {want_prefix:?}"
            ));
        }
    }

    /// Reserve or release the metadata snapshot (format spec 10); a second reserve, or a
    /// release with none held, fails (its kind is checked in `metadata_snap_errors`).
    fn op_metadata_snap(&mut self) {
        match self.held {
            None => {
                self.log("reserve_metadata_snap".into());
                let root = self.ok(self.pool().reserve_metadata_snap(), "reserve_metadata_snap");
                self.held = Some(root);
                self.held_blocks = self.vols.values().map(|v| nblocks(v.size())).sum();
                if let Ok(r) = self.pool().reserve_metadata_snap() {
                    self.fail(format!("second reserve_metadata_snap succeeded: {r}"));
                }
            }
            Some(_) => {
                self.log("release_metadata_snap".into());
                self.ok(self.pool().release_metadata_snap(), "release_metadata_snap");
                self.held = None;
                self.pending += self.held_blocks;
                self.held_blocks = 0;
                if self.pool().release_metadata_snap().is_ok() {
                    self.fail("release_metadata_snap with none held succeeded".into());
                }
            }
        }
    }

    /// Grow the data (by 32 blocks) or the metadata (by 2 MiB) online.
    fn op_grow(&mut self) {
        if self.rng.random_bool(0.7) {
            if self.data_blocks + 32 > MAX_DATA_BLOCKS {
                return;
            }
            let new = self.data_blocks + 32;
            self.log(format!("grow data to {new} blocks"));
            self.ok(self.pool().grow(Some(new * BS), None), "grow data");
            self.data_blocks = new;
        } else {
            if self.meta_size >= 16 << 20 {
                return;
            }
            let new = self.meta_size + (2 << 20);
            self.log(format!("grow metadata to {new} bytes"));
            self.ok(self.pool().grow(None, Some(new)), "grow metadata");
            self.meta_size = new;
        }
        self.op_status();
    }

    /// Close (or drop) and open the pool again; check the metadata in between and everything
    /// after.
    fn reopen(&mut self, last: bool) {
        self.reopens += 1;
        let close = last || self.rng.random_bool(0.7);
        self.log(format!("reopen ({})", if close { "close" } else { "drop" }));
        self.handles.clear();
        let pool = self.pool.take().unwrap();
        if close {
            if let Err(e) = pool.close() {
                self.fail(format!("close failed: {e}"));
            }
        } else {
            drop(pool);
        }
        let ctx = format!(
            "engine model case {} step {} (after {})",
            self.case,
            self.step,
            if close { "close" } else { "drop" }
        );
        check_closed_pool(&self.root, self.oracle, &ctx);
        if self.held.is_some() {
            // The held snapshot's trees too (`thin_check -m`, and ours).
            let meta = self.root.join("pool").join("metadata");
            if self.oracle {
                let o = thinpool_testkit::tool("thin_check")
                    .arg("-m")
                    .arg(&meta)
                    .output()
                    .unwrap();
                if !o.status.success() {
                    self.fail(format!(
                        "{ctx}: thin_check -m failed:\n{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    ));
                }
            }
            let dev: std::sync::Arc<dyn BlockDevice> =
                std::sync::Arc::new(FileDevice::open_read_only(&meta).unwrap());
            let opts = thinpool_thin::check::CheckOptions {
                metadata_snap: true,
                ..Default::default()
            };
            let report = thinpool_thin::check::check(dev, &opts, &mut |_, _| {}).unwrap();
            if !report.errors.is_empty() {
                self.fail(format!("{ctx}: our check -m: {}", report.render()));
            }
        }
        // The metadata has exactly our volumes, each mapping what the model says.
        let meta = self.root.join("pool").join("metadata");
        let dev: std::sync::Arc<dyn BlockDevice> =
            std::sync::Arc::new(FileDevice::open_read_only(&meta).unwrap());
        let maps = metadata_mappings(dev);
        let ids: Vec<u32> = maps.keys().copied().collect();
        let mut want_ids: Vec<u32> = self.vols.values().map(|v| v.thin_id).collect();
        want_ids.sort();
        if ids != want_ids {
            self.fail(format!(
                "{ctx}: metadata has devices {ids:?}, the model {want_ids:?}"
            ));
        }
        for (name, v) in &self.vols {
            let got = &maps[&v.thin_id];
            for (b, m) in v.mapped.iter().enumerate() {
                let has = got.contains(&(b as u64));
                if (*m == Tri::Yes && !has) || (*m == Tri::No && has) {
                    self.fail(format!(
                        "{ctx}: metadata of {name} (device {}): block {b} mapped = {has}, model {m:?}",
                        v.thin_id
                    ));
                }
            }
            if let Some(b) = got.iter().find(|&&b| b >= v.mapped.len() as u64) {
                self.fail(format!(
                    "{ctx}: metadata of {name} (device {}) maps block {b}, past its end ({} bytes)",
                    v.thin_id,
                    v.size()
                ));
            }
        }
        if last {
            return;
        }
        let pool = match Pool::open(&self.root, self.opts.clone()) {
            Ok(p) => p,
            Err(e) => self.fail(format!("{ctx}: Pool::open: {e} (kind {:?})", e.kind())),
        };
        self.pool = Some(pool);
        self.pending = 0;
        let list = self.ok(self.pool().volumes(), "volumes");
        let names: Vec<&str> = list.iter().map(|i| i.name.as_str()).collect();
        let want: Vec<&str> = self.vols.keys().map(|s| s.as_str()).collect();
        if names != want {
            self.fail(format!(
                "{ctx}: volumes() lists {names:?}, the model {want:?} (sorted by name)"
            ));
        }
        for info in &list {
            self.check_info(info, &info.name, "volumes() after reopen");
            if info.thin_id != self.vols[&info.name].thin_id {
                self.fail(format!("{ctx}: thin id of {} changed: {info:?}", info.name));
            }
        }
        // Every byte of every volume survived.
        let names: Vec<String> = self.vols.keys().cloned().collect();
        for name in names {
            let size = self.vols[&name].size();
            self.read_check(&name, 0, size, "after reopen");
        }
    }
}

/// The errors of the metadata snapshot messages have the kernel's meaning (section 13):
/// `reserve_metadata_snap` while one is held is EBUSY, `release_metadata_snap` with none held
/// is EINVAL.
#[test]
fn metadata_snap_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(
        dir.path(),
        &small_config(64, 4),
        PoolOptions {
            commit_interval: None,
            ..Default::default()
        },
    )
    .unwrap();
    let r = pool.release_metadata_snap();
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::InvalidArgument),
        "release with none held: {r:?} (kind {:?}), want InvalidArgument",
        r.as_ref().err().map(|e| e.kind())
    );
    let root = pool.reserve_metadata_snap().unwrap();
    assert_eq!(pool.status().unwrap().held_root, Some(root));
    let r = pool.reserve_metadata_snap();
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::Busy),
        "second reserve: {r:?} (kind {:?}), want Busy",
        r.as_ref().err().map(|e| e.kind())
    );
    pool.release_metadata_snap().unwrap();
    assert_eq!(pool.status().unwrap().held_root, None);
}

/// A volume handle that outlives `Pool::close`: whatever the engine chooses (refuse the
/// close, refuse the write, or keep the pool alive until the handle goes), a write it accepts
/// must not be lost silently, and the pool opens again once the handle is gone.
#[test]
fn handle_outliving_close_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let opts = PoolOptions {
        commit_interval: None,
        ..Default::default()
    };
    let pool = Pool::create(dir.path(), &small_config(64, 4), opts.clone()).unwrap();
    pool.create_volume("a", BS).unwrap();
    let h = pool.open_volume("a").unwrap();
    let closed = pool.close();
    let wrote = h.write_at(b"hello", 0);
    drop(h);
    let pool = Pool::open(dir.path(), opts).expect("open after the last handle is gone");
    let v = pool.open_volume("a").unwrap();
    let mut b = [0u8; 5];
    v.read_at(&mut b, 0).unwrap();
    if wrote.is_ok() {
        assert_eq!(
            &b, b"hello",
            "close() returned {closed:?}, a later write through a surviving handle returned Ok, \
             and after the handle was dropped the write is gone (never committed)"
        );
    }
}
