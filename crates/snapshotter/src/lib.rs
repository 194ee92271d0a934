//! containerd's snapshots gRPC service, served as a containerd **proxy snapshotter** on a unix
//! socket, over the small synchronous [`Snapshots`] trait that the daemon implements.
//!
//! containerd (1.6, config `version = 2`) learns about the snapshotter from one block of its
//! `config.toml`:
//!
//! ```toml
//! [proxy_plugins.thinpool]
//!   type = "snapshot"
//!   address = "/path/containerd-snapshotter.sock"
//! ```
//!
//! after which `ctr --snapshotter thinpool …`, `ctr snapshots --snapshotter thinpool ls`, or the
//! CRI plugin's `snapshotter = "thinpool"` reach the [`Snapshots`] given to [`Server::start`].
//!
//! # The service
//!
//! [`Server::start`] binds the socket (mode 0600), then serves
//! `containerd.services.snapshots.v1.Snapshots` from a background thread that owns a small tokio
//! runtime (two workers); every RPC runs its trait call on the runtime's blocking pool, so the
//! trait stays synchronous. The RPCs map one to one onto the trait's methods, with these
//! additions:
//!
//! - the `snapshotter` field of every request is ignored: one snapshotter per socket;
//! - empty keys and names are refused with `InvalidArgument` before the trait is called;
//! - `Update` refuses field paths other than `labels` and `labels.KEY` with `InvalidArgument`
//!   before the trait is called ([`Info::apply_update`] does the rest of containerd's rules);
//! - `List` takes everything from [`Snapshots::list`] and applies containerd's filters itself
//!   (see below), then streams the answer in messages of at most 100 infos, like containerd;
//! - an [`Error`] becomes the gRPC status of the same name (`NotFound`, `AlreadyExists`,
//!   `FailedPrecondition`, `InvalidArgument`, `Unavailable`, `Internal`) with the message, which
//!   containerd turns back into its `errdefs` errors;
//! - a panic in a trait call is answered with `Internal` and the server goes on serving.
//!
//! # List filters
//!
//! The syntax of containerd's `filters` package. The request's filters are OR-ed; inside one
//! filter, the comma-separated selectors are AND-ed; an empty filter matches everything. A
//! selector is `FIELD`, `FIELD==VALUE`, `FIELD!=VALUE` or `FIELD~=REGEXP`, with `FIELD` one of
//! `name`, `parent`, `kind` (`active`, `view` or `committed`) and `labels.KEY`. Field parts and
//! values may be quoted with `"…"`, `/…/` or `|…|` (Go escapes inside), so a label key with dots
//! or other characters is written `labels."containerd.io/gc.root"`; a plain `labels.a.b` means
//! the key `a.b`. A bare `FIELD` tests presence (always true for `name`, `parent` and `kind`, as
//! in containerd); `!=` and `~=` see a missing label as the empty string. Unknown fields,
//! malformed syntax and bad regular expressions are `InvalidArgument`.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! # fn demo(snapshots: Arc<dyn thinpool_snapshotter::Snapshots>) -> std::io::Result<()> {
//! let server = thinpool_snapshotter::Server::start(
//!     "/var/lib/thinpool/containerd-snapshotter.sock".as_ref(),
//!     snapshots,
//! )?;
//! // ... until the daemon stops:
//! server.stop();
//! # Ok(())
//! # }
//! ```
//!
//! The generated wire types and a tonic client live in [`proto`], for tests and tools.

use std::collections::BTreeMap;
use std::time::SystemTime;

mod filter;
mod server;
mod service;

pub use server::Server;

