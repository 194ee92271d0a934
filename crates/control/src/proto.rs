//! The messages of the control protocol and their framing: one JSON object per line
//! (newline-delimited JSON), a request answered by exactly one response, in order.

use std::collections::BTreeMap;
use std::io::{BufRead, Read as _, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks (sent in [`Request::Hello`], answered in [`Hello`]).
pub const PROTOCOL_VERSION: u32 = 1;

/// The control socket's file name inside a pool root.
pub const SOCKET_NAME: &str = "control.sock";

/// Longest request line a daemon reads (1 MiB); longer ones are refused and the connection
/// closed.
pub const MAX_REQUEST_LEN: usize = 1 << 20;

/// Longest response line a client reads (1 GiB: a list of millions of volumes still fits).
pub const MAX_RESPONSE_LEN: usize = 1 << 30;

/// The control socket of the pool in `root`: `<root>/control.sock`.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join(SOCKET_NAME)
}

/// A request from a client. On the wire: `{"op":"<snake_case name>", …fields}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Say which protocol the client speaks; answered with a [`Hello`].
    Hello {
        /// The client's [`PROTOCOL_VERSION`].
        protocol: u32,
    },
    /// The pool's status (after a commit); answered with a [`PoolStatus`](crate::PoolStatus).
    PoolStatus,
    /// Every volume, sorted by name; answered with a list of [`VolumeInfo`](crate::VolumeInfo).
    VolumeList,
    /// One volume; answered with a [`VolumeInfo`](crate::VolumeInfo).
    VolumeInfo {
        /// Volume name.
        name: String,
    },
    /// Create an empty thin volume; answered with its [`VolumeInfo`](crate::VolumeInfo).
    VolumeCreate {
        /// Volume name.
        name: String,
        /// Virtual size in bytes.
        size: u64,
    },
    /// Snapshot a volume; answered with the snapshot's [`VolumeInfo`](crate::VolumeInfo).
    VolumeSnapshot {
        /// The volume to snapshot.
        origin: String,
        /// Name of the snapshot.
        name: String,
    },
    /// Remove a volume; answered with `null`.
    VolumeRemove {
        /// Volume name.
        name: String,
    },
    /// Change a volume's virtual size; answered with a [`Resized`](crate::Resized). A mounted
    /// volume's filesystem grows with it, online; it is never shrunk while mounted.
    VolumeResize {
        /// Volume name.
        name: String,
        /// New size in bytes.
        size: u64,
        /// An unmounted volume holding an ext2/3/4 filesystem: resize the filesystem with it,
        /// offline (`e2fsck -f`, then `resize2fs`: before a shrink, after a grow; at the same
        /// size, grow the filesystem to fill the volume). Without it, a shrink that would cut
        /// a filesystem is refused.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resize_fs: bool,
    },
    /// Attach a loop device (direct I/O) to the volume's file in the FUSE export; answered
    /// with an [`Attachment`](crate::Attachment).
    VolumeAttach {
        /// Volume name.
        name: String,
        /// Attach read-only.
        read_only: bool,
    },
    /// Detach the volume's loop device; answered with the [`Attachment`](crate::Attachment)
    /// undone. Refused while it is mounted.
    VolumeDetach {
        /// Volume name.
        name: String,
    },
    /// Attach the volume and mount its filesystem on `dir` (made first with `mkfs` when
    /// asked); answered with an [`Attachment`](crate::Attachment).
    Mount {
        /// Volume name.
        name: String,
        /// The mount point, an existing empty folder (absolute).
        dir: PathBuf,
        /// Make this filesystem first (`ext4`, `xfs`).
        mkfs: Option<String>,
        /// Make it even over a volume that holds data.
        #[serde(default)]
        force: bool,
        /// Mount options, as `mount -o` takes them.
        options: Option<String>,
        /// Attach and mount read-only.
        #[serde(default)]
        read_only: bool,
    },
    /// Every snapshot of the layer store, by key; answered with a list of
    /// [`LayerSnapshot`](crate::LayerSnapshot).
    SnapshotList,
    /// The space every layer-store snapshot uses (one walk of the pool); answered with a map
    /// key → [`LayerUsage`](crate::LayerUsage).
    SnapshotUsage,
    /// Remove a layer-store snapshot (refused while it has children or is mounted);
    /// answered with `null`.
    SnapshotRemove {
        /// containerd's key or name.
        key: String,
    },
    /// A new layer-store snapshot of the committed `parent` (`""`: of the base device),
    /// writable or a read-only view, its loop device attached; answered with its
    /// [`LayerMount`](crate::LayerMount)s. A `containerd.io/snapshot/thinpool.size` label makes
    /// it that big (its filesystem grown with it).
    SnapshotPrepare {
        /// The new snapshot's key.
        key: String,
        /// The committed parent, or `""`.
        #[serde(default)]
        parent: String,
        /// Its labels.
        #[serde(default)]
        labels: BTreeMap<String, String>,
        /// A read-only view instead of a writable snapshot.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        view: bool,
    },
    /// The mounts of an active snapshot or view (its loop device attached if it is not);
    /// answered with [`LayerMount`](crate::LayerMount)s.
    SnapshotMounts {
        /// Its key.
        key: String,
    },
    /// Commit the active snapshot `key` as `name` (refused while mounted); answered with
    /// `null`.
    SnapshotCommit {
        /// The committed snapshot's name.
        name: String,
        /// The active snapshot.
        key: String,
        /// The committed snapshot's labels.
        #[serde(default)]
        labels: BTreeMap<String, String>,
    },
    /// Grow an active snapshot or view and its ext4 (online where mounted); answered with
    /// its [`LayerSnapshot`](crate::LayerSnapshot).
    SnapshotResize {
        /// Its key.
        key: String,
        /// New size in bytes.
        size: u64,
    },
    /// Unmount a volume (named, or by its mount point, absolute) and detach its loop device;
    /// answered with the [`Attachment`](crate::Attachment) undone.
    Umount {
        /// A volume name or a mount point.
        target: String,
    },
    /// Grow the data and/or metadata device (`None`: take the device's current size);
    /// answered with `null`.
    PoolGrow {
        /// New data device size in bytes.
        data_size: Option<u64>,
        /// New metadata device size in bytes.
        metadata_size: Option<u64>,
    },
    /// Make everything written so far durable; answered with `null`.
    Commit,
    /// Commit, then say where the committed metadata is so that the client can check it
    /// read-only; answered with a [`CommittedMetadata`](crate::CommittedMetadata).
    ///
    /// The daemon links no metadata code (it sees only the engine's API), so the check itself
    /// runs in the client (`thinpool pool check`). With `metadata_snap` absent (protocol 1
    /// clients) the client checks the committed state while writes go on. With
    /// [`MetadataSnapStep::Reserve`] the daemon also reserves a metadata snapshot (dm-thin's
    /// `reserve_metadata_snap`: a frozen copy of the trees, named by the superblock's
    /// `held_root`), which the client checks while writes go on, then gives back with
    /// [`MetadataSnapStep::Release`].
    PoolCheck {
        /// What to do with the held metadata snapshot.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metadata_snap: Option<MetadataSnapStep>,
    },
    /// Move the pool's data onto another file or block device, online (`<root>/pool/data`
    /// becomes a symlink to it); answered, when done, with a [`DataMoved`](crate::DataMoved).
    /// Blocks for as long as the copy takes.
    PoolMoveData {
        /// The destination, as the daemon sees it (absolute, or relative to its directory).
        path: PathBuf,
    },
    /// The space policy's events numbered above `since` (0: all the daemon still keeps, the
    /// last 1024), oldest first; answered with a list of [`PoolEvent`](crate::PoolEvent).
    PoolEvents {
        /// The last event number the client has seen.
        #[serde(default)]
        since: u64,
    },
}

