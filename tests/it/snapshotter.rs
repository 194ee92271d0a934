//! The layer store served to real containerd (issue 13): `thinpool up` serves containerd's
//! snapshots API on `ROOT/containerd-snapshotter.sock`, a private containerd (1.6, Debian's)
//! uses it as the proxy snapshotter `thinpool`. Images are built in memory
//! (`thinpool_tests::images`: busybox, and a three-layer image with whiteouts, an opaque
//! folder, hardlinks, symlinks, xattrs, a device node, setuid and owned files), imported with
//! `ctr images import --snapshotter thinpool`, mounted by hand from `ctr snapshots mounts` and
//! compared with our own layer-by-layer apply (which the `images` tests hold equal to umoci's
//! unpack), run with `ctr run` (runc), committed and built on, removed and collected; a kill -9
//! in the middle of an import; the bad requests. Oracles: containerd and ctr, runc, `mount`,
//! the tree scan, `thin_check`, the data file's allocated size.
//!
//! Needs root, `/dev/fuse`, loop devices, containerd, ctr and runc (skipped loudly without, a
//! failure under `CI=true`).

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use thinpool_tests::containerd::{Containerd, THINPOOL_SNAPSHOTTER as TP};
use thinpool_tests::daemon::{LAYER_POOL as UP, LoopCleanup, Up, fuse_usable};
use thinpool_tests::images::{self, BUSYBOX, RICH};
use thinpool_tests::tree::{self, Tree};
use thinpool_tests::{require_tools, scratch, text};

const MANY: &str = "example.test/thinpool/many:latest";

fn usable() -> bool {
    fuse_usable() && require_tools(&["losetup", "mount", "containerd", "ctr", "runc"])
}

/// A daemon and a containerd using it.
struct Stack {
    ctd: Containerd,
    up: Up,
    _loops: LoopCleanup,
}

fn stack() -> Option<Stack> {
    if !usable() {
        return None;
    }
    let up = Up::start(&UP);
    let loops = LoopCleanup(up.files());
    let ctd = Containerd::start(Some(&up.root.join("containerd-snapshotter.sock")))?;
    Some(Stack {
        ctd,
        up,
        _loops: loops,
    })
}

/// The store's snapshots as `thinpool snapshot ls --json` lists them.
fn store(up: &Up) -> Vec<Value> {
    up.json(&["snapshot", "ls", "--json"])
        .as_array()
        .unwrap()
        .clone()
}

/// Data blocks in use, from `pool status --json`.
fn used_blocks(up: &Up) -> u64 {
    up.json(&["pool", "status", "--json"])["used_data_blocks"]
        .as_u64()
        .unwrap()
}

/// Bytes the data file takes on the host (its allocated blocks).
fn data_file_bytes(up: &Up) -> u64 {
    std::fs::metadata(up.root.join("pool/data"))
        .unwrap()
        .blocks()
        * 512
}

/// containerd's keys carry a `NAMESPACE/ID/` prefix in the store: the store key ending in
/// `/KEY`.
fn store_key_of(list: &[Value], key: &str) -> Option<Value> {
    list.iter()
        .find(|s| {
            s["key"]
                .as_str()
                .is_some_and(|k| k.ends_with(&format!("/{key}")))
        })
        .cloned()
}

