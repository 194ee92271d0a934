//! Against the real containerd (1.6): a private containerd in a temporary directory loads the
//! server as the proxy snapshotter `thinpool`, and `ctr snapshots --snapshotter thinpool …`
//! goes through it to the in-memory model. Needs root and `containerd` + `ctr` (Debian's
//! `containerd` package): skipped loudly without them, a failure under CI.

mod common;

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::Model;
use thinpool_snapshotter::{Kind, Server, Snapshots};

/// A containerd process, killed and reaped on drop.
struct Containerd {
    child: Child,
    address: PathBuf,
    log: PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Containerd {
    fn start(dir: &Path, snapshotter_socket: &Path) -> Containerd {
        let address = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        let log = dir.join("containerd.log");
        let d = dir.display();
        let mut f = std::fs::File::create(&config).unwrap();
        write!(
            f,
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  address = "{d}/debug.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[proxy_plugins.thinpool]
  type = "snapshot"
  address = "{}"
"#,
            snapshotter_socket.display()
        )
        .unwrap();
        let child = Command::new(thinpool_testkit::which("containerd").unwrap())
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .unwrap();
        let c = Containerd {
            child,
            address,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if c.address.exists() && c.ctr(&["version"]).0 {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come up in 30 s; its log:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `ctr --address A ARGS`: (success, stdout, stderr).
    fn ctr(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(thinpool_testkit::which("ctr").unwrap())
            .arg("--address")
            .arg(&self.address)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `ctr snapshots --snapshotter thinpool ARGS`, which must succeed; its stdout.
    fn snapshots(&self, args: &[&str]) -> String {
        let mut all = vec!["snapshots", "--snapshotter", "thinpool"];
        all.extend_from_slice(args);
        let (ok, out, err) = self.ctr(&all);
        assert!(
            ok,
            "ctr {all:?} failed:\n{out}\n{err}\ncontainerd log:\n{}",
            self.log()
        );
        out
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[test]
fn containerd_uses_the_proxy_snapshotter() {
    if !thinpool_testkit::require_tools(&["containerd", "ctr"]) {
        return;
    }
    if !is_root() {
        thinpool_testkit::skip_or_fail("containerd needs root");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("snapctd")
        .tempdir_in("/tmp")
        .unwrap();
    let socket = dir.path().join("snap.sock");
    let model = Arc::new(Model::default());
    let server = Server::start(&socket, model.clone()).unwrap();
    let containerd = Containerd::start(dir.path(), &socket);

    // The plugin is loaded.
    let (ok, plugins, _) = containerd.ctr(&["plugins", "ls"]);
    assert!(ok);
    assert!(
        plugins
            .lines()
            .any(|l| l.contains("io.containerd.snapshotter.v1")
                && l.contains("thinpool")
                && l.contains("ok")),
        "{plugins}"
    );

    // prepare, commit, prepare over it, view, ls, info, mounts, label, usage, rm.
    containerd.snapshots(&["prepare", "layer-key"]);
    containerd.snapshots(&["commit", "layer", "layer-key"]);
    containerd.snapshots(&["prepare", "rootfs", "layer"]);
    containerd.snapshots(&["view", "peek", "layer"]);

    let ls = containerd.snapshots(&["ls"]);
    let rows: Vec<Vec<&str>> = ls
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let row = |key: &str| {
        rows.iter()
            .find(|r| r.first() == Some(&key))
            .unwrap_or_else(|| panic!("{key} not in ls:\n{ls}"))
            .clone()
    };
    assert_eq!(row("layer"), ["layer", "Committed"], "{ls}");
    assert_eq!(row("rootfs"), ["rootfs", "layer", "Active"], "{ls}");
    assert_eq!(row("peek"), ["peek", "layer", "View"], "{ls}");
    assert_eq!(rows.len(), 3, "{ls}");

    let info = containerd.snapshots(&["info", "rootfs"]);
    assert!(info.contains(r#""Kind": "Active""#), "{info}");
    assert!(info.contains(r#""Parent": "layer""#), "{info}");

    // The model saw containerd's namespaced keys ("default/N/rootfs") with our rules.
    let backend = model.list().unwrap();
    assert_eq!(backend.len(), 3, "{backend:?}");
    let rootfs = backend
        .iter()
        .find(|i| i.name.ends_with("/rootfs"))
        .expect("rootfs in the model");
    assert_eq!(rootfs.kind, Kind::Active);
    assert!(
        backend
            .iter()
            .any(|i| i.name == rootfs.parent && i.kind == Kind::Committed),
        "{backend:?}"
    );

    // Mounts come from the model (ctr prints them as a mount command).
    let mounts = containerd.snapshots(&["mounts", "/mnt/target", "rootfs"]);
    assert!(mounts.contains("-t ext4"), "{mounts}");
    assert!(
        mounts.contains(&format!("/dev/model/{}", rootfs.name)),
        "{mounts}"
    );
    assert!(mounts.contains("rw,discard"), "{mounts}");

    // Labels go through Update (containerd keeps most labels in its own database and passes
    // on those under containerd.io/snapshot/).
    containerd.snapshots(&[
        "label",
        "layer",
        "containerd.io/snapshot/tier=base",
        "mine=1",
    ]);
    let info = containerd.snapshots(&["info", "layer"]);
    assert!(
        info.contains(r#""containerd.io/snapshot/tier": "base""#),
        "{info}"
    );
    assert!(info.contains(r#""mine": "1""#), "{info}");
    let layer = backend.iter().find(|i| i.name.ends_with("/layer")).unwrap();
    let layer = model.stat(&layer.name).unwrap();
    assert_eq!(
        layer
            .labels
            .get("containerd.io/snapshot/tier")
            .map(String::as_str),
        Some("base"),
        "{layer:?}"
    );

    // Usage: the model's 4096 bytes per character of the key.
    let usage = containerd.snapshots(&["usage", "rootfs"]);
    let want = format!(
        "rootfs {:.1} KiB {}",
        (4 * rootfs.name.len()) as f64,
        model.stat(&rootfs.name).unwrap().labels.len()
    );
    let got = usage
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(got, want, "{usage}");

    // Errors come back as containerd's errdefs.
    let mut args = vec!["snapshots", "--snapshotter", "thinpool", "rm", "layer"];
    let (ok, out, err) = containerd.ctr(&args);
    assert!(!ok, "removing a parent must fail: {out}");
    assert!(
        err.contains("failed precondition") || err.contains("child"),
        "{err}"
    );
    args[4] = "nope";
    let (ok, _, err) = containerd.ctr(&args);
    assert!(!ok);
    assert!(err.contains("not found"), "{err}");
    let (ok, _, err) = containerd.ctr(&[
        "snapshots",
        "--snapshotter",
        "thinpool",
        "prepare",
        "rootfs",
    ]);
    assert!(!ok);
    assert!(err.contains("already exists"), "{err}");

    containerd.snapshots(&["rm", "rootfs", "peek"]);
    containerd.snapshots(&["rm", "layer"]);
    let ls = containerd.snapshots(&["ls"]);
    assert_eq!(ls.lines().count(), 1, "only the header is left:\n{ls}");
    // containerd removes from the backend in its garbage collection, then calls Cleanup.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(model.list().unwrap().is_empty() && model.cleanups.load(Ordering::SeqCst) > 0) {
        assert!(
            Instant::now() < deadline,
            "containerd's GC did not remove from the backend and clean up: {:?}, {} cleanups; log:\n{}",
            model.list(),
            model.cleanups.load(Ordering::SeqCst),
            containerd.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The daemon stops the server while containerd stays connected: prompt (containerd answers
    // the graceful GOAWAY), the socket is gone, and containerd reports the plugin's calls failing.
    let t = Instant::now();
    server.stop();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t.elapsed()
    );
    assert!(!socket.exists());
    let (ok, _, _) = containerd.ctr(&[
        "snapshots",
        "--snapshotter",
        "thinpool",
        "prepare",
        "after-stop",
    ]);
    assert!(!ok, "a call after stop must fail");
    drop(containerd);
}