impl Request {
    /// The request's wire name (`volume_create`), for logs and messages.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::PoolStatus => "pool_status",
            Request::VolumeList => "volume_list",
            Request::VolumeInfo { .. } => "volume_info",
            Request::VolumeCreate { .. } => "volume_create",
            Request::VolumeSnapshot { .. } => "volume_snapshot",
            Request::VolumeRemove { .. } => "volume_remove",
            Request::VolumeResize { .. } => "volume_resize",
            Request::PoolGrow { .. } => "pool_grow",
            Request::Commit => "commit",
            Request::PoolCheck { .. } => "pool_check",
            Request::PoolMoveData { .. } => "pool_move_data",
            Request::PoolEvents { .. } => "pool_events",
            Request::VolumeAttach { .. } => "volume_attach",
            Request::VolumeDetach { .. } => "volume_detach",
            Request::Mount { .. } => "mount",
            Request::Umount { .. } => "umount",
            Request::SnapshotList => "snapshot_list",
            Request::SnapshotUsage => "snapshot_usage",
            Request::SnapshotRemove { .. } => "snapshot_remove",
            Request::SnapshotPrepare { .. } => "snapshot_prepare",
            Request::SnapshotMounts { .. } => "snapshot_mounts",
            Request::SnapshotCommit { .. } => "snapshot_commit",
            Request::SnapshotResize { .. } => "snapshot_resize",
        }
    }
}

