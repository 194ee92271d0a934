//! The superblock (format spec section 3) and the device details value (section 5.1).
//!
//! ```text
//! 0x000 csum u32 | 0x004 flags u32 | 0x008 blocknr u64 | 0x010 uuid [16]
//! 0x020 magic u64 | 0x028 version u32 | 0x02C time u32 | 0x030 trans_id u64 | 0x038 held_root u64
//! 0x040 data_space_map_root [128] | 0x0C0 metadata_space_map_root [128]
//! 0x140 data_mapping_root u64 | 0x148 device_details_root u64
//! 0x150 data_block_size u32 | 0x154 metadata_block_size u32 | 0x158 metadata_nr_blocks u64
//! 0x160 compat_flags u32 | 0x164 compat_ro_flags u32 | 0x168 incompat_flags u32
//! ```

use thinpool_pdata::BLOCK_SIZE;
use thinpool_pdata::block::{Block, le_u32, le_u64, put_u32, put_u64};
use thinpool_pdata::transaction::SmRoot;

/// dm-thin's superblock magic (27022010).
pub const SUPERBLOCK_MAGIC: u64 = 27022010;
/// The format version we write.
pub const VERSION: u32 = 2;
/// Superblock flag: the kernel saw a metadata error; check before use.
pub const NEEDS_CHECK: u32 = 1;
/// Metadata block size in sectors.
pub const METADATA_BLOCK_SECTORS: u32 = 8;

const FLAGS: usize = 0x004;
const UUID: usize = 0x010;
const MAGIC: usize = 0x020;
const VERSION_OFF: usize = 0x028;
const TIME: usize = 0x02C;
const TRANS_ID: usize = 0x030;
const HELD_ROOT: usize = 0x038;
const DATA_SM_ROOT: usize = 0x040;
const META_SM_ROOT: usize = 0x0C0;
const MAPPING_ROOT: usize = 0x140;
const DETAILS_ROOT: usize = 0x148;
const DATA_BLOCK_SIZE: usize = 0x150;
const META_BLOCK_SIZE: usize = 0x154;
const META_NR_BLOCKS: usize = 0x158;
const COMPAT: usize = 0x160;
const COMPAT_RO: usize = 0x164;
const INCOMPAT: usize = 0x168;

/// The decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Superblock {
    /// Flags (bit 0 = NEEDS_CHECK).
    pub flags: u32,
    /// Own block number.
    pub blocknr: u64,
    /// 16 bytes the kernel ignores.
    pub uuid: [u8; 16],
    /// Must be [`SUPERBLOCK_MAGIC`].
    pub magic: u64,
    /// 1 or 2.
    pub version: u32,
    /// Snapshot counter.
    pub time: u32,
    /// Userspace transaction id.
    pub trans_id: u64,
    /// Block of the held metadata-snapshot copy, 0 if none.
    pub held_root: u64,
    /// Data space-map root.
    pub data_sm_root: SmRoot,
    /// Metadata space-map root.
    pub metadata_sm_root: SmRoot,
    /// Root of the mapping tree's top level.
    pub mapping_root: u64,
    /// Root of the device details tree.
    pub details_root: u64,
    /// Data block size in sectors.
    pub data_block_size: u32,
    /// Always 8.
    pub metadata_block_size: u32,
    /// Metadata blocks at format time (never updated, section 3).
    pub metadata_nr_blocks: u64,
    /// Compat flags.
    pub compat_flags: u32,
    /// Compat read-only flags.
    pub compat_ro_flags: u32,
    /// Incompat flags.
    pub incompat_flags: u32,
}

