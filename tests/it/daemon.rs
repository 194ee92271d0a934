//! The `thinpool` CLI while a daemon holds the pool: a [`Daemon`] runs in this test process on
//! a scratch root (so it holds the pool's lock), and the real binary is run with `--root`.
//! Every `pool status|grow` and `vol create|snapshot|ls|resize|rm` must go through the
//! daemon's control socket and print exactly what it prints when it opens the pool itself;
//! `vol import|export` and `pool create` must refuse clearly. After the daemon stops, the
//! metadata must pass `thin_check`.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use thinpool_daemon::{Daemon, DaemonOptions};
use thinpool_engine::{Pool, PoolConfig, PoolOptions};
use thinpool_tests::{
    TempDir, require_tool, run, run_ok, scratch, skip_or_fail, text, thinpool, tool, which,
};

const MIB: u64 = 1 << 20;

/// A scratch folder with a 256 MiB / 16 MiB pool in `<dir>/root`.
struct Root {
    dir: TempDir,
    path: PathBuf,
}

impl Root {
    fn new() -> Root {
        let dir = scratch();
        let path = dir.path().join("root");
        let cfg = PoolConfig {
            data_size: 256 * MIB,
            metadata_size: 16 * MIB,
            ..Default::default()
        };
        Pool::create(&path, &cfg, PoolOptions::default())
            .expect("create the pool")
            .close()
            .expect("close the new pool");
        Root { dir, path }
    }

    fn start(&self) -> Daemon {
        Daemon::start(&self.path, DaemonOptions::default()).expect("start the daemon")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = thinpool(["--root".as_ref(), self.path.as_os_str()]);
        c.args(args).env_remove("THINPOOL_ROOT");
        c
    }

    /// stdout of a successful run, with this root's path replaced by `ROOT` (to compare two
    /// roots' outputs).
    fn ok(&self, args: &[&str]) -> String {
        self.neutral(&text(&run_ok(&mut self.cmd(args)).stdout))
    }

    /// stderr of a failed run (exit status 1), `ROOT` for this root's path.
    fn fails(&self, args: &[&str]) -> String {
        let out: Output = run(&mut self.cmd(args));
        assert_eq!(
            out.status.code(),
            Some(1),
            "`thinpool {}` should fail with status 1; stdout: {}",
            args.join(" "),
            text(&out.stdout)
        );
        self.neutral(&text(&out.stderr))
    }

    fn neutral(&self, s: &str) -> String {
        s.replace(&self.path.display().to_string(), "ROOT")
    }

    fn socket(&self) -> PathBuf {
        self.path.join("control.sock")
    }

    fn check_metadata(&self) {
        let meta = self.path.join("pool").join("metadata");
        if require_tool("thin_check") {
            let out = run(tool("thin_check").arg(&meta));
            assert!(out.status.success(), "thin_check {} failed", meta.display());
        }
    }
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}):\n{s}"))
}

/// `vol ls --json` without the creation times (which differ between two roots).
fn without_created(s: &str) -> Value {
    let mut v = json(s);
    for vol in v.as_array_mut().expect("a list of volumes") {
        vol.as_object_mut()
            .expect("a volume object")
            .remove("created");
    }
    v
}

/// The commands a user runs, with what they print compared between a daemon-served root and
/// a root the CLI opens itself.
const SESSION: &[&[&str]] = &[
    &["vol", "create", "base", "--size", "64M"],
    &["vol", "snapshot", "base", "snap"],
    &["vol", "create", "other", "--size", "10G"],
    &["vol", "resize", "base", "128M"],
    &["vol", "resize", "snap", "1M"],
    &["vol", "ls"],
    &["vol", "rm", "other"],
    &[
        "pool",
        "grow",
        "--data-size",
        "512M",
        "--metadata-size",
        "32M",
    ],
    &["pool", "status"],
    &["vol", "ls"],
];

#[test]
fn cli_output_is_the_same_through_the_daemon() {
    let served = Root::new();
    let local = Root::new();
    let daemon = served.start();
    for args in SESSION {
        let a = served.ok(args);
        let b = local.ok(args);
        assert_eq!(a, b, "`thinpool {}` prints differently", args.join(" "));
    }
    assert_eq!(
        without_created(&served.ok(&["vol", "ls", "--json"])),
        without_created(&local.ok(&["vol", "ls", "--json"]))
    );
    assert_eq!(
        json(&served.ok(&["pool", "status", "--json"])),
        json(&local.ok(&["pool", "status", "--json"]))
    );

    // The daemon did the work: its pool has the result, and nothing opened the pool behind it
    // (its lock would have refused).
    let pool = daemon.pool();
    let base = pool.volume_info("base").unwrap();
    assert_eq!(base.size, 128 * MIB);
    assert_eq!(pool.volume_info("snap").unwrap().size, MIB);
    assert!(pool.volume_info("other").is_err());
    assert_eq!(pool.status().unwrap().total_data_blocks, 512 * MIB / 65536);
    drop(pool);

    // What the daemon answers now is what the CLI prints once the daemon is gone, byte for
    // byte (creation times included: same pool).
    let reads: [&[&str]; 4] = [
        &["vol", "ls"],
        &["vol", "ls", "--json"],
        &["pool", "status"],
        &["pool", "status", "--json"],
    ];
    let through: Vec<String> = reads.iter().map(|a| served.ok(a)).collect();
    daemon.stop().expect("stop the daemon");
    assert!(!served.socket().exists(), "the socket is removed on stop");
    for (a, before) in reads.iter().zip(&through) {
        assert_eq!(&served.ok(a), before, "`thinpool {}`", a.join(" "));
    }
    served.check_metadata();
    local.check_metadata();
}

