//! `thinpool vol …`: create, snapshot, list, resize and remove volumes, and copy raw images in
//! and out.
//!
//! Import and export are sparse both ways, at the pool's block granularity:
//!
//! ```text
//!  FILE   |data|zeros|   hole (SEEK_HOLE)   |data|part|
//!  volume |map |  -  |          -           |map |map |   ← only blocks holding a non-zero
//!                                                          byte are provisioned
//!  volume |map |  -  |          -           |map |
//!  FILE   |data|hole |         hole         |data|      ← unmapped ranges (mapped_extents)
//!                                                         and zero pages are left as holes
//! ```
//!
//! Holes of the source are found with `SEEK_DATA`/`SEEK_HOLE`, so a mostly empty 1 TiB image
//! imports in the time it takes to read its data.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use thinpool_control::{Hello, VolumeInfo, VolumeKind};
use thinpool_engine::{ErrorKind, Pool, Volume};

use crate::client::{self, Target};
use crate::pool::{self, Access};
use crate::size::{human, parse_size, percent};

/// Bytes moved per read/write call in import and export (rounded up to whole pool blocks).
const CHUNK: u64 = 4 << 20;

/// Granularity at which export looks for zeros to leave as holes: a filesystem block.
const PAGE: usize = 4096;

/// Size of a volume created without `--size`: 10 GiB, Docker's `dm.basesize` default.
pub const BASE_DEVICE_SIZE: u64 = 10 << 30;

/// How often a long import commits what it has written (the kernel's commit period), so that
/// the open transaction stays small and a crash loses at most this much work.
const COMMIT_EVERY: Duration = Duration::from_secs(1);

