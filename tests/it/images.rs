//! The image harness (`thinpool_tests::{images, tree, containerd}`) checked against the real
//! oracles, without thinpool: umoci unpacks our OCI layouts to what our own layer-by-layer apply
//! gives (whiteouts, opaque folders, hardlinks, xattrs, device nodes, setuid, owners); skopeo
//! accepts our docker save tarballs, OCI layouts and OCI archives; containerd (its own
//! `overlayfs` snapshotter) imports both kinds of tarball to the same tree, and `ctr run` runs
//! the busybox image.

use std::path::Path;

use thinpool_tests::containerd::Containerd;
use thinpool_tests::images::{self, BUSYBOX, Compression, Image, RICH};
use thinpool_tests::tree::{self, Kind, Tree};
use thinpool_tests::{Failures, require_tool, run_ok, scratch, text, tool};

/// Our own apply of `image` into `dir`, scanned.
fn own_tree(image: &Image, dir: &Path) -> Tree {
    tree::apply_layers(image, dir);
    Tree::scan(dir)
}

/// What the rich image must show, whoever unpacked it.
fn check_rich_effects(t: &Tree, who: &str) {
    let mut f = Failures::new();
    let node = |p: &str| t.get(p);
    for gone in [
        "gone-file",
        "gone-dir",
        "gone-dir/a",
        "opaque-dir/old1",
        "opaque-dir/old2",
        "opaque-dir/sub/old3",
    ] {
        f.check(&format!("{who}: {gone} whited out"), !t.has(gone));
    }
    f.check(
        &format!("{who}: no .wh. entry left"),
        !t.entries.keys().any(|p| p.contains(".wh.")),
    );
    for present in [
        "opaque-dir/new1",
        "opaque-dir/sub/new2",
        "becomes-dir/inside",
        "bin/sh",
    ] {
        f.check(&format!("{who}: {present} present"), t.has(present));
    }
    f.check(
        &format!("{who}: opaque-dir mode 0700 from layer 3"),
        node("opaque-dir").is_some_and(|n| n.kind == Kind::Dir && n.mode == 0o700),
    );
    f.check(
        &format!("{who}: becomes-dir is a folder"),
        node("becomes-dir").is_some_and(|n| n.kind == Kind::Dir),
    );
    f.check(
        &format!("{who}: data/hello.txt from layer 3"),
        node("data/hello.txt").and_then(|n| n.sha256.clone())
            == Some(images::sha256_hex(b"hello from layer 3\n")),
    );
    let a = node("data/link-a").and_then(|n| n.link_group.clone());
    f.check(
        &format!("{who}: data/link-a and link-b one inode ({a:?})"),
        a.is_some() && a == node("data/link-b").and_then(|n| n.link_group.clone()),
    );
    f.check(
        &format!("{who}: user.thinpool.test xattr"),
        node("data/xattr-file").is_some_and(|n| {
            n.xattrs.get("user.thinpool.test").map(Vec::as_slice) == Some(b"hello xattr".as_slice())
        }),
    );
    f.check(
        &format!("{who}: dev/mynull char device 1,3 mode 0666"),
        node("dev/mynull").is_some_and(|n| {
            n.kind == Kind::CharDevice && n.rdev == Some((1, 3)) && n.mode == 0o666
        }),
    );
    f.check(
        &format!("{who}: data/fifo a fifo"),
        node("data/fifo").is_some_and(|n| n.kind == Kind::Fifo),
    );
    f.check(
        &format!("{who}: data/setuid mode 4755"),
        node("data/setuid").is_some_and(|n| n.mode == 0o4755),
    );
    f.check(
        &format!("{who}: data/user-file 1000:1000 0640"),
        node("data/user-file").is_some_and(|n| (n.uid, n.gid, n.mode) == (1000, 1000, 0o640)),
    );
    f.check(
        &format!("{who}: tmp 1777"),
        node("tmp").is_some_and(|n| n.mode == 0o1777),
    );
    for (p, target) in [
        ("data/abs-link", "/etc/passwd"),
        ("data/rel-link", "hello.txt"),
        ("data/dangling", "does/not/exist"),
        ("bin/ls", "busybox"),
    ] {
        f.check(
            &format!("{who}: {p} -> {target}"),
            node(p).and_then(|n| n.target.as_deref()) == Some(target),
        );
    }
    f.check(
        &format!("{who}: var/lib/app/state mtime"),
        node("var/lib/app/state").and_then(|n| n.mtime) == Some(1_234_567_890),
    );
    f.check(
        &format!("{who}: data/big.bin 1 MiB + 3"),
        node("data/big.bin").is_some_and(|n| n.size == (1 << 20) + 3),
    );
    f.finish();
}

