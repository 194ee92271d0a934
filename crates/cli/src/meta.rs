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
                    std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            let w = BufWriter::with_capacity(1 << 20, sink);
            let opts = DumpOptions { metadata_snap };
            match format {
                Format::Xml => run_dump(dev, opts, &mut xml::XmlWriter::new(w)),
                Format::Json => run_dump(dev, opts, &mut json::JsonWriter::new(w)),
            }
            .with_context(|| format!("dumping {}", metadata.display()))?;
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
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| {
                    format!("restoring {} onto {}", input.display(), output.display())
                })?;
            bar.finish_and_clear();
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
                opts.unit = parse_output_unit(&u).map_err(|e| anyhow::anyhow!("{}", e.tool_message()))?;
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

/// A spinner with a count on a terminal; hidden otherwise.
fn progress(quiet: bool, what: &'static str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {pos} {msg} ({elapsed})")
            .expect("valid template"),
    );
    bar.set_message(what);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}
