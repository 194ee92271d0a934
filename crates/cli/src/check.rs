//! `thinpool pool check`: `thinpool meta check` on the pool's own metadata, safely while the
//! pool may be in use.
//!
//! - No daemon: take the pool's lock (`<root>/lock`, the one the engine takes) so that no other
//!   process opens the pool meanwhile, and check the metadata device read-only. The pool is not
//!   opened: opening reconciles and may write, and refuses metadata too damaged to open, which
//!   is exactly what a check must still report on.
//! - A daemon holds the pool: ask it to commit and reserve a metadata snapshot (`pool_check`
//!   request, step `reserve`: the kernel's `reserve_metadata_snap`, format spec section 10),
//!   then check the held snapshot's trees read-only here while clients go on writing, then ask
//!   it to release the snapshot (step `release`). The held trees cannot change under the
//!   check: their roots' reference counts were raised, so every later change shadows their
//!   blocks, and none of their blocks is freed before the release. What is checked is what
//!   `thin_check -m` checks: the held details and mapping trees (structure, order, bounds,
//!   mapped counts), not the space maps, which go on changing (a full check needs the daemon
//!   stopped). Only the live superblock (block 0, read to find `held_root`) is written while
//!   the check runs; a torn read of it is told by its checksum, and the check is run again.
//!
//!   The snapshot is released whatever the check's outcome (an error, Ctrl-C, SIGTERM or
//!   SIGHUP included). A check killed outright (SIGKILL) cannot release it; the daemon does,
//!   when the control connection that reserved it closes (the reservation is a lease on that
//!   connection, and the daemon's log says so). A daemon killed while a check holds one leaves
//!   it held, which is harmless: it only pins metadata blocks, `thin_check` and `thin_dump
//!   --metadata-snap` accept the pool, and the engine keeps it across restarts as the kernel
//!   does; the next daemon releases it at the next check's reserve.
//!
//!   The check reads the metadata file itself, not the daemon's cache: damage on disk in
//!   blocks the snapshot reaches is found and reported (with the block and the tree), and the
//!   snapshot is still released, its roots kept by the engine from the reserve.
//!
//!   A daemon that answers the reserve without a held root (an older one) gets the former
//!   check: the committed metadata while writes go on, a commit that raced with it told by
//!   the superblock changing, and damage found during one checked again once.
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
//!
//! `--repair`: only offline, under the lock. A clean check writes nothing. Damaged metadata
//! (a regular file) is rebuilt by `meta repair` (thin_repair) into `pool/metadata.repaired`
//! of the same size, which is checked and synced; the damaged file gets a second name,
//! `pool/metadata.damaged` (a hard link, kept for the user to delete), and the repaired one is
//! renamed over `pool/metadata`, atomically: a crash at any step leaves `pool/metadata`
//! either damaged as before or repaired. Metadata on a block device (a symlink) is not
//! replaced: the message says how to repair it with `meta repair`.

use std::fs::File;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use thinpool_io::{BlockDevice, FileDevice};
use thinpool_thin::check::{
    CheckOptions, CheckReport, NeedsCheckFlag, check, check_and_clear_needs_check,
};

use thinpool_control::Client;

use crate::client;

/// Test hook: when set to a path, the online check writes the held root there once the
/// snapshot is reserved, then waits (at most 120 s) until the file is removed before checking,
/// so that a test can look at the pool while the snapshot is held.
const HOLD_FILE_ENV: &str = "THINPOOL_TEST_CHECK_HOLD_FILE";

/// Bytes of the superblock compared before and after a check to tell a racing commit.
const SUPERBLOCK_LEN: usize = 4096;

