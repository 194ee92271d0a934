//! `thinpool meta ls`: a table of the thin devices, printed exactly like `thin_ls` 0.9.0.
//!
//! Columns are right-aligned to the widest cell (header included) and every cell is followed
//! by one blank, so each line ends in a blank. Definitions, as in `thin_ls`:
//!
//! - MAPPED_* comes from the device details (`mapped_blocks`), not from the tree;
//! - a mapping is *exclusive* when no other mapping — of this or any other device, counting a
//!   shared subtree once per device that reaches it — points at the same data block;
//!   EXCLUSIVE_* counts a device's exclusive mappings;
//! - SHARED_* = `mapped_blocks - exclusive` (computed in wrapping `u64` arithmetic, as the tool
//!   does, so a wrong `mapped_blocks` shows up here);
//! - MAPPED, EXCLUSIVE and SHARED are sizes in the tool's human units ([`human_size`]).
//!
//! Devices are those of the details tree, in id order; each must have a mapping tree (else
//! the error "couldn't find mapping tree root"). Cost: one walk of every device's mapping tree
//! when an EXCLUSIVE or SHARED column is asked for (two walks, like the tool), none otherwise.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use thinpool_io::BlockDevice;

use crate::walk::{self, Reader};
use crate::{Error, Result};

/// A column of `thin_ls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// `DEV`: the thin device id.
    Dev,
    /// `MAPPED_BLOCKS`: mapped data blocks (from the device details).
    MappedBlocks,
    /// `EXCLUSIVE_BLOCKS`: mappings no other mapping shares.
    ExclusiveBlocks,
    /// `SHARED_BLOCKS`: `MAPPED_BLOCKS - EXCLUSIVE_BLOCKS`.
    SharedBlocks,
    /// `MAPPED_SECTORS`.
    MappedSectors,
    /// `EXCLUSIVE_SECTORS`.
    ExclusiveSectors,
    /// `SHARED_SECTORS`.
    SharedSectors,
    /// `MAPPED_BYTES`.
    MappedBytes,
    /// `EXCLUSIVE_BYTES`.
    ExclusiveBytes,
    /// `SHARED_BYTES`.
    SharedBytes,
    /// `MAPPED`: human-readable size.
    Mapped,
    /// `EXCLUSIVE`: human-readable size.
    Exclusive,
    /// `SHARED`: human-readable size.
    Shared,
    /// `TRANSACTION`: pool transaction id when the device was created.
    Transaction,
    /// `CREATE_TIME`.
    CreateTime,
    /// `SNAP_TIME`.
    SnapTime,
}

impl Field {
    /// Every field, in the order `thin_ls --help` lists them.
    pub const ALL: [Field; 16] = [
        Field::Dev,
        Field::MappedBlocks,
        Field::ExclusiveBlocks,
        Field::SharedBlocks,
        Field::MappedSectors,
        Field::ExclusiveSectors,
        Field::SharedSectors,
        Field::MappedBytes,
        Field::ExclusiveBytes,
        Field::SharedBytes,
        Field::Mapped,
        Field::Exclusive,
        Field::Shared,
        Field::Transaction,
        Field::CreateTime,
        Field::SnapTime,
    ];

    /// The columns `thin_ls` prints without `-o`.
    pub const DEFAULT: [Field; 4] = [
        Field::Dev,
        Field::Mapped,
        Field::CreateTime,
        Field::SnapTime,
    ];