#[derive(Subcommand)]
pub enum VolCommand {
    /// Create an empty thin volume (no pool space is used until it is written).
    Create {
        /// Volume name.
        name: String,
        /// Virtual size (may exceed the pool: thin provisioning); default 10G, Docker's
        /// dm.basesize. Bytes, or a number with a 1024-based unit: K, M, G, T, P (optionally
        /// followed by iB or B: 10G = 10GiB = 10GB = 10 × 1024³ bytes).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        size: Option<u64>,
    },
    /// Show one volume: kind, parent, thin id, size, creation time, the blocks it maps.
    Info {
        /// Volume name.
        name: String,
        /// Print the volume as JSON (sizes in bytes; `created` in seconds since the epoch,
        /// `created_at` in RFC 3339).
        #[arg(long)]
        json: bool,
    },
    /// Take a snapshot of a volume (instant; blocks are shared until either side writes).
    Snapshot {
        /// The volume to snapshot.
        origin: String,
        /// Name of the new snapshot.
        name: String,
    },
    /// List volumes and snapshots with their sizes and the pool space they use.
    Ls {
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Grow or shrink a volume. A mounted volume's filesystem grows with it, online
    /// (resize2fs, xfs_growfs); a mounted one is never shrunk. Shrinking a volume that holds
    /// a filesystem is refused unless --resize-fs (unmounted ext2/3/4: checked and shrunk
    /// first); shrinking anything else discards everything past the new end.
    Resize {
        /// Volume name.
        name: String,
        /// New virtual size, or +SIZE to grow by that much: bytes, or a number with a
        /// 1024-based unit: K, M, G, T, P (optionally followed by iB or B: 10G = 10GiB = 10GB
        /// = 10 × 1024³ bytes).
        #[arg(value_name = "SIZE|+SIZE", value_parser = parse_new_size, allow_hyphen_values = true)]
        size: NewSize,
        /// Resize the volume's unmounted ext2/3/4 filesystem with it: `e2fsck -f`, then
        /// `resize2fs` (before a shrink, after a grow; at the same size it grows the
        /// filesystem to fill the volume). Needs the daemon.
        #[arg(long, visible_alias = "shrink-fs")]
        resize_fs: bool,
    },
    /// Attach a loop device to the volume's file (direct I/O) and print it. Needs the daemon.
    Attach {
        /// Volume name.
        name: String,
        /// Attach read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Detach the volume's loop device (`thinpool umount` when it is mounted).
    Detach {
        /// Volume name.
        name: String,
    },
    /// Remove a volume or snapshot, returning its unshared blocks to the pool.
    Rm {
        /// Volume name.
        name: String,
    },
    /// Copy a raw image (file or block device) into a volume, creating it if needed.
    ///
    /// A missing volume is created with the image's size. Blocks that are all zeros and holes
    /// of a sparse file use no pool space (holes are skipped without reading them). An existing
    /// volume must be at least as large as the image; it reads back as the image, and its bytes
    /// past the image's end are left as they are.
    Import {
        /// Volume name.
        name: String,
        /// Raw image to read.
        file: std::path::PathBuf,
    },
    /// Copy a volume into a raw image file or onto a block device.
    ///
    /// A file is created or overwritten with the volume's size, sparse: unmapped ranges and
    /// zero pages become holes. A block device must be at least as large as the volume; all of
    /// the volume is written to it, zeros included.
    Export {
        /// Volume name.
        name: String,
        /// Raw image to write.
        file: std::path::PathBuf,
    },
}

/// `vol resize`'s size: absolute, or grown by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewSize {
    /// This size.
    To(u64),
    /// The current size plus this.
    GrowBy(u64),
}

pub(crate) fn parse_new_size(s: &str) -> Result<NewSize, String> {
    match s.trim().strip_prefix('+') {
        Some(rest) => parse_size(rest).map(NewSize::GrowBy),
        None => parse_size(s).map(NewSize::To),
    }
}

pub fn run(root: &Path, cmd: VolCommand) -> Result<i32> {
    match cmd {
        VolCommand::Attach { name, read_only } => crate::mount::attach(root, &name, read_only),
        VolCommand::Detach { name } => crate::mount::detach(root, &name),
        VolCommand::Import { .. } | VolCommand::Export { .. } => {
            if let Some(daemon) = client::daemon(root)? {
                bail!(copy_through_nbd(root, &cmd, daemon.daemon()));
            }
            let access = match cmd {
                VolCommand::Export { .. } => Access::Look,
                _ => Access::Change,
            };
            pool::with_pool(root, access, |pool| copy(pool, root, cmd))
        }
        cmd => {
            let access = match cmd {
                VolCommand::Ls { .. } | VolCommand::Info { .. } => Access::Look,
                _ => Access::Change,
            };
            pool::with_daemon_or_pool(root, access, |target| exec(target, root, cmd))
        }
    }
}

/// Why `vol import`/`vol export` cannot run while a daemon holds the pool (they need the
/// pool's volumes open in this process), and the NBD command that does the same copy.
fn copy_through_nbd(root: &Path, cmd: &VolCommand, daemon: &Hello) -> String {
    let at = root.display();
    let pid = daemon.pid;
    // The endpoint the daemon says it serves (a daemon older than that field: ROOT/nbd.sock
    // if it is there).
    let old_default = root.join("nbd.sock");
    let socket = daemon
        .nbd_socket
        .clone()
        .or_else(|| (daemon.nbd_tcp.is_none() && old_default.exists()).then_some(old_default));
    let url = |name: &str| match (&socket, daemon.nbd_tcp) {
        (Some(p), _) => format!("'nbd+unix:///{name}?socket={}'", p.display()),
        (None, Some(addr)) => format!("'nbd://{addr}/{name}'"),
        (None, None) => String::new(),
    };
    if socket.is_none() && daemon.nbd_tcp.is_none() {
        return format!(
            "the thinpool daemon (pid {pid}) holds the pool at {at} and serves no NBD export, so \
             this command can neither open the pool nor copy through the daemon: stop the daemon \
             and run it again"
        );
    }
    let held = format!(
        "the thinpool daemon (pid {pid}) holds the pool, so this command cannot open it; copy \
         through the daemon's NBD export instead"
    );
    match cmd {
        VolCommand::Import { name, file } => format!(
            "importing {} into volume {name:?} of the pool at {at}: {held}: create the volume if \
             needed (`thinpool vol create {name} --size SIZE`), then run `nbdcopy {} {}`",
            file.display(),
            file.display(),
            url(name)
        ),
        VolCommand::Export { name, file } => format!(
            "exporting volume {name:?} of the pool at {at} to {}: {held}: run `nbdcopy {} {}`",
            file.display(),
            url(name),
            file.display()
        ),
        _ => held,
    }
}

/// One command that only changes or reads metadata, through the daemon or on the open pool;
/// returns what to print (once the pool is closed, when this command opened it).
fn exec(pool: &mut Target<'_>, root: &Path, cmd: VolCommand) -> Result<String> {
    let at = root.display();
    Ok(match cmd {
        VolCommand::Create { name, size } => {
            let size = size.unwrap_or(BASE_DEVICE_SIZE);
            let info = pool
                .create_volume(&name, size)
                .with_context(|| format!("creating volume {name:?} in the pool at {at}"))?;
            format!(
                "created volume {} ({}, thin id {})\n",
                info.name,
                human(info.size),
                info.thin_id
            )
        }
        VolCommand::Info { name, json } => {
            let what = || format!("reading volume {name:?} of the pool at {at}");
            let info = pool.volume_info(&name).with_context(what)?;
            let block_size = pool.status().with_context(what)?.block_size;
            let detail = VolumeDetail::new(info, block_size);
            if json {
                serde_json::to_string_pretty(&detail)? + "\n"
            } else {
                render_info(&detail)
            }
        }
        VolCommand::Snapshot { origin, name } => {
            let info = pool.snapshot(&origin, &name).with_context(|| {
                format!("snapshotting volume {origin:?} as {name:?} in the pool at {at}")
            })?;
            format!(
                "created snapshot {} of {} ({}, thin id {})\n",
                info.name,
                origin,
                human(info.size),
                info.thin_id
            )
        }
        VolCommand::Ls { json } => {
            let vols = pool
                .volumes()
                .with_context(|| format!("listing the volumes of the pool at {at}"))?;
            if json {
                serde_json::to_string_pretty(&vols)? + "\n"
            } else {
                let block_size = pool
                    .status()
                    .with_context(|| format!("reading the status of the pool at {at}"))?
                    .block_size;
                render_list(&vols, block_size)
            }
        }
        VolCommand::Resize {
            name,
            size,
            resize_fs,
        } => {
            let what = || format!("resizing volume {name:?} in the pool at {at}");
            let size = match size {
                NewSize::To(s) => s,
                NewSize::GrowBy(d) => {
                    let old = pool.volume_info(&name).with_context(what)?.size;
                    old.checked_add(d)
                        .with_context(|| format!("{old} + {d} bytes overflows"))
                        .with_context(what)?
                }
            };
            let r = pool
                .resize_volume(&name, size, resize_fs)
                .with_context(what)?;
            let mut out = format!(
                "resized volume {name}: {} -> {}\n",
                human(r.old_size),
                human(r.new_size)
            );
            if let Some(f) = r.filesystem {
                out += &format!(
                    "resized its {} filesystem{}: {} -> {}\n",
                    f.fstype,
                    f.mount_point
                        .map_or(String::new(), |d| format!(" on {}", d.display())),
                    human(f.old_size),
                    human(f.new_size)
                );
            }
            out
        }
        VolCommand::Rm { name } => {
            pool.remove_volume(&name)
                .with_context(|| format!("removing volume {name:?} from the pool at {at}"))?;
            format!("removed volume {name}\n")
        }
        VolCommand::Import { .. }
        | VolCommand::Export { .. }
        | VolCommand::Attach { .. }
        | VolCommand::Detach { .. } => {
            bail!("internal: vol import/export/attach/detach are not metadata commands")
        }
    })
}

/// `vol import` / `vol export` on the pool opened by this command.
fn copy(pool: &Pool, root: &Path, cmd: VolCommand) -> Result<String> {
    let at = root.display();
    Ok(match cmd {
        VolCommand::Import { name, file } => {
            let stats = import(pool, &name, &file).with_context(|| {
                format!(
                    "importing {} into volume {name:?} of the pool at {at}",
                    file.display()
                )
            })?;
            format!(
                "imported {} into volume {name}: {} of data, {} skipped as zeros or holes\n",
                file.display(),
                human(stats.written),
                human(stats.skipped),
            )
        }
        VolCommand::Export { name, file } => {
            let stats = export(pool, &name, &file).with_context(|| {
                format!(
                    "exporting volume {name:?} of the pool at {at} to {}",
                    file.display()
                )
            })?;
            format!(
                "exported volume {name} to {}: {} of data, {} unmapped or zero\n",
                file.display(),
                human(stats.written),
                human(stats.skipped),
            )
        }
        other => exec(&mut Target::Local(pool), root, other)?,
    })
}

fn kind_name(kind: VolumeKind) -> &'static str {
    match kind {
        VolumeKind::Thin => "thin",
        VolumeKind::Snapshot => "snapshot",
    }
}

