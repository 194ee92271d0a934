//! The control socket's file: made with mode 0600 from the start, replacing a stale one, and
//! removed at the end only if it is still ours.
//!
//! The socket is bound under a temporary name in the same folder, given mode 0600, then
//! renamed over `control.sock`: the path never shows a socket with looser permissions, and a
//! stale socket is replaced in one step. (`umask` would do it too, but it is per process and
//! would race with other threads creating files.)

use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Which file a socket is: device and inode, to remove only our own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

fn sock_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Socket {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Bind a listener at `path` with mode 0600. The caller has checked that nobody answers on
/// an existing socket there; anything at `path` that is not a socket is refused.
pub(crate) fn bind(path: &Path) -> Result<(UnixListener, FileId)> {
    match path.symlink_metadata() {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(Error::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Ok(_) => tracing::info!(socket = %path.display(), "replacing a stale control socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err("checking", path)(e)),
    }
    let tmp = temp_name(path);
    // Left over by an earlier process with our pid: nobody can be serving it.
    if let Ok(m) = tmp.symlink_metadata()
        && m.file_type().is_socket()
    {
        let _ = std::fs::remove_file(&tmp);
    }
    let listener = UnixListener::bind(&tmp).map_err(sock_err("binding", &tmp))?;
    let done = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(sock_err("setting the mode of", &tmp))
        .and_then(|()| tmp.symlink_metadata().map_err(sock_err("checking", &tmp)))
        .and_then(|meta| {
            std::fs::rename(&tmp, path)
                .map_err(sock_err("moving the new socket into place at", path))?;
            Ok(FileId::of(&meta))
        });
    match done {
        Ok(id) => {
            listener
                .set_nonblocking(true)
                .map_err(sock_err("setting up", path))?;
            Ok((listener, id))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// `<dir>/.control.sock.<pid>`.
fn temp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map_or_else(
        || "control.sock".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    path.with_file_name(format!(".{name}.{}", std::process::id()))
}

/// Remove the socket at `path` if it is still the one we bound (a newer daemon's is left).
pub(crate) fn remove_if_ours(path: &Path, id: FileId) {
    match path.symlink_metadata() {
        Ok(m) if FileId::of(&m) == id => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!("removing the control socket {}: {e}", path.display());
            }
        }
        Ok(_) => tracing::warn!(
            "the control socket {} was replaced by another file; leaving it",
            path.display()
        ),
        Err(_) => {}
    }
}

/// Block until `listener` has a connection to accept (`true`) or `wake` becomes readable, the
/// owner's stop signal (`false`). A failing poll is logged for `server` and ends serving too.
pub(crate) fn wait_for_client(
    listener: &impl std::os::fd::AsFd,
    wake: &std::os::unix::net::UnixStream,
    server: &str,
) -> bool {
    use rustix::event::{PollFd, PollFlags, poll};
    loop {
        let mut fds = [
            PollFd::new(listener, PollFlags::IN),
            PollFd::new(wake, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => return fds[1].revents().is_empty(),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::error!("{server}: poll failed, no longer serving: {e}");
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_with_mode_0600_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("control.sock");
        let (l, id) = bind(&p).unwrap();
        let m = p.symlink_metadata().unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        // Nothing else is left in the folder.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(l);
        remove_if_ours(&p, id);
        assert!(!p.exists());
    }

    #[test]
    fn replaces_stale_refuses_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("control.sock");
        drop(UnixListener::bind(&p).unwrap());
        let (_l, id) = bind(&p).unwrap();
        assert_eq!(FileId::of(&p.symlink_metadata().unwrap()), id);

        let f = dir.path().join("file.sock");
        std::fs::write(&f, b"not a socket").unwrap();
        let e = bind(&f).unwrap_err();
        assert!(matches!(e, Error::NotASocket { .. }), "{e:?}");
        assert_eq!(std::fs::read(&f).unwrap(), b"not a socket");
    }

    #[test]
    fn leaves_a_socket_that_is_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("control.sock");
        let (_l, id) = bind(&p).unwrap();
        // Moved away, not removed, so that the new socket cannot reuse its inode number.
        std::fs::rename(&p, dir.path().join("old.sock")).unwrap();
        let _other = UnixListener::bind(&p).unwrap();
        remove_if_ours(&p, id);
        assert!(p.exists());
    }
}
