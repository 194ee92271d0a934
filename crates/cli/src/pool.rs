//! `thinpool pool …`: create a pool, show its status, grow it (`pool check` lives in `check`).
//! Each command is one call into `thinpool-engine` — through the daemon when one serves the
//! pool (`client`), else on the pool opened for the command; this module only turns flags into
//! a `PoolConfig` and prints the answer.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use std::io::IsTerminal as _;

use indicatif::{ProgressBar, ProgressStyle};
use thinpool_control::{DataMoved, PoolMode, PoolStatus};
use thinpool_engine::{Pool, PoolConfig, PoolOptions};

use crate::client::{self, Target};
use crate::size::{human, parse_size, percent};

/// Metadata blocks are always 4 KiB (dm-thin format).
const METADATA_BLOCK_SIZE: u64 = 4096;

/// How a new pool is made (shared by `pool create` and `up`).
#[derive(clap::Args, Default)]
pub struct CreateArgs {
    /// Size of the data file (default 100G). Ignored with --data, which keeps its size.
    /// Sizes are bytes, or a number with a 1024-based unit: K, M, G, T, P (optionally
    /// followed by iB or B: 10G = 10GiB = 10GB = 10 × 1024³ bytes).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub data_size: Option<u64>,
    /// Size of the metadata file (default 2G; 1024-based units as for --data-size).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub metadata_size: Option<u64>,
    /// Pool block size: the unit of provisioning and copy-on-write (default 64K; a
    /// multiple of 64K, at most 1G; 1024-based units as for --data-size).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// Use this existing file or block device for data (`<root>/pool/data` becomes a
    /// symlink to it).
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Use this existing file or block device for metadata (`<root>/pool/metadata`
    /// becomes a symlink to it).
    #[arg(long, value_name = "PATH")]
    pub metadata: Option<PathBuf>,
}

impl CreateArgs {
    /// The pool configuration: the engine's defaults (100 GiB, 2 GiB, 64 KiB) where a size
    /// is not given.
    pub fn config(self) -> PoolConfig {
        let d = PoolConfig::default();
        PoolConfig {
            data_size: self.data_size.unwrap_or(d.data_size),
            metadata_size: self.metadata_size.unwrap_or(d.metadata_size),
            block_size: self.block_size.unwrap_or(d.block_size),
            data_path: self.data,
            metadata_path: self.metadata,
        }
    }
}

#[derive(Subcommand)]
pub enum PoolCommand {
    /// Create a pool: a sparse data file and a sparse metadata file under the root (or symlinks
    /// to existing files or block devices given with --data / --metadata).
    Create(CreateArgs),
    /// Show the pool's usage, block size, devices and mode.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the pool's metadata: every structure and reference count, as `thinpool meta
    /// check` (like thin_check) does on a metadata file. Exit status 0 when clean, 1 when
    /// damaged.
    ///
    /// Without a daemon the pool's lock is taken for the check (the pool itself is not opened,
    /// so metadata too damaged to open is still reported on). With a daemon, the daemon
    /// commits and reserves a metadata snapshot (dm-thin's `reserve_metadata_snap`), whose
    /// trees are checked read-only while clients go on writing, then released (also on an
    /// error or Ctrl-C). Online, the space maps' reference counts are not checked (they go on
    /// changing; as `thin_check -m`): stop the daemon for a full check.
    ///
    /// A pool whose metadata is flagged NEEDS_CHECK (it failed in a way the abort could not
    /// undo) stays read-only until a clean check with --clear-needs-check-flag clears the flag.
    Check {
        /// After a clean check, clear the superblock's NEEDS_CHECK flag (only its flags word
        /// and checksum are written), like thin_check's option; errors leave it set. Only
        /// while no daemon has the pool open.
        #[arg(long, conflicts_with = "repair")]
        clear_needs_check_flag: bool,
        /// Check, and when the metadata is damaged rebuild it (`thinpool meta repair`, like
        /// thin_repair) into a new file that replaces it; the damaged metadata is kept beside
        /// it as `pool/metadata.damaged`. Only while no daemon has the pool open.
        #[arg(long)]
        repair: bool,
    },
    /// Grow the data and/or metadata files (online; never shrinks). Without sizes, pick up
    /// the current sizes of the underlying devices (after growing a block device or LV).
    Grow {
        /// New size of the data file (1024-based units: K, M, G, T, P; e.g. 200G).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        data_size: Option<u64>,
        /// New size of the metadata file (1024-based units: K, M, G, T, P; e.g. 4G).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        metadata_size: Option<u64>,
    },
    /// Move the pool's data onto another file or block device, online: volumes stay in use
    /// (NBD clients go on reading and writing) while the used blocks are copied and verified;
    /// then `<root>/pool/data` becomes a symlink to PATH. Interrupted at any point (error,
    /// crash, kill), the pool stays whole on one of the two devices.
    ///
    /// PATH: a block device at least as big as the data device (not mounted or in use), or a
    /// file (created sparse if missing; an existing one must hold no data), outside the
    /// pool's directory. A default data file inside the pool is kept as `pool/data.old`
    /// until you delete it.
    MoveData {
        /// The new data device or file.
        path: PathBuf,
    },
    /// Show the space policy's events (the daemon keeps the last 1024): low-water crossings
    /// of data and metadata usage, and autogrow's grows, limits and failures (see `thinpool
    /// up --autogrow-step`). Needs the daemon.
    Events {
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
        /// Keep printing new events as they come, until interrupted.
        #[arg(long)]
        follow: bool,
        /// Only events numbered above N.
        #[arg(long, value_name = "N", default_value_t = 0)]
        since: u64,
    },
}

pub fn run(root: &Path, cmd: PoolCommand) -> Result<i32> {
    let at = root.display();
    match cmd {
        PoolCommand::Check {
            clear_needs_check_flag,
            repair,
        } => crate::check::run(root, clear_needs_check_flag, repair),
        PoolCommand::Create(args) => {
            let cfg = args.config();
            if let Some(c) = client::daemon(root)? {
                anyhow::bail!(
                    "creating a pool at {at}: {at} already holds a pool, served by the thinpool \
                     daemon (pid {})",
                    c.daemon().pid
                );
            }
            let pool = Pool::create(root, &cfg, options())
                .with_context(|| format!("creating a pool at {at}"))?;
            finish(pool, root, |pool| {
                let s = Target::Local(pool)
                    .status()
                    .with_context(|| format!("reading the status of the pool at {at}"))?;
                Ok(format!(
                    "created pool at {at}: data {} ({}), metadata {} ({}), block size {}\n",
                    human(s.total_data_blocks * s.block_size),
                    s.data_path.display(),
                    human(s.total_metadata_blocks * METADATA_BLOCK_SIZE),
                    s.metadata_path.display(),
                    human(s.block_size),
                ))
            })
        }
        PoolCommand::Status { json } => with_daemon_or_pool(root, Access::Look, |pool| {
            let status = pool
                .status()
                .with_context(|| format!("reading the status of the pool at {at}"))?;
            Ok(if json {
                serde_json::to_string_pretty(&status)? + "\n"
            } else {
                render_status(root, &status)
            })
        }),
        PoolCommand::MoveData { path } => move_data(root, &path),
        PoolCommand::Events {
            json,
            follow,
            since,
        } => events(root, json, follow, since),
        PoolCommand::Grow {
            data_size,
            metadata_size,
        } => with_daemon_or_pool(root, Access::Change, |pool| {
            let before = pool
                .status()
                .with_context(|| format!("reading the status of the pool at {at}"))?;
            pool.grow(data_size, metadata_size)
                .with_context(|| format!("growing the pool at {at}"))?;
            let after = pool
                .status()
                .with_context(|| format!("reading the status of the pool at {at}"))?;
            Ok(format!(
                "pool at {at}: data {} -> {}, metadata {} -> {}\n",
                human(before.total_data_blocks * before.block_size),
                human(after.total_data_blocks * after.block_size),
                human(before.total_metadata_blocks * METADATA_BLOCK_SIZE),
                human(after.total_metadata_blocks * METADATA_BLOCK_SIZE),
            ))
        }),
    }
}

/// Run `f` through the daemon serving the pool at `root` if one answers, else on the pool
/// opened for this command (see [`with_pool`]); then print what `f` returned.
pub fn with_daemon_or_pool(
    root: &Path,
    access: Access,
    f: impl FnOnce(&mut Target<'_>) -> Result<String>,
) -> Result<i32> {
    if let Some(mut daemon) = client::daemon(root)? {
        tracing::debug!(
            "the pool at {} is served by the daemon (pid {}): going through it",
            root.display(),
            daemon.daemon().pid
        );
        let text = f(&mut Target::Daemon(&mut daemon))?;
        print!("{text}");
        return Ok(0);
    }
    with_pool(root, access, |pool| f(&mut Target::Local(pool)))
}

/// Open the pool at `root`, run `f` on it, close it, then print what `f` returned.
pub fn with_pool(
    root: &Path,
    access: Access,
    f: impl FnOnce(&Pool) -> Result<String>,
) -> Result<i32> {
    finish(open(root, access)?, root, f)
}

/// Run `f` on `pool` and close the pool whatever happened (the last commit and the lock's
/// release are part of every command), then print `f`'s text: nothing is reported as done
/// before it is durable.
fn finish(pool: Pool, root: &Path, f: impl FnOnce(&Pool) -> Result<String>) -> Result<i32> {
    let out = f(&pool);
    let closed = pool
        .close()
        .with_context(|| format!("closing the pool at {}", root.display()));
    match (out, closed) {
        (Ok(text), Ok(())) => {
            print!("{text}");
            Ok(0)
        }
        (Ok(_), Err(e)) => Err(e),
        (Err(e), closed) => {
            if let Err(c) = closed {
                tracing::warn!("{c:#}");
            }
            Err(e)
        }
    }
}

/// Open the pool at `root` for one command. The engine's errors already say what to do (no
/// pool there: create one; locked: which process file is held).
pub fn open(root: &Path, access: Access) -> Result<Pool> {
    let opts = PoolOptions {
        read_only: access == Access::Look,
        ..options()
    };
    Pool::open(root, opts).with_context(|| format!("opening the pool at {}", root.display()))
}

/// What a one-shot command does to the pool it opens itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Only looks (`status`, `info`, `vol ls`, `vol info`, `vol export`): the pool is opened
    /// read-only and its files are left byte for byte as they were.
    Look,
    /// May change the pool.
    Change,
}

/// Engine options for a one-shot command: no commit timer, since every command ends with a
/// commit in `close` and long copies flush as they go (`vol import`).
fn options() -> PoolOptions {
    PoolOptions {
        commit_interval: None,
        ..PoolOptions::default()
    }
}

/// `pool move-data`: through the daemon (a spinner: the move is one request), else on the
/// pool opened here (a progress bar over the bytes copied, then verified).
fn move_data(root: &Path, path: &Path) -> Result<i32> {
    let at = root.display();
    // The daemon may run elsewhere: give it an absolute path.
    let path =
        std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let context = || format!("moving the data of the pool at {at} to {}", path.display());
    if let Some(mut daemon) = client::daemon(root)? {
        let bar = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new_spinner();
            bar.set_message(format!(
                "moving the data to {} (through the daemon, pid {})",
                path.display(),
                daemon.daemon().pid
            ));
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        } else {
            ProgressBar::hidden()
        };
        let moved = daemon.move_data(&path).with_context(context);
        bar.finish_and_clear();
        print!("{}", render_moved(root, &moved?));
        return Ok(0);
    }
    let pool = open(root, Access::Change)?;
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ({eta})",
            )
            .expect("valid template"),
        );
        bar.set_message("copying and verifying");
        bar
    } else {
        ProgressBar::hidden()
    };
    finish(pool, root, |pool| {
        let report = pool.move_data(&path, &|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        });
        bar.finish_and_clear();
        let report: DataMoved = client::mirror(report.with_context(context)?)?;
        Ok(render_moved(root, &report))
    })
}

