//! File trees recorded and compared, and two references for what an image's root file system
//! must hold: `umoci unpack` ([`reference_unpack`]) and our own layer-by-layer apply
//! ([`apply_layers`], [`apply_layer`]) honouring whiteouts and opaque folders as the OCI image
//! spec says (`.wh.NAME` deletes `NAME` of lower layers, `.wh..wh..opq` hides everything lower
//! layers put in its folder).
//!
//! [`Tree::scan`] records, per entry below the root (the root itself and a top-level `lost+found`
//! are left out): its type, permission bits (with setuid, setgid, sticky), owner, size and SHA-256
//! of files, symlink target, device number, mtime (not of folders: writing in a folder changes
//! it), its hardlink group (the first path, in sorted order, of the entries sharing its inode) and
//! its `user.*` extended attributes (others — `security.*`, `trusted.overlay.*` — depend on the
//! host and the storage). [`Tree::diff`] lists the differences, one readable line each.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::images::{Compression, Image, sha256_hex};
use crate::{require_tool, run_ok, tool};

/// The type of a tree entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Regular file.
    File,
    /// Folder.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Character device.
    CharDevice,
    /// Block device.
    BlockDevice,
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
}

/// What [`Tree::scan`] records of one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Its type.
    pub kind: Kind,
    /// Permission bits with setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes (files only; 0 otherwise).
    pub size: u64,
    /// Hex SHA-256 of the contents (files only).
    pub sha256: Option<String>,
    /// Symlink target.
    pub target: Option<String>,
    /// `(major, minor)` of device nodes.
    pub rdev: Option<(u32, u32)>,
    /// Modification time in seconds (`None` for folders).
    pub mtime: Option<i64>,
    /// For an inode with several names in the tree: the first of them in sorted order.
    pub link_group: Option<String>,
    /// `user.*` extended attributes, sorted by name.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// A recorded file tree: relative path → [`Node`], sorted by path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    /// The entries, keyed by path relative to the scanned root (`a/b/c`).
    pub entries: BTreeMap<String, Node>,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Kind::File => "file",
            Kind::Dir => "folder",
            Kind::Symlink => "symlink",
            Kind::CharDevice => "char device",
            Kind::BlockDevice => "block device",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        };
        f.write_str(s)
    }
}

fn show_bytes(v: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(v))
}

impl Tree {
    /// Record every entry below `root` (not following symlinks; `lost+found` at the top left out).
    /// Panics with the path on any I/O error.
    pub fn scan(root: &Path) -> Tree {
        Tree::scan_without(root, &[])
    }

