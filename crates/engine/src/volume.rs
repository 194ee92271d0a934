//! [`Volume`]: I/O on one thin volume with the kernel's semantics (format spec section 15).
//!
//! A request is split at block boundaries. For each block:
//!
//! - read: mapped → read the data block; unmapped → zeros (nothing is allocated);
//! - write: mapped and not shared → in place; unmapped → allocate, write the whole block (the
//!   rest zeroed unless zeroing is off), map it; shared (mapped before the device's last
//!   snapshot) → allocate, copy, apply, remap (copy-on-write);
//! - discard: whole blocks are unmapped, partial blocks at either end are left alone;
//! - write-zeroes: whole blocks unmapped, partial blocks zero-filled if mapped;
//! - flush / FUA: data sync, then metadata commit.
//!
//! Data is written before the mapping that points at it is inserted; the commit syncs the
//! data device before the metadata (section 9.2).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::pool::{Inner, MetaState, PoolMode, VolState};
use crate::stats::IoOp;
use crate::{Error, Result};

/// A handle for I/O on a volume. Cheap to clone; usable from many threads at once.
pub struct Volume {
    inner: Arc<Inner>,
    vs: Arc<VolState>,
    /// Aborts that dropped uncommitted changes, as counted at this handle's last flush.
    seen_dropped: AtomicU64,
}

impl Clone for Volume {
    fn clone(&self) -> Self {
        Volume::new(self.inner.clone(), self.vs.clone())
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        self.vs.handles.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One block's part of a request.
struct Piece {
    vblock: u64,
    /// Offset inside the block.
    off: usize,
    /// Offset inside the request.
    at: usize,
    len: usize,
}

fn pieces(offset: u64, len: u64, bs: u64) -> impl Iterator<Item = Piece> {
    let mut pos = offset;
    let end = offset + len;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let vblock = pos / bs;
        let off = pos % bs;
        let n = (bs - off).min(end - pos);
        let p = Piece {
            vblock,
            off: off as usize,
            at: (pos - offset) as usize,
            len: n as usize,
        };
        pos += n;
        Some(p)
    })
}

/// Metadata blocks kept free for commits and B-tree splits: the kernel's reserve
/// (min(4096, total / 10)), at least 16.
fn metadata_reserve(total: u64) -> u64 {
    (total / 10).clamp(16, 4096)
}

impl Volume {
    pub(crate) fn new(inner: Arc<Inner>, vs: Arc<VolState>) -> Self {
        vs.handles.fetch_add(1, Ordering::SeqCst);
        let seen_dropped = AtomicU64::new(inner.md_io().dropped.0);
        Volume {
            inner,
            vs,
            seen_dropped,
        }
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.vs.name
    }

