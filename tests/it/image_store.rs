//! `thinpool image`, `thinpool container` and `thinpool import` end to end (issue 14), as a
//! user runs them, through `thinpool up` and without a daemon (the command serves the pool
//! itself). Images are built in memory (`thinpool_tests::images`: busybox, and a three-layer
//! image with whiteouts, an opaque folder, hardlinks, symlinks, xattrs, a device node, a FIFO,
//! setuid and owned files). Oracles: `umoci unpack` of the same image (the tree a container
//! must show), `skopeo inspect` and containerd's `ctr images import` + `ctr run` of what
//! `image save` writes, the tree scan of mounted containers, `SEEK_DATA`/`SEEK_HOLE` maps and
//! bytes of sparse files, `df`, `pool status` data blocks, and `thin_check` on every pool.
//!
//! Needs root, `/dev/fuse`, loop devices, umoci (and skopeo, containerd, ctr, runc for the save
//! test): skipped loudly without, a failure under `CI=true`.

use std::fs::File;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use rand::{Rng as _, SeedableRng as _};
use serde_json::Value;
use thinpool_tests::containerd::Containerd;
use thinpool_tests::daemon::{
    LAYER_POOL as UP, LoopCleanup, Up, df_size, fuse_usable, may_grow_ext4_online,
};
use thinpool_tests::images::{self, BUSYBOX, Compression, Image, RICH};
use thinpool_tests::tree::{self, Tree};
use thinpool_tests::{Failures, require_tools, run_ok, text, tool};

fn usable() -> bool {
    fuse_usable() && require_tools(&["losetup", "mount", "umoci"])
}

/// A daemon on a fresh root, and the loop devices its containers' mounts leave if a test fails.
struct Pool {
    up: Up,
    _loops: LoopCleanup,
}

impl Pool {
    fn start(args: &[&str]) -> Pool {
        let up = Up::start(args);
        let loops = LoopCleanup(up.files());
        Pool { up, _loops: loops }
    }

    /// A pool made by `thinpool up ARGS` then stopped: image commands serve it themselves.
    fn stopped(args: &[&str]) -> Pool {
        let mut p = Pool::start(args);
        p.up.stop();
        p
    }

    /// `image ls --json`.
    fn images(&self) -> Vec<Value> {
        array(self.up.json(&["image", "ls", "--json"]))
    }

    /// The one image listed under `name`.
    fn image(&self, name: &str) -> Value {
        self.images()
            .into_iter()
            .find(|i| i["names"].as_array().unwrap().iter().any(|n| n == name))
            .unwrap_or_else(|| panic!("{name} not in image ls: {:?}", self.images()))
    }

    /// The layer-store keys of image layers (`thinpool.layer/<chain id>`), sorted.
    fn layer_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = array(self.up.json(&["snapshot", "ls", "--json"]))
            .iter()
            .filter_map(|s| s["key"].as_str())
            .filter(|k| k.starts_with("thinpool.layer/"))
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    }

    /// Data blocks in use, from `pool status --json`.
    fn used_blocks(&self) -> u64 {
        self.up.json(&["pool", "status", "--json"])["used_data_blocks"]
            .as_u64()
            .unwrap()
    }

    /// Mount container `name` on `dir` (`container mount`), run `f` on it, unmount.
    fn with_mounted<T>(&self, name: &str, dir: &Path, f: impl FnOnce(&Path) -> T) -> T {
        std::fs::create_dir_all(dir).unwrap();
        let printed = self
            .up
            .ok(&["container", "mount", name, dir.to_str().unwrap()]);
        assert_eq!(
            printed.trim(),
            dir.to_str().unwrap(),
            "container mount prints where"
        );
        let out = f(dir);
        self.up.ok(&["container", "umount", name]);
        out
    }

    /// The tree container `name` shows, mounted on a folder beside the root.
    fn container_tree(&self, name: &str) -> Tree {
        let dir = self.up.dir.path().join("mnt").join(name);
        self.with_mounted(name, &dir, Tree::scan)
    }

    /// Stop the daemon and check the pool's metadata.
    fn stop_and_check(&mut self) {
        self.up.stop();
        self.up.thin_check();
    }
}

