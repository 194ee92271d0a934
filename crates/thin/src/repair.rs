//! `thinpool meta repair`: recover what can be recovered from damaged metadata, as IR events,
//! and write it to a fresh metadata device (`repair = salvage → restore`, like `thin_repair`).
//!
//! [`salvage`] reads the input read-only and feeds a [`MetadataVisitor`]:
//!
//! 1. **Superblock.** If its checksum is right, its fields and roots are used. Otherwise the
//!    fields come from the options (`--transaction-id`, `--data-block-size`,
//!    `--nr-data-blocks`), else from the damaged superblock itself when its magic and sizes are
//!    sane, else from a held snapshot copy found by the scan; the roots are found by scanning.
//! 2. **Scan** (only when needed): every block of the input is read and identified by its
//!    checksum salt ([`block::identify`]). Nodes are classified by value size: details leaves
//!    (24 bytes), mapping leaves (8 bytes; a *top-level* leaf is one whose values all point at
//!    mapping-tree nodes and whose keys are device ids), and internal nodes by their children.
//!    Candidate roots are nodes no internal node of their kind points at; each is walked
//!    strictly and the best intact pair (details tree, top-level tree) wins: most devices in
//!    common, then fewest disagreements. When no candidate tree is intact, the entries of all
//!    intact leaves are pooled. When the superblock is readable, the scan only considers blocks
//!    its metadata space map marks in use (stale copies of old trees are ignored).
//! 3. **Devices** are emitted in ascending id, each with its mappings from its bottom tree,
//!    merged into maximal runs ([`RunBuilder`]). A device whose bottom tree is damaged (any
//!    fault of section 4.2) is skipped and listed in the report; so is a device without a
//!    mapping tree. A device with a mapping tree but no details is kept with zero times.
//! 4. **Number of data blocks**: the superblock's, unless it is absurd (above 2^40, more
//!    bitmaps than the metadata device has blocks, below the highest mapped data block + 1, or
//!    beyond the data device when its size is given); then it is derived from the data
//!    device's size and the mappings, and the report says so ([`derive_nr_data_blocks`]). No
//!    mapping is dropped for it; only a number given as an option drops mappings past it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use thinpool_io::BlockDevice;
use thinpool_pdata::block;
use thinpool_pdata::node::{INTERNAL_NODE, LEAF_NODE, NodeRef};
use thinpool_pdata::space_map::ENTRIES_PER_BITMAP;
use thinpool_pdata::transaction::{IndexEntry, MAX_METADATA_BITMAPS};
use thinpool_pdata::{BLOCK_SIZE, BlockKind};

use crate::ir::{self, Map, MetadataVisitor, RunBuilder};
use crate::superblock::{BlockTime, DeviceDetails, NEEDS_CHECK, SUPERBLOCK_MAGIC, Superblock};
use crate::walk::{self, Reader};
use crate::{Error, Result};

/// Values to use when the superblock is damaged (`thin_repair --transaction-id`,
/// `--data-block-size`, `--nr-data-blocks`). They override what the salvage would guess.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SalvageOptions {
    /// Pool transaction id.
    pub transaction_id: Option<u64>,
    /// Data block size in sectors.
    pub data_block_size: Option<u32>,
    /// Number of data blocks. Taken as given: mappings to blocks at or past it are dropped.
    pub nr_data_blocks: Option<u64>,
    /// Size in bytes of the pool's data device (file or block device), when known. Without
    /// [`nr_data_blocks`](Self::nr_data_blocks), the superblock's number of data blocks is
    /// checked against it and, when absurd, derived from it (see [`derive_nr_data_blocks`]).
    pub data_device_size: Option<u64>,
}

/// What [`salvage`] recovered and what it had to give up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SalvageReport {
    /// The superblock's checksum was right.
    pub superblock_ok: bool,
    /// The details tree could not be walked from its root; details came from the scan.
    pub details_from_scan: bool,
    /// The top level of the mapping tree could not be walked from its root; device roots came
    /// from the scan.
    pub mappings_from_scan: bool,
    /// Devices emitted, ascending.
    pub devices: Vec<u32>,
    /// Devices left out, with the reason.
    pub skipped: Vec<(u32, String)>,
    /// Mappings emitted.
    pub nr_mappings: u64,
    /// Everything else worth telling the user (fields guessed, mappings dropped, ...).
    pub notes: Vec<String>,
    /// The number of data blocks written into the repaired superblock.
    pub nr_data_blocks: u64,
    /// When that number is not the superblock's: why, and what it was derived from.
    pub nr_data_blocks_derived: Option<String>,
}

/// Salvage the metadata on `input` into `v` with no overrides: see the module docs.
/// Errors: the input cannot be read, the superblock is damaged and its fields cannot be
/// guessed, or the visitor fails.
pub fn salvage<V>(input: Arc<dyn BlockDevice>, v: &mut V) -> Result<SalvageReport>
where
    V: MetadataVisitor,
    V::Error: Into<Error>,
{
    salvage_with(input, &SalvageOptions::default(), v)
}

/// `thin_repair -i input -o output`: salvage `input` and restore the result onto `output`
/// (formatted anew). The input is only read.
pub fn repair(
    input: Arc<dyn BlockDevice>,
    output: Arc<dyn BlockDevice>,
    opts: &SalvageOptions,
) -> Result<SalvageReport> {
    let mut r = crate::restore::Restorer::new(output);
    salvage_with(input, opts, &mut r)
}

// ---------------------------------------------------------------------------------------------
// Scanning.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Details,
    Mapping,
    Other,
}

