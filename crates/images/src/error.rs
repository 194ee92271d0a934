//! The applier's errors: each names the layer entry and what was wrong with it.

use std::io;
use std::path::PathBuf;

/// What went wrong while applying a layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The root directory could not be opened.
    #[error("cannot open the root directory {path:?}")]
    Root {
        /// The root as given.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The tar stream could not be read: truncated, corrupt, or the reader failed.
    #[error("layer stream: reading {entry} failed")]
    Read {
        /// The entry being read, or "the next header".
        entry: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The entry would reach outside the root.
    #[error("entry {entry:?}: path traversal: {reason}")]
    PathTraversal {
        /// The entry's path as stored in the tar.
        entry: String,
        /// Why: absolute path, `..` component, symlink in the path, hardlink target outside.
        reason: String,
    },
    /// The entry's type is not one a layer may hold.
    #[error("entry {entry:?}: unsupported entry type {kind}")]
    UnsupportedType {
        /// The entry's path.
        entry: String,
        /// The tar type flag.
        kind: String,
    },
    /// The entry's header holds something we cannot use.
    #[error("entry {entry:?}: invalid {what}")]
    Invalid {
        /// The entry's path.
        entry: String,
        /// What is wrong.
        what: String,
    },
    /// A file-system operation failed.
    #[error("entry {entry:?}: {op} of {path:?} failed")]
    Io {
        /// The entry's path.
        entry: String,
        /// The operation (`mkdir`, `open`, `write`, `lsetxattr`, ...).
        op: &'static str,
        /// The path operated on, relative to the root.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// The class of an [`Error`], what callers match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An entry would escape the root.
    PathTraversal,
    /// A tar feature or entry type we do not handle.
    Unsupported,
    /// The stream is truncated or malformed.
    Corrupt,
    /// The file system refused an operation.
    Io,
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::PathTraversal { .. } => ErrorKind::PathTraversal,
            Error::UnsupportedType { .. } => ErrorKind::Unsupported,
            Error::Read { .. } | Error::Invalid { .. } => ErrorKind::Corrupt,
            Error::Root { .. } | Error::Io { .. } => ErrorKind::Io,
        }
    }
}

/// The applier's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