/// A step of an online check on a held metadata snapshot ([`Request::PoolCheck`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum MetadataSnapStep {
    /// Commit and reserve a metadata snapshot; the answer names it (`held_root`). A snapshot
    /// still held from an earlier run of the daemon (one that stopped or crashed before
    /// releasing it) is released first; one reserved since this daemon opened the pool is
    /// `busy` (another check runs).
    Reserve,
    /// Release the snapshot reserved at `held_root` (`invalid_argument` when that is not the
    /// one held).
    Release {
        /// The held root the reserve answered with.
        held_root: u64,
    },
}

/// The answer to one request. On the wire: `{"status":"ok","value":…}` or
/// `{"status":"error","kind":"…","message":"…"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    /// Done; `value` is the answer (see each [`Request`] variant).
    Ok {
        /// The answer.
        value: serde_json::Value,
    },
    /// Refused or failed.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// What happened and where, for people (the engine's message).
        message: String,
    },
}

/// What kind of failure a [`Response::Error`] is. The first eight mirror `thinpool-engine`'s
/// `ErrorKind` one for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The pool (data or metadata) is full.
    NoSpace,
    /// Metadata is damaged.
    Corrupt,
    /// A device or the socket failed.
    Io,
    /// No such volume or pool.
    NotFound,
    /// The name or pool already exists.
    Exists,
    /// In use.
    Busy,
    /// The pool is read-only.
    ReadOnly,
    /// Bad request (range past the end, bad size, bad name).
    InvalidArgument,
    /// The peer may not use this daemon (another user).
    PermissionDenied,
    /// A malformed or unknown message, or a protocol version mismatch.
    Protocol,
    /// A kind this client does not know (sent by a newer daemon).
    #[serde(other)]
    Other,
}

/// The answer to [`Request::Hello`]: who the daemon is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The daemon's [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The daemon's package version.
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// The user id the daemon runs as.
    pub uid: u32,
    /// The pool root the daemon serves.
    pub root: PathBuf,
    /// The unix socket the daemon serves NBD on (`nbd+unix:///NAME?socket=PATH`), if any.
    /// Absent from daemons older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_socket: Option<PathBuf>,
    /// The TCP address the daemon serves NBD on (`nbd://ADDR/NAME`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_tcp: Option<std::net::SocketAddr>,
}

/// A message could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The stream failed.
    #[error("reading a message")]
    Io(#[from] std::io::Error),
    /// No newline within the limit.
    #[error("message longer than {limit} bytes")]
    TooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// The line is not UTF-8.
    #[error("message is not UTF-8")]
    NotUtf8,
}

