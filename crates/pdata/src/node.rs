//! B-tree node layout (format spec section 4.1), as views over a 4 KiB buffer.
//!
//! ```text
//! 0    csum u32 | 4 flags u32 (1 internal, 2 leaf) | 8 blocknr u64
//! 16   nr_entries u32 | 20 max_entries u32 | 24 value_size u32 | 28 padding u32
//! 32   keys: u64 × max_entries
//! 32 + 8 × max_entries   values: value_size × max_entries
//! ```

use crate::block::{BLOCK_SIZE, le_u32, le_u64, put_u32, put_u64};

/// Size of the node header.
pub const NODE_HEADER_SIZE: usize = 32;
const FLAGS: usize = 4;
const NR_ENTRIES: usize = 16;
const MAX_ENTRIES: usize = 20;
const VALUE_SIZE: usize = 24;
/// Flag of an internal node.
pub const INTERNAL_NODE: u32 = 1;
/// Flag of a leaf node.
pub const LEAF_NODE: u32 = 2;

/// `max_entries` for a value size: the largest multiple of 3 that fits (section 4.1).
pub const fn max_entries(value_size: usize) -> u32 {
    let n = (BLOCK_SIZE - NODE_HEADER_SIZE) / (8 + value_size);
    (3 * (n / 3)) as u32
}

/// Read-only view of a node. The header must have been checked with [`NodeRef::check_shape`]
/// before keys or values are accessed (otherwise accessors may panic on a hostile block).
#[derive(Clone, Copy)]
pub struct NodeRef<'a>(pub &'a [u8]);

/// What is structurally wrong with a node header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeFault {
    /// Flags are neither internal nor leaf.
    #[error("flags {0:#x} are neither internal (1) nor leaf (2)")]
    Flags(u32),
    /// Value size differs from what the tree expects.
    #[error("value size {found}, expected {expected}")]
    ValueSize {
        /// In the node.
        found: u32,
        /// For this tree and level.
        expected: u32,
    },
    /// `max_entries` is not a multiple of 3 or does not fit the block.
    #[error(
        "max_entries {max} with value size {value_size} does not fit a 4096-byte block or is not a multiple of 3"
    )]
    MaxEntries {
        /// In the node.
        max: u32,
        /// In the node.
        value_size: u32,
    },
    /// `nr_entries > max_entries`.
    #[error("nr_entries {nr} exceeds max_entries {max}")]
    TooMany {
        /// In the node.
        nr: u32,
        /// In the node.
        max: u32,
    },
}

impl<'a> NodeRef<'a> {
    /// Flags field.
    pub fn flags(&self) -> u32 {
        le_u32(self.0, FLAGS)
    }
    /// True for a leaf.
    pub fn is_leaf(&self) -> bool {
        self.flags() & LEAF_NODE != 0
    }
    /// Number of used entries.
    pub fn nr_entries(&self) -> usize {
        le_u32(self.0, NR_ENTRIES) as usize
    }
    /// Capacity.
    pub fn max_entries(&self) -> usize {
        le_u32(self.0, MAX_ENTRIES) as usize
    }
    /// Value size in bytes.
    pub fn value_size(&self) -> usize {
        le_u32(self.0, VALUE_SIZE) as usize
    }
    /// Key `i`.
    #[inline]
    pub fn key(&self, i: usize) -> u64 {
        le_u64(self.0, NODE_HEADER_SIZE + 8 * i)
    }
    /// Value `i` as bytes.
    #[inline]
    pub fn value(&self, i: usize) -> &'a [u8] {
        let vs = self.value_size();
        let off = self.values_offset() + i * vs;
        &self.0[off..off + vs]
    }
    /// Value `i` as a `u64` (internal nodes, 8-byte values).
    #[inline]
    pub fn value_u64(&self, i: usize) -> u64 {
        le_u64(self.0, self.values_offset() + i * 8)
    }
    fn values_offset(&self) -> usize {
        NODE_HEADER_SIZE + 8 * self.max_entries()
    }

    /// Largest `i` with `key(i) <= key`, or `None` if `key` is below every key.
    pub fn lower_bound(&self, key: u64) -> Option<usize> {
        // Binary search on the sorted keys.
        let (mut lo, mut hi) = (0usize, self.nr_entries());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.key(mid) <= key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo.checked_sub(1)
    }

    /// Check flags, value size, max_entries and nr_entries so that accessors are in bounds.
    pub fn check_shape(&self, expected_value_size: Option<usize>) -> Result<(), ShapeFault> {
        let flags = self.flags();
        if flags != INTERNAL_NODE && flags != LEAF_NODE {
            return Err(ShapeFault::Flags(flags));
        }
        let vs = self.value_size();
        let expected = if flags == INTERNAL_NODE {
            Some(8)
        } else {
            expected_value_size
        };
        if let Some(e) = expected
            && vs != e
        {
            return Err(ShapeFault::ValueSize {
                found: vs as u32,
                expected: e as u32,
            });
        }
        let max = self.max_entries();
        if !max.is_multiple_of(3)
            || vs > BLOCK_SIZE
            || NODE_HEADER_SIZE + max * (8 + vs) > BLOCK_SIZE
        {
            return Err(ShapeFault::MaxEntries {
                max: max as u32,
                value_size: vs as u32,
            });
        }
        if self.nr_entries() > max {
            return Err(ShapeFault::TooMany {
                nr: self.nr_entries() as u32,
                max: max as u32,
            });
        }
        Ok(())
    }
}

