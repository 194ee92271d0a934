//! [`Client`]: a blocking client of a daemon's control socket.
//!
//! One request at a time on one connection; each call blocks until the daemon answers (the
//! daemon runs the operation to its end, commit included, before it answers).

use std::collections::BTreeMap;
use std::io::{BufReader, ErrorKind as IoKind};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::proto::{
    ErrorKind, Hello, MAX_RESPONSE_LEN, MetadataSnapStep, PROTOCOL_VERSION, Request, Response,
    read_frame, write_frame,
};
use crate::types::{
    Attachment, CommittedMetadata, DataMoved, LayerMount, LayerSnapshot, LayerUsage, PoolStatus,
    Resized, VolumeInfo,
};

/// Errors of the control client. A daemon's own refusal ([`Error::Daemon`]) shows the daemon's
/// message unchanged, so that it reads as it would from the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket could not be connected to.
    #[error("cannot connect to the daemon's control socket {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The socket exists but this user may not connect to it.
    #[error(
        "the daemon's control socket {} is not accessible to you ({}): run as that user or root",
        path.display(),
        owner.map_or_else(|| "owner unknown".to_string(), |u| format!("owned by uid {u}"))
    )]
    NotAccessible {
        /// The socket.
        path: PathBuf,
        /// Its owner, when it could be seen.
        owner: Option<u32>,
    },
    /// Sending or receiving failed.
    #[error("{op} the daemon's control socket {}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// What was being done ("writing to", "reading from").
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The daemon's answer made no sense, or it speaks another protocol version.
    #[error("daemon at {}: {message}", path.display())]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// The daemon refused or failed the request.
    #[error("{message}")]
    Daemon {
        /// The kind of failure (the engine's kind for pool operations).
        kind: ErrorKind,
        /// The daemon's message.
        message: String,
    },
}

impl Error {
    /// The stable kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Connect { .. } | Error::Io { .. } => ErrorKind::Io,
            Error::NotAccessible { .. } => ErrorKind::PermissionDenied,
            Error::Protocol { .. } => ErrorKind::Protocol,
            Error::Daemon { kind, .. } => *kind,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A connection to a daemon's control socket, past the [`Hello`] exchange.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    hello: Hello,
}

