//! Space maps: a reference count for every block of a device (format spec section 6, rules in
//! sections 7 and 9.1).
//!
//! [`SpaceMap`] keeps the counts in memory in the on-disk shape — two bits per block, 16 320
//! blocks per bitmap, counts of 3 and more in an overflow map — so that loading and storing a
//! bitmap is a copy, not a translation (in memory the two bits of an entry are in natural order;
//! the disk swaps them, section 6.2). It also keeps what the transaction rules need: which blocks
//! were allocated in the open transaction (they may be changed in place) and which were freed in
//! it (they may still be referenced by the committed state, so they are not reused before the
//! commit). Memory: a quarter of a byte per block (a 100 GiB pool of 64 KiB blocks: 400 KiB).

use std::collections::{BTreeMap, BTreeSet, HashSet};

/// Entries per bitmap block (section 6.2).
pub const ENTRIES_PER_BITMAP: u64 = 16320;
/// `u64` words of entries per bitmap block.
pub const WORDS_PER_BITMAP: usize = 510;
const LOW_BITS: u64 = 0x5555_5555_5555_5555;

/// Reference counts of one device's blocks, with the open transaction's bookkeeping.
#[derive(Debug, Clone, Default)]
pub struct SpaceMap {
    nr_blocks: u64,
    words: Vec<u64>,
    overflow: BTreeMap<u64, u32>,
    nr_allocated: u64,
    dirty_bitmaps: BTreeSet<usize>,
    dirty_overflow: BTreeSet<u64>,
    allocated: HashSet<u64>,
    freed: HashSet<u64>,
    cursor: u64,
}

impl SpaceMap {
    /// An empty map of `nr_blocks` blocks, every bitmap dirty (nothing is on disk yet).
    pub fn new(nr_blocks: u64) -> Self {
        let mut sm = SpaceMap::default();
        sm.resize(nr_blocks);
        sm
    }

    /// Number of blocks.
    pub fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    /// Blocks with a count above zero.
    pub fn nr_allocated(&self) -> u64 {
        self.nr_allocated
    }

    /// Blocks with count zero.
    pub fn nr_free(&self) -> u64 {
        self.nr_blocks - self.nr_allocated
    }

    /// Number of bitmaps.
    pub fn nr_bitmaps(&self) -> usize {
        self.nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize
    }

    /// Grow to `nr_blocks` (new blocks free, new bitmaps dirty). Shrinking is not supported.
    pub fn resize(&mut self, nr_blocks: u64) {
        assert!(nr_blocks >= self.nr_blocks, "space maps only grow");
        let old_bitmaps = self.nr_bitmaps();
        self.nr_blocks = nr_blocks;
        let n = self.nr_bitmaps();
        self.words.resize(n * WORDS_PER_BITMAP, 0);
        // The last old bitmap gains entries too: its nr_free changes.
        let first_dirty = old_bitmaps.saturating_sub(1);
        for i in first_dirty..n {
            self.dirty_bitmaps.insert(i);
        }
    }

    #[inline]
    fn entry(&self, b: u64) -> u32 {
        let w = self.words[(b / 32) as usize];
        ((w >> (2 * (b % 32))) & 3) as u32
    }

    #[inline]
    fn set_entry(&mut self, b: u64, e: u32) {
        let idx = (b / 32) as usize;
        let shift = 2 * (b % 32);
        self.words[idx] = (self.words[idx] & !(3 << shift)) | ((e as u64) << shift);
    }

    /// The count of block `b`. `b` must be `< nr_blocks`.
    #[inline]
    pub fn count(&self, b: u64) -> u32 {
        match self.entry(b) {
            3 => self.overflow.get(&b).copied().unwrap_or(3),
            e => e,
        }
    }

    /// Set the count of block `b`, keeping `nr_allocated` and the dirty sets right.
    pub fn set(&mut self, b: u64, count: u32) {
        let old = self.count(b);
        if old == count {
            return;
        }
        let e = count.min(3);
        if self.entry(b) != e {
            self.set_entry(b, e);
            self.dirty_bitmaps.insert((b / ENTRIES_PER_BITMAP) as usize);
        }
        if count >= 3 || old >= 3 {
            if count >= 3 {
                self.overflow.insert(b, count);
            } else {
                self.overflow.remove(&b);
            }
            self.dirty_overflow.insert(b);
        }
        match (old, count) {
            (0, _) => self.nr_allocated += 1,
            (_, 0) => {
                self.nr_allocated -= 1;
                if !self.allocated.remove(&b) {
                    self.freed.insert(b);
                }
            }
            _ => {}
        }
    }

