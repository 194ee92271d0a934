//! The layer applier against hand-built layers: the exact tree after several layers (types,
//! modes, owners, symlink targets, hardlinks, xattrs, devices, contents, whiteouts, opaque
//! directories with the marker before and after the layer's own entries), GNU tar as an oracle
//! for a layer without whiteouts, and escapes that must be refused with a canary directory
//! outside the root left as it was. Runs as root (owners, device nodes, `trusted.*`).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use tar::{EntryType, Header};
use thinpool_images::{ApplyStats, ErrorKind, apply_layer};

const T1: u64 = 1_600_000_000;
const T2: u64 = 1_650_000_000;
const T3: u64 = 1_700_000_000;

fn is_root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    thinpool_testkit::skip_or_fail("the layer applier tests need root (owners, mknod, trusted.*)");
    false
}

/// A layer tar built in memory.
struct Layer {
    builder: tar::Builder<Vec<u8>>,
    mtime: u64,
}

impl Layer {
    fn new(mtime: u64) -> Self {
        Layer {
            builder: tar::Builder::new(Vec::new()),
            mtime,
        }
    }

    fn header(&self, kind: EntryType, mode: u32, uid: u64, gid: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(self.mtime);
        h.set_size(0);
        h
    }

    fn put(&mut self, mut h: Header, path: &str, data: &[u8]) -> &mut Self {
        h.set_size(data.len() as u64);
        self.builder.append_data(&mut h, path, data).unwrap();
        self
    }

