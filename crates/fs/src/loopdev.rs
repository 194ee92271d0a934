//! Loop devices over volume files: attach with direct I/O, refresh the capacity after a
//! grow, detach, and list what is attached (from `/sys/block/loop*/loop/backing_file`).

use std::path::{Path, PathBuf};

use crate::{Error, Result, tool};

/// A loop device and the file behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub device: PathBuf,
    /// The file it reads and writes, as the kernel recorded it when attaching.
    pub backing_file: PathBuf,
}

/// Attach a free loop device to `file` with direct I/O (the file's own page cache is not
/// doubled by the loop device's) and return it. `read_only` attaches it read-only.
pub fn attach(file: &Path, read_only: bool) -> Result<PathBuf> {
    let mut args = vec!["--find", "--show", "--direct-io=on"];
    if read_only {
        args.push("--read-only");
    }
    let file_s = file.to_string_lossy();
    args.push(&file_s);
    let out = tool::output("losetup", &args)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("could not find any free loop device")
            || stderr.contains("cannot find an unused loop device")
        {
            return Err(Error::NoFreeLoop);
        }
        return Err(tool::failed("losetup", &args, &out));
    }
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !dev.starts_with("/dev/") {
        return Err(Error::Tool {
            command: format!("losetup {}", args.join(" ")),
            status: "unexpected output".into(),
            stderr: dev,
        });
    }
    Ok(PathBuf::from(dev))
}

/// Detach `device`. The kernel frees it once the last user lets go.
pub fn detach(device: &Path) -> Result<()> {
    tool::run("losetup", &["--detach".as_ref(), device.as_os_str()]).map(drop)
}

/// Have `device` take its file's current size (after the volume grew).
///
/// The loop driver reads the size from its file's inode, which for a file of a FUSE mount is
/// only as fresh as the last attribute lookup: the file is looked up (stat) first, and the
/// device's new size checked against it, a few times, before giving up with the two sizes.
pub fn refresh(device: &Path) -> Result<()> {
    let file = list()
        .into_iter()
        .find(|l| l.device == device)
        .map(|l| l.backing_file);
    let mut tries = 0;
    loop {
        let want = file
            .as_ref()
            .and_then(|f| std::fs::metadata(f).ok())
            .map(|m| m.len());
        tool::run("losetup", &["--set-capacity".as_ref(), device.as_os_str()])?;
        let (Some(want), Ok(got)) = (want, size(device)) else {
            return Ok(());
        };
        // The device counts whole 512-byte sectors.
        if got >= want / 512 * 512 {
            return Ok(());
        }
        tries += 1;
        if tries == 5 {
            return Err(Error::Tool {
                command: format!("losetup --set-capacity {}", device.display()),
                status: "size unchanged".into(),
                stderr: format!("the device has {got} bytes, its file {want}"),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20 * tries));
    }
}

/// Size of a block device in bytes (from sysfs: 512-byte sectors).
pub fn size(device: &Path) -> Result<u64> {
    let name = device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = Path::new("/sys/class/block").join(&name).join("size");
    let s = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        what: "reading",
        path: path.clone(),
        source,
    })?;
    s.trim()
        .parse::<u64>()
        .map(|sectors| sectors * 512)
        .map_err(|e| Error::Io {
            what: "parsing",
            path,
            source: std::io::Error::other(e),
        })
}

/// Every attached loop device.
pub fn list() -> Vec<LoopDevice> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut v: Vec<LoopDevice> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                return None;
            }
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            Some(LoopDevice {
                device: Path::new("/dev").join(&name),
                backing_file: PathBuf::from(backing.trim_end_matches('\n')),
            })
        })
        .collect();
    v.sort_by(|a, b| a.device.cmp(&b.device));
    v
}

/// The loop devices whose file lies in `dir` (the kernel may add " (deleted)" to a file
/// that is gone; such names count too).
pub fn backed_by_files_in(dir: &Path) -> Vec<LoopDevice> {
    list()
        .into_iter()
        .filter(|l| l.backing_file.parent() == Some(dir))
        .collect()
}