fn render_moved(root: &Path, m: &DataMoved) -> String {
    let mut out = format!(
        "moved the data of the pool at {} to {}: {} used ({} blocks) copied and verified\n",
        root.display(),
        m.data_path.display(),
        human(m.copied_blocks * m.block_size),
        m.copied_blocks,
    );
    if let Some(old) = &m.old_data_kept {
        out.push_str(&format!(
            "the old data file is kept as {}: delete it when you no longer need it\n",
            old.display()
        ));
    }
    out
}

fn mode_name(mode: PoolMode) -> &'static str {
    match mode {
        PoolMode::Write => "rw (read-write)",
        PoolMode::OutOfDataSpace => "out_of_data_space (writes needing new blocks are refused)",
        PoolMode::ReadOnly => "ro (read-only: metadata needs attention)",
        PoolMode::Fail => "fail (I/O error: the pool needs a check)",
    }
}

/// `pool status` for people, in the spirit of `docker info`'s devicemapper section.
fn render_status(root: &Path, s: &PoolStatus) -> String {
    let data_used = s.used_data_blocks * s.block_size;
    let data_total = s.total_data_blocks * s.block_size;
    let meta_used = s.used_metadata_blocks * METADATA_BLOCK_SIZE;
    let meta_total = s.total_metadata_blocks * METADATA_BLOCK_SIZE;
    let rows: Vec<(&str, String)> = vec![
        ("Pool", root.display().to_string()),
        ("Data file", with_target(&s.data_path)),
        ("Metadata file", with_target(&s.metadata_path)),
        ("Block size", human(s.block_size)),
        (
            "Data space used",
            format!(
                "{} of {} ({}%), {} available",
                human(data_used),
                human(data_total),
                percent(data_used, data_total),
                human(data_total.saturating_sub(data_used)),
            ),
        ),
        (
            "Metadata space used",
            format!(
                "{} of {} ({}%), {} available",
                human(meta_used),
                human(meta_total),
                percent(meta_used, meta_total),
                human(meta_total.saturating_sub(meta_used)),
            ),
        ),
        (
            "Volumes",
            // The engine counts thin volumes (`volumes`) and snapshots apart.
            format!(
                "{} ({} thin, {} snapshots)",
                s.volumes + s.snapshots,
                s.volumes,
                s.snapshots
            ),
        ),
        ("Mode", mode_name(s.mode).to_string()),
        ("Needs check", yes_no(s.needs_check).to_string()),
        ("Failure", s.failure.clone().unwrap_or_else(|| "-".into())),
        (
            "When out of space",
            if s.error_if_no_space {
                "error at once"
            } else {
                "queue writes, then error"
            }
            .to_string(),
        ),
        ("Discard passdown", yes_no(s.discard_passdown).to_string()),
        ("Transaction id", s.transaction_id.to_string()),
        (
            "Metadata snapshot",
            s.held_root
                .map_or_else(|| "none".to_string(), |b| format!("held at block {b}")),
        ),
        ("Kernel status", s.kernel_line()),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{:<width$} {v}\n", format!("{k}:")));
    }
    out
}

