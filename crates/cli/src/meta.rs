//! `thinpool meta …`: the metadata toolbox, one library call per command.

use std::io::{BufReader, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use thinpool_io::{BlockDevice, FileDevice};
use thinpool_thin::dump::{DumpOptions, dump};
use thinpool_thin::ir::MetadataVisitor;
use thinpool_thin::restore::Restorer;
use thinpool_thin::{json, xml};

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Xml,
    Json,
}

#[derive(Subcommand)]
pub enum MetaCommand {
    /// Print the pool's devices and mappings (XML identical to thin_dump, or JSON).
    Dump {
        /// Dump the held metadata snapshot instead of the live metadata.
        #[arg(short = 'm', long)]
        metadata_snap: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "xml")]
        format: Format,
        /// Write to FILE instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Metadata file or block device.
        metadata: PathBuf,
    },
    /// Write metadata from a thin_dump XML file (like thin_restore).
    Restore {
        /// XML input.
        #[arg(short, long)]
        input: PathBuf,
        /// Metadata file or block device to overwrite (must exist, with its final size).
        #[arg(short, long)]
        output: PathBuf,
        /// No progress output.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Verify every structure and reference count (like thin_check; exit 1 on errors).
    Check {
        /// Print nothing; only the exit status tells.
        #[arg(short, long)]
        quiet: bool,
        /// Only check the superblock.
        #[arg(long)]
        super_block_only: bool,
        /// Do not check the bottom-level mapping trees.
        #[arg(long)]
        skip_mappings: bool,
        /// Check the held metadata snapshot's trees.
        #[arg(short = 'm', long)]
        metadata_snap: bool,
        /// Exit 0 when only non-fatal errors (leaked blocks) are found.
        #[arg(long)]
        ignore_non_fatal_errors: bool,
        /// After a clean check, clear the superblock's NEEDS_CHECK flag (only its flags word
        /// and checksum are written; like thin_check's option). A check that finds errors
        /// leaves it set. Needs a full check, and no one else writing the metadata (for a
        /// pool's own metadata, `thinpool pool check --clear-needs-check-flag` takes its lock).
        #[arg(long, conflicts_with_all = ["super_block_only", "skip_mappings", "metadata_snap"])]
        clear_needs_check_flag: bool,
        /// Metadata file or block device.
        metadata: PathBuf,
    },
    /// List devices with their mapped, exclusive and shared blocks (like thin_ls).
    Ls {
        /// Comma-separated fields: DEV, MAPPED_BLOCKS, EXCLUSIVE_BLOCKS, SHARED_BLOCKS,
        /// MAPPED_SECTORS, ..., MAPPED, EXCLUSIVE, SHARED, TRANSACTION, CREATE_TIME, SNAP_TIME.
        #[arg(short = 'o', long)]
        format: Option<String>,
        /// List the held metadata snapshot.
        #[arg(short = 'm', long)]
        metadata_snap: bool,
        /// No header line.
        #[arg(long)]
        no_headers: bool,
        /// Metadata file or block device.
        metadata: PathBuf,
    },
    /// Show which ranges differ between two devices (like thin_delta).
    Delta {
        /// Left device id.
        #[arg(long, visible_alias = "snap1")]
        thin1: u64,
        /// Right device id.
        #[arg(long, visible_alias = "snap2")]
        thin2: u64,
        /// Compare in the held metadata snapshot.
        #[arg(short = 'm', long)]
        metadata_snap: bool,
        /// List every range with its data blocks.
        #[arg(long = "verbose", id = "delta_verbose")]
        verbose_ranges: bool,
        /// Metadata file or block device.
        metadata: PathBuf,
    },
    /// Rebuild a valid pool from what is still readable (like thin_repair).
    Repair {
        /// Damaged metadata (only read).
        #[arg(short, long)]
        input: PathBuf,
        /// Where to write the repaired metadata (must exist, with its final size).
        #[arg(short, long)]
        output: PathBuf,
        /// Transaction id, if the superblock is unreadable.
        #[arg(long)]
        transaction_id: Option<u64>,
        /// Data block size in sectors, if the superblock is unreadable.
        #[arg(long)]
        data_block_size: Option<u32>,
        /// Number of data blocks, if the superblock is unreadable (taken as given: mappings
        /// past it are dropped).
        #[arg(long)]
        nr_data_blocks: Option<u64>,
        /// The pool's data file or device (for a thinpool pool: ROOT/pool/data; only read).
        /// Its size checks the superblock's number of data blocks and replaces it when that
        /// is absurd; without it, an absurd number is derived from the mappings alone.
        #[arg(long, value_name = "PATH")]
        data: Option<PathBuf>,
    },
    /// Estimate the metadata size a pool needs (like thin_metadata_size).
    Size {
        /// Data block size (sectors without a unit; units b s k K m M g G t T p P e E z Z y Y,
        /// lowercase powers of 1024, uppercase of 1000).
        #[arg(short, long, allow_hyphen_values = true)]
        block_size: Option<String>,
        /// Size of the pool's data device (same units).
        #[arg(short = 's', long, allow_hyphen_values = true)]
        pool_size: Option<String>,
        /// Most thin devices and snapshots there will be.
        #[arg(short, long, allow_hyphen_values = true)]
        max_thins: Option<String>,
        /// Unit of the result (default: sectors).
        #[arg(short, long)]
        unit: Option<String>,
        /// Print the number only (`-n`), or with the unit's letter (`-nshort`) or name (`-nlong`).
        #[arg(short, long, num_args = 0..=1, default_missing_value = "")]
        numeric_only: Option<String>,
    },
}

