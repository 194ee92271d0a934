//! The engine's answers as the control protocol carries them.
//!
//! These mirror `thinpool-engine`'s `PoolStatus`, `PoolMode`, `VolumeInfo` and `VolumeKind`
//! field for field, in the same order and with the same serde names, so that serializing one
//! of these gives exactly the JSON the engine's type gives (the CLI's `--json` output is the
//! same with and without a daemon). The daemon's tests hold the two in step.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The pool's mode (format spec section 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolMode {
    /// Normal.
    #[serde(rename = "rw")]
    Write,
    /// No free data block: writes that need one wait or fail.
    #[serde(rename = "out_of_data_space")]
    OutOfDataSpace,
    /// Metadata failed or ran out: no metadata changes until repaired or grown.
    #[serde(rename = "ro")]
    ReadOnly,
    /// Every I/O fails.
    #[serde(rename = "fail")]
    Fail,
}

/// The pool's status: the kernel's pool status fields plus ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Metadata transaction id.
    pub transaction_id: u64,
    /// Used metadata blocks (4 KiB), counting the kernel's reserve as used.
    pub used_metadata_blocks: u64,
    /// Metadata blocks.
    pub total_metadata_blocks: u64,
    /// Used data blocks.
    pub used_data_blocks: u64,
    /// Data blocks.
    pub total_data_blocks: u64,
    /// Data block size in bytes.
    pub block_size: u64,
    /// Held metadata snapshot root.
    pub held_root: Option<u64>,
    /// Mode.
    pub mode: PoolMode,
    /// NEEDS_CHECK flag.
    pub needs_check: bool,
    /// Writes fail at once when full (else they queue).
    pub error_if_no_space: bool,
    /// Freed blocks are punched out of the data device.
    pub discard_passdown: bool,
    /// Metadata low watermark (blocks).
    pub metadata_low_watermark: u64,
    /// Data device path.
    pub data_path: PathBuf,
    /// Metadata device path.
    pub metadata_path: PathBuf,
    /// Thin volumes (not snapshots).
    pub volumes: usize,
    /// Snapshots.
    pub snapshots: usize,
    /// What went wrong while it matters (a metadata failure, the host file system full).
    #[serde(default)]
    pub failure: Option<String>,
}

impl PoolStatus {
    /// The kernel's status line (format spec section 14.1, without dmsetup's prefix), as the
    /// engine's `PoolStatus::kernel_line` gives it.
    pub fn kernel_line(&self) -> String {
        if self.mode == PoolMode::Fail {
            return "Fail".into();
        }
        format!(
            "{} {}/{} {}/{} {} {} {} {} {} {}",
            self.transaction_id,
            self.used_metadata_blocks,
            self.total_metadata_blocks,
            self.used_data_blocks,
            self.total_data_blocks,
            self.held_root.map_or("-".to_string(), |h| h.to_string()),
            match self.mode {
                PoolMode::Write => "rw",
                PoolMode::OutOfDataSpace => "out_of_data_space",
                PoolMode::ReadOnly | PoolMode::Fail => "ro",
            },
            if self.discard_passdown {
                "discard_passdown"
            } else {
                "no_discard_passdown"
            },
            if self.error_if_no_space {
                "error_if_no_space"
            } else {
                "queue_if_no_space"
            },
            if self.needs_check { "needs_check" } else { "-" },
            self.metadata_low_watermark
        )
    }
}

/// Whether a volume was created empty or as a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    /// An empty thin volume.
    Thin,
    /// A snapshot of another volume.
    Snapshot,
}

/// A volume as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Name.
    pub name: String,
    /// Thin device id in the metadata.
    pub thin_id: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Thin or snapshot.
    pub kind: VolumeKind,
    /// Origin of a snapshot.
    pub parent: Option<String>,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Mapped blocks.
    pub mapped_blocks: u64,
    /// Highest mapped virtual block.
    pub highest_mapped_block: Option<u64>,
    /// The owner's labels (the layer store's records); absent from the JSON when empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The loop device the daemon attached to the volume's file, if any (not an engine
    /// field: absent from the JSON when `None`, so the engine's JSON and this one agree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loop_device: Option<PathBuf>,
    /// Where the daemon mounted the volume's filesystem, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<PathBuf>,
}

/// The answer to [`Request::PoolCheck`](crate::Request::PoolCheck): the committed metadata a
/// client may now read to check it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedMetadata {
    /// The metadata device (`<root>/pool/metadata`, maybe a symlink), to open read-only.
    pub metadata_path: PathBuf,
    /// The transaction id of the commit just made.
    pub transaction_id: u64,
    /// The block of the metadata snapshot reserved for the check (the superblock's
    /// `held_root`), after [`MetadataSnapStep::Reserve`](crate::MetadataSnapStep::Reserve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_root: Option<u64>,
}

