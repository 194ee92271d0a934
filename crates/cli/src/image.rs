//! `thinpool image …`, `thinpool container …` and `thinpool import`: docker's `load`, `save`,
//! `images`, `rmi`, `create`, `commit`, `export` and `import` on the layer store, without
//! containerd (`thinpool-images`).
//!
//! The work runs here, in the command; the snapshots it works on are the daemon's, reached
//! through its control API. Without a daemon the command starts one in this process for its
//! duration (the pool, its FUSE files and the layer store, no NBD) and goes through it the same
//! way, so the two cases are one code path.

use std::cell::RefCell;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use thinpool_control::Client;
use thinpool_daemon::{Daemon, DaemonOptions};
use thinpool_images::{
    Container, ImageStore, ImageSummary, Labels, SnapshotError, SnapshotInfo, Snapshots, rfc3339,
    short,
};

use crate::client;
use crate::size::{human, parse_size};
use crate::vol::{NewSize, parse_new_size};

/// `thinpool image …`.
#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Load images from a `docker save` tarball or an OCI image layout (a tar, gzip or zstd
    /// compressed or not, or a folder); `-` reads the tar from stdin. Every blob is checked
    /// against its digest; layers already in the store are shared.
    Load {
        /// The archive, or `-`.
        #[arg(default_value = "-")]
        file: PathBuf,
    },
    /// List the images: names, id, layers, size and the size shared with other images.
    Ls {
        /// Print a JSON array (sizes in bytes).
        #[arg(long)]
        json: bool,
    },
    /// Remove image names; an image left with none goes, with its layers no other image or
    /// container needs. An id removes every name of the image.
    Rm {
        /// Names (`name:tag`) or ids.
        #[arg(required = true)]
        images: Vec<String>,
        /// Remove the name even when containers use the image (the image stays, nameless,
        /// for them).
        #[arg(long, short)]
        force: bool,
    },
    /// Write images to a tarball `docker load`, `ctr images import`, `skopeo` and `thinpool
    /// image load` read (docker's manifest.json and an OCI layout in one).
    Save {
        /// Names (`name:tag`) or ids.
        #[arg(required = true)]
        images: Vec<String>,
        /// The tarball (default: stdout, when it is not a terminal).
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Remove images without a name that no container uses, and every layer and blob no
    /// image needs.
    Prune,
}