    /// The header word, which is also the name `-o` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Field::Dev => "DEV",
            Field::MappedBlocks => "MAPPED_BLOCKS",
            Field::ExclusiveBlocks => "EXCLUSIVE_BLOCKS",
            Field::SharedBlocks => "SHARED_BLOCKS",
            Field::MappedSectors => "MAPPED_SECTORS",
            Field::ExclusiveSectors => "EXCLUSIVE_SECTORS",
            Field::SharedSectors => "SHARED_SECTORS",
            Field::MappedBytes => "MAPPED_BYTES",
            Field::ExclusiveBytes => "EXCLUSIVE_BYTES",
            Field::SharedBytes => "SHARED_BYTES",
            Field::Mapped => "MAPPED",
            Field::Exclusive => "EXCLUSIVE",
            Field::Shared => "SHARED",
            Field::Transaction => "TRANSACTION",
            Field::CreateTime => "CREATE_TIME",
            Field::SnapTime => "SNAP_TIME",
        }
    }

    /// Parse one field name (exact, upper case, as `thin_ls` does). The error text is the
    /// tool's: "unknown field".
    pub fn parse(s: &str) -> Result<Field> {
        Field::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| Error::InvalidArgument("unknown field".into()))
    }

    /// Parse a comma-separated list like `thin_ls -o`: a trailing comma is ignored, an empty
    /// item (",DEV", "DEV,,MAPPED") is an unknown field.
    pub fn parse_list(s: &str) -> Result<Vec<Field>> {
        let s = s.strip_suffix(',').unwrap_or(s);
        if s.is_empty() {
            return Ok(Vec::new());
        }
        s.split(',').map(Field::parse).collect()
    }

    fn needs_exclusive(self) -> bool {
        matches!(
            self,
            Field::ExclusiveBlocks
                | Field::SharedBlocks
                | Field::ExclusiveSectors
                | Field::SharedSectors
                | Field::ExclusiveBytes
                | Field::SharedBytes
                | Field::Exclusive
                | Field::Shared
        )
    }
}

impl std::str::FromStr for Field {
    type Err = Error;
    fn from_str(s: &str) -> Result<Field> {
        Field::parse(s)
    }
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Options of [`ls_with`].
#[derive(Debug, Clone)]
pub struct LsOptions {
    /// Columns, in order ([`Field::DEFAULT`] for `thin_ls` without `-o`).
    pub fields: Vec<Field>,
    /// List the held metadata snapshot's devices (`thin_ls -m`).
    pub metadata_snap: bool,
    /// Leave out the header line (`--no-headers`).
    pub no_headers: bool,
}

impl Default for LsOptions {
    fn default() -> Self {
        LsOptions {
            fields: Field::DEFAULT.to_vec(),
            metadata_snap: false,
            no_headers: false,
        }
    }
}

/// `thin_ls [-m] -o FIELDS`: the table as `thin_ls` 0.9.0 prints it (with its header line).
/// Read-only. Errors: a damaged superblock or tree (naming the block), no held snapshot with
/// `metadata_snap` ("no current metadata snap"), a device without a mapping tree.
pub fn ls(dev: Arc<dyn BlockDevice>, fields: &[Field], metadata_snap: bool) -> Result<String> {
    ls_with(
        dev,
        &LsOptions {
            fields: fields.to_vec(),
            metadata_snap,
            no_headers: false,
        },
    )
}

/// Two bits per data block, like `thin_ls`'s mapping set: seen once, seen more than once.
/// The bit vector grows to the highest data block mapped (not to the pool's size); blocks
/// beyond the data space map (damage) go to a map.
struct MappingSet {
    nr_blocks: u64,
    words: Vec<u64>,
    beyond: HashMap<u64, u8>,
}

impl MappingSet {
    fn new(nr_blocks: u64) -> Self {
        MappingSet {
            nr_blocks,
            words: Vec::new(),
            beyond: HashMap::new(),
        }
    }

    fn inc(&mut self, b: u64) {
        if b >= self.nr_blocks {
            let s = self.beyond.entry(b).or_insert(0);
            *s = (*s + 1).min(2);
            return;
        }
        let w = (b / 32) as usize;
        if w >= self.words.len() {
            let want = (w + 1).max(2 * self.words.len());
            let cap = self.nr_blocks.div_ceil(32) as usize;
            self.words.resize(want.min(cap).max(w + 1), 0);
        }
        let shift = 2 * (b % 32);
        let v = (self.words[w] >> shift) & 3;
        let nv = (v + 1).min(2);
        self.words[w] = (self.words[w] & !(3 << shift)) | (nv << shift);
    }

