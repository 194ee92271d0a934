//! thinpool-io: the devices under the pool.
//!
//! The lowest layer of thinpool (see `../shared/docs/design.md`): it knows bytes and offsets and
//! nothing about metadata. [`BlockDevice`] is the one trait every layer above reads and writes
//! through; [`FileDevice`] backs it with a regular (usually sparse) file or a block device.
//! With the `test-util` feature, [`MemDevice`] keeps a device in memory and [`FaultyDevice`]
//! simulates a crash: it remembers what was written since the last `sync` and can drop or tear
//! any part of it.
//!
//! ```
//! use thinpool_io::{BlockDevice, FileDevice};
//! let dir = std::env::temp_dir().join(format!("thinpool-io-doc-{}", std::process::id()));
//! let dev = FileDevice::create(&dir, 1 << 20).unwrap();
//! dev.write_at(b"hello", 4096).unwrap();
//! let mut buf = [0u8; 5];
//! dev.read_at(&mut buf, 4096).unwrap();
//! assert_eq!(&buf, b"hello");
//! std::fs::remove_file(&dir).unwrap();
//! ```

mod file;
#[cfg(feature = "test-util")]
mod mem;

pub use file::FileDevice;
#[cfg(feature = "test-util")]
pub use mem::{CrashMode, FaultyDevice, MemDevice};

use std::sync::Arc;

/// Errors of device I/O. Each names the device, the operation and the offset.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file or device could not be opened or created.
    #[error("cannot {op} {device}: {cause}")]
    Open {
        /// The path.
        device: String,
        /// "open" or "create".
        op: &'static str,
        /// The underlying error (part of the message, so that every report of this error,
        /// `pool status` included, says why: "No space left on device", "Input/output error").
        cause: std::io::Error,
    },
    /// An I/O call failed.
    #[error("{op} of {device} at byte {offset} ({len} bytes) failed: {cause}")]
    Io {
        /// Name of the device (its path).
        device: String,
        /// What was being done: "read", "write", "sync", "punch hole", "resize".
        op: &'static str,
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// The underlying error (part of the message, so that every report of this error,
        /// `pool status` included, says why: "No space left on device", "Input/output error").
        cause: std::io::Error,
    },
    /// A read or write went past the end of the device.
    #[error("{op} of {device} at byte {offset} ({len} bytes) is past its end ({size} bytes)")]
    OutOfRange {
        /// Name of the device.
        device: String,
        /// "read" or "write".
        op: &'static str,
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Size of the device in bytes.
        size: u64,
    },
    /// A fault-injecting device was told to fail from now on.
    #[error("injected failure on {device}: {op} at byte {offset}")]
    Injected {
        /// Name of the device.
        device: String,
        /// The failed operation.
        op: &'static str,
        /// Byte offset of the request.
        offset: u64,
    },
}

