//! Pool configuration: sizes at creation ([`PoolConfig`]) and runtime behaviour
//! ([`PoolOptions`]). Defaults follow Docker's devicemapper driver and the kernel.

use std::path::PathBuf;
use std::time::Duration;

use thinpool_thin::metadata::{DEFAULT_CACHE_BLOCKS, MIN_CACHE_BLOCKS};

use crate::{Error, Result};

/// Metadata block size: the unit of [`PoolOptions::metadata_cache`].
const METADATA_BLOCK: u64 = 4096;
/// Default [`PoolOptions::metadata_cache`]: 4 MiB.
pub(crate) const DEFAULT_METADATA_CACHE: u64 = DEFAULT_CACHE_BLOCKS as u64 * METADATA_BLOCK;
/// Smallest [`PoolOptions::metadata_cache`]: 256 KiB (64 blocks, a few times the deepest path
/// through the mapping tree).
pub(crate) const MIN_METADATA_CACHE: u64 = MIN_CACHE_BLOCKS as u64 * METADATA_BLOCK;

/// Sizes and devices of a new pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Data device size in bytes (sparse file). Default 100 GiB.
    pub data_size: u64,
    /// Metadata device size in bytes (sparse file). Default 2 GiB.
    pub metadata_size: u64,
    /// Block size in bytes: a multiple of 64 KiB from 64 KiB to 1 GiB. Default 64 KiB.
    pub block_size: u64,
    /// Use this existing file or block device for data (`<root>/pool/data` links to it).
    pub data_path: Option<PathBuf>,
    /// Use this existing file or block device for metadata.
    pub metadata_path: Option<PathBuf>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            data_size: 100 << 30,
            metadata_size: 2 << 30,
            block_size: 64 << 10,
            data_path: None,
            metadata_path: None,
        }
    }
}

/// Runtime behaviour of an open pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Zero the rest of a newly provisioned block (the kernel's default; off =
    /// `skip_block_zeroing`).
    pub zero_new_blocks: bool,
    /// Fail writes that need space at once when the pool is full (`error_if_no_space`);
    /// otherwise queue them for `no_space_timeout`.
    pub error_if_no_space: bool,
    /// How long a write waits for space before failing (the kernel's `no_space_timeout`).
    pub no_space_timeout: Duration,
    /// Free data blocks at or below which the low-water event is logged (0 = off).
    pub low_water_mark: u64,
    /// New volumes and snapshots are refused below this percentage of free data blocks.
    pub min_free_percent: u8,
    /// Commit period while there are uncommitted changes (kernel: 1 s); `None` = no timer.
    pub commit_interval: Option<Duration>,
    /// Punch holes in the data device for blocks that become free.
    pub discard_passdown: bool,
    /// Open for reading only: the devices are opened read-only, the catalog is reconciled in
    /// memory only, and every change is refused, so the pool's files stay byte for byte as
    /// they were (for commands that only look). A pool whose metadata needs a check opens
    /// this way whatever this says.
    pub read_only: bool,
    /// Memory for clean metadata blocks, in bytes (default 4 MiB, at least 256 KiB): the
    /// block cache holds at most this much (least recently used blocks go first, CLOCK), and
    /// new B-tree nodes changed since the last commit are written back to the metadata
    /// device early once they take as much again. So metadata blocks take at most twice this.
    pub metadata_cache: u64,
    /// From this many volumes on, a change to the catalog is appended to
    /// `volumes.journal` instead of rewriting `volumes.json` whole (default 1024; below it
    /// the file alone is the catalog, easy to read, edit or back up).
    pub catalog_journal_from: usize,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            zero_new_blocks: true,
            error_if_no_space: false,
            no_space_timeout: Duration::from_secs(60),
            low_water_mark: 0,
            min_free_percent: 10,
            commit_interval: Some(Duration::from_secs(1)),
            discard_passdown: true,
            read_only: false,
            metadata_cache: DEFAULT_METADATA_CACHE,
            catalog_journal_from: crate::catalog::JOURNAL_FROM,
        }
    }
}

impl PoolOptions {
    /// [`PoolOptions::metadata_cache`] in 4 KiB blocks, refused below
    /// [`MIN_METADATA_CACHE`].
    pub fn metadata_cache_blocks(&self) -> Result<usize> {
        if self.metadata_cache < MIN_METADATA_CACHE {
            return Err(Error::InvalidArgument(format!(
                "metadata cache of {} bytes is too small: at least {} KiB",
                self.metadata_cache,
                MIN_METADATA_CACHE >> 10
            )));
        }
        Ok(usize::try_from(self.metadata_cache / METADATA_BLOCK).unwrap_or(usize::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_cache_in_blocks_with_a_floor() {
        let mut o = PoolOptions::default();
        assert_eq!(o.metadata_cache_blocks().unwrap(), 1024);
        o.metadata_cache = 256 << 20;
        assert_eq!(o.metadata_cache_blocks().unwrap(), 65536);
        o.metadata_cache = MIN_METADATA_CACHE;
        assert_eq!(o.metadata_cache_blocks().unwrap(), 64);
        o.metadata_cache = MIN_METADATA_CACHE - 1;
        let e = o.metadata_cache_blocks().unwrap_err();
        assert!(e.to_string().contains("at least 256 KiB"), "{e}");
    }
}
