//! Test devices: [`MemDevice`] (bytes in memory) and [`FaultyDevice`] (a memory device that
//! can crash). Only with the `test-util` feature.
//!
//! [`FaultyDevice`] keeps two images: the *durable* one (what survived the last `sync`) and the
//! *live* one (what reads see). Operations since the last sync are kept in order; a simulated
//! crash ([`FaultyDevice::crash_image`]) starts from the durable image and applies a chosen
//! part of them ([`CrashMode`]), possibly tearing writes at 512-byte sector boundaries, as a
//! power cut could. A write within one sector is never torn (sector writes are atomic, which
//! dm-thin relies on for its superblock).
//!
//! A size change ([`BlockDevice::set_size`], an `ftruncate` of the file under a pool) is
//! pending like a write until the next completed `sync`. On a journalling file system (ext4,
//! XFS) the new size is inode metadata: it reaches the medium when the journal commits, which
//! `fdatasync` forces for a size change but which otherwise may not have happened at a power
//! cut. A crash may then leave the file at its old size: the bytes written past the old end
//! are gone even if their data blocks reached the disk, because the inode does not cover them
//! (after a lost shrink, the old tail is back). So a crash keeps or drops a size change like
//! any other pending operation, in issue order for the prefix modes; writes are applied in
//! issue order and lose whatever lies past the size in force at that point. Journal
//! transactions commit in order, so even [`CrashMode::RandomSubset`] keeps the size changes
//! as a prefix of them (never a later size without an earlier one), while it keeps writes in
//! any combination (they are not ordered against the journal).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;

use crate::{BlockDevice, Error, Result, check_range};

/// A device held in memory.
#[derive(Debug)]
pub struct MemDevice {
    name: String,
    bytes: Mutex<Vec<u8>>,
}

impl MemDevice {
    /// A zeroed device of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self::from_bytes(vec![0; size as usize])
    }

    /// A device holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            name: "memory device".to_string(),
            bytes: Mutex::new(bytes),
        }
    }

    /// A copy of the device's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes
            .lock()
            .expect("memory device lock poisoned")
            .clone()
    }
}