impl Error {
    /// True when the file system holding a file-backed device is full (`ENOSPC`, or `EDQUOT`
    /// for a quota): the device itself is fine and the same request can succeed once the host
    /// has space again.
    pub fn is_host_full(&self) -> bool {
        let cause = match self {
            Error::Io { cause, .. } | Error::Open { cause, .. } => cause,
            _ => return false,
        };
        let code = cause.raw_os_error();
        code == Some(rustix::io::Errno::NOSPC.raw_os_error())
            || code == Some(rustix::io::Errno::DQUOT.raw_os_error())
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A device addressed by byte offsets: a file, a block device, or a test device.
///
/// Contract: `write_at` may be buffered; only after `sync` returns are the writes durable.
/// Methods take `&self` and are safe to call from several threads at once (positional I/O).
pub trait BlockDevice: Send + Sync {
    /// A name for messages (the path for files).
    fn name(&self) -> &str;
    /// Current size in bytes.
    fn size(&self) -> Result<u64>;
    /// Fill `buf` from `offset`. Reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Write `buf` at `offset`. Writing past the end is an error (grow with `set_size`).
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Make every completed write durable.
    fn sync(&self) -> Result<()>;
    /// Grow (or shrink) a file-backed device. Block devices refuse.
    fn set_size(&self, size: u64) -> Result<()>;
    /// Deallocate a range (sparse files: punch a hole); reads of it return zeros afterwards.
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()>;
    /// Make `dst..dst+len`, which reads zeros now (punched, or never written), read what
    /// `src..src+len` reads (the ranges must not overlap). Durable after `sync`, like a write.
    ///
    /// Only what is not zero needs copying. The default reads the source through a buffer and
    /// writes its nonzero 4 KiB pieces; [`FileDevice`] on a regular file asks the file system
    /// where the source holds data (holes are neither read nor written) and copies that in the
    /// kernel. Copy-on-write of a mostly empty block then costs what its data costs.
    fn copy_into_zeroed(&self, src: u64, dst: u64, len: u64) -> Result<()> {
        copy_nonzero(self, src, dst, len)
    }
    /// Whether [`copy_into_zeroed`](Self::copy_into_zeroed) shares the source's storage
    /// instead of copying bytes (a reflink: XFS, btrfs). Where it does not, reading a block and
    /// writing it back whole is cheaper than an in-kernel copy of its parts.
    fn copies_by_reference(&self) -> bool {
        false
    }
    /// Whether `offset..offset+len` is stored throughout (no hole in a sparse file). The
    /// default, for devices without holes, says yes.
    fn all_data(&self, offset: u64, len: u64) -> Result<bool> {
        let _ = (offset, len);
        Ok(true)
    }
    /// Call `f(offset, len)`, ascending, for ranges that read zeros because nothing is stored
    /// there (a sparse file's holes), until it returns false. The default knows of none, which
    /// is always correct.
    fn holes(&self, f: &mut dyn FnMut(u64, u64) -> bool) -> Result<()> {
        let _ = f;
        Ok(())
    }
}

/// [`BlockDevice::copy_into_zeroed`] through a buffer: reads of at most 64 KiB, writes of the
/// runs of 4 KiB pieces that are not all zeros.
pub fn copy_nonzero<D: BlockDevice + ?Sized>(dev: &D, src: u64, dst: u64, len: u64) -> Result<()> {
    let mut buf = vec![0u8; len.min(1 << 16) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        let chunk = &mut buf[..n];
        dev.read_at(chunk, src + done)?;
        write_nonzero(dev, chunk, dst + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Whether `bytes` are all zero (a `memcmp` against zeros, 4 KiB at a time: several times
/// faster than a byte loop).
pub fn is_zero(bytes: &[u8]) -> bool {
    const ZEROS: [u8; 4096] = [0; 4096];
    bytes.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// Write `chunk` at `offset` where the range already reads zeros: only the runs of 4 KiB
/// pieces that are not all zeros are written.
pub fn write_nonzero<D: BlockDevice + ?Sized>(dev: &D, chunk: &[u8], offset: u64) -> Result<()> {
    const PIECE: usize = 4096;
    let n = chunk.len();
    let nonzero = |at: usize| !is_zero(&chunk[at..(at + PIECE).min(n)]);
    let mut i = 0;
    while i < n {
        if !nonzero(i) {
            i += PIECE;
            continue;
        }
        let mut j = i + PIECE;
        while j < n && nonzero(j) {
            j += PIECE;
        }
        let j = j.min(n);
        dev.write_at(&chunk[i..j], offset + i as u64)?;
        i = j;
    }
    Ok(())
}

impl<T: BlockDevice + ?Sized> BlockDevice for Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn size(&self) -> Result<u64> {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_at(buf, offset)
    }
    fn sync(&self) -> Result<()> {
        (**self).sync()
    }
    fn set_size(&self, size: u64) -> Result<()> {
        (**self).set_size(size)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn copy_into_zeroed(&self, src: u64, dst: u64, len: u64) -> Result<()> {
        (**self).copy_into_zeroed(src, dst, len)
    }
    fn copies_by_reference(&self) -> bool {
        (**self).copies_by_reference()
    }
    fn all_data(&self, offset: u64, len: u64) -> Result<bool> {
        (**self).all_data(offset, len)
    }
    fn holes(&self, f: &mut dyn FnMut(u64, u64) -> bool) -> Result<()> {
        (**self).holes(f)
    }
}

pub(crate) fn check_range(
    device: &str,
    op: &'static str,
    offset: u64,
    len: usize,
    size: u64,
) -> Result<()> {
    let len = len as u64;
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            device: device.to_string(),
            op,
            offset,
            len,
            size,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_finds_any_nonzero_byte() {
        assert!(is_zero(&[]));
        let mut b = vec![0u8; 10_000];
        assert!(is_zero(&b));
        for at in [0, 4095, 4096, 9_999] {
            b[at] = 1;
            assert!(!is_zero(&b), "byte {at}");
            b[at] = 0;
        }
    }
}