    fn is_exclusive(&self, b: u64) -> bool {
        if b >= self.nr_blocks {
            return self.beyond.get(&b) == Some(&1);
        }
        self.words
            .get((b / 32) as usize)
            .is_some_and(|w| (w >> (2 * (b % 32))) & 3 == 1)
    }
}

/// `thin_ls` with every option: see [`ls`].
pub fn ls_with(dev: Arc<dyn BlockDevice>, opts: &LsOptions) -> Result<String> {
    let mut r = Reader::new(dev)?;
    let view = walk::open_view(&mut r, opts.metadata_snap.then_some(None))?;
    let block_size = view.sb.data_block_size as u64;
    let details = walk::read_details(&mut r, view.sb.details_root)?;
    let top = walk::read_top_level(&mut r, view.sb.mapping_root)?;
    let mut roots = Vec::with_capacity(details.len());
    for id in details.keys() {
        let root = top.get(id).copied().ok_or_else(|| {
            Error::Inconsistent(format!(
                "couldn't find mapping tree root (device {id} is in the details tree but not in the top-level mapping tree)"
            ))
        })?;
        roots.push(root);
    }

    let mut exclusive = vec![0u64; details.len()];
    if opts.fields.iter().any(|f| f.needs_exclusive()) {
        // Pass 1: how often each data block is mapped, over all devices.
        let mut set = MappingSet::new(view.live.data_sm_root.nr_blocks);
        for (id, &root) in details.keys().zip(&roots) {
            walk::walk_mappings(&mut r, root, *id, &mut |_, bt| {
                set.inc(bt.block);
                Ok(())
            })?;
        }
        // Pass 2: each device's mappings seen exactly once.
        for (i, (id, &root)) in details.keys().zip(&roots).enumerate() {
            let mut n = 0u64;
            walk::walk_mappings(&mut r, root, *id, &mut |_, bt| {
                if set.is_exclusive(bt.block) {
                    n += 1;
                }
                Ok(())
            })?;
            exclusive[i] = n;
        }
    }

    let mut rows: Vec<Vec<String>> = Vec::with_capacity(details.len() + 1);
    if !opts.no_headers {
        rows.push(opts.fields.iter().map(|f| f.name().to_string()).collect());
    }
    for (i, (id, d)) in details.iter().enumerate() {
        let mapped = d.mapped_blocks;
        let excl = exclusive[i];
        let shared = mapped.wrapping_sub(excl);
        let sectors = |blocks: u64| blocks.wrapping_mul(block_size);
        let bytes = |blocks: u64| sectors(blocks).wrapping_mul(512);
        rows.push(
            opts.fields
                .iter()
                .map(|f| match f {
                    Field::Dev => id.to_string(),
                    Field::MappedBlocks => mapped.to_string(),
                    Field::ExclusiveBlocks => excl.to_string(),
                    Field::SharedBlocks => shared.to_string(),
                    Field::MappedSectors => sectors(mapped).to_string(),
                    Field::ExclusiveSectors => sectors(excl).to_string(),
                    Field::SharedSectors => sectors(shared).to_string(),
                    Field::MappedBytes => bytes(mapped).to_string(),
                    Field::ExclusiveBytes => bytes(excl).to_string(),
                    Field::SharedBytes => bytes(shared).to_string(),
                    Field::Mapped => human_size(bytes(mapped)),
                    Field::Exclusive => human_size(bytes(excl)),
                    Field::Shared => human_size(bytes(shared)),
                    Field::Transaction => d.transaction_id.to_string(),
                    Field::CreateTime => d.creation_time.to_string(),
                    Field::SnapTime => d.snapshotted_time.to_string(),
                })
                .collect(),
        );
    }
    Ok(render_grid(&rows))
}

/// Right-align every column to its widest cell; each cell is followed by one blank. Rows
/// without cells print nothing (so an empty field list prints nothing, as with `thin_ls`).
fn render_grid(rows: &[Vec<String>]) -> String {
    let ncols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; ncols];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in rows.iter().filter(|r| !r.is_empty()) {
        for (w, cell) in widths.iter().zip(row) {
            let _ = write!(out, "{cell:>w$} ");
        }
        out.push('\n');
    }
    out
}