/// The bindings generated from `proto/` (containerd 1.6's snapshots API): wire types, the
/// server trait and a client.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    /// `containerd.*`
    pub mod containerd {
        /// `containerd.types`: the `Mount` message.
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        /// `containerd.services.*`
        pub mod services {
            /// `containerd.services.snapshots`
            pub mod snapshots {
                /// `containerd.services.snapshots.v1`: the `Snapshots` service.
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
}

/// The kind of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A read-only view of a committed snapshot.
    View,
    /// A writable snapshot, the only kind that can be committed.
    Active,
    /// A committed, read-only snapshot: the only kind that can be a parent.
    Committed,
}

impl Kind {
    /// The name containerd's filters use: `view`, `active` or `committed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// What is known about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The key (active snapshots and views) or the name (committed snapshots).
    pub name: String,
    /// The name of the committed parent, `""` when there is none.
    pub parent: String,
    /// The kind.
    pub kind: Kind,
    /// Arbitrary labels (containerd keeps, for instance, `containerd.io/gc.root` there).
    pub labels: BTreeMap<String, String>,
    /// When the snapshot was created.
    pub created: SystemTime,
    /// When the snapshot's info was last changed.
    pub updated: SystemTime,
}

impl Info {
    /// Applies an `Update` the way containerd's snapshotters do: only labels change. `fieldpaths`
    /// empty replaces all labels with `update.labels`; `labels` does the same; `labels.KEY` sets
    /// the one key from `update.labels`, or removes it when `update` has no such label. Labels with
    /// empty values are dropped. Any other path is `InvalidArgument`, and then nothing changes.
    /// `updated` is left alone: the caller sets it.
    pub fn apply_update(&mut self, update: &Info, fieldpaths: &[String]) -> Result<(), Error> {
        check_update_paths(fieldpaths)?;
        if fieldpaths.is_empty() {
            self.labels = update.labels.clone();
        }
        for path in fieldpaths {
            if path == "labels" {
                self.labels = update.labels.clone();
            } else if let Some(key) = path.strip_prefix("labels.") {
                match update.labels.get(key) {
                    Some(value) => self.labels.insert(key.to_owned(), value.clone()),
                    None => self.labels.remove(key),
                };
            }
        }
        self.labels.retain(|_, value| !value.is_empty());
        Ok(())
    }
}

/// Refuses update field paths other than `labels` and `labels.KEY`.
pub(crate) fn check_update_paths(fieldpaths: &[String]) -> Result<(), Error> {
    for path in fieldpaths {
        let ok = path == "labels" || path.strip_prefix("labels.").is_some_and(|k| !k.is_empty());
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "cannot update field {path:?}: only labels can be updated"
            )));
        }
    }
    Ok(())
}

/// Space used by a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Bytes used by the snapshot itself (not its parents).
    pub size: i64,
    /// Inodes used, when known (0 otherwise).
    pub inodes: i64,
}

/// One mount to perform to see a snapshot's file system, as mount(2) takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The file system type: `ext4`, `xfs`, `bind`, ...
    pub kind: String,
    /// What to mount: a device or a path.
    pub source: String,
    /// fstab-style options: `ro`, `discard`, ...
    pub options: Vec<String>,
}

/// Why a call failed; each variant is answered with the gRPC code of the same name and the
/// message, which containerd maps back to its `errdefs` errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No snapshot by that key or name.
    #[error("{0}: not found")]
    NotFound(String),
    /// The key or name is taken.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The snapshot is not in a state that allows the call (parent not committed, commit of a
    /// view, removal of a snapshot with children, ...).
    #[error("{0}: failed precondition")]
    FailedPrecondition(String),
    /// The request itself is wrong (empty key, bad filter, field that cannot be updated, ...).
    #[error("{0}: invalid argument")]
    InvalidArgument(String),
    /// The snapshotter cannot serve now (pool stopping, out of space, ...).
    #[error("{0}: unavailable")]
    Unavailable(String),
    /// Anything else.
    #[error("{0}: internal error")]
    Internal(String),
}

/// The snapshotter behind the socket, synchronous; containerd's rules are the implementation's
/// to keep: a parent must be committed, only an active snapshot can be committed, a snapshot
/// with children cannot be removed, keys and names share one namespace.
///
/// Calls come from several threads at once (the runtime's blocking pool).
pub trait Snapshots: Send + Sync + 'static {
    /// The info of the snapshot `key` (a key or a committed name).
    fn stat(&self, key: &str) -> Result<Info, Error>;
    /// Changes the labels of the snapshot `info.name`, with containerd's semantics (see
    /// [`Info::apply_update`]; `fieldpaths` are already checked to be `labels` or
    /// `labels.KEY`); returns the info after the change. Only `info.name` and `info.labels`
    /// mean anything here.
    fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info, Error>;
    /// The space used by the snapshot `key`.
    fn usage(&self, key: &str) -> Result<Usage, Error>;
    /// The mounts of the active snapshot or view `key`.
    fn mounts(&self, key: &str) -> Result<Vec<Mount>, Error>;
    /// Creates the active snapshot `key` over the committed `parent` (`""`: an empty one).
    fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error>;
    /// Creates the read-only view `key` of the committed `parent` (`""`: an empty one).
    fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error>;
    /// Commits the active snapshot `key` as the committed snapshot `name`; `key` is gone after.
    fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<(), Error>;
    /// Removes the snapshot `key`.
    fn remove(&self, key: &str) -> Result<(), Error>;
    /// Every snapshot; the server applies the request's filters.
    fn list(&self) -> Result<Vec<Info>, Error>;
    /// Releases space no longer needed (containerd calls it after garbage collection).
    fn cleanup(&self) -> Result<(), Error>;
}
