//! Read-only walks over dm-thin metadata, shared by `ls`, `delta`, `repair` and `check`.
//!
//! Everything here reads; nothing writes. The walks are *strict*: every node reached is
//! validated the way `thin_check` 0.9.0 validates it (format spec section 4.2) and the first
//! fault stops the walk with an error naming the block and its role. `check` has its own,
//! tolerant walk (it must go on after a fault) but uses [`node_fault`] for the node rules, so
//! both agree on what a good node is.
//!
//! Pointers are checked before they are followed (block 0 and blocks past the device are
//! refused), each walk keeps the set of nodes it has entered (a cycle is an error, not a
//! hang), and recursion is bounded by [`MAX_DEPTH`].

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use thinpool_io::BlockDevice;
use thinpool_pdata::block::{self, Block, MetaBlock};
use thinpool_pdata::node::NodeRef;
use thinpool_pdata::transaction::BlockReader;
use thinpool_pdata::{BLOCK_SIZE, BlockKind};

use crate::superblock::{BlockTime, DeviceDetails, Superblock};
use crate::{Error, Result};

/// Deepest tree a walk follows. A valid tree of 4 161 600 blocks with at least 84 entries per
/// non-root node has fewer than 6 levels; anything deeper is damage.
pub(crate) const MAX_DEPTH: usize = 32;

/// What a node is, for messages: "device details tree", "mapping tree of device 7, bottom
/// level", ... The level word ("leaf", "internal node") is added by [`node_role`].
pub(crate) fn node_role(tree: &str, n: Option<NodeRef<'_>>, is_root: bool) -> String {
    let level = match n {
        Some(n) if n.flags() == thinpool_pdata::node::INTERNAL_NODE => "internal node",
        Some(n) if n.flags() == thinpool_pdata::node::LEAF_NODE => "leaf",
        _ => "node",
    };
    if is_root {
        format!("{tree} root {level}")
    } else {
        format!("{tree} {level}")
    }
}

/// The node rules of section 4.2 that can be judged from the node alone and its parent's key:
/// flags, value size (8 for internal nodes, `leaf_value_size` for leaves), `max_entries` fits
/// and is a multiple of 3, `nr_entries <= max_entries`, at least `max_entries / 3` entries in a
/// non-root node, strictly increasing keys, and the parent's key not above the first key.
/// Checksum and block number are checked when the block is read.
///
/// Returns `(fault, usable)`: `usable` is false when the header is so wrong that keys and values
/// must not be read (the caller must not descend); soft faults (fill, order, parent key) leave
/// the node usable.
pub(crate) fn node_fault(
    n: NodeRef<'_>,
    leaf_value_size: usize,
    is_root: bool,
    parent_key: Option<u64>,
) -> Option<(String, bool)> {
    if let Err(f) = n.check_shape(Some(leaf_value_size)) {
        return Some((f.to_string(), false));
    }
    let nr = n.nr_entries();
    let max = n.max_entries();
    if !is_root && nr < max / 3 {
        return Some((
            format!(
                "too few entries: {nr}, a non-root node needs at least {} (max_entries {max})",
                max / 3
            ),
            true,
        ));
    }
    for i in 1..nr {
        let (a, b) = (n.key(i - 1), n.key(i));
        if b <= a {
            return Some((
                format!(
                    "keys out of order: key {i} is {b}, not above key {} ({a})",
                    i - 1
                ),
                true,
            ));
        }
    }
    if let Some(pk) = parent_key
        && nr > 0
        && pk > n.key(0)
    {
        return Some((
            format!(
                "the parent's key {pk} is above the node's first key {}",
                n.key(0)
            ),
            true,
        ));
    }
    None
}

/// A validating block reader for the strict walks (a cache over the device).
pub(crate) struct Reader {
    inner: BlockReader,
    nr_blocks: u64,
}

impl Reader {
    /// A reader over `dev`; pointers must stay below the device's size in blocks.
    pub(crate) fn new(dev: Arc<dyn BlockDevice>) -> Result<Self> {
        let inner = BlockReader::new(dev)?;
        let nr_blocks = inner.nr_blocks();
        Ok(Reader { inner, nr_blocks })
    }

    /// Blocks on the device.
    pub(crate) fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    /// Read block `b` without validation.
    pub(crate) fn raw(&self, b: u64) -> Result<Box<Block>> {
        Ok(self.inner.read_raw(b)?)
    }

    /// Read whole blocks from `first` into `buf` (a multiple of the block size), unvalidated
    /// and uncached: for scans.
    pub(crate) fn read_at(&self, buf: &mut [u8], first: u64) -> Result<()> {
        Ok(self
            .inner
            .device()
            .read_at(buf, first * BLOCK_SIZE as u64)?)
    }

    /// Block `b` validated as `kind` (checksum, block number); `what` names it in errors.
    pub(crate) fn block(&mut self, b: u64, kind: BlockKind, what: &str) -> Result<Arc<Block>> {
        self.read(b, kind, what)
    }

