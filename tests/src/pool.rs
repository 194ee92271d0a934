//! A pool as `thin_dump` prints it: superblock fields, devices and their mappings, with the exact
//! XML text `thin_dump` 0.9.0 prints ([`Pool::to_xml`]), a reader for that text
//! ([`Pool::from_xml`]) and a random generator of valid pools ([`generate`]).
//!
//! `thin_dump` prints a device's mappings in virtual-block order and merges neighbours into one
//! `range_mapping` exactly when the virtual blocks are consecutive, the data blocks are
//! consecutive and the times are equal (across leaf boundaries too, with no length limit); a run
//! of length 1 is a `single_mapping`. [`Pool::to_xml`] does the same, so
//! `thin_dump(thin_restore(pool.to_xml())) == pool.to_xml()` byte for byte.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use rand::Rng;
use rand::seq::{IndexedRandom as _, SliceRandom as _};

/// One mapping of a virtual block: where its data lives and when it was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Data block in the pool's data device.
    pub data_block: u64,
    /// The pool's `time` when the block was provisioned (24 bits on disk).
    pub time: u32,
}

/// A thin device: its details and its mappings (virtual block → [`Mapping`]).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Device {
    /// Transaction id when the device was created.
    pub transaction: u64,
    /// Pool time when the device was created.
    pub creation_time: u32,
    /// Pool time of the device's last snapshot (or its creation).
    pub snap_time: u32,
    /// Virtual block → mapping, in order.
    pub mappings: BTreeMap<u64, Mapping>,
}

/// A whole pool as in `thin_dump`'s XML. `uuid` is always empty, `flags` 0 and `version` 2 in the
/// XML that thin-provisioning-tools 0.9.0 prints.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Pool {
    /// Superblock time.
    pub time: u32,
    /// Superblock transaction id.
    pub transaction: u64,
    /// Data block size in 512-byte sectors.
    pub data_block_size: u32,
    /// Number of data blocks in the data device.
    pub nr_data_blocks: u64,
    /// Devices by id (`dev_id` < 2^24).
    pub devices: BTreeMap<u32, Device>,
}