/// Import, inspect, mount, run, commit, remove and collect, with the data returned to the pool
/// at the end.
#[test]
fn containerd_imports_runs_commits_and_collects_on_thin_snapshots() {
    let Some(rich) = images::rich(RICH) else {
        return;
    };
    let Some(bb) = images::busybox(BUSYBOX) else {
        return;
    };
    let Some(mut s) = stack() else {
        return;
    };
    let (ctd, up) = (&s.ctd, &s.up);
    let tmp = scratch();
    let reference = {
        let dir = tmp.path().join("reference");
        tree::apply_layers(&rich, &dir);
        Tree::scan(&dir)
    };
    // The base device is made on first use: measure from then on.
    let docker = tmp.path().join("rich-docker.tar");
    rich.write_docker_archive(&docker);
    ctd.import(&docker, TP);
    let chain = rich.chain_ids();
    let snaps = ctd.snapshots_ls(TP);
    for (n, c) in chain.iter().enumerate() {
        let sn = snaps
            .iter()
            .find(|s| s.key == *c)
            .unwrap_or_else(|| panic!("no snapshot {c} (layer {}) in {snaps:?}", n + 1));
        assert_eq!(sn.kind, "Committed");
        let parent = if n == 0 { "" } else { chain[n - 1].as_str() };
        assert_eq!(sn.parent, parent, "parent of layer {}", n + 1);
    }
    // The store says the same, each layer a thin snapshot of its parent's volume.
    let list = store(up);
    assert_eq!(list.len(), chain.len(), "{list:#?}");
    let vols = up.json(&["vol", "ls", "--json"]);
    let vol_parent = |name: &str| {
        vols.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .map(|v| v["parent"].clone())
    };
    let mut parent_volume = "layer-base".to_string();
    for c in &chain {
        let e = store_key_of(&list, c).unwrap_or_else(|| panic!("{c} not in {list:#?}"));
        assert_eq!(e["kind"], "committed");
        let vol = e["volume"].as_str().unwrap().to_string();
        assert_eq!(vol_parent(&vol), Some(Value::from(parent_volume.as_str())));
        parent_volume = vol;
    }
    // `ctr snapshots info|usage|tree|mounts` answer through us.
    let info: Value =
        serde_json::from_str(&ctd.ctr_ok(&["snapshots", "--snapshotter", TP, "info", &chain[2]]))
            .unwrap();
    assert_eq!(info["Kind"], "Committed", "{info}");
    assert_eq!(info["Parent"], chain[1].as_str(), "{info}");
    let usage = ctd.ctr_ok(&["snapshots", "--snapshotter", TP, "usage", &chain[0]]);
    assert!(usage.contains(&chain[0]), "{usage}");
    let tree = ctd.ctr_ok(&["snapshots", "--snapshotter", TP, "tree"]);
    assert!(tree.contains(&chain[2]), "{tree}");
    // Usage in thin_ls's terms: a layer maps what its tree holds (the busybox binary, ~1 MiB,
    // and more); its exclusive blocks are what it wrote itself (its children share the rest).
    let ours = up.json(&["snapshot", "usage", "--json"]);
    let top = store_key_of(&list, &chain[2]).unwrap();
    let top = &ours[top["key"].as_str().unwrap()];
    assert!(top["mapped_bytes"].as_u64().unwrap() >= 1 << 20, "{ours}");
    for c in &chain {
        let k = store_key_of(&list, c).unwrap();
        let u = &ours[k["key"].as_str().unwrap()];
        assert!(
            u["exclusive_bytes"].as_u64().unwrap() > 0,
            "{c} has no block of its own: {ours}"
        );
    }

    // A container's snapshot mounted by hand is the image's tree, on ext4 over a loop device.
    {
        let m =
            ctd.mount_container_snapshot(TP, &rich.chain_id(), "by-hand", &tmp.path().join("mnt"));
        assert_eq!(m.commands[0][1..3], ["-t".to_string(), "ext4".to_string()]);
        assert!(
            m.commands[0][3].starts_with("/dev/loop"),
            "{:?}",
            m.commands
        );
        let mut seen = Tree::scan(m.path());
        seen.entries.remove("lost+found");
        Tree::assert_same("thinpool snapshot mounted", &seen, "own apply", &reference);
    }

    // A second image, as an OCI archive; containers run on both.
    let oci = tmp.path().join("busybox-oci.tar");
    bb.write_oci_archive(&oci);
    ctd.import(&oci, TP);
    assert_eq!(ctd.run(BUSYBOX, "echo", TP, &["echo", "hello"]), "hello\n");
    let out = ctd.run(
        RICH,
        "rich",
        TP,
        &[
            "sh",
            "-c",
            "cat /data/hello.txt; stat -c '%a %u:%g' /data/setuid /data/user-file; \
             ls /opaque-dir; test -e /gone-file || echo gone; \
             grep ' / ' /proc/mounts | cut -d' ' -f3",
        ],
    );
    assert_eq!(
        out,
        "hello from layer 3\n4755 0:0\n640 1000:1000\nnew1\nsub\ngone\next4\n"
    );

    // Commit an active snapshot and build on it; removal goes children first.
    ctd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        TP,
        "prepare",
        "work",
        &rich.chain_id(),
    ]);
    let w = tmp.path().join("w");
    std::fs::create_dir_all(&w).unwrap();
    ctd.mount_snapshot(TP, "work", &w);
    std::fs::write(w.join("added"), b"committed content\n").unwrap();
    assert!(Command::new("umount").arg(&w).status().unwrap().success());
    ctd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        TP,
        "commit",
        "my-layer",
        "work",
    ]);
    let after = store(up);
    let mine = store_key_of(&after, "my-layer").expect("committed");
    assert_eq!(mine["kind"], "committed");
    assert!(store_key_of(&after, "work").is_none(), "{after:#?}");
    {
        let m = ctd.mount_container_snapshot(TP, "my-layer", "child", &tmp.path().join("c"));
        assert_eq!(
            std::fs::read(m.path().join("added")).unwrap(),
            b"committed content\n"
        );
        // A committed snapshot with a child is not removed, and stays.
        let out = ctd.ctr(&["snapshots", "--snapshotter", TP, "rm", "my-layer"]);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(
            err.contains("failed precondition") || err.contains("child"),
            "{err}"
        );
        assert!(store_key_of(&store(up), "my-layer").is_some());
        // The operator's view of the same store, without containerd: `thinpool snapshot
        // tree` nests each layer under its parent, `info` has the record and the usage, `rm`
        // refuses a snapshot with a child.
        let now = store(up);
        let key_of = |k: &str| {
            store_key_of(&now, k).unwrap()["key"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let tree = up.ok(&["snapshot", "tree"]);
        let depth = |key: &str| {
            tree.lines()
                .find(|l| l.contains(&format!("\\_ {key} (")))
                .map(|l| l.find("\\_").unwrap() / 2)
        };
        let lineage = [chain[0].as_str(), &chain[1], &chain[2], "my-layer", "child"];
        for (level, k) in lineage.iter().enumerate() {
            assert_eq!(depth(&key_of(k)), Some(level), "{k} in\n{tree}");
        }
        let info = up.json(&["snapshot", "info", &key_of("my-layer")]);
        assert_eq!(info["kind"], "committed", "{info}");
        assert_eq!(info["parent"], key_of(&chain[2]).as_str(), "{info}");
        assert!(
            info["usage"]["exclusive_bytes"].as_u64().unwrap() > 0,
            "{info}"
        );
        let err = up.fails(&["snapshot", "rm", &key_of("my-layer")]);
        assert!(err.contains("child"), "{err}");
        assert_eq!(store(up), now, "a refused rm changed the store");
    } // unmounted, child removed
    ctd.ctr_ok(&["snapshots", "--snapshotter", TP, "rm", "my-layer"]);

    // Images removed and collected: every layer volume goes, the blocks come back to the pool
    // and out of the data file.
    ctd.prune_content_references();
    for img in [RICH, BUSYBOX] {
        ctd.remove_image(img);
    }
    ctd.gc();
    let left = ctd.snapshots_ls(TP);
    assert!(left.is_empty(), "snapshots left: {left:?}");
    assert!(store(up).is_empty(), "{:#?}", store(up));
    let vols: Vec<String> = up
        .json(&["vol", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(vols, ["layer-base"]);
    let base_blocks = up.vol("layer-base").1;
    assert_eq!(
        used_blocks(up),
        base_blocks,
        "data blocks in use besides the base device's"
    );
    let on_disk = data_file_bytes(up);
    assert!(
        on_disk <= (base_blocks + 16) * 65536,
        "the data file still takes {on_disk} bytes for {base_blocks} blocks"
    );
    s.up.stop();
    s.up.thin_check();
}

/// Bad requests get the codes containerd expects, and change nothing.
#[test]
fn bad_requests_are_refused_with_containerds_codes() {
    let Some(bb) = images::busybox(BUSYBOX) else {
        return;
    };
    let Some(mut s) = stack() else {
        return;
    };
    let (ctd, up) = (&s.ctd, &s.up);
    let tmp = scratch();
    let t = tmp.path().join("bb.tar");
    bb.write_docker_archive(&t);
    ctd.import(&t, TP);
    let layer = bb.chain_id();
    ctd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        TP,
        "prepare",
        "active-1",
        &layer,
    ]);
    // `ctr snapshots prepare` marks its snapshot a GC root, `ctr snapshots view` does not:
    // containerd's collector may take the view at any time until it is labelled one.
    let mut tries = 0;
    loop {
        ctd.ctr(&["snapshots", "--snapshotter", TP, "rm", "view-1"]);
        ctd.ctr_ok(&["snapshots", "--snapshotter", TP, "view", "view-1", &layer]);
        let labelled = ctd.ctr(&[
            "snapshots",
            "--snapshotter",
            TP,
            "label",
            "view-1",
            "containerd.io/gc.root=test",
        ]);
        tries += 1;
        if labelled.status.success() {
            break;
        }
        assert!(tries < 10, "{}", text(&labelled.stderr));
    }
    let before = store(up);
    let fails = |args: &[&str], want: &[&str]| {
        let mut a = vec!["snapshots", "--snapshotter", TP];
        a.extend_from_slice(args);
        let out = ctd.ctr(&a);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            want.iter().any(|w| err.contains(w)),
            "{args:?}: {err:?} says none of {want:?}"
        );
    };
    fails(&["info", "no-such-key"], &["not found"]);
    fails(&["prepare", "x", "no-such-parent"], &["not found"]);
    fails(&["prepare", "active-1", &layer], &["already exists"]);
    fails(
        &["prepare", "y", "active-1"],
        &["invalid argument", "not committed"],
    );
    fails(
        &["commit", "z", "view-1"],
        &["failed precondition", "not active"],
    );
    fails(&["commit", &layer, "active-1"], &["already exists"]);
    fails(&["rm", &layer], &["failed precondition", "child"]);
    fails(&["rm", "no-such-key"], &["not found"]);
    assert_eq!(store(up), before, "a refused request changed the store");
    // containerd hands the snapshotter the labels under `containerd.io/snapshot/`: the size
    // label from `ctr run --snapshotter-label`. One that is not a size is refused by the store.
    let run_sized = |size: &str, id: &str| {
        let label = format!("containerd.io/snapshot/thinpool.size={size}");
        let runc_root = ctd.runc_root();
        ctd.ctr(&[
            "run",
            "--snapshotter",
            TP,
            "--snapshotter-label",
            &label,
            "--runc-root",
            runc_root.to_str().unwrap(),
            BUSYBOX,
            id,
            "true",
        ])
    };
    let out = run_sized("lots", "sized");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a size label of \"lots\" was taken");
    assert!(err.contains("not a size"), "{err}");
    assert_eq!(store(up), before, "a refused request changed the store");
    // And the label working: a container bigger than the base, its filesystem grown. The
    // container stays (no --rm) with its snapshot under its own id.
    let out = run_sized("512M", "big");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let big = store_key_of(&store(up), "big").unwrap();
    assert_eq!(big["size"], 512u64 << 20);
    let printed = ctd.ctr_ok(&["snapshots", "--snapshotter", TP, "mounts", "/x", "big"]);
    let dev = printed.split_whitespace().nth(3).unwrap().to_string();
    let out = Command::new("dumpe2fs")
        .args(["-h", &dev])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let t = text(&out.stdout);
    let field = |k: &str| -> u64 {
        t.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{k} not in dumpe2fs -h {dev}:\n{t}"))
    };
    assert_eq!(field("Block count:") * field("Block size:"), 512 << 20);
    // `thinpool vol rm` of a store volume is refused with the way out.
    let err = up.fails(&["vol", "rm", big["volume"].as_str().unwrap()]);
    assert!(err.contains("thinpool snapshot rm"), "{err}");
    // containerd removes a container's snapshot from the snapshotter in its next collection.
    ctd.ctr_ok(&["containers", "rm", "big"]);
    ctd.gc();
    for k in ["active-1", "view-1"] {
        ctd.ctr_ok(&["snapshots", "--snapshotter", TP, "rm", k]);
    }
    assert!(
        store_key_of(&store(up), "big").is_none(),
        "ctr containers rm left the container's snapshot"
    );
    s.up.stop();
    s.up.thin_check();
}

