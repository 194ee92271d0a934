//! `thinpool image load` and `thinpool import` on bad input (issue 14), against a real daemon
//! (`thinpool up` on a fresh root, a small image loaded first so that the base device exists),
//! its layer store and the kernel's ext4 on loop devices:
//!
//! - truncated archives: a `docker save` tarball cut in the middle of a layer and within its
//!   `manifest.json`, from a file and from stdin — refused when the archive is indexed, before
//!   any snapshot; the whole archive loads afterwards;
//! - wrong digests: an OCI config and a `docker save` config whose bytes do not match their
//!   digests (refused at open); a byte flipped in the content of layer 2 of a `docker save`
//!   tarball (diff_id) and of an OCI archive (blob digest), the tar still valid so the layer
//!   applies and only its digest tells;
//! - path traversal inside a layer (tars crafted header by header): `../NAME`, `/NAME`,
//!   `a/../../NAME`, a symlink to a folder outside (absolute, and `../../..`) then an entry
//!   through it, a hardlink to `../../etc/passwd` and one through a symlink to `/etc`.
//!   Decided: the layer, hence the load, is refused (as the applier documents; no entry is
//!   rewritten under the root); and when it is layer 2, layer 1 goes again;
//! - a pool too small for an image (`--error-if-no-space`, 192 MiB of random data into a
//!   160 MiB pool): the load fails at the applier's final `syncfs` (the pool's ENOSPC reaches
//!   ext4 through the loop device as EIO) and says the pool is out of data space, everything is
//!   rolled back and the pool takes a smaller image afterwards;
//! - `thinpool import` of a tar cut in a file's data and of a gzip'ed tar cut short.
//!
//! After every refusal the oracles are: the exit status and the message (naming what is wrong);
//! `image ls --json` as before; `snapshot ls --json` with the keys it had before (no
//! `thinpool.layer/` or `thinpool.work/` left); `pool status --json`'s `used_data_blocks` as
//! before; `ROOT/images/blobs/sha256/` and `ROOT/images/mnt/` holding what they held; for
//! traversal, a unique marker name found nowhere outside the snapshot (the test's scratch
//! folder with the pool root, `/tmp`, `/`, `/etc`), the canary folder empty and `/etc/passwd`
//! unchanged; the daemon still serving; `thin_check` on the pool once the daemon is stopped.
//!
//! Needs root, `/dev/fuse`, loop devices, mkfs.ext4 and thin_check (skipped loudly without, a
//! failure under `CI=true`).

use std::collections::BTreeSet;
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use thinpool_tests::daemon::{LAYER_POOL as UP, LoopCleanup, Up, fuse_usable};
use thinpool_tests::images::{self, Compression, Image, Layer, sha256_digest, sha256_hex};
use thinpool_tests::{Failures, require_tools, run, run_with_input, text};

fn usable() -> bool {
    fuse_usable() && require_tools(&["losetup", "mount", "mkfs.ext4", "thin_check"])
}

/// A daemon on a fresh root, the loop devices it may leave detached at the end.
fn start(args: &[&str]) -> Option<(Up, LoopCleanup)> {
    if !usable() {
        return None;
    }
    let up = Up::start(args);
    let loops = LoopCleanup(up.files());
    // The base device is made on first use (mkfs: a few data blocks): load a small image first,
    // so that what a refused load leaves can be compared block for block.
    let warm = up.dir.path().join("warm.tar");
    Image::new("example.test/thinpool/warm:latest")
        .layer(Layer::new().file("warm", b"warm\n", 0o644))
        .write_docker_archive(&warm);
    up.ok(&["image", "load", warm.to_str().unwrap()]);
    Some((up, loops))
}

/// What a failed load or import must leave as it found it.
#[derive(Debug, PartialEq, Eq)]
struct State {
    images: Value,
    snapshots: BTreeSet<String>,
    used_data_blocks: u64,
    blobs: BTreeSet<String>,
    mnt: BTreeSet<String>,
}

fn names_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn state(up: &Up) -> State {
    let snapshots = up.json(&["snapshot", "ls", "--json"]);
    State {
        images: up.json(&["image", "ls", "--json"]),
        snapshots: snapshots
            .as_array()
            .expect("snapshot ls --json is an array")
            .iter()
            .map(|s| s["key"].as_str().unwrap_or_default().to_string())
            .collect(),
        used_data_blocks: up.json(&["pool", "status", "--json"])["used_data_blocks"]
            .as_u64()
            .expect("pool status --json has used_data_blocks"),
        blobs: names_in(&up.root.join("images/blobs/sha256")),
        mnt: names_in(&up.root.join("images/mnt")),
    }
}