impl Pool {
    /// The XML `thin_dump` prints for this pool (see the module doc for how runs are merged).
    pub fn to_xml(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "<superblock uuid=\"\" time=\"{}\" transaction=\"{}\" flags=\"0\" version=\"2\" \
             data_block_size=\"{}\" nr_data_blocks=\"{}\">",
            self.time, self.transaction, self.data_block_size, self.nr_data_blocks
        );
        for (id, d) in &self.devices {
            let _ = writeln!(
                s,
                "  <device dev_id=\"{id}\" mapped_blocks=\"{}\" transaction=\"{}\" \
                 creation_time=\"{}\" snap_time=\"{}\">",
                d.mappings.len(),
                d.transaction,
                d.creation_time,
                d.snap_time
            );
            for r in runs(&d.mappings) {
                if r.len == 1 {
                    let _ = writeln!(
                        s,
                        "    <single_mapping origin_block=\"{}\" data_block=\"{}\" time=\"{}\"/>",
                        r.origin, r.data, r.time
                    );
                } else {
                    let _ = writeln!(
                        s,
                        "    <range_mapping origin_begin=\"{}\" data_begin=\"{}\" length=\"{}\" \
                         time=\"{}\"/>",
                        r.origin, r.data, r.len, r.time
                    );
                }
            }
            s.push_str("  </device>\n");
        }
        s.push_str("</superblock>\n");
        s
    }

    /// Read the XML of `thin_dump` / `thinpool meta dump` (one element per line, as they print
    /// it). `mapped_blocks` is checked against the mappings listed.
    pub fn from_xml(xml: &str) -> anyhow::Result<Pool> {
        let mut pool = Pool::default();
        let mut cur: Option<(u32, u64)> = None; // device id, declared mapped_blocks
        let mut seen_superblock = false;
        for (n, line) in xml.lines().enumerate() {
            let l = line.trim();
            let ctx = || format!("line {}: {line:?}", n + 1);
            let num = |name: &str| -> anyhow::Result<u64> {
                attr(l, name)
                    .with_context(|| format!("no attribute {name}"))?
                    .parse::<u64>()
                    .with_context(|| format!("attribute {name} is not a number"))
            };
            if l.is_empty() {
                continue;
            } else if l.starts_with("<superblock ") {
                pool.time = u32::try_from(num("time").with_context(ctx)?)?;
                pool.transaction = num("transaction").with_context(ctx)?;
                pool.data_block_size = u32::try_from(num("data_block_size").with_context(ctx)?)?;
                pool.nr_data_blocks = num("nr_data_blocks").with_context(ctx)?;
                seen_superblock = true;
            } else if l.starts_with("<device ") {
                let id = u32::try_from(num("dev_id").with_context(ctx)?)?;
                let dev = Device {
                    transaction: num("transaction").with_context(ctx)?,
                    creation_time: u32::try_from(num("creation_time").with_context(ctx)?)?,
                    snap_time: u32::try_from(num("snap_time").with_context(ctx)?)?,
                    mappings: BTreeMap::new(),
                };
                if pool.devices.insert(id, dev).is_some() {
                    bail!("{}: device {id} twice", ctx());
                }
                cur = Some((id, num("mapped_blocks").with_context(ctx)?));
            } else if l.starts_with("<single_mapping ") || l.starts_with("<range_mapping ") {
                let (id, _) =
                    cur.with_context(|| format!("{}: mapping outside a device", ctx()))?;
                let (origin, data, len) = if l.starts_with("<single_mapping ") {
                    (
                        num("origin_block").with_context(ctx)?,
                        num("data_block").with_context(ctx)?,
                        1,
                    )
                } else {
                    (
                        num("origin_begin").with_context(ctx)?,
                        num("data_begin").with_context(ctx)?,
                        num("length").with_context(ctx)?,
                    )
                };
                let time = u32::try_from(num("time").with_context(ctx)?)?;
                let dev = pool.devices.get_mut(&id).expect("current device exists");
                for i in 0..len {
                    let m = Mapping {
                        data_block: data + i,
                        time,
                    };
                    if dev.mappings.insert(origin + i, m).is_some() {
                        bail!("{}: virtual block {} mapped twice", ctx(), origin + i);
                    }
                }
            } else if l == "</device>" {
                let (id, declared) = cur
                    .take()
                    .with_context(|| format!("{}: stray </device>", ctx()))?;
                let have = pool.devices[&id].mappings.len() as u64;
                if have != declared {
                    bail!("device {id}: mapped_blocks=\"{declared}\" but {have} mappings listed");
                }
            } else if l == "</superblock>" {
            } else {
                bail!("{}: unexpected element", ctx());
            }
        }
        if !seen_superblock {
            bail!("no <superblock> element");
        }
        Ok(pool)
    }

    /// Total number of mappings over all devices.
    pub fn total_mappings(&self) -> usize {
        self.devices.values().map(|d| d.mappings.len()).sum()
    }

    /// Data blocks mapped by at least one device.
    pub fn used_data_blocks(&self) -> BTreeSet<u64> {
        self.devices
            .values()
            .flat_map(|d| d.mappings.values().map(|m| m.data_block))
            .collect()
    }

    /// Every mapping as `(dev_id, virtual block, data block)`.
    pub fn all_mappings(&self) -> Vec<(u32, u64, u64)> {
        self.devices
            .iter()
            .flat_map(|(id, d)| d.mappings.iter().map(|(v, m)| (*id, *v, m.data_block)))
            .collect()
    }

    /// A metadata file size (bytes, whole MiB, at least 4 MiB) with ample room for this pool
    /// written the way `thin_restore` writes it (one bottom tree per device, nothing shared),
    /// with a wide margin for other writers.
    pub fn metadata_size(&self) -> u64 {
        let blocks = self.total_mappings() as u64 / 100
            + self.devices.len() as u64 * 3
            + self.nr_data_blocks / 16000 * 2
            + 128;
        let bytes = blocks * 4 * 4096;
        bytes.div_ceil(1 << 20).max(4) << 20
    }
}

/// A maximal run of mappings as `thin_dump` prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// First virtual block.
    pub origin: u64,
    /// First data block.
    pub data: u64,
    /// Number of blocks.
    pub len: u64,
    /// Time of every block in the run.
    pub time: u32,
}

