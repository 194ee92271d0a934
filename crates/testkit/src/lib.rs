//! Test support shared by every test crate of the workspace (a dev-dependency only; never
//! linked into the binary).
//!
//! - **One skip policy.** A test that needs an outside program or harness (an oracle such as
//!   `thin_check`, `qemu-img`, the kernel VM harness of `../shared/tools/`) asks
//!   [`require_tool`] / [`skip_or_fail`]. When the thing is missing, the test fails under CI
//!   ([`in_ci`]: `CI` set to anything but empty, `0`, `false` or `no`) and elsewhere prints a loud
//!   `SKIP` line and returns early. Programs are looked for on `PATH` and in the `sbin` folders
//!   (thin-provisioning-tools live in `/usr/sbin`, often not on a normal user's `PATH`); run them
//!   with [`tool`], which uses the path found. With `THINPOOL_SKIP_LOG=FILE` every skip is
//!   also appended to FILE as one line (CI lists them; a passing test's stderr is captured).
//! - **The dm-thin test vectors** live in the repository (`testdata/dm-thin/`, see its README):
//!   [`vector_bytes`], [`vector_file`], [`vector_xml`]. They are always there in a checkout, so a
//!   missing vector is a broken checkout and panics, whatever `CI` says.
//! - **The two oracles every metadata test uses**: [`thin_check`] and [`thin_dump`].
//!
//! ```
//! if thinpool_testkit::require_tool("sh") {
//!     let out = thinpool_testkit::tool("sh").arg("-c").arg("exit 0").status().unwrap();
//!     assert!(out.success());
//! }
//! ```

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;

pub use tempfile::TempPath;

/// True when running under CI: `CI` set to anything but empty, `0`, `false` or `no`
/// (GitHub, GitLab and most CI systems set `CI=true`; `.ci/run` exports it too).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| means_yes(&v))
}

/// The rule of [`in_ci`] for one value of `CI`.
fn means_yes(v: &str) -> bool {
    let v = v.trim();
    !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false") || v.eq_ignore_ascii_case("no"))
}

fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string()
}

/// Something a test needs is missing: panic under CI, otherwise print a loud SKIP line to
/// stderr. Returns `false` (the caller returns early from its test).
pub fn skip_or_fail(what: &str) -> bool {
    if in_ci() {
        panic!("{what} (under CI a missing oracle or harness is a failure)");
    }
    let line = format!("SKIP {}: {what}", test_name());
    eprintln!("\n**** {line} (this would fail under CI=true) ****\n");
    record_skip(&line);
    false
}

/// Append `line` to the file named by `THINPOOL_SKIP_LOG`, if set: the test harness captures
/// a passing test's stderr, so this is how a CI step lists what was skipped.
fn record_skip(line: &str) {
    let Some(path) = std::env::var_os("THINPOOL_SKIP_LOG") else {
        return;
    };
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = appended {
        panic!("THINPOOL_SKIP_LOG={}: {e}", Path::new(&path).display());
    }
}

/// Where programs are looked for beyond `PATH`: the `sbin` folders, where Debian puts
/// thin-provisioning-tools, `losetup`, `mkfs.*`.
const SBIN: [&str; 3] = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// The path of the executable `name`, from `PATH` then the `sbin` folders.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Debian's package for a program the tests use, for the SKIP/failure message.
fn package_of(name: &str) -> &'static str {
    match name {
        n if n.starts_with("thin_") => "thin-provisioning-tools",
        "qemu-img" | "qemu-io" | "qemu-nbd" => "qemu-utils",
        "nbdinfo" | "nbdcopy" | "nbdsh" => "libnbd-bin (nbdsh: python3-libnbd)",
        "fio" => "fio",
        n if n.starts_with("mkfs.ext") || n == "e2fsck" || n == "resize2fs" => "e2fsprogs",
        n if n.contains("xfs") => "xfsprogs",
        "openssl" => "openssl",
        _ => "its package",
    }
}