    /// Current virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.vs.size.load(Ordering::SeqCst)
    }

    /// The pool's block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.inner.block_size
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "volume {}: range {offset}+{len} is past its end ({size} bytes)",
                self.vs.name
            ))),
        }
    }

    /// Writes to a pool opened for reading only are refused before they reach a device.
    fn check_writable(&self) -> Result<()> {
        if self.inner.opts.read_only {
            return Err(self.inner.read_only_error());
        }
        Ok(())
    }

    /// The error of every I/O on a failed pool (the abort of a failed metadata operation
    /// could not read the last commit back), naming the failure as the pool's other errors do.
    fn failed(&self, st: &MetaState) -> Error {
        Error::ReadOnly(format!(
            "the pool in {} is failed since a metadata operation failed: {}",
            self.inner.root.display(),
            st.failure.as_deref().unwrap_or("cause not recorded")
        ))
    }

    fn lookup(&self, vblock: u64) -> Result<Option<thinpool_thin::metadata::Lookup>> {
        let mut st = self.inner.md_io();
        if st.mode == PoolMode::Fail {
            return Err(self.failed(&st));
        }
        st.find(self.vs.thin, vblock)
    }

    /// Read `buf.len()` bytes at `offset`. Unmapped blocks read as zeros. The blocks of one
    /// request are looked up together and contiguous data blocks are read with one call.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_sparse(buf, offset).map(|_| ())
    }

    /// [`read_at`](Self::read_at), also saying where the unmapped blocks are: returns the
    /// holes as `(start, len)` inside `buf`, merged and ascending (they read as zeros). An NBD
    /// server answers those parts with hole chunks.
    pub fn read_sparse(&self, buf: &mut [u8], offset: u64) -> Result<Vec<(usize, usize)>> {
        let _t = self.inner.stats.timer(IoOp::Read, buf.len() as u64);
        self.check_range(offset, buf.len() as u64)?;
        let _q = self.vs.quiesce.read().expect("quiesce lock poisoned");
        let bs = self.inner.block_size;
        let thin = self.vs.thin.get();
        if !buf.is_empty() && offset / bs == (offset + buf.len() as u64 - 1) / bs {
            // One block, the usual request: nothing to allocate.
            let vblock = offset / bs;
            let _cell = self.inner.prison.shared(thin, vblock);
            return match self.lookup(vblock)? {
                Some(l) => {
                    self.inner
                        .data
                        .read_at(buf, l.data_block * bs + offset % bs)?;
                    Ok(Vec::new())
                }
                None => {
                    buf.fill(0);
                    Ok(vec![(0, buf.len())])
                }
            };
        }
        let pieces: Vec<Piece> = pieces(offset, buf.len() as u64, bs).collect();
        // Cells in ascending order (as every multi-block locker takes them): no deadlock.
        let _cells: Vec<_> = pieces
            .iter()
            .map(|p| self.inner.prison.shared(thin, p.vblock))
            .collect();
        let mapped: Vec<Option<u64>> = {
            let mut st = self.inner.md_io();
            if st.mode == PoolMode::Fail {
                return Err(self.failed(&st));
            }
            pieces
                .iter()
                .map(|p| Ok(st.find(self.vs.thin, p.vblock)?.map(|l| l.data_block)))
                .collect::<Result<_>>()?
        };
        let mut holes: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < pieces.len() {
            let p = &pieces[i];
            let Some(d) = mapped[i] else {
                buf[p.at..p.at + p.len].fill(0);
                match holes.last_mut() {
                    Some((s, l)) if *s + *l == p.at => *l += p.len,
                    _ => holes.push((p.at, p.len)),
                }
                i += 1;
                continue;
            };
            // Extend over following pieces that continue in the next data block.
            let mut j = i + 1;
            while j < pieces.len() && mapped[j] == Some(d + (j - i) as u64) {
                j += 1;
            }
            let last = &pieces[j - 1];
            let out = &mut buf[p.at..last.at + last.len];
            self.inner.data.read_at(out, d * bs + p.off as u64)?;
            i = j;
        }
        Ok(holes)
    }

    /// Write `data` at `offset` (durable after the next flush or commit).
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        let _t = self.inner.stats.timer(IoOp::Write, data.len() as u64);
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        let _q = self.vs.quiesce.read().expect("quiesce lock poisoned");
        for p in pieces(offset, data.len() as u64, self.inner.block_size) {
            self.write_piece(p.vblock, p.off, &data[p.at..p.at + p.len])?;
        }
        Ok(())
    }

    /// Write `data` at `offset` and make it durable before returning (FUA).
    pub fn write_fua(&self, data: &[u8], offset: u64) -> Result<()> {
        self.write_at(data, offset)?;
        let _t = self.inner.stats.timer(IoOp::Flush, 0);
        self.commit_and_report()
    }

    /// Commit, then fail once if an abort dropped uncommitted changes since this handle's last
    /// flush: those writes were acknowledged but are gone, and a flush must not say they are
    /// durable (like an `fsync` reporting a write-back error once per open file).
    ///
    /// A flush whose own commit fails reports the loss itself: the aborts up to the one that
    /// commit made (at most one more than counted before it) are seen, and the next flush,
    /// with space back, does not fail for them again. An abort after it (the commit timer's)
    /// may drop writes made since, so it still counts.
    fn commit_and_report(&self) -> Result<()> {
        let before = self.inner.md().dropped.0;
        if let Err(e) = self.inner.commit() {
            let now = self.inner.md().dropped.0;
            self.seen_dropped
                .fetch_max(now.min(before + 1), Ordering::SeqCst);
            return Err(e);
        }
        let (dropped, why) = self.inner.md().dropped.clone();
        if self.seen_dropped.swap(dropped, Ordering::SeqCst) != dropped {
            return Err(Error::NoSpace(format!(
                "writes to volume {} since its last flush may be lost: the metadata transaction was aborted ({why})",
                self.vs.name
            )));
        }
        Ok(())
    }

    fn write_piece(&self, vblock: u64, off: usize, piece: &[u8]) -> Result<()> {
        let bs = self.inner.block_size;
        let thin = self.vs.thin.get();
        {
            // Fast path: an exclusive mapping is written in place.
            let _cell = self.inner.prison.shared(thin, vblock);
            if let Some(l) = self.lookup(vblock)?
                && !l.shared
            {
                self.inner
                    .data
                    .write_at(piece, l.data_block * bs + off as u64)?;
                return Ok(());
            }
        }
        let _cell = self.inner.prison.exclusive(thin, vblock);
        let old = self.lookup(vblock)?;
        if let Some(l) = old
            && !l.shared
        {
            self.inner
                .data
                .write_at(piece, l.data_block * bs + off as u64)?;
            return Ok(());
        }
        let whole = piece.len() as u64 == bs;
        let (new, zeroed) = self.alloc_block()?;
        let r = (|| -> Result<()> {
            let pos = new * bs;
            if whole {
                self.inner.data.write_at(piece, pos)?;
            } else if let Some(l) = old
                && !self.inner.data.copies_by_reference()
                && self.inner.data.all_data(l.data_block * bs, bs)?
            {
                self.copy_on_write(l.data_block, new, off, piece, zeroed)?;
            } else if let Some(l) = old {
                // Copy-on-write into a zeroed block, by reference where the device can (a
                // reflink), else of a block with holes: the old block's bytes around the
                // write, then the write. The device copies only what is not zero (a sparse
                // file skips its holes): a mostly empty block costs what its data costs.
                if !zeroed {
                    self.inner.data.punch_hole(pos, bs)?;
                }
                let from = l.data_block * bs;
                let (off, end) = (off as u64, (off + piece.len()) as u64);
                if off > 0 {
                    self.inner.data.copy_into_zeroed(from, pos, off)?;
                }
                if end < bs {
                    self.inner
                        .data
                        .copy_into_zeroed(from + end, pos + end, bs - end)?;
                }
                self.inner.data.write_at(piece, pos + off)?;
            } else if self.inner.opts.zero_new_blocks {
                // Zero the new block by deallocating it (a sparse file reads zeros there; a
                // block device gets zeros written), unless it is known to read zeros already,
                // then write the piece: far fewer bytes than writing a whole zero-filled
                // block for a small write.
                if !zeroed {
                    self.inner.data.punch_hole(pos, bs)?;
                }
                self.inner.data.write_at(piece, pos + off as u64)?;
            } else {
                self.inner.data.write_at(piece, pos + off as u64)?;
            }
            Ok(())
        })();
        let mut st = self.inner.md_io();
        if let Err(e) = r {
            let _ = st.md.release_data_block(new);
            if e.is_host_full() {
                // Shown by `status` until a commit succeeds again.
                st.host_full = Some(format!("host file system full: {e}"));
            }
            return Err(e);
        }
        st.map(self.vs.thin, vblock, new)?;
        self.inner.inserts.fetch_add(1, Ordering::SeqCst);
        self.inner.stats.provisioned(old.is_some());
        Ok(())
    }

    /// Copy-on-write of block `from`, stored throughout, into the new block `to` (`zeroed`:
    /// known to read zeros) with `piece` written at `off`, where the device copies bytes: the
    /// old block is read, the piece laid over it, and the block written whole in one call,
    /// which needs no zeroing first. Where it holds 4 KiB pieces of zeros, only the others are
    /// written, into a zeroed block, so that they stay unallocated in a sparse file. (A block
    /// with holes is copied in parts instead: reading its holes would fill the page cache with
    /// zeros, a third slower in the engine bench's sparse copy-on-write.)
    fn copy_on_write(
        &self,
        from: u64,
        to: u64,
        off: usize,
        piece: &[u8],
        zeroed: bool,
    ) -> Result<()> {
        let bs = self.inner.block_size;
        let mut block = vec![0u8; bs as usize];
        self.inner.data.read_at(&mut block, from * bs)?;
        block[off..off + piece.len()].copy_from_slice(piece);
        let dense = !block.chunks(4096).any(thinpool_io::is_zero);
        if dense {
            self.inner.data.write_at(&block, to * bs)?;
        } else {
            if !zeroed {
                self.inner.data.punch_hole(to * bs, bs)?;
            }
            thinpool_io::write_nonzero(&*self.inner.data, &block, to * bs)?;
        }
        Ok(())
    }

    /// Check that a metadata change can complete: the free metadata blocks (beyond the
    /// kernel's reserve) must not be exhausted, or the pool goes read-only with a clear error
    /// instead of failing half-way through a B-tree change (section 16.2).
    fn metadata_room(&self, st: &mut MetaState) -> Result<()> {
        let total = st.md.nr_metadata_blocks();
        let reserve = metadata_reserve(total);
        if st.md.nr_free_metadata_blocks() > reserve {
            return Ok(());
        }
        st.mode = PoolMode::ReadOnly;
        Err(Error::NoSpace(format!(
            "the pool's metadata is full ({} of {total} blocks free, {reserve} kept in reserve): grow the metadata device (`thinpool pool grow --metadata-size`)",
            st.md.nr_free_metadata_blocks()
        )))
    }

    /// Allocate a data block, waiting for space (queue mode) or failing at once. Also says
    /// whether the block is known to read as zeros (see `zeroed`).
    fn alloc_block(&self) -> Result<(u64, bool)> {
        let start = Instant::now();
        let mut committed = false;
        let mut st = self.inner.md_io_writable()?;
        loop {
            if st.mode == PoolMode::ReadOnly || st.mode == PoolMode::Fail {
                return Err(Error::ReadOnly(
                    "the pool is read-only: no new blocks can be mapped".into(),
                ));
            }
            if st.md.nr_free_metadata_blocks() <= metadata_reserve(st.md.nr_metadata_blocks())
                && st.dirty
                && !committed
            {
                // Metadata freed in this transaction becomes usable after a commit.
                drop(st);
                self.inner.commit()?;
                committed = true;
                st = self.inner.md_io_writable()?;
                continue;
            }
            self.metadata_room(&mut st)?;
            if let Some(b) = st.md.alloc_data_block()? {
                let free = st.md.nr_free_data_blocks();
                let mark = self.inner.opts.low_water_mark;
                if mark > 0 && free <= mark && !st.low_water_fired {
                    st.low_water_fired = true;
                    tracing::warn!(free, mark, "pool data space below the low-water mark");
                }
                self.inner.watch.check(&mut st, self.inner.block_size);
                return Ok((b, st.zeroed.take(b)));
            }
            if st.dirty && !committed {
                // Blocks freed in this transaction become free after a commit.
                drop(st);
                self.inner.commit()?;
                committed = true;
                st = self.inner.md_io_writable()?;
                continue;
            }
            st.mode = PoolMode::OutOfDataSpace;
            let nr = st.md.nr_data_blocks();
            let full = || {
                Error::NoSpace(format!(
                    "the pool is out of data space (all {nr} blocks in use): grow it with `thinpool pool grow --data-size` or free space"
                ))
            };
            if self.inner.opts.error_if_no_space {
                return Err(full());
            }
            let waited = start.elapsed();
            let timeout = self.inner.opts.no_space_timeout;
            if waited >= timeout {
                return Err(full());
            }
            let (guard, _) = self
                .inner
                .space
                .wait_timeout(st, timeout - waited)
                .expect("metadata lock poisoned");
            st = guard;
            committed = false;
        }
    }

    /// Unmap the whole blocks inside `offset..offset+len`; partial blocks are left alone
    /// (as the kernel does). Freed blocks are punched out of the data file at the next commit.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _t = self.inner.stats.timer(IoOp::Discard, len);
        self.check_writable()?;
        self.check_range(offset, len)?;
        let _q = self.vs.quiesce.read().expect("quiesce lock poisoned");
        self.unmap_whole_blocks(offset, len)
    }

    fn unmap_whole_blocks(&self, offset: u64, len: u64) -> Result<()> {
        let bs = self.inner.block_size;
        let first = offset.div_ceil(bs);
        let end = (offset + len) / bs;
        let thin = self.vs.thin.get();
        let mut v = first;
        while v < end {
            let batch_end = (v + 256).min(end);
            let _cells: Vec<_> = (v..batch_end)
                .map(|b| self.inner.prison.exclusive(thin, b))
                .collect();
            let mut st = self.inner.md();
            if st.mode == PoolMode::ReadOnly || st.mode == PoolMode::Fail {
                return Ok(()); // discards complete without effect in read-only mode
            }
            self.metadata_room(&mut st)?;
            let removed = match st.md.remove_range(self.vs.thin, v, batch_end) {
                Ok(n) => n,
                Err(e) => return Err(st.failed("discarding", e.into())),
            };
            if removed > 0 {
                st.dirty = true;
            }
            v = batch_end;
        }
        Ok(())
    }

    /// Make `offset..offset+len` read zeros: whole blocks are unmapped, partial blocks that are
    /// mapped are zero-filled.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let _t = self.inner.stats.timer(IoOp::WriteZeroes, len);
        self.check_writable()?;
        self.check_range(offset, len)?;
        let _q = self.vs.quiesce.read().expect("quiesce lock poisoned");
        self.write_zeroes_unquiesced(offset, len)
    }

    pub(crate) fn write_zeroes_unquiesced(&self, offset: u64, len: u64) -> Result<()> {
        let bs = self.inner.block_size;
        for p in pieces(offset, len, bs) {
            if p.len as u64 == bs {
                continue;
            }
            if self.lookup(p.vblock)?.is_some() {
                self.write_piece(p.vblock, p.off, &vec![0u8; p.len])?;
            }
        }
        self.unmap_whole_blocks(offset, len)
    }

    /// Make everything written so far durable.
    pub fn flush(&self) -> Result<()> {
        let _t = self.inner.stats.timer(IoOp::Flush, 0);
        self.commit_and_report()
    }

    /// The mapped byte ranges inside `offset..offset+len`, merged, as `(offset, length)`.
    pub fn mapped_extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        self.check_range(offset, len)?;
        let bs = self.inner.block_size;
        let end = offset + len;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut st = self.inner.md();
        st.md.mappings(self.vs.thin, offset / bs, &mut |v, _, _| {
            let (s, e) = ((v * bs).max(offset), ((v + 1) * bs).min(end));
            if s >= end {
                return false;
            }
            match out.last_mut() {
                Some((o, l)) if *o + *l == s => *l += e - s,
                _ => out.push((s, e - s)),
            }
            true
        })?;
        Ok(out)
    }
}