struct ScanNode {
    leaf: bool,
    value_size: usize,
    /// Children of an internal node.
    children: Vec<u64>,
    /// Entries of an 8-byte-value leaf that may be a top-level leaf (keys < 2^24, values
    /// inside the device).
    top_entries: Option<Vec<(u64, u64)>>,
}

#[derive(Default)]
struct Scan {
    nodes: HashMap<u64, ScanNode>,
    /// Valid superblock copies found away from block 0 (held snapshots).
    superblocks: Vec<(u64, Superblock)>,
    class: HashMap<u64, Class>,
}

impl Scan {
    fn run(r: &Reader, allowed: Option<&[bool]>) -> Result<Scan> {
        let mut scan = Scan::default();
        let nr = r.nr_blocks();
        const CHUNK: u64 = 1024;
        let mut buf = vec![0u8; CHUNK as usize * BLOCK_SIZE];
        let mut start = 0;
        while start < nr {
            let n = (nr - start).min(CHUNK);
            let chunk = &mut buf[..n as usize * BLOCK_SIZE];
            r.read_at(chunk, start)?;
            for i in 0..n {
                let b = start + i;
                if allowed.is_some_and(|a| !a.get(b as usize).copied().unwrap_or(false)) {
                    continue;
                }
                let blk = &chunk[i as usize * BLOCK_SIZE..(i as usize + 1) * BLOCK_SIZE];
                if block::le_u64(blk, 8) != b {
                    continue;
                }
                match block::identify(blk) {
                    Some(BlockKind::Node) => {
                        if let Some(node) = scan_node(blk, nr) {
                            scan.nodes.insert(b, node);
                        }
                    }
                    Some(BlockKind::Superblock) if b != 0 => {
                        let sb = Superblock::decode(blk);
                        if sb.magic == SUPERBLOCK_MAGIC {
                            scan.superblocks.push((b, sb));
                        }
                    }
                    _ => {}
                }
            }
            start += n;
        }
        Ok(scan)
    }

    /// What tree a node belongs to, judged by its leaves (memoised; cycles end as Other).
    fn class(&mut self, b: u64, depth: usize) -> Class {
        if let Some(c) = self.class.get(&b) {
            return *c;
        }
        let Some(n) = self.nodes.get(&b) else {
            return Class::Other;
        };
        let c = if n.leaf {
            match n.value_size {
                DeviceDetails::SIZE => Class::Details,
                8 => Class::Mapping,
                _ => Class::Other,
            }
        } else if depth > walk::MAX_DEPTH {
            Class::Other
        } else {
            self.class.insert(b, Class::Other);
            let kids = n.children.clone();
            kids.first()
                .map_or(Class::Other, |&k| self.class(k, depth + 1))
        };
        self.class.insert(b, c);
        c
    }

    /// Can `b` be (part of) a top-level mapping tree: a leaf whose values are all mapping-tree
    /// nodes, or an internal node over such leaves?
    fn top_like(&mut self, b: u64, memo: &mut HashMap<u64, bool>, depth: usize) -> bool {
        if let Some(&t) = memo.get(&b) {
            return t;
        }
        memo.insert(b, false);
        let t = match self.nodes.get(&b) {
            None => false,
            Some(n) if n.leaf => match n.top_entries.clone() {
                Some(e) if !e.is_empty() => e
                    .iter()
                    .all(|&(_, root)| root != b && self.class(root, 0) == Class::Mapping),
                _ => false,
            },
            Some(n) => {
                let kids = n.children.clone();
                depth <= walk::MAX_DEPTH
                    && !kids.is_empty()
                    && kids.iter().all(|&k| self.top_like(k, memo, depth + 1))
            }
        };
        memo.insert(b, t);
        t
    }
}

fn scan_node(blk: &[u8], nr_blocks: u64) -> Option<ScanNode> {
    let n = NodeRef(blk);
    n.check_shape(None).ok()?;
    let nr = n.nr_entries();
    match n.flags() {
        INTERNAL_NODE => Some(ScanNode {
            leaf: false,
            value_size: 8,
            children: (0..nr).map(|i| n.value_u64(i)).collect(),
            top_entries: None,
        }),
        LEAF_NODE => {
            let vs = n.value_size();
            let top_entries = (vs == 8
                && (0..nr).all(|i| {
                    n.key(i) < 1 << 24 && n.value_u64(i) < nr_blocks && n.value_u64(i) != 0
                }))
            .then(|| (0..nr).map(|i| (n.key(i), n.value_u64(i))).collect());
            Some(ScanNode {
                leaf: true,
                value_size: vs,
                children: Vec::new(),
                top_entries,
            })
        }
        _ => None,
    }
}

/// The metadata space map's view of which blocks are in use, if it can be read strictly.
fn allocated_blocks(r: &mut Reader, sb: &Superblock) -> Option<Vec<bool>> {
    let root = sb.metadata_sm_root;
    let nr = root.nr_blocks.min(r.nr_blocks());
    let n_bitmaps = root.nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
    if nr == 0 || n_bitmaps > MAX_METADATA_BITMAPS as u64 {
        return None;
    }
    let index = r
        .block(root.bitmap_root, BlockKind::Index, "metadata index block")
        .ok()?;
    let mut used = vec![false; nr as usize];
    for i in 0..n_bitmaps as usize {
        let e = IndexEntry::decode(&index[16 + i * IndexEntry::SIZE..]);
        let bm = r
            .block(e.blocknr, BlockKind::Bitmap, "metadata bitmap")
            .ok()?;
        let base = i * ENTRIES_PER_BITMAP as usize;
        for j in 0..ENTRIES_PER_BITMAP as usize {
            if let Some(u) = used.get_mut(base + j) {
                *u = walk::bitmap_entry(&bm[..], j) != 0;
            }
        }
    }
    Some(used)
}