/// `thinpool pool check [--clear-needs-check-flag] [--repair]`: returns the exit status (0
/// clean or repaired, 1 damaged).
pub fn run(root: &Path, clear_needs_check: bool, repair: bool) -> Result<i32> {
    let at = root.display();
    let mut flag = None;
    let mut repaired = None;
    let (metadata, report) = match client::daemon(root)? {
        Some(daemon) if clear_needs_check || repair => bail!(
            "{} the pool at {at}: the daemon (pid {}) has the pool open, and {} only while no \
             one does; stop the daemon (Ctrl-C, SIGTERM or `systemctl stop thinpool`) and run \
             `thinpool pool check {}` again",
            if repair {
                "repairing"
            } else {
                "clearing NEEDS_CHECK on"
            },
            daemon.daemon().pid,
            if repair {
                "the metadata can be rebuilt"
            } else {
                "the flag can be cleared"
            },
            if repair {
                "--repair"
            } else {
                "--clear-needs-check-flag"
            },
        ),
        Some(mut daemon) => online(root, &mut daemon)?,
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
                let report = check_once(&dev, &path)?.0;
                if repair && report.exit_code() != 0 {
                    print!("{}", report.render());
                    repaired = Some(repair_metadata(root, &path)?);
                }
                (path.clone(), report)
            }
        }
    };
    if let Some(after) = repaired {
        print!("{}", after.render());
        let code = after.exit_code();
        if code == 0 {
            eprintln!(
                "thinpool: the metadata of the pool at {at} was repaired: {} replaced it, and the \
                 damaged metadata is kept as {} (delete it when the pool is found good)",
                metadata.display(),
                metadata.with_file_name("metadata.damaged").display()
            );
        }
        return Ok(code);
    }
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
        None if repair => {
            eprintln!("thinpool: the metadata of the pool at {at} is clean: nothing to repair")
        }
        None => {}
    }
    let code = report.exit_code();
    if code != 0 {
        let fatal = report.has_fatal();
        eprintln!(
            "thinpool: the metadata of the pool at {at} ({}) is damaged: {} error(s){}: stop \
             writing to the pool, keep a copy of the metadata, and rebuild it: stop the daemon if \
             one runs, then `thinpool pool check --repair` (it runs `thinpool meta repair`; see \
             `thinpool meta check {}` for details)",
            metadata.display(),
            report.errors.len(),
            if fatal {
                ""
            } else {
                ", only leaked blocks (harmless to data)"
            },
            metadata.display(),
        );
    }
    Ok(code)
}

/// The check with a daemon: reserve a metadata snapshot, check its trees, release it.
fn online(root: &Path, daemon: &mut Client) -> Result<(PathBuf, CheckReport)> {
    let at = root.display();
    tracing::debug!(
        "the pool at {at} is served by the daemon (pid {}): checking a metadata snapshot",
        daemon.daemon().pid
    );
    let snap = daemon.reserve_metadata_snap().with_context(|| {
        format!("reserving a metadata snapshot of the pool at {at} to check it")
    })?;
    let path = snap.metadata_path;
    let Some(held) = snap.held_root else {
        // A daemon that does not know the step: it committed, check what it committed.
        return committed(root, daemon, path);
    };
    tracing::debug!(held_root = held, "metadata snapshot reserved");
    let release_on_signal = ReleaseOnSignal::start(root, held)?;
    if let Some(file) = std::env::var_os(HOLD_FILE_ENV) {
        pause_while_held(Path::new(&file), held);
    }
    let checked = open_ro(&path).and_then(|dev| check_held(&dev, &path, held));
    release_on_signal.stop();
    let released = daemon.release_metadata_snap(held).with_context(|| {
        format!("releasing the metadata snapshot (block {held}) of the pool at {at}")
    });
    let report = checked?;
    released?;
    Ok((path, report))
}

/// The former online check, for a daemon that reserves no snapshot: the committed metadata
/// while writes go on, checked again once when damage was seen while a commit raced.
fn committed(root: &Path, daemon: &mut Client, path: PathBuf) -> Result<(PathBuf, CheckReport)> {
    let mut commit = || {
        daemon
            .pool_check()
            .with_context(|| format!("committing the pool at {} to check it", root.display()))
    };
    let dev = open_ro(&path)?;
    let (report, raced) = check_once(&dev, &path)?;
    if report.exit_code() == 0 || !raced {
        return Ok((path, report));
    }
    tracing::info!(
        "the daemon committed while {} was being checked: checking again",
        path.display()
    );
    commit()?;
    let (again, raced_again) = check_once(&dev, &path)?;
    if again.exit_code() != 0 && raced_again {
        eprintln!(
            "thinpool: warning: the daemon committed during both checks of {}: the errors \
             below may come from those commits; check again when the pool is idle",
            path.display()
        );
    }
    Ok((path, again))
}

/// Check the trees of the metadata snapshot held at `held` (`thin_check -m`). Block 0 is the
/// only block written meanwhile; a check that found it torn (a read racing with a commit) or
/// naming another held root is run again, up to three times.
fn check_held(dev: &Arc<dyn BlockDevice>, path: &Path, held: u64) -> Result<CheckReport> {
    let opts = CheckOptions {
        metadata_snap: true,
        ..Default::default()
    };
    let mut tries = 0;
    loop {
        tries += 1;
        let bar = progress_bar();
        let report = check(dev.clone(), &opts, &mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })
        .with_context(|| format!("checking the metadata snapshot in {}", path.display()))?;
        bar.finish_and_clear();
        let sb = thinpool_thin::metadata::read_superblock(&**dev).ok();
        let names_held = sb.as_ref().is_some_and(|sb| sb.held_root == held);
        let torn = !report.superblock_ok || report.errors.iter().any(|f| f.block == Some(0));
        if !(torn && tries < 3) {
            if !names_held {
                bail!(
                    "checking the metadata snapshot in {}: the superblock no longer names the \
                     snapshot reserved at block {held} (was it released by someone else?)",
                    path.display()
                );
            }
            return Ok(report);
        }
        tracing::info!(
            "block 0 of {} was read while being written: checking again",
            path.display()
        );
    }
}