/// Record how `after` differs from `before` (the state before a refused command).
fn check_unchanged(f: &mut Failures, what: &str, before: &State, after: &State) {
    f.check(
        &format!(
            "{what}: image ls --json changed: {} → {}",
            before.images, after.images
        ),
        before.images == after.images,
    );
    let new: Vec<_> = after.snapshots.difference(&before.snapshots).collect();
    let gone: Vec<_> = before.snapshots.difference(&after.snapshots).collect();
    f.check(
        &format!("{what}: snapshots left behind {new:?}, gone {gone:?}"),
        new.is_empty() && gone.is_empty(),
    );
    f.check(
        &format!(
            "{what}: used_data_blocks {} before, {} after",
            before.used_data_blocks, after.used_data_blocks
        ),
        before.used_data_blocks == after.used_data_blocks,
    );
    let new: Vec<_> = after.blobs.difference(&before.blobs).collect();
    let gone: Vec<_> = before.blobs.difference(&after.blobs).collect();
    f.check(
        &format!("{what}: files left in ROOT/images/blobs/sha256: {new:?}, gone {gone:?}"),
        before.blobs == after.blobs,
    );
    let new: Vec<_> = after.mnt.difference(&before.mnt).collect();
    f.check(
        &format!("{what}: folders left in ROOT/images/mnt: {new:?}"),
        before.mnt == after.mnt,
    );
}

/// `image load FILE` must fail with a message holding every one of `expect` (any case);
/// then the store and the pool are as before.
fn refused(f: &mut Failures, up: &Up, what: &str, file: &Path, expect: &[&str]) -> String {
    let before = state(up);
    let out = run(&mut up.cmd(&["image", "load", file.to_str().unwrap()]));
    let err = text(&out.stderr);
    check_refusal(f, what, out.status.success(), &err, expect);
    check_unchanged(f, what, &before, &state(up));
    err
}

fn check_refusal(f: &mut Failures, what: &str, success: bool, err: &str, expect: &[&str]) {
    if success {
        f.add(format!("{what}: accepted, should be refused"));
        return;
    }
    let lower = err.to_lowercase();
    for e in expect {
        f.check(
            &format!("{what}: the error does not mention {e:?}: {err}"),
            lower.contains(&e.to_lowercase()),
        );
    }
    f.check(
        &format!("{what}: panicked: {err}"),
        !lower.contains("panicked"),
    );
}

/// Stop the daemon, `thin_check` its pool.
fn stop_and_check(mut up: Up) {
    up.stop();
    up.thin_check();
}

/// `n` random (incompressible) bytes.
fn random(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    rng.fill_bytes(&mut v);
    v
}

/// A three-layer image, each layer with a 256 KiB random file and small ones.
fn three_layers(name: &str, seed: u64) -> Image {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut img = Image::new(name).cmd(&["/bin/sh"]);
    for i in 0..3 {
        let l = Layer::new()
            .dir(&format!("l{i}"), 0o755)
            .file(&format!("l{i}/random"), &random(&mut rng, 256 << 10), 0o644)
            .file(
                &format!("l{i}/small"),
                format!("layer {i}\n").as_bytes(),
                0o644,
            )
            .symlink(&format!("l{i}/link"), "small");
        img = img.layer(l);
    }
    img
}

/// Offset and size of the data of the entry `name` in the tar `bytes`.
fn entry_data(bytes: &[u8], name: &str) -> (usize, usize) {
    let mut a = tar::Archive::new(bytes);
    for e in a.entries().expect("a tar") {
        let e = e.expect("a tar entry");
        if e.path_bytes().as_ref() == name.as_bytes() {
            return (e.raw_file_position() as usize, e.size() as usize);
        }
    }
    panic!("no entry {name} in the tar");
}

/// The docker-save layer paths of `img` (`<id>/layer.tar`), bottom first.
fn docker_layer_paths(img: &Image) -> Vec<String> {
    img.chain_ids()
        .iter()
        .map(|c| format!("{}/layer.tar", c.trim_start_matches("sha256:")))
        .collect()
}

