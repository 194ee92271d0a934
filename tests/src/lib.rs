//! Shared helpers for thinpool's end-to-end tests (`tests/it/`).
//!
//! The tests drive the built `thinpool` binary as a process and compare what it prints and writes
//! with the real oracles: thin-provisioning-tools 0.9.0 (`thin_dump`, `thin_check`, `thin_ls`,
//! `thin_delta`, `thin_restore`, `thin_repair`, `thin_metadata_size`) and the Linux kernel's
//! dm-thin, booted in a VM by `../shared/tools/kernel-dm-thin/run` (see [`kernel`]).
//!
//! - [`thinpool_bin`] finds the binary next to the test executable and (re)builds it with
//!   `cargo build -p thinpool` once per test process, so `cargo test --workspace` is enough.
//! - [`require_tool`], [`skip_or_fail`], [`tool`] (from `thinpool-testkit`, the one skip policy of
//!   every test crate): a missing oracle fails under CI and skips loudly elsewhere.
//! - [`vector`] / [`vector_xml`]: the dm-thin test vectors in the repository's `testdata/dm-thin/`.
//! - [`run`], [`run_ok`], [`stdout_of`]: run a command, show its stderr when it fails.
//! - [`pool`]: an in-memory model of a pool as `thin_dump` prints it, with a random generator.
//! - [`kernel`]: boot the kernel on a pool and read blocks back.
//! - [`nbd`]: `thinpool nbd serve` as a child process, NBD client wrappers, a raw NBD client.
//! - [`images`]: container images built in memory (layers with every tar feature, whiteouts and
//!   opaque folders) written as `docker save` tarballs, OCI layouts and OCI archives.
//! - [`tree`]: file trees recorded and diffed; reference root file systems from `umoci unpack`
//!   and from our own layer-by-layer apply.
//! - [`containerd`]: a private containerd driven with `ctr` (import, run, snapshots, mounts, GC).

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub use tempfile::{TempDir, TempPath};
pub use thinpool_testkit::{
    VECTORS, in_ci, require_tool, require_tools, skip_or_fail, testdata_dir, tool,
    vector_file as vector, vector_xml, which,
};

pub mod containerd;
pub mod daemon;
pub mod hostfs;
pub mod images;
pub mod kernel;
pub mod nbd;
pub mod pool;
pub mod tree;

/// The workspace root (the folder holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives one level below the workspace root")
        .to_path_buf()
}

/// The `shared/` folder beside the repository (`<workspace root>/../shared`).
pub fn shared_dir() -> PathBuf {
    workspace_root().join("..").join("shared")
}

/// The guest scripts of the kernel tests (`tests/kernel/`).
pub fn kernel_scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel")
}

fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string()
}

/// The `thinpool` binary of this build.
///
/// It is looked for in the target directory of the running test executable
/// (`target/<profile>/deps/it-…` → `target/<profile>/thinpool`). Once per test process it is
/// (re)built there with `cargo build [--release|--profile P] -p thinpool`, which costs a fraction
/// of a second when it is up to date and guarantees the tests never run a stale binary
/// (`cargo test` builds only the binary's unit-test harness, not the binary itself).
///
/// `THINPOOL_BIN=/path/to/thinpool` overrides all of this. `THINPOOL_NO_BUILD=1` skips the build
/// and takes whatever binary is in the target directory.
pub fn thinpool_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("THINPOOL_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("current_exe of the test binary");
        // target/<profile>/deps/<test exe>
        let deps = exe.parent().expect("test executable has a parent folder");
        let profile_dir = if deps.file_name() == Some(OsStr::new("deps")) {
            deps.parent().expect("deps has a parent").to_path_buf()
        } else {
            deps.to_path_buf()
        };
        let bin = profile_dir.join("thinpool");
        if std::env::var_os("THINPOOL_NO_BUILD").is_none() {
            build_thinpool(&profile_dir);
        }
        assert!(
            bin.is_file(),
            "{} not found: run `cargo build -p thinpool` with the same profile as the tests, \
             or set THINPOOL_BIN",
            bin.display()
        );
        bin
    })
    .clone()
}

