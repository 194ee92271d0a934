//! The filesystems themselves: what a device holds (`blkid`), making one (`mkfs`), its size
//! as `df` sees it, growing it online, shrinking an unmounted ext4, freezing it.

use std::ffi::OsStr;
use std::fmt;
use std::path::Path;

use crate::{Error, Result, tool};

/// A filesystem type this crate can mount and resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    /// ext2.
    Ext2,
    /// ext3.
    Ext3,
    /// ext4.
    Ext4,
    /// XFS.
    Xfs,
}

impl FsType {
    /// The type as `blkid` and `mount -t` name it (`ext4`); `None` for others.
    pub fn parse(s: &str) -> Option<FsType> {
        Some(match s {
            "ext2" => FsType::Ext2,
            "ext3" => FsType::Ext3,
            "ext4" => FsType::Ext4,
            "xfs" => FsType::Xfs,
            _ => return None,
        })
    }

    /// The name `mount -t` takes.
    pub fn mount_type(self) -> &'static str {
        match self {
            FsType::Ext2 => "ext2",
            FsType::Ext3 => "ext3",
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    /// ext2, ext3 or ext4 (e2fsprogs' family).
    pub fn is_ext(self) -> bool {
        !matches!(self, FsType::Xfs)
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mount_type())
    }
}

/// What `device` (a block device or an image file) holds, as `blkid` names it (`ext4`,
/// `xfs`, `swap`, `dos` for a partition table, …); `None` when it finds nothing it knows.
pub fn probe(device: &Path) -> Result<Option<String>> {
    let args = [
        "-p".as_ref(),
        "-o".as_ref(),
        "value".as_ref(),
        "-s".as_ref(),
        "TYPE".as_ref(),
        device.as_os_str(),
    ];
    let out = tool::output("blkid", &args)?;
    match out.status.code() {
        Some(0) => {}
        // 2: nothing found.
        Some(2) => return Ok(None),
        _ => return Err(tool::failed("blkid", &args, &out)),
    }
    let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if t.is_empty() {
        // A partition table has PTTYPE, not TYPE.
        let pt = tool::run(
            "blkid",
            &[
                "-p".as_ref(),
                "-o".as_ref(),
                "value".as_ref(),
                "-s".as_ref(),
                "PTTYPE".as_ref(),
                device.as_os_str(),
            ],
        )
        .unwrap_or_default();
        let pt = pt.trim();
        return Ok((!pt.is_empty()).then(|| format!("{pt} partition table")));
    }
    Ok(Some(t))
}

/// Make a `fstype` filesystem on `device`, over whatever is there (the caller checks).
pub fn mkfs(device: &Path, fstype: FsType) -> Result<()> {
    mkfs_with(device, fstype, &[])
}

/// [`mkfs`] with more options for `mkfs.xfs` or `mke2fs` (before the device).
pub fn mkfs_with(device: &Path, fstype: FsType, options: &[&str]) -> Result<()> {
    let mut args: Vec<&OsStr> = vec!["-q".as_ref()];
    let program = match fstype {
        FsType::Xfs => {
            args.push("-f".as_ref());
            "mkfs.xfs"
        }
        t => {
            args.extend(["-F", "-t", t.mount_type()].map(OsStr::new));
            "mkfs.ext4"
        }
    };
    args.extend(options.iter().map(|o| OsStr::new(*o)));
    args.push(device.as_os_str());
    tool::run(program, &args).map(drop)
}

/// The size of the filesystem mounted on `dir` as `df` shows it (bytes).
pub fn size(dir: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(dir).map_err(|e| Error::Io {
        what: "statvfs of",
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    Ok(st.f_blocks * st.f_frsize)
}

/// Grow the filesystem mounted on `dir` (from `device`) to fill its device, online.
pub fn grow(fstype: FsType, device: &Path, dir: &Path) -> Result<()> {
    if fstype.is_ext() {
        tool::run("resize2fs", &[device]).map(drop)
    } else {
        tool::run("xfs_growfs", &[dir]).map(drop)
    }
}

/// Resize the unmounted ext2/3/4 filesystem on `device` (a block device or an image file) to
/// `size` bytes: a full check first (`e2fsck -f -p`: only safe fixes), then `resize2fs`, which
/// refuses a shrink when the files do not fit.
pub fn resize_offline(fstype: FsType, device: &Path, size: u64) -> Result<()> {
    if !fstype.is_ext() {
        return Err(Error::Unsupported(format!(
            "{fstype} is resized offline only as ext2/3/4: copy the files to a smaller volume instead"
        )));
    }
    let args = ["-f".as_ref(), "-p".as_ref(), device.as_os_str()];
    let out = tool::output("e2fsck", &args)?;
    // 0: clean; 1: errors fixed. Anything else needs a person.
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(tool::failed("e2fsck", &args, &out));
    }
    let kib = format!("{}K", size / 1024);
    tool::run("resize2fs", &[device.as_os_str(), kib.as_ref()]).map(drop)
}

/// The size of the ext2/3/4 filesystem on `device` (a block device or an image file), from its
/// superblock (`dumpe2fs -h`: block count × block size).
pub fn ext_size(device: &Path) -> Result<u64> {
    let args = ["-h".as_ref(), device.as_os_str()];
    let out = tool::run("dumpe2fs", &args)?;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    match (field("Block count:"), field("Block size:")) {
        (Some(n), Some(b)) => Ok(n * b),
        _ => Err(Error::Unsupported(format!(
            "`dumpe2fs -h {}` shows no block count and size",
            device.display()
        ))),
    }
}

/// Freeze the filesystem mounted on `dir` (all its writes reach the device; new ones wait
/// until [`thaw`]).
pub fn freeze(dir: &Path) -> Result<()> {
    tool::run("fsfreeze", &["--freeze".as_ref(), dir.as_os_str()]).map(drop)
}

/// Let writes go on after [`freeze`].
pub fn thaw(dir: &Path) -> Result<()> {
    tool::run("fsfreeze", &["--unfreeze".as_ref(), dir.as_os_str()]).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for t in [FsType::Ext2, FsType::Ext3, FsType::Ext4, FsType::Xfs] {
            assert_eq!(FsType::parse(&t.to_string()), Some(t));
        }
        assert_eq!(FsType::parse("btrfs"), None);
        assert!(FsType::Ext3.is_ext() && !FsType::Xfs.is_ext());
    }

    /// mkfs, probe, shrink on an image file: no root needed.
    #[test]
    fn ext4_image_file() {
        if tool::output("mkfs.ext4", &["-V"]).is_err() {
            eprintln!("SKIPPED: mkfs.ext4 not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(64 << 20).unwrap();
        assert_eq!(probe(&img).unwrap(), None);
        mkfs(&img, FsType::Ext4).unwrap();
        assert_eq!(probe(&img).unwrap().as_deref(), Some("ext4"));
        assert_eq!(ext_size(&img).unwrap(), 64 << 20);
        resize_offline(FsType::Ext4, &img, 32 << 20).unwrap();
        assert_eq!(ext_size(&img).unwrap(), 32 << 20);
        let e = resize_offline(FsType::Ext4, &img, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("`resize2fs"), "{e}");
        let e = resize_offline(FsType::Xfs, &img, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("offline only"), "{e}");
    }
}