/// `vol info`: a volume with what its numbers mean in bytes and time.
#[derive(serde::Serialize)]
struct VolumeDetail {
    #[serde(flatten)]
    info: VolumeInfo,
    /// `created` in RFC 3339, UTC.
    created_at: String,
    /// `mapped_blocks` in bytes.
    mapped_bytes: u64,
    /// The pool's block size.
    block_size: u64,
}

impl VolumeDetail {
    fn new(info: VolumeInfo, block_size: u64) -> Self {
        VolumeDetail {
            created_at: rfc3339(info.created),
            mapped_bytes: info.mapped_blocks.saturating_mul(block_size),
            block_size,
            info,
        }
    }
}

/// `vol info` for people.
fn render_info(d: &VolumeDetail) -> String {
    let v = &d.info;
    crate::info::aligned(&[
        ("Name", v.name.clone()),
        ("Kind", kind_name(v.kind).to_string()),
        (
            "Parent",
            v.parent.clone().unwrap_or_else(|| "-".to_string()),
        ),
        ("Thin id", v.thin_id.to_string()),
        ("Size", format!("{} ({} bytes)", human(v.size), v.size)),
        ("Created", d.created_at.clone()),
        (
            "Mapped",
            format!(
                "{} blocks of {}, {} ({} bytes, {}% of the size)",
                v.mapped_blocks,
                human(d.block_size),
                human(d.mapped_bytes),
                d.mapped_bytes,
                // A last partial block counts whole, so cap at 100 %.
                percent(d.mapped_bytes.min(v.size), v.size),
            ),
        ),
        (
            "Highest mapped block",
            v.highest_mapped_block
                .map_or_else(|| "none".to_string(), |b| b.to_string()),
        ),
        (
            "Loop device",
            v.loop_device
                .as_ref()
                .map_or_else(|| "-".to_string(), |d| d.display().to_string()),
        ),
        (
            "Mounted on",
            v.mount_point
                .as_ref()
                .map_or_else(|| "-".to_string(), |d| d.display().to_string()),
        ),
    ])
}