// ---------------------------------------------------------------------------------------------
// Salvage.

/// Device id → details.
type DetailsMap = BTreeMap<u64, DeviceDetails>;
/// Device id → bottom-level root.
type TopLevelMap = BTreeMap<u64, u64>;

/// A device's recovered mappings.
struct Mappings {
    runs: Vec<Map>,
    count: u64,
    max_time: u32,
    /// Highest mapped data block + 1 (0 without mappings).
    end: u64,
}

fn read_mappings(
    r: &mut Reader,
    root: u64,
    dev: u64,
    nr_data: u64,
    dropped: &mut u64,
) -> Result<Mappings> {
    let mut m = Mappings {
        runs: Vec::new(),
        count: 0,
        max_time: 0,
        end: 0,
    };
    let mut rb = RunBuilder::default();
    walk::walk_mappings(r, root, dev, &mut |v, bt| {
        if bt.block >= nr_data {
            *dropped += 1;
            return Ok(());
        }
        m.count += 1;
        m.max_time = m.max_time.max(bt.time);
        m.end = m.end.max(bt.block + 1);
        if let Some(run) = rb.push(v, bt.block, bt.time) {
            m.runs.push(run);
        }
        Ok(())
    })?;
    if let Some(run) = rb.finish() {
        m.runs.push(run);
    }
    Ok(m)
}

/// [`salvage`] with overrides for a damaged superblock.
pub fn salvage_with<V>(
    input: Arc<dyn BlockDevice>,
    opts: &SalvageOptions,
    v: &mut V,
) -> Result<SalvageReport>
where
    V: MetadataVisitor,
    V::Error: Into<Error>,
{
    let mut r = Reader::new(input)?;
    let mut report = SalvageReport::default();
    if r.nr_blocks() == 0 {
        return Err(Error::BadSuperblock(
            "the metadata device is smaller than one block".into(),
        ));
    }
    let good_sb = r.superblock().ok();
    report.superblock_ok = good_sb.is_some();

    // Roots from the superblock, when it is intact.
    let mut details: Option<BTreeMap<u64, DeviceDetails>> = None;
    let mut top: Option<BTreeMap<u64, u64>> = None;
    let mut scan: Option<Scan> = None;
    if let Some(sb) = &good_sb {
        match walk::read_details(&mut r, sb.details_root) {
            Ok(d) => details = Some(d),
            Err(e) => report.notes.push(format!(
                "the device details tree is damaged ({e}); details come from a scan"
            )),
        }
        match walk::read_top_level(&mut r, sb.mapping_root) {
            Ok(t) => top = Some(t),
            Err(e) => report.notes.push(format!(
                "the top level of the mapping tree is damaged ({e}); device roots come from a scan"
            )),
        }
        if details.is_none() || top.is_none() {
            let allocated = allocated_blocks(&mut r, sb);
            if allocated.is_none() {
                report.notes.push(
                    "the metadata space map is damaged too; the scan looks at every block".into(),
                );
            }
            scan = Some(Scan::run(&r, allocated.as_deref())?);
        }
    } else {
        report
            .notes
            .push("the superblock is damaged; devices come from a scan of every block".into());
        scan = Some(Scan::run(&r, None)?);
    }

    // Superblock fields.
    let raw = Superblock::decode(&r.raw(0)?[..]);
    let sb_fields = match &good_sb {
        Some(sb) => sb.clone(),
        None => guess_superblock(&raw, scan.as_ref(), opts, &mut report)?,
    };
    // Mappings are read up to the number of data blocks the user gave, else up to the most a
    // mapping can address; the superblock's number is judged once the mappings are known.
    let limit = opts.nr_data_blocks.unwrap_or(BlockTime::MAX_BLOCK + 1);
    // What the superblock says; None when it cannot say (a held copy's is always 0).
    let stated =
        (good_sb.is_some() || raw_is_sane(&raw)).then_some(sb_fields.data_sm_root.nr_blocks);

    if let Some(scan) = &mut scan {
        if good_sb.is_none() {
            // Hints: the damaged superblock's roots (if it still looks like one) are likely
            // right; the roots of held snapshot copies are old views.
            let prefer: Vec<u64> = if raw.magic == SUPERBLOCK_MAGIC {
                vec![raw.details_root, raw.mapping_root]
            } else {
                Vec::new()
            };
            let avoid: HashSet<u64> = scan
                .superblocks
                .iter()
                .flat_map(|(_, sb)| [sb.details_root, sb.mapping_root])
                .collect();
            let (d, t) = best_roots(&mut r, scan, &prefer, &avoid, &mut report);
            details = d;
            top = t;
        }
        if details.is_none() {
            report.details_from_scan = true;
            details = Some(pool_details(&mut r, scan));
        }
        if top.is_none() {
            report.mappings_from_scan = true;
            top = Some(pool_top_level(&mut r, scan, details.as_ref(), limit));
        }
    }
    let details = details.unwrap_or_default();
    let top = top.unwrap_or_default();

    // Devices, ascending.
    let ids: std::collections::BTreeSet<u64> = details.keys().chain(top.keys()).copied().collect();
    let mut devices = Vec::new();
    let mut dropped = 0u64;
    let mut max_time = 0u32;
    for id in ids {
        let Ok(id32) = u32::try_from(id)
            .map_err(|_| ())
            .and_then(|i| if i < 1 << 24 { Ok(i) } else { Err(()) })
        else {
            report.skipped.push((
                id.min(u32::MAX as u64) as u32,
                format!("device id {id} does not fit in 24 bits"),
            ));
            continue;
        };
        let Some(&root) = top.get(&id) else {
            report.skipped.push((
                id32,
                "no mapping tree (not in the top level of the mapping tree)".into(),
            ));
            continue;
        };
        let m = match read_mappings(&mut r, root, id, limit, &mut dropped) {
            Ok(m) => m,
            Err(e) => {
                report
                    .skipped
                    .push((id32, format!("its mapping tree is damaged: {e}")));
                continue;
            }
        };
        let d = match details.get(&id) {
            Some(d) => *d,
            None => {
                report.notes.push(format!(
                    "device {id} has a mapping tree but no details; times set to 0"
                ));
                DeviceDetails::default()
            }
        };
        if d.mapped_blocks != m.count && details.contains_key(&id) {
            report.notes.push(format!(
                "device {id}: details said {} mapped blocks, its tree holds {}",
                d.mapped_blocks, m.count
            ));
        }
        max_time = max_time
            .max(m.max_time)
            .max(d.snapshotted_time)
            .max(d.creation_time);
        devices.push((id32, d, m));
    }
    if dropped > 0 {
        report.notes.push(format!(
            "{dropped} mappings to data blocks beyond nr_data_blocks {limit} were dropped"
        ));
    }
    let nr_data = match opts.nr_data_blocks {
        Some(n) => n,
        None => {
            let mapped_end = devices.iter().map(|(_, _, m)| m.end).max().unwrap_or(0);
            let (n, why) = derive_nr_data_blocks(&NrDataEvidence {
                stated,
                mapped_end,
                data_block_bytes: u64::from(sb_fields.data_block_size) * 512,
                data_device_size: opts.data_device_size,
                metadata_blocks: r.nr_blocks(),
            });
            report.nr_data_blocks_derived = why;
            n
        }
    };
    report.nr_data_blocks = nr_data;

    let time = if good_sb.is_some() || raw_is_sane(&raw) {
        sb_fields.time
    } else {
        max_time
    };
    v.superblock_b(&ir::Superblock {
        uuid: String::new(),
        time,
        transaction: sb_fields.trans_id,
        // A repaired pool no longer needs checking; a damaged superblock's flags are not
        // trusted at all.
        flags: if good_sb.is_some() {
            sb_fields.flags & !NEEDS_CHECK
        } else {
            0
        },
        version: if sb_fields.version == 1 { 1 } else { 2 },
        data_block_size: sb_fields.data_block_size,
        nr_data_blocks: nr_data,
        metadata_snap: None,
    })
    .map_err(Into::into)?;
    for (id, d, m) in devices {
        v.device_b(&ir::Device {
            dev_id: id,
            mapped_blocks: m.count,
            transaction: d.transaction_id,
            creation_time: d.creation_time,
            snap_time: d.snapshotted_time,
        })
        .map_err(Into::into)?;
        for run in &m.runs {
            v.map(run).map_err(Into::into)?;
        }
        v.device_e().map_err(Into::into)?;
        report.devices.push(id);
        report.nr_mappings += m.count;
    }
    v.superblock_e().map_err(Into::into)?;
    v.eof().map_err(Into::into)?;
    Ok(report)
}