    fn xattrs(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let records: Vec<(String, &[u8])> = records
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        self.builder
            .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
        self
    }

    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let h = self.header(EntryType::Directory, mode, 0, 0);
        self.put(h, path, b"")
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.file_owned(path, mode, 0, 0, data)
    }

    fn file_owned(&mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> &mut Self {
        let h = self.header(EntryType::Regular, mode, uid, gid);
        self.put(h, path, data)
    }

    fn link(&mut self, kind: EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = self.header(kind, 0o777, 0, 0);
        self.builder.append_link(&mut h, path, target).unwrap();
        self
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(EntryType::Symlink, path, target)
    }

    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(EntryType::Link, path, target)
    }

    fn node(
        &mut self,
        kind: EntryType,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> &mut Self {
        let mut h = self.header(kind, mode, 0, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.put(h, path, b"")
    }

    fn whiteout(&mut self, path: &str) -> &mut Self {
        self.file(path, 0o644, b"")
    }

    /// An entry whose name (and link name) bytes are written as they are, bypassing the
    /// builder's own path checks, to craft hostile layers.
    fn raw(&mut self, kind: EntryType, name: &str, link: &str, data: &[u8]) -> &mut Self {
        let mut h = self.header(kind, 0o644, 0, 0);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        builder.into_inner().unwrap()
    }
}

/// One line per object below `root`: path, type, mode, owner, then what the type has (content,
/// link count, symlink target, device numbers), xattrs, and the mtime (directories only when
/// `dir_times`).
fn describe(root: &Path, dir_times: bool) -> String {
    let mut lines = BTreeMap::new();
    walk(root, root, dir_times, &mut lines);
    let mut out = String::new();
    for line in lines.values() {
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn walk(root: &Path, path: &Path, dir_times: bool, lines: &mut BTreeMap<String, String>) {
    let md = fs::symlink_metadata(path).unwrap();
    let rel = path
        .strip_prefix(root)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let rel = if rel.is_empty() { ".".into() } else { rel };
    let ft = md.file_type();
    let mut line = format!("{rel} ");
    let kind = if ft.is_dir() {
        "d"
    } else if ft.is_symlink() {
        "l"
    } else if ft.is_file() {
        "f"
    } else if ft.is_char_device() {
        "c"
    } else if ft.is_block_device() {
        "b"
    } else if ft.is_fifo() {
        "p"
    } else {
        "?"
    };
    line += &format!(
        "{kind} {:04o} {}:{}",
        md.mode() & 0o7777,
        md.uid(),
        md.gid()
    );
    if ft.is_symlink() {
        line = format!("{rel} l {}:{}", md.uid(), md.gid());
        line += &format!(" -> {}", fs::read_link(path).unwrap().display());
    } else if ft.is_file() {
        let data = fs::read(path).unwrap();
        if data.len() <= 32 {
            line += &format!(" {:?}", String::from_utf8_lossy(&data));
        } else {
            let sum: u64 = data.iter().map(|&b| u64::from(b)).sum();
            line += &format!(" len={} sum={sum}", data.len());
        }
        line += &format!(" nlink={}", md.nlink());
    } else if ft.is_char_device() || ft.is_block_device() {
        let rdev = md.rdev();
        line += &format!(
            " dev={}:{}",
            rustix::fs::major(rdev),
            rustix::fs::minor(rdev)
        );
    }
    let mut names = [0u8; 4096];
    let n = rustix::fs::llistxattr(path, &mut names[..]).unwrap();
    let mut keys: Vec<&[u8]> = names[..n]
        .split(|&b| b == 0)
        .filter(|k| !k.is_empty())
        .collect();
    keys.sort();
    for key in keys {
        let mut value = [0u8; 4096];
        let len =
            rustix::fs::lgetxattr(path, std::ffi::OsStr::from_bytes(key), &mut value[..]).unwrap();
        line += &format!(
            " x[{}={:?}]",
            String::from_utf8_lossy(key),
            String::from_utf8_lossy(&value[..len])
        );
    }
    if !ft.is_dir() || dir_times {
        line += &format!(" t={}", md.mtime());
    }
    lines.insert(rel, line);
    if ft.is_dir() {
        for child in fs::read_dir(path).unwrap() {
            walk(root, &child.unwrap().path(), dir_times, lines);
        }
    }
}

fn apply(root: &Path, layer: &[u8]) -> thinpool_images::Result<ApplyStats> {
    apply_layer(root, layer)
}

/// The base layer: every entry type, special modes, owners, xattrs, a sparse file.
fn layer1() -> Vec<u8> {
    let mut sparse = vec![0u8; 1 << 20];
    sparse.extend_from_slice(b"end");
    let mut l = Layer::new(T1);
    l.dir("./", 0o755)
        .dir("etc/", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0")
        .file("etc/hosts", 0o644, b"127.0.0.1 localhost")
        .dir("etc/dir/", 0o750)
        .file("etc/dir/a", 0o600, b"a")
        .dir("etc/dir/b/", 0o755)
        .file("etc/dir/b/c", 0o644, b"c")
        .dir("usr/", 0o755)
        .dir("usr/bin/", 0o755)
        .file("usr/bin/su", 0o4755, b"#!su")
        .file("usr/bin/wall", 0o2755, b"#!wall")
        .hardlink("usr/bin/su-hl", "usr/bin/su")
        .dir("usr/lib/", 0o755)
        .symlink("usr/lib64", "lib")
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .dir("tmp/", 0o1777)
        .dir("home/", 0o755)
        .dir("home/u/", 0o700);
    l.xattrs(&[("user.note", b"hello"), ("trusted.t", b"\x01\x02")])
        .file_owned("home/u/file", 0o640, 1000, 1001, b"user data");
    l.xattrs(&[(
        "security.capability",
        b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
    )])
    .file("usr/bin/ping", 0o755, b"#!ping");
    l.xattrs(&[("trusted.dir", b"d")]).dir("var/", 0o755);
    l.dir("var/opq/", 0o755)
        .file("var/opq/old1", 0o644, b"old1")
        .dir("var/opq/sub/", 0o755)
        .file("var/opq/sub/deep", 0o644, b"deep")
        .dir("var/opq2/", 0o755)
        .file("var/opq2/old", 0o644, b"old")
        .dir("var/opq2/sub/", 0o755)
        .file("var/opq2/sub/lower", 0o644, b"lower")
        .file("var/sparse", 0o644, &sparse)
        .dir("dev/", 0o755)
        .node(EntryType::Char, "dev/null", 0o666, 1, 3)
        .node(EntryType::Block, "dev/sda", 0o660, 8, 0)
        .dir("run/", 0o755)
        .node(EntryType::Fifo, "run/fifo", 0o600, 0, 0);
    l.finish()
}

/// Whiteouts, opaque directories (marker before and after the new entries), replacements.
fn layer2() -> Vec<u8> {
    let mut l = Layer::new(T2);
    l.dir("etc/", 0o755)
        .whiteout("etc/.wh.passwd")
        .whiteout("etc/.wh.dir")
        .whiteout("etc/.wh.nothing-there")
        .whiteout("nowhere/.wh.x")
        .whiteout("etc/hosts/.wh.x")
        .symlink("etc/hosts", "hosts.real")
        .file("etc/hosts.real", 0o644, b"10.0.0.1 box")
        // Added by this layer, then whited out by it: the whiteout hides lower layers only.
        .file("etc/same", 0o644, b"same layer")
        .whiteout("etc/.wh.same")
        // Opaque marker first, then the new content.
        .dir("var/opq/", 0o711)
        .whiteout("var/opq/.wh..wh..opq")
        .file("var/opq/new", 0o644, b"new")
        // New content first (one file one level down, in a lower directory), marker last.
        .file("var/opq2/new1", 0o644, b"new1")
        .dir("var/opq2/sub/", 0o755)
        .file("var/opq2/sub/x", 0o644, b"x")
        .whiteout("var/opq2/.wh..wh..opq")
        .dir("var/opq2/", 0o755)
        // A symlink replaced by a directory, a file's metadata changed.
        .dir("usr/lib64/", 0o755)
        .file_owned("home/u/file", 0o600, 1002, 1003, b"new data")
        .file("implicit/parent/file", 0o644, b"parents made 0755");
    l.finish()
}

/// A file back where a whiteout was, a file replacing a directory tree, the root whited out
/// of a directory it just listed.
fn layer3() -> Vec<u8> {
    let mut l = Layer::new(T3);
    l.file("etc/passwd", 0o600, b"root:x:0:0:again")
        .file("var/opq", 0o644, b"now a file")
        .dir("run/", 0o755)
        .whiteout("run/.wh.fifo")
        .whiteout("dev/.wh..wh..opq");
    l.finish()
}

#[test]
fn three_layers_give_the_exact_tree() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let s1 = apply(root, &layer1()).unwrap();
    assert_eq!(s1.whiteouts, 0);
    assert_eq!(
        s1.bytes,
        (1 << 20) + 3 + 10 + 19 + 1 + 1 + 4 + 6 + 9 + 6 + 4 + 4 + 3 + 5
    );
    let s2 = apply(root, &layer2()).unwrap();
    assert_eq!(
        s2,
        ApplyStats {
            entries: 21,
            bytes: 12 + 10 + 3 + 4 + 1 + 8 + 17,
            whiteouts: 8
        }
    );
    let s3 = apply(root, &layer3()).unwrap();
    assert_eq!(s3.whiteouts, 2);

    let expected = format!(
        "\
. d 0755 0:0
dev d 0755 0:0
etc d 0755 0:0
etc/hosts l 0:0 -> hosts.real t={T2}
etc/hosts.real f 0644 0:0 \"10.0.0.1 box\" nlink=1 t={T2}
etc/localtime l 0:0 -> /usr/share/zoneinfo/UTC t={T1}
etc/passwd f 0600 0:0 \"root:x:0:0:again\" nlink=1 t={T3}
etc/same f 0644 0:0 \"same layer\" nlink=1 t={T2}
home d 0755 0:0
home/u d 0700 0:0
home/u/file f 0600 1002:1003 \"new data\" nlink=1 t={T2}
implicit d 0755 0:0
implicit/parent d 0755 0:0
implicit/parent/file f 0644 0:0 \"parents made 0755\" nlink=1 t={T2}
run d 0755 0:0
tmp d 1777 0:0
usr d 0755 0:0
usr/bin d 0755 0:0
usr/bin/ping f 0755 0:0 \"#!ping\" nlink=1 x[security.capability=\"\\u{{1}}\\0\\0\\u{{2}}\\0 \\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\"] t={T1}
usr/bin/su f 4755 0:0 \"#!su\" nlink=2 t={T1}
usr/bin/su-hl f 4755 0:0 \"#!su\" nlink=2 t={T1}
usr/bin/wall f 2755 0:0 \"#!wall\" nlink=1 t={T1}
usr/lib d 0755 0:0
usr/lib64 d 0755 0:0
var d 0755 0:0 x[trusted.dir=\"d\"]
var/opq f 0644 0:0 \"now a file\" nlink=1 t={T3}
var/opq2 d 0755 0:0
var/opq2/new1 f 0644 0:0 \"new1\" nlink=1 t={T2}
var/opq2/sub d 0755 0:0
var/opq2/sub/x f 0644 0:0 \"x\" nlink=1 t={T2}
var/sparse f 0644 0:0 len=1048579 sum={} nlink=1 t={T1}
",
        u64::from(b'e') + u64::from(b'n') + u64::from(b'd')
    );
    let got = describe(root, false);
    assert_eq!(got, expected, "\n--- got\n{got}--- expected\n{expected}");

    // Hardlinks share the inode.
    let a = fs::metadata(root.join("usr/bin/su")).unwrap();
    let b = fs::metadata(root.join("usr/bin/su-hl")).unwrap();
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
    // The sparse file's zeros were not written.
    let sparse = fs::metadata(root.join("var/sparse")).unwrap();
    assert!(
        sparse.blocks() * 512 < 64 * 1024,
        "{} blocks",
        sparse.blocks()
    );
    // Directories' mtimes are the headers', set after their content was written.
    let mtime = |p: &str| fs::symlink_metadata(root.join(p)).unwrap().mtime() as u64;
    assert_eq!(mtime("var/opq2"), T2);
    assert_eq!(mtime("usr/bin"), T1);
    assert_eq!(mtime("run"), T3);
    assert_eq!(mtime("home"), T1);
}

#[test]
fn layer1_devices_and_xattrs_before_whiteouts() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    apply(tmp.path(), &layer1()).unwrap();
    let got = describe(tmp.path(), true);
    for line in [
        format!("dev/null c 0666 0:0 dev=1:3 t={T1}"),
        format!("dev/sda b 0660 0:0 dev=8:0 t={T1}"),
        format!("run/fifo p 0600 0:0 t={T1}"),
        format!(
            "home/u/file f 0640 1000:1001 \"user data\" nlink=1 x[trusted.t=\"\\u{{1}}\\u{{2}}\"] x[user.note=\"hello\"] t={T1}"
        ),
        format!("etc/dir d 0750 0:0 t={T1}"),
        format!(". d 0755 0:0 t={T1}"),
        format!("etc d 0755 0:0 t={T1}"),
        format!("usr/bin d 0755 0:0 t={T1}"),
    ] {
        assert!(got.lines().any(|l| l == line), "missing {line:?} in\n{got}");
    }
}

#[test]
fn gnu_tar_extracts_the_same_tree() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ours = tmp.path().join("ours");
    let theirs = tmp.path().join("theirs");
    fs::create_dir(&ours).unwrap();
    fs::create_dir(&theirs).unwrap();
    let layer = layer1();
    let tar_file = tmp.path().join("layer.tar");
    fs::write(&tar_file, &layer).unwrap();
    apply(&ours, &layer).unwrap();
    let status = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
        .arg(&tar_file)
        .arg("-C")
        .arg(&theirs)
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => {
            thinpool_testkit::skip_or_fail(&format!("GNU tar could not extract: {other:?}"));
            return;
        }
    }
    // Directories' mtimes are left out: GNU tar creates symlinks and hardlinks late (its
    // "delayed links"), after it has set some of their directories' mtimes; ours are checked
    // against the headers in `layer1_devices_and_xattrs_before_whiteouts`.
    assert_eq!(describe(&ours, false), describe(&theirs, false));
}

#[test]
fn gzip_layers_are_detected() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (plain, gz) = (tmp.path().join("plain"), tmp.path().join("gz"));
    fs::create_dir(&plain).unwrap();
    fs::create_dir(&gz).unwrap();
    let layer = layer1();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&layer).unwrap();
    let packed = enc.finish().unwrap();
    assert_eq!(apply(&plain, &layer).unwrap(), apply(&gz, &packed).unwrap());
    assert_eq!(describe(&plain, true), describe(&gz, true));
}