pub fn run(cmd: MetaCommand) -> Result<i32> {
    match cmd {
        MetaCommand::Dump {
            metadata_snap,
            format,
            output,
            metadata,
        } => {
            let dev = open_ro(&metadata)?;
            let sink: Box<dyn Write> = match &output {
                Some(p) => Box::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("creating {}", p.display()))?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            let w = BufWriter::with_capacity(1 << 20, sink);
            let opts = DumpOptions { metadata_snap };
            // A spinner only when the dump goes to a file (stdout may be the terminal).
            let bar = progress(output.is_none(), "dumped mappings");
            match format {
                Format::Xml => {
                    run_dump(dev, opts, &mut Counting::new(xml::XmlWriter::new(w), &bar))
                }
                Format::Json => run_dump(
                    dev,
                    opts,
                    &mut Counting::new(json::JsonWriter::new(w), &bar),
                ),
            }
            .with_context(|| format!("dumping {}", metadata.display()))?;
            bar.finish_and_clear();
            Ok(0)
        }
        MetaCommand::Restore {
            input,
            output,
            quiet,
        } => {
            let file = std::fs::File::open(&input)
                .with_context(|| format!("opening {}", input.display()))?;
            let dev = open_rw(&output)?;
            let bar = progress(quiet, "restored mappings");
            let b2 = bar.clone();
            let mut restorer =
                Restorer::new(dev).with_progress(Box::new(move |n| b2.set_position(n)));
            xml::read_xml(BufReader::with_capacity(1 << 20, file), &mut restorer)
                .map_err(anyhow::Error::new)
                .with_context(|| {
                    format!("restoring {} onto {}", input.display(), output.display())
                })?;
            bar.finish_and_clear();
            Ok(0)
        }
        MetaCommand::Check {
            quiet,
            super_block_only,
            skip_mappings,
            metadata_snap,
            ignore_non_fatal_errors,
            clear_needs_check_flag,
            metadata,
        } => {
            use thinpool_thin::check::{CheckOptions, check, check_and_clear_needs_check};
            let opts = CheckOptions {
                super_block_only,
                skip_mappings,
                metadata_snap,
                ignore_non_fatal: ignore_non_fatal_errors,
            };
            let bar = progress_bar(quiet, "checked blocks");
            let mut progress = |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            };
            let (report, flag) = if clear_needs_check_flag {
                let (report, flag) =
                    check_and_clear_needs_check(open_rw(&metadata)?, &opts, &mut progress)
                        .with_context(|| format!("checking {}", metadata.display()))?;
                (report, Some(flag))
            } else {
                let report = check(open_ro(&metadata)?, &opts, &mut progress)
                    .with_context(|| format!("checking {}", metadata.display()))?;
                (report, None)
            };
            bar.finish_and_clear();
            if !quiet {
                print!("{}", report.render());
                if tracing::enabled!(tracing::Level::INFO) {
                    eprint!("{}", report.render_warnings());
                }
                match flag {
                    Some(flag) => crate::check::say_needs_check(flag, &metadata),
                    None if report.exit_code() == 0
                        && !(metadata_snap || super_block_only || skip_mappings)
                        && crate::check::needs_check(&metadata) =>
                    {
                        eprintln!(
                            "thinpool: {} is flagged NEEDS_CHECK (a pool on it stays read-only); \
                             --clear-needs-check-flag clears the flag after a clean check",
                            metadata.display()
                        )
                    }
                    None => {}
                }
            }
            Ok(report.exit_code())
        }
        MetaCommand::Ls {
            format,
            metadata_snap,
            no_headers,
            metadata,
        } => {
            use thinpool_thin::ls::{Field, LsOptions, ls_with};
            let fields = match format {
                Some(f) => Field::parse_list(&f).map_err(|e| anyhow::anyhow!("{e}"))?,
                None => Field::DEFAULT.to_vec(),
            };
            let out = ls_with(
                open_ro(&metadata)?,
                &LsOptions {
                    fields,
                    metadata_snap,
                    no_headers,
                },
            )
            .with_context(|| format!("listing {}", metadata.display()))?;
            print!("{out}");
            Ok(0)
        }
        MetaCommand::Delta {
            thin1,
            thin2,
            metadata_snap,
            verbose_ranges: verbose,
            metadata,
        } => {
            use thinpool_thin::delta::{DeltaOptions, delta_with};
            let out = delta_with(
                open_ro(&metadata)?,
                &DeltaOptions {
                    thin1,
                    thin2,
                    metadata_snap: metadata_snap.then_some(None),
                    verbose,
                },
            )
            .with_context(|| format!("comparing devices in {}", metadata.display()))?;
            print!("{out}");
            Ok(0)
        }
        MetaCommand::Repair {
            input,
            output,
            transaction_id,
            data_block_size,
            nr_data_blocks,
            data,
        } => {
            use thinpool_thin::repair::{SalvageOptions, repair};
            let data_device_size = data.as_deref().map(data_size).transpose()?;
            let opts = SalvageOptions {
                transaction_id,
                data_block_size,
                nr_data_blocks,
                data_device_size,
            };
            let bar = progress(false, "repairing");
            let report = repair(open_ro(&input)?, open_rw(&output)?, &opts).with_context(|| {
                format!("repairing {} into {}", input.display(), output.display())
            })?;
            bar.finish_and_clear();
            for (dev, why) in &report.skipped {
                eprintln!("thinpool: device {dev} could not be recovered: {why}");
            }
            if let Some(why) = &report.nr_data_blocks_derived {
                match &data {
                    Some(p) => eprintln!("thinpool: {why} [data device: {}]", p.display()),
                    None => eprintln!("thinpool: {why}"),
                }
            }
            for note in &report.notes {
                tracing::info!("{note}");
            }
            Ok(0)
        }
        MetaCommand::Size {
            block_size,
            pool_size,
            max_thins,
            unit,
            numeric_only,
        } => {
            use thinpool_thin::size::{
                NumericOnly, SizeArg, SizeOptions, format_size_report, parse_output_unit,
            };
            let arg = |a: Option<String>| -> Result<Option<SizeArg>> {
                a.map(|s| SizeArg::parse(&s).map_err(|e| anyhow::anyhow!("{}", e.tool_message())))
                    .transpose()
            };
            let mut opts = SizeOptions {
                block_size: arg(block_size)?,
                pool_size: arg(pool_size)?,
                max_thins: arg(max_thins)?,
                ..SizeOptions::default()
            };
            if let Some(u) = unit {
                opts.unit =
                    parse_output_unit(&u).map_err(|e| anyhow::anyhow!("{}", e.tool_message()))?;
            }
            if let Some(n) = numeric_only {
                opts.numeric_only = NumericOnly::parse((!n.is_empty()).then_some(n.as_str()))
                    .map_err(|e| anyhow::anyhow!("{}", e.tool_message()))?;
            }
            let report =
                format_size_report(&opts).map_err(|e| anyhow::anyhow!("{}", e.tool_message()))?;
            print!("{report}");
            Ok(0)
        }
    }
}

