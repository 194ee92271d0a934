//! `thinpool info`: the pool as `docker info` shows a devicemapper pool — Docker's field names
//! and order (so scripts and people used to the old driver find their way), then ours.
//!
//! Everything comes from the pool's status (through the daemon or on the pool opened for the
//! command) plus what the file system says about the pool's files: the root's device and inode
//! (Docker's pool name), the backing file system's type and free space (a sparse data file can
//! only grow into the space its file system has left, which is what Docker's "Data Space
//! Available" reports too).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use thinpool_control::{PoolMode, PoolStatus};
use thinpool_engine::PoolOptions;

use crate::client::Target;
use crate::size::human;
use crate::vol::BASE_DEVICE_SIZE;

/// Metadata blocks are always 4 KiB (dm-thin format).
const METADATA_BLOCK_SIZE: u64 = 4096;

/// The pool as `thinpool info` shows it; `--json` prints this object (sizes in bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Info {
    /// Docker's name for a pool: `thinpool-<major>:<minor>-<inode>-pool` of the root folder.
    pub pool_name: String,
    /// The pool's block size (unit of provisioning and copy-on-write).
    pub pool_blocksize: u64,
    /// Size of a volume created without `--size` (Docker's `dm.basesize`).
    pub base_device_size: u64,
    /// File system holding the data file ("xfs", "extfs", ...), or "block device".
    pub backing_filesystem: String,
    /// The data device's path in the root.
    pub data_file: PathBuf,
    /// Where `data_file` leads, when it is a symlink.
    pub data_file_target: Option<PathBuf>,
    /// The metadata device's path in the root.
    pub metadata_file: PathBuf,
    /// Where `metadata_file` leads, when it is a symlink.
    pub metadata_file_target: Option<PathBuf>,
    /// Bytes of data blocks in use.
    pub data_space_used: u64,
    /// Bytes of data blocks in the pool.
    pub data_space_total: u64,
    /// Bytes still usable: free blocks, capped by the free space of the file system holding a
    /// (sparse) data file.
    pub data_space_available: u64,
    /// Bytes of metadata blocks in use (the kernel's reserve counts as used).
    pub metadata_space_used: u64,
    /// Bytes of metadata blocks.
    pub metadata_space_total: u64,
    /// Free metadata bytes, capped like `data_space_available`.
    pub metadata_space_available: u64,
    /// Free data space below which new volumes and snapshots are refused.
    pub thin_pool_minimum_free_space: u64,
    /// `thin_pool_minimum_free_space` as a percentage of the data blocks.
    pub min_free_percent: u8,
    /// Always false: volumes are removed at once, never deferred.
    pub deferred_removal_enabled: bool,
    /// Always false: thin devices are deleted at once, never deferred.
    pub deferred_deletion_enabled: bool,
    /// Always 0 (nothing is ever deferred).
    pub deferred_deleted_device_count: u64,
    /// Thin volumes (not snapshots).
    pub volumes: usize,
    /// Snapshots.
    pub snapshots: usize,
    /// Metadata transaction id.
    pub transaction_id: u64,
    /// The pool's mode: rw, out_of_data_space, ro or fail.
    pub mode: PoolMode,
    /// Whether a daemon serves the pool (this command went through it).
    pub daemon: DaemonState,
}

/// Whether a daemon serves the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DaemonState {
    /// A daemon answered on the control socket.
    pub running: bool,
    /// Its process id.
    pub pid: Option<u32>,
}

/// `thinpool info [--json]` on `target`; returns what to print.
pub fn run(target: &mut Target<'_>, root: &Path, json: bool) -> Result<String> {
    let status = target
        .status()
        .with_context(|| format!("reading the status of the pool at {}", root.display()))?;
    let mut info = gather(root, &status, target.daemon_pid())?;
    // The layer store's base device, once made, has the size that counts.
    if let Ok(base) = target.volume_info(thinpool_layers::BASE_VOLUME) {
        info.base_device_size = base.size;
    }
    Ok(if json {
        serde_json::to_string_pretty(&info)? + "\n"
    } else {
        render(&info)
    })
}