/// Seconds since the epoch as an RFC 3339 UTC time, `2024-02-29T13:05:09Z` (the image store's,
/// humantime's formatting).
pub(crate) fn rfc3339(secs: u64) -> String {
    thinpool_images::rfc3339(secs)
}

/// `vol ls` for people: one aligned row per volume; a LOOP and a MOUNT column when a volume is
/// attached.
fn render_list(vols: &[VolumeInfo], block_size: u64) -> String {
    let attached = vols.iter().any(|v| v.loop_device.is_some());
    let mut header: Vec<String> = ["NAME", "ID", "KIND", "SIZE", "USED", "USE%", "PARENT"]
        .map(String::from)
        .into();
    if attached {
        header.extend(["LOOP", "MOUNT"].map(String::from));
    }
    let path = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map_or_else(|| "-".to_string(), |d| d.display().to_string())
    };
    let mut rows = vec![header];
    for v in vols {
        let used = v.mapped_blocks * block_size;
        let mut row = vec![
            v.name.clone(),
            v.thin_id.to_string(),
            kind_name(v.kind).to_string(),
            human(v.size),
            human(used),
            // A last partial block counts whole, so cap at 100 %.
            format!("{}%", percent(used.min(v.size), v.size)),
            v.parent.clone().unwrap_or_else(|| "-".to_string()),
        ];
        if attached {
            row.push(path(&v.loop_device));
            row.push(path(&v.mount_point));
        }
        rows.push(row);
    }
    // Names left-aligned, numbers right-aligned.
    crate::table::render(&rows, &[1, 3, 4, 5])
}

