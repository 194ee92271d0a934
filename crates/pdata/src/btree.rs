//! B-trees (format spec section 4): lookup, insert, remove, walks, deletion with reference
//! counting, over the transaction's shadowing.
//!
//! The functions are generic over the value type through [`ValueOps`], which says how to take
//! and drop the references a value holds (kernel `dm-btree.h`'s `dm_btree_value_type`): plain
//! values hold none; a top-level mapping leaf holds a subtree root; a bottom-level leaf holds a
//! data block. Every function returns the tree's new root: a root moves when it is shadowed.
//!
//! Insertion is top-down (a full node is split before it is entered, the root splits beneath
//! itself so it keeps its place once shadowed). Removal rebalances an underfull child (fewer
//! than `max_entries / 3` entries) with a sibling on the way back up, so every non-root node
//! stays at least a third full, as `thin_check` requires.

use crate::block::{BLOCK_SIZE, Block, BlockKind, MetaBlock};
use crate::node::{INTERNAL_NODE, NodeMut, NodeRef, append_entries};
use crate::transaction::{BlockReader, Transaction};
use crate::{Error, Result};
use std::sync::Arc;

/// How values of a tree hold references.
pub trait ValueOps {
    /// Size of a value in bytes.
    fn value_size(&self) -> usize;
    /// Take the references `v` holds (a leaf holding it was copied from a shared leaf).
    fn inc(&self, _tx: &mut Transaction, _v: &[u8]) -> Result<()> {
        Ok(())
    }
    /// Drop the references `v` holds (it was removed or overwritten, or its leaf freed).
    fn dec(&self, _tx: &mut Transaction, _v: &[u8]) -> Result<()> {
        Ok(())
    }
    /// Whether two values hold the same references (an overwrite with an equal value drops
    /// nothing).
    fn same_refs(&self, a: &[u8], b: &[u8]) -> bool {
        a == b
    }
}

/// Values that hold no references, of the given size.
#[derive(Debug, Clone, Copy)]
pub struct PlainValue(pub usize);

impl ValueOps for PlainValue {
    fn value_size(&self) -> usize {
        self.0
    }
}

/// A `u64` value naming the root of a subtree whose values are `inner` (the top level of a
/// two-level tree). Dropping the last reference deletes the subtree.
pub struct SubtreeValue<'a>(pub &'a dyn ValueOps);

impl ValueOps for SubtreeValue<'_> {
    fn value_size(&self) -> usize {
        8
    }
    fn inc(&self, tx: &mut Transaction, v: &[u8]) -> Result<()> {
        tx.inc_meta(le(v))
    }
    fn dec(&self, tx: &mut Transaction, v: &[u8]) -> Result<()> {
        delete_tree(tx, le(v), self.0)
    }
}

fn le(v: &[u8]) -> u64 {
    u64::from_le_bytes(v[..8].try_into().expect("8-byte value"))
}

/// Create an empty tree (one empty leaf).
pub fn empty_tree(tx: &mut Transaction, value_size: usize) -> Result<u64> {
    let b = tx.new_block(BlockKind::Node)?;
    NodeMut(&mut tx.write(b)?[..]).init(true, value_size);
    Ok(b)
}

fn bad_tree(block: u64, message: String) -> Error {
    Error::Tree {
        block: MetaBlock(block),
        message,
    }
}

/// Anything that can read validated B-tree nodes: the transaction, or a read-only reader.
pub trait NodeSource {
    /// Read node `b`, checking checksum, block number and shape (leaf value size).
    fn read_node(&mut self, b: u64, value_size: usize) -> Result<Arc<Block>>;
}

impl NodeSource for Transaction {
    fn read_node(&mut self, b: u64, value_size: usize) -> Result<Arc<Block>> {
        Transaction::read_node(self, b, value_size)
    }
}

impl NodeSource for BlockReader {
    fn read_node(&mut self, b: u64, value_size: usize) -> Result<Arc<Block>> {
        let blk = self.read(b, BlockKind::Node)?;
        checked_node(blk, b, value_size)
    }
}

