//! Checksummed 4 KiB metadata blocks (format spec sections 1 and 2).
//!
//! Every structured block carries a CRC-32C of bytes 4..4096 XORed with a per-kind salt at
//! offset 0 and its own block number at offset 8. [`validate`] checks both on every read;
//! [`stamp`] sets both before every write.

use std::fmt;

/// Size of a metadata block in bytes.
pub const BLOCK_SIZE: usize = 4096;

/// A metadata block buffer.
pub type Block = [u8; BLOCK_SIZE];

/// A metadata block number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MetaBlock(pub u64);

impl fmt::Display for MetaBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "metadata block {}", self.0)
    }
}

/// The four kinds of structured block and their checksum salts (section 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    /// The superblock (block 0) and the held metadata-snapshot copy.
    Superblock,
    /// A B-tree node of any tree.
    Node,
    /// A space-map bitmap.
    Bitmap,
    /// The metadata space map's index block.
    Index,
}

impl BlockKind {
    /// The checksum salt of this kind.
    pub const fn salt(self) -> u32 {
        match self {
            BlockKind::Superblock => 160774,
            BlockKind::Node => 121107,
            BlockKind::Bitmap => 240779,
            BlockKind::Index => 160478,
        }
    }

    /// All kinds, for identifying an unknown block.
    pub const ALL: [BlockKind; 4] = [
        BlockKind::Superblock,
        BlockKind::Node,
        BlockKind::Bitmap,
        BlockKind::Index,
    ];
}

impl fmt::Display for BlockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockKind::Superblock => "superblock",
            BlockKind::Node => "btree node",
            BlockKind::Bitmap => "space-map bitmap",
            BlockKind::Index => "space-map index block",
        })
    }
}

/// What is wrong with a block that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockFault {
    /// The stored checksum does not match the contents.
    #[error("bad checksum for a {kind} (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Expected kind.
        kind: BlockKind,
        /// Checksum at offset 0.
        stored: u32,
        /// Checksum of the contents with the kind's salt.
        computed: u32,
    },
    /// The block number at offset 8 is not the block's location.
    #[error("{kind} says it is block {found}")]
    BlockNumber {
        /// Expected kind.
        kind: BlockKind,
        /// Block number stored in the block.
        found: u64,
    },
}

/// CRC-32C of bytes 4.. of the block with the kind's salt, as stored at offset 0.
pub fn checksum(block: &[u8], kind: BlockKind) -> u32 {
    crc32c::crc32c(&block[4..]) ^ 0xFFFF_FFFF ^ kind.salt()
}

/// Set the block number and checksum of a block about to be written.
pub fn stamp(block: &mut [u8], kind: BlockKind, location: u64) {
    block[8..16].copy_from_slice(&location.to_le_bytes());
    let csum = checksum(block, kind);
    block[0..4].copy_from_slice(&csum.to_le_bytes());
}

/// Check the checksum and block number of a block read from `location`.
pub fn validate(block: &[u8], kind: BlockKind, location: u64) -> Result<(), BlockFault> {
    let stored = le_u32(block, 0);
    let computed = checksum(block, kind);
    if stored != computed {
        return Err(BlockFault::Checksum {
            kind,
            stored,
            computed,
        });
    }
    let found = le_u64(block, 8);
    if found != location {
        return Err(BlockFault::BlockNumber { kind, found });
    }
    Ok(())
}

/// Which kind's salt makes the stored checksum match, if any.
pub fn identify(block: &[u8]) -> Option<BlockKind> {
    let stored = le_u32(block, 0);
    let raw = crc32c::crc32c(&block[4..]) ^ 0xFFFF_FFFF;
    BlockKind::ALL
        .into_iter()
        .find(|k| raw ^ k.salt() == stored)
}

/// Little-endian `u32` at `off`.
#[inline]
pub fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4-byte slice"))
}

/// Little-endian `u64` at `off`.
#[inline]
pub fn le_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8-byte slice"))
}

/// Store a little-endian `u32` at `off`.
#[inline]
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Store a little-endian `u64` at `off`.
#[inline]
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_crc32c_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn stamp_then_validate() {
        let mut b = [0u8; BLOCK_SIZE];
        b[100] = 7;
        stamp(&mut b, BlockKind::Bitmap, 42);
        assert_eq!(validate(&b, BlockKind::Bitmap, 42), Ok(()));
        assert_eq!(identify(&b), Some(BlockKind::Bitmap));
        assert!(matches!(
            validate(&b, BlockKind::Node, 42),
            Err(BlockFault::Checksum { .. })
        ));
        assert!(matches!(
            validate(&b, BlockKind::Bitmap, 43),
            Err(BlockFault::BlockNumber { found: 42, .. })
        ));
    }
}
