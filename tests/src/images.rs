//! Container images built in memory, with no registry: layers as tar streams (uncompressed or
//! gzip), an image config, and three ways to write an image out — a `docker save` tarball, an OCI
//! image layout folder, and an OCI archive (a tar of that folder).
//!
//! A [`Layer`] is a list of entries written in order; the last entry added can be given an owner,
//! an mtime or `user.*` extended attributes (PAX `SCHILY.xattr.` records, as Docker and umoci
//! write them):
//!
//! ```
//! use thinpool_tests::images::{Image, Layer};
//! let layer = Layer::new()
//!     .dir("etc", 0o755)
//!     .file("etc/motd", b"hello\n", 0o644)
//!     .owner(1000, 1000)
//!     .xattr("user.colour", b"blue")
//!     .symlink("motd", "etc/motd")
//!     .char_device("dev/mynull", 1, 3, 0o666)
//!     .whiteout("old")
//!     .opaque("var/cache");
//! let image = Image::new("example.test/thinpool/doc:latest").layer(layer).cmd(&["/bin/sh"]);
//! assert_eq!(image.diff_ids().len(), 1);
//! ```
//!
//! Ready-made images: [`busybox`] (one layer: the host's static busybox and its applet links),
//! [`rich`] (busybox plus two layers exercising every tar feature the snapshotter must carry:
//! hardlinks, symlinks, xattrs, a device node, setuid, owners, whiteouts, opaque folders, a file
//! replaced by a folder) and [`many_layers`].
//!
//! Image names should be fully qualified (`example.test/thinpool/NAME:TAG`): containerd keeps them
//! as they are, while a short `busybox:latest` would become `docker.io/library/busybox:latest`.

use std::io::Write as _;
use std::path::Path;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// The mtime given to every entry unless [`Layer::mtime`] says otherwise (2023-11-14).
pub const DEFAULT_MTIME: u64 = 1_700_000_000;

/// The `PATH` of every image built here.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The applets of [`busybox`] linked in `/bin` (`bin/NAME -> busybox`).
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh",
    "ash",
    "ls",
    "cat",
    "echo",
    "cp",
    "mv",
    "rm",
    "mkdir",
    "rmdir",
    "ln",
    "stat",
    "find",
    "sha256sum",
    "md5sum",
    "grep",
    "sed",
    "awk",
    "head",
    "tail",
    "wc",
    "id",
    "touch",
    "chmod",
    "chown",
    "mount",
    "umount",
    "df",
    "du",
    "sync",
    "sleep",
    "true",
    "false",
    "env",
    "test",
    "readlink",
    "dd",
    "uname",
    "hostname",
    "ps",
    "tar",
    "diff",
    "xargs",
    "sort",
    "printf",
];

/// `sha256:<hex>` of `bytes`, the form of every digest in manifests and configs.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// The name of [`rich`]'s image in the tests.
pub const RICH: &str = "example.test/thinpool/rich:latest";

/// The name of [`busybox`]'s image in the tests.
pub const BUSYBOX: &str = "example.test/thinpool/busybox:latest";

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What a layer entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file with these contents.
    File(Vec<u8>),
    /// A folder.
    Dir,
    /// A symbolic link to this target (kept as written: absolute, relative or dangling).
    Symlink(String),
    /// A hard link to this earlier path of the same layer (relative to the layer root).
    Hardlink(String),
    /// A character device node (major, minor).
    CharDevice(u32, u32),
    /// A block device node (major, minor).
    BlockDevice(u32, u32),
    /// A named pipe.
    Fifo,
}

/// One tar entry of a [`Layer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the layer root, without a leading `/` or `./`.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits, including setuid, setgid and sticky (`0o7777` mask).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
    /// Extended attributes (`user.NAME`, value), written as PAX `SCHILY.xattr.NAME` records.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// A layer: tar entries in the order they are written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layer {
    /// The entries, in tar order.
    pub entries: Vec<Entry>,
}

fn clean(path: &str) -> String {
    let p = path.trim_start_matches("./").trim_start_matches('/');
    p.trim_end_matches('/').to_string()
}

impl Layer {
    /// An empty layer.
    pub fn new() -> Layer {
        Layer::default()
    }