/// What an import or export moved and what it skipped, in bytes.
#[derive(Default)]
struct CopyStats {
    written: u64,
    skipped: u64,
}

/// A byte-count progress bar on a terminal; hidden otherwise (or when logging is verbose).
fn progress(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ({eta})",
        )
        .expect("valid template"),
    );
    bar.set_message(what.to_string());
    bar
}

/// Size in bytes of a regular file or block device.
fn source_len(file: &File, path: &Path) -> Result<u64> {
    let meta = file
        .metadata()
        .with_context(|| format!("reading the attributes of {}", path.display()))?;
    let ft = meta.file_type();
    if ft.is_file() {
        Ok(meta.len())
    } else if ft.is_block_device() {
        let mut f = file;
        f.seek(SeekFrom::End(0))
            .with_context(|| format!("finding the size of {}", path.display()))
    } else {
        bail!(
            "{} is not a regular file or a block device (a raw image is needed)",
            path.display()
        )
    }
}

fn import(pool: &Pool, name: &str, path: &Path) -> Result<CopyStats> {
    let src = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = source_len(&src, path)?;
    if len == 0 {
        bail!("{} is empty: there is nothing to import", path.display());
    }
    let (vol, created, mapped) = match pool.volume_info(name) {
        Ok(info) => {
            if info.size < len {
                bail!(
                    "volume {name:?} ({}, {} bytes) is smaller than {} ({}, {len} bytes): grow it \
                     first with `thinpool vol resize {name} {len}`",
                    human(info.size),
                    info.size,
                    path.display(),
                    human(len),
                );
            }
            let vol = pool.open_volume(name).context("opening the volume")?;
            // What the volume holds already must read back as zeros where the image is zero.
            let mapped = vol
                .mapped_extents(0, len)
                .context("reading the volume's mappings")?;
            (vol, false, mapped)
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            pool.create_volume(name, len).with_context(|| {
                format!("creating the volume with the image's size ({len} bytes)")
            })?;
            let vol = pool.open_volume(name).context("opening the new volume")?;
            (vol, true, Vec::new())
        }
        Err(e) => {
            return Err(e).context("looking up the volume");
        }
    };
    let bar = progress(len, &format!("importing {name}"));
    let result = copy_in(&src, path, &vol, len, mapped, &bar).and_then(|stats| {
        vol.flush().context("flushing the volume")?;
        Ok(stats)
    });
    bar.finish_and_clear();
    drop(vol);
    match result {
        Ok(stats) => Ok(stats),
        Err(e) => {
            // A volume this command made half full is worse than none.
            if created && let Err(rm) = pool.remove_volume(name) {
                tracing::warn!("could not remove the partly imported volume {name:?}: {rm}");
            }
            Err(e)
        }
    }
}

/// The next range of `file` at or after `pos` that may hold data, as `(start, end)`, or `None`
/// when only holes remain. Filesystems without `SEEK_DATA` report everything as data.
fn next_data(file: &File, pos: u64, len: u64) -> Result<Option<(u64, u64)>> {
    use rustix::fs::{SeekFrom as RSeek, seek};
    let start = match seek(file, RSeek::Data(pos)) {
        Ok(d) if d >= len => return Ok(None),
        Ok(d) => d,
        Err(rustix::io::Errno::NXIO) => return Ok(None),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
            return Ok(Some((pos, len)));
        }
        Err(e) => return Err(std::io::Error::from(e)).context("looking for data (SEEK_DATA)"),
    };
    let end = match seek(file, RSeek::Hole(start)) {
        Ok(h) => h.min(len),
        Err(e) => return Err(std::io::Error::from(e)).context("looking for a hole (SEEK_HOLE)"),
    };
    Ok(Some((start, end.max(start))))
}

