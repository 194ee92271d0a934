//! The per-block lock table (the kernel's "bio prison"): requests that touch the same virtual
//! block of the same device are ordered; others run in parallel. Readers and in-place writers
//! share a cell; provisioning, copy-on-write and discard hold it alone, so that a reader never
//! reads a data block after its mapping changed under it.
//!
//! The table is split into shards by a hash of the key. A shard holds only the cells in use,
//! a handful at a time (the requests in flight, at most a few hundred blocks for a large
//! request or a discard batch), so it keeps them in a small vector: a linear scan of a few
//! entries costs less than hashing. Releasing a cell wakes waiters only if there are any (a
//! condition variable's notify is a system call even when nobody waits).

use std::sync::{Condvar, Mutex};

const SHARDS: usize = 64;

struct Cell {
    key: (u32, u64),
    readers: u32,
    writer: bool,
}

#[derive(Default)]
struct Cells {
    held: Vec<Cell>,
    /// Threads waiting on this shard's condition variable.
    waiters: u32,
}

#[derive(Default)]
struct Shard {
    cells: Mutex<Cells>,
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
            let free = match cells.held.iter_mut().find(|c| c.key == key) {
                None => {
                    cells.held.push(Cell {
                        key,
                        readers: u32::from(!exclusive),
                        writer: exclusive,
                    });
                    true
                }
                Some(cell) if !cell.writer && (!exclusive || cell.readers == 0) => {
                    if exclusive {
                        cell.writer = true;
                    } else {
                        cell.readers += 1;
                    }
                    true
                }
                Some(_) => false,
            };
            if free {
                return CellGuard {
                    prison: self,
                    key,
                    exclusive,
                };
            }
            cells.waiters += 1;
            cells = shard.cv.wait(cells).expect("prison lock poisoned");
            cells.waiters -= 1;
        }
    }

    /// Cells held now, over all shards (for tests).
    #[cfg(test)]
    fn nr_held(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.cells.lock().expect("prison lock poisoned").held.len())
            .sum()
    }
}

impl Drop for CellGuard<'_> {
    fn drop(&mut self) {
        let shard = self.prison.shard(self.key);
        let mut cells = shard.cells.lock().expect("prison lock poisoned");
        if let Some(i) = cells.held.iter().position(|c| c.key == self.key) {
            let cell = &mut cells.held[i];
            if self.exclusive {
                cell.writer = false;
            } else {
                cell.readers -= 1;
            }
            if !cell.writer && cell.readers == 0 {
                cells.held.swap_remove(i);
            }
        }
        let wake = cells.waiters > 0;
        drop(cells);
        if wake {
            shard.cv.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn readers_share_a_cell_writers_hold_it_alone() {
        let p = Prison::new();
        let a = p.shared(1, 5);
        let b = p.shared(1, 5);
        let c = p.exclusive(1, 6);
        let d = p.exclusive(2, 5);
        assert_eq!(p.nr_held(), 3);
        drop((a, b, c, d));
        assert_eq!(p.nr_held(), 0);
    }

    /// A waiter is woken when the cell it waits for is released, and the cell is never held
    /// by a writer and anyone else at once.
    #[test]
    fn waiters_are_woken_and_writers_exclude_everyone() {
        let p = Arc::new(Prison::new());
        let inside = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (p, inside) = (p.clone(), inside.clone());
                std::thread::spawn(move || {
                    for i in 0..2000u32 {
                        if (i + t) % 3 == 0 {
                            let _g = p.exclusive(7, 7);
                            assert_eq!(inside.fetch_add(1000, Ordering::SeqCst), 0);
                            inside.fetch_sub(1000, Ordering::SeqCst);
                        } else {
                            let _g = p.shared(7, 7);
                            assert!(inside.fetch_add(1, Ordering::SeqCst) < 1000);
                            inside.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(p.nr_held(), 0);
    }
}
