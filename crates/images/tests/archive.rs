//! Image archives against the real tools: an image built by `umoci` from the host's busybox (two
//! gzip layers from umoci, a third uncompressed layer added by hand) is copied by `skopeo` to a
//! docker archive, an OCI archive and an OCI directory, and every form (also gzip'ed or zstd'ed
//! whole, and through a stream) must give the same image: config digest, diff_ids, layers whose
//! uncompressed bytes hash to the diff_ids. What `write_archive` writes must be read by
//! `skopeo` in both its docker and OCI forms and by us. Corrupt archives (truncated, flipped
//! bytes, lying digests, digests that are paths, no manifest at all) must give a named error,
//! never a panic.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use thinpool_images::{Archive, ArchiveError, SaveImage, SaveLayer, write_archive};

const NAME: &str = "example.test/thinpool/archive:v1";

fn sha256(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").expect("a sha256 digest")
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn tool(name: &str) -> Command {
    thinpool_testkit::tool(name)
}

// ------------------------------------------------------------------------------------------------
// The fixture: one image, in every form skopeo writes

struct Fixture {
    _dir: tempfile::TempDir,
    /// The OCI layout umoci wrote (tag `v1`), with a third layer added.
    oci_dir: PathBuf,
    docker_tar: PathBuf,
    oci_tar: PathBuf,
    /// `skopeo copy` of the layout to another `oci:` directory.
    skopeo_dir: PathBuf,
    docker_gz: PathBuf,
    config_digest: String,
    diff_ids: Vec<String>,
}

static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();

fn fixture() -> Option<&'static Fixture> {
    if !thinpool_testkit::require_tools(&["umoci", "skopeo", "gzip"]) {
        return None;
    }
    if !Path::new("/bin/busybox").exists() {
        thinpool_testkit::skip_or_fail("/bin/busybox is missing (apt-get install busybox-static)");
        return None;
    }
    FIXTURE.get_or_init(|| Some(build_fixture())).as_ref()
}