/// Build an [`Info`] from the pool's status and what the file system says about its files.
fn gather(root: &Path, s: &PoolStatus, daemon_pid: Option<u32>) -> Result<Info> {
    // A daemon's engine options cannot be asked for (neither the engine nor the control API
    // exposes them); `thinpool up` runs with the engine's defaults, as one-shot commands do.
    let min_free_percent = PoolOptions::default().min_free_percent;
    let data_total = s.total_data_blocks * s.block_size;
    let data_used = s.used_data_blocks * s.block_size;
    let meta_total = s.total_metadata_blocks * METADATA_BLOCK_SIZE;
    let meta_used = s.used_metadata_blocks * METADATA_BLOCK_SIZE;
    // Docker's rule, in whole blocks: the engine refuses new volumes below this many free.
    let min_free_blocks = s.total_data_blocks * u64::from(min_free_percent) / 100;
    Ok(Info {
        pool_name: pool_name(root)?,
        pool_blocksize: s.block_size,
        base_device_size: BASE_DEVICE_SIZE,
        backing_filesystem: backing_filesystem(&s.data_path),
        data_file: s.data_path.clone(),
        data_file_target: symlink_target(&s.data_path),
        metadata_file: s.metadata_path.clone(),
        metadata_file_target: symlink_target(&s.metadata_path),
        data_space_used: data_used,
        data_space_total: data_total,
        data_space_available: capped_by_filesystem(
            &s.data_path,
            data_total.saturating_sub(data_used),
        ),
        metadata_space_used: meta_used,
        metadata_space_total: meta_total,
        metadata_space_available: capped_by_filesystem(
            &s.metadata_path,
            meta_total.saturating_sub(meta_used),
        ),
        thin_pool_minimum_free_space: min_free_blocks * s.block_size,
        min_free_percent,
        deferred_removal_enabled: false,
        deferred_deletion_enabled: false,
        deferred_deleted_device_count: 0,
        volumes: s.volumes,
        snapshots: s.snapshots,
        transaction_id: s.transaction_id,
        mode: s.mode,
        daemon: DaemonState {
            running: daemon_pid.is_some(),
            pid: daemon_pid,
        },
    })
}

/// Docker's pool name, `<prefix>-<major>:<minor>-<inode>-pool` of the pool's folder, with our
/// prefix: unique per folder on a machine, and stable across renames of the folder.
fn pool_name(root: &Path) -> Result<String> {
    let m = std::fs::metadata(root).with_context(|| {
        format!(
            "reading the attributes of the pool folder {}",
            root.display()
        )
    })?;
    let dev = m.dev();
    Ok(format!(
        "thinpool-{}:{}-{}-pool",
        rustix::fs::major(dev),
        rustix::fs::minor(dev),
        m.ino()
    ))
}

/// Where `path` leads when it is a symlink (all links resolved); `None` otherwise.
fn symlink_target(path: &Path) -> Option<PathBuf> {
    let is_link = std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false);
    if !is_link {
        return None;
    }
    // A dangling link still says where it points.
    Some(
        std::fs::canonicalize(path)
            .unwrap_or_else(|_| std::fs::read_link(path).unwrap_or_else(|_| PathBuf::from("?"))),
    )
}

/// True when `path` (links followed) is a block device.
fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// The type of the file system holding `path` (links followed), by its `statfs` magic number;
/// "block device" when `path` is one.
fn backing_filesystem(path: &Path) -> String {
    if is_block_device(path) {
        return "block device".to_string();
    }
    match rustix::fs::statfs(path) {
        // Magic numbers are 32-bit; `f_type`'s width and sign differ between architectures.
        #[allow(clippy::cast_sign_loss, clippy::unnecessary_cast)]
        Ok(st) => fs_name((st.f_type as u64) & 0xffff_ffff),
        Err(e) => {
            tracing::warn!("statfs {}: {e}", path.display());
            format!("unknown (statfs of {} failed: {e})", path.display())
        }
    }
}

