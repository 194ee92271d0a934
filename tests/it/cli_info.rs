//! `thinpool info`, `thinpool vol info`, `thinpool pool check`, `thinpool completions` and
//! `thinpool man` as a user runs them, on a fresh 1 GiB / 64 MiB pool: the numbers are checked
//! exactly against what was written and against the pool's files, and every command prints the
//! same whether it opens the pool itself or goes through a daemon (started in this process, so
//! that it holds the pool's lock), but for `info`'s daemon field.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use thinpool_daemon::{Daemon, DaemonOptions};
use thinpool_tests::{TempDir, file_size, run, run_ok, scratch, text, thinpool};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const BLOCK: u64 = 64 * KIB;

/// Blocks of the imported image that hold data (the others are zeros).
const DATA_BLOCKS: [u64; 3] = [0, 5, 15];
/// The image's size: 16 blocks.
const IMAGE_SIZE: u64 = 16 * BLOCK;

/// Docker's devicemapper fields, in `docker info`'s order, then ours.
const FIELDS: [&str; 21] = [
    "Pool Name",
    "Pool Blocksize",
    "Base Device Size",
    "Backing Filesystem",
    "Data file",
    "Metadata file",
    "Data Space Used",
    "Data Space Total",
    "Data Space Available",
    "Metadata Space Used",
    "Metadata Space Total",
    "Metadata Space Available",
    "Thin Pool Minimum Free Space",
    "Deferred Removal Enabled",
    "Deferred Deletion Enabled",
    "Deferred Deleted Device Count",
    "Volumes",
    "Snapshots",
    "Transaction Id",
    "Mode",
    "Daemon",
];

/// A scratch folder with a pool made by `thinpool pool create` in `<dir>/root`.
struct Root {
    dir: TempDir,
    path: PathBuf,
}

impl Root {
    fn new() -> Root {
        let dir = scratch();
        let path = dir.path().join("root");
        let r = Root { dir, path };
        r.ok(&[
            "pool",
            "create",
            "--data-size",
            "1G",
            "--metadata-size",
            "64M",
        ]);
        r
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = thinpool(["--root".as_ref(), self.path.as_os_str()]);
        c.args(args).env_remove("THINPOOL_ROOT");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        run(&mut self.cmd(args))
    }

    fn ok(&self, args: &[&str]) -> String {
        text(&run_ok(&mut self.cmd(args)).stdout)
    }

    fn json(&self, args: &[&str]) -> Value {
        let s = self.ok(args);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("not JSON ({e}):\n{s}"))
    }

    fn metadata(&self) -> PathBuf {
        self.path.join("pool").join("metadata")
    }

    /// Fill the pool: `img` imported from an image with data in [`DATA_BLOCKS`], its snapshot
    /// `snap`, and `base` created without a size.
    fn populate(&self) {
        let image = self.dir.path().join("image.raw");
        let mut bytes = vec![0u8; IMAGE_SIZE as usize];
        for b in DATA_BLOCKS {
            let at = (b * BLOCK) as usize;
            // Non-zero bytes at both ends of the block.
            bytes[at] = 0xA5;
            bytes[at + BLOCK as usize - 1] = 0x5A;
        }
        std::fs::write(&image, &bytes).expect("write the image");
        self.ok(&["vol", "import", "img", image.to_str().expect("UTF-8 path")]);
        self.ok(&["vol", "snapshot", "img", "snap"]);
        let out = self.ok(&["vol", "create", "base"]);
        assert!(out.contains("10.0 GiB"), "vol create without --size: {out}");
    }
}