/// Passes events through to `inner`, advancing a progress bar by the mappings seen.
struct Counting<'a, V> {
    inner: V,
    bar: &'a ProgressBar,
    mappings: u64,
}

impl<'a, V> Counting<'a, V> {
    fn new(inner: V, bar: &'a ProgressBar) -> Self {
        Counting {
            inner,
            bar,
            mappings: 0,
        }
    }
}

impl<V: MetadataVisitor> MetadataVisitor for Counting<'_, V> {
    type Error = V::Error;
    fn superblock_b(&mut self, sb: &thinpool_thin::ir::Superblock) -> Result<(), V::Error> {
        self.inner.superblock_b(sb)
    }
    fn superblock_e(&mut self) -> Result<(), V::Error> {
        self.inner.superblock_e()
    }
    fn device_b(&mut self, dev: &thinpool_thin::ir::Device) -> Result<(), V::Error> {
        self.inner.device_b(dev)
    }
    fn device_e(&mut self) -> Result<(), V::Error> {
        self.bar.set_position(self.mappings);
        self.inner.device_e()
    }
    fn map(&mut self, m: &thinpool_thin::ir::Map) -> Result<(), V::Error> {
        self.mappings += m.len;
        self.inner.map(m)
    }
    fn eof(&mut self) -> Result<(), V::Error> {
        self.inner.eof()
    }
}