/// The maximal runs of `mappings`: consecutive virtual and data blocks with equal times.
pub fn runs(mappings: &BTreeMap<u64, Mapping>) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (&v, m) in mappings {
        if let Some(r) = out.last_mut()
            && r.origin + r.len == v
            && r.data + r.len == m.data_block
            && r.time == m.time
        {
            r.len += 1;
            continue;
        }
        out.push(Run {
            origin: v,
            data: m.data_block,
            len: 1,
            time: m.time,
        });
    }
    out
}

/// The value of `name="…"` in an XML start tag on one line.
pub fn attr<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let pat = format!(" {name}=\"");
    let start = line.find(&pat)? + pat.len();
    let end = line[start..].find('"')? + start;
    Some(&line[start..end])
}

/// What [`generate`] should produce.
#[derive(Clone, Debug)]
pub struct GenOptions {
    /// Number of devices (thins and snapshots).
    pub devices: usize,
    /// Make the first device big: [`BIG_DEVICE_MAPPINGS`] mappings, so that its bottom tree
    /// has three levels however full its leaves are packed (more than 254 × 254 entries).
    pub big_device: bool,
    /// Data block size in sectors; `None` picks one at random (including 384 and 1152).
    pub data_block_size: Option<u32>,
}

/// Mappings of the big device of [`GenOptions::big_device`]: > 254 × 254, so three levels.
pub const BIG_DEVICE_MAPPINGS: usize = 70_000;

/// A generated pool and the (origin, snapshot) pairs that share data blocks.
#[derive(Clone, Debug)]
pub struct Generated {
    /// The pool.
    pub pool: Pool,
    /// `(parent, child)` for every `create_snap`, in creation order.
    pub snapshots: Vec<(u32, u32)>,
    /// The big device's id, if any.
    pub big: Option<u32>,
}

/// A random pool that `thin_restore` accepts and `thin_dump` prints back as
/// [`Pool::to_xml`] text: thins created with bursts of writes (long runs, short runs and singles,
/// some written in random order so data blocks do not follow virtual blocks), snapshots that copy
/// their origin's mappings (so data blocks are shared by several devices) and then diverge by
/// copy-on-write overwrites, new writes and discards, as the kernel would produce them. Each
/// snapshot advances the pool time, as the kernel's `create_snap` does. Data blocks are
/// allocated upwards with random gaps; `nr_data_blocks` leaves some slack, or none.
pub fn generate<R: Rng>(rng: &mut R, opts: &GenOptions) -> Generated {
    let dbs = opts.data_block_size.unwrap_or_else(|| {
        *[128u32, 384, 1152, 128, 256, 1024, 8192, 2097152]
            .choose(rng)
            .expect("non-empty")
    });
    let mut g = Gen {
        rng,
        pool: Pool {
            data_block_size: dbs,
            ..Pool::default()
        },
        next_data: 0,
        next_id: 0,
        snapshots: Vec::new(),
        big: None,
        no_parent: BTreeSet::new(),
    };
    if g.rng.random_bool(0.3) {
        // start with some data blocks in use by nothing (e.g. freed by a deleted device)
        g.next_data = g.rng.random_range(0..5000);
    }
    while g.pool.devices.len() < opts.devices {
        let parent = if g.rng.random_bool(0.3) {
            None
        } else {
            g.pick_parent()
        };
        let id = g.new_id();
        match parent {
            Some(parent) => g.create_snap(id, parent),
            None => {
                let big = opts.big_device && g.big.is_none();
                g.create_thin(id, big);
            }
        }
        // Writes and discards between management operations.
        for _ in 0..g.rng.random_range(0..4) {
            let id = g.pick_device();
            g.mutate(id);
        }
    }
    let slack = match g.rng.random_range(0..3) {
        0 => 0,
        1 => g.rng.random_range(1..100),
        _ => g.rng.random_range(100..20000),
    };
    g.pool.nr_data_blocks = (g.next_data + slack).max(16);
    g.pool.transaction += g.rng.random_range(0..3);
    Generated {
        pool: g.pool,
        snapshots: g.snapshots,
        big: g.big,
    }
}

