//! A private containerd (1.6) as a child process, driven with `ctr`: the oracle for the
//! snapshotter. Everything it owns lives in one temporary folder — root, state, the gRPC, ttrpc
//! and debug sockets, the runc root (`ctr run --runc-root`), its log — so several can run at
//! once beside a system containerd. The CRI plugin is disabled; with a snapshotter socket, the
//! config declares it as the proxy plugin `thinpool`:
//!
//! ```toml
//! [proxy_plugins.thinpool]
//!   type = "snapshot"
//!   address = "SOCKET"
//! ```
//!
//! Every `ctr` command runs in the namespace [`NAMESPACE`]. Dropping a [`Containerd`] kills
//! the tasks' shims it started, then containerd, unmounts what is left below its folder and
//! prints its log if the test is failing.
//!
//! Shim sockets are not in the folder: containerd 1.6 puts them in `/run/containerd/s/` under a
//! hash of the gRPC address, namespace and container id, so they do not collide either.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{TempDir, describe, require_tools, run, scratch, text};

/// The containerd namespace of every `ctr` command run here.
pub const NAMESPACE: &str = "thinpool-test";

/// The name of thinpool's proxy snapshotter in the config [`Containerd::start`] writes.
pub const THINPOOL_SNAPSHOTTER: &str = "thinpool";

/// A running private containerd.
pub struct Containerd {
    /// The folder holding everything (`root/`, `state/`, sockets, `containerd.log`).
    pub dir: TempDir,
    /// The gRPC socket (`dir/containerd.sock`).
    pub address: PathBuf,
    /// The config file written (`dir/config.toml`).
    pub config: PathBuf,
    /// containerd's stdout and stderr.
    pub log: PathBuf,
    child: Option<Child>,
}

/// A snapshot as `ctr snapshots ls` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its key (a chain ID for committed image layers).
    pub key: String,
    /// Its parent's key, empty for none.
    pub parent: String,
    /// `Committed`, `Active` or `View`.
    pub kind: String,
}

/// A container snapshot mounted by [`Containerd::mount_container_snapshot`]. Dropping it
/// unmounts it and removes the snapshot.
pub struct MountedSnapshot<'a> {
    ctd: &'a Containerd,
    /// The snapshotter it came from.
    pub snapshotter: String,
    /// The snapshot key.
    pub key: String,
    /// Where it is mounted.
    pub target: PathBuf,
    /// The mount command(s) `ctr snapshots mounts` printed, as run.
    pub commands: Vec<Vec<String>>,
}

impl MountedSnapshot<'_> {
    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for MountedSnapshot<'_> {
    fn drop(&mut self) {
        // One umount per mount command, top first.
        for _ in &self.commands {
            let st = Command::new("umount").arg(&self.target).status();
            if !matches!(st, Ok(s) if s.success()) {
                let _ = Command::new("umount").arg("-l").arg(&self.target).status();
            }
        }
        let out = self.ctd.ctr(&[
            "snapshots",
            "--snapshotter",
            &self.snapshotter,
            "rm",
            &self.key,
        ]);
        if !out.status.success() && !std::thread::panicking() {
            eprintln!(
                "removing snapshot {} failed: {}",
                self.key,
                text(&out.stderr)
            );
        }
    }
}

