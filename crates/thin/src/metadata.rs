//! [`ThinMetadata`]: the writable dm-thin metadata the pool engine uses (kernel
//! `dm-thin-metadata.h`'s verbs; format spec sections 5, 8, 9, 10, 11, 13).
//!
//! ```text
//! superblock ─┬─ device details tree:   dev id → DeviceDetails (24 bytes)
//!             ├─ mapping tree, top:      dev id → root of the device's bottom tree
//!             │        bottom:           virtual block → BlockTime (data block << 24 | time)
//!             ├─ data space map, metadata space map (pdata)
//!             └─ held_root → copy of the superblock (metadata snapshot), sharing the trees
//! ```
//!
//! Changes live in the open transaction until [`ThinMetadata::commit`], which writes the
//! changed device details, the space maps, every new block, then the superblock (section 9.2).
//! The caller flushes the data device before committing (data first, then the metadata that
//! points at it). Everything here does metadata I/O and blocks; nothing is thread-safe by
//! itself (the engine serialises access).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use thinpool_io::BlockDevice;
use thinpool_pdata::btree::{self, PlainValue, SubtreeValue, ValueOps};
use thinpool_pdata::transaction::{MAX_METADATA_BLOCKS, SmRoot, Transaction};
use thinpool_pdata::{BLOCK_SIZE, BlockKind, block};

use crate::superblock::{
    BlockTime, DeviceDetails, METADATA_BLOCK_SECTORS, SUPERBLOCK_MAGIC, Superblock, VERSION,
};
use crate::{Error, Result};

/// A thin device id, checked to be below 2^24 (section 5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ThinId(u32);

impl ThinId {
    /// Largest id the kernel accepts.
    pub const MAX: u32 = (1 << 24) - 1;
    /// Check and wrap an id.
    pub fn new(id: u64) -> Result<Self> {
        if id > Self::MAX as u64 {
            return Err(Error::InvalidArgument(format!(
                "thin device id {id} is out of range (0..={})",
                Self::MAX
            )));
        }
        Ok(ThinId(id as u32))
    }
    /// The id as a number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for ThinId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "thin device {}", self.0)
    }
}

/// Values of bottom-level leaves: each holds one reference on a data block.
pub(crate) struct BlockTimeOps;

impl ValueOps for BlockTimeOps {
    fn value_size(&self) -> usize {
        8
    }
    fn inc(&self, tx: &mut Transaction, v: &[u8]) -> thinpool_pdata::Result<()> {
        let b = data_block_of(tx, v)?;
        tx.data_sm_mut().inc(b);
        Ok(())
    }
    fn dec(&self, tx: &mut Transaction, v: &[u8]) -> thinpool_pdata::Result<()> {
        let b = data_block_of(tx, v)?;
        tx.data_sm_mut().dec(b);
        Ok(())
    }
    fn same_refs(&self, a: &[u8], b: &[u8]) -> bool {
        block::le_u64(a, 0) >> 24 == block::le_u64(b, 0) >> 24
    }
}

fn data_block_of(tx: &Transaction, v: &[u8]) -> thinpool_pdata::Result<u64> {
    let b = block::le_u64(v, 0) >> 24;
    if b >= tx.data_sm().nr_blocks() {
        return Err(thinpool_pdata::Error::Inconsistent(format!(
            "a mapping points at data block {b}, beyond the data device ({} blocks)",
            tx.data_sm().nr_blocks()
        )));
    }
    Ok(b)
}

const DETAILS: PlainValue = PlainValue(DeviceDetails::SIZE);
const MAPPINGS: SubtreeValue<'static> = SubtreeValue(&BlockTimeOps);

/// A mapping found by [`ThinMetadata::find_block`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    /// The data block.
    pub data_block: u64,
    /// Time stamp of the mapping.
    pub time: u32,
    /// Whether the block may be shared with a snapshot (mapping time < device's snapshot
    /// time, section 15.3): a write must copy it.
    pub shared: bool,
}

/// What [`ThinMetadata::find_block`] needs of a device besides its bottom tree.
#[derive(Debug, Clone, Copy)]
struct DeviceEntry {
    id: u32,
    /// Root of the device's bottom tree (its value in the top level of the mapping tree).
    root: u64,
    /// `snapshotted_time` of its details.
    snapshotted_time: u32,
}

/// Devices remembered by [`DeviceCache`]; more are rare (one entry per volume in use).
const DEVICE_CACHE_SIZE: usize = 64;