/// A byte count in `thin_ls`'s units: divide by 1024 (truncating) while above 1 MiB, then, if
/// still above 8 KiB, divide once more rounding to nearest; suffixes "", KiB, MiB, GiB, TiB,
/// PiB (then EiB, where the tool would read past its table). Examples: 65536 → "64KiB",
/// 1048576 → "1024KiB", 3342336 → "3264KiB", 10485760 → "10MiB", 4096 → "4096".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut n = bytes;
    let mut i = 0;
    while n > 1024 * 1024 {
        n /= 1024;
        i += 1;
    }
    if n > 8 * 1024 {
        // round() of the double quotient; n is at most 2^20, so the division is exact enough.
        n = (n as f64 / 1024.0).round() as u64;
        i += 1;
    }
    format!("{n}{}", UNITS[i.min(UNITS.len() - 1)])
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::walk::testutil::{VECTORS, have, mem, restore, run_on, vector};

    const L: [Field; 7] = [
        Field::Dev,
        Field::MappedBlocks,
        Field::ExclusiveBlocks,
        Field::SharedBlocks,
        Field::Transaction,
        Field::CreateTime,
        Field::SnapTime,
    ];

    #[test]
    fn human_units_like_thin_ls() {
        assert_eq!(human_size(0), "0");
        assert_eq!(human_size(4096), "4096");
        assert_eq!(human_size(8192), "8192");
        assert_eq!(human_size(8704), "9KiB");
        assert_eq!(human_size(65536), "64KiB");
        assert_eq!(human_size(1048576), "1024KiB");
        assert_eq!(human_size(3342336), "3264KiB");
        assert_eq!(human_size(10485760), "10MiB");
        assert_eq!(human_size(2621440000), "2500MiB");
        assert_eq!(human_size(u64::MAX), "16EiB");
    }

    #[test]
    fn field_names_round_trip() {
        for f in Field::ALL {
            assert_eq!(Field::parse(f.name()).unwrap(), f);
        }
        assert!(Field::parse("dev").is_err());
        assert_eq!(Field::parse_list("DEV,").unwrap(), vec![Field::Dev]);
        assert!(Field::parse_list(",DEV").is_err());
        assert!(Field::parse_list("DEV,,MAPPED").is_err());
        assert!(Field::parse_list("").unwrap().is_empty());
    }

    #[test]
    fn readme_tables() {
        let img = vector("snapshots");
        assert_eq!(
            ls(mem(img.clone()), &Field::DEFAULT, false).unwrap(),
            "DEV  MAPPED CREATE_TIME SNAP_TIME \n  1 1024KiB           0         2 \n  2 1280KiB           1         1 \n  3 1088KiB           2         2 \n"
        );
        assert_eq!(
            ls(mem(img), &L, false).unwrap(),
            "DEV MAPPED_BLOCKS EXCLUSIVE_BLOCKS SHARED_BLOCKS TRANSACTION CREATE_TIME SNAP_TIME \n  1            16                2            14           0           0         2 \n  2            20                8            12           1           1         1 \n  3            17                1            16           2           2         2 \n"
        );
        let img = vector("empty");
        assert_eq!(
            ls(mem(img), &Field::DEFAULT, false).unwrap(),
            "DEV MAPPED CREATE_TIME SNAP_TIME \n"
        );
        let img = vector("metadata-snap");
        assert_eq!(
            ls(mem(img.clone()), &L, true).unwrap(),
            "DEV MAPPED_BLOCKS EXCLUSIVE_BLOCKS SHARED_BLOCKS TRANSACTION CREATE_TIME SNAP_TIME \n  1            16                2            14           0           0         2 \n  2            20                8            12           1           1         1 \n  3            17                1            16           2           2         2 \n"
        );
        let img = vector("one-thin");
        let e = ls(mem(img), &L, true).unwrap_err();
        assert_eq!(e.to_string(), "no current metadata snap");
    }

    fn compare_with_thin_ls(img: &[u8], what: &str) {
        let all: Vec<&str> = Field::ALL.iter().map(|f| f.name()).collect();
        let all = all.join(",");
        for (args, fields, snap, no_headers) in [
            (vec![], Field::DEFAULT.to_vec(), false, false),
            (vec!["-o", all.as_str()], Field::ALL.to_vec(), false, false),
            (
                vec!["--no-headers", "-o", all.as_str()],
                Field::ALL.to_vec(),
                false,
                true,
            ),
            (
                vec!["-m", "-o", all.as_str()],
                Field::ALL.to_vec(),
                true,
                false,
            ),
        ] {
            let o = run_on("thin_ls", &args, img);
            let ours = ls_with(
                mem(img.to_vec()),
                &LsOptions {
                    fields,
                    metadata_snap: snap,
                    no_headers,
                },
            );
            match ours {
                Ok(text) => {
                    assert!(
                        o.status.success(),
                        "{what} {args:?}: thin_ls failed, we printed\n{text}"
                    );
                    assert_eq!(text, String::from_utf8_lossy(&o.stdout), "{what} {args:?}");
                }
                Err(e) => assert!(
                    !o.status.success(),
                    "{what} {args:?}: we failed ({e}), thin_ls did not"
                ),
            }
        }
    }

    #[test]
    fn vectors_match_thin_ls() {
        if !have("thin_ls") {
            return;
        }
        for name in VECTORS {
            let img = vector(name);
            compare_with_thin_ls(&img, name);
        }
    }

    /// Random pools with shared data blocks and various block sizes and sizes, restored by
    /// `thin_restore`: our table must be `thin_ls`'s byte for byte.
    #[test]
    fn random_pools_match_thin_ls() {
        if !have("thin_ls") || !have("thin_restore") {
            return;
        }
        let seed = std::env::var("THINPOOL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20240611u64);
        eprintln!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for round in 0..6 {
            let bs = [128u32, 256, 384, 1024, 8192, 2097152][round];
            let nr_data = 20000u64;
            let mut xml = format!(
                "<superblock uuid=\"\" time=\"5\" transaction=\"9\" flags=\"0\" version=\"2\" data_block_size=\"{bs}\" nr_data_blocks=\"{nr_data}\">\n"
            );
            let ndev = rng.random_range(1..8);
            for d in 0..ndev {
                let id = d * rng.random_range(1..5) + d;
                let n = [0u64, 1, 3, 16, 17, 100, 2000, 5000][rng.random_range(0..8)];
                xml += &format!(
                    "  <device dev_id=\"{id}\" mapped_blocks=\"{n}\" transaction=\"{}\" creation_time=\"{}\" snap_time=\"{}\">\n",
                    rng.random_range(0..1000),
                    rng.random_range(0..5),
                    rng.random_range(0..5)
                );
                let mut v = 0u64;
                for _ in 0..n {
                    v += rng.random_range(1..4);
                    let data = rng.random_range(0..nr_data.min(3 * n + 10));
                    xml += &format!(
                        "    <single_mapping origin_block=\"{v}\" data_block=\"{data}\" time=\"0\"/>\n"
                    );
                }
                xml += "  </device>\n";
            }
            xml += "</superblock>\n";
            let img = restore(&xml, 8 << 20);
            compare_with_thin_ls(&img, &format!("round {round}"));
        }
    }
}
