//! The transaction manager: block cache, shadowing and commit (format spec sections 8 and 9).
//!
//! A [`Transaction`] owns the metadata device, both space maps and the blocks written since the
//! last commit. The rules that make the metadata crash-safe live here:
//!
//! - a block reachable from the committed superblock is never written: [`Transaction::shadow`]
//!   gives a writable copy (or the block itself if it was allocated in this transaction and has
//!   one reference);
//! - a block freed in this transaction is not reused before the commit (space_map);
//! - [`Transaction::commit`] writes the space maps (shadowing their own blocks until nothing
//!   changes), then every new block, flushes, then the superblock, and flushes again.
//!
//! Blocks allocated in the transaction may be written back to the device early when many are
//! dirty: they are unreachable from the committed superblock, so this is safe at any time.

use std::collections::BTreeMap;
use std::sync::Arc;

use thinpool_io::BlockDevice;

use crate::block::{
    BLOCK_SIZE, Block, BlockKind, MetaBlock, le_u32, le_u64, put_u32, put_u64, stamp, validate,
};
use crate::btree::{self, PlainValue};
use crate::cache::{BlockCache, BlockMap, CacheStats};
use crate::space_map::{ENTRIES_PER_BITMAP, SpaceMap};
use crate::{Error, Result};

/// Bitmaps that fit the metadata index block (section 6.5).
pub const MAX_METADATA_BITMAPS: usize = 255;
/// Largest metadata device in blocks.
pub const MAX_METADATA_BLOCKS: u64 = MAX_METADATA_BITMAPS as u64 * ENTRIES_PER_BITMAP;
/// Size of an encoded space-map root (the rest of the 128-byte superblock field is zero).
pub const SM_ROOT_SIZE: usize = 32;
const DIRTY_WRITEBACK: usize = 16384;
/// Cache size of an open transaction (a pool) unless set otherwise: 1024 blocks, 4 MiB (with
/// a million mappings, `bench/memory` measured the daemon at 16.7 MiB resident after random
/// I/O with it, 20.9 MiB with 8 MiB, 42 MiB with 256 MiB).
pub const DEFAULT_CACHE_BLOCKS: usize = 1024;
/// The smallest cache a transaction accepts: 64 blocks (256 KiB), a few times the deepest
/// path through both levels of a large mapping tree plus the space-map trees.
pub const MIN_CACHE_BLOCKS: usize = 64;
/// Cache size of a stand-alone [`BlockReader`] (tools that walk a whole pool once and exit):
/// 65536 blocks, 256 MiB at most.
pub const TOOL_CACHE_BLOCKS: usize = 65536;

/// A space-map root (section 6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmRoot {
    /// Blocks covered.
    pub nr_blocks: u64,
    /// Blocks with a nonzero count.
    pub nr_allocated: u64,
    /// Data: root of the index btree; metadata: the index block.
    pub bitmap_root: u64,
    /// Root of the ref-count btree.
    pub ref_count_root: u64,
}

impl SmRoot {
    /// Decode from the first 32 bytes of a superblock field.
    pub fn decode(b: &[u8]) -> Self {
        SmRoot {
            nr_blocks: le_u64(b, 0),
            nr_allocated: le_u64(b, 8),
            bitmap_root: le_u64(b, 16),
            ref_count_root: le_u64(b, 24),
        }
    }
    /// Encode into the first 32 bytes of a superblock field.
    pub fn encode(&self, b: &mut [u8]) {
        put_u64(b, 0, self.nr_blocks);
        put_u64(b, 8, self.nr_allocated);
        put_u64(b, 16, self.bitmap_root);
        put_u64(b, 24, self.ref_count_root);
    }
}

/// An index entry (section 6.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexEntry {
    /// Block holding the bitmap.
    pub blocknr: u64,
    /// Free entries (hint).
    pub nr_free: u32,
    /// No free entry below this one (hint).
    pub none_free_before: u32,
}

impl IndexEntry {
    /// Encoded size.
    pub const SIZE: usize = 16;
    /// Decode 16 bytes.
    pub fn decode(b: &[u8]) -> Self {
        IndexEntry {
            blocknr: le_u64(b, 0),
            nr_free: le_u32(b, 8),
            none_free_before: le_u32(b, 12),
        }
    }
    /// Encode 16 bytes.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        put_u64(&mut b, 0, self.blocknr);
        put_u32(&mut b, 8, self.nr_free);
        put_u32(&mut b, 12, self.none_free_before);
        b
    }
}

