//! `thinpool`: the one binary. Flags are parsed here and handed to library functions; no domain
//! logic lives in this crate (style guide section 1).

#![forbid(unsafe_code)]

mod check;
mod client;
mod docs;
mod image;
mod info;
mod meta;
mod mount;
mod nbd;
mod pool;
mod size;
mod snapshot;
mod table;
mod up;
mod vol;

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

/// thinpool: thin-provisioned volumes and snapshots on the Linux kernel's dm-thin format.
#[derive(Parser)]
#[command(name = "thinpool", version, about, propagate_version = true)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(
        short,
        long,
        action = clap::ArgAction::Count,
        global = true,
        help_heading = "Global options"
    )]
    verbose: u8,
    /// Folder holding the pool (pool/data, pool/metadata, volumes.json, lock). Default:
    /// /var/lib/thinpool when run as root, else $XDG_DATA_HOME/thinpool
    /// (~/.local/share/thinpool).
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        env = "THINPOOL_ROOT",
        help_heading = "Global options"
    )]
    root: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: create the pool on first use (sparse 100G data, 2G metadata, 64K
    /// blocks), serve every volume over NBD on ROOT/nbd.sock and the control API on
    /// ROOT/control.sock. Foreground; SIGTERM or Ctrl-C commits and exits.
    Up(Box<up::UpArgs>),
    /// Show the pool as `docker info` shows a devicemapper pool: Docker's fields (Pool Name,
    /// Pool Blocksize, Base Device Size, Backing Filesystem, Data/Metadata Space
    /// Used/Total/Available, Thin Pool Minimum Free Space, ...), then volumes, snapshots,
    /// transaction id, mode and daemon. Deferred removal and deletion are always false (and
    /// the deferred count 0): volumes are removed at once.
    Info {
        /// Print the same as a JSON object: snake_case keys, sizes in bytes.
        #[arg(long)]
        json: bool,
    },
    /// Create a pool, show its status, check its metadata, grow it.
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// Thin volumes and snapshots: create, snapshot, ls, resize, rm, import, export.
    #[command(subcommand)]
    Vol(vol::VolCommand),
    /// Mount a volume's filesystem on a folder: attach a loop device to its file (direct I/O)
    /// and mount it; --mkfs makes the filesystem first. Needs the daemon. The daemon remembers
    /// it: a restart (even after a crash) mounts it again.
    Mount(mount::MountArgs),
    /// Unmount a volume (by mount point or name) and detach its loop device.
    Umount {
        /// The mount point, or the volume's name.
        target: String,
    },
    /// The layer store's snapshots (containerd's image layers and containers, served on
    /// ROOT/containerd-snapshotter.sock): ls, info, tree, usage, rm. Needs the daemon.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Images without containerd: load (docker save / OCI archives), ls, rm, save, prune.
    /// Without a daemon, the command serves the pool itself while it runs.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Containers of images: create (any size), ls, rm, mount, umount, resize (online, with
    /// the filesystem), commit (a new image), export (a flattened tar).
    #[command(subcommand)]
    Container(image::ContainerCommand),
    /// Make a one-layer image of a tar of a filesystem (`container export`'s, `docker
    /// export`'s; plain, gzip or zstd; `-`: stdin). Its snapshot is sized to fit the content
    /// before a byte is unpacked.
    Import {
        /// The tar, or `-`.
        file: PathBuf,
        /// The image's name (`name:tag`).
        image: String,
    },
    /// Serve volumes over NBD (qemu, nbdcopy, fio, nbd-client).
    #[command(subcommand)]
    Nbd(nbd::NbdCommand),
    /// Metadata toolbox: check, dump, restore, repair, ls, delta, size (like
    /// thin-provisioning-tools), on a metadata file or block device.
    #[command(subcommand)]
    Meta(meta::MetaCommand),
    /// Print a shell completion script. E.g. `source <(thinpool completions bash)`, or save it
    /// as /usr/share/bash-completion/completions/thinpool (bash), as _thinpool in a folder of
    /// $fpath (zsh), or as ~/.config/fish/completions/thinpool.fish (fish).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff, `man -l -` reads it), or write one page per command into a
    /// folder with --dir (thinpool.1, thinpool-pool.1, thinpool-pool-create.1, ...).
    Man {
        /// Write every page into this folder (created if needed) instead of printing the top
        /// one.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    // The daemon logs what it does (connections, commits of note, stop) by default; one-shot
    // commands only warn.
    let serving = matches!(cli.command, Command::Up(_) | Command::Nbd(_));
    let level = match cli.verbose {
        0 if serving => "info",
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // rustls warns about every client that sends an IP address as its TLS server name
        // (qemu does): not worth a line per connection.
        // fuser warns of every ioctl it does not implement (mkfs and mount send some): noise
        // for a command that serves the pool only while it runs.
        .unwrap_or_else(|_| {
            let fuser = if serving { "" } else { ",fuser=error" };
            tracing_subscriber::EnvFilter::new(format!("{level},rustls=error{fuser}"))
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs piped to a file or journald stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let root = cli.root.unwrap_or_else(thinpool_engine::default_root);
    let code = match cli.command {
        Command::Info { json } => pool::with_daemon_or_pool(&root, pool::Access::Look, |target| {
            info::run(target, &root, json)
        }),
        Command::Completions { shell } => docs::completions(shell, &mut Cli::command()),
        Command::Man { dir } => docs::man(Cli::command(), dir.as_deref()),
        Command::Pool(cmd) => pool::run(&root, cmd),
        Command::Vol(cmd) => vol::run(&root, cmd),
        Command::Meta(cmd) => meta::run(cmd),
        Command::Nbd(cmd) => nbd::run(&root, cmd),
        Command::Mount(a) => mount::mount(&root, a),
        Command::Umount { target } => mount::umount(&root, &target),
        Command::Snapshot(cmd) => snapshot::run(&root, cmd),
        Command::Image(cmd) => image::run_image(&root, cmd),
        Command::Container(cmd) => image::run_container(&root, cmd),
        Command::Import { file, image } => image::run_import(&root, &file, &image),
        Command::Up(a) => up::run(&root, *a),
    };
    match code {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("thinpool: error: {}", error_chain(&e));
            std::process::exit(1);
        }
    }
}

/// The error and its causes, joined by ": " as `{:#}` does, but without a cause that the text
/// before it already ends with: a library error that prints its source in its own message
/// and also returns it as `source()` would otherwise say it twice ("…: No such file or
/// directory (os error 2): No such file or directory (os error 2)").
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.is_empty() && out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_already_said_is_not_repeated() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let said = format!("cannot listen on x.sock: {io}");
        let e = anyhow::Error::new(io)
            .context(said.clone())
            .context("starting");
        assert_eq!(super::error_chain(&e), format!("starting: {said}"));
        let e = anyhow::anyhow!("b").context("a");
        assert_eq!(super::error_chain(&e), "a: b");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    #[test]
    fn pool_and_vol_definitions_are_consistent() {
        use clap::CommandFactory;
        let cli = super::Cli::command();
        for name in ["pool", "vol"] {
            cli.find_subcommand(name)
                .unwrap_or_else(|| panic!("subcommand {name} exists"))
                .clone()
                .debug_assert();
        }
    }
}
