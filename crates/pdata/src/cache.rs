//! [`BlockCache`]: a bounded cache of clean metadata blocks with CLOCK (second chance)
//! eviction.
//!
//! The cache never holds more than its capacity. Every entry has a *referenced* bit, set by a
//! hit and clear on insertion. When the cache is full, a hand sweeps the entries in a circle:
//! a referenced entry loses its bit and is spared once, the first unreferenced one is evicted.
//! So a block read again before the hand comes round (the top levels of the trees, a hot
//! leaf) stays, while a block read once (a walk over the whole mapping tree) goes first. This
//! is the kernel's and most databases' choice for a buffer cache: a hit costs one bit, unlike
//! an LRU list that moves an entry on every hit.
//!
//! Memory: an entry is its 4 KiB block plus about 40 bytes of bookkeeping (slot and index).
//! A block handed out stays alive while the caller holds its `Arc`, even if evicted.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::block::Block;

/// Hashes metadata block numbers for the block maps: one multiplication, folded so that the
/// high bits reach the low ones. Every B-tree node read goes through two of these maps (the
/// transaction's blocks, then the cache), and SipHash cost more than the rest of a lookup. Its
/// protection against chosen keys matters little here: keys are block numbers below the
/// device's size, and the cache is bounded, so even a crafted metadata file can only make some
/// probes longer, not unbounded.
#[derive(Default, Clone, Copy)]
pub(crate) struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by metadata block number.
pub(crate) type BlockMap<V> = HashMap<u64, V, BuildHasherDefault<BlockHasher>>;

struct Slot {
    block: u64,
    data: Arc<Block>,
    referenced: bool,
}

/// Hits and misses of a cache since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that had to read the device.
    pub misses: u64,
    /// Entries dropped to make room.
    pub evictions: u64,
}

/// A bounded block cache with CLOCK eviction (see the module doc).
pub struct BlockCache {
    slots: Vec<Slot>,
    index: BlockMap<usize>,
    hand: usize,
    capacity: usize,
    stats: CacheStats,
}

impl BlockCache {
    /// An empty cache of at most `capacity` blocks (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        BlockCache {
            slots: Vec::new(),
            index: BlockMap::default(),
            hand: 0,
            capacity,
            stats: CacheStats::default(),
        }
    }

    /// The most blocks this cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks held now.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Hits, misses and evictions so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Block `b` if cached (counted as a hit or a miss; a hit marks it referenced).
    pub fn get(&mut self, b: u64) -> Option<Arc<Block>> {
        match self.index.get(&b) {
            Some(&i) => {
                self.stats.hits += 1;
                let slot = &mut self.slots[i];
                slot.referenced = true;
                Some(slot.data.clone())
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Cache `data` as block `b`, replacing an older copy; evicts one entry when full.
    pub fn insert(&mut self, b: u64, data: Arc<Block>) {
        if let Some(&i) = self.index.get(&b) {
            self.slots[i].data = data;
            return;
        }
        let slot = Slot {
            block: b,
            data,
            referenced: false,
        };
        if self.slots.len() < self.capacity {
            self.index.insert(b, self.slots.len());
            self.slots.push(slot);
            return;
        }
        let victim = self.victim();
        self.index.remove(&self.slots[victim].block);
        self.index.insert(b, victim);
        self.slots[victim] = slot;
        self.stats.evictions += 1;
    }

    /// Drop block `b` if cached (its number is being reused for a new block).
    pub fn remove(&mut self, b: u64) {
        if let Some(i) = self.index.remove(&b) {
            self.take(i);
        }
    }

    /// Change the capacity (at least one block); shrinking evicts by the same CLOCK rule.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
        while self.slots.len() > self.capacity {
            let victim = self.victim();
            self.index.remove(&self.slots[victim].block);
            self.take(victim);
            self.stats.evictions += 1;
        }
    }

    /// Drop every entry (the statistics stay).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.index.clear();
        self.hand = 0;
    }

    /// The slot the hand stops at: the first unreferenced one, clearing bits on the way. Ends
    /// within one turn and a slot, since the turn clears every bit. Needs a nonempty cache.
    fn victim(&mut self) -> usize {
        loop {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let i = self.hand;
            self.hand += 1;
            let slot = &mut self.slots[i];
            if slot.referenced {
                slot.referenced = false;
            } else {
                return i;
            }
        }
    }

    /// Remove slot `i` (already gone from the index) by moving the last slot into it.
    fn take(&mut self, i: usize) {
        self.slots.swap_remove(i);
        if let Some(moved) = self.slots.get(i) {
            self.index.insert(moved.block, i);
        }
        if self.hand > self.slots.len() {
            self.hand = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BLOCK_SIZE;

    fn blk(tag: u8) -> Arc<Block> {
        Arc::new([tag; BLOCK_SIZE])
    }

    #[test]
    fn never_holds_more_than_capacity() {
        let mut c = BlockCache::new(100);
        for b in 0..10_000u64 {
            if c.get(b % 3_000).is_none() {
                c.insert(b % 3_000, blk(b as u8));
            }
            assert!(c.len() <= 100, "{} entries after block {b}", c.len());
            assert_eq!(c.index.len(), c.len());
        }
        assert_eq!(c.len(), 100);
        // Every index entry points at the slot holding that block.
        for (&b, &i) in &c.index {
            assert_eq!(c.slots[i].block, b);
        }
    }

    #[test]
    fn hot_blocks_survive_a_scan() {
        let mut c = BlockCache::new(64);
        let hot: Vec<u64> = (0..16).collect();
        let mut cold = 1_000u64;
        for round in 0..50 {
            for &b in &hot {
                let hit = c.get(b).is_some();
                if round > 0 {
                    assert!(hit, "hot block {b} missed in round {round}");
                } else {
                    c.insert(b, blk(1));
                }
            }
            // 40 blocks read once each: more than the free room, less than a full turn.
            for _ in 0..40 {
                assert!(c.get(cold).is_none());
                c.insert(cold, blk(2));
                cold += 1;
            }
        }
        let s = c.stats();
        assert_eq!(s.hits, 49 * 16);
        assert!(s.evictions > 1_500, "{s:?}");
    }

    #[test]
    fn remove_and_shrink_keep_the_index_right() {
        let mut c = BlockCache::new(10);
        for b in 0..10 {
            c.insert(b, blk(b as u8));
        }
        c.remove(3);
        c.remove(9);
        assert!(c.get(3).is_none());
        assert_eq!(c.len(), 8);
        for b in [0u64, 1, 2, 4, 5, 6, 7, 8] {
            assert_eq!(c.get(b).expect("still cached")[0], b as u8);
        }
        c.get(5);
        c.set_capacity(3);
        assert_eq!(c.len(), 3);
        for (&b, &i) in &c.index {
            assert_eq!(c.slots[i].block, b);
            assert_eq!(c.slots[i].data[0], b as u8);
        }
        // Replacing a cached block keeps one entry with the new content.
        let kept = *c.index.keys().next().expect("three left");
        c.insert(kept, blk(200));
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(kept).expect("cached")[0], 200);
    }
}