/// The devices recently looked up, so that a lookup reads only the bottom tree instead of the
/// details tree, the top level and then the bottom tree (the I/O path looks up every block).
///
/// An entry stays right while nothing changes the device's value in the top level or its
/// details. Changes to one device's mappings (`insert_block*`, `remove_range`) replace its
/// entry and leave the others alone: they shadow nodes of the top level and may move other
/// devices' entries between nodes, but never change another device's value. Every other
/// change to devices (create, snapshot, delete, details set by restore) empties the cache.
#[derive(Debug, Default)]
struct DeviceCache(Vec<DeviceEntry>);

impl DeviceCache {
    fn get(&self, id: u32) -> Option<DeviceEntry> {
        self.0.iter().find(|e| e.id == id).copied()
    }
    fn forget(&mut self, id: u32) {
        self.0.retain(|e| e.id != id);
    }
    fn put(&mut self, e: DeviceEntry) {
        self.forget(e.id);
        if self.0.len() >= DEVICE_CACHE_SIZE {
            self.0.clear();
        }
        self.0.push(e);
    }
    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Cache sizes in 4 KiB blocks: the default of an open pool and the smallest accepted by
/// [`ThinMetadata::set_cache_limit`].
pub use thinpool_pdata::transaction::{DEFAULT_CACHE_BLOCKS, MIN_CACHE_BLOCKS};

/// The dm-thin metadata of one pool, open for reading and writing.
pub struct ThinMetadata {
    tx: Transaction,
    sb: Superblock,
    /// Device details changed in this transaction (written at commit, like the kernel).
    details: BTreeMap<u32, DeviceDetails>,
    devices: DeviceCache,
    /// Set when an operation failed part-way: the transaction may hold a half-done change and
    /// must be aborted, never committed.
    tainted: Option<String>,
    /// The roots of the metadata snapshot reserved through this handle, kept from the reserve
    /// so that the release needs no read of the held superblock copy (see
    /// [`ThinMetadata::release_metadata_snap`]).
    held: Option<HeldRoots>,
}

/// What releasing a metadata snapshot needs from its superblock copy: the held block and the
/// two roots whose reference counts the reserve raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeldRoots {
    block: u64,
    mapping_root: u64,
    details_root: u64,
}

impl ThinMetadata {
    /// Format a fresh pool on `dev` (its whole size, up to the 4 161 600-block limit) with
    /// `nr_data_blocks` data blocks of `data_block_size` sectors, and commit it.
    pub fn format(
        dev: Arc<dyn BlockDevice>,
        data_block_size: u32,
        nr_data_blocks: u64,
    ) -> Result<Self> {
        if !(128..=2_097_152).contains(&data_block_size) || !data_block_size.is_multiple_of(128) {
            return Err(Error::InvalidArgument(format!(
                "data block size {data_block_size} sectors: must be a multiple of 128 (64 KiB) between 128 and 2097152 (1 GiB)"
            )));
        }
        if nr_data_blocks > BlockTime::MAX_BLOCK {
            return Err(Error::InvalidArgument(format!(
                "{nr_data_blocks} data blocks: a mapping holds at most 2^40"
            )));
        }
        let nr_meta = (dev.size()? / BLOCK_SIZE as u64).min(MAX_METADATA_BLOCKS);
        let mut tx = Transaction::format(dev, nr_meta, nr_data_blocks)?;
        let mapping_root = btree::empty_tree(&mut tx, 8)?;
        let details_root = btree::empty_tree(&mut tx, DeviceDetails::SIZE)?;
        let sb = Superblock {
            magic: SUPERBLOCK_MAGIC,
            version: VERSION,
            mapping_root,
            details_root,
            data_block_size,
            metadata_block_size: METADATA_BLOCK_SECTORS,
            metadata_nr_blocks: nr_meta,
            ..Default::default()
        };
        let mut md = ThinMetadata {
            tx,
            sb,
            details: BTreeMap::new(),
            devices: DeviceCache::default(),
            tainted: None,
            held: None,
        };
        md.commit()?;
        Ok(md)
    }

    /// Open existing metadata (made by us, `thin_restore` or the kernel). Refuses a device
    /// that is unformatted, foreign or corrupt, naming the block and the fault.
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Self> {
        let sb = read_superblock(&*dev)?;
        let tx = Transaction::open(dev, sb.metadata_sm_root, sb.data_sm_root)?;
        let mut md = ThinMetadata {
            tx,
            sb,
            details: BTreeMap::new(),
            devices: DeviceCache::default(),
            tainted: None,
            held: None,
        };
        md.verify_top_level()?;
        Ok(md)
    }