/// `thinpool container …`.
#[derive(clap::Subcommand)]
pub enum ContainerCommand {
    /// A new container: a writable snapshot of the image's top layer (instant); with --size
    /// bigger than the image's filesystem, grown with it.
    Create {
        /// The image (`name:tag` or id).
        image: String,
        /// The container's name.
        name: String,
        /// Its filesystem's size (`20G`); default: the image's (the base size).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
    },
    /// List the containers.
    Ls {
        /// Print a JSON array (sizes in bytes).
        #[arg(long)]
        json: bool,
    },
    /// Remove containers (refused while mounted, unless --force).
    Rm {
        /// Names.
        #[arg(required = true)]
        names: Vec<String>,
        /// Unmount first.
        #[arg(long, short)]
        force: bool,
    },
    /// Mount a container's filesystem (read-write) on DIR (default ROOT/containers/NAME).
    /// Needs the daemon.
    Mount {
        /// The container.
        name: String,
        /// An existing, empty folder.
        dir: Option<PathBuf>,
    },
    /// Unmount a container's filesystem.
    Umount {
        /// The container.
        name: String,
    },
    /// Grow a container and its filesystem (online when mounted): the seeds' `dmsetup
    /// table/load/resume` + `resize2fs` as one command.
    Resize {
        /// The container.
        name: String,
        /// The new size (`20G`), or `+DELTA`.
        #[arg(value_parser = parse_new_size, allow_hyphen_values = true)]
        size: NewSize,
    },
    /// Make a new image of a container: its image plus one layer, the container's changes
    /// (added, changed and removed files) as a tar with whiteouts.
    Commit {
        /// The container.
        name: String,
        /// The new image's name (`name:tag`).
        image: String,
    },
    /// Write a container's filesystem, flattened, as a tar (sparse files stay sparse).
    Export {
        /// The container.
        name: String,
        /// The tar (default: stdout, when it is not a terminal).
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

/// The snapshots of a daemon, through its control API.
struct Remote(Client);

impl Snapshots for Remote {
    fn list(&mut self) -> Result<Vec<SnapshotInfo>, SnapshotError> {
        Ok(self
            .0
            .snapshots()?
            .into_iter()
            .map(|s| SnapshotInfo {
                key: s.key,
                parent: s.parent,
                kind: s.kind,
                labels: s.labels,
                size: s.size,
                created: s.created,
            })
            .collect())
    }

    fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: Labels,
        view: bool,
    ) -> Result<PathBuf, SnapshotError> {
        let mounts = self.0.prepare_snapshot(key, parent, labels, view)?;
        first_source(mounts, key)
    }

    fn device(&mut self, key: &str) -> Result<PathBuf, SnapshotError> {
        let mounts = self.0.snapshot_mounts(key)?;
        first_source(mounts, key)
    }

    fn commit(&mut self, name: &str, key: &str, labels: Labels) -> Result<(), SnapshotError> {
        Ok(self.0.commit_snapshot(name, key, labels)?)
    }

    fn remove(&mut self, key: &str) -> Result<(), SnapshotError> {
        Ok(self.0.remove_snapshot(key)?)
    }

    fn resize(&mut self, key: &str, size: u64) -> Result<u64, SnapshotError> {
        Ok(self.0.resize_snapshot(key, size)?.size)
    }

    fn data_blocks(&mut self) -> Option<(u64, u64)> {
        let s = self.0.pool_status().ok()?;
        Some((s.used_data_blocks, s.total_data_blocks))
    }
}

fn first_source(
    mounts: Vec<thinpool_control::LayerMount>,
    key: &str,
) -> Result<PathBuf, SnapshotError> {
    match mounts.into_iter().next() {
        Some(m) => Ok(m.source),
        None => Err(format!("snapshot {key}: the daemon gave no mount").into()),
    }
}

/// The image store of the pool at `root`, over its daemon, and the daemon this command
/// started when none was running.
struct Session {
    store: Option<ImageStore<Remote>>,
    embedded: Option<Daemon>,
}

impl Session {
    /// Open the store; `exclusive` for commands that change it.
    fn open(root: &Path, exclusive: bool) -> Result<Session> {
        let (client, embedded) = match client::daemon(root)? {
            Some(c) => (c, None),
            None => {
                let d = embedded_daemon(root)?;
                let c = Client::connect(d.socket_path()).with_context(|| {
                    format!(
                        "connecting to the daemon started here for {}",
                        root.display()
                    )
                })?;
                (c, Some(d))
            }
        };
        let store = ImageStore::open(&root.join("images"), Remote(client), exclusive)
            .with_context(|| format!("opening the image store in {}", root.display()))?;
        Ok(Session {
            store: Some(store),
            embedded,
        })
    }

    fn store(&mut self) -> &mut ImageStore<Remote> {
        self.store.as_mut().expect("open until finished")
    }

    /// Let go of the store, then stop the daemon started here (if any).
    fn finish(mut self) -> Result<()> {
        self.store = None;
        if let Some(d) = self.embedded.take() {
            d.stop()
                .context("stopping the daemon started for this command")?;
        }
        Ok(())
    }
}

/// A daemon for one command: the pool, its files and the layer store; no NBD, no
/// containerd socket. The base size comes from `ROOT/thinpool.toml` when it sets one.
fn embedded_daemon(root: &Path) -> Result<Daemon> {
    if !root.join("pool").exists() {
        bail!(
            "no pool at {}: `thinpool up` makes one (or `thinpool pool create`)",
            root.display()
        );
    }
    let mut opts = DaemonOptions::default();
    opts.fuse = Some(thinpool_fuse::FuseConfig::new(root.join("files")));
    opts.fuse_required = true;
    opts.base_size = crate::up::configured_base_size(root)?;
    tracing::info!(root = %root.display(), "no daemon serves the pool: serving it in this command");
    Daemon::start(root, opts).with_context(|| {
        format!(
            "no daemon serves the pool at {}, and serving it in this command failed",
            root.display()
        )
    })
}

/// Progress bars on a terminal (stderr); nothing otherwise.
struct Bars {
    bar: RefCell<Option<ProgressBar>>,
    show: bool,
}

impl Bars {
    fn new() -> Bars {
        Bars {
            bar: RefCell::new(None),
            show: std::io::stderr().is_terminal(),
        }
    }
}

impl thinpool_images::Progress for Bars {
    fn begin(&self, what: &str, total: Option<u64>) {
        if !self.show {
            return;
        }
        let bar = match total {
            Some(t) => ProgressBar::new(t).with_style(
                ProgressStyle::with_template(
                    "{msg} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec}",
                )
                .expect("valid template"),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {msg} {bytes} {binary_bytes_per_sec}")
                    .expect("valid template"),
            ),
        };
        bar.set_message(what.to_string());
        if let Some(old) = self.bar.replace(Some(bar)) {
            old.finish_and_clear();
        }
    }