/// A file system's name from its magic number (`linux/magic.h`), as Docker names them: ext2,
/// ext3 and ext4 share one magic number, hence "extfs".
fn fs_name(magic: u64) -> String {
    let name = match magic {
        0xEF53 => "extfs",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x0102_1994 => "tmpfs",
        0x8584_58F6 => "ramfs",
        0x794C_7630 => "overlayfs",
        0x2FC1_2FC1 => "zfs",
        0xCA45_1A4E => "bcachefs",
        0xF2F5_2010 => "f2fs",
        0x5265_4973 => "reiserfs",
        0x7371_7368 => "squashfs",
        0x6969 => "nfs",
        0xFF53_4D42 => "cifs",
        0xFE53_4D42 => "smb2",
        0x00C3_6400 => "ceph",
        0x0102_1997 => "9p",
        0x6573_5546 => "fuse",
        0x4D44 => "vfat",
        0x2011_BAB0 => "exfat",
        0x5346_544E => "ntfs",
        _ => return format!("unknown (magic 0x{magic:x})"),
    };
    name.to_string()
}

/// `free` bytes of a pool device, capped by the space left on the file system holding it when
/// it is a (sparse) regular file: its holes can only be filled with what the file system has.
fn capped_by_filesystem(path: &Path, free: u64) -> u64 {
    let regular = std::fs::metadata(path)
        .map(|m| m.file_type().is_file())
        .unwrap_or(false);
    if !regular {
        return free;
    }
    match rustix::fs::statvfs(path) {
        Ok(st) => free.min(st.f_bavail.saturating_mul(st.f_frsize)),
        Err(e) => {
            tracing::warn!("statvfs {}: {e}", path.display());
            free
        }
    }
}

/// The mode, with what to do when it is not `rw`.
fn mode_text(mode: PoolMode) -> &'static str {
    match mode {
        PoolMode::Write => "rw",
        PoolMode::OutOfDataSpace => {
            "out_of_data_space (writes needing a new block wait, then fail: grow the pool with \
             `thinpool pool grow --data-size SIZE` or remove volumes)"
        }
        PoolMode::ReadOnly => {
            "ro (metadata changes are refused: if the metadata is full, grow it with `thinpool \
             pool grow --metadata-size SIZE`; else run `thinpool pool check`)"
        }
        PoolMode::Fail => {
            "fail (a device failed and every I/O is refused: stop the daemon, fix the device, \
             then run `thinpool pool check`)"
        }
    }
}

/// `path`, and where it leads when it is a symlink.
fn path_text(path: &Path, target: Option<&PathBuf>) -> String {
    match target {
        Some(t) => format!("{} (-> {})", path.display(), t.display()),
        None => path.display().to_string(),
    }
}

/// `thinpool info` for people: one aligned `Field: value` line per field, Docker's first.
pub fn render(i: &Info) -> String {
    let rows: Vec<(&str, String)> = vec![
        ("Pool Name", i.pool_name.clone()),
        ("Pool Blocksize", human(i.pool_blocksize)),
        ("Base Device Size", human(i.base_device_size)),
        ("Backing Filesystem", i.backing_filesystem.clone()),
        (
            "Data file",
            path_text(&i.data_file, i.data_file_target.as_ref()),
        ),
        (
            "Metadata file",
            path_text(&i.metadata_file, i.metadata_file_target.as_ref()),
        ),
        ("Data Space Used", human(i.data_space_used)),
        ("Data Space Total", human(i.data_space_total)),
        ("Data Space Available", human(i.data_space_available)),
        ("Metadata Space Used", human(i.metadata_space_used)),
        ("Metadata Space Total", human(i.metadata_space_total)),
        (
            "Metadata Space Available",
            human(i.metadata_space_available),
        ),
        (
            "Thin Pool Minimum Free Space",
            format!(
                "{} ({}%)",
                human(i.thin_pool_minimum_free_space),
                i.min_free_percent
            ),
        ),
        (
            "Deferred Removal Enabled",
            i.deferred_removal_enabled.to_string(),
        ),
        (
            "Deferred Deletion Enabled",
            i.deferred_deletion_enabled.to_string(),
        ),
        (
            "Deferred Deleted Device Count",
            i.deferred_deleted_device_count.to_string(),
        ),
        ("Volumes", i.volumes.to_string()),
        ("Snapshots", i.snapshots.to_string()),
        ("Transaction Id", i.transaction_id.to_string()),
        ("Mode", mode_text(i.mode).to_string()),
        (
            "Daemon",
            match i.daemon.pid {
                Some(pid) => format!("running, pid {pid}"),
                None => "not running".to_string(),
            },
        ),
    ];
    aligned(&rows)
}