    /// Add an entry (owned by root, [`DEFAULT_MTIME`], no xattrs).
    pub fn entry(mut self, path: &str, kind: EntryKind, mode: u32) -> Layer {
        self.entries.push(Entry {
            path: clean(path),
            kind,
            mode: mode & 0o7777,
            uid: 0,
            gid: 0,
            mtime: DEFAULT_MTIME,
            xattrs: Vec::new(),
        });
        self
    }

    /// A folder.
    pub fn dir(self, path: &str, mode: u32) -> Layer {
        self.entry(path, EntryKind::Dir, mode)
    }

    /// A regular file.
    pub fn file(self, path: &str, contents: &[u8], mode: u32) -> Layer {
        self.entry(path, EntryKind::File(contents.to_vec()), mode)
    }

    /// A symbolic link `path -> target`.
    pub fn symlink(self, path: &str, target: &str) -> Layer {
        self.entry(path, EntryKind::Symlink(target.to_string()), 0o777)
    }

    /// A hard link `path` to the earlier entry `target` (a path relative to the layer root).
    pub fn hardlink(self, path: &str, target: &str) -> Layer {
        self.entry(path, EntryKind::Hardlink(clean(target)), 0o644)
    }

    /// A character device node (a tar header only: nothing is created on this host).
    pub fn char_device(self, path: &str, major: u32, minor: u32, mode: u32) -> Layer {
        self.entry(path, EntryKind::CharDevice(major, minor), mode)
    }

    /// A block device node.
    pub fn block_device(self, path: &str, major: u32, minor: u32, mode: u32) -> Layer {
        self.entry(path, EntryKind::BlockDevice(major, minor), mode)
    }

    /// A named pipe.
    pub fn fifo(self, path: &str, mode: u32) -> Layer {
        self.entry(path, EntryKind::Fifo, mode)
    }

    /// A whiteout: `path` of a lower layer is deleted (the entry `DIR/.wh.NAME`).
    pub fn whiteout(self, path: &str) -> Layer {
        let path = clean(path);
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n.to_string()),
            None => (String::new(), path.clone()),
        };
        self.file(&format!("{dir}.wh.{name}"), b"", 0o644)
    }

    /// An opaque folder: what lower layers have below `dir` is hidden (the entry
    /// `DIR/.wh..wh..opq`). Entries of this layer below `dir` stay, wherever they are in the tar.
    pub fn opaque(self, dir: &str) -> Layer {
        let dir = clean(dir);
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644)
    }

    fn last(&mut self) -> &mut Entry {
        self.entries
            .last_mut()
            .expect("owner/mtime/xattr apply to the last entry added: add one first")
    }

    /// Owner of the last entry added.
    pub fn owner(mut self, uid: u32, gid: u32) -> Layer {
        let e = self.last();
        e.uid = uid;
        e.gid = gid;
        self
    }

    /// Modification time of the last entry added.
    pub fn mtime(mut self, mtime: u64) -> Layer {
        self.last().mtime = mtime;
        self
    }

    /// An extended attribute of the last entry added (e.g. `user.colour`).
    pub fn xattr(mut self, name: &str, value: &[u8]) -> Layer {
        self.last().xattrs.push((name.to_string(), value.to_vec()));
        self
    }

    /// The layer as an uncompressed tar stream.
    pub fn tar(&self) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in &self.entries {
            if !e.xattrs.is_empty() {
                let keys: Vec<(String, &[u8])> = e
                    .xattrs
                    .iter()
                    .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                    .collect();
                b.append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v)))
                    .expect("write to a Vec");
            }
            let mut h = tar::Header::new_ustar();
            h.set_mode(e.mode);
            h.set_uid(e.uid.into());
            h.set_gid(e.gid.into());
            h.set_mtime(e.mtime);
            h.set_size(0);
            let res = match &e.kind {
                EntryKind::File(data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, &e.path, data.as_slice())
                }
                EntryKind::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    b.append_data(&mut h, format!("{}/", e.path), std::io::empty())
                }
                EntryKind::Symlink(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    b.append_link(&mut h, &e.path, target)
                }
                EntryKind::Hardlink(target) => {
                    h.set_entry_type(tar::EntryType::Link);
                    b.append_link(&mut h, &e.path, target)
                }
                EntryKind::CharDevice(major, minor) | EntryKind::BlockDevice(major, minor) => {
                    h.set_entry_type(if matches!(e.kind, EntryKind::CharDevice(..)) {
                        tar::EntryType::Char
                    } else {
                        tar::EntryType::Block
                    });
                    h.set_device_major(*major)
                        .expect("ustar header has device fields");
                    h.set_device_minor(*minor)
                        .expect("ustar header has device fields");
                    b.append_data(&mut h, &e.path, std::io::empty())
                }
                EntryKind::Fifo => {
                    h.set_entry_type(tar::EntryType::Fifo);
                    h.set_device_major(0)
                        .expect("ustar header has device fields");
                    h.set_device_minor(0)
                        .expect("ustar header has device fields");
                    b.append_data(&mut h, &e.path, std::io::empty())
                }
            };
            res.unwrap_or_else(|err| panic!("tar entry {}: {err}", e.path));
        }
        b.into_inner().expect("finish a tar in memory")
    }

    /// The layer as a gzip-compressed tar stream (deterministic: no name, mtime 0).
    pub fn tar_gz(&self) -> Vec<u8> {
        gzip(&self.tar())
    }

    /// `sha256:` digest of the uncompressed tar: the layer's diff ID.
    pub fn diff_id(&self) -> String {
        sha256_digest(&self.tar())
    }
}