impl Superblock {
    /// Decode a superblock-kind block (checksum already validated).
    pub fn decode(b: &[u8]) -> Self {
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[UUID..UUID + 16]);
        Superblock {
            flags: le_u32(b, FLAGS),
            blocknr: le_u64(b, 8),
            uuid,
            magic: le_u64(b, MAGIC),
            version: le_u32(b, VERSION_OFF),
            time: le_u32(b, TIME),
            trans_id: le_u64(b, TRANS_ID),
            held_root: le_u64(b, HELD_ROOT),
            data_sm_root: SmRoot::decode(&b[DATA_SM_ROOT..]),
            metadata_sm_root: SmRoot::decode(&b[META_SM_ROOT..]),
            mapping_root: le_u64(b, MAPPING_ROOT),
            details_root: le_u64(b, DETAILS_ROOT),
            data_block_size: le_u32(b, DATA_BLOCK_SIZE),
            metadata_block_size: le_u32(b, META_BLOCK_SIZE),
            metadata_nr_blocks: le_u64(b, META_NR_BLOCKS),
            compat_flags: le_u32(b, COMPAT),
            compat_ro_flags: le_u32(b, COMPAT_RO),
            incompat_flags: le_u32(b, INCOMPAT),
        }
    }

    /// Encode into a zeroed block (checksum and block number are set when written).
    pub fn encode(&self) -> Box<Block> {
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        put_u32(&mut b[..], FLAGS, self.flags);
        put_u64(&mut b[..], 8, self.blocknr);
        b[UUID..UUID + 16].copy_from_slice(&self.uuid);
        put_u64(&mut b[..], MAGIC, self.magic);
        put_u32(&mut b[..], VERSION_OFF, self.version);
        put_u32(&mut b[..], TIME, self.time);
        put_u64(&mut b[..], TRANS_ID, self.trans_id);
        put_u64(&mut b[..], HELD_ROOT, self.held_root);
        self.data_sm_root.encode(&mut b[DATA_SM_ROOT..]);
        self.metadata_sm_root.encode(&mut b[META_SM_ROOT..]);
        put_u64(&mut b[..], MAPPING_ROOT, self.mapping_root);
        put_u64(&mut b[..], DETAILS_ROOT, self.details_root);
        put_u32(&mut b[..], DATA_BLOCK_SIZE, self.data_block_size);
        put_u32(&mut b[..], META_BLOCK_SIZE, self.metadata_block_size);
        put_u64(&mut b[..], META_NR_BLOCKS, self.metadata_nr_blocks);
        put_u32(&mut b[..], COMPAT, self.compat_flags);
        put_u32(&mut b[..], COMPAT_RO, self.compat_ro_flags);
        put_u32(&mut b[..], INCOMPAT, self.incompat_flags);
        b
    }

    /// The checks the kernel makes when it reads a superblock (section 3), as a description of
    /// the first fault found. `blocknr` is checked by block validation.
    pub fn fault(&self) -> Option<String> {
        if self.magic != SUPERBLOCK_MAGIC {
            return Some(format!(
                "bad magic {} (expected {SUPERBLOCK_MAGIC}): not dm-thin metadata",
                self.magic
            ));
        }
        if self.version != 1 && self.version != 2 {
            return Some(format!(
                "unsupported version {} (1 and 2 are known)",
                self.version
            ));
        }
        if self.flags & !NEEDS_CHECK != 0 {
            return Some(format!("unknown flags {:#x}", self.flags));
        }
        if self.incompat_flags != 0 {
            return Some(format!("unknown incompat flags {:#x}", self.incompat_flags));
        }
        if self.metadata_block_size != METADATA_BLOCK_SECTORS {
            return Some(format!(
                "metadata block size {} sectors (only 8 is supported)",
                self.metadata_block_size
            ));
        }
        if self.data_block_size < 128
            || self.data_block_size > 2_097_152
            || !self.data_block_size.is_multiple_of(128)
        {
            return Some(format!(
                "data block size {} sectors is not a multiple of 128 in 128..=2097152",
                self.data_block_size
            ));
        }
        None
    }
}

/// A thin device's details (section 5.1), the 24-byte value of the details tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceDetails {
    /// Number of mappings.
    pub mapped_blocks: u64,
    /// Pool transaction id at creation.
    pub transaction_id: u64,
    /// Pool time at creation.
    pub creation_time: u32,
    /// Pool time of the last snapshot of or from this device.
    pub snapshotted_time: u32,
}

impl DeviceDetails {
    /// Encoded size.
    pub const SIZE: usize = 24;
    /// Decode 24 bytes.
    pub fn decode(b: &[u8]) -> Self {
        DeviceDetails {
            mapped_blocks: le_u64(b, 0),
            transaction_id: le_u64(b, 8),
            creation_time: le_u32(b, 16),
            snapshotted_time: le_u32(b, 20),
        }
    }
    /// Encode 24 bytes.
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        put_u64(&mut b, 0, self.mapped_blocks);
        put_u64(&mut b, 8, self.transaction_id);
        put_u32(&mut b, 16, self.creation_time);
        put_u32(&mut b, 20, self.snapshotted_time);
        b
    }
}

/// A mapping value: data block (40 bits) and time (24 bits), section 5.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockTime {
    /// Data block.
    pub block: u64,
    /// Low 24 bits of the pool time when mapped.
    pub time: u32,
}

impl BlockTime {
    /// Largest data block a mapping can hold.
    pub const MAX_BLOCK: u64 = (1 << 40) - 1;
    /// Unpack.
    pub fn unpack(v: u64) -> Self {
        BlockTime {
            block: v >> 24,
            time: (v & 0xFF_FFFF) as u32,
        }
    }
    /// Pack (time masked to 24 bits, section 11.4).
    pub fn pack(&self) -> u64 {
        (self.block << 24) | (self.time as u64 & 0xFF_FFFF)
    }
}