#[test]
fn truncated_or_garbage_layers_are_errors() {
    if !is_root() {
        return;
    }
    let layer = layer1();
    let tmp = tempfile::tempdir().unwrap();
    // A stride over the whole stream: cuts in headers, in contents, between entries.
    let cuts: Vec<usize> = (0..layer.len()).step_by(1531).collect();
    let mut errors = 0;
    for (i, &cut) in cuts.iter().enumerate() {
        let root = tmp.path().join(format!("r{i}"));
        fs::create_dir(&root).unwrap();
        if apply(&root, &layer[..cut]).is_err() {
            errors += 1;
        }
        fs::remove_dir_all(&root).unwrap();
    }
    assert!(
        errors > cuts.len() / 2,
        "{errors} errors for {} cuts",
        cuts.len()
    );
    // A cut in the middle of a file's content names that file.
    let pos = layer.windows(10).position(|w| w == b"var/sparse").unwrap();
    let root = tmp.path().join("mid");
    fs::create_dir(&root).unwrap();
    let err = apply(&root, &layer[..pos + 512 + 4096]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("var/sparse"), "{err}");
    // Garbage.
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert!(apply(&root, &garbage[..]).is_err());
}

#[test]
fn unsupported_entry_types_are_refused() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut l = Layer::new(T1);
    l.raw(EntryType::new(b'V'), "sub/volume", "", b"");
    let err = apply(tmp.path(), &l.finish()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("sub/volume"), "{err}");
    // Refused before its parent was created.
    assert!(!tmp.path().join("sub").exists());
}