/// umoci's unpack of the rich image (gzip and plain layers) is our own apply, and shows every
/// effect the layers ask for.
#[test]
fn umoci_unpack_equals_own_apply() {
    let Some(img) = images::rich(RICH) else {
        return;
    };
    if !require_tool("umoci") {
        return;
    }
    let tmp = scratch();
    for c in [Compression::Gzip, Compression::None] {
        let img = img.clone().compression(c);
        let base = tmp.path().join(format!("{c:?}"));
        let layout = base.join("layout");
        img.write_oci_layout(&layout);
        let rootfs = tree::reference_unpack(&layout, img.tag(), &base.join("bundle"))
            .expect("umoci was found above");
        let theirs = Tree::scan(&rootfs);
        let ours = own_tree(&img, &base.join("own"));
        Tree::assert_same("umoci unpack", &theirs, "own apply", &ours);
        check_rich_effects(&ours, &format!("own apply ({c:?})"));
    }
}

/// Many small layers, each third one deleting what the previous one added.
#[test]
fn umoci_unpack_many_layers() {
    let Some(img) = images::many_layers("example.test/thinpool/many:v1", 12) else {
        return;
    };
    if !require_tool("umoci") {
        return;
    }
    let tmp = scratch();
    let layout = tmp.path().join("layout");
    img.write_oci_layout(&layout);
    let rootfs = tree::reference_unpack(&layout, "v1", &tmp.path().join("bundle"))
        .expect("umoci was found above");
    let theirs = Tree::scan(&rootfs);
    let ours = own_tree(&img, &tmp.path().join("own"));
    Tree::assert_same("umoci unpack", &theirs, "own apply", &ours);
    assert!(ours.has("layers/12") && !ours.has("layers/11") && ours.has("layers/10"));
    assert_eq!(
        ours.get("layers/top").and_then(|n| n.sha256.clone()),
        Some(images::sha256_hex(b"top is 12\n"))
    );
}

/// thinpool's own layer applier (`thinpool_images::apply_layer`, the engine of `image load`)
/// gives umoci's tree for the rich image (gzip and plain layers) and for twelve layers that
/// delete each other's files.
#[test]
fn thinpool_applier_equals_umoci_unpack() {
    let (Some(rich), Some(many)) = (
        images::rich(RICH),
        images::many_layers("example.test/thinpool/many:v1", 12),
    ) else {
        return;
    };
    if !require_tool("umoci") {
        return;
    }
    let tmp = scratch();
    let cases = [
        ("rich-gzip", rich.clone().compression(Compression::Gzip)),
        ("rich-plain", rich.compression(Compression::None)),
        ("many", many),
    ];
    for (name, img) in cases {
        let base = tmp.path().join(name);
        let layout = base.join("layout");
        img.write_oci_layout(&layout);
        let rootfs = tree::reference_unpack(&layout, img.tag(), &base.join("bundle"))
            .expect("umoci was found above");
        let ours = base.join("thinpool");
        std::fs::create_dir_all(&ours).unwrap();
        for (i, l) in img.layers.iter().enumerate() {
            let bytes = match img.compression {
                Compression::None => l.tar(),
                Compression::Gzip => l.tar_gz(),
            };
            let stats = thinpool_images::apply_layer(&ours, bytes.as_slice())
                .unwrap_or_else(|e| panic!("{name}: layer {}: {e}", i + 1));
            assert_eq!(
                stats.entries,
                l.entries.len() as u64,
                "{name}: layer {}",
                i + 1
            );
        }
        Tree::assert_same(
            "umoci unpack",
            &Tree::scan(&rootfs),
            "thinpool_images::apply_layer",
            &Tree::scan(&ours),
        );
    }
}

/// The tree scan and diff see what they should: equal trees give nothing, each kind of change
/// gives a line naming the path.
#[test]
fn tree_diff_reports_changes() {
    let tmp = scratch();
    let a = tmp.path().join("a");
    let img = Image::new("example.test/thinpool/small:latest").layer(images::rich_layer2());
    tree::apply_layers(&img, &a);
    let before = Tree::scan(&a);
    assert!(Tree::diff(&before, &Tree::scan(&a)).is_empty());
    std::fs::write(a.join("data/hello.txt"), "changed\n").unwrap();
    std::fs::remove_file(a.join("gone-file")).unwrap();
    std::os::unix::fs::lchown(a.join("data/empty"), Some(5), Some(5)).unwrap();
    xattr::set(a.join("data/xattr-file"), "user.binary", b"x").unwrap();
    let d = Tree::diff(&before, &Tree::scan(&a));
    let joined = d.join("\n");
    for needle in [
        "data/hello.txt: size",
        "gone-file: file only in the first tree",
        "data/empty: owner 0:0 vs 5:5",
        "data/xattr-file: xattrs",
    ] {
        assert!(
            joined.contains(needle),
            "{needle:?} missing from:\n{joined}"
        );
    }
}

