//! Shared by the export and diff tests: building trees (sparse files, xattrs, ns mtimes,
//! device nodes), comparing two trees the way a layer must reproduce them, reading a tar's
//! entry list.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, SeekFrom, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;

/// Whether we run as root; otherwise skips loudly (fails under CI).
pub fn is_root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    thinpool_testkit::skip_or_fail("the export/diff tests need root (owners, mknod, trusted.*)");
    false
}

/// A scratch directory (under `TMPDIR`) whose file system keeps `user.*` and `trusted.*`
/// xattrs and sparse files, or `None` after a loud skip (a failure under CI). We run as root
/// when this is called.
pub fn scratch() -> Option<tempfile::TempDir> {
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe");
    fs::write(&probe, b"").unwrap();
    for name in ["user.probe", "trusted.probe"] {
        if let Err(e) = rustix::fs::lsetxattr(&probe, name, b"1", XattrFlags::empty()) {
            thinpool_testkit::skip_or_fail(&format!(
                "{name} xattrs not supported in {:?} ({e}); set TMPDIR to an ext4 directory",
                dir.path()
            ));
            return None;
        }
    }
    fs::remove_file(&probe).unwrap();
    Some(dir)
}

/// Sets the mtime (and atime) of `path` without following a symlink.
pub fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let t = Timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap_or_else(|e| panic!("utimensat {path:?}: {e}"));
}

/// Sets an xattr on `path` (not following a symlink).
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, XattrFlags::empty())
        .unwrap_or_else(|e| panic!("lsetxattr {name} on {path:?}: {e}"));
}

/// Creates a file of apparent size `size` holding `data` at each offset, holes elsewhere.
pub fn write_sparse(path: &Path, size: u64, regions: &[(u64, &[u8])]) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (off, data) in regions {
        f.write_all_at(data, *off).unwrap();
    }
}

/// Deterministic non-zero bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x = u32::from(seed) * 2_654_435_761 + 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as u8) | 1
        })
        .collect()
}

/// Bytes allocated to `path` on disk.
pub fn allocated(path: &Path) -> u64 {
    fs::symlink_metadata(path).unwrap().blocks() * 512
}

/// `mknod` of a character device, block device or FIFO.
pub fn mknod(path: &Path, kind: rustix::fs::FileType, mode: u32, major: u32, minor: u32) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        kind,
        rustix::fs::Mode::from_raw_mode(mode),
        rustix::fs::makedev(major, minor),
    )
    .unwrap_or_else(|e| panic!("mknod {path:?}: {e}"));
}

/// `cp -a --sparse=always src dst` (dst must not exist).
pub fn copy_tree(src: &Path, dst: &Path) {
    let status = std::process::Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(src)
        .arg(dst)
        .status()
        .unwrap();
    assert!(status.success(), "cp -a {src:?} {dst:?}");
}

/// One tar entry: path, type byte, link target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    pub path: String,
    pub kind: tar::EntryType,
    pub link: Option<String>,
    /// The apparent size (a sparse file's realsize).
    pub size: u64,
    /// The bytes stored in the archive for it (a sparse file's data regions).
    pub stored: u64,
}

/// The entries of a tar (PAX headers resolved by the `tar` crate).
pub fn tar_entries(tar_bytes: &[u8]) -> Vec<TarEntry> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        out.push(TarEntry {
            path: String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
            kind: entry.header().entry_type(),
            link: entry
                .link_name_bytes()
                .map(|l| String::from_utf8_lossy(&l).into_owned()),
            size: entry.size(),
            stored: entry.header().entry_size().unwrap(),
        });
    }
    out
}

/// What a layer must reproduce of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Info {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    rdev: u64,
    target: Option<PathBuf>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    ino: u64,
    nlink: u64,
}

fn kind_of(ft: fs::FileType) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else if ft.is_fifo() {
        "fifo"
    } else {
        "socket"
    }
}

/// The xattrs a layer carries (`user.*`, `trusted.*`, `security.capability`).
fn xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut list = vec![0u8; 1 << 16];
    let n = match rustix::fs::llistxattr(path, &mut list[..]) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => 0,
        Err(e) => panic!("llistxattr {path:?}: {e}"),
    };
    let mut out = BTreeMap::new();
    for name in list[..n].split(|&b| b == 0) {
        if !(name.starts_with(b"user.")
            || name.starts_with(b"trusted.")
            || name == b"security.capability")
        {
            continue;
        }
        let mut value = vec![0u8; 1 << 16];
        let len = rustix::fs::lgetxattr(path, std::ffi::OsStr::from_bytes(name), &mut value[..])
            .unwrap_or_else(|e| panic!("lgetxattr {path:?}: {e}"));
        value.truncate(len);
        out.insert(name.to_vec(), value);
    }
    out
}

fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Info>) {
    let mut names: Vec<_> = fs::read_dir(root.join(rel))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        let path = root.join(&rel);
        let md = fs::symlink_metadata(&path).unwrap();
        let kind = kind_of(md.file_type());
        if kind == "socket" {
            continue;
        }
        let info = Info {
            kind,
            mode: if kind == "symlink" {
                0
            } else {
                md.mode() & 0o7777
            },
            uid: md.uid(),
            gid: md.gid(),
            size: if kind == "file" { md.size() } else { 0 },
            mtime: (md.mtime(), md.mtime_nsec()),
            rdev: if kind == "char" || kind == "block" {
                md.rdev()
            } else {
                0
            },
            target: (kind == "symlink").then(|| fs::read_link(&path).unwrap()),
            xattrs: xattrs(&path),
            ino: md.ino(),
            nlink: md.nlink(),
        };
        out.insert(rel.clone(), info);
        if kind == "dir" {
            walk(root, &rel, out);
        }
    }
}

/// Data regions of a file via `SEEK_DATA`/`SEEK_HOLE`.
fn regions(f: &File, size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let start = match rustix::fs::seek(f, SeekFrom::Data(off)) {
            Ok(s) => s,
            Err(Errno::NXIO) => break,
            Err(e) => panic!("SEEK_DATA: {e}"),
        };
        let end = rustix::fs::seek(f, SeekFrom::Hole(start))
            .unwrap()
            .min(size);
        out.push((start, end));
        off = end;
    }
    out
}

/// Whether two files of equal size hold the same bytes; only the union of their data regions
/// is read (outside it both are holes, zeros), so a 4 GiB sparse file compares in a blink.
fn same_content(a: &Path, b: &Path, size: u64) -> bool {
    let fa = File::open(a).unwrap();
    let fb = File::open(b).unwrap();
    let mut ranges = regions(&fa, size);
    ranges.extend(regions(&fb, size));
    ranges.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    for (s, e) in merged {
        let mut off = s;
        while off < e {
            let n = ((e - off) as usize).min(ba.len());
            fa.read_exact_at(&mut ba[..n], off).unwrap();
            fb.read_exact_at(&mut bb[..n], off).unwrap();
            if ba[..n] != bb[..n] {
                return false;
            }
            off += n as u64;
        }
    }
    true
}

/// Hardlink groups: the sorted paths of each non-directory inode with more than one link.
fn link_groups(tree: &BTreeMap<PathBuf, Info>) -> BTreeSet<Vec<PathBuf>> {
    let mut by_ino: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    for (path, info) in tree {
        if info.kind != "dir" && info.nlink > 1 {
            by_ino.entry(info.ino).or_default().push(path.clone());
        }
    }
    by_ino.into_values().filter(|g| g.len() > 1).collect()
}

/// The differences between the trees under `a` and `b` (roots' own metadata not compared;
/// sockets and the top-level names in `ignore` skipped): type, mode, owner, size, mtime with
/// nanoseconds, device number, symlink target, carried xattrs, content, hardlink groups. One
/// line per difference; empty when equal.
pub fn compare_trees(a: &Path, b: &Path, ignore: &[&str]) -> Vec<String> {
    let mut ta = BTreeMap::new();
    let mut tb = BTreeMap::new();
    walk(a, Path::new(""), &mut ta);
    walk(b, Path::new(""), &mut tb);
    for name in ignore {
        let name = Path::new(name);
        ta.retain(|p: &PathBuf, _| !p.starts_with(name));
        tb.retain(|p: &PathBuf, _| !p.starts_with(name));
    }
    let mut diffs = Vec::new();
    let paths: BTreeSet<&PathBuf> = ta.keys().chain(tb.keys()).collect();
    for path in paths {
        match (ta.get(path), tb.get(path)) {
            (Some(_), None) => diffs.push(format!("{path:?}: only in {a:?}")),
            (None, Some(_)) => diffs.push(format!("{path:?}: only in {b:?}")),
            (Some(x), Some(y)) => {
                let strip = |i: &Info| Info {
                    ino: 0,
                    nlink: 0,
                    ..i.clone()
                };
                if strip(x) != strip(y) {
                    diffs.push(format!("{path:?}: {:?} != {:?}", strip(x), strip(y)));
                } else if x.kind == "file" && !same_content(&a.join(path), &b.join(path), x.size) {
                    diffs.push(format!("{path:?}: content differs"));
                }
            }
            (None, None) => unreachable!(),
        }
    }
    let (ga, gb) = (link_groups(&ta), link_groups(&tb));
    if ga != gb {
        diffs.push(format!(
            "hardlink groups: only in a {:?}, only in b {:?}",
            ga.difference(&gb).collect::<Vec<_>>(),
            gb.difference(&ga).collect::<Vec<_>>()
        ));
    }
    diffs
}

/// Reads a whole small file.
pub fn read(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path).unwrap().read_to_end(&mut v).unwrap();
    v
}
