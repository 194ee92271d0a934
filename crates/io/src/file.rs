//! [`FileDevice`]: a regular file (sparse or not) or a block device, with positional I/O.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use crate::{BlockDevice, Error, Result, check_range};

/// A file or block device opened for positional reads and writes.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    name: String,
    is_block: bool,
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
                source,
            })?;
        let is_block = file
            .metadata()
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        Ok(Self {
            file,
            name,
            is_block,
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
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| Error::Open {
                device: name.clone(),
                op: "create",
                source,
            })?;
        file.set_len(size).map_err(|e| io("resize", e))?;
        Ok(Self {
            file,
            name,
            is_block: false,
        })
    }

    fn err(&self, op: &'static str, offset: u64, len: u64, source: std::io::Error) -> Error {
        Error::Io {
            device: self.name.clone(),
            op,
            offset,
            len,
            source,
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
        if !self.is_block {
            check_range(&self.name, "write", offset, buf.len(), self.size()?)?;
        }
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
        self.file
            .set_len(size)
            .map_err(|e| self.err("resize", size, 0, e))
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
        std::fs::remove_file(&dir).unwrap();
    }
}