    /// [`Tree::scan`], leaving out the top-level entries named in `skip` too (and what they
    /// hold): files too big to hash whole, compared by other means.
    pub fn scan_without(root: &Path, skip: &[&str]) -> Tree {
        let mut raw: Vec<(String, std::fs::Metadata)> = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let dir = root.join(&rel);
            let rd = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("read folder {}: {e}", dir.display()));
            for ent in rd {
                let ent = ent.unwrap_or_else(|e| panic!("read folder {}: {e}", dir.display()));
                let name = ent.file_name();
                if rel.as_os_str().is_empty()
                    && (name == "lost+found" || skip.iter().any(|s| name == *s))
                {
                    continue;
                }
                let child = rel.join(&name);
                let md = std::fs::symlink_metadata(root.join(&child))
                    .unwrap_or_else(|e| panic!("lstat {}: {e}", root.join(&child).display()));
                if md.is_dir() {
                    stack.push(child.clone());
                }
                raw.push((child.to_string_lossy().into_owned(), md));
            }
        }
        raw.sort_by(|a, b| a.0.cmp(&b.0));
        // Hardlink groups: the first path (sorted) of each (dev, ino) with several names here.
        let mut by_inode: HashMap<(u64, u64), Vec<&str>> = HashMap::new();
        for (p, md) in &raw {
            if !md.is_dir() && md.nlink() > 1 {
                by_inode.entry((md.dev(), md.ino())).or_default().push(p);
            }
        }
        let mut entries = BTreeMap::new();
        for (p, md) in &raw {
            let full = root.join(p);
            let ft = md.file_type();
            let kind = if ft.is_file() {
                Kind::File
            } else if ft.is_dir() {
                Kind::Dir
            } else if ft.is_symlink() {
                Kind::Symlink
            } else if ft.is_char_device() {
                Kind::CharDevice
            } else if ft.is_block_device() {
                Kind::BlockDevice
            } else if ft.is_fifo() {
                Kind::Fifo
            } else {
                Kind::Socket
            };
            let sha256 = (kind == Kind::File).then(|| {
                let bytes =
                    std::fs::read(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()));
                sha256_hex(&bytes)
            });
            let target = (kind == Kind::Symlink).then(|| {
                std::fs::read_link(&full)
                    .unwrap_or_else(|e| panic!("readlink {}: {e}", full.display()))
                    .to_string_lossy()
                    .into_owned()
            });
            let rdev = matches!(kind, Kind::CharDevice | Kind::BlockDevice).then(|| {
                let d = md.rdev();
                (rustix::fs::major(d), rustix::fs::minor(d))
            });
            let link_group = by_inode
                .get(&(md.dev(), md.ino()))
                .filter(|g| g.len() > 1)
                .map(|g| g[0].to_string());
            let mut xattrs = BTreeMap::new();
            let names = xattr::list(&full)
                .unwrap_or_else(|e| panic!("list xattrs of {}: {e}", full.display()));
            for name in names {
                let name = name.to_string_lossy().into_owned();
                if !name.starts_with("user.") {
                    continue;
                }
                let v = xattr::get(&full, &name)
                    .unwrap_or_else(|e| panic!("xattr {name} of {}: {e}", full.display()))
                    .unwrap_or_default();
                xattrs.insert(name, v);
            }
            entries.insert(
                p.clone(),
                Node {
                    kind,
                    mode: md.permissions().mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    size: if kind == Kind::File { md.len() } else { 0 },
                    sha256,
                    target,
                    rdev,
                    mtime: (kind != Kind::Dir).then(|| md.mtime()),
                    link_group,
                    xattrs,
                },
            );
        }
        Tree { entries }
    }

    /// The entry at `path` (relative, e.g. `data/hello.txt`).
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.entries.get(path)
    }

    /// True if the tree has an entry at `path`.
    pub fn has(&self, path: &str) -> bool {
        self.entries.contains_key(path)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if the tree has no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Without mtimes (for comparing with storage that does not keep them).
    pub fn without_mtimes(mut self) -> Tree {
        for n in self.entries.values_mut() {
            n.mtime = None;
        }
        self
    }

    /// The differences between `a` and `b`, one line per difference (`PATH: what`); empty when
    /// they are equal.
    pub fn diff(a: &Tree, b: &Tree) -> Vec<String> {
        let mut out = Vec::new();
        let paths: std::collections::BTreeSet<&String> =
            a.entries.keys().chain(b.entries.keys()).collect();
        for p in paths {
            match (a.entries.get(p), b.entries.get(p)) {
                (Some(x), None) => out.push(format!("{p}: {} only in the first tree", x.kind)),
                (None, Some(y)) => out.push(format!("{p}: {} only in the second tree", y.kind)),
                (Some(x), Some(y)) => diff_node(p, x, y, &mut out),
                (None, None) => {}
            }
        }
        out
    }

    /// Panic with the differences (labelled) unless `a` and `b` are equal.
    pub fn assert_same(label_a: &str, a: &Tree, label_b: &str, b: &Tree) {
        let d = Tree::diff(a, b);
        assert!(
            d.is_empty(),
            "{label_a} ({} entries, first tree) and {label_b} ({} entries, second tree) differ \
             in {} ways:\n  {}",
            a.len(),
            b.len(),
            d.len(),
            d.iter().take(60).cloned().collect::<Vec<_>>().join("\n  ")
        );
    }
}