#[derive(Debug, Default, Clone)]
struct SmLayout {
    bitmaps: Vec<u64>,
    index_root: u64,
    ref_count_root: u64,
}

/// Reads validated metadata blocks through a bounded cache ([`BlockCache`]). Used by the
/// transaction and, on its own, by read-only tools.
pub struct BlockReader {
    dev: Arc<dyn BlockDevice>,
    cache: BlockCache,
    nr_blocks: u64,
}

impl BlockReader {
    /// A reader over `dev` with the tools' cache size ([`TOOL_CACHE_BLOCKS`]).
    pub fn new(dev: Arc<dyn BlockDevice>) -> Result<Self> {
        Self::with_cache(dev, TOOL_CACHE_BLOCKS)
    }

    /// A reader over `dev` caching at most `cache_blocks` blocks (at least one).
    pub fn with_cache(dev: Arc<dyn BlockDevice>, cache_blocks: usize) -> Result<Self> {
        let nr_blocks = dev.size()? / BLOCK_SIZE as u64;
        Ok(BlockReader {
            dev,
            cache: BlockCache::new(cache_blocks),
            nr_blocks,
        })
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// Blocks on the device.
    pub fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    /// The most blocks the cache holds.
    pub fn cache_capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// Blocks cached now.
    pub fn cached_blocks(&self) -> usize {
        self.cache.len()
    }

    /// Change the cache's capacity (shrinking evicts at once).
    pub fn set_cache_capacity(&mut self, blocks: usize) {
        self.cache.set_capacity(blocks);
    }

    /// Cache hits, misses and evictions since the reader was made.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Read block `b` without validation (for tools that identify unknown blocks).
    pub fn read_raw(&self, b: u64) -> Result<Box<Block>> {
        if b >= self.nr_blocks {
            return Err(Error::OutOfRange {
                block: MetaBlock(b),
                nr_blocks: self.nr_blocks,
            });
        }
        let mut buf = Box::new([0u8; BLOCK_SIZE]);
        self.dev.read_at(&mut buf[..], b * BLOCK_SIZE as u64)?;
        Ok(buf)
    }

    /// Read block `b` and check its checksum (with `kind`'s salt) and block number.
    pub fn read(&mut self, b: u64, kind: BlockKind) -> Result<Arc<Block>> {
        if let Some(blk) = self.cache.get(b) {
            return Ok(blk);
        }
        let buf = self.read_raw(b)?;
        validate(&buf[..], kind, b).map_err(|fault| Error::Corrupt {
            block: MetaBlock(b),
            fault,
        })?;
        let blk: Arc<Block> = Arc::from(buf);
        self.cache.insert(b, blk.clone());
        Ok(blk)
    }

    fn insert_clean(&mut self, b: u64, blk: Arc<Block>) {
        self.cache.insert(b, blk);
    }

    fn forget(&mut self, b: u64) {
        self.cache.remove(b);
    }
}

/// The open transaction over a metadata device: both space maps, new blocks, commit.
pub struct Transaction {
    reader: BlockReader,
    dirty: BlockMap<(BlockKind, Arc<Block>)>,
    meta_sm: SpaceMap,
    data_sm: SpaceMap,
    meta_layout: SmLayout,
    data_layout: SmLayout,
    /// Dirty B-tree nodes kept in memory before they are written back early.
    dirty_limit: usize,
    /// Set when a commit failed part-way: nothing more may be written until reopen.
    poisoned: bool,
}

impl Transaction {
    /// Format a fresh metadata space map over `nr_metadata_blocks` blocks (block 0 reserved for
    /// the superblock) and an empty data space map of `nr_data_blocks`. Nothing is written until
    /// [`Transaction::commit`].
    pub fn format(
        dev: Arc<dyn BlockDevice>,
        nr_metadata_blocks: u64,
        nr_data_blocks: u64,
    ) -> Result<Self> {
        let reader = BlockReader::with_cache(dev, DEFAULT_CACHE_BLOCKS)?;
        let nr_metadata_blocks = nr_metadata_blocks.min(MAX_METADATA_BLOCKS);
        if reader.nr_blocks() < nr_metadata_blocks || nr_metadata_blocks < 16 {
            return Err(Error::InvalidArgument(format!(
                "metadata device {} has {} blocks, need at least {}",
                reader.dev.name(),
                reader.nr_blocks(),
                nr_metadata_blocks.max(16)
            )));
        }
        let mut meta_sm = SpaceMap::new(nr_metadata_blocks);
        meta_sm.set(0, 1);
        let mut tx = Transaction {
            reader,
            dirty: BlockMap::default(),
            meta_layout: SmLayout {
                bitmaps: vec![0; meta_sm.nr_bitmaps()],
                ..Default::default()
            },
            meta_sm,
            data_sm: SpaceMap::new(nr_data_blocks),
            data_layout: SmLayout::default(),
            poisoned: false,
            dirty_limit: DIRTY_WRITEBACK,
        };
        tx.data_layout.bitmaps = vec![0; tx.data_sm.nr_bitmaps()];
        tx.meta_layout.ref_count_root = btree::empty_tree(&mut tx, 4)?;
        tx.data_layout.ref_count_root = btree::empty_tree(&mut tx, 4)?;
        tx.data_layout.index_root = btree::empty_tree(&mut tx, IndexEntry::SIZE)?;
        Ok(tx)
    }

