//! Volumes as filesystems (issue 12): `thinpool mount --mkfs ext4|xfs`, trees of files written
//! and compared, snapshots of mounted filesystems (frozen: they mount without journal
//! recovery), `vol resize` while mounted and while a writer runs, `--resize-fs` offline,
//! `fstrim` returning blocks, a kill -9 while a filesystem is written with fsync, a graceful
//! stop with a busy mount, and the bad inputs. The oracles are the real tools: `mount`,
//! `df`/statvfs, `e2fsck -fn`, `xfs_repair -n`, `dumpe2fs`, `blockdev`, `losetup`, `fstrim`,
//! `thin_check`.
//!
//! Needs root, `/dev/fuse` and loop devices (skipped loudly without, a failure under
//! `CI=true`).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use thinpool_tests::daemon::{
    Up, df_size, fuse_usable, is_mounted, loop_devices, may_grow_ext4_online,
};
use thinpool_tests::{require_tools, run_ok, test_seed, text, tool};

const MIB: u64 = 1 << 20;

/// The pool of every test here: small sparse files.
const POOL: [&str; 4] = ["--data-size", "2G", "--metadata-size", "32M"];

/// Undoes, when dropped, what a failed test leaves: filesystems mounted under the test's
/// folder (lazily) and loop devices over the export's files.
struct Cleanup {
    under: PathBuf,
    files: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for dir in mounts.lines().filter_map(|l| l.split(' ').nth(1)).rev() {
            if Path::new(dir).starts_with(&self.under) && Path::new(dir) != self.files {
                let _ = Command::new("umount").args(["-l", dir]).status();
            }
        }
        for (dev, file) in loop_devices() {
            if file.starts_with(&self.files) {
                let _ = Command::new("losetup").arg("-d").arg(dev).status();
            }
        }
    }
}

fn usable() -> bool {
    fuse_usable()
        && require_tools(&[
            "losetup",
            "mount",
            "mkfs.ext4",
            "mkfs.xfs",
            "e2fsck",
            "dumpe2fs",
            "xfs_repair",
            "fstrim",
            "blockdev",
            "thin_check",
            "python3",
        ])
}

fn start(extra: &[&str]) -> (Up, Cleanup) {
    let up = Up::start(&[&POOL[..], extra].concat());
    let guard = Cleanup {
        under: up.dir.path().to_path_buf(),
        files: up.files(),
    };
    (up, guard)
}

/// A new empty folder in the test's scratch folder.
fn folder(up: &Up, name: &str) -> PathBuf {
    let d = up.dir.path().join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// What is mounted on `dir`: (source, fstype).
fn mounted(dir: &Path) -> Option<(String, String)> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(1) == Some(&dir.to_str().unwrap())).then(|| (f[0].to_string(), f[2].to_string()))
    })
}

/// A tree of files: relative path → content.
type Tree = BTreeMap<PathBuf, Vec<u8>>;

/// Write a tree of `files` files (1 B – 200 KiB, in nested folders) under `dir`, `sync`.
fn write_tree(dir: &Path, seed: u64, files: usize) -> Tree {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = Tree::new();
    for i in 0..files {
        let rel = PathBuf::from(format!("d{}/e{}/f{i}", i % 7, i % 3));
        let len = if i % 10 == 0 {
            rng.random_range(64 << 10..200 << 10)
        } else {
            rng.random_range(1..8192)
        };
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        let p = dir.join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &data).unwrap();
        t.insert(rel, data);
    }
    run_ok(Command::new("sync").arg("-f").arg(dir));
    t
}

/// Every file under `dir` (but `lost+found`).
fn read_tree(dir: &Path) -> Tree {
    fn walk(base: &Path, d: &Path, t: &mut Tree) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.file_name().unwrap() == "lost+found" {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, t);
            } else {
                t.insert(
                    p.strip_prefix(base).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut t = Tree::new();
    walk(dir, dir, &mut t);
    t
}

fn assert_tree(dir: &Path, want: &Tree, what: &str) {
    let got = read_tree(dir);
    let names = |t: &Tree| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&got),
        names(want),
        "{what}: the files in {}",
        dir.display()
    );
    for (p, data) in want {
        assert!(got[p] == *data, "{what}: {} differs", p.display());
    }
}

fn blockdev(arg: &str, dev: &str) -> u64 {
    let out = run_ok(Command::new("blockdev").arg(arg).arg(dev));
    text(&out.stdout).trim().parse().unwrap()
}