/// Truncated `docker save` tarballs: cut in a layer and in the manifest, from a file and from
/// stdin. Nothing is kept.
#[test]
fn truncated_archives_are_refused_and_nothing_is_kept() {
    let Some((up, _loops)) = start(&UP) else {
        return;
    };
    let mut f = Failures::new();
    let dir = up.dir.path();
    let img = three_layers("example.test/thinpool/cut:latest", 1);
    let full = dir.join("full.tar");
    img.write_docker_archive(&full);
    let bytes = std::fs::read(&full).unwrap();

    let (off, size) = entry_data(&bytes, &docker_layer_paths(&img)[1]);
    let in_layer = dir.join("cut-in-layer.tar");
    std::fs::write(&in_layer, &bytes[..off + size / 2]).unwrap();
    refused(
        &mut f,
        &up,
        "cut in the middle of layer 2",
        &in_layer,
        &["truncated"],
    );

    let (off, size) = entry_data(&bytes, "manifest.json");
    let in_manifest = dir.join("cut-in-manifest.tar");
    std::fs::write(&in_manifest, &bytes[..off + size / 2]).unwrap();
    refused(
        &mut f,
        &up,
        "cut within manifest.json",
        &in_manifest,
        &["truncated", "manifest.json"],
    );

    // The same from stdin (spooled first).
    let before = state(&up);
    let out = run_with_input(
        &mut up.cmd(&["image", "load", "-"]),
        &bytes[..off + size / 2],
    );
    check_refusal(
        &mut f,
        "cut within manifest.json, on stdin",
        out.status.success(),
        &text(&out.stderr),
        &["truncated"],
    );
    check_unchanged(&mut f, "cut on stdin", &before, &state(&up));

    // The whole archive still loads afterwards.
    up.ok(&["image", "load", full.to_str().unwrap()]);
    let ls = up.json(&["image", "ls", "--json"]);
    f.check(
        &format!("the whole archive loads after the refusals: {ls}"),
        ls.as_array().is_some_and(|a| {
            a.len() == 2
                && a.iter()
                    .any(|i| i["names"][0] == "example.test/thinpool/cut:latest")
        }),
    );
    f.finish();
    stop_and_check(up);
}

/// Flip the byte at `at` in `bytes`.
fn flipped(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at] ^= 0x20;
    b
}

/// Configs whose bytes are not what their digests say (an OCI config blob, a `docker save`
/// config named by its digest): refused before any layer is applied.
#[test]
fn wrong_config_digests_are_refused_and_nothing_is_kept() {
    let Some((up, _loops)) = start(&UP) else {
        return;
    };
    let mut f = Failures::new();
    let dir = up.dir.path();
    let img = three_layers("example.test/thinpool/config:latest", 2);
    // `"os":"linux"` made `"os":"Linux"`: still JSON, another digest.
    let linux = |bytes: &[u8], entry: &str| {
        let (off, size) = entry_data(bytes, entry);
        off + bytes[off..off + size]
            .windows(7)
            .position(|w| w == b"\"linux\"")
            .expect("the config names its os")
            + 1
    };

    let oci = dir.join("oci.tar");
    img.write_oci_archive(&oci);
    let bytes = std::fs::read(&oci).unwrap();
    let (config, _, _) = img.oci_blobs();
    let hex = config.digest.trim_start_matches("sha256:");
    let bad = dir.join("oci-config.tar");
    let at = linux(&bytes, &format!("blobs/sha256/{hex}"));
    std::fs::write(&bad, flipped(&bytes, at)).unwrap();
    refused(
        &mut f,
        &up,
        "OCI archive, config bytes changed",
        &bad,
        &["mismatch", &config.digest],
    );

    let docker = dir.join("docker.tar");
    img.write_docker_archive(&docker);
    let bytes = std::fs::read(&docker).unwrap();
    let bad = dir.join("docker-config.tar");
    let at = linux(&bytes, &format!("{hex}.json"));
    std::fs::write(&bad, flipped(&bytes, at)).unwrap();
    refused(
        &mut f,
        &up,
        "docker save, config bytes changed",
        &bad,
        &["mismatch", hex],
    );
    f.finish();
    stop_and_check(up);
}

