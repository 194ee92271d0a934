//! Helpers: temp metadata files and the real tools.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use thinpool_io::{BlockDevice, FileDevice};

pub use thinpool_testkit::{require_tool as have_tool, thin_dump};

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

/// Run thin_check on a file; returns (success, its error output when it failed).
pub fn thin_check(path: &Path) -> (bool, String) {
    match thinpool_testkit::thin_check(path) {
        Ok(()) => (true, String::new()),
        Err(e) => (false, e),
    }
}