    /// Open the space maps named by a committed superblock.
    pub fn open(dev: Arc<dyn BlockDevice>, meta_root: SmRoot, data_root: SmRoot) -> Result<Self> {
        let mut reader = BlockReader::with_cache(dev, DEFAULT_CACHE_BLOCKS)?;
        if meta_root.nr_blocks > reader.nr_blocks() || meta_root.nr_blocks > MAX_METADATA_BLOCKS {
            return Err(Error::Inconsistent(format!(
                "the metadata space map covers {} blocks but the device {} has {}",
                meta_root.nr_blocks,
                reader.dev.name(),
                reader.nr_blocks()
            )));
        }
        // Every data bitmap needs a metadata block: a larger count is corruption, and would
        // otherwise make us allocate a huge in-memory map.
        let data_bitmaps = data_root.nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
        if data_bitmaps > meta_root.nr_blocks || data_root.nr_blocks >= 1 << 40 {
            return Err(Error::Inconsistent(format!(
                "the data space map claims {} blocks ({data_bitmaps} bitmaps), more than {} metadata blocks can describe",
                data_root.nr_blocks, meta_root.nr_blocks
            )));
        }
        // Metadata space map: the index block, then its bitmaps.
        let mut meta_sm = SpaceMap::new(meta_root.nr_blocks);
        let check_ptr = |b: u64, what: &str| -> Result<()> {
            if b == 0 || b >= meta_root.nr_blocks {
                Err(Error::Inconsistent(format!(
                    "{what} points at block {b}, outside the metadata device (1..{})",
                    meta_root.nr_blocks
                )))
            } else {
                Ok(())
            }
        };
        check_ptr(meta_root.bitmap_root, "the metadata space map's index")?;
        let index = reader.read(meta_root.bitmap_root, BlockKind::Index)?;
        let mut meta_layout = SmLayout {
            index_root: meta_root.bitmap_root,
            ref_count_root: meta_root.ref_count_root,
            bitmaps: Vec::new(),
        };
        for i in 0..meta_sm.nr_bitmaps() {
            let e = IndexEntry::decode(&index[16 + i * 16..]);
            check_ptr(e.blocknr, &format!("metadata bitmap {i}"))?;
            let bm = reader.read(e.blocknr, BlockKind::Bitmap)?;
            meta_sm.decode_bitmap(i, &bm[16..]);
            meta_layout.bitmaps.push(e.blocknr);
        }
        let mut tx = Transaction {
            reader,
            dirty: BlockMap::default(),
            meta_sm,
            data_sm: SpaceMap::new(data_root.nr_blocks),
            meta_layout,
            data_layout: SmLayout {
                bitmaps: Vec::new(),
                index_root: data_root.bitmap_root,
                ref_count_root: data_root.ref_count_root,
            },
            poisoned: false,
            dirty_limit: DIRTY_WRITEBACK,
        };
        check_ptr(meta_root.ref_count_root, "the metadata ref-count tree")?;
        let overflow = tx.load_overflow(meta_root.ref_count_root)?;
        tx.meta_sm.finish_load(overflow);
        // Data space map: index btree, bitmaps, ref-count tree.
        check_ptr(data_root.bitmap_root, "the data space map's index tree")?;
        check_ptr(data_root.ref_count_root, "the data ref-count tree")?;
        let mut entries = Vec::new();
        btree::walk(
            &mut tx,
            data_root.bitmap_root,
            IndexEntry::SIZE,
            &mut |k, v| {
                entries.push((k, IndexEntry::decode(v)));
                Ok(true)
            },
        )?;
        let nr_bitmaps = tx.data_sm.nr_bitmaps();
        if entries.len() != nr_bitmaps
            || entries.iter().enumerate().any(|(i, (k, _))| *k != i as u64)
        {
            return Err(Error::Inconsistent(format!(
                "the data space map index has {} entries, expected bitmaps 0..{}",
                entries.len(),
                nr_bitmaps
            )));
        }
        for (i, (_, e)) in entries.iter().enumerate() {
            check_ptr(e.blocknr, &format!("data bitmap {i}"))?;
            let bm = tx.reader.read(e.blocknr, BlockKind::Bitmap)?;
            tx.data_sm.decode_bitmap(i, &bm[16..]);
            tx.data_layout.bitmaps.push(e.blocknr);
        }
        let overflow = tx.load_overflow(data_root.ref_count_root)?;
        tx.data_sm.finish_load(overflow);
        Ok(tx)
    }