/// A byte flipped in the content of a layer's file (the tar stays valid, so the layer applies
/// and only its digest tells, once read to the end), after a first layer was applied: refused,
/// both layers gone again. Each archive holds other layers, so that one's leftovers cannot hide
/// the next one's.
#[test]
fn wrong_layer_digests_are_refused_and_nothing_is_kept() {
    let Some((up, _loops)) = start(&UP) else {
        return;
    };
    let mut f = Failures::new();
    let dir = up.dir.path();

    // docker save: only the config's diff_id tells.
    let img = three_layers("example.test/thinpool/docker-digest:latest", 3)
        .compression(Compression::None);
    let docker = dir.join("docker.tar");
    img.write_docker_archive(&docker);
    let bytes = std::fs::read(&docker).unwrap();
    let (off, size) = entry_data(&bytes, &docker_layer_paths(&img)[1]);
    let bad = dir.join("docker-flipped.tar");
    std::fs::write(&bad, flipped(&bytes, off + size / 2)).unwrap();
    refused(
        &mut f,
        &up,
        "docker save, a byte of layer 2 flipped",
        &bad,
        &["layer 2 (1 = the bottom)", "mismatch", &img.diff_ids()[1]],
    );

    // OCI archive, uncompressed layers: the blob digest (= the diff_id) tells.
    let img =
        three_layers("example.test/thinpool/oci-digest:latest", 5).compression(Compression::None);
    let oci = dir.join("oci.tar");
    img.write_oci_archive(&oci);
    let bytes = std::fs::read(&oci).unwrap();
    let (_, layers, _) = img.oci_blobs();
    let blob = format!(
        "blobs/sha256/{}",
        layers[1].digest.trim_start_matches("sha256:")
    );
    let (off, size) = entry_data(&bytes, &blob);
    let bad = dir.join("oci-flipped.tar");
    std::fs::write(&bad, flipped(&bytes, off + size / 2)).unwrap();
    refused(
        &mut f,
        &up,
        "OCI archive, a byte of layer 2 flipped",
        &bad,
        &["layer 2 (1 = the bottom)", "mismatch", &layers[1].digest],
    );
    f.finish();
    stop_and_check(up);
}

/// A tar header for `name` (bytes as given: no normalisation, `..` and `/` kept) of `kind`,
/// with `link` as its link name and `size` bytes of data.
fn raw_header(name: &[u8], kind: tar::EntryType, link: &[u8], size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(images::DEFAULT_MTIME);
    h.set_size(size);
    {
        let u = h.as_ustar_mut().expect("a ustar header");
        assert!(name.len() <= u.name.len() && link.len() <= u.linkname.len());
        u.name[..name.len()].copy_from_slice(name);
        u.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_cksum();
    h
}

/// A raw tar entry: name, type, link name, data.
type RawEntry = (String, tar::EntryType, String, Vec<u8>);

/// A layer tar of raw entries.
fn raw_layer(entries: &[RawEntry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let h = raw_header(name.as_bytes(), *kind, link.as_bytes(), data.len() as u64);
        b.append(&h, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

/// A `docker save` tarball of the layer tars `tars` (bottom first), with the config's diff_ids
/// right, so that only the applier can refuse a layer.
fn write_raw_docker(path: &Path, name: &str, tars: &[Vec<u8>]) {
    let diff_ids: Vec<String> = tars.iter().map(|t| sha256_digest(t)).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_name = format!("{}.json", sha256_hex(&config));
    let mut b = tar::Builder::new(Vec::new());
    let mut layer_paths = Vec::new();
    for (i, t) in tars.iter().enumerate() {
        let p = format!("layer{i}/layer.tar");
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(t.len() as u64);
        b.append_data(&mut h, &p, t.as_slice()).unwrap();
        layer_paths.push(p);
    }
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name, "RepoTags": [name], "Layers": layer_paths,
    }]))
    .unwrap();
    for (p, data) in [
        (config_name.as_str(), &config),
        ("manifest.json", &manifest),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, p, data.as_slice()).unwrap();
    }
    std::fs::write(path, b.into_inner().unwrap()).unwrap();
}

/// Every path under `dir` (not following symlinks) whose name contains `marker`.
fn find_marker(dir: &Path, marker: &str, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().contains(marker) {
            out.push(p.clone());
        }
        if depth > 0 && e.file_type().is_ok_and(|t| t.is_dir()) {
            find_marker(&p, marker, depth - 1, out);
        }
    }
}