/// skopeo reads our docker save tarball, OCI layout and OCI archive: layer count, platform,
/// config; and copies the docker archive into an OCI layout (checking every layer digest).
#[test]
fn skopeo_accepts_our_tarballs() {
    let Some(img) = images::rich(RICH) else {
        return;
    };
    if !require_tool("skopeo") {
        return;
    }
    let tmp = scratch();
    let docker = tmp.path().join("rich-docker.tar");
    let oci_dir = tmp.path().join("rich-oci");
    let oci_tar = tmp.path().join("rich-oci.tar");
    img.write_docker_archive(&docker);
    img.write_oci_layout(&oci_dir);
    img.write_oci_archive(&oci_tar);
    let diff_ids = img.diff_ids();
    for src in [
        format!("docker-archive:{}", docker.display()),
        format!("oci:{}:latest", oci_dir.display()),
        format!("oci-archive:{}", oci_tar.display()),
    ] {
        let v: serde_json::Value = serde_json::from_str(&text(
            &run_ok(tool("skopeo").args(["inspect", &src])).stdout,
        ))
        .unwrap_or_else(|e| panic!("skopeo inspect {src}: {e}"));
        assert_eq!(v["Layers"].as_array().map(Vec::len), Some(3), "{src}: {v}");
        assert_eq!(v["Architecture"], "amd64", "{src}: {v}");
        assert_eq!(v["Os"], "linux", "{src}: {v}");
        assert!(
            v["Env"].to_string().contains("PATH=/usr/local/sbin"),
            "{src}: {v}"
        );
        let cfg: serde_json::Value = serde_json::from_str(&text(
            &run_ok(tool("skopeo").args(["inspect", "--config", &src])).stdout,
        ))
        .unwrap();
        assert_eq!(
            cfg["rootfs"]["diff_ids"],
            serde_json::json!(diff_ids),
            "{src}"
        );
        assert_eq!(
            cfg["config"]["Cmd"],
            serde_json::json!(["/bin/sh"]),
            "{src}"
        );
    }
    let copied = tmp.path().join("copied");
    run_ok(tool("skopeo").args([
        "--insecure-policy",
        "copy",
        &format!("docker-archive:{}", docker.display()),
        &format!("oci:{}:copied", copied.display()),
    ]));
    assert!(copied.join("index.json").is_file());
}

/// Does this machine let containerd use overlayfs? Mount a tiny overlay by hand first, so a
/// failure says so precisely.
fn overlay_works() -> Result<(), String> {
    let tmp = scratch();
    let d = tmp.path();
    for s in ["lower", "upper", "work", "merged"] {
        std::fs::create_dir(d.join(s)).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        d.join("lower").display(),
        d.join("upper").display(),
        d.join("work").display()
    );
    let out = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(d.join("merged"))
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mount -t overlay fails here: {}",
            text(&out.stderr).trim()
        ));
    }
    let _ = std::process::Command::new("umount")
        .arg(d.join("merged"))
        .status();
    Ok(())
}

/// A private containerd whose overlayfs snapshotter works here, and runc if `run`; `None`
/// (after a loud skip, a failure under CI) otherwise.
fn overlay_containerd(run: bool) -> Option<Containerd> {
    if let Err(why) = overlay_works() {
        thinpool_tests::skip_or_fail(&why);
        return None;
    }
    if run && !require_tool("runc") {
        return None;
    }
    Containerd::start(None)
}