/// What [`derive_nr_data_blocks`] judges the number of data blocks by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NrDataEvidence {
    /// The superblock's number (its data space map's `nr_blocks`); None if it cannot say.
    pub stated: Option<u64>,
    /// Highest mapped data block + 1, over every recovered device (0 without mappings).
    pub mapped_end: u64,
    /// Data block size in bytes.
    pub data_block_bytes: u64,
    /// Size of the data device in bytes, when known.
    pub data_device_size: Option<u64>,
    /// Blocks of the metadata device (each bitmap of the data space map takes one).
    pub metadata_blocks: u64,
}

/// The number of data blocks for a repaired superblock, and when it is not the stated one,
/// why and what it was derived from.
///
/// The stated number is kept unless it is absurd: unknown; more than a mapping can address
/// (2^40); more bitmaps (one per 16 320 blocks) than the metadata device has blocks; below the
/// highest mapped data block + 1; or beyond the data device, when its size is known. (A stated
/// number below the data device's size is kept: the kernel grows the pool to its data device
/// on activation.) An absurd number is replaced by the data device's size in blocks when it is
/// known and covers every mapping, else by the highest mapped data block + 1, so that no
/// mapping is lost (a data device smaller than that must be grown before the pool is used).
pub fn derive_nr_data_blocks(e: &NrDataEvidence) -> (u64, Option<String>) {
    let device_blocks = e
        .data_device_size
        .filter(|_| e.data_block_bytes > 0)
        .map(|s| s / e.data_block_bytes);
    let absurd = match e.stated {
        None => Some("the superblock does not say (it is damaged)".to_string()),
        Some(s) if s > BlockTime::MAX_BLOCK + 1 => Some(format!(
            "the superblock says {s}, more than a mapping can address (2^40)"
        )),
        Some(s) if s.div_ceil(ENTRIES_PER_BITMAP) > e.metadata_blocks => Some(format!(
            "the superblock says {s}, whose space map would need {} bitmap blocks, more than \
             the metadata device's {} blocks",
            s.div_ceil(ENTRIES_PER_BITMAP),
            e.metadata_blocks
        )),
        Some(s) if s < e.mapped_end => Some(format!(
            "the superblock says {s}, below the highest mapped data block ({}) + 1",
            e.mapped_end - 1
        )),
        Some(s) => match (device_blocks, e.data_device_size) {
            (Some(d), Some(bytes)) if s > d => Some(format!(
                "the superblock says {s}, beyond the data device ({bytes} bytes, {d} blocks of \
                 {} bytes)",
                e.data_block_bytes
            )),
            _ => None,
        },
    };
    let Some(absurd) = absurd else {
        return (e.stated.unwrap_or(0), None);
    };
    let mapped = if e.mapped_end == 0 {
        "no data block is mapped".to_string()
    } else {
        format!("the highest mapped data block is {}", e.mapped_end - 1)
    };
    let (n, from) = match (device_blocks, e.data_device_size) {
        (Some(d), Some(bytes)) if d >= e.mapped_end => (
            d,
            format!(
                "from the data device's size ({bytes} bytes / {} bytes a block; {mapped})",
                e.data_block_bytes
            ),
        ),
        (Some(d), Some(bytes)) => (
            e.mapped_end,
            format!(
                "from the mappings ({mapped}); the data device has only {d} blocks ({bytes} \
                 bytes): grow it to at least {} bytes before using the pool",
                e.mapped_end.saturating_mul(e.data_block_bytes)
            ),
        ),
        _ => (
            e.mapped_end,
            format!("from the mappings alone ({mapped}; the data device's size was not given)"),
        ),
    };
    (
        n,
        Some(format!("nr_data_blocks: {absurd}; set to {n} {from}")),
    )
}

