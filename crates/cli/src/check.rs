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
//!
//! `--clear-needs-check-flag` (like `thin_check`'s) clears the superblock's NEEDS_CHECK flag
//! after a clean check, the only way a flagged pool gets back to write mode. Only offline: the
//! lock is taken as above and held across the check and the one write (the superblock's flags
//! word and checksum); with a daemon running it is refused, as the daemon holds the pool open
//! read-only and would not notice. Without the option nothing is ever written, and a clean
//! check of a flagged pool says how to clear it: clearing is a decision (the pool failed in a
//! way the abort could not undo), taken explicitly as with `thin_check`, and `pool check` stays
//! a looking command whether a daemon runs or not.

use std::fs::File;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use thinpool_io::{BlockDevice, FileDevice};
use thinpool_thin::check::{
    CheckOptions, CheckReport, NeedsCheckFlag, check, check_and_clear_needs_check,
};

use crate::client;

/// Bytes of the superblock compared before and after a check to tell a racing commit.
const SUPERBLOCK_LEN: usize = 4096;

/// `thinpool pool check [--clear-needs-check-flag]`: returns the exit status (0 clean, 1
/// damaged).
pub fn run(root: &Path, clear_needs_check: bool) -> Result<i32> {
    let at = root.display();
    let mut flag = None;
    let (metadata, report) = match client::daemon(root)? {
        Some(daemon) if clear_needs_check => bail!(
            "clearing NEEDS_CHECK on the pool at {at}: the daemon (pid {}) has the pool open, \
             and the flag can only be cleared while no one does; stop the daemon (Ctrl-C, \
             SIGTERM or `systemctl stop thinpool`) and run `thinpool pool check \
             --clear-needs-check-flag` again",
            daemon.daemon().pid
        ),
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
            if clear_needs_check {
                let dev = open_rw(&path)?;
                let bar = progress_bar();
                let (report, outcome) =
                    check_and_clear_needs_check(dev, &CheckOptions::default(), &mut |d, t| {
                        bar.set_length(t);
                        bar.set_position(d);
                    })
                    .with_context(|| format!("checking {}", path.display()))?;
                bar.finish_and_clear();
                flag = Some(outcome);
                (path.clone(), report)
            } else {
                let dev = open_ro(&path)?;
                (path.clone(), check_once(&dev, &path)?.0)
            }
        }
    };
    print!("{}", report.render());
    if tracing::enabled!(tracing::Level::INFO) {
        eprint!("{}", report.render_warnings());
    }
    match flag {
        Some(outcome) => say_needs_check(outcome, &metadata),
        None if report.exit_code() == 0 && needs_check(&metadata) => eprintln!(
            "thinpool: the metadata of the pool at {at} is flagged NEEDS_CHECK, so the pool \
             stays read-only; this check is clean: stop the daemon if one runs, then `thinpool \
             pool check --clear-needs-check-flag` clears the flag"
        ),
        None => {}
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

/// Say on stderr what `--clear-needs-check-flag` did to the flag of `metadata`.
pub fn say_needs_check(outcome: NeedsCheckFlag, metadata: &Path) {
    let at = metadata.display();
    match outcome {
        NeedsCheckFlag::Cleared => eprintln!("thinpool: NEEDS_CHECK cleared in {at}"),
        NeedsCheckFlag::NotSet => {
            eprintln!("thinpool: NEEDS_CHECK was not set in {at}: nothing written")
        }
        NeedsCheckFlag::Kept { set: true } => eprintln!(
            "thinpool: the check found errors: NEEDS_CHECK stays set in {at}, nothing written"
        ),
        NeedsCheckFlag::Kept { set: false } => {
            eprintln!("thinpool: the check found errors: nothing written to {at}")
        }
    }
}

/// Whether the superblock of `metadata` (readable and valid) has NEEDS_CHECK set.
pub fn needs_check(metadata: &Path) -> bool {
    FileDevice::open_read_only(metadata)
        .ok()
        .and_then(|d| thinpool_thin::metadata::read_superblock(&d).ok())
        .is_some_and(|sb| sb.flags & thinpool_thin::superblock::NEEDS_CHECK != 0)
}

fn open_rw(path: &Path) -> Result<Arc<dyn BlockDevice>> {
    Ok(Arc::new(FileDevice::open(path).with_context(|| {
        format!("opening the pool's metadata {} read-write", path.display())
    })?))
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