/// Zeroes, in a volume that had data before the import, the ranges the image has as zeros.
struct Zeroer {
    /// Mapped byte ranges of the volume before the import, in order.
    mapped: Vec<(u64, u64)>,
    next: usize,
}

impl Zeroer {
    /// `[start, end)` of the image is zeros (ranges come in increasing order).
    fn zero(&mut self, vol: &Volume, start: u64, end: u64) -> Result<()> {
        while let Some(&(off, len)) = self.mapped.get(self.next) {
            if off + len <= start {
                self.next += 1;
                continue;
            }
            if off >= end {
                break;
            }
            let (a, b) = (off.max(start), (off + len).min(end));
            vol.write_zeroes(a, b - a)
                .with_context(|| format!("zeroing bytes {a}..{b}"))?;
            if off + len > end {
                break;
            }
            self.next += 1;
        }
        Ok(())
    }
}

fn copy_in(
    src: &File,
    path: &Path,
    vol: &Volume,
    len: u64,
    mapped: Vec<(u64, u64)>,
    bar: &ProgressBar,
) -> Result<CopyStats> {
    let bs = vol.block_size();
    let chunk = CHUNK.div_ceil(bs) * bs;
    let mut buf = vec![0u8; usize::try_from(chunk).context("block size too large")?];
    let bsz = usize::try_from(bs).context("block size too large")?;
    let mut zeroer = Zeroer { mapped, next: 0 };
    let mut stats = CopyStats::default();
    let mut pos = 0u64;
    let mut last_commit = Instant::now();
    while pos < len {
        let Some((data, data_end)) =
            next_data(src, pos, len).with_context(|| format!("reading {}", path.display()))?
        else {
            break;
        };
        // Whole blocks around the data: a block half data, half hole is read whole.
        let start = pos.max(data / bs * bs);
        // `max(start + 1)`: always move on by at least one block, whatever the filesystem says.
        let end = len.min(data_end.max(start + 1).div_ceil(bs) * bs);
        if start > pos {
            zeroer.zero(vol, pos, start)?;
            stats.skipped += start - pos;
        }
        let mut off = start;
        while off < end {
            let n = (end - off).min(chunk);
            let b = &mut buf[..usize::try_from(n).expect("n <= chunk, which fits in usize")];
            src.read_exact_at(b, off)
                .with_context(|| format!("reading {} at byte {off} ({n} bytes)", path.display()))?;
            let mut done = 0u64;
            for (a, z) in runs(b, bsz) {
                let (a, z) = (a as u64, z as u64);
                if a > done {
                    zeroer.zero(vol, off + done, off + a)?;
                    stats.skipped += a - done;
                }
                vol.write_at(&b[a as usize..z as usize], off + a)
                    .with_context(|| format!("writing bytes {}..{}", off + a, off + z))?;
                stats.written += z - a;
                done = z;
            }
            if n > done {
                zeroer.zero(vol, off + done, off + n)?;
                stats.skipped += n - done;
            }
            off += n;
            bar.set_position(off);
            if last_commit.elapsed() >= COMMIT_EVERY {
                vol.flush().context("flushing the volume")?;
                last_commit = Instant::now();
            }
        }
        pos = end.max(start);
    }
    if pos < len {
        zeroer.zero(vol, pos, len)?;
        stats.skipped += len - pos;
    }
    bar.set_position(len);
    Ok(stats)
}

