//! thinpool-pdata: persistent data, the layer under the dm-thin metadata.
//!
//! It knows blocks, transactions, reference counts and trees, nothing about thin devices
//! (`../shared/docs/dm-thin-format.md`, parts 1 and 2):
//!
//! - [`block`]: checksummed 4 KiB blocks, the four kinds and their salts, validation;
//! - [`node`]: the B-tree node layout;
//! - [`space_map`]: reference counts in the on-disk bitmap shape, allocation rules;
//! - [`cache`]: the bounded block cache (CLOCK eviction);
//! - [`transaction`]: block reads through the cache, shadowing, loading and committing both
//!   space maps;
//! - [`btree`]: lookup, insert, remove, walks and deletion with reference counting.
//!
//! ```
//! use std::sync::Arc;
//! use thinpool_io::FileDevice;
//! use thinpool_pdata::{btree, transaction::Transaction};
//! let path = std::env::temp_dir().join(format!("pdata-doc-{}", std::process::id()));
//! let dev = Arc::new(FileDevice::create(&path, 1 << 20).unwrap());
//! let mut tx = Transaction::format(dev, 256, 1000).unwrap();
//! let ops = btree::PlainValue(8);
//! let mut root = btree::empty_tree(&mut tx, 8).unwrap();
//! for k in 0..1000u64 {
//!     root = btree::insert(&mut tx, root, k, &(k * 2).to_le_bytes(), &ops).unwrap().0;
//! }
//! assert_eq!(btree::lookup_u64(&mut tx, root, 500).unwrap(), Some(1000));
//! std::fs::remove_file(&path).unwrap();
//! ```

#![forbid(unsafe_code)]

pub mod block;
pub mod btree;
pub mod cache;
pub mod node;
pub mod space_map;
pub mod transaction;

pub use block::{BLOCK_SIZE, Block, BlockKind, MetaBlock};

/// Errors of the persistent-data layer. Each names the block concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Device I/O failed.
    #[error(transparent)]
    Io(#[from] thinpool_io::Error),
    /// A block failed validation (checksum or block number).
    #[error("{block}: {fault}")]
    Corrupt {
        /// Where.
        block: MetaBlock,
        /// What.
        fault: block::BlockFault,
    },
    /// A B-tree node's header is malformed.
    #[error("{block}: btree node {fault}")]
    Node {
        /// Where.
        block: MetaBlock,
        /// What.
        fault: node::ShapeFault,
    },
    /// A tree is malformed in a way found while using it.
    #[error("{block}: {message}")]
    Tree {
        /// Where.
        block: MetaBlock,
        /// What.
        message: String,
    },
    /// A block number beyond the device.
    #[error("{block} is beyond the end of the device ({nr_blocks} blocks)")]
    OutOfRange {
        /// The block asked for.
        block: MetaBlock,
        /// Blocks on the device.
        nr_blocks: u64,
    },
    /// The metadata structures contradict each other.
    #[error("inconsistent metadata: {0}")]
    Inconsistent(String),
    /// No free metadata block.
    #[error("no free metadata block left (all {nr_blocks} in use)")]
    NoMetadataSpace {
        /// Size of the metadata space map.
        nr_blocks: u64,
    },
    /// A caller asked for something impossible.
    #[error("{0}")]
    InvalidArgument(String),
    /// A commit failed before; the metadata is read-only until reopened.
    #[error("metadata is read-only after a failed commit; reopen the pool")]
    ReadOnly,
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