/// A root and, beside it, a canary directory that no layer may touch.
struct Sandbox {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
    outside: std::path::PathBuf,
    before: String,
}

impl Sandbox {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("canary"), b"tweet").unwrap();
        fs::create_dir(outside.join("nest")).unwrap();
        fs::write(outside.join("nest/egg"), b"egg").unwrap();
        let before = describe(&outside, true);
        Sandbox {
            _tmp: tmp,
            root,
            outside,
            before,
        }
    }

    fn out(&self) -> String {
        self.outside.to_str().unwrap().to_owned()
    }

    fn assert_untouched(&self) {
        assert_eq!(
            describe(&self.outside, true),
            self.before,
            "the canary changed"
        );
    }

    /// Applies `layer`, expects a path-traversal error naming `entry`, checks the canary.
    fn refuse(&self, layer: &[u8], entry: &str) {
        let err = apply(&self.root, layer).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PathTraversal, "{err}");
        assert!(
            err.to_string().contains(entry),
            "{err} does not name {entry}"
        );
        self.assert_untouched();
    }
}

#[test]
fn dotdot_and_absolute_paths_are_refused() {
    if !is_root() {
        return;
    }
    let sb = Sandbox::new();
    let out = sb.out();
    for (kind, name) in [
        (EntryType::Regular, "../outside/pwned".to_owned()),
        (EntryType::Regular, "a/../../outside/pwned".to_owned()),
        (EntryType::Regular, format!("{out}/pwned")),
        (EntryType::Directory, format!("{out}/nest/")),
        (EntryType::Regular, "../outside/.wh.canary".to_owned()),
        (EntryType::Regular, format!("{out}/.wh..wh..opq")),
        (EntryType::Regular, ".wh...".to_owned()),
    ] {
        let mut l = Layer::new(T1);
        l.raw(kind, &name, "", b"pwned");
        sb.refuse(&l.finish(), &name);
    }
}