    fn load_overflow(&mut self, root: u64) -> Result<BTreeMap<u64, u32>> {
        let mut m = BTreeMap::new();
        btree::walk(self, root, 4, &mut |k, v| {
            m.insert(k, le_u32(v, 0));
            Ok(true)
        })?;
        Ok(m)
    }

    /// The metadata space map.
    pub fn meta_sm(&self) -> &SpaceMap {
        &self.meta_sm
    }

    /// The data space map.
    pub fn data_sm(&self) -> &SpaceMap {
        &self.data_sm
    }

    /// The data space map, for reference changes (allocation, inc, dec).
    pub fn data_sm_mut(&mut self) -> &mut SpaceMap {
        &mut self.data_sm
    }

    /// The block reader (device, cache).
    pub fn reader(&mut self) -> &mut BlockReader {
        &mut self.reader
    }

    /// Read a block of the given kind: this transaction's version if it has one, else the
    /// validated block from the device.
    pub fn read(&mut self, b: u64, kind: BlockKind) -> Result<Arc<Block>> {
        if let Some((_, blk)) = self.dirty.get(&b) {
            return Ok(blk.clone());
        }
        if b == 0 || b >= self.meta_sm.nr_blocks() {
            return Err(Error::Inconsistent(format!(
                "a pointer to block {b} leads outside the metadata area (1..{})",
                self.meta_sm.nr_blocks()
            )));
        }
        self.reader.read(b, kind)
    }

    /// Read a B-tree node and check its shape (value size as expected).
    pub fn read_node(&mut self, b: u64, value_size: usize) -> Result<Arc<Block>> {
        let blk = self.read(b, BlockKind::Node)?;
        btree::checked_node(blk, b, value_size)
    }

    /// Allocate a fresh metadata block (zeroed buffer of `kind`) in this transaction.
    pub fn new_block(&mut self, kind: BlockKind) -> Result<u64> {
        if self.poisoned {
            return Err(Error::ReadOnly);
        }
        let b = self.meta_sm.alloc().ok_or(Error::NoMetadataSpace {
            nr_blocks: self.meta_sm.nr_blocks(),
        })?;
        self.maybe_writeback()?;
        self.reader.forget(b);
        self.dirty.insert(b, (kind, Arc::new([0u8; BLOCK_SIZE])));
        Ok(b)
    }

    /// A writable buffer of a block allocated in this transaction.
    pub fn write(&mut self, b: u64) -> Result<&mut Block> {
        debug_assert!(self.meta_sm.allocated_in_transaction(b));
        if !self.dirty.contains_key(&b) {
            // Written back early: bring it back (it is still this transaction's block).
            let blk = self.reader.read(b, BlockKind::Node)?;
            self.dirty.insert(b, (BlockKind::Node, blk));
        }
        let (_, blk) = self.dirty.get_mut(&b).expect("inserted above");
        Ok(Arc::make_mut(blk))
    }