/// `Field: value` lines with the values in one column.
pub fn aligned(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{:<width$} {v}\n", format!("{k}:")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> PoolStatus {
        PoolStatus {
            transaction_id: 7,
            used_metadata_blocks: 100,
            total_metadata_blocks: 16384,
            used_data_blocks: 3,
            total_data_blocks: 1_638_400,
            block_size: 64 << 10,
            held_root: None,
            mode: PoolMode::Write,
            needs_check: false,
            error_if_no_space: false,
            discard_passdown: true,
            metadata_low_watermark: 1024,
            data_path: "/nonexistent/pool/data".into(),
            metadata_path: "/nonexistent/pool/metadata".into(),
            volumes: 2,
            snapshots: 1,
            failure: None,
        }
    }

    #[test]
    fn numbers_follow_docker() {
        let dir = tempfile::tempdir().unwrap();
        let i = gather(dir.path(), &status(), Some(42)).unwrap();
        assert_eq!(i.data_space_total, 100 << 30);
        assert_eq!(i.data_space_used, 3 << 16);
        assert_eq!(i.data_space_available, (100 << 30) - (3 << 16));
        assert_eq!(i.metadata_space_total, 64 << 20);
        assert_eq!(i.thin_pool_minimum_free_space, 10 << 30);
        assert_eq!(i.base_device_size, 10 << 30);
        let ino = std::fs::metadata(dir.path()).unwrap().ino();
        assert!(i.pool_name.starts_with("thinpool-"), "{}", i.pool_name);
        assert!(
            i.pool_name.ends_with(&format!("-{ino}-pool")),
            "{}",
            i.pool_name
        );
        let t = render(&i);
        let value = |key: &str| {
            t.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}:")))
                .map(str::trim_start)
                .unwrap_or_else(|| panic!("no {key} in\n{t}"))
        };
        assert_eq!(value("Thin Pool Minimum Free Space"), "10.0 GiB (10%)");
        assert_eq!(value("Daemon"), "running, pid 42");
        assert_eq!(value("Data Space Used"), "192.0 KiB");
        assert_eq!(value("Deferred Deleted Device Count"), "0");
        // Every value starts in the same column.
        let starts: Vec<usize> = t
            .lines()
            .map(|l| {
                let c = l.find(':').unwrap() + 1;
                c + l[c..].find(|ch| ch != ' ').unwrap()
            })
            .collect();
        assert!(starts.windows(2).all(|w| w[0] == w[1]), "{t}");
    }

    #[test]
    fn filesystem_names() {
        assert_eq!(fs_name(0xEF53), "extfs");
        assert_eq!(fs_name(0x5846_5342), "xfs");
        assert_eq!(fs_name(0x1234), "unknown (magic 0x1234)");
        let dir = tempfile::tempdir().unwrap();
        assert!(!backing_filesystem(dir.path()).starts_with("unknown (statfs"));
    }

    #[test]
    fn modes_say_what_to_do() {
        assert_eq!(mode_text(PoolMode::Write), "rw");
        for m in [PoolMode::OutOfDataSpace, PoolMode::ReadOnly, PoolMode::Fail] {
            assert!(mode_text(m).contains("thinpool pool"), "{m:?}");
        }
    }
}