/// kill -9 of the daemon in the middle of an import: after `up`, the import done again
/// succeeds, the store and the metadata agree, and nothing is left after collection.
#[test]
fn kill_9_during_an_import_then_import_again() {
    let Some(many) = images::many_layers(MANY, 24) else {
        return;
    };
    let Some(mut s) = stack() else {
        return;
    };
    let tmp = scratch();
    let t = tmp.path().join("many.tar");
    many.write_docker_archive(&t);
    let mut import = s
        .ctd
        .ctr_cmd(&["images", "import", "--snapshotter", TP, t.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for a few layers to be committed, then kill the daemon.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = store(&s.up)
            .iter()
            .filter(|e| e["kind"] == "committed")
            .count();
        if n >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "no 3 layers committed in 120 s");
        assert!(
            import.try_wait().unwrap().is_none(),
            "the import finished before the kill: make the image bigger"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = s.up.signal("KILL");
    assert!(!st.success());
    let out = import.wait_with_output().unwrap();
    assert!(!out.status.success(), "the import survived the kill");
    s.up.spawn(&UP);
    // The store after the crash: what it lists is what the metadata holds.
    let list = store(&s.up);
    let vols = s.up.json(&["vol", "ls", "--json"]);
    for e in &list {
        assert!(
            vols.as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == e["volume"]),
            "{e} has no volume"
        );
    }
    // And thin_check agrees with the pool the crash left (the daemon stopped for it); the
    // usage the store reports is thin_ls's EXCLUSIVE_BLOCKS of each snapshot's device.
    let usage = s.up.json(&["snapshot", "usage", "--json"]);
    s.up.stop();
    s.up.thin_check();
    let thin_id = |volume: &str| {
        vols.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == volume)
            .and_then(|v| v["thin_id"].as_u64())
            .unwrap()
    };
    let out = thinpool_tests::run(
        thinpool_tests::tool("thin_ls")
            .args(["--no-headers", "-o", "DEV,EXCLUSIVE_BLOCKS"])
            .arg(s.up.root.join("pool/metadata")),
    );
    assert!(out.status.success(), "thin_ls: {}", text(&out.stderr));
    let thin_ls: std::collections::BTreeMap<u64, u64> = text(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(|w| w.parse::<u64>().ok());
            Some((f.next()??, f.next()??))
        })
        .collect();
    assert!(!list.is_empty());
    for e in &list {
        let dev = thin_id(e["volume"].as_str().unwrap());
        let ours = usage[e["key"].as_str().unwrap()]["exclusive_bytes"]
            .as_u64()
            .unwrap();
        assert_eq!(
            Some(ours / 65536),
            thin_ls.get(&dev).copied(),
            "exclusive blocks of {e} (device {dev}): ours vs thin_ls {thin_ls:?}"
        );
    }
    s.up.spawn(&UP);
    assert_eq!(
        store(&s.up),
        list,
        "the store changed across a clean restart"
    );
    // containerd's client to the snapshotter reconnects on its own back-off.
    s.ctd.wait_snapshotter(TP);
    s.ctd.import(&t, TP);
    let out = s.ctd.run(MANY, "after-crash", TP, &["cat", "/layers/top"]);
    assert_eq!(out, "top is 24\n");
    s.ctd.prune_content_references();
    s.ctd.remove_image(MANY);
    s.ctd.gc();
    // containerd cleans up the active snapshots the crash left (their keys are its own).
    let left = s.ctd.snapshots_ls(TP);
    for k in &left {
        s.ctd.ctr(&["snapshots", "--snapshotter", TP, "rm", &k.key]);
    }
    assert!(store(&s.up).is_empty(), "leaked: {:#?}", store(&s.up));
    let vols: Vec<String> =
        s.up.json(&["vol", "ls", "--json"])
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect();
    assert_eq!(vols, ["layer-base"], "orphaned thin devices");
    s.up.stop();
    s.up.thin_check();
}