/// Connect to `path`, telling "cannot reach it" apart from "not allowed to".
fn open_stream(path: &Path) -> Result<UnixStream> {
    UnixStream::connect(path).map_err(|source| {
        if source.kind() == IoKind::PermissionDenied {
            Error::NotAccessible {
                path: path.to_path_buf(),
                // The pool's root is private to its owner (0700), so another user may not
                // even see the socket: the root's owner is the daemon's owner then.
                owner: std::fs::metadata(path)
                    .or_else(|_| std::fs::metadata(path.parent().unwrap_or(path)))
                    .ok()
                    .map(|m| m.uid()),
            }
        } else {
            Error::Connect {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

impl Client {
    /// Connect to the daemon listening on `path` and exchange [`Hello`]s. Blocks until the
    /// daemon answers. Fails with [`Error::Connect`] when nobody listens there,
    /// [`Error::NotAccessible`] when the socket belongs to another user, and
    /// [`Error::Protocol`] when the daemon speaks another protocol version.
    pub fn connect(path: &Path) -> Result<Client> {
        let stream = open_stream(path)?;
        Self::handshake(path, stream)
    }

    /// Like [`Client::connect`], but `Ok(None)` when no daemon is listening: no socket file,
    /// a stale one that nobody answers on (`ECONNREFUSED`), or a path too long to be a
    /// socket's. A socket that exists but is
    /// not this user's is still an error ([`Error::NotAccessible`]): a daemon may well hold
    /// the pool, and going around it would only meet its lock.
    pub fn connect_if_running(path: &Path) -> Result<Option<Client>> {
        match open_stream(path) {
            Ok(stream) => Self::handshake(path, stream).map(Some),
            // InvalidInput: a path too long for a socket address (108 bytes), where no
            // daemon can have bound either.
            Err(Error::Connect { source, .. })
                if matches!(
                    source.kind(),
                    IoKind::NotFound
                        | IoKind::ConnectionRefused
                        | IoKind::NotADirectory
                        | IoKind::InvalidInput
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn handshake(path: &Path, stream: UnixStream) -> Result<Client> {
        let writer = stream.try_clone().map_err(|source| Error::Io {
            path: path.to_path_buf(),
            op: "setting up",
            source,
        })?;
        let mut client = Client {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            hello: Hello {
                protocol: 0,
                version: String::new(),
                pid: 0,
                uid: 0,
                root: PathBuf::new(),
                nbd_socket: None,
                nbd_tcp: None,
            },
        };
        let hello: Hello = client.call_as(&Request::Hello {
            protocol: PROTOCOL_VERSION,
        })?;
        if hello.protocol != PROTOCOL_VERSION {
            return Err(client.protocol_error(format!(
                "the daemon (pid {}, thinpool {}) speaks control protocol v{}, this client v{}: \
                 use the same thinpool version for both",
                hello.pid, hello.version, hello.protocol, PROTOCOL_VERSION
            )));
        }
        client.hello = hello;
        Ok(client)
    }

    fn protocol_error(&self, message: String) -> Error {
        Error::Protocol {
            path: self.path.clone(),
            message,
        }
    }

    /// The socket this client is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the daemon said about itself when this client connected (pid, uid, root).
    pub fn daemon(&self) -> &Hello {
        &self.hello
    }

    /// Send `req` and wait for its answer: the answer's value, or [`Error::Daemon`] with the
    /// daemon's kind and message.
    pub fn call(&mut self, req: &Request) -> Result<serde_json::Value> {
        let sent = write_frame(&mut self.writer, req);
        // A daemon that refuses this peer answers and hangs up, maybe before our request is
        // written: read its answer even when the write failed.
        let line = match read_frame(&mut self.reader, MAX_RESPONSE_LEN) {
            Ok(Some(line)) => line,
            Ok(None) => {
                return Err(match sent {
                    Err(source) => Error::Io {
                        path: self.path.clone(),
                        op: "writing to",
                        source,
                    },
                    Ok(()) => self.protocol_error(format!(
                        "the daemon closed the connection without answering {}",
                        req.op()
                    )),
                });
            }
            Err(crate::FrameError::Io(source)) => {
                return Err(Error::Io {
                    path: self.path.clone(),
                    op: "reading from",
                    source,
                });
            }
            Err(e) => {
                return Err(self.protocol_error(format!("answer to {}: {e}", req.op())));
            }
        };
        match serde_json::from_str::<Response>(&line) {
            Ok(Response::Ok { value }) => Ok(value),
            Ok(Response::Error { kind, message }) => Err(Error::Daemon { kind, message }),
            Err(e) => Err(self.protocol_error(format!("malformed answer to {}: {e}", req.op()))),
        }
    }

    /// [`Client::call`], with the answer decoded as `T`.
    pub fn call_as<T: DeserializeOwned>(&mut self, req: &Request) -> Result<T> {
        let value = self.call(req)?;
        serde_json::from_value(value)
            .map_err(|e| self.protocol_error(format!("unexpected answer to {}: {e}", req.op())))
    }

    /// The pool's status (the daemon commits first, as the engine does).
    pub fn pool_status(&mut self) -> Result<PoolStatus> {
        self.call_as(&Request::PoolStatus)
    }

    /// The space policy's events numbered above `since`, oldest first.
    pub fn pool_events(&mut self, since: u64) -> Result<Vec<crate::PoolEvent>> {
        self.call_as(&Request::PoolEvents { since })
    }

    /// Every volume, sorted by name.
    pub fn volumes(&mut self) -> Result<Vec<VolumeInfo>> {
        self.call_as(&Request::VolumeList)
    }

    /// One volume.
    pub fn volume_info(&mut self, name: &str) -> Result<VolumeInfo> {
        self.call_as(&Request::VolumeInfo { name: name.into() })
    }

    /// Create an empty volume of `size` bytes; durable when this returns.
    pub fn create_volume(&mut self, name: &str, size: u64) -> Result<VolumeInfo> {
        self.call_as(&Request::VolumeCreate {
            name: name.into(),
            size,
        })
    }

    /// Snapshot `origin` as `name`; durable when this returns.
    pub fn snapshot(&mut self, origin: &str, name: &str) -> Result<VolumeInfo> {
        self.call_as(&Request::VolumeSnapshot {
            origin: origin.into(),
            name: name.into(),
        })
    }

    /// Remove a volume; durable when this returns.
    pub fn remove_volume(&mut self, name: &str) -> Result<()> {
        self.call(&Request::VolumeRemove { name: name.into() })
            .map(drop)
    }

    /// Change a volume's virtual size (see [`Request::VolumeResize`]).
    pub fn resize_volume(&mut self, name: &str, size: u64, resize_fs: bool) -> Result<Resized> {
        self.call_as(&Request::VolumeResize {
            name: name.into(),
            size,
            resize_fs,
        })
    }

    /// Attach a loop device to a volume's file (see [`Request::VolumeAttach`]).
    pub fn attach(&mut self, name: &str, read_only: bool) -> Result<Attachment> {
        self.call_as(&Request::VolumeAttach {
            name: name.into(),
            read_only,
        })
    }

    /// Detach a volume's loop device.
    pub fn detach(&mut self, name: &str) -> Result<Attachment> {
        self.call_as(&Request::VolumeDetach { name: name.into() })
    }

    /// Attach and mount a volume (see [`Request::Mount`]).
    pub fn mount(&mut self, req: &Request) -> Result<Attachment> {
        self.call_as(req)
    }

    /// Unmount and detach a volume, named or by its mount point.
    pub fn umount(&mut self, target: &str) -> Result<Attachment> {
        self.call_as(&Request::Umount {
            target: target.into(),
        })
    }

    /// Every snapshot of the layer store.
    pub fn snapshots(&mut self) -> Result<Vec<LayerSnapshot>> {
        self.call_as(&Request::SnapshotList)
    }

    /// The space every layer-store snapshot uses, by key.
    pub fn snapshot_usage(&mut self) -> Result<BTreeMap<String, LayerUsage>> {
        self.call_as(&Request::SnapshotUsage)
    }

    /// Remove a layer-store snapshot.
    pub fn remove_snapshot(&mut self, key: &str) -> Result<()> {
        self.call(&Request::SnapshotRemove { key: key.into() })
            .map(drop)
    }

    /// A new layer-store snapshot of `parent` (`""`: of the base device), writable or a
    /// read-only `view`, and its mounts.
    pub fn prepare_snapshot(
        &mut self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        view: bool,
    ) -> Result<Vec<LayerMount>> {
        self.call_as(&Request::SnapshotPrepare {
            key: key.into(),
            parent: parent.into(),
            labels,
            view,
        })
    }

    /// The mounts of an active snapshot or view.
    pub fn snapshot_mounts(&mut self, key: &str) -> Result<Vec<LayerMount>> {
        self.call_as(&Request::SnapshotMounts { key: key.into() })
    }

    /// Commit the active snapshot `key` as `name`.
    pub fn commit_snapshot(
        &mut self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        self.call(&Request::SnapshotCommit {
            name: name.into(),
            key: key.into(),
            labels,
        })
        .map(drop)
    }

    /// Grow an active snapshot or view with its filesystem.
    pub fn resize_snapshot(&mut self, key: &str, size: u64) -> Result<LayerSnapshot> {
        self.call_as(&Request::SnapshotResize {
            key: key.into(),
            size,
        })
    }

    /// Grow the pool's devices (`None`: take the device's current size).
    pub fn grow(&mut self, data_size: Option<u64>, metadata_size: Option<u64>) -> Result<()> {
        self.call(&Request::PoolGrow {
            data_size,
            metadata_size,
        })
        .map(drop)
    }

    /// Make everything written so far durable.
    pub fn commit(&mut self) -> Result<()> {
        self.call(&Request::Commit).map(drop)
    }

    /// Commit, and learn where the committed metadata is, to check it read-only (see
    /// [`Request::PoolCheck`]). Durable when this returns.
    pub fn pool_check(&mut self) -> Result<CommittedMetadata> {
        self.call_as(&Request::PoolCheck {
            metadata_snap: None,
        })
    }

    /// Commit and reserve a metadata snapshot to check (see [`MetadataSnapStep::Reserve`]);
    /// the answer's `held_root` names it. Durable when this returns.
    pub fn reserve_metadata_snap(&mut self) -> Result<CommittedMetadata> {
        self.call_as(&Request::PoolCheck {
            metadata_snap: Some(MetadataSnapStep::Reserve),
        })
    }

    /// Release the metadata snapshot reserved at `held_root` (see
    /// [`MetadataSnapStep::Release`]). Durable when this returns.
    pub fn release_metadata_snap(&mut self, held_root: u64) -> Result<()> {
        self.call(&Request::PoolCheck {
            metadata_snap: Some(MetadataSnapStep::Release { held_root }),
        })
        .map(drop)
    }

    /// Move the pool's data onto `path` (see [`Request::PoolMoveData`]). Blocks until the
    /// move is done; durable when this returns.
    pub fn move_data(&mut self, path: &Path) -> Result<DataMoved> {
        self.call_as(&Request::PoolMoveData {
            path: path.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufRead as _;
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn no_socket_is_no_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("control.sock");
        assert!(Client::connect_if_running(&p).unwrap().is_none());
        let e = Client::connect(&p).unwrap_err();
        assert!(matches!(e, Error::Connect { .. }), "{e:?}");
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
    }

    #[test]
    fn too_long_a_path_is_no_daemon() {
        let p = PathBuf::from(format!("/tmp/{}/control.sock", "x".repeat(200)));
        assert!(Client::connect_if_running(&p).unwrap().is_none());
    }

    #[test]
    fn stale_socket_is_no_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("control.sock");
        drop(UnixListener::bind(&p).unwrap());
        assert!(p.exists());
        assert!(Client::connect_if_running(&p).unwrap().is_none());
    }

    /// A one-connection fake daemon answering each request line with the next of `answers`.
    fn fake_daemon(p: &Path, answers: Vec<String>) -> std::thread::JoinHandle<Vec<String>> {
        let l = UnixListener::bind(p).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let mut seen = Vec::new();
            for a in answers {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                seen.push(line.trim_end().to_string());
                std::io::Write::write_all(&mut w, format!("{a}\n").as_bytes()).unwrap();
            }
            seen
        })
    }

    fn hello_line(protocol: u32) -> String {
        format!(
            r#"{{"status":"ok","value":{{"protocol":{protocol},"version":"0.1.0","pid":42,"uid":0,"root":"/r"}}}}"#
        )
    }

    #[test]
    fn calls_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("control.sock");
        let t = fake_daemon(
            &p,
            vec![
                hello_line(PROTOCOL_VERSION),
                r#"{"status":"error","kind":"exists","message":"a volume named a already exists"}"#
                    .into(),
                r#"{"status":"ok","value":null}"#.into(),
                r#"{"status":"ok","value":{"unexpected":1}}"#.into(),
                "this is not json".into(),
            ],
        );
        let mut c = Client::connect_if_running(&p).unwrap().unwrap();
        assert_eq!(c.daemon().pid, 42);
        let e = c.create_volume("a", 1 << 20).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Exists);
        assert_eq!(e.to_string(), "a volume named a already exists");
        c.remove_volume("a").unwrap();
        let e = c.pool_status().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
        let e = c.commit().unwrap_err();
        assert!(e.to_string().contains("malformed answer to commit"), "{e}");
        let seen = t.join().unwrap();
        assert_eq!(seen[0], r#"{"op":"hello","protocol":1}"#);
        assert_eq!(
            seen[1],
            r#"{"op":"volume_create","name":"a","size":1048576}"#
        );
        // The fake hung up: the next call says so instead of hanging.
        let e = c.commit().unwrap_err();
        assert!(
            matches!(e, Error::Protocol { .. } | Error::Io { .. }),
            "{e:?}"
        );
    }

    #[test]
    fn protocol_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("control.sock");
        let t = fake_daemon(&p, vec![hello_line(PROTOCOL_VERSION + 1)]);
        let e = Client::connect(&p).unwrap_err();
        assert!(e.to_string().contains("speaks control protocol v2"), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn not_accessible_message() {
        let e = Error::NotAccessible {
            path: "/r/control.sock".into(),
            owner: Some(1000),
        };
        assert_eq!(
            e.to_string(),
            "the daemon's control socket /r/control.sock is not accessible to you (owned by uid \
             1000): run as that user or root"
        );
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    }
}