fn raw_is_sane(raw: &Superblock) -> bool {
    raw.magic == SUPERBLOCK_MAGIC && raw.fault().is_none()
}

/// Fields of a superblock whose checksum is wrong: overrides, then the damaged superblock if it
/// looks sane, then a held snapshot copy.
fn guess_superblock(
    raw: &Superblock,
    scan: Option<&Scan>,
    opts: &SalvageOptions,
    report: &mut SalvageReport,
) -> Result<Superblock> {
    let held = scan.and_then(|s| {
        s.superblocks
            .iter()
            .filter(|(_, sb)| sb.fault().is_none())
            .max_by_key(|(_, sb)| (sb.trans_id, sb.time))
            .map(|(_, sb)| sb.clone())
    });
    let base = if raw_is_sane(raw) {
        report.notes.push(
            "superblock fields were taken from the damaged superblock (magic and sizes look right)"
                .into(),
        );
        Some(raw.clone())
    } else if let Some(h) = held {
        report
            .notes
            .push("superblock fields were taken from a held metadata snapshot copy".into());
        Some(h)
    } else {
        None
    };
    let mut sb = base.clone().unwrap_or_default();
    let mut missing = Vec::new();
    match opts.transaction_id {
        Some(t) => sb.trans_id = t,
        None if base.is_none() => missing.push("transaction id"),
        None => {}
    }
    match opts.data_block_size {
        Some(b) => sb.data_block_size = b,
        None if base.is_none() => missing.push("data block size"),
        None => {}
    }
    match opts.nr_data_blocks {
        Some(n) => sb.data_sm_root.nr_blocks = n,
        // A held copy has no space maps: its nr_blocks is 0.
        // The data device's size can stand in for it (see derive_nr_data_blocks).
        None if opts.data_device_size.is_some() => {}
        None if base.is_none() || sb.data_sm_root.nr_blocks == 0 => missing.push("nr data blocks"),
        None => {}
    }
    if !missing.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "the superblock is damaged; give the {} on the command line",
            missing.join(", ")
        )));
    }
    Ok(sb)
}

/// Scanned candidate roots, walked strictly; the best intact (details, top level) pair.
fn best_roots(
    r: &mut Reader,
    scan: &mut Scan,
    prefer: &[u64],
    avoid: &HashSet<u64>,
    report: &mut SalvageReport,
) -> (Option<DetailsMap>, Option<TopLevelMap>) {
    let blocks: Vec<u64> = {
        let mut v: Vec<u64> = scan.nodes.keys().copied().collect();
        v.sort_unstable();
        v
    };
    // Children of internal nodes of each class: a root is a node nobody of its class points at.
    let mut details_children = HashSet::new();
    let mut top_children = HashSet::new();
    let mut memo = HashMap::new();
    for &b in &blocks {
        let kids = match scan.nodes.get(&b) {
            Some(n) if !n.leaf => n.children.clone(),
            _ => continue,
        };
        if scan.class(b, 0) == Class::Details {
            details_children.extend(kids.iter().copied());
        }
        if scan.top_like(b, &mut memo, 0) {
            top_children.extend(kids.iter().copied());
        }
    }
    let mut details_trees = Vec::new();
    let mut top_trees = Vec::new();
    for &b in &blocks {
        if scan.class(b, 0) == Class::Details
            && !details_children.contains(&b)
            && let Ok(d) = walk::read_details(r, b)
        {
            details_trees.push((b, d));
        }
        if scan.top_like(b, &mut memo, 0)
            && !top_children.contains(&b)
            && let Ok(t) = walk::read_top_level(r, b)
        {
            top_trees.push((b, t));
        }
    }
    // (hinted by the superblock, not a held copy's, devices in common, -disagreements, size)
    type Score = (usize, usize, usize, i64, usize);
    let mut best: Option<(Score, usize, usize)> = None;
    for (di, (db, d)) in details_trees.iter().enumerate() {
        for (ti, (tb, t)) in top_trees.iter().enumerate() {
            let hinted = prefer.iter().filter(|&&p| p == *db || p == *tb).count();
            let fresh = [db, tb].iter().filter(|b| !avoid.contains(b)).count();
            let common = d.keys().filter(|k| t.contains_key(k)).count();
            let differ = (d.len() + t.len() - 2 * common) as i64;
            let score = (hinted, fresh, common, -differ, d.len() + t.len());
            if best.is_none_or(|(s, _, _)| score > s) {
                best = Some((score, di, ti));
            }
        }
    }
    match best {
        Some((_, di, ti)) => {
            report.notes.push(format!(
                "found the device details tree at block {} and the top level of the mapping tree at block {}",
                details_trees[di].0, top_trees[ti].0
            ));
            (
                Some(details_trees.swap_remove(di).1),
                Some(top_trees.swap_remove(ti).1),
            )
        }
        None => {
            let d = details_trees
                .into_iter()
                .max_by_key(|(_, d)| d.len())
                .map(|(_, d)| d);
            let t = top_trees
                .into_iter()
                .max_by_key(|(_, t)| t.len())
                .map(|(_, t)| t);
            (d, t)
        }
    }
}