/// The runs of `buf` made of `unit`-sized pieces (the last one may be shorter) holding at
/// least one non-zero byte, as `(start, end)` byte ranges, merged and in order.
fn runs(buf: &[u8], unit: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, piece) in buf.chunks(unit).enumerate() {
        if is_zero(piece) {
            continue;
        }
        let (a, z) = (i * unit, i * unit + piece.len());
        match out.last_mut() {
            Some(last) if last.1 == a => last.1 = z,
            _ => out.push((a, z)),
        }
    }
    out
}

fn is_zero(buf: &[u8]) -> bool {
    // OR-folding a page at a time vectorises well and still stops early on data.
    buf.chunks(PAGE)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

fn export(pool: &Pool, name: &str, path: &Path) -> Result<CopyStats> {
    let vol = pool.open_volume(name).context("opening the volume")?;
    let size = vol.size();
    refuse_pool_files(pool, path)?;
    let existed = path.symlink_metadata().is_ok();
    // A new file is private to its owner (0600 whatever the umask): it holds a volume's bytes.
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {} for writing", path.display()))?;
    if !existed {
        out.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} private", path.display()))?;
    }
    let meta = out
        .metadata()
        .with_context(|| format!("reading the attributes of {}", path.display()))?;
    let dense = if meta.file_type().is_block_device() {
        let dev_size = source_len(&out, path)?;
        if dev_size < size {
            bail!(
                "{} ({}) is smaller than the volume ({})",
                path.display(),
                human(dev_size),
                human(size)
            );
        }
        true
    } else if meta.file_type().is_file() {
        // Truncate to nothing first so that no old byte survives where the volume has a hole.
        out.set_len(0)
            .and_then(|()| out.set_len(size))
            .with_context(|| format!("sizing {} to {size} bytes", path.display()))?;
        false
    } else {
        bail!("{} is not a regular file or a block device", path.display());
    };
    let bar = progress(size, &format!("exporting {name}"));
    let result = copy_out(&vol, &out, path, size, dense, &bar).and_then(|stats| {
        out.sync_all()
            .with_context(|| format!("syncing {}", path.display()))?;
        Ok(stats)
    });
    bar.finish_and_clear();
    if result.is_err()
        && !existed
        && let Err(rm) = std::fs::remove_file(path)
    {
        tracing::warn!(
            "could not remove the partial export {}: {rm}",
            path.display()
        );
    }
    result
}

/// Refuse to export onto the pool's own data or metadata device.
fn refuse_pool_files(pool: &Pool, path: &Path) -> Result<()> {
    let Ok(target) = std::fs::metadata(path) else {
        return Ok(());
    };
    let status = pool.status().context("reading the pool's status")?;
    for p in [&status.data_path, &status.metadata_path] {
        if let Ok(m) = std::fs::metadata(p)
            && m.dev() == target.dev()
            && m.ino() == target.ino()
        {
            bail!(
                "{} is the pool's own {} device: refusing to overwrite it",
                path.display(),
                if p == &status.data_path {
                    "data"
                } else {
                    "metadata"
                }
            );
        }
    }
    Ok(())
}