    fn read(&mut self, b: u64, kind: BlockKind, what: &str) -> Result<Arc<Block>> {
        if b == 0 || b >= self.nr_blocks {
            return Err(Error::Inconsistent(format!(
                "{what}: pointer to block {b}, outside the metadata device (blocks 1..{})",
                self.nr_blocks
            )));
        }
        self.inner.read(b, kind).map_err(|e| match e {
            thinpool_pdata::Error::Corrupt { block, fault } => {
                Error::Inconsistent(format!("{block} ({what}): {fault}"))
            }
            e => Error::Pdata(e),
        })
    }

    /// The live superblock, with its checksum and block number checked.
    pub(crate) fn superblock(&mut self) -> Result<Superblock> {
        if self.nr_blocks == 0 {
            return Err(Error::BadSuperblock(
                "the metadata device is smaller than one block".into(),
            ));
        }
        let blk = self.inner.read_raw(0)?;
        block::validate(&blk[..], BlockKind::Superblock, 0)
            .map_err(|f| Error::BadSuperblock(f.to_string()))?;
        Ok(Superblock::decode(&blk[..]))
    }

    /// The held metadata-snapshot copy of the superblock at `b`.
    pub(crate) fn held_superblock(&mut self, b: u64) -> Result<Superblock> {
        let blk = self.read(
            b,
            BlockKind::Superblock,
            "held metadata snapshot superblock",
        )?;
        Ok(Superblock::decode(&blk[..]))
    }

    /// A B-tree node (checksum and block number checked, not its shape).
    pub(crate) fn node(&mut self, b: u64, what: &str) -> Result<Arc<Block>> {
        self.read(b, BlockKind::Node, what)
    }
}

/// Which view of the pool a tool reads: the live trees or the held metadata snapshot.
pub(crate) struct View {
    /// The superblock whose roots are walked (the live one or the held copy).
    pub sb: Superblock,
    /// The live superblock.
    pub live: Superblock,
}

/// Open the live view, or the held snapshot's view (`snap`: `Some(None)` = the held root named
/// by the superblock, `Some(Some(b))` = the copy at block `b`). The error when nothing is held
/// reads like the tools': "no current metadata snap".
pub(crate) fn open_view(r: &mut Reader, snap: Option<Option<u64>>) -> Result<View> {
    let live = r.superblock()?;
    let sb = match snap {
        None => live.clone(),
        Some(at) => {
            let b = match at {
                Some(b) => b,
                None if live.held_root == 0 => {
                    return Err(Error::MetadataSnap("no current metadata snap".into()));
                }
                None => live.held_root,
            };
            r.held_superblock(b)?
        }
    };
    Ok(View { sb, live })
}

struct Walk<'a> {
    r: &'a mut Reader,
    tree: &'a str,
    value_size: usize,
    visited: HashSet<u64>,
    last_key: Option<u64>,
}

impl Walk<'_> {
    fn node(
        &mut self,
        b: u64,
        is_root: bool,
        parent_key: Option<u64>,
        depth: usize,
        f: &mut dyn FnMut(u64, NodeRef<'_>) -> Result<()>,
    ) -> Result<()> {
        let what = || node_role(self.tree, None, is_root);
        if depth > MAX_DEPTH {
            return Err(Error::Inconsistent(format!(
                "{} ({}): more than {MAX_DEPTH} levels",
                MetaBlock(b),
                what()
            )));
        }
        if !self.visited.insert(b) {
            return Err(Error::Inconsistent(format!(
                "{} ({}): reached twice in one tree (a cycle)",
                MetaBlock(b),
                what()
            )));
        }
        let blk = self.r.node(b, &what())?;
        let n = NodeRef(&blk[..]);
        if let Some((fault, _)) = node_fault(n, self.value_size, is_root, parent_key) {
            return Err(Error::Inconsistent(format!(
                "{} ({}): {fault}",
                MetaBlock(b),
                node_role(self.tree, Some(n), is_root)
            )));
        }
        let nr = n.nr_entries();
        if n.is_leaf() {
            if nr > 0 {
                if let Some(last) = self.last_key
                    && n.key(0) <= last
                {
                    return Err(Error::Inconsistent(format!(
                        "{} ({}): first key {} is not above the previous leaf's last key {last}",
                        MetaBlock(b),
                        node_role(self.tree, Some(n), is_root),
                        n.key(0)
                    )));
                }
                self.last_key = Some(n.key(nr - 1));
            }
            return f(b, n);
        }
        for i in 0..nr {
            self.node(n.value_u64(i), false, Some(n.key(i)), depth + 1, f)?;
            if i + 1 < nr
                && let Some(last) = self.last_key
                && last >= n.key(i + 1)
            {
                return Err(Error::Inconsistent(format!(
                    "{} ({}): child {i} holds key {last}, not below the next key {}",
                    MetaBlock(b),
                    node_role(self.tree, Some(n), is_root),
                    n.key(i + 1)
                )));
            }
        }
        Ok(())
    }
}