/// Details of every intact details leaf; where leaves disagree, the most recent-looking
/// entry wins (latest snapshot time, then creation time, then transaction).
fn pool_details(r: &mut Reader, scan: &mut Scan) -> BTreeMap<u64, DeviceDetails> {
    let mut out: BTreeMap<u64, DeviceDetails> = BTreeMap::new();
    let mut blocks: Vec<u64> = scan
        .nodes
        .iter()
        .filter(|(_, n)| n.leaf && n.value_size == DeviceDetails::SIZE)
        .map(|(b, _)| *b)
        .collect();
    blocks.sort_unstable();
    for b in blocks {
        let Ok(blk) = r.block(b, BlockKind::Node, "device details tree leaf") else {
            continue;
        };
        let n = NodeRef(&blk[..]);
        if walk::node_fault(n, DeviceDetails::SIZE, true, None).is_some() {
            continue;
        }
        for i in 0..n.nr_entries() {
            let d = DeviceDetails::decode(n.value(i));
            let key = |d: &DeviceDetails| (d.snapshotted_time, d.creation_time, d.transaction_id);
            out.entry(n.key(i))
                .and_modify(|old| {
                    if key(&d) > key(old) {
                        *old = d;
                    }
                })
                .or_insert(d);
        }
    }
    out
}