/// The [`HOLD_FILE_ENV`] hook: say `held` in `file`, wait for the file to go.
fn pause_while_held(file: &Path, held: u64) {
    if let Err(e) = std::fs::write(file, format!("{held}\n")) {
        eprintln!("thinpool: {HOLD_FILE_ENV}: writing {}: {e}", file.display());
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while file.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Releases the held snapshot and exits when SIGINT, SIGTERM or SIGHUP arrives during the
/// check (the check itself cannot be interrupted).
struct ReleaseOnSignal {
    handle: signal_hook::iterator::Handle,
    thread: std::thread::JoinHandle<()>,
}

impl ReleaseOnSignal {
    fn start(root: &Path, held: u64) -> Result<Self> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
            .context("installing signal handlers for the check")?;
        let handle = signals.handle();
        let root = root.to_path_buf();
        let thread = std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let released = client::daemon(&root).and_then(|d| {
                    d.context("the daemon is gone")?
                        .release_metadata_snap(held)
                        .map_err(anyhow::Error::from)
                });
                match released {
                    Ok(()) => eprintln!(
                        "thinpool: interrupted: the metadata snapshot (block {held}) was released"
                    ),
                    Err(e) => eprintln!(
                        "thinpool: interrupted: could not release the metadata snapshot (block \
                         {held}): {e:#}"
                    ),
                }
                std::process::exit(128 + sig);
            }
        });
        Ok(ReleaseOnSignal { handle, thread })
    }

    fn stop(self) {
        self.handle.close();
        let _ = self.thread.join();
    }
}

/// Rebuild the damaged metadata at `path` (a regular file) in place of it; returns the check
/// of the rebuilt metadata. The pool's lock is held by the caller.
fn repair_metadata(root: &Path, path: &Path) -> Result<CheckReport> {
    use thinpool_thin::repair::{SalvageOptions, repair};
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("reading the metadata of {}", path.display()))?;
    if !meta.file_type().is_file() {
        bail!(
            "repairing the pool at {}: its metadata {} is not a regular file (a block device?), \
             so it is not replaced here: repair it onto another device with `thinpool meta repair \
             -i {} -o NEW_DEVICE --data {}`, then point {} at it",
            root.display(),
            path.display(),
            path.display(),
            root.join("pool").join("data").display(),
            path.display()
        );
    }
    let out = path.with_file_name("metadata.repaired");
    let kept = path.with_file_name("metadata.damaged");
    if kept.exists() {
        bail!(
            "repairing the pool at {}: {} is in the way (the damaged metadata of an earlier \
             repair?): move it away first",
            root.display(),
            kept.display()
        );
    }
    let f = File::create(&out).with_context(|| format!("creating {}", out.display()))?;
    f.set_len(meta.len())
        .with_context(|| format!("sizing {}", out.display()))?;
    drop(f);
    let data = root.join("pool").join("data");
    let data_device_size = FileDevice::open_read_only(&data)
        .and_then(|d| d.size())
        .ok();
    let opts = SalvageOptions {
        data_device_size,
        ..Default::default()
    };
    let salvage = repair(open_ro(path)?, open_rw(&out)?, &opts)
        .with_context(|| format!("repairing {} into {}", path.display(), out.display()))?;
    for (dev, why) in &salvage.skipped {
        eprintln!("thinpool: device {dev} could not be recovered: {why}");
    }
    for note in &salvage.notes {
        eprintln!("thinpool: {note}");
    }
    let dev = open_rw(&out)?;
    dev.sync()
        .with_context(|| format!("syncing {}", out.display()))?;
    let (after, _) = check_once(&dev, &out)?;
    if after.exit_code() != 0 {
        eprintln!(
            "thinpool: the repaired metadata {} still has errors: {} is left as it was",
            out.display(),
            path.display()
        );
        return Ok(after);
    }
    std::fs::hard_link(path, &kept)
        .with_context(|| format!("keeping the damaged metadata as {}", kept.display()))?;
    std::fs::rename(&out, path)
        .with_context(|| format!("renaming {} to {}", out.display(), path.display()))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing the directory {}", dir.display()))?;
    }
    Ok(after)
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
