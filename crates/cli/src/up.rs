//! `thinpool up`: the main job. Runs the daemon on the root, creating the pool on first use
//! with Docker's devicemapper defaults (sparse 100 GiB data, 2 GiB metadata, 64 KiB blocks),
//! serving NBD on `ROOT/nbd.sock`, every volume as a file in `ROOT/files` (FUSE) and the
//! control API on `ROOT/control.sock`. Settings come from flags, then from a TOML file
//! (`--config`, else `ROOT/thinpool.toml` if present), then the defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;
use thinpool_daemon::DaemonOptions;

use crate::nbd::ServeArgs;
use crate::pool::CreateArgs;
use crate::size::parse_size;

#[derive(clap::Args)]
pub struct UpArgs {
    /// TOML settings (keys as the long flags with '_': data_size = "100G", listen =
    /// "127.0.0.1:10809", ...). Default: ROOT/thinpool.toml when it exists.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// How the pool is made on first use (ignored once it exists).
    #[command(flatten)]
    create: CreateArgs,
    /// When the pool is full, fail writes at once with ENOSPC instead of queueing them for
    /// --no-space-timeout (the kernel's error_if_no_space).
    #[arg(long)]
    error_if_no_space: bool,
    /// How long a write waits for space when the pool is full (seconds; default 60).
    #[arg(long, value_name = "SECS")]
    no_space_timeout: Option<u64>,
    /// Memory for cached metadata blocks (default 4M, at least 256K; 1024-based units as for
    /// --data-size). Changed B-tree nodes are written back early past as much again, so
    /// metadata blocks take at most twice this. More speeds up random I/O over pools with
    /// many mappings (about 31M of nodes per million mappings).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    metadata_cache: Option<u64>,
    /// When the pool fills: usage (percent of the data or metadata blocks, 1-99; "80" or
    /// "80%") at which a low-water event is recorded (`thinpool pool events`, metrics) and
    /// autogrow grows the device (default 80).
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    autogrow_threshold: Option<u8>,
    /// Grow the data file by SIZE whenever data usage is at or over the threshold, online,
    /// never past --max-data-size nor past what the host file system holding it has free
    /// (a multiple of the block size; 1024-based units as for --data-size). Not for a block
    /// device: its events say to extend it and run `thinpool pool grow`.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    autogrow_step: Option<u64>,
    /// The largest size --autogrow-step grows the data file to (default: only the host file
    /// system's free space and dm-thin's 2^40 blocks limit it).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "autogrow_step")]
    max_data_size: Option<u64>,
    /// Grow the metadata file by SIZE whenever metadata usage is at or over the threshold
    /// (a multiple of 4K), as --autogrow-step does for data.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    metadata_autogrow_step: Option<u64>,
    /// The largest size --metadata-autogrow-step grows the metadata file to (default and
    /// at most dm-thin's 15.87G, 4 161 600 blocks of 4K).
    #[arg(
        long,
        value_name = "SIZE",
        value_parser = parse_size,
        requires = "metadata_autogrow_step"
    )]
    max_metadata_size: Option<u64>,
    /// Serve every volume as a file in DIR (FUSE; default ROOT/files). Given explicitly,
    /// `up` fails when FUSE is unavailable instead of going on with NBD only.
    #[arg(long, value_name = "DIR", conflicts_with = "no_fuse")]
    fuse_dir: Option<PathBuf>,
    /// Do not serve volumes as files (no FUSE mount; no layer store mounts either).
    #[arg(long)]
    no_fuse: bool,
    /// Size of the layer store's base device, made on first use: every image layer without a
    /// parent and every container starts as a snapshot of it (default 10G, Docker's).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    base_size: Option<u64>,
    /// Serve containerd's snapshots API (proxy snapshotter) on this unix socket (default
    /// ROOT/containerd-snapshotter.sock).
    #[arg(long, value_name = "PATH", conflicts_with = "no_snapshotter")]
    snapshotter_socket: Option<PathBuf>,
    /// Do not serve containerd's snapshots API.
    #[arg(long)]
    no_snapshotter: bool,
    #[command(flatten)]
    serve: ServeArgs,
}