fn array(v: Value) -> Vec<Value> {
    v.as_array().expect("a JSON array").clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// What umoci unpacks of `img` (written as an OCI layout below `dir`).
fn umoci_tree(img: &Image, dir: &Path) -> Tree {
    let layout = dir.join("ref-layout");
    img.write_oci_layout(&layout);
    let rootfs = tree::reference_unpack(&layout, img.tag(), &dir.join("ref-bundle"))
        .expect("umoci is required by usable()");
    Tree::scan(&rootfs)
}

/// The image as `image ls --json` must list it after a load of `img`.
fn check_listed(f: &mut Failures, pool: &Pool, img: &Image, name: &str, what: &str) {
    let listed = pool.image(name);
    f.eq_text(
        &format!("{what}: image id is the config's digest"),
        listed["id"].as_str().unwrap(),
        &images::sha256_digest(&img.config_json()),
    );
    f.check(
        &format!("{what}: diff ids"),
        strings(&listed["diff_ids"]) == img.diff_ids(),
    );
    let want: Vec<String> = img
        .chain_ids()
        .iter()
        .map(|c| format!("thinpool.layer/{c}"))
        .collect();
    let have = pool.layer_keys();
    f.check(
        &format!("{what}: one layer snapshot per chain id ({have:?})"),
        want.iter().all(|k| have.contains(k)),
    );
}

/// `image load` of the `docker save` form, the OCI archive and the OCI layout folder of one
/// image: each gives a container whose tree is umoci's unpack of it; `image rm` takes the
/// layers away again.
#[test]
fn load_docker_and_oci_forms_give_umoci_trees() {
    if !usable() {
        return;
    }
    let img = images::rich(RICH).expect("busybox-static is required");
    let mut pool = Pool::start(&UP);
    let dir = pool.up.dir.path().to_path_buf();
    let theirs = umoci_tree(&img, &dir);
    let docker = dir.join("rich-docker.tar");
    img.write_docker_archive(&docker);
    let oci_tar = dir.join("rich-oci.tar");
    img.clone()
        .compression(Compression::Gzip)
        .write_oci_archive(&oci_tar);
    let oci_dir = dir.join("rich-oci");
    img.write_oci_layout(&oci_dir);
    // The base device is made at the first load; what stays after each `image rm` is its.
    let mut base_blocks = None;
    let mut f = Failures::new();
    for (form, path) in [
        ("docker save tarball", &docker),
        ("OCI archive (gzip layers)", &oci_tar),
        ("OCI layout folder", &oci_dir),
    ] {
        let out = pool.up.ok(&["image", "load", path.to_str().unwrap()]);
        f.check(
            &format!("{form}: load says `Loaded image: {RICH}` ({out:?})"),
            out.contains(&format!("Loaded image: {RICH}")),
        );
        check_listed(&mut f, &pool, &img, RICH, form);
        pool.up.ok(&["container", "create", RICH, "c"]);
        let ours = pool.container_tree("c");
        let diff = Tree::diff(&theirs, &ours);
        f.check(
            &format!(
                "{form}: container tree == umoci unpack ({} differences: {diff:?})",
                diff.len()
            ),
            diff.is_empty(),
        );
        f.check(
            &format!("{form}: image rm refused while container c uses it"),
            !pool
                .up
                .cmd(&["image", "rm", RICH])
                .status()
                .unwrap()
                .success(),
        );
        pool.up.ok(&["container", "rm", "c"]);
        pool.up.ok(&["image", "rm", RICH]);
        f.check(
            &format!("{form}: nothing listed after image rm"),
            pool.images().is_empty(),
        );
        f.check(
            &format!("{form}: no layer snapshot left ({:?})", pool.layer_keys()),
            pool.layer_keys().is_empty(),
        );
        let used = pool.used_blocks();
        let base = *base_blocks.get_or_insert(used);
        f.check(
            &format!("{form}: data blocks back to the base device's ({used} vs {base})"),
            used == base && used < 64,
        );
    }
    f.finish();
    pool.stop_and_check();
}

/// `image save` writes what skopeo and containerd read (containerd's own overlayfs
/// snapshotter unpacks it to umoci's tree; `ctr run` runs busybox from it), and what a fresh
/// pool loads — without a daemon — to the same image ids, names, layers and trees.
#[test]
fn save_is_read_by_skopeo_and_containerd_and_loads_back_identically() {
    if !usable() || !require_tools(&["skopeo", "containerd", "ctr", "runc"]) {
        return;
    }
    let rich = images::rich(RICH).expect("busybox-static is required");
    let busybox = images::busybox(BUSYBOX).expect("busybox-static is required");
    let mut a = Pool::start(&UP);
    let dir = a.up.dir.path().to_path_buf();
    let rich_tar = dir.join("rich.tar");
    rich.write_docker_archive(&rich_tar);
    let busybox_tar = dir.join("busybox.tar");
    busybox.write_oci_archive(&busybox_tar);
    a.up.ok(&["image", "load", rich_tar.to_str().unwrap()]);
    a.up.ok(&["image", "load", busybox_tar.to_str().unwrap()]);
    let saved = dir.join("saved.tar");
    a.up.ok(&[
        "image",
        "save",
        RICH,
        BUSYBOX,
        "-o",
        saved.to_str().unwrap(),
    ]);
    let listed_a = a.images();
    a.up.ok(&["container", "create", RICH, "r"]);
    let tree_a = a.container_tree("r");
    a.stop_and_check();

    let mut f = Failures::new();
    // skopeo: both images, their layers as the image says (saved uncompressed: digest = diff id).
    for (img, name) in [(&rich, RICH), (&busybox, BUSYBOX)] {
        let out = run_ok(tool("skopeo").args([
            "inspect",
            &format!("docker-archive:{}:{name}", saved.display()),
        ]));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        f.check(
            &format!("skopeo inspect {name}: layers are the diff ids"),
            strings(&v["Layers"]) == img.diff_ids(),
        );
        let out = run_ok(tool("skopeo").args([
            "inspect",
            "--config",
            "--raw",
            &format!("docker-archive:{}:{name}", saved.display()),
        ]));
        f.check(
            &format!("skopeo: the config of {name} is the one loaded"),
            images::sha256_digest(&out.stdout) == images::sha256_digest(&img.config_json()),
        );
    }
    // containerd: imports both, unpacks rich to umoci's tree, runs busybox.
    let theirs = umoci_tree(&rich, &dir);
    f.check(
        "our rich container is umoci's tree",
        Tree::diff(&theirs, &tree_a).is_empty(),
    );
    {
        let ctd = Containerd::start(None).expect("containerd is required");
        ctd.import(&saved, "overlayfs");
        let names = ctd.images();
        for img in [RICH, BUSYBOX] {
            f.check(
                &format!("ctr images import lists {img} ({names:?})"),
                names.iter().any(|n| n == img),
            );
        }
        let m = ctd.mount_container_snapshot(
            "overlayfs",
            &rich.chain_id(),
            "saved-rich",
            &dir.join("ctd-mnt"),
        );
        let seen = Tree::scan(m.path());
        let diff = Tree::diff(&theirs, &seen);
        f.check(
            &format!("containerd's unpack of our save == umoci's ({diff:?})"),
            diff.is_empty(),
        );
        drop(m);
        let out = ctd.run(
            BUSYBOX,
            "saved-busybox",
            "overlayfs",
            &["echo", "saved and run"],
        );
        f.eq_text("ctr run of the saved busybox", out.trim(), "saved and run");
    }
    // A fresh pool, no daemon: the command serves the pool itself.
    let mut b = Pool::stopped(&UP);
    let out = b.up.ok(&["image", "load", saved.to_str().unwrap()]);
    f.check(
        &format!("load without a daemon names both images ({out:?})"),
        out.contains(RICH) && out.contains(BUSYBOX),
    );
    let listed_b = b.images();
    let key = |v: &Vec<Value>| {
        let mut k: Vec<(String, Vec<String>, Vec<String>)> = v
            .iter()
            .map(|i| {
                (
                    i["id"].as_str().unwrap().to_string(),
                    strings(&i["names"]),
                    strings(&i["diff_ids"]),
                )
            })
            .collect();
        k.sort();
        k
    };
    f.check(
        &format!(
            "save → load: same ids, names, layers ({:?} vs {:?})",
            key(&listed_a),
            key(&listed_b)
        ),
        key(&listed_a) == key(&listed_b),
    );
    b.up.ok(&["container", "create", RICH, "r"]);
    let ls_without = b.up.ok(&["container", "ls", "--json"]);
    let images_without = b.up.ok(&["image", "ls"]);
    b.up.spawn(&UP);
    f.eq_text(
        "container ls --json, with and without a daemon",
        &b.up.ok(&["container", "ls", "--json"]),
        &ls_without,
    );
    f.eq_text(
        "image ls, with and without a daemon",
        &b.up.ok(&["image", "ls"]),
        &images_without,
    );
    let tree_b = b.container_tree("r");
    let diff = Tree::diff(&tree_a, &tree_b);
    f.check(
        &format!("the container of the reloaded image == the original's ({diff:?})"),
        diff.is_empty(),
    );
    f.finish();
    b.stop_and_check();
}

/// `container commit` of added, changed and deleted files and a deleted folder → `image save`
/// → `image load` into another pool: a container of the committed image shows exactly the
/// committed tree.
#[test]
fn commit_save_load_elsewhere_keeps_the_changes() {
    if !usable() {
        return;
    }
    let img = images::rich(RICH).expect("busybox-static is required");
    let mut a = Pool::start(&UP);
    let dir = a.up.dir.path().to_path_buf();
    let tar = dir.join("rich.tar");
    img.write_docker_archive(&tar);
    a.up.ok(&["image", "load", tar.to_str().unwrap()]);
    a.up.ok(&["container", "create", RICH, "work"]);
    let before = a.container_tree("work");
    let expected = a.with_mounted("work", &dir.join("work"), |m| {
        std::fs::create_dir_all(m.join("added/deep")).unwrap();
        std::fs::write(m.join("added/deep/new.txt"), b"a new file\n").unwrap();
        xattr::set(
            m.join("added/deep/new.txt"),
            "user.thinpool.commit",
            b"kept",
        )
        .unwrap();
        std::os::unix::fs::symlink("deep/new.txt", m.join("added/link")).unwrap();
        std::fs::hard_link(m.join("added/deep/new.txt"), m.join("added/hard")).unwrap();
        std::fs::write(m.join("data/hello.txt"), b"changed by the container\n").unwrap();
        std::fs::remove_file(m.join("data/user-file")).unwrap();
        std::fs::remove_dir_all(m.join("opaque-dir")).unwrap();
        std::fs::remove_file(m.join("data/rel-link")).unwrap();
        run_ok(
            Command::new("chmod")
                .arg("0600")
                .arg(m.join("var/lib/app/state")),
        );
        Tree::scan(m)
    });
    let mut f = Failures::new();
    for (p, present) in [
        ("added/deep/new.txt", true),
        ("opaque-dir", false),
        ("opaque-dir/new1", false),
        ("data/user-file", false),
        ("data/rel-link", false),
    ] {
        f.check(
            &format!("changed tree: {p} present = {present}"),
            expected.has(p) == present && before.has(p) != present,
        );
    }
    let id =
        a.up.ok(&["container", "commit", "work", "example.test/committed:v1"]);
    let committed = a.image("example.test/committed:v1");
    f.eq_text(
        "commit prints the new image's id",
        id.trim(),
        committed["id"].as_str().unwrap(),
    );
    let layers = strings(&committed["diff_ids"]);
    f.check(
        &format!("committed image: rich's 3 layers + 1 ({layers:?})"),
        layers.len() == 4 && layers[..3] == img.diff_ids()[..],
    );
    let saved = dir.join("committed.tar");
    a.up.ok(&[
        "image",
        "save",
        "example.test/committed:v1",
        "-o",
        saved.to_str().unwrap(),
    ]);
    a.stop_and_check();

    let mut b = Pool::start(&UP);
    let out = b.up.ok(&["image", "load", saved.to_str().unwrap()]);
    f.check(
        &format!("loads as example.test/committed:v1 ({out:?})"),
        out.contains("example.test/committed:v1"),
    );
    f.eq_text(
        "same id in the other pool",
        b.image("example.test/committed:v1")["id"].as_str().unwrap(),
        id.trim(),
    );
    b.up.ok(&["container", "create", "example.test/committed:v1", "again"]);
    let got = b.container_tree("again");
    let diff = Tree::diff(&expected, &got);
    f.check(
        &format!("the committed tree, elsewhere ({diff:?})"),
        diff.is_empty(),
    );
    f.check(
        "changed file content travelled",
        got.get("data/hello.txt").and_then(|n| n.sha256.clone())
            == Some(images::sha256_hex(b"changed by the container\n")),
    );
    f.finish();
    b.stop_and_check();
}

/// A file's data regions (`SEEK_DATA`/`SEEK_HOLE`), as `(start, end)`.
fn data_map(path: &Path) -> Vec<(u64, u64)> {
    use rustix::fs::SeekFrom;
    let file = File::open(path).unwrap();
    let size = file.metadata().unwrap().len();
    let mut map = Vec::new();
    let mut off = 0;
    while off < size {
        let start = match rustix::fs::seek(&file, SeekFrom::Data(off)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => panic!("SEEK_DATA in {}: {e}", path.display()),
        };
        let end = rustix::fs::seek(&file, SeekFrom::Hole(start)).unwrap();
        map.push((start, end));
        off = end;
    }
    map
}

/// One big file of the seeds' case: how it is made, where its data is.
struct BigFile {
    name: &'static str,
    size: u64,
    /// `fallocate` (unwritten extents) rather than a hole from `truncate`.
    fallocate: bool,
}

const GIB: u64 = 1 << 30;
const MARK: usize = 64 << 10;

/// Where a big file of `size` bytes carries data: 64 KiB at every GiB, and its last bytes.
fn marker_offsets(size: u64) -> Vec<(u64, usize)> {
    let mut v: Vec<(u64, usize)> = (0..size / GIB)
        .map(|g| (g * GIB, MARK))
        .filter(|&(o, n)| o + n as u64 <= size)
        .collect();
    let tail = size % GIB;
    if tail != 0 {
        v.push((size - tail, tail.min(MARK as u64) as usize));
    }
    v
}

/// The seeds' case: a container resized to 20 GiB while mounted (its filesystem with it), 15 GiB
/// of files written into it (sparse: fallocated and truncated files carrying data every GiB, and
/// 16 MiB of random data), `container export` → `thinpool import` into another pool (no
/// ENOSPC: the import's snapshot is sized to the content first) → a container there holds the
/// same bytes at the same places, and the tar and both pools stay small.
#[test]
fn grown_container_exports_and_imports_into_another_pool() {
    if !usable() || !require_tools(&["df", "fallocate"]) {
        return;
    }
    let busybox = images::busybox(BUSYBOX).expect("busybox-static is required");
    let big_pool = [
        "--data-size",
        "40G",
        "--metadata-size",
        "64M",
        "--base-size",
        "256M",
    ];
    let mut a = Pool::start(&big_pool);
    let dir = a.up.dir.path().to_path_buf();
    let tar = dir.join("busybox.tar");
    busybox.write_docker_archive(&tar);
    a.up.ok(&["image", "load", tar.to_str().unwrap()]);
    a.up.ok(&["container", "create", BUSYBOX, "grown"]);
    let files = [
        BigFile {
            name: "big/fallocated.img",
            size: 8 * GIB,
            fallocate: true,
        },
        BigFile {
            name: "big/truncated.img",
            size: 7 * GIB - 16 * (1 << 20) + 1000,
            fallocate: false,
        },
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let random: Vec<u8> = (0..16 << 20).map(|_| rng.random()).collect();
    let mnt = dir.join("grown");
    let mut f = Failures::new();
    // Grown while mounted: online where the kernel lets this daemon (CAP_SYS_RESOURCE), else
    // the volume grows, the error says why, and the filesystem fills it at the next mount.
    a.with_mounted("grown", &mnt, |m| {
        let before = df_size(m);
        if may_grow_ext4_online() {
            let out = a.up.ok(&["container", "resize", "grown", "20G"]);
            f.check(
                &format!(
                    "online resize: filesystem {before} → {} bytes ({out:?})",
                    df_size(m)
                ),
                before < GIB && df_size(m) > 18 * GIB,
            );
        } else {
            eprintln!(
                "NOTE: no CAP_SYS_RESOURCE here: ext4 cannot grow while mounted; checking the \
                 refusal and the growth at the next mount instead"
            );
            let err = a.up.fails(&["container", "resize", "grown", "20G"]);
            f.check(
                &format!("resize while mounted without CAP_SYS_RESOURCE says why: {err}"),
                err.contains("CAP_SYS_RESOURCE") && err.contains("next mounted"),
            );
            f.check("the filesystem did not change", df_size(m) == before);
        }
    });
    let listed = a.up.json(&["container", "ls", "--json"])[0]["size"].as_u64();
    f.check(
        &format!("container ls: 20 GiB ({listed:?})"),
        listed == Some(20 * GIB),
    );
    let (rest_a, maps_a) = a.with_mounted("grown", &mnt, |m| {
        let size = df_size(m);
        f.check(
            &format!("mounted again: the filesystem fills 20 GiB ({size} bytes)"),
            size > 18 * GIB,
        );
        std::fs::create_dir(m.join("big")).unwrap();
        for b in &files {
            let p = m.join(b.name);
            if b.fallocate {
                run_ok(
                    Command::new("fallocate")
                        .args(["-l", &b.size.to_string()])
                        .arg(&p),
                );
            } else {
                File::create(&p).unwrap().set_len(b.size).unwrap();
            }
            let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            for (i, (off, len)) in marker_offsets(b.size).into_iter().enumerate() {
                let bytes: Vec<u8> = (0..len).map(|j| (i * 31 + j * 7) as u8 ^ 0x5a).collect();
                file.write_all_at(&bytes, off).unwrap();
            }
            file.sync_all().unwrap();
        }
        std::fs::write(m.join("big/random.bin"), &random).unwrap();
        run_ok(&mut Command::new("sync"));
        let maps: Vec<Vec<(u64, u64)>> = files.iter().map(|b| data_map(&m.join(b.name))).collect();
        (Tree::scan_without(m, &["big"]), maps)
    });
    let apparent: u64 = files.iter().map(|b| b.size).sum::<u64>() + random.len() as u64;
    f.check(
        &format!("15 GiB in the container ({apparent} bytes)"),
        apparent >= 15 * GIB,
    );
    let exported = dir.join("grown.tar");
    let t = Instant::now();
    a.up.ok(&[
        "container",
        "export",
        "grown",
        "-o",
        exported.to_str().unwrap(),
    ]);
    let export_time = t.elapsed();
    let tar_bytes = std::fs::metadata(&exported).unwrap().len();
    f.check(
        &format!("the export stays small: {tar_bytes} bytes"),
        tar_bytes < 64 << 20,
    );
    let used_a = a.used_blocks();
    a.stop_and_check();

    let mut b = Pool::start(&big_pool);
    let t = Instant::now();
    let id = b.up.ok(&[
        "import",
        exported.to_str().unwrap(),
        "example.test/grown:imported",
    ]);
    let import_time = t.elapsed();
    f.check(
        &format!("import prints an id ({id:?})"),
        id.trim().starts_with("sha256:"),
    );
    b.up.ok(&[
        "container",
        "create",
        "example.test/grown:imported",
        "moved",
    ]);
    let size = b.up.json(&["container", "ls", "--json"])[0]["size"]
        .as_u64()
        .unwrap();
    f.check(
        &format!("the imported container's filesystem holds the content ({size} bytes)"),
        size > apparent,
    );
    let mnt_b = b.up.dir.path().join("moved");
    let (rest_b, maps_b) = b.with_mounted("moved", &mnt_b, |m| {
        for bf in &files {
            let p = m.join(bf.name);
            let src = std::fs::metadata(&p).unwrap();
            f.check(
                &format!("{}: size {} (was {})", bf.name, src.len(), bf.size),
                src.len() == bf.size,
            );
            f.check(
                &format!(
                    "{}: sparse in the other pool ({} bytes allocated)",
                    bf.name,
                    src.blocks() * 512
                ),
                src.blocks() * 512 < 4 << 20,
            );
            let file = File::open(&p).unwrap();
            for (j, (off, len)) in marker_offsets(bf.size).into_iter().enumerate() {
                let mut got = vec![0u8; len];
                file.read_exact_at(&mut got, off).unwrap();
                let want: Vec<u8> = (0..len).map(|k| (j * 31 + k * 7) as u8 ^ 0x5a).collect();
                f.check(
                    &format!("{} @{off}: the data written", bf.name),
                    got == want,
                );
            }
        }
        f.check(
            "big/random.bin: the same 16 MiB",
            std::fs::read(m.join("big/random.bin")).unwrap() == random,
        );
        let maps: Vec<Vec<(u64, u64)>> = files.iter().map(|b| data_map(&m.join(b.name))).collect();
        (Tree::scan_without(m, &["big"]), maps)
    });
    for (bf, (ma, mb)) in files.iter().zip(maps_a.iter().zip(&maps_b)) {
        f.check(
            &format!("{}: data at the same places ({ma:?} vs {mb:?})", bf.name),
            ma == mb,
        );
    }
    let diff = Tree::diff(&rest_a, &rest_b);
    f.check(
        &format!("the rest of the tree is the same ({diff:?})"),
        diff.is_empty(),
    );
    let used_b = b.used_blocks();
    eprintln!(
        "seeds' case: {apparent} bytes apparent; export {export_time:?} → {tar_bytes}-byte tar; \
         import {import_time:?}; data blocks used: {used_a} (source pool), {used_b} (target pool)"
    );
    f.finish();
    b.stop_and_check();
}

/// Layers are shared and reference counted: two images with three layers in common list them
/// as shared; `image rm` of one keeps what the other (or a container) needs; a name moved to a
/// new image leaves the old one dangling, and `image prune` takes it with the layers and blobs
/// only it needed; the last `image rm` leaves no layer, blob or data block.
#[test]
fn image_rm_and_prune_keep_what_others_need() {
    if !usable() {
        return;
    }
    let rich = images::rich(RICH).expect("busybox-static is required");
    const PLUS: &str = "example.test/thinpool/plus:latest";
    let plus = |text: &[u8]| {
        let mut img = rich
            .clone()
            .layer(images::Layer::new().file("plus.txt", text, 0o644));
        img.name = PLUS.to_string();
        img
    };
    let mut pool = Pool::start(&UP);
    let dir = pool.up.dir.path().to_path_buf();
    let load = |img: &Image, file: &str| {
        let path = dir.join(file);
        img.write_docker_archive(&path);
        let out = run_ok(&mut pool.up.cmd(&["image", "load", path.to_str().unwrap()]));
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    };
    let blobs = |pool: &Pool| {
        std::fs::read_dir(pool.up.root.join("images/blobs/sha256"))
            .unwrap()
            .count()
    };
    let mut f = Failures::new();
    load(&rich, "rich.tar");
    let base = pool.used_blocks();
    let out = load(&plus(b"one\n"), "plus1.tar");
    f.check(
        &format!("the second image applies one layer, shares three ({out:?})"),
        out.contains("1 layer(s) unpacked, 3 shared"),
    );
    let rich_size: u64 = pool.image(RICH)["layer_sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    for name in [RICH, PLUS] {
        let shared = pool.image(name)["shared_size"].as_u64();
        f.check(
            &format!("{name}: shared size is rich's {rich_size} bytes ({shared:?})"),
            shared == Some(rich_size),
        );
    }
    f.check("4 layers", pool.layer_keys().len() == 4);
    pool.up.ok(&["container", "create", PLUS, "c1"]);
    pool.up.ok(&["image", "rm", RICH]);
    f.check(
        &format!("rm of rich keeps plus's 4 layers ({:?})", pool.layer_keys()),
        pool.layer_keys().len() == 4,
    );
    let err = pool.up.fails(&["image", "rm", PLUS]);
    f.check(
        &format!("rm of an image a container uses is refused, naming it: {err}"),
        err.contains("c1") && err.contains("container rm"),
    );
    // A new image under the name: the old one is dangling, still used by c1.
    load(&plus(b"two\n"), "plus2.tar");
    let dangling: Vec<Value> = pool
        .images()
        .into_iter()
        .filter(|i| i["names"].as_array().unwrap().is_empty())
        .collect();
    f.check(
        &format!(
            "the old plus is listed without a name ({} dangling)",
            dangling.len()
        ),
        dangling.len() == 1 && dangling[0]["containers"] == 1,
    );
    pool.up.ok(&["image", "prune"]);
    f.check(
        "prune keeps a dangling image a container uses",
        pool.images().len() == 2,
    );
    pool.up.ok(&["container", "rm", "c1"]);
    let out = pool.up.ok(&["image", "prune"]);
    f.check(
        &format!("prune takes the dangling image ({out:?})"),
        out.contains(dangling[0]["id"].as_str().unwrap()) && pool.images().len() == 1,
    );
    f.check(
        &format!(
            "rich's 3 layers + the new top stay ({:?})",
            pool.layer_keys()
        ),
        pool.layer_keys().len() == 4,
    );
    pool.up.ok(&["image", "rm", PLUS]);
    f.check("nothing listed", pool.images().is_empty());
    f.check(
        &format!("no layer left ({:?})", pool.layer_keys()),
        pool.layer_keys().is_empty(),
    );
    f.check(
        &format!("no blob left ({})", blobs(&pool)),
        blobs(&pool) == 0,
    );
    let used = pool.used_blocks();
    f.check(
        &format!("data blocks: {used}, below what rich's layers took ({base})"),
        used < base,
    );
    f.finish();
    pool.stop_and_check();
}

/// `container resize` of a mounted container: online where the daemon may grow a mounted ext4;
/// without CAP_SYS_RESOURCE the volume grows, the error says why, and the filesystem fills it
/// at the next mount — or, after a daemon restart (which forgets that), at a resize to the same
/// size while unmounted.
#[test]
fn resize_of_a_mounted_container_grows_its_filesystem() {
    if !usable() || !require_tools(&["df"]) {
        return;
    }
    let busybox = images::busybox(BUSYBOX).expect("busybox-static is required");
    let mut pool = Pool::start(&UP);
    let dir = pool.up.dir.path().to_path_buf();
    let tar = dir.join("busybox.tar");
    busybox.write_docker_archive(&tar);
    pool.up.ok(&["image", "load", tar.to_str().unwrap()]);
    pool.up.ok(&["container", "create", BUSYBOX, "r"]);
    let mnt = dir.join("r");
    let mib = 1u64 << 20;
    let mut f = Failures::new();
    let online = may_grow_ext4_online();
    for (i, size) in ["512M", "768M"].into_iter().enumerate() {
        let want = [450 * mib, 700 * mib][i];
        pool.with_mounted("r", &mnt, |m| {
            if online {
                pool.up.ok(&["container", "resize", "r", size]);
                f.check(
                    &format!("online resize to {size}: df {}", df_size(m)),
                    df_size(m) > want,
                );
            } else {
                let err = pool.up.fails(&["container", "resize", "r", size]);
                f.check(
                    &format!("resize to {size} while mounted says why: {err}"),
                    err.contains("CAP_SYS_RESOURCE") && err.contains("next mounted"),
                );
                f.check(
                    &format!("{size}: df unchanged while mounted"),
                    df_size(m) < want,
                );
            }
        });
        if !online && i == 1 {
            // A restart forgets the growth to make at the next mount: the same size again,
            // unmounted, finds the filesystem smaller than its volume and grows it.
            pool.up.stop();
            pool.up.spawn(&UP);
            pool.up.ok(&["container", "resize", "r", size]);
        }
        let got = pool.with_mounted("r", &mnt, df_size);
        f.check(&format!("{size}: mounted again, df {got}"), got > want);
        let listed = pool.up.json(&["container", "ls", "--json"])[0]["size"].as_u64();
        f.check(
            &format!("container ls: {size} ({listed:?})"),
            listed.is_some_and(|l| l >= [512 * mib, 768 * mib][i]),
        );
    }
    f.finish();
    pool.stop_and_check();
}

/// 100 containers of one image: instant, and almost no data blocks (reported); listed, then
/// removed, giving back what they took.
#[test]
fn hundred_containers_use_almost_no_data_blocks() {
    if !usable() {
        return;
    }
    let busybox = images::busybox(BUSYBOX).expect("busybox-static is required");
    let mut pool = Pool::start(&UP);
    let tar = pool.up.dir.path().join("busybox.tar");
    busybox.write_docker_archive(&tar);
    pool.up.ok(&["image", "load", tar.to_str().unwrap()]);
    let before = pool.used_blocks();
    let mut times = Vec::new();
    for i in 0..100 {
        let t = Instant::now();
        pool.up
            .ok(&["container", "create", BUSYBOX, &format!("c{i:03}")]);
        times.push(t.elapsed());
    }
    let after = pool.used_blocks();
    let listed = array(pool.up.json(&["container", "ls", "--json"]));
    times.sort();
    eprintln!(
        "100 containers: data blocks {before} → {after} (+{}); `container create` median {:?}, max {:?} (CLI start included)",
        after - before,
        times[50],
        times[99]
    );
    let mut f = Failures::new();
    f.check(
        &format!("100 listed ({})", listed.len()),
        listed.len() == 100 && listed.iter().all(|c| c["image_ref"] == BUSYBOX),
    );
    f.check(
        &format!(
            "100 containers take almost nothing: +{} blocks",
            after - before
        ),
        after - before < 100,
    );
    let names: Vec<String> = (0..100).map(|i| format!("c{i:03}")).collect();
    let mut args = vec!["container", "rm"];
    args.extend(names.iter().map(String::as_str));
    pool.up.ok(&args);
    f.check(
        "none left",
        array(pool.up.json(&["container", "ls", "--json"])).is_empty(),
    );
    f.check("blocks back", pool.used_blocks() == before);
    f.finish();
    pool.stop_and_check();
}