    /// Shadow block `b` for modification (section 8). Returns the writable block and whether
    /// `b` was shared (count > 1), in which case the caller must take references on everything
    /// the copy points to.
    pub fn shadow(&mut self, b: u64, kind: BlockKind) -> Result<(u64, bool)> {
        let count = self.meta_count(b)?;
        if count == 1 && self.meta_sm.allocated_in_transaction(b) {
            return Ok((b, false));
        }
        let src = self.read(b, kind)?;
        let nb = self.new_block(kind)?;
        *self.write(nb)? = *src;
        self.dec_meta(b)?;
        Ok((nb, count > 1))
    }

    fn check_meta(&self, b: u64) -> Result<()> {
        if b == 0 || b >= self.meta_sm.nr_blocks() {
            return Err(Error::Inconsistent(format!(
                "a reference to block {b} leads outside the metadata area (1..{})",
                self.meta_sm.nr_blocks()
            )));
        }
        Ok(())
    }

    /// Take a reference on metadata block `b`.
    pub fn inc_meta(&mut self, b: u64) -> Result<()> {
        self.check_meta(b)?;
        self.meta_sm.inc(b);
        Ok(())
    }

    /// Drop a reference on metadata block `b`; a block that becomes free leaves the dirty set.
    pub fn dec_meta(&mut self, b: u64) -> Result<u32> {
        self.check_meta(b)?;
        let c = self.meta_sm.dec(b);
        if c == 0 {
            self.dirty.remove(&b);
        }
        Ok(c)
    }

    /// Count of metadata block `b`.
    pub fn meta_count(&self, b: u64) -> Result<u32> {
        self.check_meta(b)?;
        Ok(self.meta_sm.count(b))
    }

    /// How many changed blocks stay in memory before new B-tree nodes are written back to the
    /// device ahead of the commit (default 16384, 64 MiB). Early write-back is safe: those
    /// blocks are unreachable from the committed superblock.
    pub fn set_dirty_limit(&mut self, blocks: usize) {
        self.dirty_limit = blocks.max(1);
    }

    /// Bound the clean-block cache to `blocks` blocks (default [`DEFAULT_CACHE_BLOCKS`]);
    /// refused below [`MIN_CACHE_BLOCKS`]. Shrinking evicts at once.
    pub fn set_cache_limit(&mut self, blocks: usize) -> Result<()> {
        if blocks < MIN_CACHE_BLOCKS {
            return Err(Error::InvalidArgument(format!(
                "a metadata cache of {blocks} blocks is too small: at least {MIN_CACHE_BLOCKS} blocks ({} KiB)",
                MIN_CACHE_BLOCKS * BLOCK_SIZE / 1024
            )));
        }
        self.reader.set_cache_capacity(blocks);
        Ok(())
    }

    /// The limit set by [`Transaction::set_cache_limit`].
    pub fn cache_limit(&self) -> usize {
        self.reader.cache_capacity()
    }

    /// The limit set by [`Transaction::set_dirty_limit`].
    pub fn dirty_limit(&self) -> usize {
        self.dirty_limit
    }

    fn maybe_writeback(&mut self) -> Result<()> {
        if self.dirty.len() < self.dirty_limit {
            return Ok(());
        }
        // Only B-tree nodes are written early; space-map blocks are made during commit.
        let nodes: Vec<u64> = self
            .dirty
            .iter()
            .filter(|(_, (k, _))| *k == BlockKind::Node)
            .map(|(b, _)| *b)
            .collect();
        let mut batch: Vec<(u64, Arc<Block>)> = Vec::with_capacity(nodes.len());
        for b in nodes {
            let (kind, blk) = self.dirty.remove(&b).expect("listed above");
            let mut out = blk;
            stamp(&mut Arc::make_mut(&mut out)[..], kind, b);
            batch.push((b, out));
        }
        self.write_blocks(&mut batch)?;
        for (b, blk) in batch {
            self.reader.insert_clean(b, blk);
        }
        Ok(())
    }

    fn write_blocks(&mut self, batch: &mut [(u64, Arc<Block>)]) -> Result<()> {
        batch.sort_unstable_by_key(|(b, _)| *b);
        // Coalesce runs of consecutive blocks into one write.
        let mut i = 0;
        let mut buf = Vec::new();
        while i < batch.len() {
            let start = batch[i].0;
            let mut j = i;
            buf.clear();
            while j < batch.len() && batch[j].0 == start + (j - i) as u64 && j - i < 256 {
                buf.extend_from_slice(&batch[j].1[..]);
                j += 1;
            }
            self.reader.dev.write_at(&buf, start * BLOCK_SIZE as u64)?;
            i = j;
        }
        Ok(())
    }