/// Device roots from every top-level-looking leaf; where leaves disagree, prefer a root whose
/// tree is intact and holds as many mappings as the details say, then the one with the most
/// recent mapping time.
fn pool_top_level(
    r: &mut Reader,
    scan: &mut Scan,
    details: Option<&BTreeMap<u64, DeviceDetails>>,
    nr_data: u64,
) -> BTreeMap<u64, u64> {
    let mut memo = HashMap::new();
    let mut leaves: Vec<u64> = scan
        .nodes
        .iter()
        .filter(|(_, n)| n.leaf && n.top_entries.is_some())
        .map(|(b, _)| *b)
        .collect();
    leaves.sort_unstable();
    let mut candidates: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for b in leaves {
        if !scan.top_like(b, &mut memo, 0) {
            continue;
        }
        for &(dev, root) in scan.nodes[&b].top_entries.as_deref().unwrap_or_default() {
            let v = candidates.entry(dev).or_default();
            if !v.contains(&root) {
                v.push(root);
            }
        }
    }
    let mut out = BTreeMap::new();
    for (dev, roots) in candidates {
        let want = details.and_then(|d| d.get(&dev)).map(|d| d.mapped_blocks);
        let best = roots
            .iter()
            .map(|&root| {
                let mut dropped = 0;
                let score = match read_mappings(r, root, dev, nr_data, &mut dropped) {
                    Ok(m) => (true, Some(m.count) == want, m.max_time, root),
                    Err(_) => (false, false, 0, root),
                };
                (score, root)
            })
            .max_by_key(|(s, _)| *s)
            .map(|(_, root)| root);
        if let Some(root) = best {
            out.insert(dev, root);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use thinpool_pdata::block::{put_u64, stamp};

    use super::*;
    use crate::dump::{DumpOptions, dump};
    use crate::walk::testutil::{VECTORS, mem, vector};

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        Sb(ir::Superblock),
        Dev(ir::Device),
        Map(Map),
        DevEnd,
        SbEnd,
    }

    /// Collects the event stream (for the salvage; errors are the crate's).
    #[derive(Default)]
    struct Collect(Vec<Ev>);

    impl MetadataVisitor for Collect {
        type Error = Error;
        fn superblock_b(&mut self, sb: &ir::Superblock) -> Result<()> {
            self.0.push(Ev::Sb(sb.clone()));
            Ok(())
        }
        fn superblock_e(&mut self) -> Result<()> {
            self.0.push(Ev::SbEnd);
            Ok(())
        }
        fn device_b(&mut self, d: &ir::Device) -> Result<()> {
            self.0.push(Ev::Dev(*d));
            Ok(())
        }
        fn device_e(&mut self) -> Result<()> {
            self.0.push(Ev::DevEnd);
            Ok(())
        }
        fn map(&mut self, m: &Map) -> Result<()> {
            self.0.push(Ev::Map(*m));
            Ok(())
        }
    }

    /// The same, for `dump` (whose visitors fail with I/O errors).
    #[derive(Default)]
    struct IoCollect(Collect);

    impl MetadataVisitor for IoCollect {
        type Error = std::io::Error;
        fn superblock_b(&mut self, sb: &ir::Superblock) -> std::io::Result<()> {
            self.0.0.push(Ev::Sb(sb.clone()));
            Ok(())
        }
        fn superblock_e(&mut self) -> std::io::Result<()> {
            self.0.0.push(Ev::SbEnd);
            Ok(())
        }
        fn device_b(&mut self, d: &ir::Device) -> std::io::Result<()> {
            self.0.0.push(Ev::Dev(*d));
            Ok(())
        }
        fn device_e(&mut self) -> std::io::Result<()> {
            self.0.0.push(Ev::DevEnd);
            Ok(())
        }
        fn map(&mut self, m: &Map) -> std::io::Result<()> {
            self.0.0.push(Ev::Map(*m));
            Ok(())
        }
    }

    fn dumped(img: &[u8]) -> Vec<Ev> {
        let mut c = IoCollect::default();
        dump(mem(img.to_vec()), DumpOptions::default(), &mut c).expect("dump");
        c.0.0
    }

    fn salvaged(img: &[u8], opts: &SalvageOptions) -> (Vec<Ev>, SalvageReport) {
        let mut c = Collect::default();
        let r = salvage_with(mem(img.to_vec()), opts, &mut c).expect("salvage");
        (c.0, r)
    }

    /// The events of every device but `skip`.
    fn without_device(evs: &[Ev], skip: u32) -> Vec<Ev> {
        let mut out = Vec::new();
        let mut skipping = false;
        for e in evs {
            match e {
                Ev::Dev(d) if d.dev_id == skip => skipping = true,
                Ev::DevEnd if skipping => {
                    skipping = false;
                    continue;
                }
                _ => {}
            }
            if !skipping {
                out.push(e.clone());
            }
        }
        out
    }

    fn block_mut(img: &mut [u8], b: u64) -> &mut [u8] {
        &mut img[b as usize * BLOCK_SIZE..(b as usize + 1) * BLOCK_SIZE]
    }

    #[test]
    fn salvage_of_intact_vectors_is_the_dump() {
        for name in VECTORS {
            let img = vector(name);
            let (evs, rep) = salvaged(&img, &SalvageOptions::default());
            assert_eq!(evs, dumped(&img), "{name}");
            assert!(
                rep.superblock_ok && rep.skipped.is_empty(),
                "{name}: {rep:?}"
            );
        }
    }

    #[test]
    fn damaged_bottom_leaf_loses_only_its_device() {
        let mut img = vector("many-devices");
        let want = dumped(&img);
        // Device 14's bottom tree is a single leaf: find it through the top level.
        let mut r = Reader::new(mem(img.clone())).unwrap();
        let sb = r.superblock().unwrap();
        let top = walk::read_top_level(&mut r, sb.mapping_root).unwrap();
        let leaf = top[&14];
        block_mut(&mut img, leaf)[100] ^= 0x40;
        let (evs, rep) = salvaged(&img, &SalvageOptions::default());
        assert_eq!(evs, without_device(&want, 14));
        assert_eq!(rep.devices.len(), 299);
        assert_eq!(rep.skipped.len(), 1);
        assert_eq!(rep.skipped[0].0, 14);
        assert!(
            rep.skipped[0].1.contains(&format!("metadata block {leaf}")),
            "{rep:?}"
        );
        // Device 0's three-level tree: damage one of its leaves deep down, re-stamped so only
        // the key order is wrong.
        let mut img2 = vector("many-devices");
        let root0 = top[&0];
        let n = r.node(root0, "x").unwrap();
        let mid = NodeRef(&n[..]).value_u64(1);
        let m = r.node(mid, "x").unwrap();
        let leaf0 = NodeRef(&m[..]).value_u64(3);
        let blk = block_mut(&mut img2, leaf0);
        let k0 = NodeRef(blk).key(0);
        put_u64(blk, 40, k0);
        stamp(blk, BlockKind::Node, leaf0);
        let (evs, rep) = salvaged(&img2, &SalvageOptions::default());
        assert_eq!(evs, without_device(&want, 0));
        assert_eq!(rep.skipped.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn bad_superblock_checksum_recovers_every_device_by_scanning() {
        for name in VECTORS {
            let mut img = vector(name);
            let want = dumped(&img);
            block_mut(&mut img, 0)[0x2c + 300] ^= 1;
            let (evs, rep) = salvaged(&img, &SalvageOptions::default());
            assert!(!rep.superblock_ok);
            assert_eq!(evs, want, "{name}: {rep:?}");
        }
    }

    #[test]
    fn wiped_superblock_needs_the_fields_then_recovers_the_devices() {
        for name in VECTORS {
            let mut img = vector(name);
            let want = dumped(&img);
            let Some(Ev::Sb(sb)) = want.first().cloned() else {
                panic!()
            };
            block_mut(&mut img, 0).fill(0);
            let mut c = Collect::default();
            let e = salvage(mem(img.clone()), &mut c);
            if name == "metadata-snap" {
                // The held snapshot copy supplies the block size, but not the data size.
                let msg = e.unwrap_err().to_string();
                assert!(msg.contains("nr data blocks"), "{msg}");
            } else {
                let msg = e.unwrap_err().to_string();
                assert!(
                    msg.contains("transaction id") && msg.contains("data block size"),
                    "{msg}"
                );
            }
            let opts = SalvageOptions {
                transaction_id: Some(sb.transaction),
                data_block_size: Some(sb.data_block_size),
                nr_data_blocks: Some(sb.nr_data_blocks),
                data_device_size: None,
            };
            let (evs, rep) = salvaged(&img, &opts);
            // Devices and mappings as dumped; the time is the latest one seen.
            assert_eq!(evs[1..], want[1..], "{name}: {rep:?}");
            let Some(Ev::Sb(got)) = evs.first() else {
                panic!()
            };
            assert_eq!(
                (got.transaction, got.data_block_size, got.nr_data_blocks),
                (sb.transaction, sb.data_block_size, sb.nr_data_blocks)
            );
        }
    }

    #[test]
    fn damaged_details_and_top_level_trees_come_from_the_scan() {
        let img = vector("many-devices");
        let want = dumped(&img);
        let mut r = Reader::new(mem(img.clone())).unwrap();
        let sb = r.superblock().unwrap();
        for root in [sb.details_root, sb.mapping_root] {
            let mut bad = img.clone();
            block_mut(&mut bad, root)[50] ^= 1;
            let (evs, rep) = salvaged(&bad, &SalvageOptions::default());
            assert_eq!(evs, want, "{rep:?}");
            assert!(rep.details_from_scan || rep.mappings_from_scan);
        }
    }

    /// `img` with the superblock's number of data blocks set to `n`, checksum redone.
    fn with_nr_data_blocks(img: &[u8], n: u64) -> Vec<u8> {
        let mut img = img.to_vec();
        let sb = block_mut(&mut img, 0);
        put_u64(sb, 0x40, n);
        stamp(sb, BlockKind::Superblock, 0);
        img
    }

    #[test]
    fn derive_nr_data_blocks_keeps_sane_numbers_and_replaces_absurd_ones() {
        let e = NrDataEvidence {
            stated: Some(1000),
            mapped_end: 48,
            data_block_bytes: 65536,
            data_device_size: None,
            metadata_blocks: 2048,
        };
        assert_eq!(derive_nr_data_blocks(&e), (1000, None));
        // Smaller than the data device: kept (the kernel grows the pool on activation).
        let dev = Some(1024 * 65536 + 100);
        let d = NrDataEvidence {
            data_device_size: dev,
            ..e
        };
        assert_eq!(derive_nr_data_blocks(&d), (1000, None));
        let cases = [
            (
                Some(1 << 60),
                None,
                48,
                "more than a mapping can address (2^40)",
            ),
            (
                Some(1 << 60),
                dev,
                1024,
                "from the data device's size (67108964 bytes",
            ),
            (
                Some(20),
                None,
                48,
                "below the highest mapped data block (47) + 1",
            ),
            (Some(20), None, 48, "from the mappings alone"),
            (Some(20), dev, 1024, "the highest mapped data block is 47"),
            (
                Some(1025),
                dev,
                1024,
                "beyond the data device (67108964 bytes, 1024 blocks",
            ),
            // 2049 bitmaps would be needed: more than the metadata device's 2048 blocks.
            (Some(2048 * 16320 + 1), None, 48, "2049 bitmap blocks"),
            (None, dev, 1024, "the superblock does not say"),
        ];
        for (stated, size, want, says) in cases {
            let (n, why) = derive_nr_data_blocks(&NrDataEvidence {
                stated,
                data_device_size: size,
                ..e
            });
            let why = why.expect("derived");
            assert_eq!(n, want, "{why}");
            assert!(why.contains(says), "{why}");
            assert!(why.contains(&format!("set to {want} ")), "{why}");
        }
        // A data device smaller than the mappings: every mapping is kept, and the user told.
        let (n, why) = derive_nr_data_blocks(&NrDataEvidence {
            stated: Some(1 << 50),
            data_device_size: Some(10 * 65536),
            ..e
        });
        assert_eq!(n, 48);
        assert!(why.unwrap().contains("grow it to at least 3145728 bytes"));
    }

    #[test]
    fn absurd_nr_data_blocks_is_derived_and_every_mapping_kept() {
        let img = vector("snapshots");
        let want = dumped(&img);
        let Some(Ev::Sb(sb)) = want.first().cloned() else {
            panic!()
        };
        let end = want
            .iter()
            .filter_map(|e| match e {
                Ev::Map(m) => Some(m.data_begin + m.len),
                _ => None,
            })
            .max()
            .unwrap();
        assert!(end > 1, "the vector maps data blocks");
        let bytes = u64::from(sb.data_block_size) * 512;
        for (bad, data, expect) in [
            (1u64 << 60, None, end),
            (1 << 60, Some(sb.nr_data_blocks * bytes), sb.nr_data_blocks),
            (end - 1, None, end),
            (
                end - 1,
                Some(sb.nr_data_blocks * bytes + 7),
                sb.nr_data_blocks,
            ),
        ] {
            let opts = SalvageOptions {
                data_device_size: data,
                ..SalvageOptions::default()
            };
            let (evs, rep) = salvaged(&with_nr_data_blocks(&img, bad), &opts);
            assert_eq!(rep.nr_data_blocks, expect);
            assert!(rep.nr_data_blocks_derived.is_some(), "{rep:?}");
            let mut sb2 = sb.clone();
            sb2.nr_data_blocks = expect;
            assert_eq!(evs[0], Ev::Sb(sb2), "{bad} {data:?}");
            assert_eq!(evs[1..], want[1..], "{bad} {data:?}: every mapping kept");
            // And the repaired pool holds them.
            let out = Arc::new(thinpool_io::MemDevice::new(img.len() as u64));
            repair(mem(with_nr_data_blocks(&img, bad)), out.clone(), &opts).unwrap();
            assert_eq!(dumped(&out.to_bytes())[1..], want[1..]);
        }
        // A number given as an option is taken as given: mappings past it are dropped.
        let opts = SalvageOptions {
            nr_data_blocks: Some(end - 1),
            ..SalvageOptions::default()
        };
        let (_, rep) = salvaged(&with_nr_data_blocks(&img, 1 << 60), &opts);
        assert_eq!(rep.nr_data_blocks, end - 1);
        assert!(rep.nr_data_blocks_derived.is_none());
        assert!(
            rep.notes.iter().any(|n| n.contains("were dropped")),
            "{rep:?}"
        );
    }

    #[test]
    fn repair_writes_a_pool_that_dumps_the_same() {
        for name in ["one-thin", "snapshots", "shared-root"] {
            let mut img = vector(name);
            let want = dumped(&img);
            block_mut(&mut img, 0)[0x2c + 300] ^= 1;
            let out = Arc::new(thinpool_io::MemDevice::new(img.len() as u64));
            let rep = repair(mem(img), out.clone(), &SalvageOptions::default()).unwrap();
            assert_eq!(rep.skipped, vec![]);
            assert_eq!(dumped(&out.to_bytes()), want, "{name}");
        }
    }
}