    /// Open-time verification, cheap next to the mappings: the held copy of the superblock,
    /// and the details tree and the top level of the mapping tree, which must list the same
    /// devices. Bottom trees are checked as they are used (and by `meta check`).
    fn verify_top_level(&mut self) -> Result<()> {
        if self.sb.held_root != 0 {
            self.tx.read(self.sb.held_root, BlockKind::Superblock)?;
        }
        let mut details = Vec::new();
        btree::walk(
            &mut self.tx,
            self.sb.details_root,
            DeviceDetails::SIZE,
            &mut |k, _| {
                details.push(k);
                Ok(true)
            },
        )?;
        let mut tops = Vec::new();
        btree::walk(&mut self.tx, self.sb.mapping_root, 8, &mut |k, _| {
            tops.push(k);
            Ok(true)
        })?;
        if details != tops {
            let only_details: Vec<_> = details.iter().filter(|k| !tops.contains(k)).collect();
            let only_tops: Vec<_> = tops.iter().filter(|k| !details.contains(k)).collect();
            return Err(Error::Inconsistent(format!(
                "the device details tree (root {}) and the mapping tree (root {}) list different devices: only in details {:?}, only in mappings {:?}",
                self.sb.details_root, self.sb.mapping_root, only_details, only_tops
            )));
        }
        Ok(())
    }

    /// Reference count of a metadata block (0 = free or stale).
    pub fn metadata_block_count(&self, b: u64) -> u32 {
        if b < self.nr_metadata_blocks() {
            self.tx.meta_sm().count(b)
        } else {
            0
        }
    }

    /// The superblock as it will be committed (roots may be stale until commit).
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// Data block size in sectors.
    pub fn data_block_size(&self) -> u32 {
        self.sb.data_block_size
    }

    /// Pool transaction id.
    pub fn transaction_id(&self) -> u64 {
        self.sb.trans_id
    }

    /// Pool time (snapshot counter).
    pub fn time(&self) -> u32 {
        self.sb.time
    }

    /// Held metadata snapshot root, if any.
    pub fn held_root(&self) -> Option<u64> {
        (self.sb.held_root != 0).then_some(self.sb.held_root)
    }

    /// Whether NEEDS_CHECK is set.
    pub fn needs_check(&self) -> bool {
        self.sb.flags & crate::superblock::NEEDS_CHECK != 0
    }

    /// Set NEEDS_CHECK: written at once into the committed superblock, in place and synced,
    /// as the kernel's `dm_pool_metadata_set_needs_check` does when the pool fails in a way an
    /// abort cannot undo. The open transaction is untouched (its commit keeps the flag). Such
    /// metadata opens read-only until a check or repair clears the flag. One block write and
    /// one sync.
    pub fn set_needs_check(&mut self) -> Result<()> {
        let mut committed = read_superblock(&**self.tx.device())?;
        committed.flags |= crate::superblock::NEEDS_CHECK;
        committed.blocknr = 0;
        self.tx.write_superblock_in_place(committed.encode())?;
        self.sb.flags |= crate::superblock::NEEDS_CHECK;
        Ok(())
    }

    /// Data blocks in the pool.
    pub fn nr_data_blocks(&self) -> u64 {
        self.tx.data_sm().nr_blocks()
    }

    /// Free data blocks (in the open transaction).
    pub fn nr_free_data_blocks(&self) -> u64 {
        self.tx.data_sm().nr_free()
    }

    /// Metadata blocks in the pool.
    pub fn nr_metadata_blocks(&self) -> u64 {
        self.tx.meta_sm().nr_blocks()
    }

    /// Free metadata blocks (in the open transaction).
    pub fn nr_free_metadata_blocks(&self) -> u64 {
        self.tx.meta_sm().nr_free()
    }