    /// Grow the data space map to `nr_blocks` (section 11.2). Takes effect at commit.
    pub fn resize_data(&mut self, nr_blocks: u64) -> Result<()> {
        if nr_blocks < self.data_sm.nr_blocks() {
            return Err(Error::InvalidArgument(format!(
                "the data device cannot shrink from {} to {} blocks",
                self.data_sm.nr_blocks(),
                nr_blocks
            )));
        }
        self.data_sm.resize(nr_blocks);
        self.data_layout
            .bitmaps
            .resize(self.data_sm.nr_bitmaps(), 0);
        Ok(())
    }

    /// Grow the metadata space map to `nr_blocks` (the device must already be that large).
    pub fn resize_metadata(&mut self, nr_blocks: u64) -> Result<()> {
        let nr_blocks = nr_blocks.min(MAX_METADATA_BLOCKS);
        if nr_blocks < self.meta_sm.nr_blocks() {
            return Err(Error::InvalidArgument(format!(
                "the metadata device cannot shrink from {} to {} blocks",
                self.meta_sm.nr_blocks(),
                nr_blocks
            )));
        }
        let dev_blocks = self.reader.device().size()? / BLOCK_SIZE as u64;
        if dev_blocks < nr_blocks {
            return Err(Error::InvalidArgument(format!(
                "metadata device {} has {} blocks, fewer than the requested {}",
                self.reader.device().name(),
                dev_blocks,
                nr_blocks
            )));
        }
        self.reader.nr_blocks = dev_blocks;
        self.meta_sm.resize(nr_blocks);
        self.meta_layout
            .bitmaps
            .resize(self.meta_sm.nr_bitmaps(), 0);
        Ok(())
    }

    /// Current space-map roots (valid after [`Transaction::commit_space_maps`]).
    pub fn sm_roots(&self) -> (SmRoot, SmRoot) {
        (
            SmRoot {
                nr_blocks: self.data_sm.nr_blocks(),
                nr_allocated: self.data_sm.nr_allocated(),
                bitmap_root: self.data_layout.index_root,
                ref_count_root: self.data_layout.ref_count_root,
            },
            SmRoot {
                nr_blocks: self.meta_sm.nr_blocks(),
                nr_allocated: self.meta_sm.nr_allocated(),
                bitmap_root: self.meta_layout.index_root,
                ref_count_root: self.meta_layout.ref_count_root,
            },
        )
    }

    fn apply_overflow(&mut self, data: bool) -> Result<bool> {
        let keys = if data {
            self.data_sm.take_dirty_overflow()
        } else {
            self.meta_sm.take_dirty_overflow()
        };
        let changed = !keys.is_empty();
        let ops = PlainValue(4);
        for b in keys {
            let (count, root) = if data {
                (self.data_sm.overflow(b), self.data_layout.ref_count_root)
            } else {
                (self.meta_sm.overflow(b), self.meta_layout.ref_count_root)
            };
            let new_root = match count {
                Some(c) => btree::insert(self, root, b, &c.to_le_bytes(), &ops)?.0,
                None => btree::remove(self, root, b, &ops)?.0,
            };
            if data {
                self.data_layout.ref_count_root = new_root;
            } else {
                self.meta_layout.ref_count_root = new_root;
            }
        }
        Ok(changed)
    }