#[test]
fn symlinks_in_the_path_are_never_followed() {
    if !is_root() {
        return;
    }
    let sb = Sandbox::new();
    let out = sb.out();
    // A symlink to outside, then entries through it, in the same layer.
    for (link, through) in [
        (out.clone(), "evil/pwned"),
        ("../outside".to_owned(), "evil/pwned"),
        (out.clone(), "evil/nest/egg"),
        (out.clone(), "evil/.wh.canary"),
        (out.clone(), "evil/nest/.wh..wh..opq"),
        (out.clone(), "evil/new/dir/file"),
    ] {
        let mut l = Layer::new(T1);
        l.symlink("evil", &link).file(through, 0o644, b"pwned");
        sb.refuse(&l.finish(), through);
    }
}

#[test]
fn symlinks_from_a_lower_layer_are_never_followed() {
    if !is_root() {
        return;
    }
    let sb = Sandbox::new();
    let out = sb.out();
    let mut l1 = Layer::new(T1);
    l1.dir("d/", 0o755)
        .symlink("d/evil", &out)
        .symlink("rel", "d/../../outside");
    apply(&sb.root, &l1.finish()).unwrap();
    for entry in [
        "d/evil/pwned",
        "d/evil/canary",
        "d/evil/nest/",
        "d/evil/.wh.canary",
        "d/evil/.wh.nest",
        "d/evil/.wh..wh..opq",
        "rel/canary",
        "rel/.wh.canary",
    ] {
        let mut l2 = Layer::new(T2);
        if entry.ends_with('/') {
            l2.dir(entry, 0o700);
        } else {
            l2.file(entry, 0o600, b"pwned");
        }
        sb.refuse(&l2.finish(), entry.trim_end_matches('/'));
    }
}