struct Gen<'r, R: Rng> {
    rng: &'r mut R,
    pool: Pool,
    next_data: u64,
    next_id: u32,
    snapshots: Vec<(u32, u32)>,
    big: Option<u32>,
    /// Devices that may not be snapshotted (the big device once snapshotted, and its snapshot).
    no_parent: BTreeSet<u32>,
}

const MAX_DEV_ID: u32 = (1 << 24) - 1;

impl<R: Rng> Gen<'_, R> {
    fn new_id(&mut self) -> u32 {
        loop {
            let id = match self.rng.random_range(0..10) {
                0 => MAX_DEV_ID - self.rng.random_range(0..3),
                1..=3 => self.rng.random_range(0..=MAX_DEV_ID),
                _ => {
                    self.next_id += self.rng.random_range(1..4);
                    self.next_id.min(MAX_DEV_ID)
                }
            };
            if !self.pool.devices.contains_key(&id) {
                return id;
            }
        }
    }

    fn pick_device(&mut self) -> u32 {
        let ids: Vec<u32> = self.pool.devices.keys().copied().collect();
        *ids.choose(self.rng).expect("at least one device")
    }

    /// A device to snapshot; `None` if none may be. The big device is snapshotted at most once
    /// and its snapshot never, so that big trees are not copied over and over.
    fn pick_parent(&mut self) -> Option<u32> {
        let ids: Vec<u32> = self
            .pool
            .devices
            .keys()
            .copied()
            .filter(|id| !self.no_parent.contains(id))
            .collect();
        ids.choose(self.rng).copied()
    }

    /// `n` consecutive data blocks, after a random gap.
    fn alloc(&mut self, n: u64) -> u64 {
        let gap = if self.rng.random_bool(0.3) {
            self.rng.random_range(1..20)
        } else {
            0
        };
        let start = self.next_data + gap;
        self.next_data = start + n;
        start
    }

    /// Write (provision or copy-on-write) `n` virtual blocks from `v0` of device `id` now.
    fn write(&mut self, id: u32, v0: u64, n: u64) {
        let time = self.pool.time;
        let shuffled = n > 1 && self.rng.random_bool(0.25);
        let mut vs: Vec<u64> = (v0..v0 + n).collect();
        let base = if shuffled {
            vs.shuffle(self.rng);
            None
        } else {
            Some(self.alloc(n))
        };
        for (i, v) in vs.into_iter().enumerate() {
            let data_block = match base {
                Some(b) => b + i as u64,
                None => self.alloc(1),
            };
            let dev = self.pool.devices.get_mut(&id).expect("device exists");
            dev.mappings.insert(v, Mapping { data_block, time });
        }
    }

    fn burst_len(&mut self) -> u64 {
        match self.rng.random_range(0..10) {
            0..=3 => 1,
            4..=7 => self.rng.random_range(2..20),
            _ => self.rng.random_range(20..300),
        }
    }

    fn virtual_start(&mut self, id: u32) -> u64 {
        let last = self.pool.devices[&id]
            .mappings
            .last_key_value()
            .map(|(v, _)| *v + 1);
        match (self.rng.random_range(0..10), last) {
            (0..=4, Some(l)) => l + self.rng.random_range(0..5),
            (5, _) => self.rng.random_range(0..1 << 32),
            (6, _) => self.rng.random_range(0..64),
            _ => self.rng.random_range(0..1 << 20),
        }
    }

    fn create_thin(&mut self, id: u32, big: bool) {
        let dev = Device {
            transaction: self.pool.transaction,
            creation_time: self.pool.time,
            snap_time: self.pool.time,
            mappings: BTreeMap::new(),
        };
        self.pool.transaction += 1;
        self.pool.devices.insert(id, dev);
        let target = if big {
            self.big = Some(id);
            BIG_DEVICE_MAPPINGS
        } else {
            match self.rng.random_range(0..10) {
                0 => 0,
                1..=5 => self.rng.random_range(1..50),
                _ => self.rng.random_range(50..400),
            }
        };
        let mut v = 0;
        while self.pool.devices[&id].mappings.len() < target {
            let left = (target - self.pool.devices[&id].mappings.len()) as u64;
            let n = if big {
                self.rng.random_range(1..=500u64)
            } else {
                self.burst_len()
            }
            .min(left);
            if big {
                self.write(id, v, n);
                v += n + self.rng.random_range(0..3);
            } else {
                let v0 = self.virtual_start(id);
                self.write(id, v0, n);
            }
        }
    }

    fn create_snap(&mut self, id: u32, parent: u32) {
        self.pool.time += 1;
        let time = self.pool.time;
        let origin = self.pool.devices.get_mut(&parent).expect("parent exists");
        origin.snap_time = time;
        let dev = Device {
            transaction: self.pool.transaction,
            creation_time: time,
            snap_time: time,
            mappings: origin.mappings.clone(),
        };
        self.pool.transaction += 1;
        self.pool.devices.insert(id, dev);
        if Some(parent) == self.big {
            self.no_parent.insert(parent);
            self.no_parent.insert(id);
        }
        self.snapshots.push((parent, id));
        // The two diverge at once, most of the time.
        for _ in 0..self.rng.random_range(0..3) {
            self.mutate(parent);
        }
        for _ in 0..self.rng.random_range(0..3) {
            self.mutate(id);
        }
    }

    /// One of: overwrite mapped blocks (copy-on-write), write new blocks, discard a range.
    fn mutate(&mut self, id: u32) {
        let mapped: Vec<u64> = {
            let m = &self.pool.devices[&id].mappings;
            if m.len() > 5000 {
                // big devices: sample instead of listing everything
                m.keys().step_by(m.len() / 1000).copied().collect()
            } else {
                m.keys().copied().collect()
            }
        };
        match self.rng.random_range(0..4) {
            0 | 1 if !mapped.is_empty() => {
                // overwrite a few blocks starting at a mapped one
                let v0 = *mapped.choose(self.rng).expect("non-empty");
                let n = self.burst_len().min(40);
                self.write(id, v0, n);
            }
            2 if !mapped.is_empty() => {
                // discard a range (whole blocks): the mappings go away
                let v0 = *mapped.choose(self.rng).expect("non-empty");
                let n = self.burst_len();
                let dev = self.pool.devices.get_mut(&id).expect("device exists");
                let gone: Vec<u64> = dev.mappings.range(v0..v0 + n).map(|(v, _)| *v).collect();
                for v in gone {
                    dev.mappings.remove(&v);
                }
            }
            _ => {
                let v0 = self.virtual_start(id);
                let n = self.burst_len();
                self.write(id, v0, n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    #[test]
    fn xml_round_trips_through_the_model() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for devices in [1, 5, 30] {
            let g = generate(
                &mut rng,
                &GenOptions {
                    devices,
                    big_device: false,
                    data_block_size: None,
                },
            );
            let xml = g.pool.to_xml();
            let back = Pool::from_xml(&xml).expect("parse our own XML");
            assert_eq!(back, g.pool);
            assert_eq!(back.to_xml(), xml);
            assert!(
                g.pool
                    .used_data_blocks()
                    .iter()
                    .all(|&b| b < g.pool.nr_data_blocks)
            );
        }
    }

    #[test]
    fn runs_merge_like_thin_dump() {
        let mut m = BTreeMap::new();
        for (v, d, t) in [
            (0, 0, 0),
            (1, 1, 0),
            (2, 2, 1),
            (3, 4, 1),
            (4, 5, 1),
            (9, 6, 1),
        ] {
            m.insert(
                v,
                Mapping {
                    data_block: d,
                    time: t,
                },
            );
        }
        let r: Vec<(u64, u64, u64, u32)> = runs(&m)
            .into_iter()
            .map(|r| (r.origin, r.data, r.len, r.time))
            .collect();
        assert_eq!(
            r,
            vec![(0, 0, 2, 0), (2, 2, 1, 1), (3, 4, 2, 1), (9, 6, 1, 1)]
        );
    }

    #[test]
    fn reads_a_committed_vector() {
        let pool = Pool::from_xml(&crate::vector_xml("snapshots")).expect("parse snapshots.xml");
        assert_eq!(pool.devices.len(), 3);
        assert_eq!(pool.total_mappings(), 16 + 20 + 17);
        assert_eq!(pool.to_xml(), crate::vector_xml("snapshots"));
    }
}