    /// Write the space maps' changes into metadata blocks (step 3 of section 9.2). Afterwards
    /// [`Transaction::sm_roots`] gives the roots for the superblock.
    pub fn commit_space_maps(&mut self) -> Result<()> {
        // Data space map: ref-count tree, then bitmaps and their index entries.
        self.apply_overflow(true)?;
        let dirty: Vec<usize> = self.data_sm.dirty_bitmaps().iter().copied().collect();
        for i in dirty {
            let loc = self.data_layout.bitmaps[i];
            let loc = if loc != 0 && self.meta_sm.allocated_in_transaction(loc) {
                loc
            } else {
                let nb = self.new_block(BlockKind::Bitmap)?;
                if loc != 0 {
                    self.dec_meta(loc)?;
                }
                self.data_layout.bitmaps[i] = nb;
                nb
            };
            let (nr_free, none_free_before) = self.data_sm.bitmap_hints(i);
            let mut content = [0u8; BLOCK_SIZE];
            self.data_sm.encode_bitmap(i, &mut content[16..]);
            *self.write(loc)? = content;
            let entry = IndexEntry {
                blocknr: loc,
                nr_free,
                none_free_before,
            };
            let root = self.data_layout.index_root;
            self.data_layout.index_root =
                btree::insert(self, root, i as u64, &entry.encode(), &PlainValue(16))?.0;
        }
        // Metadata space map: relocating its blocks changes it again; repeat until stable.
        loop {
            let mut changed = self.apply_overflow(false)?;
            let idx = self.meta_layout.index_root;
            if idx == 0 || !self.meta_sm.allocated_in_transaction(idx) {
                let nb = self.new_block(BlockKind::Index)?;
                if idx != 0 {
                    self.dec_meta(idx)?;
                }
                self.meta_layout.index_root = nb;
                changed = true;
            }
            let dirty: Vec<usize> = self.meta_sm.dirty_bitmaps().iter().copied().collect();
            for i in dirty {
                let loc = self.meta_layout.bitmaps[i];
                if loc == 0 || !self.meta_sm.allocated_in_transaction(loc) {
                    let nb = self.new_block(BlockKind::Bitmap)?;
                    if loc != 0 {
                        self.dec_meta(loc)?;
                    }
                    self.meta_layout.bitmaps[i] = nb;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let dirty: Vec<usize> = self.meta_sm.dirty_bitmaps().iter().copied().collect();
        for i in dirty {
            let loc = self.meta_layout.bitmaps[i];
            let mut content = [0u8; BLOCK_SIZE];
            self.meta_sm.encode_bitmap(i, &mut content[16..]);
            *self.write(loc)? = content;
        }
        let mut index = [0u8; BLOCK_SIZE];
        for i in 0..self.meta_sm.nr_bitmaps() {
            let (nr_free, none_free_before) = self.meta_sm.bitmap_hints(i);
            let e = IndexEntry {
                blocknr: self.meta_layout.bitmaps[i],
                nr_free,
                none_free_before,
            };
            index[16 + i * 16..32 + i * 16].copy_from_slice(&e.encode());
        }
        let idx = self.meta_layout.index_root;
        *self.write(idx)? = index;
        Ok(())
    }

    /// Finish the commit (steps 4 and 5 of section 9.2): write every new block, flush, write
    /// `superblock` (its checksum and block number are set here) at block 0, flush. The caller
    /// must have flushed the data device and called [`Transaction::commit_space_maps`].
    pub fn write_and_flush(&mut self, mut superblock: Box<Block>) -> Result<()> {
        if self.poisoned {
            return Err(Error::ReadOnly);
        }
        let result = self.write_and_flush_inner(&mut superblock);
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    fn write_and_flush_inner(&mut self, superblock: &mut Block) -> Result<()> {
        let mut batch: Vec<(u64, Arc<Block>)> = Vec::with_capacity(self.dirty.len());
        for (b, (kind, blk)) in self.dirty.drain() {
            let mut out = blk;
            stamp(&mut Arc::make_mut(&mut out)[..], kind, b);
            batch.push((b, out));
        }
        self.write_blocks(&mut batch)?;
        self.reader.dev.sync()?;
        stamp(&mut superblock[..], BlockKind::Superblock, 0);
        self.reader.dev.write_at(&superblock[..], 0)?;
        self.reader.dev.sync()?;
        for (b, blk) in batch {
            self.reader.insert_clean(b, blk);
        }
        self.meta_sm.end_transaction();
        self.meta_sm.rewind();
        self.data_sm.end_transaction();
        Ok(())
    }

    /// The metadata device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        self.reader.device()
    }

    /// Write a block of any kind in place, outside the transaction rules (only for the
    /// superblock's NEEDS_CHECK flag, which the kernel also writes in place).
    pub fn write_superblock_in_place(&mut self, mut superblock: Box<Block>) -> Result<()> {
        stamp(&mut superblock[..], BlockKind::Superblock, 0);
        self.reader.dev.write_at(&superblock[..], 0)?;
        self.reader.dev.sync()?;
        Ok(())
    }

    /// Mark a block allocated in this transaction as being of `kind` (for stamping at commit).
    pub fn set_kind(&mut self, b: u64, kind: BlockKind) -> Result<()> {
        self.write(b)?;
        if let Some(e) = self.dirty.get_mut(&b) {
            e.0 = kind;
        }
        Ok(())
    }

    /// True after a failed commit: nothing more may be written.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Number of blocks changed in the open transaction.
    pub fn nr_dirty(&self) -> usize {
        self.dirty.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinpool_io::MemDevice;

    /// A committed transaction holding one tree of `n` keys (value = key * 3), and its root.
    fn committed_tree(n: u64) -> (Transaction, u64) {
        let dev = Arc::new(MemDevice::new(64 << 20));
        let mut tx = Transaction::format(dev, 16384, 1000).unwrap();
        let ops = PlainValue(8);
        let mut root = btree::empty_tree(&mut tx, 8).unwrap();
        for k in 0..n {
            root = btree::insert(&mut tx, root, k, &(k * 3).to_le_bytes(), &ops)
                .unwrap()
                .0;
        }
        tx.commit_space_maps().unwrap();
        tx.write_and_flush(Box::new([0u8; BLOCK_SIZE])).unwrap();
        assert_eq!(tx.nr_dirty(), 0);
        (tx, root)
    }

    #[test]
    fn cache_stays_bounded_over_a_large_tree() {
        let (mut tx, root) = committed_tree(200_000);
        tx.set_cache_limit(MIN_CACHE_BLOCKS).unwrap();
        assert!(tx.reader().cached_blocks() <= MIN_CACHE_BLOCKS);
        let mut seen = 0u64;
        btree::walk(&mut tx, root, 8, &mut |k, v| {
            assert_eq!(le_u64(v, 0), k * 3);
            seen += 1;
            Ok(true)
        })
        .unwrap();
        assert_eq!(seen, 200_000);
        for k in (0..200_000).step_by(997) {
            assert_eq!(btree::lookup_u64(&mut tx, root, k).unwrap(), Some(k * 3));
            assert!(tx.reader().cached_blocks() <= MIN_CACHE_BLOCKS);
        }
        let stats = tx.reader().cache_stats();
        // 200 000 eight-byte values need at least 200 000 / 254 leaves: the walk alone read
        // far more blocks than the cache holds, so it must have evicted.
        assert!(stats.misses > 4 * MIN_CACHE_BLOCKS as u64, "{stats:?}");
        assert!(
            stats.evictions >= stats.misses - MIN_CACHE_BLOCKS as u64,
            "{stats:?}"
        );
        assert_eq!(tx.reader().cached_blocks(), MIN_CACHE_BLOCKS);
    }

    #[test]
    fn repeated_lookups_of_a_hot_set_hit() {
        let (mut tx, root) = committed_tree(200_000);
        tx.set_cache_limit(MIN_CACHE_BLOCKS).unwrap();
        let hot: Vec<u64> = (0..8).map(|i| i * 25_000 + 7).collect();
        let mut cold = (0..200_000u64).step_by(331);
        for round in 0..20 {
            let before = tx.reader().cache_stats();
            for &k in &hot {
                assert_eq!(btree::lookup_u64(&mut tx, root, k).unwrap(), Some(k * 3));
            }
            let after = tx.reader().cache_stats();
            if round > 0 {
                assert_eq!(
                    after.misses, before.misses,
                    "round {round}: hot lookups missed"
                );
            }
            // Lookups elsewhere in between, a few leaves each round.
            for _ in 0..10 {
                let k = cold.next().unwrap();
                assert_eq!(btree::lookup_u64(&mut tx, root, k).unwrap(), Some(k * 3));
            }
        }
    }

    #[test]
    fn cache_limit_below_the_minimum_is_refused() {
        let (mut tx, _) = committed_tree(10);
        let err = tx.set_cache_limit(MIN_CACHE_BLOCKS - 1).unwrap_err();
        assert!(err.to_string().contains("too small"), "{err}");
        assert_eq!(tx.cache_limit(), DEFAULT_CACHE_BLOCKS);
        tx.set_cache_limit(100).unwrap();
        assert_eq!(tx.cache_limit(), 100);
    }
}
