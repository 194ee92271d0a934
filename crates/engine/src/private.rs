//! Least privilege for a pool's files on the host (design: "The pool on disk"): the root and
//! `pool/` are 0700; the data and metadata files, `volumes.json` and `lock` are 0600, whatever
//! the umask, because a volume's bytes must be readable by the pool's owner only (Docker kept
//! `/var/lib/docker` 0710; LVM's devices are root's). Files made here are created 0600;
//! [`make_private`] fixes the modes of an existing pool when it is opened, with a log line.
//! Files and devices a user handed in (`pool/data` or `pool/metadata` as a symlink) are not
//! changed: a warning says when others can read them.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;

use crate::{Error, Result};

/// Mode of the pool's directories.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of the pool's files.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Give the pool in `root` private modes: the directories 0700, its own regular files 0600.
/// Does nothing to a mode that is already right. O(1) system calls.
pub(crate) fn make_private(root: &Path) -> Result<()> {
    for dir in [root.to_path_buf(), root.join("pool")] {
        // `pool/` is missing in a root that keeps only the catalog of handed-in devices.
        if dir.is_dir() {
            set_mode(&dir, DIR_MODE)?;
        }
    }
    for name in ["pool/data", "pool/metadata", "volumes.json", "lock"] {
        let path = root.join(name);
        let Ok(meta) = path.symlink_metadata() else {
            continue; // not made yet
        };
        if meta.file_type().is_symlink() {
            if let Ok(target) = std::fs::metadata(&path)
                && target.mode() & 0o077 != 0
                && !target.file_type().is_symlink()
            {
                tracing::warn!(
                    "{} (a file or device given to the pool) can be read or written by users other than its owner (mode {:o}); volumes' bytes are in it",
                    path.display(),
                    target.mode() & 0o777
                );
            }
            continue;
        }
        if meta.is_file() {
            set_mode(&path, FILE_MODE)?;
        }
    }
    Ok(())
}

/// `chmod MODE PATH` unless it has that mode already (logged when changed).
pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|source| Error::File {
        what: "reading the mode of",
        path: path.to_path_buf(),
        source,
    })?;
    let old = meta.permissions().mode() & 0o7777;
    if old == mode {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        Error::File {
            what: "making private",
            path: path.to_path_buf(),
            source,
        }
    })?;
    tracing::info!(
        "{}: mode {old:o} -> {mode:o} (pool files are private to their owner)",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn fixes_modes_of_an_existing_pool_and_leaves_given_files_alone() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("pool")).unwrap();
        let given = dir.path().join("given-data");
        std::fs::write(&given, b"x").unwrap();
        std::fs::set_permissions(&given, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&given, root.join("pool/data")).unwrap();
        for f in ["pool/metadata", "volumes.json", "lock"] {
            std::fs::write(root.join(f), b"x").unwrap();
            std::fs::set_permissions(root.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        make_private(&root).unwrap();
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("pool")), 0o700);
        for f in ["pool/metadata", "volumes.json", "lock"] {
            assert_eq!(mode(&root.join(f)), 0o600, "{f}");
        }
        assert_eq!(mode(&given), 0o644, "a file the user gave is not changed");
    }
}