#[test]
fn hardlinks_to_outside_are_refused() {
    if !is_root() {
        return;
    }
    let sb = Sandbox::new();
    let out = sb.out();
    let mut l1 = Layer::new(T1);
    l1.symlink("evil", &out);
    apply(&sb.root, &l1.finish()).unwrap();
    for target in [
        "/etc/passwd".to_owned(),
        "../outside/canary".to_owned(),
        format!("{out}/canary"),
        "a/../../outside/canary".to_owned(),
        "evil/canary".to_owned(),
    ] {
        let mut l = Layer::new(T2);
        l.raw(EntryType::Link, "hl", &target, b"");
        sb.refuse(&l.finish(), "hl");
        assert!(!sb.root.join("hl").exists());
    }
    // A hardlink to what is not there is an I/O error, not a panic.
    let mut l = Layer::new(T2);
    l.hardlink("hl", "missing");
    let err = apply(&sb.root, &l.finish()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    sb.assert_untouched();
}

#[test]
fn entries_replace_a_symlink_instead_of_writing_through_it() {
    if !is_root() {
        return;
    }
    let sb = Sandbox::new();
    let out = sb.out();
    let mut l1 = Layer::new(T1);
    l1.symlink("f", &format!("{out}/canary"))
        .symlink("d", &format!("{out}/nest"))
        .symlink("n", &format!("{out}/canary"))
        .symlink("h", &format!("{out}/canary"))
        .symlink("s", &format!("{out}/canary"))
        .file("real", 0o644, b"real");
    apply(&sb.root, &l1.finish()).unwrap();
    let mut l2 = Layer::new(T2);
    l2.file("f", 0o600, b"replaced")
        .dir("d/", 0o700)
        .node(EntryType::Fifo, "n", 0o600, 0, 0)
        .hardlink("h", "real")
        .symlink("s", "elsewhere");
    l2.xattrs(&[("trusted.x", b"y")])
        .symlink("s2", &format!("{out}/canary"));
    apply(&sb.root, &l2.finish()).unwrap();
    sb.assert_untouched();
    let got = describe(&sb.root, false);
    for line in [
        format!("f f 0600 0:0 \"replaced\" nlink=1 t={T2}"),
        "d d 0700 0:0".to_owned(),
        format!("n p 0600 0:0 t={T2}"),
        format!("h f 0644 0:0 \"real\" nlink=2 t={T1}"),
        format!("s l 0:0 -> elsewhere t={T2}"),
        format!("s2 l 0:0 -> {out}/canary x[trusted.x=\"y\"] t={T2}"),
    ] {
        assert!(got.lines().any(|l| l == line), "missing {line:?} in\n{got}");
    }
}

/// Runs GNU tar in `dir` with `args`; `None` (skipped) when it cannot.
fn gnu_tar(dir: &Path, args: &[&str]) -> Option<()> {
    match Command::new("tar").current_dir(dir).args(args).status() {
        Ok(s) if s.success() => Some(()),
        other => {
            thinpool_testkit::skip_or_fail(&format!("GNU tar {args:?} failed: {other:?}"));
            None
        }
    }
}

#[test]
fn gnu_sparse_files_and_long_names_from_gnu_tar() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(140));
    fs::create_dir_all(src.join("d".repeat(120))).unwrap();
    fs::write(src.join(&long), b"long name").unwrap();
    let sparse = fs::File::create(src.join("sparse")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"middle", 3 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"end", (8 << 20) - 3).unwrap();
    drop(sparse);
    for format in ["gnu", "oldgnu"] {
        let Some(()) = gnu_tar(
            &src,
            &[
                "--sparse",
                &format!("--format={format}"),
                "-cf",
                "../layer.tar",
                ".",
            ],
        ) else {
            return;
        };
        let root = tmp.path().join(format!("root-{format}"));
        fs::create_dir(&root).unwrap();
        let layer = fs::read(tmp.path().join("layer.tar")).unwrap();
        let stats = apply(&root, &layer).unwrap();
        assert_eq!(stats.bytes, (8 << 20) + 9, "{format}");
        assert_eq!(fs::read(root.join(&long)).unwrap(), b"long name");
        let data = fs::read(root.join("sparse")).unwrap();
        assert_eq!(data, fs::read(src.join("sparse")).unwrap(), "{format}");
        let blocks = fs::metadata(root.join("sparse")).unwrap().blocks();
        assert!(blocks * 512 <= 64 << 10, "{format}: {blocks} blocks");
    }
    // PAX long names work; PAX sparse files (GNU.sparse.* records) the tar crate cannot
    // expand, so they are refused rather than written wrong.
    let Some(()) = gnu_tar(&src, &["--format=pax", "-cf", "../pax.tar", "."]) else {
        return;
    };
    let root = tmp.path().join("root-pax");
    fs::create_dir(&root).unwrap();
    apply(&root, &fs::read(tmp.path().join("pax.tar")).unwrap()[..]).unwrap();
    assert_eq!(fs::read(root.join(&long)).unwrap(), b"long name");
    let Some(()) = gnu_tar(
        &src,
        &["--format=pax", "--sparse", "-cf", "../pax-sparse.tar", "."],
    ) else {
        return;
    };
    let root = tmp.path().join("root-pax-sparse");
    fs::create_dir(&root).unwrap();
    let err = apply(
        &root,
        &fs::read(tmp.path().join("pax-sparse.tar")).unwrap()[..],
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
}