    /// Data blocks that were mapped at the last commit and are free now. After the next commit
    /// they may be reused; a caller that wants to discard them (punch holes) does it between
    /// the commit and the next allocation.
    pub fn freed_data_blocks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.tx.data_sm().freed_in_transaction().collect();
        v.sort_unstable();
        v
    }

    /// Whether data block `b` was allocated in the open transaction (the last commit has it
    /// free).
    pub fn data_block_allocated_in_transaction(&self, b: u64) -> bool {
        self.tx.data_sm().allocated_in_transaction(b)
    }

    /// Reference count of a data block.
    pub fn data_block_count(&self, b: u64) -> u32 {
        if b < self.nr_data_blocks() {
            self.tx.data_sm().count(b)
        } else {
            0
        }
    }

    fn details_of(&mut self, id: ThinId) -> Result<Option<DeviceDetails>> {
        if let Some(d) = self.details.get(&id.0) {
            return Ok(Some(*d));
        }
        Ok(btree::lookup(
            &mut self.tx,
            self.sb.details_root,
            id.0 as u64,
            DeviceDetails::SIZE,
        )?
        .map(|v| DeviceDetails::decode(&v)))
    }

    /// Details of a device.
    pub fn device_details(&mut self, id: ThinId) -> Result<DeviceDetails> {
        self.details_of(id)?.ok_or(Error::NoSuchDevice(id.0))
    }

    /// Every device with its details, ascending by id.
    pub fn devices(&mut self) -> Result<Vec<(ThinId, DeviceDetails)>> {
        let mut out = BTreeMap::new();
        btree::walk(
            &mut self.tx,
            self.sb.details_root,
            DeviceDetails::SIZE,
            &mut |k, v| {
                out.insert(k as u32, DeviceDetails::decode(v));
                Ok(true)
            },
        )?;
        for (k, d) in &self.details {
            out.insert(*k, *d);
        }
        Ok(out.into_iter().map(|(k, d)| (ThinId(k), d)).collect())
    }

    fn device_root(&mut self, id: ThinId) -> Result<u64> {
        btree::lookup_u64(&mut self.tx, self.sb.mapping_root, id.0 as u64)?
            .ok_or(Error::NoSuchDevice(id.0))
    }

    fn create_thin_unguarded(&mut self, id: ThinId) -> Result<()> {
        if self.details_of(id)?.is_some() {
            return Err(Error::DeviceExists(id.0));
        }
        let root = btree::empty_tree(&mut self.tx, 8)?;
        self.add_device(id, root, 0)
    }

    /// Enter device `id` with mapping tree `root` (whose reference the caller holds) in the
    /// top level of the mapping tree, and its details stamped with the current transaction and
    /// time.
    fn add_device(&mut self, id: ThinId, root: u64, mapped_blocks: u64) -> Result<()> {
        self.devices.clear();
        self.sb.mapping_root = btree::insert(
            &mut self.tx,
            self.sb.mapping_root,
            id.0 as u64,
            &root.to_le_bytes(),
            &MAPPINGS,
        )?
        .0;
        self.details.insert(
            id.0,
            DeviceDetails {
                mapped_blocks,
                transaction_id: self.sb.trans_id,
                creation_time: self.sb.time,
                snapshotted_time: self.sb.time,
            },
        );
        Ok(())
    }

    fn create_snap_unguarded(&mut self, id: ThinId, origin: ThinId) -> Result<()> {
        if self.details_of(id)?.is_some() {
            return Err(Error::DeviceExists(id.0));
        }
        let mut od = self
            .details_of(origin)?
            .ok_or(Error::NoSuchDevice(origin.0))?;
        if self.sb.time >= 0xFF_FFFF {
            return Err(Error::InvalidArgument(
                "the pool's snapshot counter reached 2^24 - 1: mappings keep only 24 bits of time (format spec 11.4)".into(),
            ));
        }
        let root = self.device_root(origin)?;
        self.devices.clear();
        self.sb.time += 1;
        self.tx.inc_meta(root)?;
        od.snapshotted_time = self.sb.time;
        self.details.insert(origin.0, od);
        self.add_device(id, root, od.mapped_blocks)
    }

    fn delete_thin_unguarded(&mut self, id: ThinId) -> Result<()> {
        if self.details_of(id)?.is_none() {
            return Err(Error::NoSuchDevice(id.0));
        }
        self.devices.clear();
        self.sb.mapping_root =
            btree::remove(&mut self.tx, self.sb.mapping_root, id.0 as u64, &MAPPINGS)?.0;
        self.details.remove(&id.0);
        self.sb.details_root =
            btree::remove(&mut self.tx, self.sb.details_root, id.0 as u64, &DETAILS)?.0;
        Ok(())
    }

    /// The device's bottom-tree root and snapshot time, from the cache if it has them.
    fn device_entry(&mut self, id: ThinId) -> Result<DeviceEntry> {
        if let Some(e) = self.devices.get(id.0) {
            return Ok(e);
        }
        let d = self.device_details(id)?;
        let e = DeviceEntry {
            id: id.0,
            root: self.device_root(id)?,
            snapshotted_time: d.snapshotted_time,
        };
        self.devices.put(e);
        Ok(e)
    }

    /// Look up the mapping of virtual block `vblock` of device `id`. O(log n) in the device's
    /// mappings: a device looked up before (and not changed since but by its own mappings)
    /// costs one walk down its bottom tree, through the block cache.
    pub fn find_block(&mut self, id: ThinId, vblock: u64) -> Result<Option<Lookup>> {
        let e = self.device_entry(id)?;
        Ok(btree::lookup_u64(&mut self.tx, e.root, vblock)?.map(|v| {
            let bt = BlockTime::unpack(v);
            Lookup {
                data_block: bt.block,
                time: bt.time,
                shared: e.snapshotted_time > bt.time,
            }
        }))
    }

    fn alloc_data_block_unguarded(&mut self) -> Result<Option<u64>> {
        Ok(self.tx.data_sm_mut().alloc())
    }

    fn release_data_block_unguarded(&mut self, b: u64) -> Result<()> {
        self.check_data_block(b)?;
        self.tx.data_sm_mut().dec(b);
        Ok(())
    }

    fn inc_data_block_unguarded(&mut self, b: u64) -> Result<()> {
        self.check_data_block(b)?;
        self.tx.data_sm_mut().inc(b);
        Ok(())
    }

    fn check_data_block(&self, b: u64) -> Result<()> {
        if b >= self.nr_data_blocks() {
            return Err(Error::InvalidArgument(format!(
                "data block {b} is beyond the data device ({} blocks)",
                self.nr_data_blocks()
            )));
        }
        Ok(())
    }

    /// Map `vblock` of device `id` to `data_block` at the current time. The caller's reference
    /// on `data_block` passes to the mapping; a replaced mapping drops its reference.
    pub fn insert_block(&mut self, id: ThinId, vblock: u64, data_block: u64) -> Result<()> {
        let time = self.sb.time;
        self.insert_block_with_time(id, vblock, data_block, time)
    }

    fn insert_block_with_time_unguarded(
        &mut self,
        id: ThinId,
        vblock: u64,
        data_block: u64,
        time: u32,
    ) -> Result<()> {
        self.check_data_block(data_block)?;
        let mut d = self.device_details(id)?;
        let value = BlockTime {
            block: data_block,
            time,
        }
        .pack()
        .to_le_bytes();
        let mut is_new = false;
        let mut missing = false;
        let mut new_root = 0;
        // Until the change is through, the device's cached root may be stale.
        self.devices.forget(id.0);
        self.sb.mapping_root = btree::update(
            &mut self.tx,
            self.sb.mapping_root,
            id.0 as u64,
            &MAPPINGS,
            &mut |tx, old| {
                let Some(old) = old else {
                    missing = true;
                    return Ok(btree::empty_tree(tx, 8)?.to_le_bytes().to_vec());
                };
                let root = block::le_u64(old, 0);
                let (root, new) = btree::insert(tx, root, vblock, &value, &BlockTimeOps)?;
                is_new = new;
                new_root = root;
                Ok(root.to_le_bytes().to_vec())
            },
        )?;
        if missing {
            return Err(Error::Inconsistent(format!(
                "{id} has details but no mapping tree"
            )));
        }
        if is_new {
            d.mapped_blocks += 1;
            self.details.insert(id.0, d);
        }
        self.devices.put(DeviceEntry {
            id: id.0,
            root: new_root,
            snapshotted_time: d.snapshotted_time,
        });
        Ok(())
    }

    fn remove_block_unguarded(&mut self, id: ThinId, vblock: u64) -> Result<bool> {
        Ok(self.remove_range(id, vblock, vblock.saturating_add(1))? == 1)
    }

    fn remove_range_unguarded(&mut self, id: ThinId, begin: u64, end: u64) -> Result<u64> {
        let mut d = self.device_details(id)?;
        let root = self.device_root(id)?;
        let mut keys = Vec::new();
        btree::walk_from(&mut self.tx, root, begin, 8, &mut |k, _| {
            if k >= end {
                return Ok(false);
            }
            keys.push(k);
            Ok(true)
        })?;
        if keys.is_empty() {
            return Ok(0);
        }
        let n = keys.len() as u64;
        let mut new_root = 0;
        self.devices.forget(id.0);
        self.sb.mapping_root = btree::update(
            &mut self.tx,
            self.sb.mapping_root,
            id.0 as u64,
            &MAPPINGS,
            &mut |tx, old| {
                let mut root = block::le_u64(old.expect("device root looked up above"), 0);
                for &k in &keys {
                    root = btree::remove(tx, root, k, &BlockTimeOps)?.0;
                }
                new_root = root;
                Ok(root.to_le_bytes().to_vec())
            },
        )?;
        d.mapped_blocks = d.mapped_blocks.saturating_sub(n);
        self.details.insert(id.0, d);
        self.devices.put(DeviceEntry {
            id: id.0,
            root: new_root,
            snapshotted_time: d.snapshotted_time,
        });
        Ok(n)
    }

    /// Visit the mappings of device `id` from virtual block `start`, in order, as
    /// `(vblock, data block, time)`; the visitor returns `false` to stop.
    pub fn mappings(
        &mut self,
        id: ThinId,
        start: u64,
        f: &mut dyn FnMut(u64, u64, u32) -> bool,
    ) -> Result<()> {
        let root = self.device_root(id)?;
        btree::walk_from(&mut self.tx, root, start, 8, &mut |k, v| {
            let bt = BlockTime::unpack(block::le_u64(v, 0));
            Ok(f(k, bt.block, bt.time))
        })?;
        Ok(())
    }

    /// The highest mapped virtual block of a device (one node per tree level), or `None`.
    pub fn highest_mapped_block(&mut self, id: ThinId) -> Result<Option<u64>> {
        let root = self.device_root(id)?;
        Ok(btree::last_key(&mut self.tx, root, 8)?)
    }

    fn set_transaction_id_unguarded(&mut self, old: u64, new: u64) -> Result<()> {
        if self.sb.trans_id != old {
            return Err(Error::InvalidArgument(format!(
                "transaction id is {}, not {old}",
                self.sb.trans_id
            )));
        }
        self.sb.trans_id = new;
        Ok(())
    }

    /// Set superblock fields restore copies from XML (time, flags, version).
    pub(crate) fn set_restored_fields(&mut self, time: u32, flags: u32, version: u32) {
        self.sb.time = time;
        self.sb.flags = flags;
        self.sb.version = version;
    }

    /// Set a device's details as a whole (restore).
    pub(crate) fn set_details(&mut self, id: ThinId, d: DeviceDetails) {
        self.devices.clear();
        self.details.insert(id.0, d);
    }

    fn reserve_metadata_snap_unguarded(&mut self) -> Result<u64> {
        if self.sb.held_root != 0 {
            return Err(Error::MetadataSnap(format!(
                "a metadata snapshot is already held at block {}",
                self.sb.held_root
            )));
        }
        self.commit()?;
        let h = self.tx.new_block(BlockKind::Superblock)?;
        let mut copy = self.sb.clone();
        copy.data_sm_root = SmRoot::default();
        copy.metadata_sm_root = SmRoot::default();
        copy.held_root = 0;
        copy.blocknr = h;
        *self.tx.write(h)? = *copy.encode();
        self.tx.set_kind(h, BlockKind::Superblock)?;
        self.tx.inc_meta(self.sb.mapping_root)?;
        self.tx.inc_meta(self.sb.details_root)?;
        self.sb.held_root = h;
        self.held = Some(HeldRoots {
            block: h,
            mapping_root: self.sb.mapping_root,
            details_root: self.sb.details_root,
        });
        self.commit()?;
        Ok(h)
    }

    fn release_metadata_snap_unguarded(&mut self) -> Result<()> {
        let h = self.sb.held_root;
        if h == 0 {
            return Err(Error::MetadataSnap("no metadata snapshot is held".into()));
        }
        // The roots come from the reserve when it was made through this handle: the held
        // superblock copy is read only for a snapshot found held at open. So a damaged copy
        // (nothing but the held snapshot reaches it) does not stop its own release, which
        // frees it; the kernel reads the copy here and would fail the release.
        let held = match self.held.filter(|r| r.block == h) {
            Some(r) => r,
            None => {
                let blk = self.tx.read(h, BlockKind::Superblock)?;
                let sb = Superblock::decode(&blk[..]);
                HeldRoots {
                    block: h,
                    mapping_root: sb.mapping_root,
                    details_root: sb.details_root,
                }
            }
        };
        // (Deleting the frozen trees changes no device's values; forgetting is just cheap.)
        self.devices.clear();
        self.sb.held_root = 0;
        btree::delete_tree(&mut self.tx, held.mapping_root, &MAPPINGS)?;
        btree::delete_tree(&mut self.tx, held.details_root, &DETAILS)?;
        self.tx.dec_meta(h)?;
        self.commit()?;
        self.held = None;
        Ok(())
    }

    fn resize_data_dev_unguarded(&mut self, nr_blocks: u64) -> Result<()> {
        if self.needs_check() {
            return Err(Error::InvalidArgument(
                "NEEDS_CHECK is set: check the metadata before growing".into(),
            ));
        }
        Ok(self.tx.resize_data(nr_blocks)?)
    }

    fn resize_metadata_dev_unguarded(&mut self, nr_blocks: u64) -> Result<()> {
        if self.needs_check() {
            return Err(Error::InvalidArgument(
                "NEEDS_CHECK is set: check the metadata before growing".into(),
            ));
        }
        Ok(self.tx.resize_metadata(nr_blocks)?)
    }

    // The changes below are the kernel's verbs. Each is guarded: an error that may have left a
    // half-done change in the open transaction (an I/O error, damaged metadata, metadata space
    // exhausted part-way through a B-tree change) taints the transaction, which then refuses to
    // commit until [`ThinMetadata::abort`] drops it. Errors raised before anything changes
    // (no such device, bad argument, no free data block) do not taint.

    /// Create an empty thin device (`create_thin`).
    pub fn create_thin(&mut self, id: ThinId) -> Result<()> {
        let r = self.create_thin_unguarded(id);
        self.taint(r)
    }

    /// Snapshot `origin` as `id` (`create_snap`): O(1), the new device shares the origin's
    /// mapping tree; the pool time advances.
    pub fn create_snap(&mut self, id: ThinId, origin: ThinId) -> Result<()> {
        let r = self.create_snap_unguarded(id, origin);
        self.taint(r)
    }

    /// Delete a device; data blocks no longer referenced become free.
    pub fn delete_thin(&mut self, id: ThinId) -> Result<()> {
        let r = self.delete_thin_unguarded(id);
        self.taint(r)
    }

    /// Allocate a data block (count 1), or `None` when the pool is full. The caller maps it
    /// with [`ThinMetadata::insert_block`], which takes over this reference.
    pub fn alloc_data_block(&mut self) -> Result<Option<u64>> {
        let r = self.alloc_data_block_unguarded();
        self.taint(r)
    }

    /// Drop a reference on a data block the caller holds (an allocation it will not use).
    pub fn release_data_block(&mut self, b: u64) -> Result<()> {
        let r = self.release_data_block_unguarded(b);
        self.taint(r)
    }

    /// Take one more reference on a data block (restore and repair map blocks they did not
    /// allocate).
    pub fn inc_data_block(&mut self, b: u64) -> Result<()> {
        let r = self.inc_data_block_unguarded(b);
        self.taint(r)
    }

    /// [`ThinMetadata::insert_block`] with an explicit time stamp (restore).
    pub fn insert_block_with_time(
        &mut self,
        id: ThinId,
        vblock: u64,
        data_block: u64,
        time: u32,
    ) -> Result<()> {
        let r = self.insert_block_with_time_unguarded(id, vblock, data_block, time);
        self.taint(r)
    }

    /// Unmap `vblock` of device `id`; returns whether it was mapped. Its data block loses a
    /// reference.
    pub fn remove_block(&mut self, id: ThinId, vblock: u64) -> Result<bool> {
        let r = self.remove_block_unguarded(id, vblock);
        self.taint(r)
    }

    /// Unmap every block in `begin..end` of device `id`; returns how many were mapped.
    pub fn remove_range(&mut self, id: ThinId, begin: u64, end: u64) -> Result<u64> {
        let r = self.remove_range_unguarded(id, begin, end);
        self.taint(r)
    }

    /// Compare-and-swap the pool transaction id (`set_transaction_id`).
    pub fn set_transaction_id(&mut self, old: u64, new: u64) -> Result<()> {
        let r = self.set_transaction_id_unguarded(old, new);
        self.taint(r)
    }

    /// Commit, then keep a frozen copy of the trees readable at the held root
    /// (`reserve_metadata_snap`, section 10). The change is committed too.
    pub fn reserve_metadata_snap(&mut self) -> Result<u64> {
        let r = self.reserve_metadata_snap_unguarded();
        self.taint(r)
    }

    /// Drop the held metadata snapshot (`release_metadata_snap`) and commit.
    pub fn release_metadata_snap(&mut self) -> Result<()> {
        let r = self.release_metadata_snap_unguarded();
        self.taint(r)
    }

    /// Grow the data space map to `nr_blocks` (section 11.2). Shrinking is refused.
    pub fn resize_data_dev(&mut self, nr_blocks: u64) -> Result<()> {
        let r = self.resize_data_dev_unguarded(nr_blocks);
        self.taint(r)
    }

    /// Grow the metadata space map to `nr_blocks` (the device must have grown first).
    pub fn resize_metadata_dev(&mut self, nr_blocks: u64) -> Result<()> {
        let r = self.resize_metadata_dev_unguarded(nr_blocks);
        self.taint(r)
    }

    fn taint<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r
            && may_have_changed(e)
            && self.tainted.is_none()
        {
            self.tainted = Some(e.to_string());
        }
        r
    }

    /// Why the open transaction must be aborted (an operation failed part-way), if it must.
    pub fn tainted(&self) -> Option<&str> {
        self.tainted.as_deref()
    }

    /// Drop the open transaction and reopen at the last committed superblock, as the kernel's
    /// `dm_pool_abort_metadata`: every change since the last commit is forgotten, the space
    /// maps and trees are read again from the device. Blocks written ahead of the commit lie
    /// in space the committed superblock does not reach, so nothing on disk needs undoing.
    /// Reads the superblock, the space maps and the top of the trees (O(space-map size)).
    /// An error means the committed metadata cannot be read back: the pool has failed.
    pub fn abort(&mut self) -> Result<()> {
        let dev = self.tx.device().clone();
        let limit = self.tx.dirty_limit();
        let cache = self.tx.cache_limit();
        // The roots kept from a reserve stay true while the reopened superblock names the
        // same held block (the reserve was committed).
        let held = self.held;
        *self = ThinMetadata::open(dev)?;
        self.held = held.filter(|r| r.block == self.sb.held_root);
        self.tx.set_dirty_limit(limit);
        self.tx.set_cache_limit(cache)?;
        Ok(())
    }

    /// Commit the open transaction in the kernel's order (section 9.2): device details, space
    /// maps, every new block, flush, superblock, flush. The data device must have been flushed
    /// by the caller. After an error the handle refuses further writes.
    pub fn commit(&mut self) -> Result<()> {
        if let Some(why) = &self.tainted {
            return Err(Error::Tainted(why.clone()));
        }
        let r = self.commit_unguarded();
        self.taint(r)
    }

    fn commit_unguarded(&mut self) -> Result<()> {
        let details = std::mem::take(&mut self.details);
        for (id, d) in &details {
            self.sb.details_root = btree::insert(
                &mut self.tx,
                self.sb.details_root,
                *id as u64,
                &d.encode(),
                &DETAILS,
            )?
            .0;
        }
        self.tx.commit_space_maps()?;
        let (data_root, meta_root) = self.tx.sm_roots();
        self.sb.data_sm_root = data_root;
        self.sb.metadata_sm_root = meta_root;
        self.sb.blocknr = 0;
        self.tx.write_and_flush(self.sb.encode())?;
        Ok(())
    }

    /// How many changed metadata blocks stay in memory before new nodes are written back
    /// early (see `Transaction::set_dirty_limit`).
    pub fn set_dirty_limit(&mut self, blocks: usize) {
        self.tx.set_dirty_limit(blocks);
    }

    /// Bound the cache of clean metadata blocks to `blocks` 4 KiB blocks (default
    /// `thinpool_pdata::transaction::DEFAULT_CACHE_BLOCKS`); refused below
    /// `MIN_CACHE_BLOCKS`. Kept across [`ThinMetadata::abort`].
    pub fn set_cache_limit(&mut self, blocks: usize) -> Result<()> {
        Ok(self.tx.set_cache_limit(blocks)?)
    }

    /// Blocks in the clean-block cache now, and hits and misses since the open.
    pub fn cache_usage(&mut self) -> (usize, thinpool_pdata::cache::CacheStats) {
        let r = self.tx.reader();
        (r.cached_blocks(), r.cache_stats())
    }

    /// Number of metadata blocks changed in the open transaction.
    pub fn nr_dirty_blocks(&self) -> usize {
        self.tx.nr_dirty()
    }
}