/// Gzip `data` (default level, empty header).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip into a Vec");
    enc.finish().expect("gzip into a Vec")
}

/// How layers are stored in an OCI layout (a docker save tarball always holds plain tars).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// `application/vnd.oci.image.layer.v1.tar`.
    None,
    /// `application/vnd.oci.image.layer.v1.tar+gzip`.
    Gzip,
}

/// A blob of an OCI layout: its bytes, digest and media type.
#[derive(Clone, Debug)]
pub struct Blob {
    /// Media type of the descriptor pointing at it.
    pub media_type: String,
    /// `sha256:…` of `bytes`.
    pub digest: String,
    /// The content.
    pub bytes: Vec<u8>,
}

impl Blob {
    fn new(media_type: &str, bytes: Vec<u8>) -> Blob {
        Blob {
            media_type: media_type.to_string(),
            digest: sha256_digest(&bytes),
            bytes,
        }
    }

    /// The OCI descriptor of this blob.
    pub fn descriptor(&self) -> Value {
        json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.bytes.len(),
        })
    }
}

/// An image: layers (bottom first) and the runtime config.
#[derive(Clone, Debug)]
pub struct Image {
    /// Full reference, e.g. `example.test/thinpool/busybox:latest`.
    pub name: String,
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    /// `config.Entrypoint` (absent when empty).
    pub entrypoint: Vec<String>,
    /// `config.Cmd` (absent when empty).
    pub cmd: Vec<String>,
    /// `config.Env`.
    pub env: Vec<String>,
    /// `config.WorkingDir`.
    pub working_dir: String,
    /// Layer storage in OCI layouts (default gzip).
    pub compression: Compression,
}

