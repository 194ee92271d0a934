//! The per-block lock table (the kernel's "bio prison"): requests that touch the same virtual
//! block of the same device are ordered; others run in parallel. Readers and in-place writers
//! share a cell; provisioning, copy-on-write and discard hold it alone, so that a reader never
//! reads a data block after its mapping changed under it.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};

const SHARDS: usize = 64;

#[derive(Default)]
struct Cell {
    readers: u32,
    writer: bool,
}

#[derive(Default)]
struct Shard {
    cells: Mutex<HashMap<(u32, u64), Cell>>,
    cv: Condvar,
}

/// The lock table.
pub(crate) struct Prison {
    shards: Vec<Shard>,
}

/// A held cell; released on drop.
pub(crate) struct CellGuard<'a> {
    prison: &'a Prison,
    key: (u32, u64),
    exclusive: bool,
}

impl Prison {
    pub fn new() -> Self {
        Prison {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }

    fn shard(&self, key: (u32, u64)) -> &Shard {
        let h = (key.0 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ key.1.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        &self.shards[(h >> 58) as usize % SHARDS]
    }

    /// Hold block `vblock` of device `thin` shared (reads, in-place writes).
    pub fn shared(&self, thin: u32, vblock: u64) -> CellGuard<'_> {
        self.lock(thin, vblock, false)
    }

    /// Hold block `vblock` of device `thin` alone (mapping changes).
    pub fn exclusive(&self, thin: u32, vblock: u64) -> CellGuard<'_> {
        self.lock(thin, vblock, true)
    }

    fn lock(&self, thin: u32, vblock: u64, exclusive: bool) -> CellGuard<'_> {
        let key = (thin, vblock);
        let shard = self.shard(key);
        let mut cells = shard.cells.lock().expect("prison lock poisoned");
        loop {
            let cell = cells.entry(key).or_default();
            let free = if exclusive {
                !cell.writer && cell.readers == 0
            } else {
                !cell.writer
            };
            if free {
                if exclusive {
                    cell.writer = true;
                } else {
                    cell.readers += 1;
                }
                return CellGuard {
                    prison: self,
                    key,
                    exclusive,
                };
            }
            cells = shard.cv.wait(cells).expect("prison lock poisoned");
        }
    }
}

impl Drop for CellGuard<'_> {
    fn drop(&mut self) {
        let shard = self.prison.shard(self.key);
        let mut cells = shard.cells.lock().expect("prison lock poisoned");
        let mut empty = false;
        if let Some(cell) = cells.get_mut(&self.key) {
            if self.exclusive {
                cell.writer = false;
            } else {
                cell.readers -= 1;
            }
            empty = !cell.writer && cell.readers == 0;
        }
        if empty {
            cells.remove(&self.key);
        }
        drop(cells);
        shard.cv.notify_all();
    }
}