fn diff_node(p: &str, x: &Node, y: &Node, out: &mut Vec<String>) {
    if x.kind != y.kind {
        out.push(format!("{p}: {} vs {}", x.kind, y.kind));
        return;
    }
    if x.mode != y.mode {
        out.push(format!("{p}: mode {:04o} vs {:04o}", x.mode, y.mode));
    }
    if (x.uid, x.gid) != (y.uid, y.gid) {
        out.push(format!(
            "{p}: owner {}:{} vs {}:{}",
            x.uid, x.gid, y.uid, y.gid
        ));
    }
    if x.size != y.size {
        out.push(format!("{p}: size {} vs {}", x.size, y.size));
    } else if x.sha256 != y.sha256 {
        out.push(format!("{p}: contents differ (same size {})", x.size));
    }
    if x.target != y.target {
        out.push(format!("{p}: target {:?} vs {:?}", x.target, y.target));
    }
    if x.rdev != y.rdev {
        out.push(format!("{p}: device {:?} vs {:?}", x.rdev, y.rdev));
    }
    if x.mtime != y.mtime {
        out.push(format!("{p}: mtime {:?} vs {:?}", x.mtime, y.mtime));
    }
    if x.link_group != y.link_group {
        out.push(format!(
            "{p}: hardlink group {:?} vs {:?}",
            x.link_group, y.link_group
        ));
    }
    if x.xattrs != y.xattrs {
        let show = |m: &BTreeMap<String, Vec<u8>>| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", show_bytes(v)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        out.push(format!(
            "{p}: xattrs [{}] vs [{}]",
            show(&x.xattrs),
            show(&y.xattrs)
        ));
    }
}

/// `umoci unpack --image LAYOUT:TAG BUNDLE` (as root, so owners and device nodes are kept):
/// the reference root file system, `BUNDLE/rootfs`, which is returned. `bundle` must not exist.
/// `None` (skipped) without umoci.
pub fn reference_unpack(layout: &Path, tag: &str, bundle: &Path) -> Option<PathBuf> {
    if !require_tool("umoci") {
        return None;
    }
    run_ok(
        tool("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{tag}", layout.display()))
            .arg(bundle),
    );
    Some(bundle.join("rootfs"))
}

/// Apply the layers of `image` in order into `dir` (created if needed), with [`apply_layer`].
pub fn apply_layers(image: &Image, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    for (i, l) in image.layers.iter().enumerate() {
        let bytes = match image.compression {
            Compression::None => l.tar(),
            Compression::Gzip => l.tar_gz(),
        };
        apply_layer(&bytes, dir)
            .unwrap_or_else(|e| panic!("apply layer {} of {}: {e:#}", i + 1, image.name));
    }
}

