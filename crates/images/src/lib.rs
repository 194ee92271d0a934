//! Images and containers without containerd (issue 14), first piece: the **layer applier**.
//!
//! [`apply_layer`] unpacks one OCI/docker layer (a tar stream, plain or gzip) onto a directory
//! tree that already holds the parent layers — a mounted snapshot — as containerd and umoci do:
//! whiteouts (`.wh.NAME`) remove what lower layers put there, an opaque marker (`.wh..wh..opq`)
//! empties a directory of lower content while keeping what the same layer adds, and regular
//! files, directories, symlinks, hardlinks, device nodes and FIFOs are created with their modes,
//! owners, mtimes and extended attributes.
//!
//! **Nothing outside the root is touched.** Every path is split into components, `..` and
//! absolute paths are refused, and the components are opened one at a time relative to a
//! directory descriptor with `O_NOFOLLOW`, so a symlink in a parent position — from a lower layer
//! or from this very layer — is never followed; the final component is acted on by `*at` calls
//! that do not follow it either. A refused layer returns [`Error`] naming the entry; the tree may
//! be half-applied (the caller discards the snapshot), but nothing beyond it has changed.
//!
//! This is stricter than containerd, which resolves a parent symlink *inside* the root
//! (`lib -> usr/lib`, then `lib/x`): we refuse it. Layers made by diffing snapshots (docker,
//! buildkit, containerd) record real paths, so they never need it. Also refused: PAX sparse
//! files (`GNU.sparse.*`, which the `tar` crate cannot expand), paths deeper than 1024
//! components. Skipped: reserved `.wh..wh.*` names (AUFS metadata) and xattrs outside `user.*`,
//! `trusted.*` and `security.capability`.
//!
//! ```no_run
//! let layer = std::fs::File::open("layer.tar")?;
//! let stats = thinpool_images::apply_layer(std::path::Path::new("/mnt/snap"), layer)?;
//! println!("{} entries, {} bytes, {} whiteouts", stats.entries, stats.bytes, stats.whiteouts);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod apply;
mod archive;
mod diff;
mod error;
mod export;
mod resolve;
mod store;

pub use apply::{ApplyStats, apply_layer};
pub use archive::{
    Archive, ArchiveError, ArchiveImage, ArchiveLayer, LayerDigests, LayerStream, SaveImage,
    SaveLayer, write_archive,
};
pub use diff::{DiffStats, diff_layer};
pub use error::{Error, ErrorKind, Result};
pub use export::{ExportStats, export_tree};
pub use store::{
    CONTAINER_PREFIX, Container, Image, ImageStore, ImageSummary, LAYER_PREFIX, Labels, Loaded,
    Progress, Pruned, Quiet, SIZE_LABEL, SnapshotError, SnapshotInfo, Snapshots, StoreError,
    chain_ids, needed_size, normalize_name, rfc3339, short,
};