/// `blk` (read from block `b`) if its node header has the expected shape.
pub(crate) fn checked_node(blk: Arc<Block>, b: u64, value_size: usize) -> Result<Arc<Block>> {
    NodeRef(&blk[..])
        .check_shape(Some(value_size))
        .map_err(|fault| Error::Node {
            block: MetaBlock(b),
            fault,
        })?;
    Ok(blk)
}

/// Look up `key`; returns a copy of its value.
pub fn lookup(
    tx: &mut dyn NodeSource,
    root: u64,
    key: u64,
    value_size: usize,
) -> Result<Option<Vec<u8>>> {
    lookup_with(tx, root, key, value_size, |v| v.to_vec())
}

/// Look up a `u64` value (no allocation: the I/O path looks up every block this way).
pub fn lookup_u64(tx: &mut dyn NodeSource, root: u64, key: u64) -> Result<Option<u64>> {
    lookup_with(tx, root, key, 8, le)
}

/// Look up `key` and hand its value to `f`.
fn lookup_with<T>(
    tx: &mut dyn NodeSource,
    root: u64,
    key: u64,
    value_size: usize,
    f: impl FnOnce(&[u8]) -> T,
) -> Result<Option<T>> {
    let mut b = root;
    for _depth in 0..64 {
        let blk = tx.read_node(b, value_size)?;
        let n = NodeRef(&blk[..]);
        let Some(i) = n.lower_bound(key) else {
            return Ok(None);
        };
        if n.is_leaf() {
            return Ok((n.key(i) == key).then(|| f(n.value(i))));
        }
        b = n.value_u64(i);
    }
    Err(bad_tree(
        root,
        "tree deeper than 64 levels (a cycle?)".into(),
    ))
}

/// The largest key in the tree (down the last child of every node: one node per level), or
/// `None` for an empty tree.
pub fn last_key(tx: &mut dyn NodeSource, root: u64, value_size: usize) -> Result<Option<u64>> {
    let mut b = root;
    for _depth in 0..64 {
        let blk = tx.read_node(b, value_size)?;
        let n = NodeRef(&blk[..]);
        let Some(i) = n.nr_entries().checked_sub(1) else {
            return Ok(None);
        };
        if n.is_leaf() {
            return Ok(Some(n.key(i)));
        }
        b = n.value_u64(i);
    }
    Err(bad_tree(
        root,
        "tree deeper than 64 levels (a cycle?)".into(),
    ))
}

/// Visit every `(key, value)` in key order; the visitor returns `false` to stop.
pub fn walk(
    tx: &mut dyn NodeSource,
    root: u64,
    value_size: usize,
    f: &mut dyn FnMut(u64, &[u8]) -> Result<bool>,
) -> Result<()> {
    walk_from(tx, root, 0, value_size, f).map(|_| ())
}

/// Visit every `(key, value)` with `key >= start` in key order; returns `false` if stopped.
pub fn walk_from(
    tx: &mut dyn NodeSource,
    root: u64,
    start: u64,
    value_size: usize,
    f: &mut dyn FnMut(u64, &[u8]) -> Result<bool>,
) -> Result<bool> {
    walk_rec(tx, root, start, value_size, f, 0)
}