/// Apply one layer (a tar stream, plain or gzip) onto the tree in `dir`, as the OCI image spec
/// says: whiteouts delete, an opaque marker empties its folder of what lower layers put there
/// (entries of this layer stay, wherever they are in the tar), a folder over a folder keeps the
/// contents and takes the new metadata, anything else replaces what was there. Owners, modes
/// (with setuid), device nodes, `SCHILY.xattr.*` records and mtimes are kept.
pub fn apply_layer(tar_bytes: &[u8], dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let plain: Vec<u8> = if tar_bytes.starts_with(&[0x1f, 0x8b]) {
        let mut v = Vec::new();
        flate2::read::GzDecoder::new(tar_bytes)
            .read_to_end(&mut v)
            .context("gunzip the layer")?;
        v
    } else {
        tar_bytes.to_vec()
    };
    let mut archive = tar::Archive::new(plain.as_slice());
    // Paths this layer wrote: an opaque marker keeps them.
    let mut written: HashSet<PathBuf> = HashSet::new();
    let mut opaque: Vec<PathBuf> = Vec::new();
    for entry in archive.entries().context("read the tar")? {
        let mut entry = entry.context("read a tar entry")?;
        let raw_path = entry.path().context("entry path")?.into_owned();
        let rel = normalize(&raw_path)?;
        if rel.as_os_str().is_empty() {
            continue; // the root itself
        }
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if name == ".wh..wh..opq" {
            opaque.push(parent);
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let victim = dir.join(&parent).join(hidden);
            remove_any(&victim)?;
            continue;
        }
        let target = dir.join(&rel);
        let h = entry.header().clone();
        let et = h.entry_type();
        // Parents missing in lower layers and this one: plain 0755 folders.
        std::fs::create_dir_all(dir.join(&parent))
            .with_context(|| format!("create the parents of {}", rel.display()))?;
        if let Ok(md) = std::fs::symlink_metadata(&target)
            && !(md.is_dir() && et == tar::EntryType::Directory)
        {
            remove_any(&target)?;
        }
        let mode = h.mode().context("mode")? & 0o7777;
        let uid = u32::try_from(h.uid().context("uid")?).context("uid")?;
        let gid = u32::try_from(h.gid().context("gid")?).context("gid")?;
        let mtime = h.mtime().context("mtime")?;
        let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(exts) = entry.pax_extensions().context("PAX records")? {
            for ext in exts {
                let ext = ext.context("a PAX record")?;
                if let Ok(k) = ext.key()
                    && let Some(name) = k.strip_prefix("SCHILY.xattr.")
                {
                    xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
                }
            }
        }
        let what = || format!("{} ({et:?})", rel.display());
        let mut is_link = false;
        match et {
            tar::EntryType::Directory => {
                if !target.is_dir() {
                    std::fs::create_dir(&target).with_context(what)?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut data = Vec::new();
                entry.read_to_end(&mut data).with_context(what)?;
                std::fs::write(&target, data).with_context(what)?;
            }
            tar::EntryType::Symlink => {
                let to = entry
                    .link_name()
                    .with_context(what)?
                    .context("no link name")?;
                std::os::unix::fs::symlink(&*to, &target).with_context(what)?;
                is_link = true;
            }
            tar::EntryType::Link => {
                let to = entry
                    .link_name()
                    .with_context(what)?
                    .context("no link name")?;
                let src = dir.join(normalize(&to)?);
                std::fs::hard_link(&src, &target).with_context(what)?;
                written.insert(rel.clone());
                continue; // a hard link shares the metadata of its inode
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let ft = match et {
                    tar::EntryType::Char => rustix::fs::FileType::CharacterDevice,
                    tar::EntryType::Block => rustix::fs::FileType::BlockDevice,
                    _ => rustix::fs::FileType::Fifo,
                };
                let (major, minor) = if et == tar::EntryType::Fifo {
                    (0, 0)
                } else {
                    (
                        h.device_major().with_context(what)?.unwrap_or(0),
                        h.device_minor().with_context(what)?.unwrap_or(0),
                    )
                };
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &target,
                    ft,
                    rustix::fs::Mode::from_raw_mode(0o600),
                    rustix::fs::makedev(major, minor),
                )
                .with_context(what)?;
            }
            other => anyhow::bail!("{}: unsupported tar entry type {other:?}", rel.display()),
        }
        std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).with_context(what)?;
        if !is_link {
            // After chown, which clears setuid.
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                .with_context(what)?;
        }
        for (k, v) in &xattrs {
            xattr::set(&target, k, v).with_context(|| format!("{}: xattr {k}", what()))?;
        }
        let t = filetime::FileTime::from_unix_time(i64::try_from(mtime).context("mtime")?, 0);
        filetime::set_symlink_file_times(&target, t, t).with_context(what)?;
        written.insert(rel);
    }
    for d in opaque {
        clear_lower(dir, &d, &written)?;
    }
    Ok(())
}

/// `path` relative, without `.` components; `..` is refused.
fn normalize(path: &Path) -> anyhow::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::CurDir | std::path::Component::RootDir => {}
            other => anyhow::bail!("{}: unexpected component {other:?}", path.display()),
        }
    }
    Ok(out)
}

fn remove_any(p: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    match std::fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
    .with_context(|| format!("remove {}", p.display()))
}

/// Remove below `rel` (relative to `root`) everything this layer did not write.
fn clear_lower(root: &Path, rel: &Path, written: &HashSet<PathBuf>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let dir = root.join(rel);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("read {}", dir.display())),
    };
    for ent in rd {
        let ent = ent.with_context(|| format!("read {}", dir.display()))?;
        let child = rel.join(ent.file_name());
        if !written.contains(&child) {
            remove_any(&root.join(&child))?;
        } else if ent.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            clear_lower(root, &child, written)?;
        }
    }
    Ok(())
}