    /// Add one reference.
    pub fn inc(&mut self, b: u64) {
        let c = self.count(b);
        self.set(b, c.saturating_add(1));
    }

    /// Drop one reference; returns the new count. A count already at zero stays zero.
    pub fn dec(&mut self, b: u64) -> u32 {
        let c = self.count(b).saturating_sub(1);
        self.set(b, c);
        c
    }

    /// True if `b` was allocated in the open transaction (and so may be changed in place).
    pub fn allocated_in_transaction(&self, b: u64) -> bool {
        self.allocated.contains(&b)
    }

    /// Allocate a block free both now and at the last commit (section 9.1), with count 1.
    /// `None` when there is none. O(blocks scanned); the scan resumes where the last one ended.
    pub fn alloc(&mut self) -> Option<u64> {
        let nr_words = self.nr_blocks.div_ceil(32) as usize;
        if nr_words == 0 || self.nr_free() == 0 {
            return None;
        }
        let start_word = ((self.cursor / 32) as usize).min(nr_words - 1);
        for step in 0..=nr_words {
            let wi = (start_word + step) % nr_words;
            let w = self.words[wi];
            let mut free = !(w | (w >> 1)) & LOW_BITS;
            while free != 0 {
                let bit = free.trailing_zeros() as u64;
                free &= free - 1;
                let b = wi as u64 * 32 + bit / 2;
                if b >= self.nr_blocks {
                    break;
                }
                if self.freed.contains(&b) {
                    continue;
                }
                self.set(b, 1);
                self.allocated.insert(b);
                self.cursor = b + 1;
                return Some(b);
            }
        }
        None
    }

    /// Restart the allocation search at block 0 (the kernel's metadata allocator does this after
    /// every commit).
    pub fn rewind(&mut self) {
        self.cursor = 0;
    }

    /// Forget the open transaction's bookkeeping: called after a commit.
    pub fn end_transaction(&mut self) {
        self.allocated.clear();
        self.freed.clear();
        self.dirty_bitmaps.clear();
        self.dirty_overflow.clear();
    }