/// True if the program `name` can be run. If it cannot: panics under CI, otherwise prints a
/// loud SKIP line and returns false.
pub fn require_tool(name: &str) -> bool {
    if which(name).is_some() {
        return true;
    }
    skip_or_fail(&format!(
        "`{name}` not found on PATH or in {} (apt-get install {})",
        SBIN.join(", "),
        package_of(name)
    ))
}

/// [`require_tool`] for several programs; stops at the first missing one.
pub fn require_tools(names: &[&str]) -> bool {
    names.iter().all(|n| require_tool(n))
}

/// A command for the program `name`, resolved with [`which`] (the bare name if not found, so
/// that the spawn error names it).
pub fn tool(name: &str) -> Command {
    Command::new(which(name).unwrap_or_else(|| PathBuf::from(name)))
}

/// `thin_check` of a metadata file: Ok, or Err with its status and output.
pub fn thin_check(path: &Path) -> Result<(), String> {
    let o = tool("thin_check")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run thin_check: {e}"));
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "thin_check {} failed ({}):\n{}{}",
            path.display(),
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

/// What `thin_dump EXTRA.. PATH` prints; panics with its stderr if it fails.
pub fn thin_dump(path: &Path, extra: &[&str]) -> String {
    let o = tool("thin_dump")
        .args(extra)
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run thin_dump: {e}"));
    assert!(
        o.status.success(),
        "thin_dump {extra:?} {} failed ({}): {}",
        path.display(),
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("thin_dump prints UTF-8")
}

/// The dm-thin test vectors in `testdata/dm-thin/` (its README says what each exercises).
pub const VECTORS: [&str; 6] = [
    "empty",
    "one-thin",
    "snapshots",
    "many-devices",
    "metadata-snap",
    "shared-root",
];

/// The repository's `testdata/dm-thin` folder.
pub fn testdata_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/dm-thin")
}

/// The metadata image of vector `name` (`testdata/dm-thin/NAME.meta.gz`, unpacked).
pub fn vector_bytes(name: &str) -> Vec<u8> {
    let gz = testdata_dir().join(format!("{name}.meta.gz"));
    let file = std::fs::File::open(&gz)
        .unwrap_or_else(|e| panic!("open test vector {}: {e}", gz.display()));
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .unwrap_or_else(|e| panic!("gunzip {}: {e}", gz.display()));
    bytes
}

/// Vector `name` unpacked into a fresh temporary file (the tools need a seekable file of the
/// full size), deleted when the returned path is dropped.
pub fn vector_file(name: &str) -> TempPath {
    let mut f = tempfile::Builder::new()
        .prefix(&format!("thinpool-test.{name}."))
        .suffix(".meta")
        .tempfile()
        .expect("create a temporary file");
    f.write_all(&vector_bytes(name))
        .expect("write the unpacked vector");
    f.as_file().sync_all().expect("sync the unpacked vector");
    f.into_temp_path()
}

/// `testdata/dm-thin/NAME.xml`: exactly what `thin_dump` 0.9.0 prints for vector `name`.
pub fn vector_xml(name: &str) -> String {
    let p = testdata_dir().join(format!("{name}.xml"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_values() {
        for yes in ["true", "TRUE", "1", "yes", "gitlab"] {
            assert!(means_yes(yes), "{yes}");
        }
        for no in ["", "0", "false", "False", "no", " "] {
            assert!(!means_yes(no), "{no:?}");
        }
    }

    #[test]
    fn finds_programs_in_sbin_too() {
        assert!(which("sh").is_some());
        assert!(which("no-such-program-thinpool").is_none());
    }

    #[test]
    fn every_vector_is_in_the_checkout() {
        for name in VECTORS {
            let bytes = vector_bytes(name);
            assert!(bytes.len() >= 4 << 20, "{name}: {} bytes", bytes.len());
            assert!(vector_xml(name).starts_with("<superblock"), "{name}");
        }
    }
}
