//! [`FileDevice`]: a regular file (sparse or not) or a block device, with positional I/O.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{BlockDevice, Error, Result, check_range};

/// A file or block device opened for positional reads and writes.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    name: String,
    is_block: bool,
    /// A regular file's size as last seen or set here. Writes inside it are not checked
    /// against the file system again: asking (`fstat`) costs as much as a small write.
    known_size: AtomicU64,
    /// A regular file on a file system whose `copy_file_range` is a reflink.
    reflinks: bool,
}

/// Whether `file` is a regular file on a file system that can share extents between ranges
/// of a file (`copy_file_range` makes a reflink there): XFS (when made with reflinks, the
/// default of mkfs.xfs since 5.1; without, the copy is in the kernel, as elsewhere), btrfs,
/// bcachefs.
fn reflinks(file: &File, is_block: bool) -> bool {
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683e;
    const BCACHEFS: i64 = 0xca45_1a4e;
    // `f_type` is i64 here and narrower on some architectures.
    #[allow(clippy::unnecessary_cast)]
    let on = |s: rustix::fs::StatFs| matches!(s.f_type as i64, XFS | BTRFS | BCACHEFS);
    !is_block && rustix::fs::fstatfs(file).is_ok_and(on)
}

impl FileDevice {
    /// Open an existing file or block device, read-write.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, true)
    }

    /// Open an existing file or block device read-only (writes fail).
    pub fn open_read_only(path: &Path) -> Result<Self> {
        Self::open_with(path, false)
    }

    fn open_with(path: &Path, write: bool) -> Result<Self> {
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|source| Error::Open {
                device: name.clone(),
                op: "open",
                cause: source,
            })?;
        let is_block = file
            .metadata()
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        let reflinks = reflinks(&file, is_block);
        Ok(Self {
            file,
            name,
            is_block,
            known_size: AtomicU64::new(0),
            reflinks,
        })
    }

    /// Create (or truncate) a sparse file of `size` bytes.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let name = path.display().to_string();
        let io = |op, source| Error::Io {
            device: name.clone(),
            op,
            offset: 0,
            len: size,
            cause: source,
        };
        // Private to its owner from the start: a pool's bytes are its volumes' bytes.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| Error::Open {
                device: name.clone(),
                op: "create",
                cause: source,
            })?;
        file.set_len(size).map_err(|e| io("resize", e))?;
        let reflinks = reflinks(&file, false);
        Ok(Self {
            file,
            name,
            is_block: false,
            known_size: AtomicU64::new(size),
            reflinks,
        })
    }

    /// Refuse a write past the end of a regular file (which would extend it). The file is
    /// asked for its size only when the write goes past the size seen last: a data file grows
    /// through `set_size`, and is not shrunk under an open pool.
    fn check_write(&self, op: &'static str, offset: u64, len: usize) -> Result<()> {
        if self.is_block {
            return Ok(());
        }
        let known = self.known_size.load(Ordering::Relaxed);
        if offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= known)
        {
            return Ok(());
        }
        let size = self.size()?;
        self.known_size.store(size, Ordering::Relaxed);
        check_range(&self.name, op, offset, len, size)
    }

    fn err(&self, op: &'static str, offset: u64, len: u64, source: std::io::Error) -> Error {
        Error::Io {
            device: self.name.clone(),
            op,
            offset,
            len,
            cause: source,
        }
    }
}