impl Containerd {
    /// Start a private containerd (with thinpool's snapshotter socket as proxy plugin
    /// [`THINPOOL_SNAPSHOTTER`] if given) and wait (30 s at most) until `ctr version` answers.
    /// `None` (skipped, or a failure under CI) without `containerd` or `ctr`.
    pub fn start(snapshotter_socket: Option<&Path>) -> Option<Containerd> {
        if !require_tools(&["containerd", "ctr"]) {
            return None;
        }
        let dir = scratch();
        let d = dir.path();
        let address = d.join("containerd.sock");
        let config = d.join("config.toml");
        let log = d.join("containerd.log");
        let q = |p: &Path| toml_string(&p.to_string_lossy());
        let mut cfg = format!(
            "version = 2\n\
             root = {root}\n\
             state = {state}\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             \n\
             [grpc]\n  address = {grpc}\n\n\
             [ttrpc]\n  address = {ttrpc}\n\n\
             [debug]\n  address = {debug}\n  level = \"debug\"\n\n\
             [metrics]\n  address = \"\"\n\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt}\n",
            root = q(&d.join("root")),
            state = q(&d.join("state")),
            grpc = q(&address),
            ttrpc = q(&d.join("containerd.sock.ttrpc")),
            debug = q(&d.join("debug.sock")),
            opt = q(&d.join("opt")),
        );
        if let Some(sock) = snapshotter_socket {
            cfg.push_str(&format!(
                "\n[proxy_plugins]\n  [proxy_plugins.{THINPOOL_SNAPSHOTTER}]\n    \
                 type = \"snapshot\"\n    address = {}\n",
                q(sock)
            ));
        }
        std::fs::write(&config, cfg).expect("write containerd's config");
        let logf = std::fs::File::create(&log).expect("create containerd's log");
        let logf2 = logf.try_clone().expect("clone the log file handle");
        let child = tool_cmd("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(logf2)
            .spawn()
            .expect("start containerd");
        let mut c = Containerd {
            dir,
            address,
            config,
            log,
            child: Some(child),
        };
        c.wait_ready();
        Some(c)
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!("containerd exited ({st}):\n{}", self.log_text());
            }
            if self.address.exists() {
                let out = self.ctr_cmd(&["version"]).stdin(Stdio::null()).output();
                if matches!(&out, Ok(o) if o.status.success()) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer `ctr version` within 30 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What containerd logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let t = self.log_text();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `ctr --address SOCK -n thinpool-test ARGS…`, not run.
    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = tool_cmd("ctr");
        c.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(NAMESPACE)
            .args(args)
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE")
            .env_remove("CONTAINERD_SNAPSHOTTER");
        c
    }

    /// Run `ctr ARGS…` (stdin closed); its output (stderr shown on failure).
    pub fn ctr(&self, args: &[&str]) -> Output {
        run(&mut self.ctr_cmd(args))
    }

    /// Run `ctr ARGS…`, expect success; its stdout. The panic message carries ctr's stderr and
    /// the end of containerd's log.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let mut cmd = self.ctr_cmd(args);
        let out = run(&mut cmd);
        assert!(
            out.status.success(),
            "`{}` failed with {}:\n{}\n---- containerd log (last 40 lines):\n{}",
            describe(&cmd),
            out.status,
            text(&out.stderr),
            self.log_tail(40)
        );
        text(&out.stdout)
    }

    /// `ctr images import --snapshotter S TAR` (a docker save tarball or an OCI archive): the
    /// layers are unpacked into snapshotter `S`. Returns ctr's stdout.
    pub fn import(&self, tar: &Path, snapshotter: &str) -> String {
        let tar = tar.to_string_lossy();
        self.ctr_ok(&["images", "import", "--snapshotter", snapshotter, &tar])
    }

    /// Names of the images (`ctr images ls -q`).
    pub fn images(&self) -> Vec<String> {
        self.ctr_ok(&["images", "ls", "-q"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// `ctr images rm --sync NAME`: the image goes, and the garbage collector runs before it
    /// returns (content and snapshots nothing else refers to are removed).
    pub fn remove_image(&self, name: &str) {
        self.ctr_ok(&["images", "rm", "--sync", name]);
    }

    /// The runc root of this containerd's containers (`dir/runc`, passed as `--runc-root`):
    /// runc's default, `/run/containerd/runc/NAMESPACE`, would be shared by every instance.
    pub fn runc_root(&self) -> PathBuf {
        self.dir.path().join("runc")
    }

    /// `ctr run --rm --snapshotter S --runc-root DIR/runc IMAGE ID CMD…`: the container's
    /// stdout (stderr shown, and the panic message has it, on failure).
    pub fn run(&self, image: &str, id: &str, snapshotter: &str, cmd: &[&str]) -> String {
        self.run_with(&["--rm"], image, id, snapshotter, cmd)
    }

    /// `ctr run --detach …`: the container keeps running (its task is killed when this
    /// containerd is dropped); returns ctr's stdout.
    pub fn run_detached(&self, image: &str, id: &str, snapshotter: &str, cmd: &[&str]) -> String {
        self.run_with(&["--detach"], image, id, snapshotter, cmd)
    }

    /// The host pid of a running task's init process (`ctr tasks ls`), if it is listed.
    pub fn task_pid(&self, id: &str) -> Option<u32> {
        self.ctr_ok(&["tasks", "ls"]).lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f.get(1)?.parse().ok())?
        })
    }