#[test]
fn old_style_directories_reserved_names_and_xattr_namespaces() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut l = Layer::new(T1);
    l.raw(EntryType::Regular, "olddir/", "", b"");
    l.dir(".wh..wh.plnk/", 0o700)
        .file(".wh..wh.plnk/123", 0o644, b"aufs")
        .whiteout("olddir/.wh..wh.aufs");
    l.xattrs(&[
        ("user.ok", b"1"),
        ("system.nope", b"2"),
        ("security.selinux", b"x"),
    ])
    .file("olddir/f", 0o644, b"f");
    let stats = apply(tmp.path(), &l.finish()).unwrap();
    assert_eq!(stats.entries, 5);
    assert_eq!(stats.whiteouts, 0);
    let got = describe(tmp.path(), false);
    assert!(!got.contains("wh."), "{got}");
    assert!(got.contains("olddir d 0644 0:0\n"), "{got}");
    assert!(
        got.contains(&format!(
            "olddir/f f 0644 0:0 \"f\" nlink=1 x[user.ok=\"1\"] t={T1}\n"
        )),
        "{got}"
    );
}

#[test]
fn mutated_layers_never_panic_nor_escape() {
    if !is_root() {
        return;
    }
    let sb = Sandbox::new();
    let out = sb.out();
    let mut l = Layer::new(T1);
    l.dir("a/", 0o755)
        .file("a/f", 0o644, b"file")
        .symlink("a/evil", &out)
        .symlink("a/rel", "../../outside")
        .hardlink("a/h", "a/f")
        .node(EntryType::Fifo, "a/p", 0o600, 0, 0)
        .whiteout("a/.wh.x")
        .whiteout("a/.wh..wh..opq");
    l.xattrs(&[("user.k", b"v")]).file("b/c", 0o600, b"c");
    let layer = l.finish();
    // The headers' offsets, so mutations can keep checksums valid and reach the applier.
    let mut headers = Vec::new();
    let mut off = 0;
    while off + 512 <= layer.len() && layer[off..off + 512].iter().any(|&b| b != 0) {
        headers.push(off);
        let size = Header::from_byte_slice(&layer[off..off + 512])
            .entry_size()
            .unwrap();
        off += 512 + (size as usize).div_ceil(512) * 512;
    }
    // A small deterministic generator: in a header's name, link name or type, write a random
    // byte, a '/', or "../", then fix the checksum; sometimes cut the stream.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut refused = 0;
    for case in 0..400 {
        let mut bytes = layer.clone();
        for _ in 0..1 + next() % 3 {
            let h = headers[(next() % headers.len() as u64) as usize];
            let field = match next() % 5 {
                0 | 1 => h + (next() % 100) as usize,
                2 | 3 => h + 157 + (next() % 100) as usize,
                _ => h + 156,
            };
            match next() % 3 {
                0 => bytes[field] = next() as u8,
                1 => bytes[field] = b'/',
                _ => bytes[field..field + 3].copy_from_slice(b"../"),
            }
            let mut header = Header::new_old();
            header.as_mut_bytes().copy_from_slice(&bytes[h..h + 512]);
            header.set_cksum();
            bytes[h..h + 512].copy_from_slice(header.as_bytes());
        }
        if next() % 8 == 0 {
            let cut = (next() % bytes.len() as u64) as usize;
            bytes.truncate(cut);
        }
        let root = sb.root.join(format!("{case}"));
        fs::create_dir(&root).unwrap();
        if let Err(e) = apply(&root, &bytes[..]) {
            refused += 1;
            let _ = e.to_string();
        }
        sb.assert_untouched();
    }
    eprintln!("{refused} of 400 mutated layers refused");
}

#[test]
fn a_root_that_is_not_a_directory_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("file");
    fs::write(&file, b"").unwrap();
    for root in [file, tmp.path().join("missing")] {
        let err = apply(&root, &Layer::new(T1).finish()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io, "{err}");
        assert!(err.to_string().contains(root.to_str().unwrap()), "{err}");
    }
}

#[test]
fn deep_paths_are_errors_not_stack_overflows() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // An entry 1025 components deep is refused before anything is created.
    let mut l = Layer::new(T1);
    l.file(&format!("{}f", "d/".repeat(1024)), 0o644, b"deep");
    let err = apply(tmp.path(), &l.finish()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(!tmp.path().join("d").exists());
    // 1000 is fine.
    let mut l = Layer::new(T1);
    l.file(&format!("{}f", "d/".repeat(999)), 0o644, b"deep");
    apply(tmp.path(), &l.finish()).unwrap();
    // A lower tree deeper than the applier descends: its whiteout is an error.
    fs::create_dir_all(tmp.path().join("e/".repeat(1100))).unwrap();
    let mut l = Layer::new(T2);
    l.whiteout(".wh.e").whiteout(".wh.d");
    let err = apply(tmp.path(), &l.finish()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(err.to_string().contains(".wh.e"), "{err}");
}
