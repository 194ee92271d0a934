//! The unix-socket server: its own thread and tokio runtime, graceful stop.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::Snapshots;
use crate::proto::containerd::services::snapshots::v1::snapshots_server::SnapshotsServer;
use crate::service::Service;

/// How long [`Server::stop`] lets calls in flight finish before it drops them.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Runtime worker threads (the trait calls run on the blocking pool, not on these).
const WORKERS: usize = 2;
/// Threads for trait calls at once.
const MAX_BLOCKING: usize = 32;
/// The largest request or answer (a List answer goes in batches, so this is generous).
const MAX_MESSAGE: usize = 16 << 20;

/// A running snapshotter service on a unix socket; [`Server::stop`] (or dropping it) stops it.
#[derive(Debug)]
pub struct Server {
    socket: PathBuf,
    /// (device, inode) of the socket file we bound, so stop removes only ours.
    identity: (u64, u64),
    shutdown: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `socket` and serves `snapshots` on it from a background thread.
    ///
    /// A stale socket file (nobody answers on it) is replaced; the call fails with
    /// `AddrInUse` if another server answers there, and with `AlreadyExists` if the path is
    /// something other than a socket. The socket is made mode 0600 before the first
    /// connection is accepted.
    pub fn start(socket: &Path, snapshots: Arc<dyn Snapshots>) -> io::Result<Server> {
        clear_stale_socket(socket)?;
        let listener = StdUnixListener::bind(socket)?;
        let bound = (|| {
            std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
            let meta = std::fs::symlink_metadata(socket)?;
            listener.set_nonblocking(true)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(WORKERS)
                .max_blocking_threads(MAX_BLOCKING)
                .thread_name("snapshotter")
                .enable_all()
                .build()?;
            let listener = {
                let _guard = runtime.enter();
                tokio::net::UnixListener::from_std(listener)?
            };
            Ok::<_, io::Error>(((meta.dev(), meta.ino()), runtime, listener))
        })();
        let (identity, runtime, listener) = match bound {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(socket);
                return Err(e);
            }
        };

        let (shutdown, mut stop_serving) = watch::channel(false);
        let mut stop_waiting = shutdown.subscribe();
        let service = SnapshotsServer::new(Service::new(snapshots))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let thread = std::thread::Builder::new()
            .name("snapshotter".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                    let serve = tonic::transport::Server::builder()
                        .add_service(service)
                        .serve_with_incoming_shutdown(incoming, async move {
                            let _ = stop_serving.wait_for(|stop| *stop).await;
                        });
                    let deadline = async move {
                        let _ = stop_waiting.wait_for(|stop| *stop).await;
                        tokio::time::sleep(STOP_GRACE).await;
                    };
                    tokio::select! {
                        result = serve => {
                            if let Err(e) = result {
                                tracing::error!("snapshotter server failed: {e}");
                            }
                        }
                        () = deadline => {
                            tracing::warn!("snapshotter calls still running after {STOP_GRACE:?}: dropped");
                        }
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(socket);
                return Err(e);
            }
        };
        tracing::info!(socket = %socket.display(), "containerd snapshotter serving");
        Ok(Server {
            socket: socket.to_owned(),
            identity,
            shutdown,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops: no new connections, calls in flight get up to 10 s to finish, then the socket
    /// file is removed.
    pub fn stop(mut self) {
        self.shutdown_now();
    }

    fn shutdown_now(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let _ = self.shutdown.send(true);
        if thread.join().is_err() {
            tracing::error!("snapshotter server thread panicked");
        }
        if let Ok(meta) = std::fs::symlink_metadata(&self.socket)
            && (meta.dev(), meta.ino()) == self.identity
        {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}

/// Removes a socket file nobody answers on; refuses a live socket or a non-socket.
fn clear_stale_socket(socket: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", socket.display()),
        ));
    }
    match StdUnixStream::connect(socket) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another server answers on {}", socket.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(socket),
        Err(e) => Err(e),
    }
}