fn build_thinpool(profile_dir: &Path) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_string();
    let target_dir = profile_dir.parent().expect("profile dir has a parent");
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--quiet")
        .arg("-p")
        .arg("thinpool")
        .arg("--bin")
        .arg("thinpool")
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.arg("--profile").arg(other);
        }
    }
    match cmd.stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "building thinpool failed ({:?}, {}):\n{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        // No cargo (test binary run by hand): fall back to whatever binary is there.
        Err(e) => eprintln!("note: could not run {cargo:?} to build thinpool: {e}"),
    }
}

/// A command running the `thinpool` binary with `args`.
pub fn thinpool<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(thinpool_bin());
    cmd.args(args);
    cmd
}

/// `thinpool --root ROOT ARGS…` (with `THINPOOL_ROOT` unset, so only `root` counts).
pub fn thinpool_in(root: &Path, args: &[&str]) -> Command {
    let mut cmd = thinpool(["--root".as_ref(), root.as_os_str()]);
    cmd.args(args).env_remove("THINPOOL_ROOT");
    cmd
}

/// `thinpool pool create` of a small pool in `root` (64 MiB of data, 8 MiB of metadata, 64 KiB
/// blocks), with the volumes `(name, size)` created in it.
pub fn small_pool(root: &Path, volumes: &[(&str, &str)]) {
    run_ok(&mut thinpool_in(
        root,
        &[
            "pool",
            "create",
            "--data-size",
            "64M",
            "--metadata-size",
            "8M",
        ],
    ));
    for (name, size) in volumes {
        run_ok(&mut thinpool_in(
            root,
            &["vol", "create", name, "--size", size],
        ));
    }
}

/// Shell-like rendering of a command, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run `cmd` to completion (stdin closed), capturing stdout and stderr. When it exits non-zero,
/// its command line, status and stderr (and the start of stdout) go to this test's stderr.
/// Panics only if the program cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(cmd)));
    if !out.status.success() {
        eprintln!(
            "---- `{}` exited with {}\n---- stderr:\n{}---- stdout (first 2000 bytes):\n{}\n----",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout[..out.stdout.len().min(2000)])
        );
    }
    out
}

/// [`run`] with `input` on stdin.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(cmd)));
    let mut stdin = child.stdin.take().expect("stdin was piped");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for `{}`: {e}", describe(cmd)));
    let _ = writer.join();
    if !out.status.success() {
        eprintln!(
            "---- `{}` exited with {}\n---- stderr:\n{}----",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// [`run`], and panic unless `cmd` exited 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "`{}` failed with {} (stderr above)",
        describe(cmd),
        out.status
    );
    out
}

/// The stdout of a successful `cmd`, as UTF-8.
pub fn stdout_of(cmd: &mut Command) -> String {
    let out = run_ok(cmd);
    String::from_utf8(out.stdout)
        .unwrap_or_else(|e| panic!("`{}` printed non-UTF-8: {e}", describe(cmd)))
}

/// Lossy UTF-8 of a byte slice (stdout/stderr).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh temporary folder, removed when dropped.
pub fn scratch() -> TempDir {
    tempfile::Builder::new()
        .prefix("thinpool-test.")
        .tempdir()
        .expect("create a temporary folder")
}

/// Create (or truncate) `path` as a sparse, zeroed file of `size` bytes.
pub fn zeroed_file(path: &Path, size: u64) -> PathBuf {
    let f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size)
        .unwrap_or_else(|e| panic!("set length of {}: {e}", path.display()));
    path.to_path_buf()
}

