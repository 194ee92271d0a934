//! Prepare + Mounts per container, through containerd, for several snapshotters in one
//! interleaved run (a benchmark, not a test; `bench/layers-bench` drives it).
//!
//! ```text
//! prepare-bench --socket CONTAINERD.sock --namespace NS --parent KEY [--count 100]
//!               [--mount-dir DIR] [--keep | --remove-only] SNAPSHOTTER...
//! ```
//!
//! For container `i` and each snapshotter in turn: `Prepare(bench-i, parent)` (labelled a GC
//! root, as `ctr` does) and `Mounts(bench-i)` over containerd's snapshots service (namespace
//! `NS`), timed together; then, untimed, the mounts are mounted on `DIR` and unmounted again
//! when `--mount-dir` is given (a container that starts and stops: the filesystem's own
//! writes at mount). The containers stay until all are made, so the last ones are prepared
//! among `count - 1` others; then they are removed (`--keep`: left for a look at the space
//! they use; `--remove-only` removes them later, and measures nothing). Prints, per snapshotter, the median
//! milliseconds of each tenth of the run (flat or not in the number of snapshots), the
//! overall median, and the ratios against the first snapshotter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use thinpool_snapshotter::proto::containerd::services::snapshots::v1 as api;
use thinpool_snapshotter::proto::containerd::types::Mount;
use tonic::transport::{Channel, Endpoint, Uri};

type Client = api::snapshots_client::SnapshotsClient<Channel>;

struct Args {
    socket: PathBuf,
    namespace: String,
    parent: String,
    count: usize,
    mount_dir: Option<PathBuf>,
    keep: bool,
    remove_only: bool,
    snapshotters: Vec<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: prepare-bench --socket CONTAINERD.sock --namespace NS --parent KEY \
         [--count N] [--mount-dir DIR] [--keep | --remove-only] SNAPSHOTTER..."
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let (mut socket, mut namespace, mut parent) = (None, None, None);
    let (mut count, mut mount_dir, mut snapshotters) = (100, None, Vec::new());
    let (mut keep, mut remove_only) = (false, false);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(value())),
            "--namespace" => namespace = Some(value()),
            "--parent" => parent = Some(value()),
            "--count" => count = value().parse().unwrap_or_else(|_| usage()),
            "--mount-dir" => mount_dir = Some(PathBuf::from(value())),
            "--keep" => keep = true,
            "--remove-only" => remove_only = true,
            s if s.starts_with('-') => usage(),
            s => snapshotters.push(s.to_string()),
        }
    }
    let (Some(socket), Some(namespace), Some(parent)) = (socket, namespace, parent) else {
        usage()
    };
    if snapshotters.is_empty() || count == 0 || (keep && remove_only) {
        usage()
    }
    Args {
        socket,
        namespace,
        parent,
        count,
        mount_dir,
        keep,
        remove_only,
        snapshotters,
    }
}

async fn connect(path: &Path) -> Result<Client, tonic::transport::Error> {
    let path = path.to_owned();
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(Client::new(channel))
}

/// A request in namespace `ns` (containerd reads it from this gRPC header).
fn req<T>(ns: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "containerd-namespace",
        ns.parse().expect("a namespace is ASCII"),
    );
    r
}

/// `mount -t TYPE -o OPTIONS SOURCE DIR` for each mount, then `umount DIR`.
fn mount_and_unmount(mounts: &[Mount], dir: &Path) -> Result<(), String> {
    for m in mounts {
        let mut cmd = Command::new("mount");
        cmd.args(["-t", &m.r#type]);
        if !m.options.is_empty() {
            cmd.args(["-o", &m.options.join(",")]);
        }
        let out = cmd
            .arg(&m.source)
            .arg(dir)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "mount {m:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let out = Command::new("umount")
            .arg(dir)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "umount {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse_args();
    let mut client = connect(&a.socket).await?;
    let ns = a.namespace.as_str();
    let mut labels = BTreeMap::new();
    labels.insert("containerd.io/gc.root".to_string(), "bench".to_string());
    // ms of Prepare + Mounts, per snapshotter, in container order.
    let mut ms: Vec<Vec<f64>> = vec![Vec::new(); a.snapshotters.len()];
    if let Some(d) = &a.mount_dir {
        std::fs::create_dir_all(d)?;
    }
    let mut made: Vec<(String, String)> = Vec::new();
    if a.remove_only {
        for i in 0..a.count {
            for sn in &a.snapshotters {
                made.push((sn.clone(), format!("bench-{i}")));
            }
        }
        return remove(&mut client, ns, &made).await;
    }
    let mut failed = None;
    'run: for i in 0..a.count {
        for (s, sn) in a.snapshotters.iter().enumerate() {
            let key = format!("bench-{i}");
            let t = Instant::now();
            let prepared = client
                .prepare(req(
                    ns,
                    api::PrepareSnapshotRequest {
                        snapshotter: sn.clone(),
                        key: key.clone(),
                        parent: a.parent.clone(),
                        labels: labels.clone(),
                    },
                ))
                .await;
            if let Err(e) = prepared {
                failed = Some(format!("{sn}: prepare {key}: {e}"));
                break 'run;
            }
            made.push((sn.clone(), key.clone()));
            let mounts = client
                .mounts(req(
                    ns,
                    api::MountsRequest {
                        snapshotter: sn.clone(),
                        key: key.clone(),
                    },
                ))
                .await;
            let mounts = match mounts {
                Ok(m) => m.into_inner().mounts,
                Err(e) => {
                    failed = Some(format!("{sn}: mounts {key}: {e}"));
                    break 'run;
                }
            };
            ms[s].push(t.elapsed().as_secs_f64() * 1e3);
            if let Some(d) = &a.mount_dir
                && let Err(e) = mount_and_unmount(&mounts, d)
            {
                failed = Some(format!("{sn}: {key}: {e}"));
                break 'run;
            }
        }
    }
    if failed.is_none() {
        println!(
            "Prepare + Mounts through containerd, ms per container ({} containers from one \
             image, made one after another and kept until the end):",
            a.count
        );
        let tenth = a.count.div_ceil(10);
        for (s, sn) in a.snapshotters.iter().enumerate() {
            let parts: Vec<String> = ms[s]
                .chunks(tenth)
                .map(|c| format!("{:.1}", median(&mut c.to_vec())))
                .collect();
            println!(
                "  {sn:<12} median {:>7.2}   per tenth: {}",
                median(&mut ms[s].clone()),
                parts.join(" ")
            );
        }
        let first = median(&mut ms[0].clone());
        for (s, sn) in a.snapshotters.iter().enumerate().skip(1) {
            let m = median(&mut ms[s].clone());
            println!("  ratio {sn}/{}: {:.2}", a.snapshotters[0], m / first);
        }
    }
    if !a.keep || failed.is_some() {
        remove(&mut client, ns, &made).await?;
    }
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Remove the containers, last made first.
async fn remove(
    client: &mut Client,
    ns: &str,
    made: &[(String, String)],
) -> Result<(), Box<dyn std::error::Error>> {
    let mut failures = 0;
    for (sn, key) in made.iter().rev() {
        let removed = client
            .remove(req(
                ns,
                api::RemoveSnapshotRequest {
                    snapshotter: sn.clone(),
                    key: key.clone(),
                },
            ))
            .await;
        if let Err(e) = removed {
            eprintln!("prepare-bench: {sn}: remove {key}: {e}");
            failures += 1;
        }
    }
    match failures {
        0 => Ok(()),
        n => Err(format!("{n} removals failed").into()),
    }
}
