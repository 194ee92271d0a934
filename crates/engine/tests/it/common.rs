//! Helpers shared by the engine tests: seeds and case counts from the environment, unique
//! byte patterns, the oracles (`thin_check`, our own check) and small pool set-ups.

use std::path::Path;
use std::sync::Arc;

use thinpool_engine::{ErrorKind, PoolConfig};
use thinpool_io::{BlockDevice, FileDevice};

/// Pool block size of every test pool: the smallest allowed, so that small volumes span many
/// blocks and blocks are reused soon after discards.
pub const BS: u64 = 64 << 10;

/// A number from the environment, else `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("{name}={s:?} is not a number")),
        Err(_) => default,
    }
}

/// The seed of a randomised test: `THINPOOL_TEST_SEED`, else a random one. Printed, so that a
/// failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = env_u64("THINPOOL_TEST_SEED", rand::random::<u32>() as u64);
    eprintln!("{test}: seed {seed} (replay with THINPOOL_TEST_SEED={seed})");
    seed
}

pub use thinpool_testkit::{require_tool as have_tool, thin_check};

/// Our own checker on a metadata device: Ok, or Err with its rendered report.
pub fn our_check(dev: Arc<dyn BlockDevice>) -> Result<(), String> {
    let report = thinpool_thin::check::check(dev, &Default::default(), &mut |_, _| {})
        .map_err(|e| format!("our check could not read the metadata: {e}"))?;
    if report.errors.is_empty() {
        Ok(())
    } else {
        Err(format!("our check found errors:\n{}", report.render()))
    }
}

/// Both checkers on the metadata file of a closed pool rooted at `root`; panics with `ctx`.
pub fn check_closed_pool(root: &Path, thin_check_oracle: bool, ctx: &str) {
    let meta = root.join("pool").join("metadata");
    if thin_check_oracle && let Err(e) = thin_check(&meta) {
        panic!("{ctx}: {e}");
    }
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open_read_only(&meta).unwrap());
    if let Err(e) = our_check(dev) {
        panic!("{ctx}: {e}");
    }
}

/// Device ids in the metadata, and for each its mapped virtual blocks (read with the thin
/// crate, independently of the engine).
pub fn metadata_mappings(
    dev: Arc<dyn BlockDevice>,
) -> std::collections::BTreeMap<u32, std::collections::BTreeSet<u64>> {
    let mut md = thinpool_thin::ThinMetadata::open(dev).expect("metadata opens");
    let mut out = std::collections::BTreeMap::new();
    for (id, _) in md.devices().expect("device list") {
        let mut set = std::collections::BTreeSet::new();
        md.mappings(id, 0, &mut |v, _, _| {
            set.insert(v);
            true
        })
        .expect("mappings");
        out.insert(id.get(), set);
    }
    out
}

/// Byte `pos` (the byte offset in the volume) of the pattern of write `id`; id 0 is zeros.
/// Distinct ids give unrelated bytes, so stale or foreign data is found at once.
#[inline]
pub fn pat(id: u64, pos: u64) -> u8 {
    if id == 0 {
        return 0;
    }
    let mut x = id
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((pos >> 3).wrapping_mul(0xC2B2_AE3D_27D4_EB4F));
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    x.to_le_bytes()[(pos & 7) as usize]
}

/// The bytes of write `id` placed at volume offset `offset`.
pub fn pattern(id: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pat(id, offset + i)).collect()
}

/// The first differing byte of two equal-length slices, for messages.
pub fn first_diff(got: &[u8], want: &[u8]) -> Option<(usize, u8, u8)> {
    got.iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .map(|i| (i, got[i], want[i]))
}

/// A file-backed pool config: `data_blocks` blocks of [`BS`], `meta_mib` MiB of metadata.
pub fn small_config(data_blocks: u64, meta_mib: u64) -> PoolConfig {
    PoolConfig {
        data_size: data_blocks * BS,
        metadata_size: meta_mib << 20,
        block_size: BS,
        ..Default::default()
    }
}

/// Assert an engine result failed with `kind`.
#[track_caller]
pub fn assert_kind<T: std::fmt::Debug>(r: thinpool_engine::Result<T>, kind: ErrorKind, ctx: &str) {
    match r {
        Ok(v) => panic!("{ctx}: expected error kind {kind:?}, got Ok({v:?})"),
        Err(e) => assert_eq!(e.kind(), kind, "{ctx}: wrong error kind for: {e}"),
    }
}

/// A device with test hooks around another: counts punches, sleeps after each sync (which
/// then covers only what was written before it began), and may say it copies by reference.
pub struct Hooked {
    pub dev: Arc<dyn BlockDevice>,
    pub punches: std::sync::atomic::AtomicU64,
    pub sync_delay: std::time::Duration,
    pub by_reference: bool,
}

impl Hooked {
    pub fn new(dev: Arc<dyn BlockDevice>) -> Self {
        Hooked {
            dev,
            punches: 0.into(),
            sync_delay: std::time::Duration::ZERO,
            by_reference: false,
        }
    }

    pub fn punches(&self) -> u64 {
        self.punches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl BlockDevice for Hooked {
    fn name(&self) -> &str {
        self.dev.name()
    }
    fn size(&self) -> thinpool_io::Result<u64> {
        self.dev.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> thinpool_io::Result<()> {
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> thinpool_io::Result<()> {
        self.dev.write_at(buf, offset)
    }
    fn sync(&self) -> thinpool_io::Result<()> {
        self.dev.sync()?;
        std::thread::sleep(self.sync_delay);
        Ok(())
    }
    fn set_size(&self, size: u64) -> thinpool_io::Result<()> {
        self.dev.set_size(size)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> thinpool_io::Result<()> {
        self.punches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.dev.punch_hole(offset, len)
    }
    fn copy_into_zeroed(&self, src: u64, dst: u64, len: u64) -> thinpool_io::Result<()> {
        self.dev.copy_into_zeroed(src, dst, len)
    }
    fn copies_by_reference(&self) -> bool {
        self.by_reference
    }
    fn all_data(&self, offset: u64, len: u64) -> thinpool_io::Result<bool> {
        self.dev.all_data(offset, len)
    }
    fn holes(&self, f: &mut dyn FnMut(u64, u64) -> bool) -> thinpool_io::Result<()> {
        self.dev.holes(f)
    }
}