/// The answer to [`Request::PoolMoveData`](crate::Request::PoolMoveData): the engine's
/// `MoveReport`, field for field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataMoved {
    /// The device the data is on now (canonical path).
    pub data_path: PathBuf,
    /// Data blocks copied.
    pub copied_blocks: u64,
    /// Data blocks compared after the copy.
    pub verified_blocks: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// The old data file, kept under this name (the default data file inside `pool/`).
    pub old_data_kept: Option<PathBuf>,
}

/// A volume the daemon attached to a loop device, and mounted if asked: the answer to
/// [`Request::VolumeAttach`](crate::Request::VolumeAttach),
/// [`Request::Mount`](crate::Request::Mount) and [`Request::Umount`](crate::Request::Umount)
/// (what was undone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The volume.
    pub volume: String,
    /// Its loop device (`/dev/loopN`).
    pub loop_device: PathBuf,
    /// Attached (and mounted) read-only.
    pub read_only: bool,
    /// Where its filesystem is mounted, if it is.
    pub mount_point: Option<PathBuf>,
    /// The filesystem's type (`ext4`, `xfs`), when mounted.
    pub fstype: Option<String>,
    /// Mount options given (`-o`), when mounted.
    pub options: Option<String>,
}

/// The answer to [`Request::VolumeResize`](crate::Request::VolumeResize).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resized {
    /// Virtual size before, in bytes.
    pub old_size: u64,
    /// Virtual size now, in bytes.
    pub new_size: u64,
    /// The filesystem resized with the volume, if one was.
    pub filesystem: Option<FsResized>,
}

/// A filesystem resized with its volume: sizes as `df` shows them (mounted) or as
/// `resize2fs` was asked (shrunk offline).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsResized {
    /// `ext4`, `xfs`, …
    pub fstype: String,
    /// Where it is mounted (`None`: shrunk while unmounted).
    pub mount_point: Option<PathBuf>,
    /// Size before, in bytes.
    pub old_size: u64,
    /// Size after, in bytes.
    pub new_size: u64,
}

/// A snapshot of the layer store (`thinpool snapshot ls`), as containerd sees it plus the
/// volume that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSnapshot {
    /// containerd's key (active, view) or name (committed).
    pub key: String,
    /// The committed snapshot it was made from; `None`: from the base device.
    pub parent: Option<String>,
    /// `committed`, `active` or `view`.
    pub kind: String,
    /// containerd's labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Last change, seconds since the epoch.
    pub updated: u64,
    /// The pool volume holding it (`layer-N`).
    pub volume: String,
    /// Virtual size in bytes.
    pub size: u64,
}

/// How to mount a layer-store snapshot: `mount -t FSTYPE -o OPTIONS SOURCE DIR`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMount {
    /// Filesystem type (`ext4`).
    #[serde(rename = "type")]
    pub fstype: String,
    /// The loop device.
    pub source: PathBuf,
    /// Mount options (`ro` for a view).
    pub options: Vec<String>,
}

/// The space a layer-store snapshot uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerUsage {
    /// Bytes of the data blocks only it maps: what removing it frees (`thin_ls` EXCLUSIVE).
    pub exclusive_bytes: u64,
    /// Bytes of all the data blocks it maps.
    pub mapped_bytes: u64,
}

/// Which of the pool's spaces an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Space {
    /// The data device.
    Data,
    /// The metadata device.
    Metadata,
}

/// What happened to a space (see [`PoolEvent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Usage reached the low-water threshold (once per crossing).
    LowWater,
    /// Autogrow grew the device by its step.
    Grown,
    /// Autogrow grew the device by less than its step, or not at all: the maximum size or the
    /// host file system's free space was reached (the message says which).
    Limited,
    /// The device is a block device: the daemon does not grow it (the message says what to
    /// do).
    CannotGrow,
    /// A grow failed (the message names the error); the pool keeps its last commit.
    GrowFailed,
}

/// One event of the daemon's space policy, as [`Request::PoolEvents`](crate::Request) answers
/// it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolEvent {
    /// Its number: 1 for the daemon's first event, then one more for each.
    pub seq: u64,
    /// When, in seconds since the epoch.
    pub time: u64,
    /// What happened.
    pub kind: EventKind,
    /// To which space.
    pub space: Space,
    /// Blocks in use then (data blocks, or 4 KiB metadata blocks).
    pub used: u64,
    /// Blocks in the space then (before a grow).
    pub total: u64,
    /// The device's size in bytes before a grow (grown, limited, grow_failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_size: Option<u64>,
    /// The device's size in bytes after a grow, or the size a failed one asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_size: Option<u64>,
    /// How long the grow took (the metadata lock is held for part of it), milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub took_ms: Option<u64>,
    /// What happened and, where there is something to do, what.
    pub message: String,
}