fn build_fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("a temp dir");
    let d = dir.path();
    let oci_dir = d.join("oci");
    let image = format!("{}:v1", oci_dir.display());
    run(tool("umoci").args(["init", "--layout"]).arg(&oci_dir));
    run(tool("umoci").args(["new", "--image", &image]));
    let bundle = d.join("bundle");
    run(tool("umoci")
        .args(["unpack", "--rootless", "--image", &image])
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    fs::create_dir_all(rootfs.join("bin")).unwrap();
    fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "ls", "cat"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    run(tool("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    // repack builds on the manifest the bundle was unpacked from: unpack again for layer two.
    let bundle = d.join("bundle2");
    run(tool("umoci")
        .args(["unpack", "--rootless", "--image", &image])
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    fs::create_dir_all(rootfs.join("etc")).unwrap();
    fs::write(rootfs.join("etc/motd"), b"layer two\n").unwrap();
    fs::remove_file(rootfs.join("bin/cat")).unwrap();
    run(tool("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    // A third, uncompressed layer, added to umoci's layout by hand.
    let plain = small_layer(&[("etc/hostname", b"archive\n".as_slice())]);
    add_layer(
        &oci_dir,
        &plain,
        "application/vnd.oci.image.layer.v1.tar",
        &sha256(&plain),
    );

    let docker_tar = d.join("docker.tar");
    let oci_tar = d.join("oci.tar");
    let skopeo_dir = d.join("skopeo-oci");
    skopeo_copy(
        &format!("oci:{image}"),
        &format!("docker-archive:{}:{NAME}", docker_tar.display()),
    );
    skopeo_copy(
        &format!("oci:{image}"),
        &format!("oci-archive:{}:{NAME}", oci_tar.display()),
    );
    skopeo_copy(
        &format!("oci:{image}"),
        &format!("oci:{}:v1", skopeo_dir.display()),
    );
    let docker_gz = d.join("docker.tar.gz");
    let gz = run(tool("gzip").arg("-c").arg(&docker_tar));
    fs::write(&docker_gz, gz).unwrap();

    let (manifest, _) = oci_manifest(&oci_dir);
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_string();
    let config: Value =
        serde_json::from_slice(&fs::read(blob_path(&oci_dir, &config_digest)).unwrap()).unwrap();
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(diff_ids.len(), 3, "umoci made two layers and we added one");
    Fixture {
        _dir: dir,
        oci_dir,
        docker_tar,
        oci_tar,
        skopeo_dir,
        docker_gz,
        config_digest,
        diff_ids,
    }
}

fn skopeo_copy(from: &str, to: &str) {
    run(tool("skopeo").args(["copy", "--quiet", from, to]));
}

fn blob_path(oci_dir: &Path, digest: &str) -> PathBuf {
    oci_dir.join("blobs/sha256").join(hex_of(digest))
}

/// The manifest the layout's (only) index entry names, and its digest.
fn oci_manifest(oci_dir: &Path) -> (Value, String) {
    let index: Value =
        serde_json::from_slice(&fs::read(oci_dir.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest = serde_json::from_slice(&fs::read(blob_path(oci_dir, &digest)).unwrap()).unwrap();
    (manifest, digest)
}

fn write_blob(oci_dir: &Path, bytes: &[u8]) -> String {
    let digest = sha256(bytes);
    fs::write(blob_path(oci_dir, &digest), bytes).unwrap();
    digest
}

/// Put `blob` on top of the layout's image: new config (one more diff_id), manifest, index.
fn add_layer(oci_dir: &Path, blob: &[u8], media_type: &str, diff_id: &str) {
    let (mut manifest, _) = oci_manifest(oci_dir);
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_string();
    let mut config: Value =
        serde_json::from_slice(&fs::read(blob_path(oci_dir, &config_digest)).unwrap()).unwrap();
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .unwrap()
        .push(json!(diff_id));
    if let Some(history) = config["history"].as_array_mut() {
        history.push(json!({"created_by": "test: add_layer"}));
    }
    let config = serde_json::to_vec(&config).unwrap();
    let layer_digest = write_blob(oci_dir, blob);
    manifest["config"]["digest"] = json!(write_blob(oci_dir, &config));
    manifest["config"]["size"] = json!(config.len());
    manifest["layers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"mediaType": media_type, "digest": layer_digest, "size": blob.len()}));
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let mut index: Value =
        serde_json::from_slice(&fs::read(oci_dir.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"] = json!(write_blob(oci_dir, &manifest));
    index["manifests"][0]["size"] = json!(manifest.len());
    fs::write(
        oci_dir.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

/// A layer tar of regular files.
fn small_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A tar of named files, in order.
fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

/// Every layer of every image read to its end: finish() passes and the bytes read hash to the
/// diff_id. Returns the uncompressed layers of image 0.
fn check_layers(archive: &Archive) -> Vec<Vec<u8>> {
    let mut first = Vec::new();
    for (i, image) in archive.images().iter().enumerate() {
        assert_eq!(image.layers.len(), image.diff_ids.len());
        for (l, diff_id) in image.diff_ids.iter().enumerate() {
            let mut stream = archive
                .layer(i, l)
                .unwrap_or_else(|e| panic!("image {i} layer {l}: {e}"));
            let mut bytes = Vec::new();
            stream.read_to_end(&mut bytes).unwrap();
            let digests = stream
                .finish()
                .unwrap_or_else(|e| panic!("image {i} layer {l}: {e}"));
            assert_eq!(&sha256(&bytes), diff_id, "image {i} layer {l}: bytes read");
            assert_eq!(&digests.diff_id, diff_id);
            assert_eq!(digests.uncompressed_size, bytes.len() as u64);
            if let Some(d) = &image.layers[l].digest {
                assert_eq!(&digests.blob, d);
            }
            if i == 0 {
                first.push(bytes);
            }
        }
    }
    first
}

fn tar_names(layer: &[u8]) -> Vec<String> {
    let mut a = tar::Archive::new(layer);
    a.entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// The one image of `archive` is the fixture's.
fn check_same_image(what: &str, archive: &Archive, f: &Fixture, names: &[&str]) {
    let images = archive.images();
    assert_eq!(images.len(), 1, "{what}: one image");
    let image = &images[0];
    assert_eq!(
        image.config_digest, f.config_digest,
        "{what}: config digest"
    );
    assert_eq!(
        sha256(&image.config),
        f.config_digest,
        "{what}: config bytes"
    );
    assert_eq!(image.diff_ids, f.diff_ids, "{what}: diff_ids");
    assert_eq!(image.names, names, "{what}: names");
    let layers = check_layers(archive);
    assert!(
        tar_names(&layers[0])
            .iter()
            .any(|n| n.ends_with("bin/busybox")),
        "{what}: busybox in layer 0"
    );
    assert!(
        tar_names(&layers[1])
            .iter()
            .any(|n| n.ends_with("bin/.wh.cat")),
        "{what}: whiteout in layer 1"
    );
    assert_eq!(tar_names(&layers[2]), ["etc/hostname"], "{what}: layer 2");
}

// ------------------------------------------------------------------------------------------------
// Reading what skopeo writes

#[test]
fn skopeo_forms_give_the_same_image() {
    let Some(f) = fixture() else { return };
    let oci = Archive::open(&f.oci_dir).unwrap();
    check_same_image("umoci's OCI directory", &oci, f, &["v1"]);
    let media: Vec<&str> = oci.images()[0]
        .layers
        .iter()
        .map(|l| l.media_type.as_str())
        .collect();
    assert_eq!(
        media,
        [
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar"
        ]
    );
    check_same_image(
        "skopeo's OCI directory",
        &Archive::open(&f.skopeo_dir).unwrap(),
        f,
        &["v1"],
    );
    let docker = Archive::open(&f.docker_tar).unwrap();
    check_same_image("docker-archive", &docker, f, &[NAME]);
    assert!(
        docker.images()[0].layers.iter().all(|l| l.digest.is_none()
            && l.media_type == "application/vnd.docker.image.rootfs.diff.tar")
    );
    // skopeo writes the full name, not a tag, as the OCI ref name.
    check_same_image(
        "oci-archive",
        &Archive::open(&f.oci_tar).unwrap(),
        f,
        &[NAME],
    );
    check_same_image(
        "docker-archive gzip'ed",
        &Archive::open(&f.docker_gz).unwrap(),
        f,
        &[NAME],
    );
}

#[test]
fn streams_are_spooled() {
    let Some(f) = fixture() else { return };
    let spool = tempfile::tempdir().unwrap();
    for path in [&f.docker_tar, &f.docker_gz, &f.oci_tar] {
        // Through a pipe-like reader that hands out small pieces, as stdin does.
        struct Trickle(fs::File);
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(3);
                self.0.read(&mut buf[..n])
            }
        }
        let file = fs::File::open(path).unwrap();
        let reader: Box<dyn Read> = if path == &f.docker_tar {
            Box::new(Trickle(file))
        } else {
            Box::new(file)
        };
        let archive = Archive::from_reader(reader, spool.path()).unwrap();
        check_same_image(
            &format!("stream of {}", path.display()),
            &archive,
            f,
            &[NAME],
        );
    }
    assert_eq!(
        fs::read_dir(spool.path()).unwrap().count(),
        0,
        "the spool files are unnamed"
    );
}

#[test]
fn whole_archive_zstd_and_zstd_layers() {
    let Some(f) = fixture() else { return };
    let dir = tempfile::tempdir().unwrap();
    // The docker archive compressed whole with zstd.
    let zst = dir.path().join("docker.tar.zst");
    let data = zstd::encode_all(fs::File::open(&f.docker_tar).unwrap(), 3).unwrap();
    fs::write(&zst, data).unwrap();
    check_same_image(
        "docker-archive zstd'ed",
        &Archive::open(&zst).unwrap(),
        f,
        &[NAME],
    );

    // A zstd layer on top of umoci's layout.
    let layout = dir.path().join("oci");
    run(Command::new("cp").arg("-a").arg(&f.oci_dir).arg(&layout));
    let plain = small_layer(&[("etc/zstd", b"compressed with zstd\n".as_slice())]);
    let blob = zstd::encode_all(plain.as_slice(), 19).unwrap();
    add_layer(
        &layout,
        &blob,
        "application/vnd.oci.image.layer.v1.tar+zstd",
        &sha256(&plain),
    );
    let archive = Archive::open(&layout).unwrap();
    let image = &archive.images()[0];
    assert_eq!(image.layers.len(), 4);
    assert_eq!(
        image.layers[3].digest.as_deref(),
        Some(sha256(&blob).as_str())
    );
    let layers = check_layers(&archive);
    assert_eq!(layers[3], plain);
}

// ------------------------------------------------------------------------------------------------
// Writing

/// The fixture's image as SaveImages: the full image with two names, and its first two layers as
/// a second image, sharing those layers.
fn save_images(f: &Fixture, dir: &Path) -> Vec<SaveImage> {
    let archive = Archive::open(&f.oci_dir).unwrap();
    let image = &archive.images()[0];
    let mut layers = Vec::new();
    for (l, diff_id) in image.diff_ids.iter().enumerate() {
        let path = dir.join(format!("layer{l}.tar"));
        let mut stream = archive.layer(0, l).unwrap();
        let mut out = fs::File::create(&path).unwrap();
        let size = std::io::copy(&mut stream, &mut out).unwrap();
        stream.finish().unwrap();
        layers.push(SaveLayer {
            diff_id: diff_id.clone(),
            size,
            path,
        });
    }
    let mut base: Value = serde_json::from_slice(&image.config).unwrap();
    base["rootfs"]["diff_ids"]
        .as_array_mut()
        .unwrap()
        .truncate(2);
    base["config"]["Env"] = json!(["BASE=1"]);
    vec![
        SaveImage {
            names: vec![
                NAME.to_string(),
                "example.test/thinpool/archive:latest".to_string(),
            ],
            config: image.config.clone(),
            layers: layers.clone(),
        },
        SaveImage {
            names: vec!["example.test/thinpool/base:v1".to_string()],
            config: serde_json::to_vec(&base).unwrap(),
            layers: layers[..2].to_vec(),
        },
    ]
}

fn skopeo_inspect(reference: &str) -> (String, Vec<String>) {
    let config = run(tool("skopeo").args(["inspect", "--raw", "--config", reference]));
    let info: Value =
        serde_json::from_slice(&run(tool("skopeo").args(["inspect", reference]))).unwrap();
    let layers = info["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    (sha256(&config), layers)
}

#[test]
fn written_archives_are_read_by_skopeo_and_by_us() {
    let Some(f) = fixture() else { return };
    let dir = tempfile::tempdir().unwrap();
    let images = save_images(f, dir.path());
    let ours = dir.path().join("ours.tar");
    write_archive(fs::File::create(&ours).unwrap(), &images).unwrap();
    let mut again = Vec::new();
    write_archive(&mut again, &images).unwrap();
    assert!(
        fs::read(&ours).unwrap() == again,
        "the output is deterministic"
    );

    // Each blob once, although the two images share two layers.
    let names = tar_names(&again);
    let mut sorted = names.clone();
    sorted.dedup();
    assert_eq!(sorted, names, "no entry twice");
    for diff_id in &f.diff_ids {
        assert!(
            names.contains(&format!("blobs/sha256/{}", hex_of(diff_id))),
            "layer {diff_id} written"
        );
    }

    let base_config = sha256(&images[1].config);
    for (reference, config, layers) in [
        (
            format!("docker-archive:{}:{NAME}", ours.display()),
            &f.config_digest,
            &f.diff_ids[..],
        ),
        (
            format!(
                "docker-archive:{}:example.test/thinpool/base:v1",
                ours.display()
            ),
            &base_config,
            &f.diff_ids[..2],
        ),
        // skopeo picks an OCI image by its ref-name annotation: the tag, as Docker writes it.
        (
            format!("oci-archive:{}:v1", ours.display()),
            &f.config_digest,
            &f.diff_ids[..],
        ),
        (
            format!("oci-archive:{}:latest", ours.display()),
            &f.config_digest,
            &f.diff_ids[..],
        ),
    ] {
        let (c, l) = skopeo_inspect(&reference);
        assert_eq!(&c, config, "{reference}: config digest");
        assert_eq!(l, layers, "{reference}: layers");
    }

    // One image with one name: skopeo needs no reference to pick it, in either form.
    let single = dir.path().join("single.tar");
    write_archive(fs::File::create(&single).unwrap(), &images[1..]).unwrap();
    for form in ["docker-archive", "oci-archive"] {
        let (c, l) = skopeo_inspect(&format!("{form}:{}", single.display()));
        assert_eq!(
            (&c, &l[..]),
            (&base_config, &f.diff_ids[..2]),
            "{form} without a reference"
        );
    }

    let back = Archive::open(&ours).unwrap();
    let read: Vec<(&str, &[String], &[String])> = back
        .images()
        .iter()
        .map(|i| {
            (
                i.config_digest.as_str(),
                i.diff_ids.as_slice(),
                i.names.as_slice(),
            )
        })
        .collect();
    assert_eq!(
        read,
        [
            (
                f.config_digest.as_str(),
                &f.diff_ids[..],
                &[
                    NAME.to_string(),
                    "example.test/thinpool/archive:latest".to_string()
                ][..]
            ),
            (
                base_config.as_str(),
                &f.diff_ids[..2],
                &["example.test/thinpool/base:v1".to_string()][..]
            ),
        ]
    );
    check_layers(&back);

    // skopeo turns it into an OCI layout, which we read back as the same image.
    let copied = dir.path().join("copied");
    skopeo_copy(
        &format!("docker-archive:{}:{NAME}", ours.display()),
        &format!("oci:{}:t", copied.display()),
    );
    let copied = Archive::open(&copied).unwrap();
    // Converting a docker manifest to OCI, skopeo re-serialises the config (umoci's trailing
    // newline goes), so the id changes but not the content.
    let parse = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap();
    assert_eq!(parse(&copied.images()[0].config), parse(&images[0].config));
    assert_eq!(copied.images()[0].diff_ids, f.diff_ids);
    check_layers(&copied);
}

#[test]
fn write_refuses_layers_that_are_not_their_diff_id() {
    let Some(f) = fixture() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut images = save_images(f, dir.path());
    images.truncate(1);
    let layer = images[0].layers[2].clone();
    let mut bytes = fs::read(&layer.path).unwrap();
    bytes[600] ^= 1;
    fs::write(&layer.path, &bytes).unwrap();
    let err = write_archive(std::io::sink(), &images).unwrap_err();
    assert!(matches!(err, ArchiveError::Save { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&layer.path.display().to_string()),
        "{err}"
    );

    images[0].layers.pop();
    let err = write_archive(std::io::sink(), &images).unwrap_err();
    assert!(err.to_string().contains("rootfs.diff_ids"), "{err}");
}

// ------------------------------------------------------------------------------------------------
// Bad input

/// Where entry `name`'s data lies in the tar `bytes`.
fn entry_range(bytes: &[u8], name: &str) -> (usize, usize) {
    let mut a = tar::Archive::new(bytes);
    for e in a.entries().unwrap() {
        let e = e.unwrap();
        if e.path().unwrap().to_string_lossy() == name {
            return (e.raw_file_position() as usize, e.size() as usize);
        }
    }
    panic!("no {name} in the tar");
}

#[test]
fn truncated_archive_names_the_blob() {
    let Some(f) = fixture() else { return };
    let dir = tempfile::tempdir().unwrap();
    let bytes = fs::read(&f.oci_tar).unwrap();
    let (manifest, _) = oci_manifest(&f.skopeo_dir);
    let blob = format!(
        "blobs/sha256/{}",
        hex_of(manifest["layers"][0]["digest"].as_str().unwrap())
    );
    let (offset, size) = entry_range(&bytes, &blob);
    let cut = dir.path().join("cut.tar");
    fs::write(&cut, &bytes[..offset + size / 2]).unwrap();
    let err = Archive::open(&cut).unwrap_err();
    assert!(matches!(err, ArchiveError::Truncated { .. }), "{err:?}");
    assert!(err.to_string().contains(&blob), "{err}");

    // Cut inside a header: a tar error, or the blob after it is missing; never a panic.
    fs::write(&cut, &bytes[..offset - 100]).unwrap();
    let err = Archive::open(&cut).unwrap_err();
    assert!(
        matches!(
            err,
            ArchiveError::Tar { .. }
                | ArchiveError::MissingBlob { .. }
                | ArchiveError::NotAnArchive { .. }
        ),
        "{err:?}"
    );
    // Streams too.
    let err = Archive::from_reader(&bytes[..offset + size / 2], dir.path()).unwrap_err();
    assert!(err.to_string().contains(&blob), "{err}");
}

#[test]
fn flipped_layer_bytes_fail_finish() {
    let Some(f) = fixture() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Our own archive: layer blobs are named by digest, so the blob digest catches it.
    let images = save_images(f, dir.path());
    let mut ours = Vec::new();
    write_archive(&mut ours, &images[..1]).unwrap();
    let blob = format!("blobs/sha256/{}", hex_of(&f.diff_ids[0]));
    let (offset, size) = entry_range(&ours, &blob);
    ours[offset + size / 2] ^= 0x40;
    let path = dir.path().join("flipped.tar");
    fs::write(&path, &ours).unwrap();
    let archive = Archive::open(&path).unwrap();
    let mut stream = archive.layer(0, 0).unwrap();
    std::io::copy(&mut stream, &mut std::io::sink()).unwrap();
    let err = stream.finish().unwrap_err();
    let ArchiveError::LayerDigest {
        layer,
        which,
        expected,
        actual,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(
        (*layer, *which, expected.as_str()),
        (0, "blob digest", f.diff_ids[0].as_str())
    );
    assert_ne!(actual, expected);
    let msg = err.to_string();
    assert!(
        msg.contains(expected)
            && msg.contains(actual.as_str())
            && msg.contains("layer 1 (1 = the bottom)"),
        "{msg}"
    );
    // The other layers are fine.
    for l in 1..3 {
        let stream = archive.layer(0, l).unwrap();
        stream.finish().unwrap();
    }

    // skopeo's docker archive: no blob digest, the diff_id catches it.
    let mut docker = fs::read(&f.docker_tar).unwrap();
    let name = format!("{}.tar", hex_of(&f.diff_ids[2]));
    let (offset, _) = entry_range(&docker, &name);
    docker[offset + 512] ^= 0x01; // inside etc/hostname's contents
    let path = dir.path().join("flipped-docker.tar");
    fs::write(&path, &docker).unwrap();
    let archive = Archive::open(&path).unwrap();
    let err = archive.layer(0, 2).unwrap().finish().unwrap_err();
    assert!(
        matches!(&err, ArchiveError::LayerDigest { layer: 2, which: "diff_id", expected, .. } if *expected == f.diff_ids[2]),
        "{err:?}"
    );

    // A gzip layer of an OCI directory: the decoder or the digest says so, no panic.
    let layout = dir.path().join("oci");
    run(Command::new("cp").arg("-a").arg(&f.oci_dir).arg(&layout));
    let (manifest, _) = oci_manifest(&layout);
    let gz = blob_path(&layout, manifest["layers"][0]["digest"].as_str().unwrap());
    let mut bytes = fs::read(&gz).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&gz, &bytes).unwrap();
    let archive = Archive::open(&layout).unwrap();
    let mut stream = archive.layer(0, 0).unwrap();
    let read = std::io::copy(&mut stream, &mut std::io::sink());
    let err = match read {
        Ok(_) => stream.finish().unwrap_err(),
        Err(_) => archive.layer(0, 0).unwrap().finish().unwrap_err(),
    };
    assert!(err.to_string().contains("layer 0"), "{err}");
}

#[test]
fn config_with_wrong_digest_is_refused() {
    let Some(f) = fixture() else { return };
    let dir = tempfile::tempdir().unwrap();
    // OCI: the config blob's bytes changed, same length.
    let layout = dir.path().join("oci");
    run(Command::new("cp").arg("-a").arg(&f.oci_dir).arg(&layout));
    let config = blob_path(&layout, &f.config_digest);
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("\"os\":\"linux\"", "\"os\":\"linuy\"");
    fs::write(&config, text).unwrap();
    let err = Archive::open(&layout).unwrap_err();
    assert!(
        matches!(err, ArchiveError::DigestMismatch { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(hex_of(&f.config_digest)) && msg.contains(&f.config_digest),
        "{msg}"
    );

    // docker-archive: `HEX.json` whose bytes are not HEX.
    let mut docker = fs::read(&f.docker_tar).unwrap();
    let (offset, size) = entry_range(&docker, &format!("{}.json", hex_of(&f.config_digest)));
    let pos = offset
        + docker[offset..offset + size]
            .windows(7)
            .position(|w| w == b"\"linux\"")
            .unwrap();
    docker[pos + 5] = b'y';
    let path = dir.path().join("docker.tar");
    fs::write(&path, &docker).unwrap();
    let err = Archive::open(&path).unwrap_err();
    assert!(
        matches!(err, ArchiveError::DigestMismatch { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(&format!("{}.json", hex_of(&f.config_digest))),
        "{err}"
    );
}

/// The files of a small hand-made OCI layout: one plain layer, one gzip layer, one zstd layer.
fn handmade(layer_count_in_config: usize) -> Vec<(String, Vec<u8>)> {
    let l1 = small_layer(&[("a", b"plain".as_slice())]);
    let l2 = small_layer(&[("b", b"gzip".as_slice())]);
    let l3 = small_layer(&[("c", b"zstd".as_slice())]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&l2).unwrap();
    let l2z = gz.finish().unwrap();
    let l3z = zstd::encode_all(l3.as_slice(), 3).unwrap();
    let diff_ids = [sha256(&l1), sha256(&l2), sha256(&l3)];
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": &diff_ids[..layer_count_in_config]},
    }))
    .unwrap();
    let desc = |mt: &str, b: &[u8]| json!({"mediaType": mt, "digest": sha256(b), "size": b.len()});
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", &config),
        "layers": [
            desc("application/vnd.oci.image.layer.v1.tar", &l1),
            desc("application/vnd.oci.image.layer.v1.tar+gzip", &l2z),
            desc("application/vnd.oci.image.layer.v1.tar+zstd", &l3z),
        ],
    }))
    .unwrap();
    let mut index_desc = desc("application/vnd.oci.image.manifest.v1+json", &manifest);
    index_desc["annotations"] = json!({
        "io.containerd.image.name": "example.test/thinpool/handmade:v1",
        "org.opencontainers.image.ref.name": "v1",
    });
    let index =
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [index_desc]})).unwrap();
    let mut files = vec![
        (
            "./oci-layout".to_string(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("./index.json".to_string(), index),
    ];
    for b in [config, manifest, l1, l2z, l3z] {
        files.push((format!("./blobs/sha256/{}", hex_of(&sha256(&b))), b));
    }
    files
}

fn open_bytes(dir: &Path, name: &str, bytes: &[u8]) -> Result<Archive, ArchiveError> {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    Archive::open(&path)
}

#[test]
fn handmade_layout_with_every_compression() {
    let dir = tempfile::tempdir().unwrap();
    let archive = open_bytes(dir.path(), "ok.tar", &tar_of(&handmade(3))).unwrap();
    assert_eq!(
        archive.images()[0].names,
        ["example.test/thinpool/handmade:v1"]
    );
    let layers = check_layers(&archive);
    assert_eq!(tar_names(&layers[0]), ["a"]);
    assert_eq!(tar_names(&layers[1]), ["b"]);
    assert_eq!(tar_names(&layers[2]), ["c"]);
    assert!(matches!(
        archive.layer(0, 3),
        Err(ArchiveError::NoSuchLayer { .. })
    ));
    assert!(matches!(
        archive.layer(1, 0),
        Err(ArchiveError::NoSuchLayer { .. })
    ));
}

#[test]
fn malformed_archives_are_refused_with_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let err_of =
        |name: &str, files: &[(String, Vec<u8>)]| open_bytes(d, name, &tar_of(files)).unwrap_err();

    // Neither manifest.json nor index.json.
    let err = err_of("none.tar", &[("hello.txt".to_string(), b"hi".to_vec())]);
    let path = d.join("none.tar");
    assert_eq!(
        err.to_string(),
        format!(
            "not an image archive: neither manifest.json nor index.json in {}",
            path.display()
        )
    );

    // A layer count that is not the config's.
    let err = err_of("count.tar", &handmade(2));
    assert!(
        matches!(
            err,
            ArchiveError::LayerCount {
                layers: 3,
                diff_ids: 2,
                ..
            }
        ),
        "{err:?}"
    );

    // A digest that is a path: refused before any lookup.
    let mut files = handmade(3);
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:../../etc/passwd", "size": 10}]});
    files[1].1 = serde_json::to_vec(&index).unwrap();
    let err = err_of("traversal.tar", &files);
    assert!(matches!(err, ArchiveError::BadDigest { .. }), "{err:?}");
    assert!(err.to_string().contains("sha256:../../etc/passwd"), "{err}");
    // The same in a docker manifest.json: the layer path leaves the archive, so it is missing.
    let docker =
        json!([{"Config": "blobs/sha256/x.json", "RepoTags": [], "Layers": ["../../etc/passwd"]}]);
    let err = err_of(
        "docker-traversal.tar",
        &[(
            "manifest.json".to_string(),
            serde_json::to_vec(&docker).unwrap(),
        )],
    );
    assert!(matches!(err, ArchiveError::MissingBlob { .. }), "{err:?}");

    // A manifest blob that is absent.
    let mut files = handmade(3);
    let index: Value = serde_json::from_slice(&files[1].1).unwrap();
    let m_hex = hex_of(index["manifests"][0]["digest"].as_str().unwrap()).to_string();
    let manifest = files.iter().position(|(n, _)| n.ends_with(&m_hex)).unwrap();
    let (gone, _) = files.remove(manifest);
    let err = err_of("missing.tar", &files);
    assert!(matches!(err, ArchiveError::MissingBlob { .. }), "{err:?}");
    assert!(
        err.to_string().contains(gone.trim_start_matches("./")),
        "{err}"
    );
    // A layer blob that is absent.
    let mut files = handmade(3);
    let (gone, _) = files.pop().unwrap();
    let err = err_of("missing-layer.tar", &files);
    assert!(
        err.to_string().contains(gone.trim_start_matches("./")),
        "{err}"
    );

    // Invalid JSON, named.
    let mut files = handmade(3);
    files[1].1 = b"{\"schemaVersion\": 2, ".to_vec();
    let err = err_of("json.tar", &files);
    assert!(
        matches!(&err, ArchiveError::Json { file, .. } if file == "index.json"),
        "{err:?}"
    );

    // A gzip media type on a plain blob: refused when the layer is opened.
    let mut files = handmade(3);
    let index_bytes = files[1].1.clone();
    let index: Value = serde_json::from_slice(&index_bytes).unwrap();
    let m_hex = hex_of(index["manifests"][0]["digest"].as_str().unwrap()).to_string();
    let m_pos = files.iter().position(|(n, _)| n.ends_with(&m_hex)).unwrap();
    let mut manifest: Value = serde_json::from_slice(&files[m_pos].1).unwrap();
    manifest["layers"][0]["mediaType"] = json!("application/vnd.oci.image.layer.v1.tar+gzip");
    let m = serde_json::to_vec(&manifest).unwrap();
    let new_index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(&m), "size": m.len()}]});
    files[1].1 = serde_json::to_vec(&new_index).unwrap();
    files.push((format!("blobs/sha256/{}", hex_of(&sha256(&m))), m));
    let archive = open_bytes(d, "mediatype.tar", &tar_of(&files)).unwrap();
    assert!(archive.images()[0].names.is_empty());
    let err = archive.layer(0, 0).unwrap_err();
    assert!(
        matches!(
            err,
            ArchiveError::MediaType {
                layer: 0,
                found: "plain tar",
                ..
            }
        ),
        "{err:?}"
    );
}

/// Rebuild a tar with every name prefixed `./` and `manifest.json` rewritten by `edit`.
fn retar(bytes: &[u8], edit: impl Fn(&mut Value)) -> Vec<u8> {
    let mut out = tar::Builder::new(Vec::new());
    let mut a = tar::Archive::new(bytes);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut h = e.header().clone();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        if name == "manifest.json" {
            let mut v: Value = serde_json::from_slice(&data).unwrap();
            edit(&mut v);
            data = serde_json::to_vec(&v).unwrap();
            h.set_size(data.len() as u64);
        }
        // Written raw: the tar crate's set_path would drop the `./`.
        let path = format!("./{name}");
        let raw = &mut h.as_old_mut().name;
        raw.fill(0);
        raw[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        out.append(&h, data.as_slice()).unwrap();
    }
    out.into_inner().unwrap()
}

#[test]
fn docker_legacy_layer_links_and_dot_names() {
    let Some(f) = fixture() else { return };
    let dir = tempfile::tempdir().unwrap();
    let docker = fs::read(&f.docker_tar).unwrap();
    // skopeo writes `<v1 id>/layer.tar -> ../<diff_id hex>.tar`; older docker's manifest.json
    // names the `<v1 id>/layer.tar`: point it there, so every layer is reached through a link.
    let mut link_of = std::collections::HashMap::new();
    for e in tar::Archive::new(docker.as_slice()).entries().unwrap() {
        let e = e.unwrap();
        if e.header().entry_type().is_symlink() {
            let target = e
                .link_name()
                .unwrap()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            link_of.insert(target.trim_start_matches("../").to_string(), name);
        }
    }
    let legacy = retar(&docker, |m| {
        for layer in m[0]["Layers"].as_array_mut().unwrap() {
            let link = link_of[layer.as_str().unwrap()].clone();
            *layer = json!(link);
        }
    });
    let names = tar_names(&legacy);
    assert!(names.iter().all(|n| n.starts_with("./")), "{names:?}");
    let archive = open_bytes(dir.path(), "legacy.tar", &legacy).unwrap();
    check_same_image("docker archive through links", &archive, f, &[NAME]);

    // A link whose target is absent is a missing blob, named.
    let dangling = retar(&docker, |m| m[0]["Layers"][1] = json!("nowhere/layer.tar"));
    let err = open_bytes(dir.path(), "dangling.tar", &dangling).unwrap_err();
    assert!(
        matches!(err, ArchiveError::MissingBlob { .. })
            && err.to_string().contains("nowhere/layer.tar"),
        "{err}"
    );
}

#[test]
fn nested_index_keeps_the_present_platform() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = handmade(3);
    let top: Value = serde_json::from_slice(&files[1].1).unwrap();
    let mut manifest_desc = top["manifests"][0].clone();
    manifest_desc.as_object_mut().unwrap().remove("annotations");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    manifest_desc["platform"] = json!({"architecture": arch, "os": "linux"});
    // Another platform whose manifest was not exported, and an attestation (platform unknown).
    let absent = json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": sha256(b"not exported"), "size": 12, "platform": {"architecture": "s390x", "os": "linux"}});
    let attestation = json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": sha256(b"attestation"), "size": 11, "platform": {"architecture": "unknown", "os": "unknown"}});
    let nested = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [absent, manifest_desc, attestation],
    }))
    .unwrap();
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha256(&nested), "size": nested.len(),
        "annotations": {"io.containerd.image.name": "example.test/thinpool/multi:v1",
                        "org.opencontainers.image.ref.name": "v1"}}]});
    files[1].1 = serde_json::to_vec(&index).unwrap();
    files.push((format!("blobs/sha256/{}", hex_of(&sha256(&nested))), nested));
    let archive = open_bytes(dir.path(), "multi.tar", &tar_of(&files)).unwrap();
    assert_eq!(archive.images().len(), 1);
    assert_eq!(
        archive.images()[0].names,
        ["example.test/thinpool/multi:v1"]
    );
    check_layers(&archive);

    // An index listing nothing is no image archive either.
    let empty = vec![(
        "index.json".to_string(),
        br#"{"schemaVersion":2,"manifests":[]}"#.to_vec(),
    )];
    let err = open_bytes(dir.path(), "empty.tar", &tar_of(&empty)).unwrap_err();
    assert!(
        err.to_string().contains("index.json: lists no images"),
        "{err}"
    );
}