fn walk_rec(
    tx: &mut dyn NodeSource,
    b: u64,
    start: u64,
    value_size: usize,
    f: &mut dyn FnMut(u64, &[u8]) -> Result<bool>,
    depth: usize,
) -> Result<bool> {
    if depth > 64 {
        return Err(bad_tree(b, "tree deeper than 64 levels (a cycle?)".into()));
    }
    let blk = tx.read_node(b, value_size)?;
    let n = NodeRef(&blk[..]);
    let first = n.lower_bound(start).unwrap_or(0);
    if n.is_leaf() {
        for i in first..n.nr_entries() {
            if n.key(i) >= start && !f(n.key(i), n.value(i))? {
                return Ok(false);
            }
        }
    } else {
        for i in first..n.nr_entries() {
            if !walk_rec(tx, n.value_u64(i), start, value_size, f, depth + 1)? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Shadow a node and, if it was shared, take references on what it points to.
fn shadow_node(tx: &mut Transaction, b: u64, ops: &dyn ValueOps) -> Result<u64> {
    let (nb, shared) = tx.shadow(b, BlockKind::Node)?;
    if shared {
        let blk = tx.read_node(nb, ops.value_size())?;
        let n = NodeRef(&blk[..]);
        if n.is_leaf() {
            for i in 0..n.nr_entries() {
                ops.inc(tx, n.value(i))?;
            }
        } else {
            for i in 0..n.nr_entries() {
                tx.inc_meta(n.value_u64(i))?;
            }
        }
    }
    Ok(nb)
}

fn is_full(blk: &Block) -> bool {
    let n = NodeRef(&blk[..]);
    n.nr_entries() >= n.max_entries()
}

/// Split the (shadowed, full) root beneath itself: its entries go into two new children and
/// it becomes an internal node with two entries, keeping its block.
fn split_beneath(tx: &mut Transaction, root: u64) -> Result<()> {
    let src: Box<Block> = Box::new(*tx.write(root)?);
    let n = NodeRef(&src[..]);
    let (nr, leaf, vs) = (n.nr_entries(), n.is_leaf(), n.value_size());
    let half = nr / 2;
    let left = tx.new_block(BlockKind::Node)?;
    {
        let mut l = NodeMut(&mut tx.write(left)?[..]);
        l.init(leaf, vs);
        append_entries(&mut l, n, 0, half);
    }
    let right = tx.new_block(BlockKind::Node)?;
    {
        let mut r = NodeMut(&mut tx.write(right)?[..]);
        r.init(leaf, vs);
        append_entries(&mut r, n, half, nr - half);
    }
    let mut root_node = NodeMut(&mut tx.write(root)?[..]);
    root_node.init(false, 8);
    root_node.insert_at(0, n.key(0), &left.to_le_bytes());
    root_node.insert_at(1, n.key(half), &right.to_le_bytes());
    Ok(())
}

/// Split full child `c` (slot `i` of non-full `parent`) into `c` and a new right sibling.
/// Returns the sibling and its first key.
fn split_child(tx: &mut Transaction, parent: u64, i: usize, c: u64) -> Result<(u64, u64)> {
    let src: Box<Block> = Box::new(*tx.write(c)?);
    let n = NodeRef(&src[..]);
    let (nr, leaf, vs) = (n.nr_entries(), n.is_leaf(), n.value_size());
    let half = nr / 2;
    let r = tx.new_block(BlockKind::Node)?;
    {
        let mut rn = NodeMut(&mut tx.write(r)?[..]);
        rn.init(leaf, vs);
        append_entries(&mut rn, n, half, nr - half);
    }
    NodeMut(&mut tx.write(c)?[..]).set_nr_entries(half);
    let rkey = n.key(half);
    NodeMut(&mut tx.write(parent)?[..]).insert_at(i + 1, rkey, &r.to_le_bytes());
    Ok((r, rkey))
}

/// Insert or overwrite `key` with `value`. On overwrite with a value holding other references
/// the old value's references are dropped. Returns the new root and whether the key is new.
pub fn insert(
    tx: &mut Transaction,
    root: u64,
    key: u64,
    value: &[u8],
    ops: &dyn ValueOps,
) -> Result<(u64, bool)> {
    let mut is_new = false;
    let root = update(tx, root, key, ops, &mut |tx, old| {
        match old {
            Some(old) if !ops.same_refs(old, value) => ops.dec(tx, old)?,
            Some(_) => {}
            None => is_new = true,
        }
        Ok(value.to_vec())
    })?;
    Ok((root, is_new))
}

/// The callback of [`update`]: old value in, new value out.
pub type UpdateFn<'a> = dyn FnMut(&mut Transaction, Option<&[u8]>) -> Result<Vec<u8>> + 'a;

/// Descend to `key`'s leaf (shadowing the path), call `f` with the old value (if any), and
/// store what it returns. `f` may use the transaction (for example to change a subtree whose
/// root the value is); references of the old value are `f`'s business. Returns the new root.
pub fn update(
    tx: &mut Transaction,
    root: u64,
    key: u64,
    ops: &dyn ValueOps,
    f: &mut UpdateFn<'_>,
) -> Result<u64> {
    let vs = ops.value_size();
    tx.read_node(root, vs)?;
    let root = shadow_node(tx, root, ops)?;
    if is_full(tx.write(root)?) {
        split_beneath(tx, root)?;
    }
    let mut b = root;
    for _depth in 0..64 {
        let blk = tx.read_node(b, vs)?;
        let n = NodeRef(&blk[..]);
        let pos = n.lower_bound(key);
        if n.is_leaf() {
            let (new_value, slot_exists, slot) = match pos {
                Some(i) if n.key(i) == key => (f(tx, Some(n.value(i)))?, true, i),
                Some(i) => (f(tx, None)?, false, i + 1),
                None => (f(tx, None)?, false, 0),
            };
            let mut w = NodeMut(&mut tx.write(b)?[..]);
            if slot_exists {
                w.set_value(slot, &new_value);
            } else {
                w.insert_at(slot, key, &new_value);
            }
            return Ok(root);
        }
        let i = pos.unwrap_or(0);
        if pos.is_none() {
            NodeMut(&mut tx.write(b)?[..]).set_key(0, key);
        }
        let child = n.value_u64(i);
        tx.read_node(child, vs)?;
        let mut c = shadow_node(tx, child, ops)?;
        if c != child {
            NodeMut(&mut tx.write(b)?[..]).set_value_u64(i, c);
        }
        if is_full(tx.write(c)?) {
            let (r, rkey) = split_child(tx, b, i, c)?;
            if key >= rkey {
                c = r;
            }
        }
        b = c;
    }
    Err(bad_tree(root, "tree deeper than 64 levels".into()))
}

/// Remove `key`, dropping its value's references. Returns the new root and the old value.
pub fn remove(
    tx: &mut Transaction,
    root: u64,
    key: u64,
    ops: &dyn ValueOps,
) -> Result<(u64, Option<Vec<u8>>)> {
    if lookup(tx, root, key, ops.value_size())?.is_none() {
        return Ok((root, None));
    }
    let (root, old) = remove_rec(tx, root, key, ops, 0)?;
    // An internal root with one child: pull the child up into the root block.
    loop {
        let blk = tx.read_node(root, ops.value_size())?;
        let n = NodeRef(&blk[..]);
        if n.is_leaf() || n.nr_entries() != 1 {
            break;
        }
        let child = n.value_u64(0);
        let cblk = tx.read_node(child, ops.value_size())?;
        if tx.meta_count(child)? > 1 {
            // Shared child: copy it and take its references, then drop ours.
            *tx.write(root)? = *cblk;
            let n = NodeRef(&cblk[..]);
            for i in 0..n.nr_entries() {
                if n.is_leaf() {
                    ops.inc(tx, n.value(i))?;
                } else {
                    tx.inc_meta(n.value_u64(i))?;
                }
            }
        } else {
            *tx.write(root)? = *cblk;
        }
        tx.dec_meta(child)?;
    }
    if let Some(v) = &old {
        ops.dec(tx, v)?;
    }
    Ok((root, old))
}

fn remove_rec(
    tx: &mut Transaction,
    b: u64,
    key: u64,
    ops: &dyn ValueOps,
    depth: usize,
) -> Result<(u64, Option<Vec<u8>>)> {
    if depth > 64 {
        return Err(bad_tree(b, "tree deeper than 64 levels".into()));
    }
    let vs = ops.value_size();
    let b = shadow_node(tx, b, ops)?;
    let blk = tx.read_node(b, vs)?;
    let n = NodeRef(&blk[..]);
    let Some(i) = n.lower_bound(key) else {
        return Ok((b, None));
    };
    if n.is_leaf() {
        if n.key(i) != key {
            return Ok((b, None));
        }
        let old = n.value(i).to_vec();
        NodeMut(&mut tx.write(b)?[..]).remove_at(i);
        return Ok((b, Some(old)));
    }
    let (c, old) = remove_rec(tx, n.value_u64(i), key, ops, depth + 1)?;
    NodeMut(&mut tx.write(b)?[..]).set_value_u64(i, c);
    let cblk = tx.read_node(c, vs)?;
    let cn = NodeRef(&cblk[..]);
    if cn.nr_entries() < cn.max_entries() / 3 && n.nr_entries() > 1 {
        rebalance(tx, b, i, ops)?;
    }
    Ok((b, old))
}

/// Child `i` of `parent` is underfull: merge it with a sibling or share the sibling's entries.
fn rebalance(tx: &mut Transaction, parent: u64, i: usize, ops: &dyn ValueOps) -> Result<()> {
    let vs = ops.value_size();
    let pblk = tx.read_node(parent, vs)?;
    let p = NodeRef(&pblk[..]);
    let j = if i > 0 { i - 1 } else { i };
    let (lb, rb) = (p.value_u64(j), p.value_u64(j + 1));
    let lb = shadow_node(tx, lb, ops)?;
    let rb = shadow_node(tx, rb, ops)?;
    let lblk: Box<Block> = Box::new(*tx.write(lb)?);
    let rblk: Box<Block> = Box::new(*tx.write(rb)?);
    let (l, r) = (NodeRef(&lblk[..]), NodeRef(&rblk[..]));
    let (nl, nr, max) = (l.nr_entries(), r.nr_entries(), l.max_entries());
    if nl + nr <= max {
        // Merge right into left; drop right.
        append_entries(&mut NodeMut(&mut tx.write(lb)?[..]), r, 0, nr);
        let mut pw = NodeMut(&mut tx.write(parent)?[..]);
        pw.set_value_u64(j, lb);
        pw.remove_at(j + 1);
        tx.dec_meta(rb)?;
        return Ok(());
    }
    // Redistribute so that both hold about half.
    let total = nl + nr;
    let new_nl = total / 2;
    let mut lw_buf = [0u8; BLOCK_SIZE];
    let mut rw_buf = [0u8; BLOCK_SIZE];
    {
        let mut lw = NodeMut(&mut lw_buf[..]);
        lw.init(l.is_leaf(), l.value_size());
        let mut rw = NodeMut(&mut rw_buf[..]);
        rw.init(l.is_leaf(), l.value_size());
        if new_nl <= nl {
            append_entries(&mut lw, l, 0, new_nl);
            append_entries(&mut rw, l, new_nl, nl - new_nl);
            append_entries(&mut rw, r, 0, nr);
        } else {
            append_entries(&mut lw, l, 0, nl);
            append_entries(&mut lw, r, 0, new_nl - nl);
            append_entries(&mut rw, r, new_nl - nl, nr - (new_nl - nl));
        }
    }
    let rkey = NodeRef(&rw_buf[..]).key(0);
    *tx.write(lb)? = lw_buf;
    *tx.write(rb)? = rw_buf;
    let mut pw = NodeMut(&mut tx.write(parent)?[..]);
    pw.set_value_u64(j, lb);
    pw.set_value_u64(j + 1, rb);
    pw.set_key(j + 1, rkey);
    Ok(())
}

/// Drop one reference on the tree at `root`; if it was the last, free its nodes and drop the
/// references its values hold (section 8, "deleting a tree").
pub fn delete_tree(tx: &mut Transaction, root: u64, ops: &dyn ValueOps) -> Result<()> {
    if tx.meta_count(root)? > 1 {
        tx.dec_meta(root)?;
        return Ok(());
    }
    let blk = tx.read_node(root, ops.value_size())?;
    let n = NodeRef(&blk[..]);
    for i in 0..n.nr_entries() {
        if n.is_leaf() {
            ops.dec(tx, n.value(i))?;
        } else {
            delete_tree(tx, n.value_u64(i), ops)?;
        }
    }
    tx.dec_meta(root)?;
    Ok(())
}

/// True if the node at `b` is internal (for tools walking shapes).
pub fn is_internal(blk: &Block) -> bool {
    NodeRef(&blk[..]).flags() == INTERNAL_NODE
}
