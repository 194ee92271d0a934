//! [`ZeroMap`]: the free data blocks known to read as zeros, so that provisioning a block for a
//! partial write (or a copy-on-write) need not punch it first.
//!
//! Knowledge is only ever gained from what this process did, and lost at the first doubt:
//!
//! - a pool created on a fresh sparse file of our own making starts with every block known
//!   zero (a file extended by `set_len` reads zeros); a pool opened, or created on a given
//!   file, knows the free blocks that lie wholly in the file's holes (as `SEEK_HOLE` reports
//!   them when the pool is started; a hole reads zeros whoever made it); one on a block
//!   device starts knowing nothing (a kernel-written or reused device may hold anything in
//!   its free blocks);
//! - allocating a block forgets it, before anything is written to it (also when the write then
//!   fails and the block is released: it may hold part of the write);
//! - a block freed and punched at commit becomes known zero again (the punch succeeded; the
//!   block cannot be reallocated until after the commit, which holds the metadata lock
//!   while it punches);
//! - blocks added by growing the pool are not known (the map keeps its size).
//!
//! The map lives beside the metadata, under the same lock, and is lost on close: a reopened
//! pool punches before it provisions, as before.

/// One bit per data block: set = free and known to read as zeros.
#[derive(Debug, Default)]
pub(crate) struct ZeroMap {
    words: Vec<u64>,
}

impl ZeroMap {
    /// Nothing known.
    pub fn unknown() -> Self {
        ZeroMap::default()
    }

    /// Blocks `0..nr_blocks` known zero (a fresh sparse data file).
    pub fn all_zero(nr_blocks: u64) -> Self {
        let mut words = vec![!0u64; nr_blocks.div_ceil(64) as usize];
        if !nr_blocks.is_multiple_of(64) {
            let last = words
                .last_mut()
                .expect("nr_blocks > 0 when not a multiple of 64");
            *last = (1u64 << (nr_blocks % 64)) - 1;
        }
        ZeroMap { words }
    }

    /// The free blocks of `0..nr_blocks` that lie wholly inside the byte ranges `holes` calls
    /// back with (`is_free(b)`: the block's reference count is 0), as many as are found
    /// before `deadline` (a file in a million pieces takes a second to ask: the blocks not
    /// reached stay unknown, which only costs a punch when they are provisioned).
    pub fn from_holes(
        nr_blocks: u64,
        block_size: u64,
        deadline: std::time::Instant,
        holes: impl FnOnce(&mut dyn FnMut(u64, u64) -> bool),
        is_free: impl Fn(u64) -> bool,
    ) -> Self {
        let mut map = ZeroMap {
            words: vec![0; nr_blocks.div_ceil(64) as usize],
        };
        holes(&mut |offset, len| {
            let end = ((offset + len) / block_size).min(nr_blocks);
            for b in offset.div_ceil(block_size)..end {
                if is_free(b) {
                    map.set(b);
                }
            }
            std::time::Instant::now() < deadline
        });
        map
    }

    /// Whether block `b` is known to read as zeros; forgets it (it is being allocated).
    pub fn take(&mut self, b: u64) -> bool {
        let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
        match self.words.get_mut(w) {
            Some(word) => {
                let was = *word & bit != 0;
                *word &= !bit;
                was
            }
            None => false,
        }
    }

    /// Block `b` (free) now reads as zeros. Blocks beyond the map stay unknown.
    pub fn set(&mut self, b: u64) {
        if let Some(word) = self.words.get_mut((b / 64) as usize) {
            *word |= 1u64 << (b % 64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_zero_until_taken_again_after_set() {
        let mut m = ZeroMap::all_zero(70);
        assert!(m.take(0));
        assert!(!m.take(0), "an allocated block is no longer known zero");
        assert!(m.take(69));
        assert!(
            !m.take(70),
            "blocks past the pool's size (grown later) are unknown"
        );
        m.set(0);
        assert!(m.take(0));
        m.set(1000);
        assert!(!m.take(1000));
        let mut u = ZeroMap::unknown();
        u.set(3);
        assert!(!u.take(3), "an opened pool learns nothing");
        assert!(!ZeroMap::all_zero(128).take(128));
    }

    #[test]
    fn from_holes_knows_free_blocks_wholly_inside_a_hole() {
        // Block size 10: holes 5..35 (blocks 1, 2 whole) and 60..200 (6..9, past the end cut).
        let holes = |f: &mut dyn FnMut(u64, u64) -> bool| {
            if f(5, 30) {
                f(60, 140);
            }
        };
        let later = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut m = ZeroMap::from_holes(10, 10, later, holes, |b| b != 7);
        let known: Vec<u64> = (0..12).filter(|&b| m.take(b)).collect();
        assert_eq!(known, vec![1, 2, 6, 8, 9]);
        // Past the deadline: what the first range gave, then no more asking.
        let mut asked = 0;
        let holes = |f: &mut dyn FnMut(u64, u64) -> bool| {
            while f(5, 30) {
                asked += 1;
            }
        };
        let mut m = ZeroMap::from_holes(10, 10, std::time::Instant::now(), holes, |_| true);
        assert_eq!(asked, 0);
        assert!(m.take(1) && m.take(2) && !m.take(6));
    }
}