/// The value of `field` in `info`'s text output.
fn field<'a>(info: &'a str, field: &str) -> &'a str {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(str::trim_start)
        .unwrap_or_else(|| panic!("no {field:?} line in:\n{info}"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v:#}"))
}

/// `major:minor` of a `st_dev`, glibc's encoding (what `stat -c %t:%T` shows in decimal).
fn major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

#[test]
fn info_reports_docker_fields_with_exact_numbers() {
    let r = Root::new();
    r.populate();
    let info = r.ok(&["info"]);
    // Every field, in order, each on its own line, values in one column.
    let keys: Vec<&str> = info
        .lines()
        .map(|l| l.split(':').next().expect("a key"))
        .collect();
    assert_eq!(keys, FIELDS, "fields of `thinpool info`:\n{info}");
    let column = |l: &str| {
        let c = l.find(':').expect("a colon") + 1;
        c + l[c..].find(|ch| ch != ' ').expect("a value")
    };
    let first = column(info.lines().next().expect("a line"));
    assert!(info.lines().all(|l| column(l) == first), "{info}");

    let v = r.json(&["info", "--json"]);
    let root_meta = std::fs::metadata(&r.path).expect("stat the root");
    let (major, minor) = major_minor(root_meta.dev());
    let name = format!("thinpool-{major}:{minor}-{}-pool", root_meta.ino());
    assert_eq!(v["pool_name"], name.as_str());
    assert_eq!(field(&info, "Pool Name"), name);

    // Data: the image's three blocks, shared with its snapshot, nothing for `base`.
    let img = r.json(&["vol", "info", "img", "--json"]);
    assert_eq!(u(&img, "mapped_blocks"), DATA_BLOCKS.len() as u64);
    let used = u(&img, "mapped_blocks") * BLOCK;
    assert_eq!(u(&v, "data_space_used"), used);
    assert_eq!(u(&v, "pool_blocksize"), BLOCK);
    assert_eq!(u(&v, "base_device_size"), 10 * GIB);
    let data_total = file_size(&r.path.join("pool").join("data"));
    assert_eq!(data_total, GIB);
    assert_eq!(u(&v, "data_space_total"), data_total);
    // Free blocks, capped by what the scratch file system has left for the sparse file.
    let avail = u(&v, "data_space_available");
    assert!(avail > 0 && avail <= data_total - used, "{v:#}");
    let meta_total = file_size(&r.metadata());
    assert_eq!(meta_total, 64 * MIB);
    assert_eq!(u(&v, "metadata_space_total"), meta_total);
    let status = r.json(&["pool", "status", "--json"]);
    assert_eq!(
        u(&v, "metadata_space_used"),
        u(&status, "used_metadata_blocks") * 4096
    );
    assert!(u(&v, "metadata_space_used") > 0);
    let meta_avail = u(&v, "metadata_space_available");
    assert!(meta_avail <= meta_total - u(&v, "metadata_space_used"));
    // 10 % of 16384 blocks, whole blocks: 1638 × 64 KiB.
    assert_eq!(u(&v, "thin_pool_minimum_free_space"), 1638 * BLOCK);
    assert_eq!(u(&v, "min_free_percent"), 10);
    assert_eq!(v["deferred_removal_enabled"], false);
    assert_eq!(v["deferred_deletion_enabled"], false);
    assert_eq!(u(&v, "deferred_deleted_device_count"), 0);
    assert_eq!(u(&v, "volumes"), 2);
    assert_eq!(u(&v, "snapshots"), 1);
    assert_eq!(v["mode"], "rw");
    assert_eq!(
        v["daemon"],
        serde_json::json!({"running": false, "pid": null})
    );
    assert_eq!(v["data_file"], r.path.join("pool/data").to_str().unwrap());
    assert_eq!(v["data_file_target"], Value::Null);
    assert_eq!(v["metadata_file"], r.metadata().to_str().unwrap());
    let fs = v["backing_filesystem"].as_str().expect("a string");
    assert!(!fs.is_empty() && !fs.starts_with("unknown (statfs"), "{fs}");
    // The transaction id is the metadata's (as the check reads it from the superblock).
    let check = r.ok(&["pool", "check"]);
    assert!(
        check.contains(&format!("TRANSACTION_ID={}\n", u(&v, "transaction_id"))),
        "{check}\n{v:#}"
    );

    // The text says the same, in human units.
    for (f, want) in [
        ("Pool Blocksize", "64.0 KiB"),
        ("Base Device Size", "10.0 GiB"),
        ("Data Space Used", "192.0 KiB"),
        ("Data Space Total", "1.0 GiB"),
        ("Metadata Space Total", "64.0 MiB"),
        ("Thin Pool Minimum Free Space", "102.4 MiB (10%)"),
        ("Deferred Removal Enabled", "false"),
        ("Deferred Deletion Enabled", "false"),
        ("Deferred Deleted Device Count", "0"),
        ("Volumes", "2"),
        ("Snapshots", "1"),
        ("Mode", "rw"),
        ("Daemon", "not running"),
        ("Backing Filesystem", fs),
    ] {
        assert_eq!(field(&info, f), want, "{f} in:\n{info}");
    }
    assert_eq!(
        field(&info, "Transaction Id"),
        u(&v, "transaction_id").to_string()
    );
    assert_eq!(
        field(&info, "Data file"),
        r.path.join("pool/data").display().to_string()
    );
}

#[test]
fn vol_info_shows_one_volume() {
    let r = Root::new();
    r.populate();
    let t = r.ok(&["vol", "info", "snap"]);
    for (f, want) in [
        ("Name", "snap".to_string()),
        ("Kind", "snapshot".to_string()),
        ("Parent", "img".to_string()),
        ("Size", format!("1.0 MiB ({IMAGE_SIZE} bytes)")),
        ("Highest mapped block", "15".to_string()),
        (
            "Mapped",
            "3 blocks of 64.0 KiB, 192.0 KiB (196608 bytes, 18.8% of the size)".to_string(),
        ),
    ] {
        assert_eq!(field(&t, f), want, "{f} in:\n{t}");
    }
    let created = field(&t, "Created");
    // RFC 3339 UTC: 2026-11-23T14:52:40Z.
    assert_eq!(created.len(), 20, "{created}");
    assert!(
        created.ends_with('Z') && created.as_bytes()[10] == b'T',
        "{created}"
    );

    let v = r.json(&["vol", "info", "snap", "--json"]);
    assert_eq!(v["name"], "snap");
    assert_eq!(v["kind"], "snapshot");
    assert_eq!(v["parent"], "img");
    assert_eq!(u(&v, "size"), IMAGE_SIZE);
    assert_eq!(u(&v, "mapped_blocks"), 3);
    assert_eq!(u(&v, "mapped_bytes"), 3 * BLOCK);
    assert_eq!(u(&v, "highest_mapped_block"), 15);
    assert_eq!(v["created_at"], created);
    assert_eq!(field(&t, "Thin id"), u(&v, "thin_id").to_string());

    let base = r.json(&["vol", "info", "base", "--json"]);
    assert_eq!(
        u(&base, "size"),
        10 * GIB,
        "default size is Docker's basesize"
    );
    assert_eq!(base["kind"], "thin");
    assert_eq!(base["parent"], Value::Null);
    assert_eq!(u(&base, "mapped_blocks"), 0);
    assert_eq!(base["highest_mapped_block"], Value::Null);

    let out = r.run(&["vol", "info", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no volume named nope"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_same_through_a_daemon() {
    let r = Root::new();
    r.populate();
    let info = r.json(&["info", "--json"]);
    let info_text = r.ok(&["info"]);
    let vol = r.ok(&["vol", "info", "snap"]);
    let vol_json = r.json(&["vol", "info", "img", "--json"]);
    let check = r.ok(&["pool", "check"]);

    let daemon = Daemon::start(&r.path, DaemonOptions::default()).expect("start the daemon");
    let mut served = r.json(&["info", "--json"]);
    assert_eq!(
        served["daemon"],
        serde_json::json!({"running": true, "pid": std::process::id()})
    );
    let mut local = info.clone();
    served.as_object_mut().unwrap().remove("daemon");
    local.as_object_mut().unwrap().remove("daemon");
    assert_eq!(served, local, "info --json through the daemon");
    let served_text = r.ok(&["info"]);
    assert_eq!(
        field(&served_text, "Daemon"),
        format!("running, pid {}", std::process::id())
    );
    let without_daemon = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with("Daemon:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(without_daemon(&served_text), without_daemon(&info_text));
    assert_eq!(r.ok(&["vol", "info", "snap"]), vol);
    assert_eq!(r.json(&["vol", "info", "img", "--json"]), vol_json);
    let out = r.run(&["vol", "info", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no volume named nope"));
    // The daemon commits, the CLI checks what it committed: nothing changed, same report.
    assert_eq!(r.ok(&["pool", "check"]), check);
    // Writes through the daemon show up in its answers.
    r.ok(&["vol", "create", "more", "--size", "1M"]);
    assert_eq!(u(&r.json(&["info", "--json"]), "volumes"), 3);
    assert_eq!(r.run(&["pool", "check"]).status.code(), Some(0));
    daemon.stop().expect("stop the daemon");
}

#[test]
fn pool_check_finds_damage() {
    let r = Root::new();
    r.populate();
    let clean = r.run(&["pool", "check"]);
    assert_eq!(clean.status.code(), Some(0));
    assert!(text(&clean.stdout).starts_with("TRANSACTION_ID="));

    // A copy of the pool whose superblock checksum is wrong.
    let copy = |name: &str| -> Root {
        let dir = scratch();
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.join("pool")).unwrap();
        for f in ["pool/data", "pool/metadata", "volumes.json"] {
            std::fs::copy(r.path.join(f), path.join(f)).unwrap();
        }
        Root { dir, path }
    };
    let bad_sb = copy("bad-superblock");
    let mut meta = std::fs::read(bad_sb.metadata()).unwrap();
    for b in &mut meta[..4] {
        *b ^= 0xFF;
    }
    std::fs::write(bad_sb.metadata(), &meta).unwrap();
    let out = bad_sb.run(&["pool", "check"]);
    assert_eq!(out.status.code(), Some(1), "damaged superblock");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        stdout.contains("error: metadata block 0 (superblock)"),
        "{stdout}"
    );
    assert!(stderr.contains("is damaged"), "{stderr}");
    assert!(stderr.contains("thinpool meta repair"), "{stderr}");
    // `info` cannot open it, and says so.
    let out = bad_sb.run(&["info"]);
    assert_eq!(out.status.code(), Some(1));

    // A copy with every other metadata block in use damaged: the superblock still reads, the
    // trees and space maps below it do not.
    let bad_trees = copy("bad-trees");
    let mut meta = std::fs::read(bad_trees.metadata()).unwrap();
    let mut damaged = 0;
    for blk in meta.chunks_mut(4096).skip(1) {
        if blk.iter().any(|&b| b != 0) {
            blk[100] ^= 0xFF;
            damaged += 1;
        }
    }
    assert!(damaged > 0);
    std::fs::write(bad_trees.metadata(), &meta).unwrap();
    let out = bad_trees.run(&["pool", "check"]);
    assert_eq!(out.status.code(), Some(1), "damaged trees");
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("TRANSACTION_ID="), "{stdout}");
    assert!(stdout.contains("\nerror: metadata block "), "{stdout}");

    // Another process holding the pool (not a daemon): the check refuses to race with it.
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(r.path.join("lock"))
        .unwrap();
    lock.try_lock().unwrap();
    let out = r.run(&["pool", "check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("another process has the pool open"),
        "{}",
        text(&out.stderr)
    );
    drop(lock);
    let out = r.run(&["pool", "check"]);
    assert_eq!(out.status.code(), Some(0));

    let none = scratch();
    let out = run(thinpool(["--root".as_ref(), none.path().as_os_str()])
        .args(["pool", "check"])
        .env_remove("THINPOOL_ROOT"));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("thinpool pool create"));
}

#[test]
fn completions_and_man_pages() {
    let bash = text(&run_ok(&mut thinpool(["completions", "bash"])).stdout);
    assert!(bash.contains("vol") && bash.contains("thinpool"), "{bash}");
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let s = text(&run_ok(&mut thinpool(["completions", shell])).stdout);
        assert!(s.contains("info"), "{shell}: {s}");
    }
    let out = run(&mut thinpool(["completions", "tcsh"]));
    assert_eq!(out.status.code(), Some(2), "unknown shell is a usage error");

    let man = text(&run_ok(&mut thinpool(["man"])).stdout);
    // clap_mangen puts a two-line string definition (`.ie`/`.el`) before the title.
    let first = man
        .lines()
        .find(|l| !l.starts_with(".ie") && !l.starts_with(".el"))
        .expect("a line");
    assert!(first.starts_with(".TH thinpool 1"), "{first}");
    assert!(man.contains("completions"));

    let dir = scratch();
    let pages = dir.path().join("man1");
    let listed = text(
        &run_ok(&mut thinpool([
            "man".as_ref(),
            "--dir".as_ref(),
            pages.as_os_str(),
        ]))
        .stdout,
    );
    for page in [
        "thinpool.1",
        "thinpool-info.1",
        "thinpool-vol-info.1",
        "thinpool-pool-check.1",
        "thinpool-completions.1",
    ] {
        let p: &Path = &pages.join(page);
        let body = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(body.contains("\n.TH "), "{page}");
        assert!(listed.contains(&p.display().to_string()), "{listed}");
    }
}

#[test]
fn malformed_sizes_say_what_to_write() {
    let r = Root::new();
    let out = r.run(&["vol", "create", "x", "--size", "12X"]);
    assert_eq!(out.status.code(), Some(2));
    let e = text(&out.stderr);
    assert!(
        e.contains("invalid size '12X': unknown unit 'X': use bytes or K/M/G/T/P"),
        "{e}"
    );
}

/// `thinpool up` on `root` (its pool exists), once its sockets are there.
fn up_daemon(root: &Path) -> std::process::Child {
    use std::time::{Duration, Instant};
    let mut c = thinpool(["--root".as_ref(), root.as_os_str(), "up".as_ref()]);
    c.env_remove("THINPOOL_ROOT")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().expect("start thinpool up");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(root.join("nbd.sock").exists() && root.join("control.sock").exists()) {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!("thinpool up exited ({status}): {}", text(&out.stderr));
        }
        assert!(Instant::now() < deadline, "thinpool up did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// SIGTERM `thinpool up`, expect exit 0.
/// SIGTERM `child` (`thinpool up`), which must exit 0; returns its log (stderr).
fn stop_daemon(child: std::process::Child) -> String {
    run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "thinpool up: {}", text(&out.stderr));
    text(&out.stderr)
}

/// Wait (at most 30 s) until the daemon serving `r` holds no metadata snapshot.
fn wait_until_released(r: &Root) {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held = r.json(&["pool", "status", "--json"])["held_root"].clone();
        if held.is_null() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the metadata snapshot at {held} is still held after 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `pool check` with the hold hook at `hold` (see [`held_by`]).
fn check_with_hold_hook(r: &Root, hold: &Path) -> std::process::Child {
    r.cmd(&["pool", "check"])
        .env("THINPOOL_TEST_CHECK_HOLD_FILE", hold)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start pool check")
}

/// Once `check` holds its snapshot, the held root it names in `hold`.
fn held_by(check: &mut std::process::Child, hold: &Path) -> u64 {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = std::fs::read_to_string(hold)
            && let Ok(h) = s.trim().parse::<u64>()
        {
            return h;
        }
        if Instant::now() >= deadline {
            let _ = check.kill();
            panic!("pool check did not reserve a snapshot in 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 15: with a daemon, `pool check` reserves a metadata snapshot (the superblock's
/// `held_root`), checks it while fio writes through NBD, and releases it; Ctrl-C/SIGTERM
/// release it; a check killed (SIGKILL) while holding one cannot, and the daemon releases it
/// when the check's control connection closes (a second check meanwhile is busy); a daemon
/// killed while a check holds one leaves it held, which `thin_check` and `thin_dump
/// --metadata-snap` accept and the next daemon releases at its first check; `--repair` is
/// refused while the daemon runs.
#[test]
fn online_check_holds_a_metadata_snapshot_while_clients_write() {
    if !thinpool_tests::require_tools(&["fio", "qemu-io", "thin_check", "thin_dump"]) {
        return;
    }
    let r = Root::new();
    let daemon = up_daemon(&r.path);
    r.ok(&["vol", "create", "v", "--size", "512M"]);
    let uri = format!("nbd+unix:///v?socket={}", r.path.join("nbd.sock").display());
    run_ok(thinpool_tests::tool("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 0 4M", &uri]));
    let held_root = |r: &Root| r.json(&["pool", "status", "--json"])["held_root"].clone();

    // fio writes (and verifies) while checks run.
    let fio_dir = scratch();
    let fio = thinpool_tests::nbd::spawn_fio_verify("check", &uri, fio_dir.path());
    let out = r.run(&["pool", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("TRANSACTION_ID="));
    assert_eq!(held_root(&r), Value::Null);

    // Paused while held: the status names the held root, and a copy of the metadata taken
    // now holds a snapshot thin_dump reads.
    let hold = r.dir.path().join("hold");
    let mut check = check_with_hold_hook(&r, &hold);
    let h = held_by(&mut check, &hold);
    assert_eq!(held_root(&r), Value::from(h));
    let copy = r.dir.path().join("metadata.copy");
    std::fs::copy(r.metadata(), &copy).unwrap();
    let dump = text(
        &run_ok(
            thinpool_tests::tool("thin_dump")
                .arg("--metadata-snap")
                .arg(&copy),
        )
        .stdout,
    );
    assert!(dump.contains("<device dev_id="), "{dump}");
    std::fs::remove_file(&hold).unwrap();
    let out = check.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("TRANSACTION_ID="));
    assert_eq!(held_root(&r), Value::Null);

    // SIGTERM while held: released on the way out.
    let mut check = check_with_hold_hook(&r, &hold);
    held_by(&mut check, &hold);
    run_ok(Command::new("kill").args(["-TERM", &check.id().to_string()]));
    let out = check.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(128 + 15), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("was released"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(held_root(&r), Value::Null);
    std::fs::remove_file(&hold).unwrap();

    // --repair with the daemon: refused.
    let out = r.run(&["pool", "check", "--repair"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("repairing the pool at"),
        "{}",
        text(&out.stderr)
    );

    let out = fio.wait_with_output().unwrap();
    assert!(
        out.status.success() && !text(&out.stdout).contains("verify: bad"),
        "fio: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // SIGKILL while held: the check cannot release it, the daemon does when the check's
    // control connection closes (the reservation is a lease on it) and logs it; until then a
    // second check is refused as busy, after that it runs.
    let mut check = check_with_hold_hook(&r, &hold);
    let h = held_by(&mut check, &hold);
    let out = r.run(&["pool", "check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("already held"),
        "{}",
        text(&out.stderr)
    );
    check.kill().unwrap();
    check.wait().unwrap();
    std::fs::remove_file(&hold).unwrap();
    wait_until_released(&r);
    let out = r.run(&["pool", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(held_root(&r), Value::Null);
    let log = stop_daemon(daemon);
    assert!(
        log.contains(&format!(
            "the control connection that reserved the metadata snapshot at block {h} closed"
        )),
        "{log}"
    );
    run_ok(thinpool_tests::tool("thin_check").arg(r.metadata()));

    // The daemon killed (SIGKILL) while a check holds one: the held root survives the restart;
    // offline, thin_check is clean and thin_dump reads the snapshot; the next daemon releases
    // it at its first check.
    let mut daemon = up_daemon(&r.path);
    let mut check = check_with_hold_hook(&r, &hold);
    let h = held_by(&mut check, &hold);
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    std::fs::remove_file(&hold).unwrap();
    let out = check.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // What the killed daemon left (`up` would replace them; up_daemon waits for new ones).
    for f in ["control.sock", "nbd.sock"] {
        let _ = std::fs::remove_file(r.path.join(f));
    }
    run_ok(thinpool_tests::tool("thin_check").arg(r.metadata()));
    let dump = text(
        &run_ok(
            thinpool_tests::tool("thin_dump")
                .arg("--metadata-snap")
                .arg(r.metadata()),
        )
        .stdout,
    );
    assert!(dump.contains("<device dev_id="), "{dump}");
    assert_eq!(r.run(&["pool", "check"]).status.code(), Some(0));
    let daemon = up_daemon(&r.path);
    assert_eq!(held_root(&r), Value::from(h));
    let out = r.run(&["pool", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(held_root(&r), Value::Null);
    stop_daemon(daemon);
    run_ok(thinpool_tests::tool("thin_check").arg(r.metadata()));
}

/// Issue 15: damage in the held metadata snapshot is what the online check reports, while fio
/// writes (and verifies) through NBD: the check reads the metadata file, not the daemon's
/// cache, exits 1 naming the block and what it is, and the snapshot is still released (the
/// engine kept its roots from the reserve and never reads the damaged copy); the daemon goes
/// on serving, the next check is clean, and thin_check is clean once the daemon stops.
#[test]
fn online_check_reports_a_damaged_snapshot_and_still_releases_it() {
    use std::os::unix::fs::FileExt as _;
    if !thinpool_tests::require_tools(&["fio", "qemu-io", "thin_check"]) {
        return;
    }
    let r = Root::new();
    let daemon = up_daemon(&r.path);
    r.ok(&["vol", "create", "v", "--size", "512M"]);
    let uri = format!("nbd+unix:///v?socket={}", r.path.join("nbd.sock").display());
    run_ok(thinpool_tests::tool("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 0 4M", &uri]));
    let fio_dir = scratch();
    let fio = thinpool_tests::nbd::spawn_fio_verify("damage", &uri, fio_dir.path());

    let hold = r.dir.path().join("hold");
    let mut check = check_with_hold_hook(&r, &hold);
    let h = held_by(&mut check, &hold);
    // The block damaged is the held superblock copy (format spec section 10): nothing but the
    // live superblock's `held_root` leads to it, so no live tree, space map or volume reads
    // it, and being allocated it is never handed out for a shadow until the release frees it.
    // The daemon writes the metadata file meanwhile (fio's writes commit), never this block.
    let meta = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(r.metadata())
        .unwrap();
    let at = h * 4096 + 16; // the uuid field: any change breaks the block's checksum
    let mut uuid = [0u8; 16];
    meta.read_exact_at(&mut uuid, at).unwrap();
    for b in &mut uuid {
        *b ^= 0xA5;
    }
    meta.write_all_at(&uuid, at).unwrap();
    meta.sync_all().unwrap();
    drop(meta);
    std::fs::remove_file(&hold).unwrap();
    let out = check.wait_with_output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("metadata block {h}"))
            && stdout.contains("held metadata snapshot superblock"),
        "{stdout}"
    );
    assert!(stderr.contains("is damaged"), "{stderr}");
    // Released all the same; the daemon serves on, in write mode.
    assert_eq!(
        r.json(&["pool", "status", "--json"])["held_root"],
        Value::Null
    );
    assert_eq!(r.json(&["pool", "status", "--json"])["mode"], "rw");
    thinpool_tests::nbd::qemu_io_ok(&uri, true, &["read -P 0x5a 0 4M".to_string()]);
    let out = r.run(&["pool", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let out = fio.wait_with_output().unwrap();
    assert!(
        out.status.success() && !text(&out.stdout).contains("verify: bad"),
        "fio: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    stop_daemon(daemon);
    run_ok(thinpool_tests::tool("thin_check").arg(r.metadata()));
}

/// Mappings of the volume the throughput test's checks walk (their data blocks are never
/// written: the data file stays sparse).
const CHECK_LOAD_MAPPINGS: u64 = 1_000_000;
/// Seconds of each fio run of the throughput test.
const FIO_SECS: u64 = 2;

/// fio writing random 64 KiB blocks to `uri` for [`FIO_SECS`] s, each block verified
/// (crc32c) as it goes (`verify_backlog`: a time-based job has no verify phase after its
/// writes); the write bandwidth in MiB/s. Panics when fio fails or a verify is bad.
fn fio_write_mib_s(uri: &str, dir: &Path, name: &str) -> f64 {
    let json = dir.join(format!("{name}.json"));
    let out = run(thinpool_tests::tool("fio").current_dir(dir).args([
        &format!("--name={name}"),
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=64k",
        "--iodepth=8",
        "--offset=128M",
        "--size=256M",
        "--verify=crc32c",
        "--verify_backlog=64",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--time_based",
        &format!("--runtime={FIO_SECS}"),
        "--output-format=json",
        &format!("--output={}", json.display()),
    ]));
    let report = std::fs::read_to_string(&json).unwrap_or_default();
    assert!(
        out.status.success() && !report.contains("verify: bad"),
        "fio: {}{}{report}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let v: Value =
        serde_json::from_str(&report).unwrap_or_else(|e| panic!("fio JSON ({e}): {report}"));
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{report}");
    let read = job["read"]["io_bytes"].as_u64().unwrap_or(0);
    assert!(read > 0, "fio verified nothing: {report}");
    job["write"]["bw"].as_f64().expect("write bw") / 1024.0
}

/// Issue 15: fio's write throughput (verify on) through NBD while `pool check` checks held
/// snapshots of [`CHECK_LOAD_MAPPINGS`] mappings back to back, against without checks,
/// alternating in one run; printed (`--nocapture`), not asserted: the machine decides. Every
/// check must be clean, and at least two must run during each fio run.
#[test]
fn fio_throughput_during_an_online_check() {
    use std::time::Instant;
    if !thinpool_tests::require_tools(&["fio", "thin_check"]) {
        return;
    }
    let dir = scratch();
    let root = dir.path().join("root");
    let tp = |args: &[&str]| text(&run_ok(&mut thinpool_tests::thinpool_in(&root, args)).stdout);
    let data_gib = (CHECK_LOAD_MAPPINGS * BLOCK).div_ceil(GIB) + 2;
    tp(&[
        "pool",
        "create",
        "--data-size",
        &format!("{data_gib}G"),
        "--metadata-size",
        "512M",
    ]);
    tp(&[
        "vol",
        "create",
        "big",
        "--size",
        &format!("{}G", data_gib - 1),
    ]);
    tp(&["vol", "create", "v", "--size", "512M"]);
    let info: Value = serde_json::from_str(&tp(&["vol", "info", "big", "--json"])).unwrap();
    let id = info["thin_id"].as_u64().expect("thin_id");
    // The mappings are written as one run into the metadata (dump, add, restore): the
    // quickest way to a tree of this size; the data blocks are never read or written.
    let metadata = root.join("pool").join("metadata");
    let xml = tp(&["meta", "dump", metadata.to_str().unwrap()]);
    let open = format!("<device dev_id=\"{id}\"");
    let at = xml.find(&open).expect("big's device in the dump");
    let end = at + xml[at..].find('>').expect("device tag") + 1;
    let xml = format!(
        "{}\n    <range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"{CHECK_LOAD_MAPPINGS}\" time=\"0\"/>{}",
        &xml[..end],
        &xml[end..]
    );
    let xml_path = dir.path().join("big.xml");
    std::fs::write(&xml_path, xml).unwrap();
    tp(&[
        "meta",
        "restore",
        "-q",
        "-i",
        xml_path.to_str().unwrap(),
        "-o",
        metadata.to_str().unwrap(),
    ]);
    run_ok(thinpool_tests::tool("thin_check").arg(&metadata));

    let daemon = up_daemon(&root);
    let r = Root {
        dir,
        path: root.clone(),
    };
    assert_eq!(
        r.json(&["vol", "info", "big", "--json"])["mapped_blocks"],
        CHECK_LOAD_MAPPINGS
    );
    let uri = format!("nbd+unix:///v?socket={}", root.join("nbd.sock").display());
    let started = Instant::now();
    let out = r.run(&["pool", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    println!(
        "pool check of {CHECK_LOAD_MAPPINGS} mappings, no fio: {:.2} s",
        started.elapsed().as_secs_f64()
    );

    // Alternating: fio alone, then fio while checks run back to back (each one reserve,
    // check, release, as a user's `pool check` does), so the whole fio run is under checks.
    let fio_dir = scratch();
    let (mut idle, mut busy) = (Vec::new(), Vec::new());
    for round in 0..3 {
        idle.push(fio_write_mib_s(
            &uri,
            fio_dir.path(),
            &format!("idle{round}"),
        ));
        let done = std::sync::atomic::AtomicBool::new(false);
        let checks = std::thread::scope(|s| {
            let checker = s.spawn(|| {
                let mut n = 0u32;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let out = r.run(&["pool", "check"]);
                    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
                    n += 1;
                }
                n
            });
            let bw = fio_write_mib_s(&uri, fio_dir.path(), &format!("busy{round}"));
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            busy.push(bw);
            checker.join().expect("the check loop failed")
        });
        println!(
            "round {round}: fio alone {:.0} MiB/s, during checks {:.0} MiB/s ({checks} checks \
             in its {FIO_SECS} s)",
            idle[round], busy[round]
        );
        assert!(checks >= 2, "only {checks} check(s) ran during fio");
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "fio write (verify on) during an online check: {:.0} MiB/s vs {:.0} MiB/s without, \
         ratio {:.2}",
        mean(&busy),
        mean(&idle),
        mean(&busy) / mean(&idle)
    );
    stop_daemon(daemon);
    run_ok(thinpool_tests::tool("thin_check").arg(&metadata));
}

/// Issue 15: `pool check --repair` offline: a clean pool is left alone; damaged metadata is
/// rebuilt in place, the damaged file kept beside it, and the result passes `thin_check`.
#[test]
fn pool_check_repair_offline() {
    if !thinpool_tests::require_tools(&["thin_check"]) {
        return;
    }
    let r = Root::new();
    r.populate();
    let out = r.run(&["pool", "check", "--repair"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("nothing to repair"),
        "{}",
        text(&out.stderr)
    );
    let damaged = r.metadata().with_file_name("metadata.damaged");
    assert!(!damaged.exists());

    // A wrong superblock checksum: the check fails; the repair rebuilds from what it finds.
    let mut meta = std::fs::read(r.metadata()).unwrap();
    for b in &mut meta[..4] {
        *b ^= 0xFF;
    }
    std::fs::write(r.metadata(), &meta).unwrap();
    assert_eq!(r.run(&["pool", "check"]).status.code(), Some(1));
    let out = r.run(&["pool", "check", "--repair"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("was repaired"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(&damaged).unwrap(), meta);
    run_ok(thinpool_tests::tool("thin_check").arg(r.metadata()));
    assert_eq!(r.run(&["pool", "check"]).status.code(), Some(0));
    assert!(r.ok(&["vol", "ls"]).contains("img"));
}
