//! `thinpool up` as a child process on a fresh root, driven through the CLI as a user would:
//! one harness for the daemon, FUSE and filesystem tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{TempDir, run, run_ok, scratch, skip_or_fail, text, thinpool, tool};

/// `thinpool up` flags of the layer-store and image tests: a pool of small sparse files (2 GiB
/// data, 32 MiB metadata) and a 256 MiB base device.
pub const LAYER_POOL: [&str; 6] = [
    "--data-size",
    "2G",
    "--metadata-size",
    "32M",
    "--base-size",
    "256M",
];

/// A root with `thinpool up` running on it; its stderr goes to `log`. Dropping it kills the
/// daemon (printing its log) and detaches what a killed daemon leaves mounted.
pub struct Up {
    /// Scratch folder holding the root, the log and anything a test puts beside them.
    pub dir: TempDir,
    /// The pool root (`dir/root`).
    pub root: PathBuf,
    /// The daemon, while it runs.
    pub child: Option<Child>,
    /// Its stderr.
    pub log: PathBuf,
}

impl Up {
    /// `thinpool up ARGS…` on a fresh root; returns once it serves.
    pub fn start(args: &[&str]) -> Up {
        let dir = scratch();
        let root = dir.path().join("root");
        let log = dir.path().join("up.log");
        let mut up = Up {
            dir,
            root,
            child: None,
            log,
        };
        up.spawn(args);
        up
    }

    /// Start `thinpool up ARGS…` (again) on this root; returns once it serves.
    pub fn spawn(&mut self, args: &[&str]) {
        self.spawn_wrapped(&[], args);
    }

    /// Start `WRAPPER… thinpool --root ROOT up ARGS…` (again): the wrapper (e.g. `unshare`)
    /// runs the daemon with the rest of its words, and must exec it (same pid, so signals
    /// reach the daemon). Returns once it serves.
    pub fn spawn_wrapped(&mut self, wrapper: &[&str], args: &[&str]) {
        let logf = std::fs::File::create(&self.log).unwrap();
        let mut c = self.cmd(&["up"]);
        c.args(args);
        if let Some((first, rest)) = wrapper.split_first() {
            let mut w = Command::new(first);
            w.args(rest).arg(c.get_program()).args(c.get_args());
            for (k, v) in c.get_envs() {
                match v {
                    Some(v) => w.env(k, v),
                    None => w.env_remove(k),
                };
            }
            c = w;
        }
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(logf);
        self.child = Some(c.spawn().expect("start thinpool up"));
        let deadline = Instant::now() + Duration::from_secs(60);
        // The last line `up` prints once everything is served (an earlier log line may
        // mention a stale control socket).
        while !self.log_text().contains("stop with SIGTERM") {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("thinpool up exited ({st}):\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "thinpool up did not start in 60 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `thinpool --root ROOT ARGS…`.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = thinpool(["--root".as_ref(), self.root.as_os_str()]);
        c.args(args).env_remove("THINPOOL_ROOT");
        c
    }

    /// Run, expect success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        text(&run_ok(&mut self.cmd(args)).stdout)
    }

    /// Run with `--json` in `args`; the parsed output.
    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).expect("--json output parses")
    }

    /// Run and expect failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = run(&mut self.cmd(args));
        assert!(
            !out.status.success(),
            "thinpool {args:?} should fail, printed {}",
            text(&out.stdout)
        );
        text(&out.stderr)
    }

    /// The NBD URI of an export on the daemon's unix socket.
    pub fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.root.join("nbd.sock").display()
        )
    }

    /// The FUSE export's folder (`ROOT/files`).
    pub fn files(&self) -> PathBuf {
        self.root.join("files")
    }

    /// A volume's file in the FUSE export.
    pub fn file(&self, name: &str) -> PathBuf {
        self.files().join(name)
    }

    /// A volume as `vol ls --json` lists it.
    pub fn volume(&self, name: &str) -> Value {
        let v = self.json(&["vol", "ls", "--json"]);
        v.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name} in vol ls --json: {v}"))
            .clone()
    }

    /// `(size, mapped_blocks)` of a volume from `vol ls --json`.
    pub fn vol(&self, name: &str) -> (u64, u64) {
        let v = self.volume(name);
        (
            v["size"].as_u64().unwrap(),
            v["mapped_blocks"].as_u64().unwrap(),
        )
    }

    /// Send `SIG` to the daemon and wait (60 s at most) for it to exit.
    pub fn signal(&mut self, sig: &str) -> ExitStatus {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        self.wait_exit(&format!("of SIG{sig}"))
    }

    /// Wait (60 s at most) for the daemon to exit; `after` says after what, for the message.
    pub fn wait_exit(&mut self, after: &str) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "thinpool up did not exit within 60 s {after}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM: exit 0, the sockets gone, the files unmounted.
    pub fn stop(&mut self) {
        let st = self.signal("TERM");
        assert!(
            st.success(),
            "thinpool up exited {st}:\n{}",
            self.log_text()
        );
        for s in ["nbd.sock", "control.sock"] {
            assert!(!self.root.join(s).exists(), "{s} left behind");
        }
        assert!(
            !is_mounted(&self.files()),
            "ROOT/files still mounted after stop"
        );
    }

    /// `thin_check` on the pool's metadata (the daemon stopped).
    pub fn thin_check(&self) {
        run_ok(tool("thin_check").arg(self.root.join("pool/metadata")));
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            eprintln!("thinpool up log:\n{}", self.log_text());
        }
        // A killed daemon leaves its mount behind (ENOTCONN): take it away.
        if is_mounted(&self.files()) {
            let _ = Command::new("umount").arg("-l").arg(self.files()).status();
        }
    }
}

