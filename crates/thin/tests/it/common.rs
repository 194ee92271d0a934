//! Helpers: temp metadata files and the real tools.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use thinpool_io::{BlockDevice, FileDevice};

/// Is `tool` on PATH? Under CI=true a missing oracle fails the test; elsewhere it skips loudly.
pub fn have_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{tool} is required under CI=true but is not installed");
        }
        eprintln!("SKIP: {tool} not installed; oracle comparison skipped");
    }
    found
}

/// A temp dir holding one metadata file of `size` bytes.
pub struct TempMeta {
    pub _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl TempMeta {
    pub fn new(size: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        FileDevice::create(&path, size).unwrap();
        TempMeta { _dir: dir, path }
    }
    pub fn dev(&self) -> Arc<dyn BlockDevice> {
        Arc::new(FileDevice::open(&self.path).unwrap())
    }
}

/// Run thin_check on a file; returns (success, combined output).
pub fn thin_check(path: &Path) -> (bool, String) {
    let o = Command::new("thin_check").arg(path).output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// thin_dump output of a file.
pub fn thin_dump(path: &Path, extra: &[&str]) -> String {
    let o = Command::new("thin_dump")
        .args(extra)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "thin_dump failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}