impl BlockDevice for MemDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> Result<u64> {
        Ok(self
            .bytes
            .lock()
            .expect("memory device lock poisoned")
            .len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let bytes = self.bytes.lock().expect("memory device lock poisoned");
        check_range(&self.name, "read", offset, buf.len(), bytes.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&bytes[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut bytes = self.bytes.lock().expect("memory device lock poisoned");
        check_range(&self.name, "write", offset, buf.len(), bytes.len() as u64)?;
        let o = offset as usize;
        bytes[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn set_size(&self, size: u64) -> Result<()> {
        self.bytes
            .lock()
            .expect("memory device lock poisoned")
            .resize(size as usize, 0);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let mut bytes = self.bytes.lock().expect("memory device lock poisoned");
        let end = (offset + len).min(bytes.len() as u64) as usize;
        let start = (offset as usize).min(end);
        bytes[start..end].fill(0);
        Ok(())
    }
}

/// What a simulated crash keeps of the operations (writes and size changes) issued since the
/// last `sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// None of them.
    DropAll,
    /// All of them (the crash came just before the sync would have completed).
    KeepAll,
    /// A prefix of them in issue order; the last one of the prefix may be torn: a write at a
    /// random sector boundary (only its first sectors reach the medium, maybe none), a size
    /// change kept or not.
    TornPrefix,
    /// A random subset, in any combination (a disk cache may reorder writes); each kept write
    /// may also be torn at a sector boundary, keeping the sectors on one side of it. Size
    /// changes are kept as a prefix of the size changes (a journal commits them in order).
    RandomSubset,
}

/// An operation issued since the last `sync`.
#[derive(Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Resize(u64),
}

#[derive(Debug, Default)]
struct Images {
    durable: Vec<u8>,
    live: Vec<u8>,
    pending: Vec<Op>,
}

/// Sector size: the unit a write is never torn within.
const SECTOR: u64 = 512;

/// Chance that a write kept by [`CrashMode::RandomSubset`] is torn (if it spans a boundary).
const TEAR_PROBABILITY: f64 = 0.25;

/// Write `data` at `offset` of `image`, dropping what lies past its end (a write into a grown
/// region whose size change did not survive is lost).
fn apply_write(image: &mut [u8], offset: u64, data: &[u8]) {
    let o = (offset as usize).min(image.len());
    let end = (offset as usize)
        .saturating_add(data.len())
        .min(image.len());
    if o < end {
        image[o..end].copy_from_slice(&data[..end - o]);
    }
}

/// The sector boundaries strictly inside a write of `len` bytes at `offset`: absolute, so an
/// unaligned write is torn where the device's sectors meet, and one within a single sector
/// cannot be torn.
fn boundaries(offset: u64, len: usize) -> Vec<u64> {
    let end = offset + len as u64;
    (offset / SECTOR + 1..end.div_ceil(SECTOR))
        .map(|s| s * SECTOR)
        .collect()
}

/// A memory device that records unsynced operations and can fail or crash on demand.
#[derive(Debug)]
pub struct FaultyDevice {
    name: String,
    images: Mutex<Images>,
    /// I/O operations left before every operation fails; `u64::MAX` = never.
    countdown: AtomicU64,
    syncs: AtomicU64,
}

impl FaultyDevice {
    /// A zeroed device of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self::from_bytes(vec![0; size as usize])
    }

    /// A device whose durable and live images are `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            name: "faulty device".to_string(),
            images: Mutex::new(Images {
                durable: bytes.clone(),
                live: bytes,
                pending: Vec::new(),
            }),
            countdown: AtomicU64::new(u64::MAX),
            syncs: AtomicU64::new(0),
        }
    }

    /// After `n` more I/O operations (reads, writes, syncs, size changes), every operation
    /// fails.
    pub fn fail_after(&self, n: u64) {
        self.countdown.store(n, Ordering::SeqCst);
    }

    /// Stop failing.
    pub fn heal(&self) {
        self.countdown.store(u64::MAX, Ordering::SeqCst);
    }

    /// How many syncs completed.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// Number of writes issued since the last completed sync (size changes not counted).
    pub fn pending_writes(&self) -> usize {
        self.lock()
            .pending
            .iter()
            .filter(|op| matches!(op, Op::Write(..)))
            .count()
    }

    /// The bytes reads would see now.
    pub fn live_image(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// The bytes (and size) that survive a crash that keeps nothing unsynced.
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// The bytes left on the medium by a crash now, keeping what `mode` says of the unsynced
    /// operations (randomly chosen with `rng`). Its length is the size that survived.
    pub fn crash_image(&self, mode: CrashMode, rng: &mut impl Rng) -> Vec<u8> {
        let images = self.lock();
        let pending = &images.pending;
        let mut image = images.durable.clone();
        // For each pending operation: None = dropped, Some((start, end)) = the byte range
        // of a write that reaches the medium (all of it unless torn); a size change is kept
        // whole.
        let mut keep: Vec<Option<(u64, u64)>> = vec![None; pending.len()];
        let whole = |op: &Op| match op {
            Op::Write(o, d) => (*o, o + d.len() as u64),
            Op::Resize(_) => (0, 0),
        };
        match mode {
            CrashMode::DropAll => {}
            CrashMode::KeepAll => {
                for (k, op) in keep.iter_mut().zip(pending) {
                    *k = Some(whole(op));
                }
            }
            CrashMode::TornPrefix => {
                let n = pending.len();
                if n > 0 {
                    let last = rng.random_range(0..n);
                    for (k, op) in keep.iter_mut().zip(&pending[..last]) {
                        *k = Some(whole(op));
                    }
                    keep[last] = match &pending[last] {
                        Op::Write(o, d) => {
                            // Cut at the start (nothing), a boundary, or the end (all).
                            let mut cuts = vec![*o];
                            cuts.extend(boundaries(*o, d.len()));
                            cuts.push(o + d.len() as u64);
                            let cut = cuts[rng.random_range(0..cuts.len())];
                            (cut > *o).then_some((*o, cut))
                        }
                        Op::Resize(_) => rng.random_bool(0.5).then_some((0, 0)),
                    };
                }
            }
            CrashMode::RandomSubset => {
                let nr_resizes = pending
                    .iter()
                    .filter(|op| matches!(op, Op::Resize(_)))
                    .count();
                let mut resizes_kept = rng.random_range(0..=nr_resizes);
                for (k, op) in keep.iter_mut().zip(pending) {
                    *k = match op {
                        Op::Resize(_) => (resizes_kept > 0).then(|| {
                            resizes_kept -= 1;
                            (0, 0)
                        }),
                        Op::Write(o, d) => {
                            let end = o + d.len() as u64;
                            if !rng.random_bool(0.5) {
                                None
                            } else {
                                let b = boundaries(*o, d.len());
                                if b.is_empty() || !rng.random_bool(TEAR_PROBABILITY) {
                                    Some((*o, end))
                                } else {
                                    let at = b[rng.random_range(0..b.len())];
                                    Some(if rng.random_bool(0.5) {
                                        (*o, at)
                                    } else {
                                        (at, end)
                                    })
                                }
                            }
                        }
                    };
                }
            }
        }
        for (op, k) in pending.iter().zip(keep) {
            match (op, k) {
                (_, None) => {}
                (Op::Resize(size), Some(_)) => image.resize(*size as usize, 0),
                (Op::Write(o, d), Some((start, end))) => {
                    let from = (start - o) as usize;
                    let to = (end - o) as usize;
                    apply_write(&mut image, start, &d[from..to]);
                }
            }
        }
        image
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Images> {
        self.images.lock().expect("faulty device lock poisoned")
    }

    fn tick(&self, op: &'static str, offset: u64) -> Result<()> {
        let left = self.countdown.load(Ordering::SeqCst);
        if left == u64::MAX {
            return Ok(());
        }
        if left == 0 {
            return Err(Error::Injected {
                device: self.name.clone(),
                op,
                offset,
            });
        }
        self.countdown.store(left - 1, Ordering::SeqCst);
        Ok(())
    }
}

impl BlockDevice for FaultyDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> Result<u64> {
        Ok(self.lock().live.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.tick("read", offset)?;
        let images = self.lock();
        check_range(
            &self.name,
            "read",
            offset,
            buf.len(),
            images.live.len() as u64,
        )?;
        let o = offset as usize;
        buf.copy_from_slice(&images.live[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.tick("write", offset)?;
        let mut images = self.lock();
        check_range(
            &self.name,
            "write",
            offset,
            buf.len(),
            images.live.len() as u64,
        )?;
        let o = offset as usize;
        images.live[o..o + buf.len()].copy_from_slice(buf);
        images.pending.push(Op::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn sync(&self) -> Result<()> {
        self.tick("sync", 0)?;
        let mut images = self.lock();
        let Images {
            durable, pending, ..
        } = &mut *images;
        for op in pending.drain(..) {
            match op {
                Op::Write(offset, data) => apply_write(durable, offset, &data),
                Op::Resize(size) => durable.resize(size as usize, 0),
            }
        }
        debug_assert_eq!(images.durable, images.live);
        self.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn set_size(&self, size: u64) -> Result<()> {
        self.tick("resize", size)?;
        let mut images = self.lock();
        images.live.resize(size as usize, 0);
        // File system metadata, pending like a write until the next sync (see the module
        // doc); the writes before it stay pending too, cut off by it if they survive with it.
        images.pending.push(Op::Resize(size));
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len as usize];
        self.write_at(&zeros, offset)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn crash_keeps_synced_and_drops_unsynced() {
        let dev = FaultyDevice::new(8192);
        dev.write_at(&[1; 4096], 0).unwrap();
        dev.sync().unwrap();
        dev.write_at(&[2; 4096], 4096).unwrap();
        let mut rng = rand::rng();
        let img = dev.crash_image(CrashMode::DropAll, &mut rng);
        assert!(img[..4096].iter().all(|&b| b == 1));
        assert!(img[4096..].iter().all(|&b| b == 0));
        let img = dev.crash_image(CrashMode::KeepAll, &mut rng);
        assert!(img[4096..].iter().all(|&b| b == 2));
        dev.fail_after(1);
        dev.write_at(&[3; 16], 0).unwrap();
        assert!(dev.write_at(&[3; 16], 0).is_err());
    }

    /// How a crash left a write of `len` bytes of 7s at `offset` on a zeroed device: "none",
    /// "all", or "torn"; panics unless every sector is wholly old or wholly new and the new
    /// ones are a prefix or a suffix of the write.
    fn outcome(img: &[u8], offset: usize, len: usize) -> &'static str {
        let range = &img[offset..offset + len];
        assert!(
            img[..offset]
                .iter()
                .chain(&img[offset + len..])
                .all(|&b| b == 0),
            "bytes outside the write changed"
        );
        // Per sector piece of the write: new or old, never mixed.
        let mut pieces = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let end = ((pos / 512 + 1) * 512).min(offset + len);
            let piece = &img[pos..end];
            let new = piece.iter().all(|&b| b == 7);
            assert!(
                new || piece.iter().all(|&b| b == 0),
                "sector at {pos} is mixed"
            );
            pieces.push(new);
            pos = end;
        }
        if range.iter().all(|&b| b == 7) {
            "all"
        } else if range.iter().all(|&b| b == 0) {
            "none"
        } else {
            let flips = pieces.windows(2).filter(|w| w[0] != w[1]).count();
            assert_eq!(flips, 1, "torn at more than one boundary: {pieces:?}");
            "torn"
        }
    }

    #[test]
    fn random_subset_tears_kept_writes_at_sector_boundaries() {
        let mut rng = StdRng::seed_from_u64(1);
        // An aligned block, an unaligned write across two sectors, and one inside a sector.
        for (offset, len, can_tear) in [(4096, 4096, true), (500, 100, true), (1030, 300, false)] {
            let dev = FaultyDevice::new(16384);
            dev.write_at(&vec![7; len], offset as u64).unwrap();
            let mut seen = std::collections::BTreeMap::new();
            let mut prefix = false;
            let mut suffix = false;
            for _ in 0..2000 {
                let img = dev.crash_image(CrashMode::RandomSubset, &mut rng);
                let o = outcome(&img, offset, len);
                *seen.entry(o).or_insert(0) += 1;
                if o == "torn" {
                    prefix |= img[offset] == 7;
                    suffix |= img[offset + len - 1] == 7;
                }
            }
            assert!(
                seen.contains_key("none") && seen.contains_key("all"),
                "{seen:?}"
            );
            if can_tear {
                assert!(seen.contains_key("torn") && prefix && suffix, "{seen:?}");
            } else {
                assert!(!seen.contains_key("torn"), "a one-sector write was torn");
            }
        }
    }

    #[test]
    fn torn_prefix_tears_only_the_last_kept_write() {
        let mut rng = StdRng::seed_from_u64(2);
        let dev = FaultyDevice::new(16384);
        dev.write_at(&[7; 4096], 0).unwrap();
        dev.write_at(&[7; 4096], 8192).unwrap();
        let mut torn_second = false;
        for _ in 0..500 {
            let img = dev.crash_image(CrashMode::TornPrefix, &mut rng);
            let first = outcome(&img[..8192], 0, 4096);
            let second = outcome(&img[8192..], 0, 4096);
            // Something of the second write implies all of the first.
            if second != "none" {
                assert_eq!(first, "all");
            }
            if second == "torn" {
                assert_eq!(img[8192], 7, "a torn prefix keeps the first sectors");
                torn_second = true;
            }
        }
        assert!(torn_second);
    }

    #[test]
    fn a_resize_is_pending_until_the_next_sync() {
        let mut rng = StdRng::seed_from_u64(3);
        let dev = FaultyDevice::new(4096);
        dev.write_at(&[1; 4096], 0).unwrap();
        dev.sync().unwrap();
        dev.set_size(8192).unwrap();
        dev.write_at(&[5; 4096], 4096).unwrap();
        assert_eq!(dev.size().unwrap(), 8192);
        // Lost in a crash before the sync, with the write past the old end.
        assert_eq!(dev.durable_image(), vec![1; 4096]);
        assert_eq!(dev.crash_image(CrashMode::DropAll, &mut rng), vec![1; 4096]);
        let all = dev.crash_image(CrashMode::KeepAll, &mut rng);
        assert_eq!(all.len(), 8192);
        assert!(all[4096..].iter().all(|&b| b == 5));
        // The other modes keep or drop it; without it the device has its old size and the
        // write is gone; with it the grown part holds zeros or the write.
        for mode in [CrashMode::TornPrefix, CrashMode::RandomSubset] {
            let mut sizes = std::collections::BTreeSet::new();
            for _ in 0..200 {
                let img = dev.crash_image(mode, &mut rng);
                assert!(img[..4096].iter().all(|&b| b == 1), "{mode:?}");
                assert!(img[4096..].iter().all(|&b| b == 0 || b == 5), "{mode:?}");
                sizes.insert(img.len());
            }
            assert_eq!(sizes, [4096, 8192].into(), "{mode:?}");
        }
        dev.sync().unwrap();
        let img = dev.crash_image(CrashMode::DropAll, &mut rng);
        assert_eq!(img.len(), 8192);
        assert!(img[4096..].iter().all(|&b| b == 5));
    }

    #[test]
    fn a_lost_shrink_brings_the_old_tail_back() {
        let mut rng = StdRng::seed_from_u64(4);
        let dev = FaultyDevice::new(8192);
        dev.write_at(&[1; 8192], 0).unwrap();
        dev.sync().unwrap();
        dev.set_size(4096).unwrap();
        assert_eq!(dev.crash_image(CrashMode::DropAll, &mut rng), vec![1; 8192]);
        assert_eq!(dev.crash_image(CrashMode::KeepAll, &mut rng), vec![1; 4096]);
    }

    #[test]
    fn size_changes_survive_in_issue_order() {
        // Grow, write into the new part, shrink below it, grow again: a crash never keeps a
        // later size without the earlier ones, so the write never shows at 12 KiB.
        let mut rng = StdRng::seed_from_u64(5);
        let dev = FaultyDevice::new(4096);
        dev.set_size(8192).unwrap();
        dev.write_at(&[2; 4096], 4096).unwrap();
        dev.set_size(4096).unwrap();
        dev.set_size(12288).unwrap();
        let mut sizes = std::collections::BTreeSet::new();
        for _ in 0..500 {
            for mode in [CrashMode::TornPrefix, CrashMode::RandomSubset] {
                let img = dev.crash_image(mode, &mut rng);
                if img.len() == 12288 {
                    assert!(img[4096..].iter().all(|&b| b == 0), "{mode:?}");
                }
                sizes.insert(img.len());
            }
        }
        assert_eq!(sizes, [4096, 8192, 12288].into());
    }
}