    /// Blocks that were in use at the last commit and are free now (they become reusable with
    /// the next commit).
    pub fn freed_in_transaction(&self) -> impl Iterator<Item = u64> + '_ {
        self.freed.iter().copied()
    }

    /// Bitmaps changed in the open transaction.
    pub fn dirty_bitmaps(&self) -> &BTreeSet<usize> {
        &self.dirty_bitmaps
    }

    /// Take the set of blocks whose overflow entry (count ≥ 3) changed.
    pub fn take_dirty_overflow(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.dirty_overflow)
    }

    /// The overflow count of `b` (Some when the count is 3 or more).
    pub fn overflow(&self, b: u64) -> Option<u32> {
        self.overflow.get(&b).copied()
    }

    /// Encode bitmap `i`'s entries (bytes 16..4096 of a bitmap block, disk bit order).
    pub fn encode_bitmap(&self, i: usize, out: &mut [u8]) {
        let words = &self.words[i * WORDS_PER_BITMAP..(i + 1) * WORDS_PER_BITMAP];
        for (j, &w) in words.iter().enumerate() {
            let disk = ((w & LOW_BITS) << 1) | ((w >> 1) & LOW_BITS);
            out[j * 8..j * 8 + 8].copy_from_slice(&disk.to_le_bytes());
        }
    }

    /// Load bitmap `i` from bytes 16..4096 of a bitmap block. Entries at or beyond `nr_blocks`
    /// are ignored. Returns the number of nonzero entries below `nr_blocks`.
    pub fn decode_bitmap(&mut self, i: usize, data: &[u8]) -> u64 {
        let mut allocated = 0;
        for j in 0..WORDS_PER_BITMAP {
            let disk = u64::from_le_bytes(data[j * 8..j * 8 + 8].try_into().expect("8 bytes"));
            let mut w = ((disk & LOW_BITS) << 1) | ((disk >> 1) & LOW_BITS);
            let first = (i * WORDS_PER_BITMAP + j) as u64 * 32;
            if first >= self.nr_blocks {
                w = 0;
            } else if first + 32 > self.nr_blocks {
                let keep = self.nr_blocks - first;
                w &= (1u64 << (2 * keep)) - 1;
            }
            self.words[i * WORDS_PER_BITMAP + j] = w;
            allocated += 32 - ((!(w | (w >> 1)) & LOW_BITS).count_ones() as u64);
        }
        let first = i as u64 * ENTRIES_PER_BITMAP;
        let in_range = self.nr_blocks.saturating_sub(first).min(ENTRIES_PER_BITMAP);
        // Words past nr_blocks were zeroed, so they counted as 32 free entries each: only
        // entries in range can be allocated.
        allocated.min(in_range)
    }

    /// Set the loaded state's totals after all bitmaps and overflow entries were decoded.
    pub fn finish_load(&mut self, overflow: BTreeMap<u64, u32>) {
        self.overflow = overflow;
        let mut n = 0u64;
        for (wi, &w) in self.words.iter().enumerate() {
            let first = wi as u64 * 32;
            if first >= self.nr_blocks {
                break;
            }
            let valid = (self.nr_blocks - first).min(32);
            let used = 32 - ((!(w | (w >> 1)) & LOW_BITS).count_ones() as u64);
            n += used.min(valid);
        }
        self.nr_allocated = n;
        self.end_transaction();
    }

    /// Index hints of bitmap `i`: free entries below `nr_blocks`, and the first free entry.
    pub fn bitmap_hints(&self, i: usize) -> (u32, u32) {
        let first = i as u64 * ENTRIES_PER_BITMAP;
        let n = (self.nr_blocks - first).min(ENTRIES_PER_BITMAP);
        let mut nr_free = 0u32;
        let mut first_free = None;
        for j in 0..WORDS_PER_BITMAP {
            let base = j as u64 * 32;
            if base >= n {
                break;
            }
            let w = self.words[i * WORDS_PER_BITMAP + j];
            let mut free = !(w | (w >> 1)) & LOW_BITS;
            let valid = (n - base).min(32);
            if valid < 32 {
                free &= (1u64 << (2 * valid)) - 1;
            }
            if free != 0 && first_free.is_none() {
                first_free = Some(base as u32 + free.trailing_zeros() / 2);
            }
            nr_free += free.count_ones();
        }
        (nr_free, first_free.unwrap_or(n as u32))
    }

    /// Every block with a nonzero count, in order (for checks and tests).
    pub fn iter_allocated(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        (0..self.nr_blocks).filter_map(move |b| match self.count(b) {
            0 => None,
            c => Some((b, c)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_overflow_and_alloc_rules() {
        let mut sm = SpaceMap::new(40000);
        assert_eq!(sm.nr_bitmaps(), 3);
        let a = sm.alloc().unwrap();
        assert_eq!(sm.count(a), 1);
        for _ in 0..5 {
            sm.inc(a);
        }
        assert_eq!(sm.count(a), 6);
        assert_eq!(sm.overflow(a), Some(6));
        sm.end_transaction();
        // Freed in this transaction: not reused before the commit.
        while sm.dec(a) > 0 {}
        assert_eq!(sm.nr_allocated(), 0);
        for _ in 0..39999 {
            assert_ne!(sm.alloc(), Some(a));
        }
        assert_eq!(sm.alloc(), None);
        sm.end_transaction();
    }

    #[test]
    fn bitmap_encoding_matches_the_spec() {
        // snapshots block 9: 0..3 = 1, 4,5 = 2, 6,7 = 3 -> bytes aa f5
        let mut sm = SpaceMap::new(1024);
        for b in 0..4 {
            sm.set(b, 1);
        }
        sm.set(4, 2);
        sm.set(5, 2);
        sm.set(6, 3);
        sm.set(7, 5);
        let mut out = vec![0u8; 4080];
        sm.encode_bitmap(0, &mut out);
        assert_eq!(&out[..2], &[0xaa, 0xf5]);
        let mut back = SpaceMap::new(1024);
        assert_eq!(back.decode_bitmap(0, &out), 8);
        assert_eq!(back.count(4), 2);
        assert_eq!(back.bitmap_hints(0), (1016, 8));
    }
}
