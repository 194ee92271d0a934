//! The intermediate representation of a pool's logical content, as `thin_dump` prints it and
//! `thin_restore` reads it (thin-provisioning-tools' `ir.rs` idea): a stream of events that a
//! reader of metadata produces and a writer (XML, JSON, or a metadata image) consumes.
//!
//! ```text
//! superblock_b
//!   device_b  map* device_e      (one per thin device, ascending dev_id)
//! superblock_e
//! ```

/// The superblock fields the XML carries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Superblock {
    /// `uuid` attribute (thin_dump always prints "").
    pub uuid: String,
    /// Pool `time` (snapshot counter).
    pub time: u32,
    /// Pool transaction id.
    pub transaction: u64,
    /// Superblock flags (bit 0 = NEEDS_CHECK).
    pub flags: u32,
    /// Format version (1 or 2).
    pub version: u32,
    /// Data block size in 512-byte sectors.
    pub data_block_size: u32,
    /// Number of data blocks (0 in a dump of the held metadata snapshot).
    pub nr_data_blocks: u64,
    /// Held metadata snapshot root, if any. `thin_dump` 0.9.0 never prints it; XML input may
    /// carry it as `metadata_snap` (ignored by restore: XML cannot express a held snapshot).
    pub metadata_snap: Option<u64>,
}

/// One thin device's details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Device {
    /// Thin device id.
    pub dev_id: u32,
    /// Number of mapped blocks.
    pub mapped_blocks: u64,
    /// Transaction id at creation.
    pub transaction: u64,
    /// Pool time at creation.
    pub creation_time: u32,
    /// Pool time of the last snapshot of (or from) this device.
    pub snap_time: u32,
}

/// A run of mappings: virtual blocks `origin_begin..origin_begin+len` map to data blocks
/// `data_begin..data_begin+len`, all with the same `time`. `len == 1` is a single mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Map {
    /// First virtual block.
    pub origin_begin: u64,
    /// First data block.
    pub data_begin: u64,
    /// Number of blocks, at least 1.
    pub len: u64,
    /// Time stamp of every mapping in the run.
    pub time: u32,
}

/// Consumer of the event stream. Returning an error stops the walk.
pub trait MetadataVisitor {
    /// The error type of this consumer.
    type Error;
    /// Start of the pool.
    fn superblock_b(&mut self, sb: &Superblock) -> Result<(), Self::Error>;
    /// End of the pool.
    fn superblock_e(&mut self) -> Result<(), Self::Error>;
    /// Start of a device.
    fn device_b(&mut self, dev: &Device) -> Result<(), Self::Error>;
    /// End of a device.
    fn device_e(&mut self) -> Result<(), Self::Error>;
    /// A run of mappings of the current device (runs arrive in ascending `origin_begin`).
    fn map(&mut self, m: &Map) -> Result<(), Self::Error>;
    /// End of input.
    fn eof(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Merges single mappings into the maximal runs `thin_dump` prints: contiguous virtual and
/// data blocks with the same time.
#[derive(Debug, Default)]
pub struct RunBuilder {
    run: Option<Map>,
}

impl RunBuilder {
    /// Add one mapping; returns the finished run when this mapping does not extend it.
    pub fn push(&mut self, vblock: u64, data_block: u64, time: u32) -> Option<Map> {
        if let Some(r) = &mut self.run
            && r.origin_begin + r.len == vblock
            && r.data_begin + r.len == data_block
            && r.time == time
        {
            r.len += 1;
            return None;
        }
        self.run.replace(Map {
            origin_begin: vblock,
            data_begin: data_block,
            len: 1,
            time,
        })
    }

    /// The last run, if any.
    pub fn finish(&mut self) -> Option<Map> {
        self.run.take()
    }
}