/// A new zeroed temporary file of `size` bytes, deleted when the returned path is dropped.
pub fn zeroed_temp(size: u64) -> TempPath {
    let f = tempfile::Builder::new()
        .prefix("thinpool-test.")
        .suffix(".meta")
        .tempfile()
        .expect("create a temporary file");
    f.as_file().set_len(size).expect("size the temporary file");
    f.into_temp_path()
}

/// Size in bytes of a file.
pub fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .len()
}

/// Where two texts first differ, with a few lines of context, for assertion messages.
/// Returns an empty string when they are equal.
pub fn first_diff(label_a: &str, a: &str, label_b: &str, b: &str) -> String {
    if a == b {
        return String::new();
    }
    let la: Vec<&str> = a.split_inclusive('\n').collect();
    let lb: Vec<&str> = b.split_inclusive('\n').collect();
    let i = la
        .iter()
        .zip(&lb)
        .position(|(x, y)| x != y)
        .unwrap_or(la.len().min(lb.len()));
    let mut s = format!(
        "{label_a} ({} lines, {} bytes) and {label_b} ({} lines, {} bytes) differ from line {}:\n",
        la.len(),
        a.len(),
        lb.len(),
        b.len(),
        i + 1
    );
    let from = i.saturating_sub(2);
    for (label, lines) in [(label_a, &la), (label_b, &lb)] {
        let _ = writeln!(s, "  --- {label}");
        for (n, l) in lines.iter().enumerate().skip(from).take(6) {
            let mark = if n == i { '>' } else { ' ' };
            let _ = writeln!(s, "  {mark}{:6} {:?}", n + 1, l);
        }
        if lines.len() <= i {
            let _ = writeln!(s, "  >  (ends after {} lines)", lines.len());
        }
    }
    s
}

/// Collects failed comparisons so that one test can check every vector and report all of them.
#[derive(Default)]
pub struct Failures(Vec<String>);

impl Failures {
    /// A new, empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of failures recorded so far.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if no failure was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Record a failure.
    pub fn add(&mut self, msg: impl Into<String>) {
        let msg = msg.into();
        eprintln!("FAIL {msg}");
        self.0.push(msg);
    }

    /// Record a failure unless `ours == theirs` (texts).
    pub fn eq_text(&mut self, what: &str, ours: &str, theirs: &str) {
        if ours != theirs {
            self.add(format!(
                "{what}:\n{}",
                first_diff("thinpool", ours, "oracle", theirs)
            ));
        }
    }

    /// Record a failure unless `cond`.
    pub fn check(&mut self, what: &str, cond: bool) {
        if !cond {
            self.add(what.to_string());
        }
    }

    /// Panic with every recorded failure, if any.
    pub fn finish(self) {
        if !self.0.is_empty() {
            panic!(
                "{} failure(s):\n{}",
                self.0.len(),
                self.0
                    .iter()
                    .map(|m| format!("- {m}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

/// The seed for a randomised test: `THINPOOL_TEST_SEED` if set, else random. Printed, so that
/// a failure can be replayed with `THINPOOL_TEST_SEED=<seed>`.
pub fn test_seed() -> u64 {
    let seed = match std::env::var("THINPOOL_TEST_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("THINPOOL_TEST_SEED={s:?}: {e}")),
        Err(_) => rand::random(),
    };
    eprintln!(
        "{}: seed {seed} (replay with THINPOOL_TEST_SEED={seed})",
        test_name()
    );
    seed
}

/// A count from the environment variable `var` (e.g. `THINPOOL_TEST_CASES`), else `default`.
pub fn env_count(var: &str, default: usize) -> usize {
    match std::env::var(var) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{var}={s:?}: {e}")),
        Err(_) => default,
    }
}

/// Keep a failing input for later: writes `content` to `$TMPDIR/thinpool-failed-<name>` and
/// returns the path (printed in the failure message).
pub fn keep_failed_input(name: &str, content: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("thinpool-failed-{name}"));
    if let Err(e) = std::fs::write(&p, content) {
        eprintln!("could not keep {}: {e}", p.display());
    }
    p
}
