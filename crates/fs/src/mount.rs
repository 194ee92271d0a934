//! Mounting and unmounting filesystems, the kernel's mount table (`/proc/self/mountinfo`),
//! and who keeps a mount busy (scanned from `/proc/PID/{cwd,root,fd}`).

use std::path::{Path, PathBuf};

use crate::{Error, FsType, Result, tool};

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub dir: PathBuf,
    /// Filesystem type (`ext4`, `fuse`, …).
    pub fstype: String,
    /// What is mounted (`/dev/loop3`, …).
    pub source: String,
}

/// Undo the mount table's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse `/proc/self/mountinfo` text.
fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let dir = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next().unwrap_or("");
            Some(MountEntry {
                dir: PathBuf::from(unescape(dir)),
                fstype: fstype.to_string(),
                source: unescape(source),
            })
        })
        .collect()
}

/// The mount table, in mount order.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_mountinfo(&text))
}

/// What is mounted on `dir` (the topmost mount), if anything. `dir` is compared as given and
/// made absolute; resolve symlinks first if it may hold any.
pub fn mounted_at(dir: &Path) -> Result<Option<MountEntry>> {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    Ok(mounts()?.into_iter().rev().find(|m| m.dir == dir))
}

/// Mount `device` (holding a `fstype` filesystem) on `dir`, with `options` (as `mount -o`
/// takes them) and read-only when asked. XFS is mounted with `nouuid`: a thin snapshot holds
/// its origin's filesystem, UUID included, and XFS refuses a second mount of a UUID.
pub fn mount(
    device: &Path,
    dir: &Path,
    fstype: FsType,
    options: Option<&str>,
    read_only: bool,
) -> Result<()> {
    let mut opts: Vec<String> = Vec::new();
    if read_only {
        opts.push("ro".into());
    }
    if fstype == FsType::Xfs {
        opts.push("nouuid".into());
    }
    if let Some(o) = options.filter(|o| !o.is_empty()) {
        opts.push(o.to_string());
    }
    let mut args: Vec<String> = vec!["-t".into(), fstype.mount_type().into()];
    if !opts.is_empty() {
        args.push("-o".into());
        args.push(opts.join(","));
    }
    args.push(device.to_string_lossy().into_owned());
    args.push(dir.to_string_lossy().into_owned());
    tool::run("mount", &args).map(drop)
}

/// Unmount `dir`. A mount in use fails with [`Error::Busy`], naming who uses it.
pub fn unmount(dir: &Path) -> Result<()> {
    let out = tool::output("umount", &[dir])?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("busy") {
        return Err(Error::Busy {
            dir: dir.to_path_buf(),
            users: users(dir),
        });
    }
    Err(tool::failed("umount", &[dir], &out))
}

/// Detach the mount on `dir` now (lazy unmount: it goes away when its last user does).
pub fn detach(dir: &Path) -> Result<()> {
    tool::run("umount", &["--lazy".as_ref(), dir.as_os_str()]).map(drop)
}

/// Processes with their working directory, root or an open file under `dir`: pid and
/// command name, by pid.
pub fn users(dir: &Path) -> Vec<(u32, String)> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let under = |p: &Path| p.starts_with(dir);
    let mut v = Vec::new();
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let base = e.path();
        let mut uses = ["cwd", "root"]
            .iter()
            .filter_map(|l| std::fs::read_link(base.join(l)).ok())
            .any(|p| under(&p) && p != Path::new("/"));
        if !uses && let Ok(fds) = std::fs::read_dir(base.join("fd")) {
            uses = fds
                .flatten()
                .filter_map(|f| std::fs::read_link(f.path()).ok())
                .any(|p| under(&p));
        }
        if uses {
            let comm = std::fs::read_to_string(base.join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            v.push((pid, comm));
        }
    }
    v.sort();
    v
}

/// `pid 12 (bash), pid 40 (fio)`, or what to do when no process could be named (a loop
/// device or a bind mount holds it).
pub fn describe_users(users: &[(u32, String)]) -> String {
    if users.is_empty() {
        return "no process has a file open there (a mount or loop device on top of it may hold it)"
            .into();
    }
    let list: Vec<String> = users
        .iter()
        .map(|(pid, comm)| format!("pid {pid} ({comm})"))
        .collect();
    format!("in use by {}", list.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    90 22 7:3 / /mnt/my\\040dir rw,relatime shared:1 - ext4 /dev/loop3 rw\n\
                    bad line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].dir, Path::new("/mnt/my dir"));
        assert_eq!(m[1].fstype, "ext4");
        assert_eq!(m[1].source, "/dev/loop3");
    }

    #[test]
    fn our_own_cwd_makes_us_a_user() {
        let here = std::env::current_dir().unwrap();
        let u = users(&here);
        assert!(u.iter().any(|(p, _)| *p == std::process::id()), "{u:?}");
        assert!(describe_users(&u).contains(&format!("pid {}", std::process::id())));
        assert!(describe_users(&[]).contains("no process"));
    }
}