fn copy_out(
    vol: &Volume,
    out: &File,
    path: &Path,
    size: u64,
    dense: bool,
    bar: &ProgressBar,
) -> Result<CopyStats> {
    let extents = vol
        .mapped_extents(0, size)
        .context("reading the volume's mappings")?;
    let mut buf = vec![0u8; usize::try_from(CHUNK).expect("CHUNK fits in usize")];
    let mut stats = CopyStats::default();
    let mut pos = 0u64;
    let write = |data: &[u8], off: u64| {
        out.write_all_at(data, off).with_context(|| {
            format!(
                "writing {} at byte {off} ({} bytes)",
                path.display(),
                data.len()
            )
        })
    };
    let fill_zeros = |from: u64, to: u64, buf: &mut [u8]| -> Result<()> {
        buf.fill(0);
        let mut o = from;
        while o < to {
            let n = (to - o).min(buf.len() as u64);
            write(&buf[..n as usize], o)?;
            o += n;
        }
        Ok(())
    };
    for (off, len) in extents {
        let end = (off + len).min(size);
        if off > pos {
            if dense {
                fill_zeros(pos, off, &mut buf)?;
            }
            stats.skipped += off - pos;
        }
        let mut o = off.max(pos);
        while o < end {
            let n = (end - o).min(CHUNK);
            let b = &mut buf[..usize::try_from(n).expect("n <= CHUNK")];
            vol.read_at(b, o)
                .with_context(|| format!("reading the volume at byte {o}"))?;
            if dense {
                write(b, o)?;
                stats.written += n;
            } else {
                let mut done = 0;
                for (a, z) in runs(b, PAGE) {
                    write(&b[a..z], o + a as u64)?;
                    stats.written += (z - a) as u64;
                    stats.skipped += (a - done) as u64;
                    done = z;
                }
                stats.skipped += (b.len() - done) as u64;
            }
            o += n;
            bar.set_position(o);
        }
        pos = pos.max(end);
    }
    if size > pos {
        if dense {
            fill_zeros(pos, size, &mut buf)?;
        }
        stats.skipped += size - pos;
    }
    bar.set_position(size);
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_non_zero_pieces() {
        let mut b = vec![0u8; 10 * 4];
        assert!(runs(&b, 4).is_empty());
        b[0] = 1;
        b[5] = 1;
        b[15] = 1;
        b[39] = 1;
        assert_eq!(runs(&b, 4), vec![(0, 8), (12, 16), (36, 40)]);
        // A short last piece.
        let mut c = vec![0u8; 10];
        c[9] = 7;
        assert_eq!(runs(&c, 4), vec![(8, 10)]);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0u8; 3 * PAGE + 5]));
        let mut b = vec![0u8; 3 * PAGE + 5];
        b[3 * PAGE + 4] = 1;
        assert!(!is_zero(&b));
    }

    #[test]
    fn rfc3339_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_709_211_909), "2024-02-29T13:05:09Z");
        assert_eq!(rfc3339(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(rfc3339(4_102_444_800), "2100-01-01T00:00:00Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn info_is_aligned_and_complete() {
        let v = VolumeInfo {
            name: "snap".into(),
            thin_id: 3,
            size: 1 << 20,
            kind: VolumeKind::Snapshot,
            parent: Some("base".into()),
            created: 1_709_211_909,
            mapped_blocks: 2,
            highest_mapped_block: Some(9),
            labels: Default::default(),
            loop_device: None,
            mount_point: None,
        };
        let t = render_info(&VolumeDetail::new(v, 64 << 10));
        for want in [
            "Name:                 snap\n",
            "Kind:                 snapshot\n",
            "Parent:               base\n",
            "Thin id:              3\n",
            "Size:                 1.0 MiB (1048576 bytes)\n",
            "Created:              2024-02-29T13:05:09Z\n",
            "Mapped:               2 blocks of 64.0 KiB, 128.0 KiB (131072 bytes, 12.5% of the size)\n",
            "Highest mapped block: 9\n",
        ] {
            assert!(t.contains(want), "{want:?} in\n{t}");
        }
    }

    #[test]
    fn table_is_aligned() {
        let v = VolumeInfo {
            name: "base".into(),
            thin_id: 1,
            size: 10 << 30,
            kind: VolumeKind::Thin,
            parent: None,
            created: 0,
            mapped_blocks: 16,
            highest_mapped_block: Some(15),
            labels: Default::default(),
            loop_device: None,
            mount_point: None,
        };
        let s = VolumeInfo {
            name: "snap-of-base".into(),
            thin_id: 12,
            kind: VolumeKind::Snapshot,
            parent: Some("base".into()),
            ..v.clone()
        };
        let t = render_list(&[v, s], 64 << 10);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("NAME "), "{t}");
        assert!(
            lines[1].contains("10.0 GiB") && lines[1].contains("1.0 MiB"),
            "{t}"
        );
        assert!(lines[2].ends_with("base"), "{t}");
        let col = |l: &str| l.find("GiB").expect("a size column");
        assert_eq!(col(lines[1]), col(lines[2]), "{t}");
    }
}
