//! Test devices: [`MemDevice`] (bytes in memory) and [`FaultyDevice`] (a memory device that
//! can crash). Only with the `test-util` feature.
//!
//! [`FaultyDevice`] keeps two images: the *durable* one (what survived the last `sync`) and the
//! *live* one (what reads see). Writes since the last sync are kept in order; a simulated crash
//! ([`FaultyDevice::crash_image`]) starts from the durable image and applies a chosen part of
//! them, possibly tearing one write at a 512-byte sector boundary, as a power cut could.

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

/// What a simulated crash keeps of the writes issued since the last `sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// None of them.
    DropAll,
    /// All of them (the crash came just before the sync would have completed).
    KeepAll,
    /// A prefix of them in issue order, the last one torn at a random sector boundary.
    TornPrefix,
    /// A random subset, in any combination (a disk cache may reorder writes).
    RandomSubset,
}

#[derive(Debug, Default)]
struct Images {
    durable: Vec<u8>,
    live: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
}

/// A memory device that records unsynced writes and can fail or crash on demand.
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

    /// After `n` more I/O operations (reads, writes, syncs), every operation fails.
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

    /// Number of writes issued since the last completed sync.
    pub fn pending_writes(&self) -> usize {
        self.lock().pending.len()
    }

    /// The bytes reads would see now.
    pub fn live_image(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// The bytes that survive a crash that keeps nothing unsynced.
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// The bytes left on the medium by a crash now, keeping what `mode` says of the unsynced
    /// writes (randomly chosen with `rng`).
    pub fn crash_image(&self, mode: CrashMode, rng: &mut impl Rng) -> Vec<u8> {
        let images = self.lock();
        let mut image = images.durable.clone();
        let apply = |image: &mut Vec<u8>, offset: u64, data: &[u8]| {
            let o = offset as usize;
            let end = (o + data.len()).min(image.len());
            if o < end {
                image[o..end].copy_from_slice(&data[..end - o]);
            }
        };
        match mode {
            CrashMode::DropAll => {}
            CrashMode::KeepAll => {
                for (offset, data) in &images.pending {
                    apply(&mut image, *offset, data);
                }
            }
            CrashMode::TornPrefix => {
                let n = images.pending.len();
                if n > 0 {
                    let keep = rng.random_range(0..n);
                    for (offset, data) in &images.pending[..keep] {
                        apply(&mut image, *offset, data);
                    }
                    let (offset, data) = &images.pending[keep];
                    let sectors = data.len().div_ceil(512);
                    let torn = rng.random_range(0..=sectors) * 512;
                    apply(&mut image, *offset, &data[..torn.min(data.len())]);
                }
            }
            CrashMode::RandomSubset => {
                for (offset, data) in &images.pending {
                    if rng.random_bool(0.5) {
                        apply(&mut image, *offset, data);
                    }
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
        images.pending.push((offset, buf.to_vec()));
        Ok(())
    }
    fn sync(&self) -> Result<()> {
        self.tick("sync", 0)?;
        let mut images = self.lock();
        let Images {
            durable,
            live,
            pending,
        } = &mut *images;
        if durable.len() != live.len() {
            durable.resize(live.len(), 0);
        }
        for (offset, data) in pending.drain(..) {
            let o = offset as usize;
            durable[o..o + data.len()].copy_from_slice(&data);
        }
        self.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn set_size(&self, size: u64) -> Result<()> {
        self.tick("resize", size)?;
        let mut images = self.lock();
        images.live.resize(size as usize, 0);
        // A resize is metadata of the file system; treat it as immediately durable.
        images.durable.resize(size as usize, 0);
        images.pending.retain(|(o, d)| o + d.len() as u64 <= size);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len as usize];
        self.write_at(&zeros, offset)
    }
}

#[cfg(test)]
mod tests {
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
}
