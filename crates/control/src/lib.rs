//! thinpool-control: the control API between the `thinpool` CLI and the daemon that owns a
//! pool (`../shared/docs/design.md`, "Layers and data flow").
//!
//! This crate holds types only, and the client; it depends on no other thinpool crate, so the
//! daemon (which links the engine) and the CLI agree on the protocol without the CLI needing
//! the engine to speak it.
//!
//! - [`Request`] / [`Response`]: the messages, one JSON object per line over a unix stream
//!   socket at `<root>/control.sock` ([`socket_path`]). [`read_frame`] / [`write_frame`] move
//!   one message.
//! - [`PoolStatus`], [`VolumeInfo`]: the engine's answers as the wire carries them — the same
//!   fields, names and JSON shape as `thinpool-engine`'s types of the same names.
//!   [`CommittedMetadata`]: the answer to [`Request::PoolCheck`].
//! - [`Client`]: a blocking client; [`Client::connect_if_running`] tells "no daemon" (no socket,
//!   or a stale one) from a daemon that is there.
//! - [`Error`] / [`ErrorKind`]: what went wrong; a daemon's own refusals keep the engine's kind.
//!
//! ```text
//! client                                        daemon
//!   {"op":"hello","protocol":1}\n          ──▶
//!                                          ◀──  {"status":"ok","value":{"protocol":1,…}}\n
//!   {"op":"volume_create","name":"a","size":1048576}\n ──▶
//!                                          ◀──  {"status":"ok","value":{"name":"a",…}}\n
//!   {"op":"volume_remove","name":"zz"}\n   ──▶
//!                                          ◀──  {"status":"error","kind":"not_found",…}\n
//! ```
//!
//! ```
//! use thinpool_control::{Request, Response, ErrorKind};
//! let line = serde_json::to_string(&Request::VolumeCreate { name: "a".into(), size: 1 << 20 })
//!     .unwrap();
//! assert_eq!(line, r#"{"op":"volume_create","name":"a","size":1048576}"#);
//! let r: Response =
//!     serde_json::from_str(r#"{"status":"error","kind":"not_found","message":"no volume zz"}"#)
//!         .unwrap();
//! assert_eq!(r, Response::Error { kind: ErrorKind::NotFound, message: "no volume zz".into() });
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod proto;
mod types;

pub use client::{Client, Error, Result};
pub use proto::{
    ErrorKind, FrameError, Hello, MAX_REQUEST_LEN, MAX_RESPONSE_LEN, MetadataSnapStep,
    PROTOCOL_VERSION, Request, Response, SOCKET_NAME, read_frame, socket_path, write_frame,
};
pub use types::{
    Attachment, CommittedMetadata, DataMoved, EventKind, FsResized, LayerMount, LayerSnapshot,
    LayerUsage, PoolEvent, PoolMode, PoolStatus, Resized, Space, VolumeInfo, VolumeKind,
};