#[test]
fn errors_read_the_same_through_the_daemon() {
    let served = Root::new();
    let local = Root::new();
    let daemon = served.start();
    let bad: [&[&str]; 5] = [
        &["vol", "rm", "nope"],
        &["vol", "snapshot", "nope", "x"],
        &["vol", "resize", "nope", "1M"],
        &["vol", "create", "bad/name", "--size", "1M"],
        &["pool", "grow", "--data-size", "1M"],
    ];
    for args in bad {
        assert_eq!(
            served.fails(args),
            local.fails(args),
            "`thinpool {}` fails differently",
            args.join(" ")
        );
    }
    served.ok(&["vol", "create", "a", "--size", "1M"]);
    local.ok(&["vol", "create", "a", "--size", "1M"]);
    let args = &["vol", "create", "a", "--size", "1M"];
    let e = served.fails(args);
    assert_eq!(e, local.fails(args));
    assert!(e.contains("already exists"), "{e}");
    daemon.stop().unwrap();
}

#[test]
fn import_export_and_create_refuse_while_the_daemon_runs() {
    let r = Root::new();
    let daemon = r.start();
    let pid = std::process::id();
    r.ok(&["vol", "create", "a", "--size", "1M"]);
    let img = r.dir.path().join("a.img");
    std::fs::write(&img, vec![1u8; MIB as usize]).unwrap();
    let img_s = img.to_str().unwrap();

    // This daemon serves no NBD (issue 15: the hint used to name ROOT/nbd.sock anyway).
    let e = r.fails(&["vol", "import", "a", img_s]);
    assert!(e.contains(&format!("daemon (pid {pid})")), "{e}");
    assert!(
        e.contains(
            "holds the pool at ROOT and serves no NBD export, so this command can neither open \
             the pool nor copy through the daemon: stop the daemon and run it again"
        ),
        "{e}"
    );
    assert!(!e.contains("nbd.sock"), "{e}");
    let out = r.dir.path().join("out.img");
    let e = r.fails(&["vol", "export", "a", out.to_str().unwrap()]);
    assert!(e.contains("serves no NBD export"), "{e}");
    assert!(!out.exists(), "a refused export writes nothing");

    let e = r.fails(&["pool", "create", "--data-size", "64M"]);
    assert!(
        e.contains("already holds a pool") && e.contains(&format!("(pid {pid})")),
        "{e}"
    );
    daemon.stop().unwrap();
    // Without the daemon, the same import works.
    r.ok(&["vol", "import", "a", img_s]);
    r.check_metadata();
}

#[test]
fn a_stale_socket_does_not_stop_the_cli_or_the_daemon() {
    let r = Root::new();
    drop(UnixListener::bind(r.socket()).unwrap());
    // Nobody answers: the CLI opens the pool itself.
    r.ok(&["vol", "create", "a", "--size", "1M"]);
    assert_eq!(
        json(&r.ok(&["vol", "ls", "--json"]))
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // The daemon replaces the stale socket, and the CLI goes through it.
    let daemon = r.start();
    r.ok(&["vol", "snapshot", "a", "b"]);
    assert!(daemon.pool().volume_info("b").is_ok());
    daemon.stop().unwrap();
    assert!(!r.socket().exists());
    r.check_metadata();
}

#[test]
fn a_second_daemon_fails_clearly() {
    let r = Root::new();
    let daemon = r.start();
    let e = Daemon::start(&r.path, DaemonOptions::default())
        .err()
        .expect("a second daemon on the same root");
    assert_eq!(
        e.to_string(),
        format!(
            "another thinpool daemon is serving {} (pid {})",
            r.path.display(),
            std::process::id()
        )
    );
    let mode = std::fs::metadata(r.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    daemon.stop().unwrap();
}

/// Make `p` and every folder above it up to `/` searchable by others.
fn open_path_to(p: &Path) {
    for dir in p.ancestors() {
        let Ok(m) = std::fs::metadata(dir) else {
            continue;
        };
        let mode = m.permissions().mode();
        if mode & 0o005 != 0o005 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o005))
                .unwrap_or_else(|e| panic!("chmod o+rx {}: {e}", dir.display()));
        }
    }
}

#[test]
fn another_user_is_told_the_socket_is_not_theirs() {
    if !running_as_root() {
        skip_or_fail("this test needs root (it runs the CLI as nobody with setpriv)");
        return;
    }
    let Some(setpriv) = which("setpriv") else {
        skip_or_fail("setpriv not found (apt-get install util-linux)");
        return;
    };
    let r = Root::new();
    open_path_to(&r.path);
    let bin = thinpool_tests::thinpool_bin();
    let daemon = r.start();
    let out = run(Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg("--root")
        .arg(&r.path)
        .args(["pool", "status"])
        .env_remove("THINPOOL_ROOT"));
    assert_eq!(out.status.code(), Some(1));
    let e = text(&out.stderr);
    assert!(
        e.contains(&format!(
            "the daemon's control socket {} is not accessible to you (owned by uid 0): run as \
             that user or root",
            r.socket().display()
        )),
        "{e}"
    );
    daemon.stop().unwrap();
}

fn running_as_root() -> bool {
    // The tests crate does not link rustix; `id -u` says the same.
    let out = run_ok(Command::new("id").arg("-u"));
    text(&out.stdout).trim() == "0"
}