/// Read one message line (without its newline) of at most `limit` bytes; `Ok(None)` at the end
/// of the stream. A last line without a newline counts. Blocks until a line or the end arrives.
pub fn read_frame<R: BufRead>(
    reader: &mut R,
    limit: usize,
) -> std::result::Result<Option<String>, FrameError> {
    let mut buf = Vec::new();
    // One byte over the limit tells "exactly the limit" from "too long".
    let n = reader
        .by_ref()
        .take(limit as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > limit {
        return Err(FrameError::TooLong { limit });
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| FrameError::NotUtf8)
}

/// Write `msg` as one JSON line and flush.
pub fn write_frame<W: Write, T: Serialize>(writer: &mut W, msg: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line)?;
    writer.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let all = [
            Request::Hello { protocol: 1 },
            Request::PoolStatus,
            Request::VolumeList,
            Request::VolumeInfo { name: "a".into() },
            Request::VolumeCreate {
                name: "a".into(),
                size: 1 << 30,
            },
            Request::VolumeSnapshot {
                origin: "a".into(),
                name: "b".into(),
            },
            Request::VolumeRemove { name: "a".into() },
            Request::VolumeResize {
                name: "a".into(),
                size: 5,
                resize_fs: false,
            },
            Request::VolumeResize {
                name: "a".into(),
                size: 5,
                resize_fs: true,
            },
            Request::VolumeAttach {
                name: "a".into(),
                read_only: true,
            },
            Request::VolumeDetach { name: "a".into() },
            Request::SnapshotList,
            Request::SnapshotUsage,
            Request::SnapshotRemove {
                key: "sha256:abc".into(),
            },
            Request::SnapshotPrepare {
                key: "c".into(),
                parent: "sha256:abc".into(),
                labels: [("a".to_string(), "b".to_string())].into(),
                view: true,
            },
            Request::SnapshotMounts { key: "c".into() },
            Request::SnapshotCommit {
                name: "n".into(),
                key: "c".into(),
                labels: BTreeMap::new(),
            },
            Request::SnapshotResize {
                key: "c".into(),
                size: 1 << 30,
            },
            Request::Mount {
                name: "a".into(),
                dir: "/mnt/a".into(),
                mkfs: Some("ext4".into()),
                force: false,
                options: Some("noatime".into()),
                read_only: false,
            },
            Request::Umount {
                target: "/mnt/a".into(),
            },
            Request::PoolGrow {
                data_size: Some(1 << 40),
                metadata_size: None,
            },
            Request::Commit,
            Request::PoolCheck {
                metadata_snap: None,
            },
            Request::PoolCheck {
                metadata_snap: Some(MetadataSnapStep::Reserve),
            },
            Request::PoolCheck {
                metadata_snap: Some(MetadataSnapStep::Release { held_root: 13 }),
            },
            Request::PoolEvents { since: 7 },
        ];
        for r in all {
            let s = serde_json::to_string(&r).unwrap();
            assert!(s.contains(&format!("\"op\":\"{}\"", r.op())), "{s}");
            assert!(!s.contains('\n'));
            let back: Request = serde_json::from_str(&s).unwrap();
            assert_eq!(back, r);
        }
    }

    #[test]
    fn unknown_error_kind_is_other() {
        let r: Response =
            serde_json::from_str(r#"{"status":"error","kind":"frobbed","message":"m"}"#).unwrap();
        assert_eq!(
            r,
            Response::Error {
                kind: ErrorKind::Other,
                message: "m".into()
            }
        );
    }

    #[test]
    fn unknown_op_is_an_error() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_everything"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"volume_info"}"#).is_err());
    }

    #[test]
    fn frames() {
        let mut out = Vec::new();
        write_frame(&mut out, &Request::Commit).unwrap();
        write_frame(&mut out, &Request::PoolStatus).unwrap();
        out.extend_from_slice(b"last");
        let mut r = std::io::Cursor::new(out);
        assert_eq!(
            read_frame(&mut r, 100).unwrap().as_deref(),
            Some(r#"{"op":"commit"}"#)
        );
        assert_eq!(
            read_frame(&mut r, 100).unwrap().as_deref(),
            Some(r#"{"op":"pool_status"}"#)
        );
        assert_eq!(read_frame(&mut r, 100).unwrap().as_deref(), Some("last"));
        assert!(read_frame(&mut r, 100).unwrap().is_none());
    }

    #[test]
    fn frame_limits() {
        let mut r = std::io::Cursor::new(b"12345\n123456\n".to_vec());
        assert_eq!(read_frame(&mut r, 5).unwrap().as_deref(), Some("12345"));
        assert!(matches!(
            read_frame(&mut r, 5),
            Err(FrameError::TooLong { limit: 5 })
        ));
        let mut r = std::io::Cursor::new(b"\xff\xfe\n".to_vec());
        assert!(matches!(read_frame(&mut r, 5), Err(FrameError::NotUtf8)));
    }
}