/// Whether an error of a metadata change may have struck in the middle of it (an I/O error,
/// damaged metadata, metadata space exhausted part-way). Refusals (no such device, a bad
/// argument, no free data block) are checked before anything changes.
fn may_have_changed(e: &Error) -> bool {
    match e {
        Error::Pdata(p) => !matches!(p, thinpool_pdata::Error::InvalidArgument(_)),
        Error::Io(_) | Error::Inconsistent(_) => true,
        _ => false,
    }
}

/// Read and validate the superblock of a metadata device, refusing unformatted, foreign or
/// corrupt ones with a message that says which.
pub fn read_superblock(dev: &dyn BlockDevice) -> Result<Superblock> {
    let size = dev.size()?;
    if size < BLOCK_SIZE as u64 {
        return Err(Error::BadSuperblock(format!(
            "{} is {size} bytes, too small for dm-thin metadata",
            dev.name()
        )));
    }
    let mut buf = [0u8; BLOCK_SIZE];
    dev.read_at(&mut buf, 0)?;
    if buf.iter().all(|&b| b == 0) {
        return Err(Error::BadSuperblock(format!(
            "{} is not formatted (block 0 is all zeros)",
            dev.name()
        )));
    }
    block::validate(&buf, BlockKind::Superblock, 0)
        .map_err(|f| Error::BadSuperblock(format!("{} on {}", f, dev.name())))?;
    let sb = Superblock::decode(&buf);
    if let Some(fault) = sb.fault() {
        return Err(Error::BadSuperblock(format!("{fault} on {}", dev.name())));
    }
    let nr = sb.metadata_sm_root.nr_blocks;
    for (what, b) in [
        ("data_mapping_root", sb.mapping_root),
        ("device_details_root", sb.details_root),
        ("metadata space map index", sb.metadata_sm_root.bitmap_root),
        (
            "metadata ref-count root",
            sb.metadata_sm_root.ref_count_root,
        ),
        ("data space map index", sb.data_sm_root.bitmap_root),
        ("data ref-count root", sb.data_sm_root.ref_count_root),
    ] {
        if b == 0 || b >= nr {
            return Err(Error::BadSuperblock(format!(
                "{what} is block {b}, outside the metadata area (1..{nr}) on {}",
                dev.name()
            )));
        }
    }
    if sb.held_root >= nr {
        return Err(Error::BadSuperblock(format!(
            "held_root is block {}, outside the metadata area (1..{nr})",
            sb.held_root
        )));
    }
    Ok(sb)
}
