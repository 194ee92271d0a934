//! `thinpool pool check`: `thinpool meta check` on the pool's own metadata, safely while the
//! pool may be in use.
//!
//! - No daemon: take the pool's lock (`<root>/lock`, the one the engine takes) so that no other
//!   process opens the pool meanwhile, and check the metadata device read-only. The pool is not
//!   opened: opening reconciles and may write, and refuses metadata too damaged to open, which
//!   is exactly what a check must still report on.
//! - A daemon holds the pool: ask it to commit (`pool_check` request), then check the committed
//!   metadata read-only here. The daemon links no metadata code, and the engine has no hook to
//!   hold writes off during a check, so writes go on: a commit while the check runs can show it
//!   blocks of two transactions. Such a race is told by the superblock changing under the
//!   check; damage found during one is checked again once, after a fresh commit.
//!
//! The report is `meta check`'s: `TRANSACTION_ID=`/`METADATA_FREE_BLOCKS=` then one line per
//! error; exit status 0 when clean, 1 when damaged.

use std::fs::File;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use thinpool_io::{BlockDevice, FileDevice};
use thinpool_thin::check::{CheckOptions, CheckReport, check};

use crate::client;

/// Bytes of the superblock compared before and after a check to tell a racing commit.
const SUPERBLOCK_LEN: usize = 4096;

/// `thinpool pool check`: returns the exit status (0 clean, 1 damaged).
pub fn run(root: &Path) -> Result<i32> {
    let at = root.display();
    let (metadata, report) = match client::daemon(root)? {
        Some(mut daemon) => {
            tracing::debug!(
                "the pool at {at} is served by the daemon (pid {}): checking what it commits",
                daemon.daemon().pid
            );
            let mut commit = || {
                daemon
                    .pool_check()
                    .with_context(|| format!("committing the pool at {at} to check it"))
            };
            let committed = commit()?;
            let path = committed.metadata_path;
            let dev = open_ro(&path)?;
            let (report, raced) = check_once(&dev, &path)?;
            let report = if report.exit_code() != 0 && raced {
                tracing::info!(
                    "the daemon committed while {} was being checked: checking again",
                    path.display()
                );
                commit()?;
                let (again, raced_again) = check_once(&dev, &path)?;
                if again.exit_code() != 0 && raced_again {
                    eprintln!(
                        "thinpool: warning: the daemon committed during both checks of {}: the \
                         errors below may come from those commits; check again when the pool \
                         is idle",
                        path.display()
                    );
                }
                again
            } else {
                report
            };
            (path, report)
        }
        None => {
            let path = root.join("pool").join("metadata");
            if !path.exists() {
                bail!(
                    "checking the pool at {at}: no pool there ({} does not exist; create one with \
                     `thinpool pool create`)",
                    path.display()
                );
            }
            let _lock = lock(root)?;
            let dev = open_ro(&path)?;
            (path.clone(), check_once(&dev, &path)?.0)
        }
    };
    print!("{}", report.render());
    if tracing::enabled!(tracing::Level::INFO) {
        eprint!("{}", report.render_warnings());
    }
    let code = report.exit_code();
    if code != 0 {
        let fatal = report.has_fatal();
        eprintln!(
            "thinpool: the metadata of the pool at {at} ({}) is damaged: {} error(s){}: stop \
             writing to the pool, keep a copy of the metadata, and rebuild it with `thinpool meta \
             repair -i {} -o NEW_FILE` (see `thinpool meta check {}` for details)",
            metadata.display(),
            report.errors.len(),
            if fatal {
                ""
            } else {
                ", only leaked blocks (harmless to data)"
            },
            metadata.display(),
            metadata.display(),
        );
    }
    Ok(code)
}

/// Take the pool's lock for the check, as the engine does when it opens the pool; fails when
/// another process holds it.
fn lock(root: &Path) -> Result<File> {
    let path = root.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening the pool's lock file {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "checking the pool at {}: another process has the pool open (it holds {}): run the \
             check when that command has finished",
            root.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

fn open_ro(path: &Path) -> Result<Arc<dyn BlockDevice>> {
    Ok(Arc::new(FileDevice::open_read_only(path).with_context(
        || format!("opening the pool's metadata {} read-only", path.display()),
    )?))
}

/// The superblock's bytes as they are now (shorter devices: what there is).
fn superblock(dev: &Arc<dyn BlockDevice>, path: &Path) -> Result<Vec<u8>> {
    let size = dev
        .size()
        .with_context(|| format!("reading the size of {}", path.display()))?;
    let len = usize::try_from(size).map_or(SUPERBLOCK_LEN, |s| s.min(SUPERBLOCK_LEN));
    let mut buf = vec![0u8; len];
    dev.read_at(&mut buf, 0)
        .with_context(|| format!("reading the superblock of {}", path.display()))?;
    Ok(buf)
}

/// One full check of `dev`; also whether the superblock changed meanwhile (a commit raced).
fn check_once(dev: &Arc<dyn BlockDevice>, path: &Path) -> Result<(CheckReport, bool)> {
    let before = superblock(dev, path)?;
    let bar = progress_bar();
    let report = check(dev.clone(), &CheckOptions::default(), &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("checking {}", path.display()))?;
    bar.finish_and_clear();
    let after = superblock(dev, path)?;
    Ok((report, before != after))
}

/// A bar with a known total on a terminal; hidden otherwise.
fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} checked blocks ({eta})")
            .expect("valid template"),
    );
    bar
}
