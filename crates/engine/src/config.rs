//! Pool configuration: sizes at creation ([`PoolConfig`]) and runtime behaviour
//! ([`PoolOptions`]). Defaults follow Docker's devicemapper driver and the kernel.

use std::path::PathBuf;
use std::time::Duration;

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
        }
    }
}