/// A writer in `dir`: `count` files of 256 KiB, each fsynced, in the background.
fn writer(dir: &Path, count: usize) -> std::process::Child {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "for i in $(seq 1 {count}); do dd if=/dev/urandom of=w$i bs=64k count=4 conv=fsync status=none || exit 1; done"
        ))
        .current_dir(dir)
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_ok(mut c: std::process::Child, what: &str) {
    let st = c.wait().unwrap();
    assert!(st.success(), "{what} exited {st}");
}

fn fsck_clean(up: &Up, vol: &str, fstype: &str) {
    let file = up.file(vol);
    match fstype {
        "xfs" => run_ok(tool("xfs_repair").arg("-n").arg(&file)),
        _ => run_ok(tool("e2fsck").arg("-fn").arg(&file)),
    };
}

fn pool_used(up: &Up) -> u64 {
    up.json(&["pool", "status", "--json"])["used_data_blocks"]
        .as_u64()
        .unwrap()
}

/// mkfs through `thinpool mount`, a tree, a frozen snapshot mounted elsewhere while the origin
/// changes, growth while a writer runs, fstrim, umount, fsck, thin_check.
fn mounted_filesystem_life(fstype: &str) {
    let seed = test_seed();
    let (mut up, _guard) = start(&[]);
    // XFS wants at least 300 MB.
    let size = 320 * MIB;
    up.ok(&["vol", "create", "fs", "--size", "320M"]);
    let dir = folder(&up, "mnt");
    let snap_dir = folder(&up, "snap");
    let d = dir.to_str().unwrap();
    let out = up.ok(&["mount", "fs", d, "--mkfs", fstype, "-o", "noatime"]);
    let (dev, t) = mounted(&dir).expect("mounted");
    assert_eq!(t, fstype);
    assert!(out.contains(&dev) && out.contains(d), "{out}");
    assert_eq!(blockdev("--getsize64", &dev), size);
    // The loop device does direct I/O to the volume's file.
    let lo = run_ok(Command::new("losetup").args(["-l", "-n", "-O", "DIO,BACK-FILE", &dev]));
    assert!(
        text(&lo.stdout).trim_start().starts_with('1'),
        "{}",
        text(&lo.stdout)
    );
    let v = up.volume("fs");
    assert_eq!(v["loop_device"], dev.as_str());
    assert_eq!(v["mount_point"], d);
    let info = up.ok(&["vol", "info", "fs"]);
    assert!(info.contains(&dev) && info.contains(d), "{info}");

    // A tree, then a snapshot of the mounted filesystem: it is frozen, so the snapshot needs
    // no journal recovery (ext4 clears needs_recovery on freeze) and mounts as it was.
    let tree = write_tree(&dir, seed, 300);
    up.ok(&["vol", "snapshot", "fs", "snap"]);
    if fstype == "ext4" {
        let feats = |vol: &str| {
            let out = run_ok(tool("dumpe2fs").arg("-h").arg(up.file(vol)));
            text(&out.stdout)
                .lines()
                .find(|l| l.starts_with("Filesystem features:"))
                .unwrap()
                .to_string()
        };
        assert!(feats("fs").contains("needs_recovery"), "the mounted origin");
        assert!(
            !feats("snap").contains("needs_recovery"),
            "the snapshot was not frozen: {}",
            feats("snap")
        );
        fsck_clean(&up, "snap", fstype);
    }
    // The origin changes: a new file, one rewritten, one removed.
    std::fs::write(dir.join("new"), b"after the snapshot").unwrap();
    let first = tree.keys().next().unwrap();
    std::fs::write(dir.join(first), b"rewritten").unwrap();
    let last = tree.keys().last().unwrap();
    std::fs::remove_file(dir.join(last)).unwrap();
    run_ok(Command::new("sync").arg("-f").arg(&dir));
    // Read-only: the loop device too, so a log to replay would fail the mount (ext4:
    // clean since frozen; XFS keeps a log to recover even after a freeze, and says so).
    let snap_d = snap_dir.to_str().unwrap();
    if fstype == "xfs" {
        let err = up.fails(&["mount", "snap", snap_d, "--read-only"]);
        assert!(err.contains("-o norecovery"), "{err}");
        up.ok(&["mount", "snap", snap_d, "--read-only", "-o", "norecovery"]);
    } else {
        up.ok(&["mount", "snap", snap_d, "--read-only"]);
    }
    assert_tree(&snap_dir, &tree, "the snapshot");
    let mut changed = tree.clone();
    changed.insert("new".into(), b"after the snapshot".to_vec());
    changed.insert(first.clone(), b"rewritten".to_vec());
    changed.remove(last);
    assert_tree(&dir, &changed, "the origin");
    assert!(
        std::fs::write(snap_dir.join("x"), b"x").is_err(),
        "a read-only mount takes no write"
    );
    assert_eq!(blockdev("--getro", &mounted(&snap_dir).unwrap().0), 1);

    // Growth while a writer runs.
    let before = df_size(&dir);
    let w = writer(&dir, 40);
    std::thread::sleep(Duration::from_millis(300));
    if fstype == "xfs" || may_grow_ext4_online() {
        let out = up.ok(&["vol", "resize", "fs", "+256M"]);
        assert!(
            out.contains("320.0 MiB -> 576.0 MiB") && out.contains(&format!("filesystem on {d}")),
            "{out}"
        );
        wait_ok(w, "the writer");
        assert!(
            df_size(&dir) > before + 200 * MIB,
            "df: {} -> {}",
            before,
            df_size(&dir)
        );
    } else {
        // This host's kernel refuses: the volume and its loop device grow, the filesystem is
        // grown offline after the umount.
        eprintln!(
            "NOTE: no CAP_SYS_RESOURCE here: ext4 cannot grow while mounted; checking the \
             refusal and the offline growth instead"
        );
        let err = up.fails(&["vol", "resize", "fs", "+256M"]);
        assert!(
            err.contains("CAP_SYS_RESOURCE") && err.contains("--resize-fs"),
            "{err}"
        );
        wait_ok(w, "the writer");
        assert_eq!(up.vol("fs").0, size + 256 * MIB);
        assert_eq!(blockdev("--getsize64", &dev), size + 256 * MIB);
        assert_eq!(df_size(&dir), before);
    }
    assert_eq!(up.vol("fs").0, size + 256 * MIB);
    for i in 1..=40 {
        assert_eq!(
            std::fs::metadata(dir.join(format!("w{i}"))).unwrap().len(),
            256 << 10
        );
    }

    // fstrim after deleting files: blocks go back to the pool and out of the data file.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 1);
    let mut big = vec![0u8; 32 * MIB as usize];
    rng.fill(&mut big[..]);
    std::fs::write(dir.join("big"), &big).unwrap();
    run_ok(Command::new("sync").arg("-f").arg(&dir));
    run_ok(Command::new("fstrim").arg(&dir));
    let (used, data_blocks) = (
        pool_used(&up),
        std::fs::metadata(up.root.join("pool/data"))
            .unwrap()
            .blocks(),
    );
    std::fs::remove_file(dir.join("big")).unwrap();
    run_ok(Command::new("sync").arg("-f").arg(&dir));
    // XFS trims a freed extent only once its log checkpoint is on disk (it is "busy" until
    // then), which `sync` does not wait for: fstrim again until the blocks come back.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (used2, data_blocks2) = loop {
        let out = run_ok(Command::new("fstrim").arg("-v").arg(&dir));
        let used2 = pool_used(&up);
        let data_blocks2 = std::fs::metadata(up.root.join("pool/data"))
            .unwrap()
            .blocks();
        if used2 + 32 * MIB / (64 << 10) - 16 <= used || Instant::now() > deadline {
            assert!(
                used2 + 32 * MIB / (64 << 10) - 16 <= used,
                "pool blocks used {used} -> {used2} after fstrim ({})",
                text(&out.stdout)
            );
            break (used2, data_blocks2);
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    eprintln!("fstrim: pool blocks used {used} -> {used2}");
    assert!(
        data_blocks2 * 512 + 30 * MIB <= data_blocks * 512,
        "data file allocated {} -> {} bytes",
        data_blocks * 512,
        data_blocks2 * 512
    );

    // rm is refused while mounted; umount both (by folder and by name), fsck clean.
    let err = up.fails(&["vol", "rm", "fs"]);
    assert!(
        err.contains(&format!("mounted on {d}")) && err.contains("thinpool umount"),
        "{err}"
    );
    up.ok(&["umount", d]);
    up.ok(&["umount", "snap"]);
    assert!(mounted(&dir).is_none() && mounted(&snap_dir).is_none());
    assert!(
        loop_devices()
            .iter()
            .all(|(_, f)| !f.starts_with(up.files())),
        "{:?}",
        loop_devices()
    );
    assert!(up.volume("fs").get("loop_device").is_none());
    fsck_clean(&up, "fs", fstype);
    if fstype == "xfs" {
        // Its log was left to recover (mounted with norecovery): a read-write mount replays it.
        up.ok(&["mount", "snap", snap_d]);
        up.ok(&["umount", "snap"]);
    }
    fsck_clean(&up, "snap", fstype);

    if fstype == "ext4" {
        // Offline: a shrink that would cut the filesystem is refused; --resize-fs grows it to
        // the volume, then shrinks it with the volume.
        let err = up.fails(&["vol", "resize", "fs", "300M"]);
        assert!(
            err.contains("would cut it") && err.contains("--resize-fs"),
            "{err}"
        );
        assert_eq!(up.vol("fs").0, size + 256 * MIB);
        let out = up.ok(&["vol", "resize", "fs", "512M", "--resize-fs"]);
        assert!(
            out.contains("resized its ext4 filesystem") && out.contains("-> 512.0 MiB"),
            "{out}"
        );
        let out = up.ok(&["vol", "resize", "fs", "300M", "--shrink-fs"]);
        assert!(out.contains("512.0 MiB -> 300.0 MiB"), "{out}");
        assert_eq!(up.vol("fs").0, 300 * MIB);
        fsck_clean(&up, "fs", fstype);
        up.ok(&["mount", "fs", d]);
        assert!(df_size(&dir) > 250 * MIB && df_size(&dir) <= 300 * MIB);
        assert_eq!(read_tree(&dir)[Path::new("new")], b"after the snapshot");
        up.ok(&["umount", "fs"]);
    }
    up.stop();
    up.thin_check();
    assert!(!is_mounted(&dir));
}

#[test]
fn ext4_mkfs_tree_frozen_snapshot_grow_fstrim_fsck() {
    if usable() {
        mounted_filesystem_life("ext4");
    }
}

#[test]
fn xfs_mkfs_tree_frozen_snapshot_grow_fstrim_fsck() {
    if usable() {
        mounted_filesystem_life("xfs");
    }
}

/// The writer of the kill -9 test: files `f<i>` of 64 KiB with content from `i`, each fsynced
/// (file and folder), then its number appended to a log outside the filesystem (fsynced too).
const FSYNC_WRITER: &str = r#"
import os, sys, random
d, log = sys.argv[1], sys.argv[2]
lf = open(log, "a")
i = 0
while True:
    data = random.Random(i).randbytes(65536)
    p = os.path.join(d, "f%d" % i)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        dfd = os.open(d, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        sys.exit(0)
    lf.write("%d\n" % i)
    lf.flush()
    os.fsync(lf.fileno())
    i += 1
"#;

#[test]
fn kill9_while_mounted_and_fsyncing_then_up_mounts_again() {
    if !usable() {
        return;
    }
    let (mut up, _guard) = start(&[]);
    up.ok(&["vol", "create", "data", "--size", "256M"]);
    let dir = folder(&up, "mnt");
    up.ok(&["mount", "data", dir.to_str().unwrap(), "--mkfs", "ext4"]);
    let log = up.dir.path().join("fsynced.log");
    let mut w = tool("python3")
        .args(["-c", FSYNC_WRITER])
        .arg(&dir)
        .arg(&log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .count()
        < 50
    {
        assert!(Instant::now() < deadline, "the writer is too slow");
        std::thread::sleep(Duration::from_millis(50));
    }
    up.signal("KILL");
    let _ = w.kill();
    let _ = w.wait();
    let done: Vec<u32> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();

    up.spawn(&POOL);
    let logged = up.log_text();
    assert!(
        logged.contains("detaching a filesystem left mounted over the dead FUSE export")
            && logged.contains("attached again"),
        "{logged}"
    );
    let (dev, t) = mounted(&dir).expect("mounted again at the same place");
    assert_eq!(t, "ext4");
    assert_eq!(up.volume("data")["loop_device"], dev.as_str());
    let check = r#"
import sys, random
d = sys.argv[1]
for i in sys.argv[2:]:
    want = random.Random(int(i)).randbytes(65536)
    got = open("%s/f%s" % (d, i), "rb").read()
    if got != want:
        print("f%s differs (%d bytes)" % (i, len(got)))
        sys.exit(1)
"#;
    let mut c = tool("python3");
    c.args(["-c", check]).arg(&dir);
    c.args(done.iter().map(u32::to_string));
    run_ok(&mut c);
    eprintln!("{} fsynced files intact after kill -9 and up", done.len());
    up.ok(&["umount", "data"]);
    fsck_clean(&up, "data", "ext4");
    up.stop();
    up.thin_check();
}

#[test]
fn graceful_stop_waits_for_a_busy_mount_and_up_mounts_again() {
    if !usable() {
        return;
    }
    let (mut up, _guard) = start(&[]);
    up.ok(&["vol", "create", "v", "--size", "64M"]);
    let dir = folder(&up, "mnt");
    up.ok(&["mount", "v", dir.to_str().unwrap(), "--mkfs", "ext4"]);
    std::fs::write(dir.join("kept"), b"kept").unwrap();
    let mut busy = Command::new("sleep")
        .arg("600")
        .current_dir(&dir)
        .spawn()
        .unwrap();
    let pid = up.child.as_ref().unwrap().id();
    run_ok(Command::new("kill").args(["-TERM", &pid.to_string()]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !up.log_text().contains("not stopping yet") {
        assert!(
            Instant::now() < deadline,
            "no word of the busy mount:\n{}",
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = up.log_text();
    assert!(
        log.contains(&format!("pid {} (sleep)", busy.id())),
        "the log names who holds it:\n{log}"
    );
    assert!(
        up.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "still serving"
    );
    assert_eq!(std::fs::read(dir.join("kept")).unwrap(), b"kept");
    busy.kill().unwrap();
    busy.wait().unwrap();
    // Free now: it stops by itself, everything unmounted and detached.
    let st = up.wait_exit("once the busy mount was free");
    assert!(st.success(), "{st}:\n{}", up.log_text());
    assert!(mounted(&dir).is_none());
    assert!(
        loop_devices()
            .iter()
            .all(|(_, f)| !f.starts_with(up.files()))
    );
    // Offline (no daemon, no files): the volume exported and checked.
    let img = up.dir.path().join("v.img");
    up.ok(&["vol", "export", "v", img.to_str().unwrap()]);
    run_ok(tool("e2fsck").arg("-fn").arg(&img));
    // The mount is remembered: up mounts it again.
    up.spawn(&POOL);
    assert!(mounted(&dir).is_some(), "{}", up.log_text());
    assert_eq!(std::fs::read(dir.join("kept")).unwrap(), b"kept");
    up.ok(&["umount", dir.to_str().unwrap()]);
    up.stop();
    // Forgotten after umount: not mounted again.
    up.spawn(&POOL);
    assert!(mounted(&dir).is_none());
    up.stop();
    up.thin_check();
}

/// Everything the pool and the host show, to prove a refused command changed nothing.
fn state(up: &Up) -> String {
    let mut s = up.ok(&["vol", "ls", "--json"]);
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    s += &mounts
        .lines()
        .filter(|l| l.contains(up.dir.path().to_str().unwrap()))
        .collect::<Vec<_>>()
        .join("\n");
    s += &format!(
        "{:?}",
        loop_devices()
            .iter()
            .filter(|(_, f)| f.starts_with(up.files()))
            .collect::<Vec<_>>()
    );
    s
}

#[test]
fn bad_input_is_refused_clearly_and_changes_nothing() {
    if !usable() {
        return;
    }
    let (mut up, _guard) = start(&[]);
    up.ok(&["vol", "create", "a", "--size", "64M"]);
    up.ok(&["vol", "create", "b", "--size", "64M"]);
    up.ok(&["vol", "create", "raw", "--size", "64M"]);
    run_ok(
        Command::new("dd")
            .args([
                "if=/dev/urandom",
                "bs=64k",
                "count=4",
                "conv=notrunc,fsync",
                "status=none",
            ])
            .arg(format!("of={}", up.file("raw").display())),
    );
    let dir = folder(&up, "mnt");
    let other = folder(&up, "other");
    let d = dir.to_str().unwrap();
    up.ok(&["mount", "a", d, "--mkfs", "ext4"]);
    // Attach by hand: a loop device, sized and read-only as asked, listed.
    let dev = up
        .ok(&["vol", "attach", "b", "--read-only"])
        .trim()
        .to_string();
    assert!(dev.starts_with("/dev/loop"), "{dev}");
    assert_eq!(blockdev("--getsize64", &dev), 64 * MIB);
    assert_eq!(blockdev("--getro", &dev), 1);
    let ls = up.ok(&["vol", "ls"]);
    assert!(
        ls.contains("LOOP") && ls.contains(&dev) && ls.contains(d),
        "{ls}"
    );
    let before = state(&up);

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["mount", "nope", other.to_str().unwrap()],
            "no volume named",
        ),
        (
            vec!["mount", "raw", "/nonexistent/dir", "--mkfs", "ext4"],
            "does not exist",
        ),
        (
            vec!["mount", "raw", d, "--mkfs", "ext4", "--force"],
            "in use",
        ),
        (
            vec!["mount", "raw", other.to_str().unwrap(), "--mkfs", "ext4"],
            "holds data",
        ),
        (
            vec!["mount", "raw", other.to_str().unwrap()],
            "holds no filesystem",
        ),
        (
            vec!["mount", "raw", other.to_str().unwrap(), "--mkfs", "btrfs"],
            "ext4 or xfs",
        ),
        (
            vec!["mount", "a", other.to_str().unwrap()],
            "already mounted",
        ),
        (vec!["vol", "resize", "a", "32M"], "only grows"),
        (vec!["vol", "rm", "a"], "thinpool umount"),
        (vec!["vol", "rm", "b"], "thinpool vol detach b"),
        (vec!["vol", "detach", "a"], "thinpool umount"),
        (vec!["vol", "detach", "raw"], "not attached"),
        (vec!["vol", "attach", "b"], "already attached"),
        (vec!["umount", other.to_str().unwrap()], "neither a volume"),
        (
            vec!["vol", "resize", "raw", "1M", "--resize-fs"],
            "holds no filesystem",
        ),
    ];
    for (args, want) in &cases {
        let err = up.fails(args);
        assert!(
            err.contains(want),
            "thinpool {args:?}: wanted {want:?} in: {err}"
        );
        assert_eq!(state(&up), before, "thinpool {args:?} changed something");
    }
    eprintln!("{} refusals checked", cases.len());
    up.ok(&["vol", "detach", "b"]);
    up.ok(&["umount", "a"]);
    up.stop();

    // Without a daemon, or without the FUSE export.
    let err = up.fails(&["mount", "a", d]);
    assert!(err.contains("needs the daemon"), "{err}");
    let err = up.fails(&["vol", "attach", "a"]);
    assert!(err.contains("needs the daemon"), "{err}");
    up.spawn(&["--no-fuse"]);
    let err = up.fails(&["mount", "a", d]);
    assert!(err.contains("--no-fuse"), "{err}");
    up.stop();
    up.thin_check();
}

/// The daemon in a mount namespace of its own whose `/dev` is a fresh tmpfs holding only
/// `/dev/null` and, if `fuse`, `/dev/fuse`: no loop device can be found or made there.
fn private_dev(fuse: bool) -> Vec<&'static str> {
    let script = if fuse {
        "mount -t tmpfs -o mode=755 none /dev && mknod -m 666 /dev/null c 1 3 && \
         mknod -m 666 /dev/fuse c 10 229 && exec \"$@\""
    } else {
        "mount -t tmpfs -o mode=755 none /dev && mknod -m 666 /dev/null c 1 3 && exec \"$@\""
    };
    vec![
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ]
}

/// No free loop device, and no FUSE at all: clear errors, nothing changed.
#[test]
fn no_free_loop_device_and_no_fuse_are_clear_errors() {
    if !usable() || !require_tools(&["unshare", "mknod"]) {
        return;
    }
    let (mut up, _guard) = start(&[]);
    up.ok(&["vol", "create", "v", "--size", "64M"]);
    up.stop();
    let dir = folder(&up, "mnt");
    let d = dir.to_str().unwrap();

    up.spawn_wrapped(&private_dev(true), &POOL);
    let before = up.ok(&["vol", "ls", "--json"]);
    for args in [
        vec!["vol", "attach", "v"],
        vec!["mount", "v", d, "--mkfs", "ext4"],
    ] {
        let err = up.fails(&args);
        assert!(
            err.contains("no free loop device") && err.contains("losetup -a"),
            "thinpool {args:?}: {err}"
        );
        assert_eq!(
            up.ok(&["vol", "ls", "--json"]),
            before,
            "{args:?} changed it"
        );
    }
    assert_eq!(
        up.vol("v").1,
        0,
        "mkfs wrote to a volume it could not mount"
    );
    assert!(mounted(&dir).is_none());
    up.stop();

    up.spawn_wrapped(&private_dev(false), &POOL);
    assert!(
        up.log_text().contains("not serving volumes as files"),
        "{}",
        up.log_text()
    );
    let err = up.fails(&["mount", "v", d, "--mkfs", "ext4"]);
    assert!(err.contains("/dev/fuse"), "{err}");
    assert_eq!(up.ok(&["vol", "ls", "--json"]), before);
    up.stop();
    up.thin_check();
}