impl BlockDevice for FileDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> Result<u64> {
        if self.is_block {
            // A block device reports its size through seeking to the end.
            (&self.file)
                .seek(SeekFrom::End(0))
                .map_err(|e| self.err("size", 0, 0, e))
        } else {
            self.file
                .metadata()
                .map(|m| m.len())
                .map_err(|e| self.err("size", 0, 0, e))
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                match self.size() {
                    Ok(size) => check_range(&self.name, "read", offset, buf.len(), size)
                        .err()
                        .unwrap_or_else(|| self.err("read", offset, buf.len() as u64, e)),
                    Err(err) => err,
                }
            } else {
                self.err("read", offset, buf.len() as u64, e)
            }
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write("write", offset, buf.len())?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.err("write", offset, buf.len() as u64, e))
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| self.err("sync", 0, 0, e))
    }

    fn set_size(&self, size: u64) -> Result<()> {
        if self.is_block {
            return Err(self.err(
                "resize",
                size,
                0,
                std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "a block device cannot be resized by thinpool",
                ),
            ));
        }
        // Until the new size is in place, check every write.
        self.known_size.store(0, Ordering::Relaxed);
        self.file
            .set_len(size)
            .map_err(|e| self.err("resize", size, 0, e))?;
        self.known_size.store(size, Ordering::Relaxed);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        use rustix::fs::{FallocateFlags, fallocate};
        if self.is_block {
            // Block devices: zero the range instead (BLKDISCARD is a later issue's concern).
            let zeros = vec![0u8; 1 << 16];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64) as usize;
                self.write_at(&zeros[..n], offset + done)?;
                done += n as u64;
            }
            return Ok(());
        }
        fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .map_err(|e| self.err("punch hole", offset, len, e.into()))
    }

    fn copy_into_zeroed(&self, src: u64, dst: u64, len: u64) -> Result<()> {
        if self.is_block {
            // A block device has no holes to skip.
            return crate::copy_nonzero(self, src, dst, len);
        }
        if src < dst + len && dst < src + len {
            return Err(self.err(
                "copy",
                dst,
                len,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("the source range at byte {src} overlaps the destination"),
                ),
            ));
        }
        // (A source past the end would read as one long hole: refuse it like a write.)
        self.check_write("read", src, len as usize)?;
        self.check_write("write", dst, len as usize)?;
        let end = src + len;
        let mut pos = src;
        while pos < end {
            let Some((data, hole)) = self.next_data(pos, end)? else {
                break;
            };
            self.copy_data(data, dst + (data - src), hole - data)?;
            pos = hole;
        }
        Ok(())
    }

    fn copies_by_reference(&self) -> bool {
        self.reflinks
    }

    fn all_data(&self, offset: u64, len: u64) -> Result<bool> {
        if self.is_block || len == 0 {
            return Ok(true);
        }
        let end = offset + len;
        Ok(matches!(self.next_data(offset, end)?, Some((d, h)) if d == offset && h >= end))
    }

    fn holes(&self, f: &mut dyn FnMut(u64, u64) -> bool) -> Result<()> {
        if self.is_block {
            return Ok(());
        }
        let size = self.size()?;
        let mut pos = 0;
        while pos < size {
            match self.next_data(pos, size)? {
                Some((data, end)) => {
                    if data > pos && !f(pos, data - pos) {
                        return Ok(());
                    }
                    pos = end;
                }
                None => {
                    f(pos, size - pos);
                    break;
                }
            }
        }
        Ok(())
    }
}

impl FileDevice {
    /// The first run of data in `from..end` as `(start, end)` (`SEEK_DATA`, `SEEK_HOLE`), or
    /// `None` if the rest of that range is hole. A file system that cannot tell calls
    /// everything data, which is correct, only slower.
    fn next_data(&self, from: u64, end: u64) -> Result<Option<(u64, u64)>> {
        use rustix::fs::{SeekFrom, seek};
        use rustix::io::Errno;
        // These seeks move the file offset, which nothing here uses: all I/O is positional.
        let data = match seek(&self.file, SeekFrom::Data(from)) {
            Ok(d) => d,
            // No data at or after `from`.
            Err(Errno::NXIO) => return Ok(None),
            Err(Errno::INVAL | Errno::OPNOTSUPP) => return Ok(Some((from, end))),
            Err(e) => return Err(self.err("seek data", from, end - from, e.into())),
        };
        if data >= end {
            return Ok(None);
        }
        let hole = match seek(&self.file, SeekFrom::Hole(data)) {
            Ok(h) => h.min(end),
            Err(Errno::NXIO | Errno::INVAL | Errno::OPNOTSUPP) => end,
            Err(e) => return Err(self.err("seek hole", data, end - data, e.into())),
        };
        Ok(Some((data, hole)))
    }

