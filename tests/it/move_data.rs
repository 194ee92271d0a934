//! `thinpool pool move-data` as a user runs it: `thinpool up` on a fresh root, data written
//! through NBD with qemu-io, the data moved to another file while fio writes (and verifies)
//! through NBD, the patterns read back, SIGTERM, `pool/data` → the new file, `thin_check`
//! clean, reopened with the data still there; then a second move without a daemon.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thinpool_tests::{require_tools, run, run_ok, scratch, text, thinpool, tool};

/// `thinpool up` on `root`, waiting for its sockets.
fn up(root: &Path, extra: &[&str]) -> Child {
    let mut c = cmd(root, &["up"]);
    c.args(extra).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = c.spawn().expect("start thinpool up");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(root.join("nbd.sock").exists() && root.join("control.sock").exists()) {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!("thinpool up exited ({status}): {}", text(&out.stderr));
        }
        assert!(
            Instant::now() < deadline,
            "thinpool up did not start in 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// SIGTERM, expect exit 0.
fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "thinpool up did not stop in 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "thinpool up: {}", text(&out.stderr));
}

fn cmd(root: &Path, args: &[&str]) -> Command {
    let mut c = thinpool(["--root".as_ref(), root.as_os_str()]);
    c.args(args).env_remove("THINPOOL_ROOT");
    c
}

fn uri(root: &Path, export: &str) -> String {
    format!(
        "nbd+unix:///{export}?socket={}",
        root.join("nbd.sock").display()
    )
}

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri);
    let s = text(&run_ok(&mut c).stdout);
    assert!(
        !s.contains("Pattern verification failed") && !s.contains("failed"),
        "qemu-io {cmds:?}: {s}"
    );
}

/// What every reader must see in `v` and `s`.
fn read_back(root: &Path) {
    qemu_io(
        &uri(root, "s"),
        &[
            "read -P 0x5a 0 1M",
            "read -P 0xa5 3M 100k",
            "read -P 0 2M 1M",
        ],
    );
    qemu_io(
        &uri(root, "v"),
        &[
            "read -P 0x11 0 64k",
            "read -P 0x5a 64k 960k",
            "read -P 0xa5 3M 100k",
        ],
    );
}

fn thin_check(root: &Path) {
    run_ok(tool("thin_check").arg(root.join("pool/metadata")));
}

#[test]
fn move_data_online_under_fio() {
    if !require_tools(&["qemu-io", "fio", "thin_check"]) {
        return;
    }
    let dir = scratch();
    let root = dir.path().join("root");
    let other: PathBuf = dir.path().join("other").join("data.img");
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    let child = up(&root, &["--data-size", "1G", "--metadata-size", "64M"]);
    run_ok(&mut cmd(&root, &["vol", "create", "v", "--size", "512M"]));
    qemu_io(
        &uri(&root, "v"),
        &["write -P 0x5a 0 1M", "write -P 0xa5 3M 100k"],
    );
    run_ok(&mut cmd(&root, &["vol", "snapshot", "v", "s"]));
    qemu_io(&uri(&root, "v"), &["write -P 0x11 0 64k"]);

    // fio writes 256 MiB of random 64 KiB blocks with checksums while the data moves.
    let fio_dir = scratch();
    let fio = thinpool_tests::nbd::spawn_fio_verify("move", &uri(&root, "v"), fio_dir.path());
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let out = run_ok(&mut cmd(
        &root,
        &["pool", "move-data", other.to_str().unwrap()],
    ));
    eprintln!("move-data took {:?}", started.elapsed());
    let said = text(&out.stdout);
    assert!(said.contains("moved the data"), "{said}");
    assert!(
        said.contains("pool/data.old"),
        "the kept old file is named: {said}"
    );
    let out = fio.wait_with_output().unwrap();
    assert!(
        out.status.success() && !text(&out.stdout).contains("verify: bad"),
        "fio while moving: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    read_back(&root);
    stop(child);

    let canon = std::fs::canonicalize(&other).unwrap();
    assert_eq!(std::fs::read_link(root.join("pool/data")).unwrap(), canon);
    thin_check(&root);
    // The old file is not needed any more.
    std::fs::remove_file(root.join("pool/data.old")).unwrap();
    let child = up(&root, &[]);
    read_back(&root);
    stop(child);

    // Without a daemon: moved again, to a file that does not exist yet.
    let third = dir.path().join("third.img");
    let out = run_ok(&mut cmd(
        &root,
        &["pool", "move-data", third.to_str().unwrap()],
    ));
    assert!(
        !text(&out.stdout).contains("data.old"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        std::fs::read_link(root.join("pool/data")).unwrap(),
        std::fs::canonicalize(&third).unwrap()
    );
    thin_check(&root);
    // Refused: inside the pool; the data file itself. Nothing changes.
    for (bad, why) in [
        (root.join("pool/x.img"), "inside the pool's directory"),
        (third.clone(), "this is the pool's data device"),
    ] {
        let out = run(&mut cmd(
            &root,
            &["pool", "move-data", bad.to_str().unwrap()],
        ));
        assert!(
            !out.status.success(),
            "moving to {} should fail",
            bad.display()
        );
        assert!(text(&out.stderr).contains(why), "{}", text(&out.stderr));
    }
    let child = up(&root, &[]);
    read_back(&root);
    stop(child);
    thin_check(&root);
}
