//! Corruption: flip a byte in every block that opening a vector and reading all its mappings
//! touches (superblock, both space maps' index, bitmaps and ref-count trees, details tree,
//! both levels of the mapping tree, the held superblock copy) → open or the read fails with
//! an error that names that block; nothing panics. Stale blocks are left alone.

use std::sync::{Arc, Mutex};

use thinpool_io::{BlockDevice, MemDevice};
use thinpool_thin::ThinMetadata;

/// A memory device that records which 4 KiB blocks were read.
struct Recording {
    inner: MemDevice,
    reads: Mutex<std::collections::BTreeSet<u64>>,
}

impl BlockDevice for Recording {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> thinpool_io::Result<u64> {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> thinpool_io::Result<()> {
        let mut r = self.reads.lock().unwrap();
        for b in offset / 4096..(offset + buf.len() as u64).div_ceil(4096) {
            r.insert(b);
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> thinpool_io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> thinpool_io::Result<()> {
        Ok(())
    }
    fn set_size(&self, size: u64) -> thinpool_io::Result<()> {
        self.inner.set_size(size)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> thinpool_io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
}

/// Open and read every mapping of every device.
fn read_all(dev: Arc<dyn BlockDevice>) -> thinpool_thin::Result<u64> {
    let mut md = ThinMetadata::open(dev)?;
    let mut n = 0;
    for (id, _) in md.devices()? {
        md.mappings(id, 0, &mut |_, _, _| {
            n += 1;
            true
        })?;
    }
    Ok(n)
}

#[test]
fn flipped_bytes_in_every_used_block_are_named() {
    for name in thinpool_testkit::VECTORS {
        let bytes = thinpool_testkit::vector_bytes(name);
        let rec = Arc::new(Recording {
            inner: MemDevice::from_bytes(bytes.clone()),
            reads: Mutex::new(Default::default()),
        });
        let clean = read_all(rec.clone()).unwrap();
        let blocks = rec.reads.lock().unwrap().clone();
        assert!(blocks.len() > 5, "{name}: reads recorded");
        for &b in &blocks {
            for offset in [4usize, 20, 100, 3000] {
                let mut img = bytes.clone();
                img[b as usize * 4096 + offset] ^= 0x5a;
                let r = std::panic::catch_unwind(|| read_all(Arc::new(MemDevice::from_bytes(img))));
                let r = r.unwrap_or_else(|_| {
                    panic!("{name}: panic with block {b} byte {offset} flipped")
                });
                match r {
                    Ok(n) => panic!(
                        "{name}: block {b} byte {offset} flipped went unnoticed ({n} of {clean} mappings read)"
                    ),
                    Err(e) => {
                        let msg = e.to_string();
                        assert!(
                            msg.contains(&format!("block {b}"))
                                || (b == 0 && msg.contains("superblock")),
                            "{name}: block {b} byte {offset}: error does not name the block: {msg}"
                        );
                    }
                }
            }
        }
        eprintln!(
            "{name}: {} blocks corrupted one byte at a time, each refused",
            blocks.len()
        );
    }
}