/// containerd's overlayfs snapshotter: the docker save tarball, then (after the first image is
/// removed and collected) the OCI archive, each imported and a container snapshot mounted by
/// hand equal to our reference tree.
#[test]
fn containerd_overlayfs_import_matches_reference() {
    let Some(img) = images::rich(RICH) else {
        return;
    };
    let Some(ctd) = overlay_containerd(false) else {
        return;
    };
    let tmp = scratch();
    let reference = own_tree(&img, &tmp.path().join("reference"));
    let docker = tmp.path().join("rich-docker.tar");
    let oci_tar = tmp.path().join("rich-oci.tar");
    img.write_docker_archive(&docker);
    img.write_oci_archive(&oci_tar);
    let chain = img.chain_ids();
    for (i, tar) in [&docker, &oci_tar].into_iter().enumerate() {
        ctd.import(tar, "overlayfs");
        assert_eq!(
            ctd.images(),
            vec![RICH.to_string()],
            "after importing {tar:?}"
        );
        let snaps = ctd.snapshots_ls("overlayfs");
        for (n, c) in chain.iter().enumerate() {
            let s = snaps
                .iter()
                .find(|s| s.key == *c)
                .unwrap_or_else(|| panic!("no snapshot {c} (layer {}) in {snaps:?}", n + 1));
            assert_eq!(s.kind, "Committed");
            let parent = if n == 0 { "" } else { chain[n - 1].as_str() };
            assert_eq!(s.parent, parent, "parent of layer {}", n + 1);
        }
        {
            let key = format!("container-{i}");
            let m = ctd.mount_container_snapshot(
                "overlayfs",
                &img.chain_id(),
                &key,
                &tmp.path().join(format!("mnt-{i}")),
            );
            eprintln!("ran {:?}", m.commands);
            assert_eq!(
                m.commands[0][1..3],
                ["-t".to_string(), "overlay".to_string()]
            );
            let seen = Tree::scan(m.path());
            Tree::assert_same(
                &format!("containerd overlayfs mount of {}", tar.display()),
                &seen,
                "own apply",
                &reference,
            );
            check_rich_effects(&seen, "containerd overlayfs");
        }
        ctd.prune_content_references();
        ctd.remove_image(RICH);
        ctd.gc();
        let left = ctd.snapshots_ls("overlayfs");
        assert!(
            left.is_empty(),
            "snapshots left after rm --sync and gc: {left:?}"
        );
    }
}

/// `ctr run --rm` of the busybox image (overlayfs, runc): `echo hello` prints hello; the rich
/// image's files are seen from inside.
#[test]
fn containerd_run_busybox() {
    let Some(bb) = images::busybox(BUSYBOX) else {
        return;
    };
    let Some(rich) = images::rich(RICH) else {
        return;
    };
    let Some(ctd) = overlay_containerd(true) else {
        return;
    };
    let tmp = scratch();
    let t = tmp.path().join("busybox.tar");
    bb.write_docker_archive(&t);
    ctd.import(&t, "overlayfs");
    let out = ctd.run(BUSYBOX, "echo", "overlayfs", &["echo", "hello"]);
    assert_eq!(out, "hello\n");
    let t = tmp.path().join("rich.tar");
    rich.write_oci_archive(&t);
    ctd.import(&t, "overlayfs");
    let out = ctd.run(
        RICH,
        "rich",
        "overlayfs",
        &[
            "sh",
            "-c",
            "cat /data/hello.txt; stat -c '%a %u:%g' /data/setuid /data/user-file; \
             ls /opaque-dir; test -e /gone-file || echo gone",
        ],
    );
    assert_eq!(
        out,
        "hello from layer 3\n4755 0:0\n640 1000:1000\nnew1\nsub\ngone\n"
    );
    let left = ctd.ctr_ok(&["containers", "ls", "-q"]);
    assert!(left.trim().is_empty(), "containers left after --rm: {left}");
}

/// With a snapshotter socket, the config declares the proxy plugin `thinpool` (containerd
/// connects lazily, so no server is needed to see it listed).
#[test]
fn containerd_config_declares_proxy_snapshotter() {
    let tmp = scratch();
    let sock = tmp.path().join("containerd-snapshotter.sock");
    let Some(ctd) = Containerd::start(Some(&sock)) else {
        return;
    };
    let plugins = ctd.ctr_ok(&["plugins", "ls"]);
    assert!(
        plugins.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&"io.containerd.snapshotter.v1")
                && f.get(1) == Some(&thinpool_tests::containerd::THINPOOL_SNAPSHOTTER)
                && f.last() == Some(&"ok")
        }),
        "no proxy snapshotter thinpool in:\n{plugins}"
    );
}

/// Dropping the harness kills what it started: a detached container's process, the shim,
/// containerd; nothing stays mounted.
#[test]
fn containerd_drop_kills_tasks() {
    let Some(bb) = images::busybox(BUSYBOX) else {
        return;
    };
    let Some(ctd) = overlay_containerd(true) else {
        return;
    };
    let tmp = scratch();
    let t = tmp.path().join("busybox.tar");
    bb.write_docker_archive(&t);
    ctd.import(&t, "overlayfs");
    ctd.run_detached(BUSYBOX, "sleeper", "overlayfs", &["sleep", "1000"]);
    let pid = ctd
        .task_pid("sleeper")
        .expect("the detached task is listed");
    let shims = ctd.shim_pids();
    assert!(!shims.is_empty(), "no shim found for our containerd");
    let dir = ctd.dir.path().to_path_buf();
    drop(ctd);
    let alive = |p: u32| {
        // A zombie is dead too.
        std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while (alive(pid) || shims.iter().any(|&s| alive(s))) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!alive(pid), "container process {pid} survived the drop");
    for s in shims {
        assert!(!alive(s), "shim {s} survived the drop");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&*dir.to_string_lossy()),
        "mounts left below {}",
        dir.display()
    );
}