impl Image {
    /// An image with no layers, `Env` = [`DEFAULT_PATH`], working folder `/`, gzip layers.
    pub fn new(name: &str) -> Image {
        Image {
            name: name.to_string(),
            layers: Vec::new(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            env: vec![DEFAULT_PATH.to_string()],
            working_dir: "/".to_string(),
            compression: Compression::Gzip,
        }
    }

    /// Add a layer on top.
    pub fn layer(mut self, layer: Layer) -> Image {
        self.layers.push(layer);
        self
    }

    /// Set `Entrypoint`.
    pub fn entrypoint(mut self, args: &[&str]) -> Image {
        self.entrypoint = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Set `Cmd`.
    pub fn cmd(mut self, args: &[&str]) -> Image {
        self.cmd = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Add an `Env` entry (`NAME=value`).
    pub fn env(mut self, var: &str) -> Image {
        self.env.push(var.to_string());
        self
    }

    /// Store the layers of OCI layouts this way.
    pub fn compression(mut self, c: Compression) -> Image {
        self.compression = c;
        self
    }

    /// The tag: what follows the last `:` after the last `/` of the name (`latest` if none).
    pub fn tag(&self) -> &str {
        let last = self.name.rsplit('/').next().unwrap_or(&self.name);
        match last.rsplit_once(':') {
            Some((_, tag)) => tag,
            None => "latest",
        }
    }

    /// `sha256:` diff IDs of the layers (digests of the uncompressed tars), bottom first.
    pub fn diff_ids(&self) -> Vec<String> {
        self.layers.iter().map(Layer::diff_id).collect()
    }

    /// Chain IDs of the layers, bottom first: the names containerd gives the committed
    /// snapshots (`chain(1) = diff(1)`, `chain(n) = sha256(chain(n-1) + " " + diff(n))`).
    pub fn chain_ids(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for d in self.diff_ids() {
            let next = match out.last() {
                None => d,
                Some(prev) => sha256_digest(format!("{prev} {d}").as_bytes()),
            };
            out.push(next);
        }
        out
    }

    /// Chain ID of the top layer: the parent of a container's snapshot.
    pub fn chain_id(&self) -> String {
        self.chain_ids()
            .pop()
            .expect("an image needs at least one layer")
    }

    /// The image config JSON (OCI image config, which Docker reads too).
    pub fn config_json(&self) -> Vec<u8> {
        let mut config = serde_json::Map::new();
        config.insert("Env".into(), json!(self.env));
        if !self.entrypoint.is_empty() {
            config.insert("Entrypoint".into(), json!(self.entrypoint));
        }
        if !self.cmd.is_empty() {
            config.insert("Cmd".into(), json!(self.cmd));
        }
        config.insert("WorkingDir".into(), json!(self.working_dir));
        let history: Vec<Value> = (0..self.layers.len())
            .map(|i| {
                json!({
                    "created": "2023-11-14T22:13:20Z",
                    "created_by": format!("thinpool-tests layer {}", i + 1),
                })
            })
            .collect();
        let v = json!({
            "architecture": "amd64",
            "os": "linux",
            "created": "2023-11-14T22:13:20Z",
            "config": config,
            "rootfs": { "type": "layers", "diff_ids": self.diff_ids() },
            "history": history,
        });
        serde_json::to_vec(&v).expect("serialize a JSON value")
    }

    /// The blobs of the OCI layout: (config, layers, manifest).
    pub fn oci_blobs(&self) -> (Blob, Vec<Blob>, Blob) {
        let config = Blob::new(
            "application/vnd.oci.image.config.v1+json",
            self.config_json(),
        );
        let layers: Vec<Blob> = self
            .layers
            .iter()
            .map(|l| match self.compression {
                Compression::None => Blob::new("application/vnd.oci.image.layer.v1.tar", l.tar()),
                Compression::Gzip => {
                    Blob::new("application/vnd.oci.image.layer.v1.tar+gzip", l.tar_gz())
                }
            })
            .collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        let manifest = Blob::new(
            "application/vnd.oci.image.manifest.v1+json",
            serde_json::to_vec(&manifest).expect("serialize a JSON value"),
        );
        (config, layers, manifest)
    }

    /// The files of an OCI image layout, (relative path, content), in a stable order:
    /// `oci-layout`, `index.json` (one manifest, annotated with `org.opencontainers.image.ref.name`
    /// = the tag and `io.containerd.image.name` = the full name), `blobs/sha256/…`.
    pub fn oci_files(&self) -> Vec<(String, Vec<u8>)> {
        let (config, layers, manifest) = self.oci_blobs();
        let mut desc = manifest.descriptor();
        desc["annotations"] = json!({
            "io.containerd.image.name": self.name,
            "org.opencontainers.image.ref.name": self.tag(),
        });
        desc["platform"] = json!({ "architecture": "amd64", "os": "linux" });
        let index = json!({ "schemaVersion": 2, "manifests": [desc] });
        let mut files = vec![
            (
                "oci-layout".to_string(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            (
                "index.json".to_string(),
                serde_json::to_vec(&index).expect("serialize a JSON value"),
            ),
        ];
        for b in std::iter::once(config).chain(layers).chain([manifest]) {
            let path = format!("blobs/sha256/{}", b.digest.trim_start_matches("sha256:"));
            if !files.iter().any(|(p, _)| *p == path) {
                files.push((path, b.bytes));
            }
        }
        files
    }

    /// Write the image as an OCI image layout in `dir` (created if needed).
    pub fn write_oci_layout(&self, dir: &Path) {
        for (rel, bytes) in self.oci_files() {
            let p = dir.join(&rel);
            std::fs::create_dir_all(p.parent().expect("a layout file has a parent"))
                .unwrap_or_else(|e| panic!("create the folder of {}: {e}", p.display()));
            std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        }
    }

    /// Write the image as an OCI archive: a tar of the OCI layout (what `oci-archive:` reads and
    /// `ctr images import` takes).
    pub fn write_oci_archive(&self, path: &Path) {
        let mut b = tar::Builder::new(Vec::new());
        let mut dirs: Vec<String> = Vec::new();
        for (rel, bytes) in self.oci_files() {
            if let Some((d, _)) = rel.rsplit_once('/') {
                let mut acc = String::new();
                for part in d.split('/') {
                    if !acc.is_empty() {
                        acc.push('/');
                    }
                    acc.push_str(part);
                    if !dirs.contains(&acc) {
                        dirs.push(acc.clone());
                        append_dir(&mut b, &acc);
                    }
                }
            }
            append_file(&mut b, &rel, &bytes);
        }
        write_tar(b, path);
    }

    /// Write the image as a `docker save` tarball: `manifest.json`, `repositories`,
    /// `<config hex>.json`, and per layer `<id>/layer.tar`, `<id>/VERSION`, `<id>/json` (the layer
    /// id is the hex of its chain ID, unique in the image).
    pub fn write_docker_archive(&self, path: &Path) {
        let config = self.config_json();
        let config_name = format!("{}.json", sha256_hex(&config));
        let chain = self.chain_ids();
        let ids: Vec<String> = chain
            .iter()
            .map(|c| c.trim_start_matches("sha256:").to_string())
            .collect();
        let mut b = tar::Builder::new(Vec::new());
        for (i, (layer, id)) in self.layers.iter().zip(&ids).enumerate() {
            append_dir(&mut b, id);
            append_file(&mut b, &format!("{id}/VERSION"), b"1.0");
            let mut v1 = json!({ "id": id, "created": "2023-11-14T22:13:20Z", "os": "linux" });
            if i > 0 {
                v1["parent"] = json!(ids[i - 1]);
            }
            append_file(
                &mut b,
                &format!("{id}/json"),
                &serde_json::to_vec(&v1).expect("serialize a JSON value"),
            );
            append_file(&mut b, &format!("{id}/layer.tar"), &layer.tar());
        }
        append_file(&mut b, &config_name, &config);
        let manifest = json!([{
            "Config": config_name,
            "RepoTags": [self.name],
            "Layers": ids.iter().map(|id| format!("{id}/layer.tar")).collect::<Vec<_>>(),
        }]);
        append_file(
            &mut b,
            "manifest.json",
            &serde_json::to_vec(&manifest).expect("serialize a JSON value"),
        );
        let (repo, tag) = self
            .name
            .rsplit_once(':')
            .filter(|(_, t)| !t.contains('/'))
            .unwrap_or((&self.name, "latest"));
        let mut repositories = serde_json::Map::new();
        repositories.insert(
            repo.to_string(),
            json!({ tag: ids.last().expect("an image needs at least one layer") }),
        );
        append_file(
            &mut b,
            "repositories",
            &serde_json::to_vec(&repositories).expect("serialize a JSON value"),
        );
        write_tar(b, path);
    }
}

fn append_dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_mtime(DEFAULT_MTIME);
    h.set_size(0);
    b.append_data(&mut h, format!("{path}/"), std::io::empty())
        .unwrap_or_else(|e| panic!("tar folder {path}: {e}"));
}

fn append_file(b: &mut tar::Builder<Vec<u8>>, path: &str, bytes: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_mtime(DEFAULT_MTIME);
    h.set_size(bytes.len() as u64);
    b.append_data(&mut h, path, bytes)
        .unwrap_or_else(|e| panic!("tar file {path}: {e}"));
}

fn write_tar(b: tar::Builder<Vec<u8>>, path: &Path) {
    let bytes = b.into_inner().expect("finish a tar in memory");
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The host's static busybox (`/bin/busybox`, from Debian's busybox-static), or `None` after
/// [`crate::skip_or_fail`] when it is missing or not a static executable.
pub fn host_busybox() -> Option<Vec<u8>> {
    let p = Path::new("/bin/busybox");
    match std::fs::read(p) {
        // A dynamic busybox would need its libraries in the image.
        Ok(bytes) if !has_interpreter(&bytes) => Some(bytes),
        Ok(_) => {
            crate::skip_or_fail(
                "/bin/busybox is dynamically linked (apt-get install busybox-static)",
            );
            None
        }
        Err(e) => {
            crate::skip_or_fail(&format!(
                "cannot read /bin/busybox: {e} (apt-get install busybox-static)"
            ));
            None
        }
    }
}

/// True if `elf` is a 64-bit little-endian ELF file with a `PT_INTERP` program header (a
/// dynamically linked executable), or not such an ELF file at all.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return true;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return true;
    };
    (0..usize::from(phnum)).any(|i| {
        usize::try_from(phoff)
            .ok()
            .and_then(|off| u32_at(off + i * usize::from(phentsize)))
            .is_none_or(|t| t == PT_INTERP)
    })
}

/// The base layer of [`busybox`]: `/bin/busybox` and its applet links ([`BUSYBOX_APPLETS`]),
/// `/etc/passwd`, `/etc/group`, `/tmp` (1777), `/root` (0700), `/dev`, `/proc`, `/sys`, `/var`.
pub fn busybox_layer(busybox: &[u8]) -> Layer {
    let mut l = Layer::new()
        .dir("bin", 0o755)
        .file("bin/busybox", busybox, 0o755);
    for applet in BUSYBOX_APPLETS {
        l = l.symlink(&format!("bin/{applet}"), "busybox");
    }
    l.dir("etc", 0o755)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n\
              nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            0o644,
        )
        .file(
            "etc/group",
            b"root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n",
            0o644,
        )
        .file("etc/hostname", b"thinpool-test\n", 0o644)
        .dir("tmp", 0o1777)
        .dir("root", 0o700)
        .dir("home", 0o755)
        .dir("home/user", 0o755)
        .owner(1000, 1000)
        .dir("dev", 0o755)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("var", 0o755)
        .dir("var/log", 0o755)
}

/// A one-layer busybox image named `name`, `Cmd` `["/bin/sh"]`; `None` (skipped) without a static
/// `/bin/busybox`.
pub fn busybox(name: &str) -> Option<Image> {
    let bb = host_busybox()?;
    Some(Image::new(name).layer(busybox_layer(&bb)).cmd(&["/bin/sh"]))
}

/// The second layer of [`rich`]: what every later layer works against.
///
/// - `data/`: `hello.txt`, `big.bin` (1 MiB + 3 bytes of a pattern), `empty`, a hardlink pair
///   `data/link-a` = `data/link-b`, `data/setuid` (4755), `data/user-file` (uid/gid 1000,
///   mode 0640), `data/xattr-file` (`user.thinpool.test` = `hello xattr`, `user.binary` = bytes
///   0, 1, 2, 255; no empty value: a PAX record with an empty value deletes the key for umoci but
///   not for containerd)
/// - symlinks: `data/abs-link -> /etc/passwd`, `data/rel-link -> hello.txt`,
///   `data/dangling -> does/not/exist`, `data/dir-link -> ../etc`
/// - `dev/mynull`: character device 1,3 (mode 0666); `data/fifo`: a named pipe
/// - `gone-file`, `gone-dir/{a,sub/b}`: whited out by layer 3
/// - `opaque-dir/{old1,old2,sub/old3}`: made opaque by layer 3
/// - `becomes-dir`: a file that layer 3 replaces by a folder
/// - `home/user/notes` (owned by 1000/1000), `var/lib/app/state` (mtime 1234567890)
pub fn rich_layer2() -> Layer {
    let big: Vec<u8> = (0..(1 << 20) + 3).map(|i: u32| (i % 251) as u8).collect();
    Layer::new()
        .dir("data", 0o755)
        .file("data/hello.txt", b"hello from layer 2\n", 0o644)
        .file("data/big.bin", &big, 0o644)
        .file("data/empty", b"", 0o600)
        .file("data/link-a", b"same inode\n", 0o644)
        .hardlink("data/link-b", "data/link-a")
        .file("data/setuid", b"#!/bin/sh\necho setuid\n", 0o4755)
        .file("data/user-file", b"owned by 1000\n", 0o640)
        .owner(1000, 1000)
        .file("data/xattr-file", b"has xattrs\n", 0o644)
        .xattr("user.thinpool.test", b"hello xattr")
        .xattr("user.binary", &[0, 1, 2, 0xff])
        .symlink("data/abs-link", "/etc/passwd")
        .symlink("data/rel-link", "hello.txt")
        .symlink("data/dangling", "does/not/exist")
        .symlink("data/dir-link", "../etc")
        .fifo("data/fifo", 0o644)
        .char_device("dev/mynull", 1, 3, 0o666)
        .file("gone-file", b"whited out by layer 3\n", 0o644)
        .dir("gone-dir", 0o755)
        .file("gone-dir/a", b"a\n", 0o644)
        .dir("gone-dir/sub", 0o755)
        .file("gone-dir/sub/b", b"b\n", 0o644)
        .dir("opaque-dir", 0o755)
        .file("opaque-dir/old1", b"old1\n", 0o644)
        .file("opaque-dir/old2", b"old2\n", 0o644)
        .dir("opaque-dir/sub", 0o755)
        .file("opaque-dir/sub/old3", b"old3\n", 0o644)
        .file("becomes-dir", b"a file in layer 2\n", 0o644)
        .file("home/user/notes", b"notes\n", 0o600)
        .owner(1000, 1000)
        .dir("var/lib", 0o755)
        .dir("var/lib/app", 0o750)
        .owner(1000, 1000)
        .file("var/lib/app/state", b"state\n", 0o644)
        .mtime(1_234_567_890)
}

/// The third layer of [`rich`]: whiteouts of `gone-file` and `gone-dir`, `opaque-dir` made
/// opaque with new content (`new1`, `sub/new2`, the marker after them in the tar), `becomes-dir`
/// replaced by a folder holding `inside`, `data/hello.txt` rewritten, `data/new-in-3` added with
/// an xattr, `etc/passwd` changed (so `data/abs-link` sees it), `data/empty` chmod 0644.
pub fn rich_layer3() -> Layer {
    Layer::new()
        .whiteout("gone-file")
        .whiteout("gone-dir")
        .dir("opaque-dir", 0o700)
        .file("opaque-dir/new1", b"new in layer 3\n", 0o644)
        .dir("opaque-dir/sub", 0o755)
        .file("opaque-dir/sub/new2", b"new2\n", 0o644)
        .opaque("opaque-dir")
        .dir("becomes-dir", 0o755)
        .file("becomes-dir/inside", b"now a folder\n", 0o644)
        .file("data/hello.txt", b"hello from layer 3\n", 0o644)
        .file("data/new-in-3", b"layer 3\n", 0o644)
        .xattr("user.layer", b"3")
        .file("data/empty", b"", 0o644)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n\
              layer3:x:1001:1001::/:/bin/false\n",
            0o644,
        )
}

/// busybox plus [`rich_layer2`] and [`rich_layer3`]; `None` (skipped) without a static busybox.
pub fn rich(name: &str) -> Option<Image> {
    Some(busybox(name)?.layer(rich_layer2()).layer(rich_layer3()))
}

/// busybox plus `n - 1` small layers; layer `i` (from 2) adds `layers/i` and rewrites
/// `layers/top` (so the top layer's content shows), and every third one deletes the file the
/// previous layer added. `None` (skipped) without a static busybox.
pub fn many_layers(name: &str, n: usize) -> Option<Image> {
    assert!(n >= 1, "an image needs at least one layer");
    let mut img = busybox(name)?;
    for i in 2..=n {
        let mut l = Layer::new()
            .dir("layers", 0o755)
            .file(
                &format!("layers/{i}"),
                format!("layer {i}\n").as_bytes(),
                0o644,
            )
            .file("layers/top", format!("top is {i}\n").as_bytes(), 0o644);
        if i % 3 == 0 && i > 2 {
            l = l.whiteout(&format!("layers/{}", i - 1));
        }
        img = img.layer(l);
    }
    Some(img)
}