    /// Copy `len` bytes inside the file in the kernel (`copy_file_range`: no copy through
    /// user space, a reflink where the file system can), or through a buffer where it cannot.
    fn copy_data(&self, src: u64, dst: u64, len: u64) -> Result<()> {
        use rustix::io::Errno;
        let mut done = 0;
        while done < len {
            let (mut from, mut to) = (src + done, dst + done);
            match rustix::fs::copy_file_range(
                &self.file,
                Some(&mut from),
                &self.file,
                Some(&mut to),
                (len - done) as usize,
            ) {
                Ok(0) => {
                    // End of file: it shrank since the range was checked.
                    let e = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                    return Err(self.err("copy", src + done, len - done, e));
                }
                Ok(n) => done += n as u64,
                Err(Errno::NOSYS | Errno::XDEV | Errno::INVAL | Errno::OPNOTSUPP) => {
                    return crate::copy_nonzero(self, src + done, dst + done, len - done);
                }
                Err(e) => return Err(self.err("copy", src + done, len - done, e.into())),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_file_roundtrip_and_punch() {
        let dir = std::env::temp_dir().join(format!("thinpool-io-test-{}", std::process::id()));
        let dev = FileDevice::create(&dir, 1 << 20).unwrap();
        dev.write_at(&[7u8; 8192], 65536).unwrap();
        dev.punch_hole(65536, 4096).unwrap();
        let mut buf = [1u8; 8192];
        dev.read_at(&mut buf, 65536).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..].iter().all(|&b| b == 7));
        assert!(matches!(
            dev.write_at(&[0u8; 16], (1 << 20) - 8),
            Err(Error::OutOfRange { .. })
        ));
        assert!(dev.read_at(&mut buf, 1 << 20).is_err());
        // Grown by `set_size`: writes up to the new end pass; shrunk: refused again.
        dev.set_size(2 << 20).unwrap();
        dev.write_at(&[0u8; 16], (2 << 20) - 16).unwrap();
        dev.set_size(1 << 20).unwrap();
        assert!(matches!(
            dev.write_at(&[0u8; 16], (1 << 20) - 8),
            Err(Error::OutOfRange { .. })
        ));
        assert_eq!(dev.size().unwrap(), 1 << 20);
        // Opened again, grown by someone else: writes to the new part pass.
        let other = FileDevice::open(&dir).unwrap();
        dev.set_size(3 << 20).unwrap();
        other.write_at(&[1u8; 16], (3 << 20) - 16).unwrap();
        assert!(other.write_at(&[1u8; 16], 3 << 20).is_err());
        std::fs::remove_file(&dir).unwrap();
    }

    /// Is `offset` inside a hole of the file (as the file system reports it)?
    fn in_hole(dev: &FileDevice, offset: u64) -> bool {
        use rustix::fs::{SeekFrom, seek};
        match seek(&dev.file, SeekFrom::Hole(offset)) {
            Ok(h) => h == offset,
            Err(_) => false,
        }
    }

    #[test]
    fn all_data_says_whether_a_range_has_holes() {
        let path = std::env::temp_dir().join(format!("thinpool-io-dense-{}", std::process::id()));
        let dev = FileDevice::create(&path, 1 << 20).unwrap();
        dev.write_at(&[7u8; 65536], 65536).unwrap();
        assert!(dev.all_data(65536, 65536).unwrap());
        assert!(dev.all_data(65536 + 4096, 8192).unwrap());
        if in_hole(&dev, 0) {
            assert!(!dev.all_data(0, 65536).unwrap());
            assert!(!dev.all_data(65536, 65536 + 4096).unwrap());
            assert!(!dev.all_data(4096, 65536).unwrap());
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn copy_into_zeroed_copies_data_and_keeps_holes() {
        let path = std::env::temp_dir().join(format!("thinpool-io-copy-{}", std::process::id()));
        let dev = FileDevice::create(&path, 4 << 20).unwrap();
        // Source block at 1 MiB: data at 4..8 KiB and 40..52 KiB (one byte zero inside),
        // a hole elsewhere.
        let src = 1 << 20;
        let mut a = vec![3u8; 4096];
        a[100] = 0;
        dev.write_at(&a, src + 4096).unwrap();
        dev.write_at(&[5u8; 12288], src + 40960).unwrap();
        let mut want = vec![0u8; 65536];
        want[4096..8192].copy_from_slice(&a);
        want[40960..53248].fill(5);
        type Copy = fn(&FileDevice, u64, u64, u64) -> Result<()>;
        let copies: [(&str, Copy); 2] = [
            ("file", |d, s, t, n| d.copy_into_zeroed(s, t, n)),
            ("buffer", |d, s, t, n| crate::copy_nonzero(d, s, t, n)),
        ];
        for (i, (how, copy)) in copies.iter().enumerate() {
            let dst = (2 << 20) + i as u64 * 65536;
            // Whole block, and in two parts around a gap (as copy-on-write does).
            copy(&dev, src, dst, 65536).unwrap();
            let mut got = vec![9u8; 65536];
            dev.read_at(&mut got, dst).unwrap();
            assert!(got == want, "{how}: whole block");
            let dst2 = dst + (1 << 20);
            copy(&dev, src, dst2, 4096 + 200).unwrap();
            copy(&dev, src + 45056, dst2 + 45056, 65536 - 45056).unwrap();
            dev.read_at(&mut got, dst2).unwrap();
            let mut want2 = vec![0u8; 65536];
            want2[..4296].copy_from_slice(&want[..4296]);
            want2[45056..].copy_from_slice(&want[45056..]);
            assert!(got == want2, "{how}: two parts");
            // The holes of the source were not filled in the copy (where the file system says).
            if in_hole(&dev, src) {
                assert!(in_hole(&dev, dst + 16384), "{how}: hole filled");
            }
        }
        // Overlap and range errors.
        assert!(dev.copy_into_zeroed(src, src + 4096, 8192).is_err());
        assert!(dev.copy_into_zeroed(src, (4 << 20) - 4096, 8192).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