/// Mutable view of a node.
pub struct NodeMut<'a>(pub &'a mut [u8]);

impl NodeMut<'_> {
    /// Read-only view.
    pub fn as_ref(&self) -> NodeRef<'_> {
        NodeRef(self.0)
    }
    /// Initialise an empty node (the whole block zeroed).
    pub fn init(&mut self, leaf: bool, value_size: usize) {
        self.0.fill(0);
        put_u32(self.0, FLAGS, if leaf { LEAF_NODE } else { INTERNAL_NODE });
        put_u32(self.0, MAX_ENTRIES, max_entries(value_size));
        put_u32(self.0, VALUE_SIZE, value_size as u32);
    }
    /// Set the number of entries.
    pub fn set_nr_entries(&mut self, n: usize) {
        put_u32(self.0, NR_ENTRIES, n as u32);
    }
    /// Set flags (turning a leaf into an internal node keeps the value size for the caller to fix).
    pub fn set_flags(&mut self, flags: u32) {
        put_u32(self.0, FLAGS, flags);
    }
    /// Set key `i`.
    pub fn set_key(&mut self, i: usize, k: u64) {
        put_u64(self.0, NODE_HEADER_SIZE + 8 * i, k);
    }
    /// Set value `i`.
    pub fn set_value(&mut self, i: usize, v: &[u8]) {
        let r = self.as_ref();
        let vs = r.value_size();
        let off = r.values_offset() + i * vs;
        self.0[off..off + vs].copy_from_slice(&v[..vs]);
    }
    /// Set value `i` as `u64`.
    pub fn set_value_u64(&mut self, i: usize, v: u64) {
        self.set_value(i, &v.to_le_bytes());
    }
    /// Insert `(k, v)` at slot `i`, shifting later entries. The node must not be full.
    pub fn insert_at(&mut self, i: usize, k: u64, v: &[u8]) {
        let r = self.as_ref();
        let (n, vs, vo) = (r.nr_entries(), r.value_size(), r.values_offset());
        let ko = NODE_HEADER_SIZE;
        self.0.copy_within(ko + 8 * i..ko + 8 * n, ko + 8 * (i + 1));
        self.0
            .copy_within(vo + vs * i..vo + vs * n, vo + vs * (i + 1));
        self.set_nr_entries(n + 1);
        self.set_key(i, k);
        self.set_value(i, v);
    }
    /// Remove the entry at slot `i`.
    pub fn remove_at(&mut self, i: usize) {
        let r = self.as_ref();
        let (n, vs, vo) = (r.nr_entries(), r.value_size(), r.values_offset());
        let ko = NODE_HEADER_SIZE;
        self.0.copy_within(ko + 8 * (i + 1)..ko + 8 * n, ko + 8 * i);
        self.0
            .copy_within(vo + vs * (i + 1)..vo + vs * n, vo + vs * i);
        self.set_nr_entries(n - 1);
    }
}

/// Copy entries `from[start..start+count]` to the end of `to` (same value size).
pub fn append_entries(to: &mut NodeMut<'_>, from: NodeRef<'_>, start: usize, count: usize) {
    let n = to.as_ref().nr_entries();
    for j in 0..count {
        let k = from.key(start + j);
        let v = from.value(start + j);
        to.set_key(n + j, k);
        to.set_value(n + j, v);
    }
    to.set_nr_entries(n + count);
}