/// Layers that would write outside their root are refused and nothing is written outside.
#[test]
fn path_traversal_in_a_layer_is_refused_and_writes_nothing_outside() {
    let Some((up, _loops)) = start(&UP) else {
        return;
    };
    let mut f = Failures::new();
    let dir = up.dir.path().to_path_buf();
    let canary = dir.join("canary");
    std::fs::create_dir(&canary).unwrap();
    let marker = format!("thinpool-escape-{}", std::process::id());
    let m = |s: &str| format!("{marker}-{s}");
    use tar::EntryType::{Directory, Link, Regular, Symlink};
    let file = |name: String| (name, Regular, String::new(), b"escaped\n".to_vec());
    let canary_s = canary.to_str().unwrap().to_string();
    let cases: Vec<(&str, Vec<RawEntry>)> = vec![
        ("../NAME", vec![file(format!("../{}", m("dotdot")))]),
        ("/NAME (absolute)", vec![file(format!("/{}", m("abs")))]),
        (
            "a/../../NAME",
            vec![
                ("a/".into(), Directory, String::new(), Vec::new()),
                file(format!("a/../../{}", m("inner"))),
            ],
        ),
        (
            "symlink to an absolute folder outside, then link/NAME",
            vec![
                ("link".into(), Symlink, canary_s.clone(), Vec::new()),
                file(format!("link/{}", m("abs-link"))),
            ],
        ),
        (
            "symlink ../../.., then link/NAME",
            vec![
                ("up".into(), Symlink, "../../..".into(), Vec::new()),
                file(format!("up/{}", m("rel-link"))),
            ],
        ),
        (
            "hardlink to ../../etc/passwd",
            vec![(m("hard"), Link, "../../etc/passwd".into(), Vec::new())],
        ),
        (
            "hardlink through a symlink to /etc",
            vec![
                ("etc-link".into(), Symlink, "/etc".into(), Vec::new()),
                (m("hard-sym"), Link, "etc-link/passwd".into(), Vec::new()),
            ],
        ),
    ];
    let passwd = std::fs::metadata("/etc/passwd").unwrap();
    for (i, (what, entries)) in cases.iter().enumerate() {
        let archive = dir.join(format!("traversal-{i}.tar"));
        write_raw_docker(
            &archive,
            &format!("example.test/thinpool/traversal{i}:latest"),
            &[raw_layer(entries)],
        );
        refused(&mut f, &up, what, &archive, &["traversal", &marker]);
    }
    let mut found = Vec::new();
    find_marker(&dir, &marker, 8, &mut found);
    find_marker(Path::new("/tmp"), &marker, 0, &mut found);
    find_marker(Path::new("/"), &marker, 0, &mut found);
    find_marker(Path::new("/etc"), &marker, 0, &mut found);
    f.check(
        &format!("files written outside the snapshot: {found:?}"),
        found.is_empty(),
    );
    f.check(
        "the canary folder got entries",
        names_in(&canary).is_empty(),
    );
    use std::os::unix::fs::MetadataExt as _;
    let after = std::fs::metadata("/etc/passwd").unwrap();
    f.check(
        "/etc/passwd got a new link or changed",
        after.nlink() == passwd.nlink() && after.mtime() == passwd.mtime(),
    );
    f.finish();
    stop_and_check(up);
}

/// A second layer refused (`../NAME`) after the first applied: the first layer goes again,
/// with its blob.
#[test]
fn a_refused_second_layer_takes_the_first_one_away() {
    let Some((up, _loops)) = start(&UP) else {
        return;
    };
    let mut f = Failures::new();
    let good = Layer::new().dir("etc", 0o755).file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n",
        0o644,
    );
    let bad = raw_layer(&[(
        "../thinpool-second".into(),
        tar::EntryType::Regular,
        String::new(),
        b"escaped\n".to_vec(),
    )]);
    let archive = up.dir.path().join("second.tar");
    write_raw_docker(
        &archive,
        "example.test/thinpool/second:latest",
        &[good.tar(), bad],
    );
    refused(
        &mut f,
        &up,
        "layer 2 of 2 refused",
        &archive,
        &["traversal", "layer 2/2"],
    );
    f.finish();
    stop_and_check(up);
}

/// A reader of `n` random bytes.
struct RandomReader(StdRng, u64);

impl Read for RandomReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.1 as usize);
        self.0.fill_bytes(&mut buf[..n]);
        self.1 -= n as u64;
        Ok(n)
    }
}

