//! The host file system under the pool's sparse files fills up (issue 11), as it did under
//! Docker's loop files: `thinpool up` runs on a pool in a 96 MiB ext4 (loop-mounted, so root
//! only) holding a 20 MiB filler, and a client writes 120 MiB. The client must get ENOSPC (not
//! EIO), the daemon must answer `pool status` and new clients throughout, and once the filler
//! is deleted, writes and flushes work again without a restart; SIGTERM exits 0 and
//! `thin_check` passes. `up` warns at start that the sparse files can outgrow the host.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thinpool_tests::nbd::qemu_io;
use thinpool_tests::{
    require_tools, run, run_ok, scratch, skip_or_fail, text, thinpool_in, tool, zeroed_file,
};

const MIB: u64 = 1 << 20;

/// A loop-mounted file system, unmounted when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn status(root: &Path) -> serde_json::Value {
    let out = run_ok(&mut thinpool_in(root, &["pool", "status", "--json"]));
    serde_json::from_slice(&out.stdout).expect("pool status --json parses")
}

#[test]
fn a_full_host_file_system_gives_enospc_and_the_pool_recovers() {
    if !require_tools(&["mkfs.ext4", "qemu-io", "nbdinfo", "thin_check"]) {
        return;
    }
    if text(&run_ok(Command::new("id").arg("-u")).stdout).trim() != "0" {
        skip_or_fail("this test needs root (it loop-mounts a small ext4)");
        return;
    }
    let dir = scratch();
    let img = zeroed_file(&dir.path().join("fs.img"), 96 * MIB);
    run_ok(tool("mkfs.ext4").args(["-q", "-F"]).arg(&img));
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt),
    );
    let _mounted = Mounted(mnt.clone());
    let root = mnt.join("root");
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![1u8; 20 * MIB as usize]).unwrap();

    let mut up: Child = thinpool_in(
        &root,
        &["up", "--data-size", "256M", "--metadata-size", "16M"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start thinpool up");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(root.join("nbd.sock").exists() && root.join("control.sock").exists()) {
        assert!(up.try_wait().unwrap().is_none(), "thinpool up exited");
        assert!(Instant::now() < deadline, "thinpool up did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    run_ok(&mut thinpool_in(
        &root,
        &["vol", "create", "v", "--size", "200M"],
    ));
    let uri = format!("nbd+unix:///v?socket={}", root.join("nbd.sock").display());

    // 120 MiB into a file system with about 70 MiB free.
    let out = qemu_io(
        &uri,
        false,
        &["write -P 0x5a 0 120M".into(), "flush".into()],
    );
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    eprintln!("qemu-io on the full host:\n{said}");
    assert!(
        said.contains("No space left on device"),
        "the client must see ENOSPC:\n{said}"
    );
    assert!(!said.contains("Input/output error"), "not EIO:\n{said}");
    // The daemon answers, the pool stays writable, new clients connect.
    let st = status(&root);
    assert_eq!(st["mode"], "rw", "{st}");
    let failure = st["failure"].as_str().unwrap_or_default();
    assert!(
        failure.starts_with("host file system full: ")
            && failure.contains(&root.display().to_string()),
        "pool status names the full host file system and the file: {st}"
    );
    run_ok(tool("nbdinfo").arg(&uri));

    // Space again: the same requests succeed, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let out = qemu_io(
        &uri,
        false,
        &["write -P 0x6b 100M 8M".into(), "flush".into()],
    );
    assert!(
        out.status.success() && !text(&out.stdout).contains("failed"),
        "write after the host has space again:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = qemu_io(&uri, true, &["read -P 0x6b 100M 8M".into()]);
    let said = text(&out.stdout);
    assert!(
        out.status.success() && !said.contains("failed") && !said.contains("mismatch"),
        "{said}"
    );
    let st = status(&root);
    assert_eq!(
        (&st["mode"], &st["failure"]),
        (&"rw".into(), &serde_json::Value::Null),
        "{st}"
    );

    let pid = up.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let done = up.wait_with_output().unwrap();
    let log = text(&done.stderr);
    assert!(
        done.status.success(),
        "thinpool up after SIGTERM: {}\n{log}",
        done.status,
    );
    // It said so at start: 272 MiB of sparse files on a 96 MiB file system.
    assert!(
        log.contains("the pool's sparse files may grow by")
            && log.contains("writes will fail with ENOSPC before the pool is full"),
        "no warning about the host's free space:\n{log}"
    );
    let check = run(tool("thin_check").arg(root.join("pool/metadata")));
    assert!(check.status.success(), "{}", text(&check.stderr));
}