    fn advance(&self, n: u64) {
        if let Some(b) = &*self.bar.borrow() {
            b.inc(n);
        }
    }

    fn end(&self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// Where a tar goes: the file, or stdout when it is not a terminal.
fn output(path: Option<&Path>, what: &str) -> Result<Box<dyn std::io::Write>> {
    match path {
        Some(p) if p != Path::new("-") => {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(p)
                .with_context(|| format!("creating {}", p.display()))?;
            Ok(Box::new(std::io::BufWriter::with_capacity(1 << 20, f)))
        }
        _ => {
            if std::io::stdout().is_terminal() {
                bail!("{what} writes a tar: give -o FILE, or redirect stdout");
            }
            Ok(Box::new(std::io::BufWriter::with_capacity(
                1 << 20,
                std::io::stdout().lock(),
            )))
        }
    }
}

/// Run `thinpool image …`.
pub fn run_image(root: &Path, cmd: ImageCommand) -> Result<i32> {
    let exclusive = !matches!(cmd, ImageCommand::Ls { .. } | ImageCommand::Save { .. });
    let mut s = Session::open(root, exclusive)?;
    let bars = Bars::new();
    match cmd {
        ImageCommand::Load { file } => {
            let loaded = s
                .store()
                .load(&file, &bars)
                .with_context(|| format!("loading {}", file.display()))?;
            for (id, names) in &loaded.images {
                match names.is_empty() {
                    true => println!("Loaded image ID: {id}"),
                    false => println!("Loaded image: {}", names.join(", ")),
                }
            }
            eprintln!(
                "{} layer(s) unpacked, {} shared, {} read",
                loaded.layers_applied,
                loaded.layers_shared,
                human(loaded.bytes)
            );
        }
        ImageCommand::Ls { json } => {
            let list = s.store().images()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", render_images(&list));
            }
        }
        ImageCommand::Rm { images, force } => {
            for i in images {
                let removed = s
                    .store()
                    .remove_image(&i, force)
                    .with_context(|| format!("removing image {i}"))?;
                println!("Untagged: {i}");
                for id in removed {
                    println!("Deleted: {id}");
                }
            }
        }
        ImageCommand::Save { images, output: o } => {
            let mut out = output(o.as_deref(), "image save")?;
            s.store()
                .save(&images, &mut out, &bars)
                .with_context(|| format!("saving {}", images.join(", ")))?;
            out.flush().context("writing the tarball")?;
        }
        ImageCommand::Prune => {
            let p = s.store().prune()?;
            for id in &p.images {
                println!("Deleted: {id}");
            }
            println!(
                "{} image(s), {} layer(s), {} blob(s) removed; {} of blobs freed",
                p.images.len(),
                p.layers,
                p.blobs,
                human(p.blob_bytes)
            );
        }
    }
    s.finish()?;
    Ok(0)
}

/// Run `thinpool container …`.
pub fn run_container(root: &Path, cmd: ContainerCommand) -> Result<i32> {
    if matches!(cmd, ContainerCommand::Mount { .. }) && client::daemon(root)?.is_none() {
        bail!(
            "container mount needs the daemon (a mount stands on the volume files it serves), and none serves the pool at {}: start `thinpool up`",
            root.display()
        );
    }
    let exclusive = matches!(cmd, ContainerCommand::Commit { .. });
    let mut s = Session::open(root, exclusive)?;
    let bars = Bars::new();
    match cmd {
        ContainerCommand::Create { image, name, size } => {
            let c = s
                .store()
                .create_container(&image, &name, size)
                .with_context(|| format!("creating container {name} of {image}"))?;
            println!("{} ({}, image {})", c.name, human(c.size), short(&c.image));
        }
        ContainerCommand::Ls { json } => {
            let list = s.store().containers()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let mut rows = Vec::new();
                for c in &list {
                    let mounted = s.store().container_mounts(&c.name).unwrap_or_default();
                    rows.push((c.clone(), mounted));
                }
                print!("{}", render_containers(&rows));
            }
        }
        ContainerCommand::Rm { names, force } => {
            for n in names {
                s.store()
                    .remove_container(&n, force)
                    .with_context(|| format!("removing container {n}"))?;
                println!("{n}");
            }
        }
        ContainerCommand::Mount { name, dir } => {
            let dir = match dir {
                Some(d) => d,
                None => {
                    use std::os::unix::fs::DirBuilderExt;
                    let d = root.join("containers").join(&name);
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(&d)
                        .with_context(|| format!("creating {}", d.display()))?;
                    d
                }
            };
            let dir = std::path::absolute(&dir).unwrap_or(dir);
            s.store()
                .mount_container(&name, &dir)
                .with_context(|| format!("mounting container {name}"))?;
            println!("{}", dir.display());
        }
        ContainerCommand::Umount { name } => {
            for d in s
                .store()
                .umount_container(&name)
                .with_context(|| format!("unmounting container {name}"))?
            {
                println!("unmounted {}", d.display());
            }
        }
        ContainerCommand::Resize { name, size } => {
            let new = match size {
                NewSize::To(n) => n,
                NewSize::GrowBy(d) => s.store().container(&name)?.size + d,
            };
            let got = s
                .store()
                .resize_container(&name, new)
                .with_context(|| format!("resizing container {name}"))?;
            println!(
                "container {name}: {} (filesystem grown with it)",
                human(got)
            );
        }
        ContainerCommand::Commit { name, image } => {
            let img = s
                .store()
                .commit_container(&name, &image, &bars)
                .with_context(|| format!("committing container {name} as {image}"))?;
            println!("{}", img.id);
        }
        ContainerCommand::Export { name, output: o } => {
            let mut out = output(o.as_deref(), "container export")?;
            let st = s
                .store()
                .export_container(&name, &mut out, &bars)
                .with_context(|| format!("exporting container {name}"))?;
            out.flush().context("writing the tar")?;
            eprintln!(
                "{} entries, {} files ({} sparse), {} of file data",
                st.entries,
                st.files,
                st.sparse_files,
                human(st.bytes)
            );
        }
    }
    s.finish()?;
    Ok(0)
}

/// Run `thinpool import FILE IMAGE`.
pub fn run_import(root: &Path, file: &Path, image: &str) -> Result<i32> {
    let mut s = Session::open(root, true)?;
    let img = s
        .store()
        .import(file, image, &Bars::new())
        .with_context(|| format!("importing {} as {image}", file.display()))?;
    println!("{}", img.id);
    s.finish()?;
    Ok(0)
}

fn render_images(list: &[ImageSummary]) -> String {
    let mut rows = vec![
        [
            "IMAGE",
            "ID",
            "LAYERS",
            "SIZE",
            "SHARED",
            "CONTAINERS",
            "CREATED",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for i in list {
        let names = if i.image.names.is_empty() {
            vec!["<none>".to_string()]
        } else {
            i.image.names.clone()
        };
        for n in names {
            rows.push(vec![
                n,
                short(&i.image.id).to_string(),
                i.image.diff_ids.len().to_string(),
                human(i.image.size()),
                human(i.shared_size),
                i.containers.to_string(),
                rfc3339(i.image.created),
            ]);
        }
    }
    crate::table::render(&rows, &[2, 3, 4, 5])
}

fn render_containers(list: &[(Container, Vec<PathBuf>)]) -> String {
    let mut rows = vec![
        ["NAME", "IMAGE", "SIZE", "CREATED", "MOUNTED"]
            .map(String::from)
            .to_vec(),
    ];
    for (c, mounted) in list {
        rows.push(vec![
            c.name.clone(),
            if c.image_ref.is_empty() {
                short(&c.image).to_string()
            } else {
                c.image_ref.clone()
            },
            human(c.size),
            rfc3339(c.created),
            mounted
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(","),
        ]);
    }
    crate::table::render(&rows, &[2])
}