/// Detaches, when dropped, the loop devices over files below its folder (the FUSE export's,
/// `Up::files`) that a failed test leaves, unmounting what stands on them first.
pub struct LoopCleanup(pub PathBuf);

impl Drop for LoopCleanup {
    fn drop(&mut self) {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for (dev, file) in loop_devices() {
            if file.starts_with(&self.0) {
                for dir in mounts
                    .lines()
                    .filter(|l| l.split(' ').next() == Some(dev.as_str()))
                    .filter_map(|l| l.split(' ').nth(1))
                {
                    let _ = Command::new("umount").args(["-l", dir]).status();
                }
                let _ = Command::new("losetup").args(["-d", &dev]).status();
            }
        }
    }
}

/// Size of the filesystem on `dir` as `df` shows it (bytes).
pub fn df_size(dir: &Path) -> u64 {
    crate::hostfs::df(dir, "size")
}

/// Whether something is mounted on `p` (as `/proc/self/mounts` spells it).
pub fn is_mounted(p: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let p = p.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(p))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // `id -u` rather than a libc call: the tests crate has no unsafe and no libc.
    let out = run_ok(Command::new("id").arg("-u"));
    text(&out.stdout).trim() == "0"
}

/// Root and `/dev/fuse` are here (else skipped loudly, a failure under `CI=true`).
pub fn fuse_usable() -> bool {
    if !is_root() || !Path::new("/dev/fuse").exists() {
        return skip_or_fail("the FUSE export needs root and /dev/fuse");
    }
    true
}

/// Whether this process may grow a mounted ext4 (the kernel wants CAP_SYS_RESOURCE, which
/// some containers drop).
pub fn may_grow_ext4_online() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    eff & (1 << 24) != 0
}

/// Attached loop devices and their backing files, as `losetup -l` lists them.
pub fn loop_devices() -> Vec<(String, PathBuf)> {
    let out = run(Command::new("losetup").args(["-l", "-n", "-O", "NAME,BACK-FILE"]));
    text(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), PathBuf::from(w.next()?)))
        })
        .collect()
}