/// The config file: every key optional.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_size: Option<Size>,
    metadata_size: Option<Size>,
    block_size: Option<Size>,
    data: Option<PathBuf>,
    metadata: Option<PathBuf>,
    socket: Option<PathBuf>,
    listen: Option<SocketAddr>,
    insecure_tcp: Option<bool>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_psk: Option<PathBuf>,
    /// `["IDENTITY=VOL,VOL", ...]`, as the flag's values.
    psk_exports: Option<Vec<String>>,
    metrics: Option<SocketAddr>,
    read_only: Option<bool>,
    snapshots_read_only: Option<bool>,
    error_if_no_space: Option<bool>,
    no_space_timeout: Option<u64>,
    metadata_cache: Option<Size>,
    autogrow_threshold: Option<Percent>,
    autogrow_step: Option<Size>,
    max_data_size: Option<Size>,
    metadata_autogrow_step: Option<Size>,
    max_metadata_size: Option<Size>,
    fuse_dir: Option<PathBuf>,
    fuse: Option<bool>,
    base_size: Option<Size>,
    snapshotter_socket: Option<PathBuf>,
    snapshotter: Option<bool>,
    max_connections: Option<u32>,
    handshake_timeout: Option<u64>,
}

/// A size in the config file: bytes, or a string with a unit ("100G").
#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(&self, key: &str, file: &Path) -> Result<u64> {
        match self {
            Size::Bytes(b) => Ok(*b),
            Size::Text(t) => {
                parse_size(t).map_err(|e| anyhow::anyhow!("{}: {key} = {t:?}: {e}", file.display()))
            }
        }
    }
}

/// A percentage in the config file: `80` or `"80%"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Percent {
    Number(u64),
    Text(String),
}

impl Percent {
    fn value(&self, key: &str, file: &Path) -> Result<u8> {
        let text = match self {
            Percent::Number(n) => n.to_string(),
            Percent::Text(t) => t.clone(),
        };
        parse_percent(&text)
            .map_err(|e| anyhow::anyhow!("{}: {key} = {text:?}: {e}", file.display()))
    }
}

/// `80` or `80%`: a whole percentage from 1 to 99.
fn parse_percent(s: &str) -> Result<u8, String> {
    let t = s.trim();
    let digits = t.strip_suffix('%').unwrap_or(t).trim();
    match digits.parse::<u8>() {
        Ok(p) if (1..=99).contains(&p) => Ok(p),
        _ => Err(format!(
            "{s:?} is not a percentage from 1 to 99 (e.g. 80 or 80%)"
        )),
    }
}

/// The space policy from flags, else config keys: low-water threshold and autogrow.
fn space_policy(a: &UpArgs, fc: &FileConfig, file: &Path) -> Result<thinpool_daemon::SpacePolicy> {
    let size = |flag: Option<u64>, key: &str, v: &Option<Size>| -> Result<Option<u64>> {
        match (flag, v) {
            (Some(f), _) => Ok(Some(f)),
            (None, Some(s)) => s.bytes(key, file).map(Some),
            (None, None) => Ok(None),
        }
    };
    let threshold = match (a.autogrow_threshold, &fc.autogrow_threshold) {
        (Some(t), _) => t,
        (None, Some(p)) => p.value("autogrow_threshold", file)?,
        (None, None) => thinpool_daemon::DEFAULT_THRESHOLD,
    };
    let grow = |step: Option<u64>,
                max: Option<u64>,
                what: &str|
     -> Result<Option<thinpool_daemon::Autogrow>> {
        match (step, max) {
            (Some(step), max) => Ok(Some(thinpool_daemon::Autogrow { step, max })),
            (None, Some(_)) => anyhow::bail!(
                "{}: max_{what}_size is set without {}autogrow_step: there is nothing to cap",
                file.display(),
                if what == "data" { "" } else { "metadata_" }
            ),
            (None, None) => Ok(None),
        }
    };
    let policy = thinpool_daemon::SpacePolicy {
        threshold,
        data: grow(
            size(a.autogrow_step, "autogrow_step", &fc.autogrow_step)?,
            size(a.max_data_size, "max_data_size", &fc.max_data_size)?,
            "data",
        )?,
        metadata: grow(
            size(
                a.metadata_autogrow_step,
                "metadata_autogrow_step",
                &fc.metadata_autogrow_step,
            )?,
            size(
                a.max_metadata_size,
                "max_metadata_size",
                &fc.max_metadata_size,
            )?,
            "metadata",
        )?,
    };
    // Refused here, before the pool is opened or created, with the daemon's message.
    policy.check()?;
    Ok(policy)
}