/// Visit every leaf of the tree at `root` in key order: `f(leaf block, leaf)`. Strict: the
/// first damaged node ends the walk with an error naming it. `tree` names the tree in messages.
/// O(nodes) reads.
pub(crate) fn walk_leaves(
    r: &mut Reader,
    root: u64,
    value_size: usize,
    tree: &str,
    f: &mut dyn FnMut(u64, NodeRef<'_>) -> Result<()>,
) -> Result<()> {
    let mut w = Walk {
        r,
        tree,
        value_size,
        visited: HashSet::new(),
        last_key: None,
    };
    w.node(root, true, None, 0, f)
}

/// Visit every `(key, value)` of the tree at `root` in key order (strict, like
/// [`walk_leaves`]).
pub(crate) fn walk_values(
    r: &mut Reader,
    root: u64,
    value_size: usize,
    tree: &str,
    f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    walk_leaves(r, root, value_size, tree, &mut |_, n| {
        for i in 0..n.nr_entries() {
            f(n.key(i), n.value(i))?;
        }
        Ok(())
    })
}

/// All devices of the details tree at `root`, in id order.
pub(crate) fn read_details(r: &mut Reader, root: u64) -> Result<BTreeMap<u64, DeviceDetails>> {
    let mut m = BTreeMap::new();
    walk_values(
        r,
        root,
        DeviceDetails::SIZE,
        "device details tree",
        &mut |k, v| {
            m.insert(k, DeviceDetails::decode(v));
            Ok(())
        },
    )?;
    Ok(m)
}

/// The top level of the mapping tree at `root`: device id → bottom-level root.
pub(crate) fn read_top_level(r: &mut Reader, root: u64) -> Result<BTreeMap<u64, u64>> {
    let mut m = BTreeMap::new();
    walk_values(r, root, 8, "top-level mapping tree", &mut |k, v| {
        m.insert(k, block::le_u64(v, 0));
        Ok(())
    })?;
    Ok(m)
}

/// Every mapping of the bottom-level tree at `root`: `f(virtual block, mapping)`, in order.
pub(crate) fn walk_mappings(
    r: &mut Reader,
    root: u64,
    dev: u64,
    f: &mut dyn FnMut(u64, BlockTime) -> Result<()>,
) -> Result<()> {
    let tree = format!("mapping tree of device {dev}, bottom level");
    walk_values(r, root, 8, &tree, &mut |k, v| {
        f(k, BlockTime::unpack(block::le_u64(v, 0)))
    })
}

/// Entry `e` (0..16320) of a bitmap block's payload, in the disk's swapped bit order (section
/// 6.2): bit `s` holds the high bit and bit `s + 1` the low bit.
#[inline]
pub(crate) fn bitmap_entry(blk: &[u8], e: usize) -> u8 {
    let byte = blk[16 + e / 4];
    let s = 2 * (e % 4);
    (((byte >> s) & 1) << 1) | ((byte >> (s + 1)) & 1)
}

const _: () = assert!(BLOCK_SIZE == 16 + 16320 / 4);

/// Helpers for the unit tests of the read-only tools: the test vectors of the repository's
/// `testdata/dm-thin/` and the thin-provisioning-tools oracles (through `thinpool-testkit`, so
/// a missing oracle fails under CI and skips loudly elsewhere).
#[cfg(test)]
pub(crate) mod testutil {
    use std::process::Output;
    use std::sync::Arc;

    use thinpool_io::{BlockDevice, MemDevice};
    pub(crate) use thinpool_testkit::{VECTORS, require_tool as have, vector_bytes as vector};

    /// The `thin_dump` XML of vector `name`.
    pub(crate) fn vector_xml(name: &str) -> Vec<u8> {
        thinpool_testkit::vector_xml(name).into_bytes()
    }

    /// An in-memory device holding `bytes`.
    pub(crate) fn mem(bytes: Vec<u8>) -> Arc<dyn BlockDevice> {
        Arc::new(MemDevice::from_bytes(bytes))
    }

    /// Run `prog args.. FILE` on `image` written to a temporary file.
    pub(crate) fn run_on(prog: &str, args: &[&str], image: &[u8]) -> Output {
        let dir = tempfile::tempdir().expect("temp dir");
        let f = dir.path().join("meta");
        std::fs::write(&f, image).expect("write image");
        thinpool_testkit::tool(prog)
            .args(args)
            .arg(&f)
            .output()
            .expect("run tool")
    }

    /// `thin_restore` of `xml` into a zeroed image of `size` bytes.
    pub(crate) fn restore(xml: &str, size: u64) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("temp dir");
        let x = dir.path().join("in.xml");
        let f = dir.path().join("meta");
        std::fs::write(&x, xml).expect("write xml");
        std::fs::File::create(&f)
            .and_then(|h| h.set_len(size))
            .expect("create image");
        let o = thinpool_testkit::tool("thin_restore")
            .arg("-i")
            .arg(&x)
            .arg("-o")
            .arg(&f)
            .output()
            .expect("run thin_restore");
        assert!(o.status.success(), "thin_restore failed: {o:?}");
        std::fs::read(&f).expect("read image")
    }
}