fn run_dump<V>(dev: Arc<dyn BlockDevice>, opts: DumpOptions, v: &mut V) -> Result<()>
where
    V: MetadataVisitor<Error = std::io::Error>,
{
    dump(dev, opts, v)?;
    Ok(())
}

fn open_ro(path: &Path) -> Result<Arc<dyn BlockDevice>> {
    Ok(Arc::new(
        FileDevice::open_read_only(path).with_context(|| format!("opening {}", path.display()))?,
    ))
}

/// Size in bytes of a pool's data file or block device (`meta repair --data`).
fn data_size(path: &Path) -> Result<u64> {
    if path.is_dir() {
        bail!(
            "--data {}: a directory, not a data file or device (a thinpool pool's data file is \
             ROOT/pool/data)",
            path.display()
        );
    }
    open_ro(path)?
        .size()
        .with_context(|| format!("--data {}: reading its size", path.display()))
}

fn open_rw(path: &Path) -> Result<Arc<dyn BlockDevice>> {
    if !path.exists() {
        bail!(
            "{} does not exist: create it with its final size first (e.g. `truncate -s 1G {}`)",
            path.display(),
            path.display()
        );
    }
    Ok(Arc::new(
        FileDevice::open(path).with_context(|| format!("opening {}", path.display()))?,
    ))
}

/// A bar with a known total on a terminal; hidden otherwise.
fn progress_bar(quiet: bool, what: &'static str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} ({eta})").expect("valid template"),
    );
    bar.set_message(what);
    bar
}

/// A spinner with a count on a terminal; hidden otherwise.
fn progress(quiet: bool, what: &'static str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {pos} {msg} ({elapsed})").expect("valid template"),
    );
    bar.set_message(what);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}
