//! Small host file systems for tests of what the pool does when the file system under its
//! files fills: a fresh ext4 in an image file, loop-mounted, unmounted when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::daemon::is_root;
use crate::{require_tools, run_ok, skip_or_fail, text, tool, zeroed_file};

/// A mount point, unmounted when dropped.
pub struct Mounted(pub PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The test has `tools` and can loop-mount (root); false, after saying why, when it must not
/// run.
pub fn can_loop_mount(tools: &[&str]) -> bool {
    if !require_tools(tools) {
        return false;
    }
    if !is_root() {
        skip_or_fail("this test needs root (it loop-mounts a small ext4)");
        return false;
    }
    true
}

/// A fresh ext4 of `size` bytes (no blocks reserved for root) mounted at `dir/name`.
pub fn small_ext4(dir: &Path, name: &str, size: u64) -> Mounted {
    let img = zeroed_file(&dir.join(format!("{name}.img")), size);
    run_ok(tool("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(&img));
    let mnt = dir.join(name);
    std::fs::create_dir(&mnt).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt),
    );
    Mounted(mnt)
}

/// One field of `df -B1 --output=FIELD` for the file system holding `p`, in bytes: `size`,
/// or `avail` (what the daemon reads as `f_bavail`).
pub fn df(p: &Path, field: &str) -> u64 {
    let out = run_ok(
        Command::new("df")
            .args(["-B1", &format!("--output={field}")])
            .arg(p),
    );
    text(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}