    fn run_with(
        &self,
        flags: &[&str],
        image: &str,
        id: &str,
        snapshotter: &str,
        cmd: &[&str],
    ) -> String {
        let runc_root = self.runc_root();
        let runc_root = runc_root.to_string_lossy();
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[
            "--snapshotter",
            snapshotter,
            "--runc-root",
            &runc_root,
            image,
            id,
        ]);
        args.extend_from_slice(cmd);
        self.ctr_ok(&args)
    }

    /// Wait (30 s at most) until `snapshotter` answers through containerd: after the
    /// snapshotter's server came back, containerd's client fails fast with the last dial error
    /// until its back-off lets it reconnect. The probe reaches the snapshotter itself (a
    /// prepare and a remove of `wait-probe`; `ctr snapshots ls` reads only containerd's
    /// metadata).
    pub fn wait_snapshotter(&self, snapshotter: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let probe = |verb| {
            [
                "snapshots",
                "--snapshotter",
                snapshotter,
                verb,
                "wait-probe",
            ]
        };
        loop {
            let out = self.ctr(&probe("prepare"));
            if out.status.success() {
                self.ctr_ok(&probe("rm"));
                return;
            }
            assert!(
                Instant::now() < deadline,
                "snapshotter {snapshotter} did not answer within 30 s: {}\n{}",
                text(&out.stderr),
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The snapshots of `snapshotter` (`ctr snapshots --snapshotter S ls`).
    pub fn snapshots_ls(&self, snapshotter: &str) -> Vec<SnapshotInfo> {
        let out = self.ctr_ok(&["snapshots", "--snapshotter", snapshotter, "ls"]);
        out.lines()
            .skip(1) // KEY PARENT KIND
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f.as_slice() {
                    [key, kind] => SnapshotInfo {
                        key: key.to_string(),
                        parent: String::new(),
                        kind: kind.to_string(),
                    },
                    [key, parent, kind] => SnapshotInfo {
                        key: key.to_string(),
                        parent: parent.to_string(),
                        kind: kind.to_string(),
                    },
                    _ => panic!("unexpected `ctr snapshots ls` line {l:?}"),
                }
            })
            .collect()
    }

    /// A container's view of an image, mounted at `target` as a user would do it by hand:
    /// `ctr snapshots --snapshotter S prepare KEY PARENT` (an active snapshot over the image's
    /// top layer, `parent` = its chain ID, [`crate::images::Image::chain_id`]), then
    /// `ctr snapshots --snapshotter S mounts TARGET KEY`, whose printed lines
    /// (`mount -t TYPE SOURCE TARGET -o OPTIONS`) are run as they are (split on spaces, no
    /// shell). Dropping the result unmounts and removes the snapshot.
    pub fn mount_container_snapshot(
        &self,
        snapshotter: &str,
        parent: &str,
        key: &str,
        target: &Path,
    ) -> MountedSnapshot<'_> {
        std::fs::create_dir_all(target)
            .unwrap_or_else(|e| panic!("create {}: {e}", target.display()));
        self.ctr_ok(&[
            "snapshots",
            "--snapshotter",
            snapshotter,
            "prepare",
            key,
            parent,
        ]);
        let commands = self.mount_snapshot(snapshotter, key, target);
        MountedSnapshot {
            ctd: self,
            snapshotter: snapshotter.to_string(),
            key: key.to_string(),
            target: target.to_path_buf(),
            commands,
        }
    }

    /// Mount the existing snapshot `key` at `target` (a folder) with the commands
    /// `ctr snapshots --snapshotter S mounts TARGET KEY` prints (`mount -t TYPE SOURCE TARGET
    /// -o OPTIONS`, run as they are: split on spaces, no shell); returns them, split.
    pub fn mount_snapshot(&self, snapshotter: &str, key: &str, target: &Path) -> Vec<Vec<String>> {
        let target_s = target.to_string_lossy();
        let printed = self.ctr_ok(&[
            "snapshots",
            "--snapshotter",
            snapshotter,
            "mounts",
            &target_s,
            key,
        ]);
        let mut commands = Vec::new();
        for line in printed.lines().filter(|l| !l.trim().is_empty()) {
            let mut words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
            assert_eq!(
                words.first().map(String::as_str),
                Some("mount"),
                "`ctr snapshots mounts` printed {line:?}, not a mount command"
            );
            // No options: ctr prints a bare `-o` at the end.
            if words.last().map(String::as_str) == Some("-o") {
                words.pop();
            }
            let mut cmd = Command::new("mount");
            cmd.args(&words[1..]);
            let out = run(&mut cmd);
            assert!(
                out.status.success(),
                "`{line}` (printed by ctr snapshots mounts) failed: {}\n---- containerd log:\n{}",
                text(&out.stderr),
                self.log_tail(40)
            );
            commands.push(words);
        }
        assert!(
            !commands.is_empty(),
            "`ctr snapshots mounts` printed no mount command for {key}"
        );
        commands
    }

    /// Run the garbage collector now: create a lease and delete it with `--sync` (containerd
    /// 1.6 has no `ctr gc`; a synchronous delete of a lease or image is what makes it collect
    /// and wait). Snapshots no image, container or lease refers to are removed from their
    /// snapshotter before this returns.
    pub fn gc(&self) {
        let id = format!("thinpool-gc-{}", std::process::id());
        self.ctr_ok(&["leases", "create", "--id", &id]);
        self.ctr_ok(&["leases", "delete", "--sync", &id]);
    }

    /// Drop the `containerd.io/gc.ref.content.l.*` labels that tie layer blobs to their image
    /// (`ctr content prune references`), so a later GC may remove the layer blobs once unpacked.
    pub fn prune_content_references(&self) {
        self.ctr_ok(&["content", "prune", "references"]);
    }

    /// The process ids of the shims serving this containerd (`containerd-shim*` whose command
    /// line names our gRPC address).
    pub fn shim_pids(&self) -> Vec<u32> {
        let addr = self.address.to_string_lossy().into_owned();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                    return false;
                };
                let args: Vec<String> = cmdline
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                args.first().is_some_and(|a| a.contains("containerd-shim")) && args.contains(&addr)
            })
            .collect()
    }

    /// The mount points below this containerd's folder, deepest first.
    fn mounts_below(&self) -> Vec<PathBuf> {
        let base = self.dir.path();
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut v: Vec<PathBuf> = mi
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| PathBuf::from(p.replace("\\040", " ")))
            .filter(|p| p.starts_with(base))
            .collect();
        v.sort();
        v.dedup();
        v.reverse();
        v
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        if self.child.is_some() {
            // Tasks first (killing a shim alone would leave its container's processes running),
            // then the shims (our children's children), then containerd.
            let quiet = |args: &[&str]| {
                self.ctr_cmd(args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .output()
                    .map(|o| text(&o.stdout))
                    .unwrap_or_default()
            };
            for id in quiet(&["tasks", "ls", "-q"]).split_whitespace() {
                quiet(&["tasks", "kill", "--all", "--signal", "SIGKILL", id]);
                quiet(&["tasks", "delete", "--force", id]);
            }
            for pid in self.shim_pids() {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for m in self.mounts_below() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        if failing {
            eprintln!(
                "---- containerd log ({}), last 80 lines:\n{}\n----",
                self.log.display(),
                self.log_tail(80)
            );
        }
    }
}

fn tool_cmd(name: &str) -> Command {
    crate::tool(name)
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
