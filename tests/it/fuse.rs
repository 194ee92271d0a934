//! Volumes as files (issue 12): `thinpool up` mounts its FUSE export on `ROOT/files`, and the
//! files are driven with the tools a user has: `dd`, `cp --sparse=always`, `du`, `fallocate`,
//! `truncate`, `qemu-img convert`, python's `os.lseek(SEEK_DATA/SEEK_HOLE)`, and a loop
//! device (`losetup --direct-io=on`) carrying ext4 (`mkfs.ext4`, `mount`, `e2fsck -fn`).
//! What the files say is checked against the CLI (`vol ls --json`, `vol export`), a kill -9
//! after an fsync loses nothing, and `thin_check` passes on what is left.
//!
//! Needs root and `/dev/fuse` (skipped loudly without, a failure under `CI=true`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rand::{Rng, SeedableRng};
use thinpool_tests::daemon::{Up, fuse_usable, is_mounted};
use thinpool_tests::nbd::assert_cmp;
use thinpool_tests::{require_tools, run, run_ok, test_seed, text, tool};

const MIB: u64 = 1 << 20;
const BS: u64 = 64 << 10;

/// The pool every test here serves: small sparse files.
const POOL: [&str; 4] = ["--data-size", "1G", "--metadata-size", "16M"];

/// `thinpool up` with [`POOL`] and `extra`.
fn start_up(extra: &[&str]) -> Up {
    Up::start(&[&POOL[..], extra].concat())
}

/// The files in the FUSE export, sorted.
fn names(up: &Up) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(up.files())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    n.sort();
    n
}

/// `python3 -c` printing `os.lseek(fd, offset, SEEK_DATA|SEEK_HOLE)`, or the errno name.
fn lseek(file: &Path, offset: u64, whence: &str) -> String {
    let script = "import os,sys,errno\nfd=os.open(sys.argv[1],os.O_RDONLY)\ntry:\n print(os.lseek(fd,int(sys.argv[2]),getattr(os,sys.argv[3])))\nexcept OSError as e:\n print(errno.errorcode[e.errno])";
    let out = run_ok(
        tool("python3")
            .args(["-c", script])
            .arg(file)
            .arg(offset.to_string())
            .arg(whence),
    );
    text(&out.stdout).trim().to_string()
}

/// 64 MiB image: random data at 0..8 MiB and 40..48 MiB, zeros elsewhere (holes).
fn image(seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut img = vec![0u8; 64 * MIB as usize];
    rng.fill(&mut img[..8 * MIB as usize]);
    rng.fill(&mut img[40 * MIB as usize..48 * MIB as usize]);
    img
}

fn dd_into(src: &Path, dst: &Path, extra: &[&str]) {
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", dst.display()))
            .args(["bs=1M", "status=none"])
            .args(extra),
    );
}