/// A `docker save` tarball at `path` of one layer of `files` random files of `each` bytes,
/// written without holding it in memory.
fn write_big_docker(path: &Path, name: &str, files: u64, each: u64) {
    let dir = path.parent().unwrap();
    let layer_path = dir.join("big-layer.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&layer_path).unwrap());
        for i in 0..files {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(images::DEFAULT_MTIME);
            h.set_size(each);
            b.append_data(
                &mut h,
                format!("data/{i}"),
                RandomReader(StdRng::seed_from_u64(i), each),
            )
            .unwrap();
        }
        b.into_inner().unwrap().flush().unwrap();
    }
    let diff_id = {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        std::io::copy(&mut std::fs::File::open(&layer_path).unwrap(), &mut h).unwrap();
        format!("sha256:{:x}", h.finalize())
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))
    .unwrap();
    let config_name = format!("{}.json", sha256_hex(&config));
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name, "RepoTags": [name], "Layers": ["big/layer.tar"],
    }]))
    .unwrap();
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    let layer = std::fs::File::open(&layer_path).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_size(layer.metadata().unwrap().len());
    b.append_data(&mut h, "big/layer.tar", layer).unwrap();
    for (p, data) in [
        (config_name.as_str(), &config),
        ("manifest.json", &manifest),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, p, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap().flush().unwrap();
    std::fs::remove_file(&layer_path).unwrap();
}

/// An image bigger than the pool: the load fails naming the space, everything goes again, and
/// the daemon still serves.
#[test]
fn a_full_pool_fails_the_load_and_rolls_it_back() {
    let Some((up, _loops)) = start(&[
        "--data-size",
        "160M",
        "--metadata-size",
        "32M",
        "--base-size",
        "256M",
        "--error-if-no-space",
    ]) else {
        return;
    };
    let mut f = Failures::new();
    let archive = up.dir.path().join("big.tar");
    let started = std::time::Instant::now();
    write_big_docker(&archive, "example.test/thinpool/big:latest", 6, 32 << 20);
    eprintln!("the archive written in {:?}", started.elapsed());
    let started = std::time::Instant::now();
    // The pool's ENOSPC reaches ext4 through the loop device as an I/O error on write-back: the
    // applier's final syncfs is where it shows; the store adds what the pool says.
    refused(
        &mut f,
        &up,
        "192 MiB of random data into a 160 MiB pool",
        &archive,
        &[
            "the pool is out of data space",
            "pool grow",
            "syncfs",
            "input/output error",
            "layer 1/1",
        ],
    );
    eprintln!("the full-pool load failed in {:?}", started.elapsed());
    up.ok(&["vol", "ls"]);
    up.ok(&["image", "ls"]);
    // The pool still takes an image that fits.
    let small = up.dir.path().join("small.tar");
    three_layers("example.test/thinpool/fits:latest", 4).write_docker_archive(&small);
    up.ok(&["image", "load", small.to_str().unwrap()]);
    f.finish();
    stop_and_check(up);
}

/// `thinpool import` of a tar cut in a file's data and of a gzip'ed tar cut short.
#[test]
fn import_of_a_truncated_tar_is_refused_and_nothing_is_kept() {
    let Some((up, _loops)) = start(&UP) else {
        return;
    };
    let mut f = Failures::new();
    let dir = up.dir.path();
    let mut rng = StdRng::seed_from_u64(15);
    let layer = Layer::new()
        .dir("data", 0o755)
        .file("data/a", &random(&mut rng, 512 << 10), 0o644)
        .file("data/b", &random(&mut rng, 512 << 10), 0o644);
    let tar = layer.tar();
    let gz = layer.tar_gz();
    let cases = [
        (
            "plain tar cut in a file's data",
            "cut.tar",
            &tar[..700 << 10],
        ),
        ("gzip'ed tar cut short", "cut.tar.gz", &gz[..gz.len() / 2]),
    ];
    for (what, name, bytes) in cases {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let before = state(&up);
        let out = run(&mut up.cmd(&[
            "import",
            p.to_str().unwrap(),
            "example.test/thinpool/imported:latest",
        ]));
        check_refusal(
            &mut f,
            what,
            out.status.success(),
            &text(&out.stderr),
            &[name],
        );
        check_unchanged(&mut f, what, &before, &state(&up));
    }
    f.finish();
    stop_and_check(up);
}