fn load(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

/// The base size `ROOT/thinpool.toml` sets, if it exists and sets one (for a daemon a
/// command starts for itself).
pub fn configured_base_size(root: &Path) -> Result<Option<u64>> {
    let file = root.join("thinpool.toml");
    if !file.exists() {
        return Ok(None);
    }
    load(&file)?
        .base_size
        .map(|s| s.bytes("base_size", &file))
        .transpose()
}

pub fn run(root: &Path, a: UpArgs) -> Result<i32> {
    let default_file = root.join("thinpool.toml");
    let file = match &a.config {
        Some(p) => Some(p.clone()),
        None => default_file.exists().then_some(default_file),
    };
    let fc = match &file {
        Some(p) => load(p)?,
        None => FileConfig::default(),
    };
    let file = file.unwrap_or_default();
    // Refused before the pool is opened or created.
    let space = space_policy(&a, &fc, &file)?;
    let size = |flag: Option<u64>, key: &str, v: &Option<Size>| -> Result<Option<u64>> {
        match (flag, v) {
            (Some(f), _) => Ok(Some(f)),
            (None, Some(s)) => s.bytes(key, &file).map(Some),
            (None, None) => Ok(None),
        }
    };
    let c = a.create;
    let create = CreateArgs {
        data_size: size(c.data_size, "data_size", &fc.data_size)?,
        metadata_size: size(c.metadata_size, "metadata_size", &fc.metadata_size)?,
        block_size: size(c.block_size, "block_size", &fc.block_size)?,
        data: c.data.or(fc.data),
        metadata: c.metadata.or(fc.metadata),
    }
    .config();
    let s = a.serve;
    let serve = ServeArgs {
        socket: s.socket.or(fc.socket),
        listen: s.listen.or(fc.listen),
        insecure_tcp: s.insecure_tcp || fc.insecure_tcp.unwrap_or(false),
        tls_cert: s.tls_cert.or(fc.tls_cert),
        tls_key: s.tls_key.or(fc.tls_key),
        tls_psk: s.tls_psk.or(fc.tls_psk),
        psk_exports: if s.psk_exports.is_empty() {
            fc.psk_exports
                .unwrap_or_default()
                .iter()
                .map(|e| {
                    crate::nbd::parse_psk_export(e)
                        .map_err(|m| anyhow::anyhow!("{}: psk_exports: {m}", file.display()))
                })
                .collect::<Result<_>>()?
        } else {
            s.psk_exports
        },
        read_only: s.read_only || fc.read_only.unwrap_or(false),
        snapshots_read_only: s.snapshots_read_only || fc.snapshots_read_only.unwrap_or(false),
        metrics: s.metrics.or(fc.metrics),
        max_connections: s.max_connections.or(fc.max_connections),
        handshake_timeout: s.handshake_timeout.or(fc.handshake_timeout),
    };
    let mut opts = DaemonOptions::default();
    opts.pool.error_if_no_space = a.error_if_no_space || fc.error_if_no_space.unwrap_or(false);
    if let Some(t) = a.no_space_timeout.or(fc.no_space_timeout) {
        opts.pool.no_space_timeout = std::time::Duration::from_secs(t);
    }
    if let Some(m) = size(a.metadata_cache, "metadata_cache", &fc.metadata_cache)? {
        opts.pool.metadata_cache = m;
    }
    // Refused here, before the pool is opened or created, with the engine's message.
    opts.pool.metadata_cache_blocks()?;
    opts.space = space;
    opts.create = Some(create);
    opts.metrics = serve.metrics;
    if !a.no_fuse && (a.fuse_dir.is_some() || fc.fuse != Some(false)) {
        let dir = a.fuse_dir.or(fc.fuse_dir);
        opts.fuse_required = dir.is_some() || fc.fuse == Some(true);
        let dir = dir.unwrap_or_else(|| root.join("files"));
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let mut f = thinpool_fuse::FuseConfig::new(dir);
        f.read_only = serve.read_only;
        f.snapshots_read_only = serve.snapshots_read_only;
        opts.fuse = Some(f);
    }
    opts.base_size = size(a.base_size, "base_size", &fc.base_size)?;
    if !a.no_snapshotter && (a.snapshotter_socket.is_some() || fc.snapshotter != Some(false)) {
        let path = a
            .snapshotter_socket
            .or(fc.snapshotter_socket)
            .unwrap_or_else(|| root.join(thinpool_daemon::SNAPSHOTTER_SOCKET));
        opts.snapshotter = Some(std::path::absolute(&path).unwrap_or(path));
    }
    opts.nbd = Some(serve.config(root));
    crate::nbd::serve(root, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_key_and_flag_parse() {
        let fc: FileConfig = toml::from_str("metrics = \"127.0.0.1:9464\"").unwrap();
        assert_eq!(fc.metrics, Some("127.0.0.1:9464".parse().unwrap()));

        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            up: UpArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(["up", "--metrics", "[::1]:9464"]).unwrap();
        assert_eq!(cli.up.serve.metrics, Some("[::1]:9464".parse().unwrap()));
    }

    #[test]
    fn access_keys_and_flags_parse() {
        let fc: FileConfig =
            toml::from_str("insecure_tcp = true\npsk_exports = [\"alice=a,b\", \"bob=c\"]")
                .unwrap();
        assert_eq!(fc.insecure_tcp, Some(true));
        assert_eq!(
            fc.psk_exports,
            Some(vec!["alice=a,b".to_string(), "bob=c".to_string()])
        );

        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            up: UpArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "up",
            "--insecure-tcp",
            "--psk-exports",
            "alice=a, b",
            "--psk-exports",
            "bob=c",
        ])
        .unwrap();
        assert!(cli.up.serve.insecure_tcp);
        let cfg = cli.up.serve.config(Path::new("/r"));
        assert!(cfg.insecure_tcp);
        assert_eq!(cfg.psk_exports["alice"], ["a", "b"]);
        assert_eq!(cfg.psk_exports["bob"], ["c"]);
        for bad in ["alice", "=a", "alice=", "alice=a,,b", "a:b=c"] {
            assert!(
                <Cli as clap::Parser>::try_parse_from(["up", "--psk-exports", bad]).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn metadata_cache_key_and_flag_parse() {
        let fc: FileConfig = toml::from_str("metadata_cache = \"64M\"").unwrap();
        let key = fc.metadata_cache.expect("key read");
        assert_eq!(
            key.bytes("metadata_cache", Path::new("f")).unwrap(),
            64 << 20
        );
        let fc: FileConfig = toml::from_str("metadata_cache = 1048576").unwrap();
        let key = fc.metadata_cache.expect("key read");
        assert_eq!(
            key.bytes("metadata_cache", Path::new("f")).unwrap(),
            1 << 20
        );

        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            up: UpArgs,
        }
        let cli =
            <Cli as clap::Parser>::try_parse_from(["up", "--metadata-cache", "256M"]).unwrap();
        assert_eq!(cli.up.metadata_cache, Some(256 << 20));
    }

    #[test]
    fn too_small_metadata_cache_is_refused_before_the_pool_is_made() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("thinpool.toml"),
            "metadata_cache = \"100K\"\n",
        )
        .unwrap();
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            up: UpArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(["up"]).unwrap();
        let err = run(dir.path(), cli.up).unwrap_err();
        assert!(format!("{err:#}").contains("at least 256 KiB"), "{err:#}");
        assert!(!dir.path().join("pool").exists(), "no pool made");
    }
}