#[test]
fn volumes_as_files_through_thinpool_up() {
    if !fuse_usable()
        || !require_tools(&[
            "qemu-img",
            "fallocate",
            "python3",
            "thin_check",
            "cmp",
            "dd",
            "du",
        ])
    {
        return;
    }
    let seed = test_seed();
    let mut up = start_up(&["--snapshots-read-only"]);
    let log = up.log_text();
    assert!(
        log.contains(&format!(
            "serving volumes as files in {}",
            up.files().display()
        )),
        "up says where the files are:\n{log}"
    );
    let work = up.dir.path().to_path_buf();

    // A volume appears as a file of its size, private to the daemon's user.
    up.ok(&["vol", "create", "web", "--size", "64M"]);
    let web = up.file("web");
    let md = std::fs::metadata(&web).unwrap();
    assert!(md.is_file());
    assert_eq!(md.len(), 64 * MIB);
    assert_eq!(md.permissions().mode() & 0o7777, 0o600);
    assert_eq!(md.blocks(), 0);

    // An image written through the file (holes kept with conv=sparse) reads back the same
    // through qemu-img (and through `vol export` once the daemon is stopped, at the end).
    let img_path = work.join("img.raw");
    std::fs::write(&img_path, image(seed)).unwrap();
    dd_into(&img_path, &web, &["conv=notrunc,sparse,fsync"]);
    let via_fuse = work.join("via-fuse.raw");
    run_ok(
        tool("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&web)
            .arg(&via_fuse),
    );
    assert_cmp(&img_path, &via_fuse);

    // du tells the truth: 16 MiB written, 256 blocks mapped.
    let (_, mapped) = up.vol("web");
    assert_eq!(mapped, 16 * MIB / BS);
    let du = text(&run_ok(Command::new("du").arg("--block-size=1").arg(&web)).stdout);
    let du: u64 = du.split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(du, mapped * BS, "du = mapped bytes");

    // Holes: SEEK_DATA/SEEK_HOLE from the mapping, and cp --sparse=always keeps them.
    assert_eq!(lseek(&web, 0, "SEEK_HOLE"), (8 * MIB).to_string());
    assert_eq!(lseek(&web, 8 * MIB, "SEEK_DATA"), (40 * MIB).to_string());
    assert_eq!(lseek(&web, 48 * MIB, "SEEK_DATA"), "ENXIO");
    assert_eq!(lseek(&web, 50 * MIB, "SEEK_HOLE"), (50 * MIB).to_string());
    let copy = work.join("copy.raw");
    run_ok(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(&web)
            .arg(&copy),
    );
    assert_cmp(&img_path, &copy);
    let copy_md = std::fs::metadata(&copy).unwrap();
    assert!(
        copy_md.blocks() * 512 <= 17 * MIB,
        "cp --sparse=always made {} bytes of a file with 16 MiB of data",
        copy_md.blocks() * 512
    );

    // Punching 4 MiB of whole blocks returns them; an unaligned punch zeroes bytes only.
    run_ok(
        tool("fallocate")
            .args(["-p", "-o", "40M", "-l", "4M"])
            .arg(&web),
    );
    assert_eq!(up.vol("web").1, mapped - 4 * MIB / BS);
    run_ok(
        tool("fallocate")
            .args(["-p", "-o", "100", "-l", "1000"])
            .arg(&web),
    );
    assert_eq!(up.vol("web").1, mapped - 4 * MIB / BS);
    let mut expect = image(seed);
    expect[40 * MIB as usize..44 * MIB as usize].fill(0);
    expect[100..1100].fill(0);
    std::fs::write(&img_path, &expect).unwrap();
    run_ok(
        tool("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&web)
            .arg(&via_fuse),
    );
    assert_cmp(&img_path, &via_fuse);

    // truncate: larger grows the volume online; smaller is refused and changes nothing.
    run_ok(Command::new("truncate").args(["-s", "128M"]).arg(&web));
    assert_eq!(up.vol("web").0, 128 * MIB);
    assert_eq!(std::fs::metadata(&web).unwrap().len(), 128 * MIB);
    let out = run(Command::new("truncate").args(["-s", "32M"]).arg(&web));
    assert!(
        !out.status.success(),
        "shrinking through the file must fail"
    );
    assert!(
        text(&out.stderr).contains("Operation not permitted"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(up.vol("web").0, 128 * MIB);
    expect.resize(128 * MIB as usize, 0);
    std::fs::write(&img_path, &expect).unwrap();

    // A snapshot (served read-only here) has its origin's bytes and refuses writes.
    up.ok(&["vol", "snapshot", "web", "snap"]);
    let snap = up.file("snap");
    assert_eq!(
        std::fs::metadata(&snap).unwrap().permissions().mode() & 0o7777,
        0o400
    );
    let out = run(Command::new("dd")
        .arg(format!("if={}", img_path.display()))
        .arg(format!("of={}", snap.display()))
        .args(["bs=1M", "count=1", "conv=notrunc"]));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Read-only file system"),
        "{}",
        text(&out.stderr)
    );
    assert_cmp(&img_path, &snap);

    // Volumes come and go.
    up.ok(&["vol", "create", "tmp", "--size", "1M"]);
    assert_eq!(names(&up), ["snap", "tmp", "web"]);
    up.ok(&["vol", "rm", "tmp"]);
    assert_eq!(names(&up), ["snap", "web"]);
    assert!(!up.file("tmp").exists());

    // fsync, then kill -9: the next `up` clears the dead mount and the data is there.
    let more = work.join("more.raw");
    std::fs::write(&more, &image(seed ^ 1)[..4 * MIB as usize]).unwrap();
    dd_into(&more, &web, &["seek=100", "conv=notrunc,fsync"]);
    expect[100 * MIB as usize..104 * MIB as usize].copy_from_slice(&std::fs::read(&more).unwrap());
    std::fs::write(&img_path, &expect).unwrap();
    let st = up.signal("KILL");
    assert!(!st.success());
    let e = std::fs::metadata(up.files()).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(107),
        "a killed daemon's mount answers ENOTCONN: {e}"
    );
    up.spawn(&["--snapshots-read-only"]);
    assert!(
        up.log_text().contains("detaching it"),
        "the stale mount is named:\n{}",
        up.log_text()
    );
    assert_eq!(names(&up), ["snap", "web"], "the files are back");
    assert_cmp(&img_path, &web);
    run_ok(
        tool("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&web)
            .arg(&via_fuse),
    );

    up.stop();
    up.thin_check();
    // What qemu-img read from the file is what `vol export` writes from the pool.
    let exported = work.join("export.raw");
    up.ok(&["vol", "export", "web", exported.to_str().unwrap()]);
    assert_cmp(&via_fuse, &exported);
    assert_cmp(&img_path, &exported);
}

/// Unmounts and detaches what a test set up, whatever happens.
struct LoopMount {
    dev: String,
    mnt: Option<PathBuf>,
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if let Some(m) = self.mnt.take() {
            let _ = Command::new("umount").arg(&m).status();
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

#[test]
fn a_loop_device_over_a_volume_file_carries_ext4() {
    if !fuse_usable()
        || !require_tools(&[
            "losetup",
            "mkfs.ext4",
            "e2fsck",
            "mount",
            "umount",
            "thin_check",
        ])
    {
        return;
    }
    let mut up = start_up(&[]);
    up.ok(&["vol", "create", "fs", "--size", "256M"]);
    let file = up.file("fs");
    let out = run_ok(
        tool("losetup")
            .args(["--direct-io=on", "-f", "--show"])
            .arg(&file),
    );
    let mut lm = LoopMount {
        dev: text(&out.stdout).trim().to_string(),
        mnt: None,
    };
    let listed = text(&run_ok(tool("losetup").args(["-l", "-O", "DIO", "-n", &lm.dev])).stdout);
    assert_eq!(listed.trim(), "1", "the loop device uses direct I/O");
    run_ok(tool("mkfs.ext4").args(["-q", &lm.dev]));
    let mnt = up.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run_ok(tool("mount").arg(&lm.dev).arg(&mnt));
    lm.mnt = Some(mnt.clone());
    // A small tree with known contents.
    let mut expect = Vec::new();
    for d in 0..4 {
        let dir = mnt.join(format!("d{d}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..8 {
            let body: Vec<u8> = (0..(f + 1) * 37_000)
                .map(|i| (i as u8) ^ (d * 8 + f) as u8)
                .collect();
            std::fs::write(dir.join(format!("f{f}")), &body).unwrap();
            expect.push((format!("d{d}/f{f}"), body));
        }
    }
    run_ok(&mut Command::new("sync"));
    run_ok(tool("umount").arg(&mnt));
    lm.mnt = None;
    let fsck = run(tool("e2fsck").args(["-fn", &lm.dev]));
    assert!(
        fsck.status.success(),
        "e2fsck -fn is not clean:\n{}{}",
        text(&fsck.stdout),
        text(&fsck.stderr)
    );
    // Mounted again, read-only: the tree is there.
    run_ok(tool("mount").args(["-o", "ro"]).arg(&lm.dev).arg(&mnt));
    lm.mnt = Some(mnt.clone());
    for (name, body) in &expect {
        assert_eq!(&std::fs::read(mnt.join(name)).unwrap(), body, "{name}");
    }
    drop(lm);
    let (_, mapped) = up.vol("fs");
    assert!(
        mapped > 0 && mapped < 256 * MIB / BS,
        "ext4 maps part of the volume: {mapped}"
    );
    up.stop();
    up.thin_check();
}

#[test]
fn fuse_options_of_up() {
    if !fuse_usable() {
        return;
    }
    // --no-fuse: nothing mounted.
    let mut up = start_up(&["--no-fuse"]);
    assert!(!is_mounted(&up.files()));
    assert!(!up.log_text().contains("as files"));
    up.stop();
    // --fuse-dir elsewhere.
    let dir = up.dir.path().join("elsewhere");
    up.spawn(&["--fuse-dir", dir.to_str().unwrap()]);
    assert!(is_mounted(&dir));
    assert!(!is_mounted(&up.files()));
    up.stop();
    assert!(!is_mounted(&dir));
    // A folder in use is refused: up fails, saying why.
    std::fs::write(dir.join("x"), b"x").unwrap();
    let out = run(up
        .cmd(&["up", "--fuse-dir", dir.to_str().unwrap()])
        .stdout(Stdio::null()));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not empty"),
        "{}",
        text(&out.stderr)
    );
    assert!(!is_mounted(&dir));
    assert!(!up.root.join("control.sock").exists());
    // The config file's keys.
    std::fs::remove_file(dir.join("x")).unwrap();
    std::fs::write(
        up.root.join("thinpool.toml"),
        format!("fuse_dir = {:?}\n", dir.to_str().unwrap()),
    )
    .unwrap();
    up.spawn(&[]);
    assert!(is_mounted(&dir));
    up.stop();
    std::fs::write(up.root.join("thinpool.toml"), "fuse = false\n").unwrap();
    up.spawn(&[]);
    assert!(!is_mounted(&dir) && !is_mounted(&up.files()));
    up.stop();
}