/// `path`, and where it leads when it is a symlink (`pool create --data /dev/vg/lv`).
fn with_target(path: &Path) -> String {
    match std::fs::read_link(path) {
        Ok(t) => format!("{} -> {}", path.display(), t.display()),
        Err(_) => path.display().to_string(),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// `pool events`: print the daemon's space policy events after `since`, and with `follow`
/// the new ones every half second until interrupted.
fn events(root: &Path, json: bool, follow: bool, mut since: u64) -> Result<i32> {
    use std::io::Write as _;
    let at = root.display();
    let Some(mut daemon) = client::daemon(root)? else {
        anyhow::bail!(
            "no daemon serves the pool at {at}: the space policy's events are the daemon's \
             (start it with `thinpool up`)"
        );
    };
    let mut out = std::io::stdout().lock();
    loop {
        let list = daemon
            .pool_events(since)
            .with_context(|| format!("reading the events of the pool at {at}"))?;
        for e in &list {
            if json {
                writeln!(out, "{}", serde_json::to_string(e)?)?;
            } else {
                writeln!(out, "{}", render_event(e))?;
            }
            since = since.max(e.seq);
        }
        out.flush()?;
        if !follow {
            return Ok(0);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// One event as a line: number, time, kind, space, usage, sizes, message.
fn render_event(e: &thinpool_control::PoolEvent) -> String {
    let kind = serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let space = serde_json::to_value(e.space)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let sizes = match (e.old_size, e.new_size) {
        (Some(a), Some(b)) => format!(" {} -> {}", human(a), human(b)),
        _ => String::new(),
    };
    format!(
        "#{} {} {kind} {space} {}/{} ({}%){sizes}: {}",
        e.seq,
        crate::vol::rfc3339(e.time),
        e.used,
        e.total,
        percent(e.used, e.total),
        e.message
    )
}
