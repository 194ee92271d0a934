//! Image archives, both directions: reading `docker save` tarballs and OCI image layouts (a tar,
//! possibly gzip'ed or zstd'ed as a whole, or a directory), and writing the archive `image save`
//! produces.
//!
//! # Formats read
//!
//! ```text
//! OCI image layout (image-spec image-layout.md)    docker save (docker/image/spec v1.2)
//!   oci-layout   {"imageLayoutVersion":"1.0.0"}      manifest.json  [{"Config": "<id>.json",
//!   index.json   image index: manifest descriptors                   "RepoTags": ["name:tag"],
//!                (or nested indexes / manifest lists)                "Layers": ["<id>/layer.tar"]}]
//!   blobs/sha256/HEX  configs, manifests, layers     repositories   {"name": {"tag": "<id>"}}
//! ```
//!
//! Docker 25+ writes both in the same tar (its `manifest.json` points into `blobs/sha256/`).
//! When both are present the images come from `index.json` and the names from both, merged by
//! config digest (the image id). Names come from `io.containerd.image.name` (a full reference)
//! when a descriptor has it, else from `org.opencontainers.image.ref.name` as written (a tag for
//! umoci and Docker, a full reference for skopeo's `oci-archive:`), and from `RepoTags`.
//!
//! A nested index (multi-platform image) is descended; descriptors of platform `unknown`
//! (buildkit attestations) and manifests whose blob is absent (containerd exports only the local
//! platform) are skipped there, and if several platforms remain, those of the host's
//! architecture are kept. A manifest named by the top-level `index.json` must be present.
//!
//! # Indexing, not extracting
//!
//! A tar is read once at [`Archive::open`]: each entry's name (normalised: `./blobs/x` is
//! `blobs/x`) is mapped to the offset and size of its data in the file, symlinks and hardlinks
//! (old `docker save` links `<id>/layer.tar` to a shared copy) to their targets. Blobs are then
//! read in place with positioned reads. A compressed tar, or a stream ([`Archive::from_reader`]),
//! is first spooled (decompressed) into an unnamed temporary file, because the manifest may come
//! last.
//!
//! # What is verified
//!
//! At open: every manifest against its descriptor (digest and size), every config against its
//! digest, every layer blob present with the size its descriptor says, every digest of the form
//! `sha256:` + 64 lowercase hex (a digest becomes a path, so nothing else may pass), as many
//! layers as `rootfs.diff_ids`. While a layer is read ([`LayerStream`]): the blob digest (when the
//! archive knows it) and the diff_id of the uncompressed tar; [`LayerStream::finish`] reports a
//! mismatch with the layer index and both digests.
//!
//! # Writing
//!
//! [`write_archive`] writes one tar that both `docker load` / `skopeo docker-archive:` and OCI
//! tools (`oci-archive:`, `ctr images import`) read, as Docker 25+ does: `oci-layout`,
//! `index.json` (one descriptor per image and name, annotated with `io.containerd.image.name` =
//! the full name and `org.opencontainers.image.ref.name` = its tag), `blobs/sha256/` (configs,
//! OCI manifests, uncompressed layers whose digest is their diff_id, each blob once), and
//! `manifest.json` + `repositories` for docker. The output is deterministic: fixed order, owner
//! 0, mtime 0.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek as _, Write};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Media type of an OCI image manifest.
const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index.
const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of a docker manifest list.
const MEDIA_TYPE_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Media type of an OCI image config.
const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of an uncompressed OCI layer.
const MEDIA_TYPE_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// The annotation containerd (and Docker 25+) put the full image name in.
const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The OCI reference-name annotation (a tag, or a full reference for some writers).
const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Manifests, indexes and configs are read whole; refuse anything larger than this.
const MAX_JSON: u64 = 64 << 20;
/// Depth of nested indexes and of link chains followed.
const MAX_DEPTH: usize = 8;

/// What went wrong reading or writing an image archive. Each variant names the archive file and
/// the entry, blob or digest concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// A file could not be opened, read or written.
    #[error("{op} {path} failed")]
    Io {
        /// What was being done (`open`, `read`, `spool`, `write`).
        op: &'static str,
        /// The file, or `archive: entry`.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Neither `manifest.json` nor `index.json` is in the archive.
    #[error("not an image archive: neither manifest.json nor index.json in {archive}")]
    NotAnArchive {
        /// The archive.
        archive: String,
    },
    /// The tar could not be parsed (corrupt header, or cut inside a header).
    #[error("{archive}: corrupt or truncated tar after entry {after:?}")]
    Tar {
        /// The archive.
        archive: String,
        /// The last entry read successfully, or "the start".
        after: String,
        /// The tar reader's error.
        #[source]
        source: io::Error,
    },
    /// An entry's data runs past the end of the file.
    #[error(
        "{archive}: truncated: entry {entry:?} needs {size} bytes at offset {offset} but the file ends at {len}"
    )]
    Truncated {
        /// The archive.
        archive: String,
        /// The entry cut short.
        entry: String,
        /// Where its data starts.
        offset: u64,
        /// Its size as the header says.
        size: u64,
        /// The file's length.
        len: u64,
    },
    /// A blob or file a manifest names is not in the archive.
    #[error("{archive}: {name:?} named by {referenced_by} is missing")]
    MissingBlob {
        /// The archive.
        archive: String,
        /// The blob path or file name looked for.
        name: String,
        /// The manifest or index that names it.
        referenced_by: String,
    },
    /// A digest that is not `sha256:` + 64 lowercase hex digits.
    #[error(
        "{archive}: invalid digest {digest:?} in {location}: expected sha256: and 64 lowercase hex digits"
    )]
    BadDigest {
        /// The archive.
        archive: String,
        /// The digest as written.
        digest: String,
        /// Where it was found.
        location: String,
    },
    /// A blob's bytes do not hash to the digest naming it.
    #[error("{archive}: {what}: digest mismatch: expected {expected}, found {actual}")]
    DigestMismatch {
        /// The archive.
        archive: String,
        /// The blob (config, manifest, file).
        what: String,
        /// The digest the archive names it by.
        expected: String,
        /// The digest of its bytes.
        actual: String,
    },
    /// A blob's size differs from its descriptor's.
    #[error("{archive}: {what}: size mismatch: descriptor says {expected} bytes, found {actual}")]
    SizeMismatch {
        /// The archive.
        archive: String,
        /// The blob.
        what: String,
        /// The descriptor's size.
        expected: u64,
        /// The blob's size.
        actual: u64,
    },
    /// A JSON file (manifest, index, config) could not be parsed.
    #[error("{archive}: {file}: invalid JSON")]
    Json {
        /// The archive.
        archive: String,
        /// The file or blob.
        file: String,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A file of the archive is well-formed JSON but says something we cannot use.
    #[error("{archive}: {file}: {what}")]
    Invalid {
        /// The archive.
        archive: String,
        /// The file or blob.
        file: String,
        /// What is wrong.
        what: String,
    },
    /// A manifest lists a different number of layers than its config's `rootfs.diff_ids`.
    #[error(
        "{archive}: image {image}: {layers} layers but config {config} has {diff_ids} diff_ids"
    )]
    LayerCount {
        /// The archive.
        archive: String,
        /// The image (name or id).
        image: String,
        /// The config digest.
        config: String,
        /// Layers in the manifest.
        layers: usize,
        /// diff_ids in the config.
        diff_ids: usize,
    },
    /// A layer's media type and its bytes disagree on compression, or the media type is no layer.
    #[error(
        "{archive}: image {image} layer {layer}: media type {media_type:?} but the blob is {found}"
    )]
    MediaType {
        /// The archive.
        archive: String,
        /// The image.
        image: String,
        /// The layer index (0 = bottom).
        layer: usize,
        /// The media type of its descriptor.
        media_type: String,
        /// What its first bytes say (`gzip`, `zstd`, `plain tar`).
        found: &'static str,
    },
    /// A layer read back hashes to something else than the archive says.
    #[error(
        "image {image} layer {n} (1 = the bottom): {which} mismatch: expected {expected}, found {actual}",
        n = .layer + 1
    )]
    LayerDigest {
        /// The image.
        image: String,
        /// The layer index (0 = bottom).
        layer: usize,
        /// `blob digest` (compressed bytes) or `diff_id` (uncompressed tar).
        which: &'static str,
        /// What the manifest or config says.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// [`Archive::layer`] was asked for an image or layer that does not exist.
    #[error("{archive}: no layer {layer} in image {image} (the archive has {images} images)")]
    NoSuchLayer {
        /// The archive.
        archive: String,
        /// The image index asked for.
        image: usize,
        /// The layer index asked for.
        layer: usize,
        /// How many images there are.
        images: usize,
    },
    /// [`write_archive`] was given an image it cannot write.
    #[error("cannot save image {image}: {what}")]
    Save {
        /// The image (first name, or index).
        image: String,
        /// What is wrong.
        what: String,
    },
}

// ----------------------------------------------------------------------------------------------
// Public types

/// An opened image archive: its images, and the means to read their layers.
#[derive(Debug)]
pub struct Archive {
    name: String,
    store: Store,
    images: Vec<ArchiveImage>,
}

/// One image found in an archive.
#[derive(Debug, Clone)]
pub struct ArchiveImage {
    /// Repo tags and reference names, deduplicated; empty when the archive names it by id only.
    pub names: Vec<String>,
    /// `sha256:HEX` of the config: the image id.
    pub config_digest: String,
    /// The config JSON, verified against `config_digest`.
    pub config: Vec<u8>,
    /// The config's `rootfs.diff_ids`, bottom layer first.
    pub diff_ids: Vec<String>,
    /// The layers, bottom first; as many as `diff_ids`.
    pub layers: Vec<ArchiveLayer>,
}

/// One layer of an [`ArchiveImage`].
#[derive(Debug, Clone)]
pub struct ArchiveLayer {
    /// The blob digest (of the bytes as stored, maybe compressed) when the archive names it: OCI
    /// layouts and `blobs/sha256/` paths; `None` for old docker `<id>/layer.tar` files.
    pub digest: Option<String>,
    /// The descriptor's media type; for docker `manifest.json` layers, the docker media type
    /// matching the blob's first bytes.
    pub media_type: String,
    /// Size of the blob as stored.
    pub size: u64,
    location: Location,
}

/// The digests of a layer read to its end, returned by [`LayerStream::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDigests {
    /// `sha256:` of the blob as stored (compressed bytes).
    pub blob: String,
    /// `sha256:` of the uncompressed tar.
    pub diff_id: String,
    /// Length of the uncompressed tar.
    pub uncompressed_size: u64,
}

/// An image to write with [`write_archive`].
#[derive(Debug, Clone)]
pub struct SaveImage {
    /// Full names (`registry/repo:tag`); may be empty.
    pub names: Vec<String>,
    /// The config JSON, written as is; its `rootfs.diff_ids` must be the layers' diff_ids.
    pub config: Vec<u8>,
    /// The layers, bottom first.
    pub layers: Vec<SaveLayer>,
}

/// A layer of a [`SaveImage`]: an uncompressed layer tar on disk.
#[derive(Debug, Clone)]
pub struct SaveLayer {
    /// `sha256:` of the file; also its blob digest in the archive.
    pub diff_id: String,
    /// Length of the file.
    pub size: u64,
    /// The uncompressed layer tar.
    pub path: PathBuf,
}

// ----------------------------------------------------------------------------------------------
// Where bytes live

/// The archive's files: a tar indexed by entry name, or an OCI layout directory.
#[derive(Debug)]
enum Store {
    Tar {
        file: File,
        len: u64,
        entries: HashMap<String, TarEntry>,
    },
    Dir {
        root: PathBuf,
    },
}

#[derive(Debug, Clone)]
enum TarEntry {
    Data {
        offset: u64,
        size: u64,
    },
    /// A symlink (target relative to the link's folder) or hardlink (relative to the root),
    /// already resolved to a normalised name.
    Link(String),
}

#[derive(Debug, Clone)]
enum Location {
    Tar { offset: u64, size: u64 },
    File(PathBuf),
}

/// A positioned reader over `size` bytes of a file at `offset`, leaving the file offset alone.
struct Region {
    file: File,
    pos: u64,
    end: u64,
}

impl Read for Region {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = usize::try_from(self.end - self.pos)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive file ended inside a blob",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Normalise a path inside the archive: no leading `/` or `./`, no `.` components, `..` pops
/// (and `None` when it would leave the root).
fn normalise(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

impl Store {
    /// Index a tar file: one pass over its headers.
    fn index_tar(file: File, archive: &str) -> Result<Store, ArchiveError> {
        let len = file
            .metadata()
            .map_err(|source| ArchiveError::Io {
                op: "stat",
                path: archive.to_string(),
                source,
            })?
            .len();
        let mut entries = HashMap::new();
        let mut last = String::from("the start");
        let mut tar = tar::Archive::new(&file);
        let tar_err = |last: &str, source| ArchiveError::Tar {
            archive: archive.to_string(),
            after: last.to_string(),
            source,
        };
        let iter = tar.entries_with_seek().map_err(|e| tar_err(&last, e))?;
        for entry in iter {
            let entry = entry.map_err(|e| tar_err(&last, e))?;
            let raw = entry.path().map_err(|e| tar_err(&last, e))?;
            let raw = raw.to_string_lossy().into_owned();
            let Some(name) = normalise(&raw) else {
                continue;
            };
            let kind = entry.header().entry_type();
            let value = if kind.is_file() || kind == tar::EntryType::Continuous {
                let (offset, size) = (entry.raw_file_position(), entry.size());
                if offset.checked_add(size).is_none_or(|end| end > len) {
                    return Err(ArchiveError::Truncated {
                        archive: archive.to_string(),
                        entry: raw,
                        offset,
                        size,
                        len,
                    });
                }
                Some(TarEntry::Data { offset, size })
            } else if kind.is_symlink() || kind.is_hard_link() {
                let target = entry.link_name().map_err(|e| tar_err(&last, e))?;
                let target = target
                    .map(|t| t.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let base = match (kind.is_symlink(), name.rsplit_once('/')) {
                    (true, Some((dir, _))) if !target.starts_with('/') => format!("{dir}/{target}"),
                    _ => target,
                };
                normalise(&base).map(TarEntry::Link)
            } else {
                None
            };
            if let Some(value) = value {
                entries.insert(name, value);
            }
            last = raw;
        }
        Ok(Store::Tar { file, len, entries })
    }

    /// Where the file `name` (normalised) is, or `None` when it is absent.
    fn locate(&self, name: &str) -> Option<Location> {
        match self {
            Store::Tar { entries, .. } => {
                let mut name = name.to_string();
                for _ in 0..MAX_DEPTH {
                    match entries.get(&name)? {
                        TarEntry::Data { offset, size } => {
                            return Some(Location::Tar {
                                offset: *offset,
                                size: *size,
                            });
                        }
                        TarEntry::Link(target) => name = target.clone(),
                    }
                }
                None
            }
            Store::Dir { root } => {
                let path = root.join(name);
                let meta = std::fs::metadata(&path).ok()?;
                meta.is_file().then_some(Location::File(path))
            }
        }
    }

    fn size(&self, loc: &Location) -> io::Result<u64> {
        match loc {
            Location::Tar { size, .. } => Ok(*size),
            Location::File(path) => Ok(std::fs::metadata(path)?.len()),
        }
    }

    /// A reader of the file at `loc`.
    fn open(&self, loc: &Location) -> io::Result<Region> {
        match (self, loc) {
            (Store::Tar { file, len, .. }, Location::Tar { offset, size }) => {
                if offset + size > *len {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob past the end of the archive",
                    ));
                }
                Ok(Region {
                    file: file.try_clone()?,
                    pos: *offset,
                    end: offset + size,
                })
            }
            (_, Location::File(path)) => {
                let file = File::open(path)?;
                let end = file.metadata()?.len();
                Ok(Region { file, pos: 0, end })
            }
            (Store::Dir { .. }, Location::Tar { .. }) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "tar location in a directory archive",
            )),
        }
    }
}

// ----------------------------------------------------------------------------------------------
// JSON shapes

#[derive(Debug, Clone, Deserialize, Serialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Config {
    rootfs: RootFs,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

// ----------------------------------------------------------------------------------------------
// Digests

/// The hex part of `digest` when it is `sha256:` + 64 lowercase hex digits.
fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex)
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

// ----------------------------------------------------------------------------------------------
// Reading

/// Compression of a blob, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    Plain,
    Gzip,
    Zstd,
}

impl Compression {
    fn sniff(magic: &[u8]) -> Compression {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::Plain
        }
    }

    /// What a layer media type says, or `None` when it is no tar layer.
    fn of_media_type(media_type: &str) -> Option<Compression> {
        let base = media_type.split(';').next().unwrap_or_default();
        if base.ends_with("tar+gzip") || base.ends_with("tar.gzip") {
            Some(Compression::Gzip)
        } else if base.ends_with("tar+zstd") || base.ends_with("tar.zstd") {
            Some(Compression::Zstd)
        } else if base.ends_with(".tar") || base.ends_with(".tar.layer") || base.ends_with("/tar") {
            Some(Compression::Plain)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Compression::Plain => "plain tar",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    fn docker_media_type(self) -> &'static str {
        match self {
            Compression::Plain => "application/vnd.docker.image.rootfs.diff.tar",
            Compression::Gzip => "application/vnd.docker.image.rootfs.diff.tar.gzip",
            Compression::Zstd => "application/vnd.docker.image.rootfs.diff.tar.zstd",
        }
    }
}

/// Read up to 4 bytes from `r`, for the magic.
fn read_magic(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut magic = Vec::with_capacity(4);
    r.take(4).read_to_end(&mut magic)?;
    Ok(magic)
}

/// `r`, decompressed when its first bytes say gzip or zstd.
pub(crate) fn decompressed<'a>(mut r: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let magic = read_magic(&mut r)?;
    let whole = io::Cursor::new(magic.clone()).chain(r);
    Ok(match Compression::sniff(&magic) {
        Compression::Plain => Box::new(BufReader::with_capacity(1 << 20, whole)),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(whole)),
        Compression::Zstd => Box::new(zstd::Decoder::new(whole)?),
    })
}

/// Copy `r` — decompressed when its first bytes say gzip or zstd — into an unnamed file in `dir`.
fn spool(r: impl Read, dir: &Path, name: &str) -> Result<File, ArchiveError> {
    let io_err = |op, source| ArchiveError::Io {
        op,
        path: name.to_string(),
        source,
    };
    let mut r = decompressed(r).map_err(|e| io_err("read", e))?;
    let mut file = tempfile::tempfile_in(dir)
        .map_err(|e| io_err("create a spool file in the folder of", e))?;
    io::copy(&mut r, &mut file).map_err(|e| io_err("spool", e))?;
    // The tar is indexed from the start of the file.
    file.rewind()
        .map_err(|e| io_err("rewind the spool of", e))?;
    Ok(file)
}

/// Reads `index.json`/`manifest.json` and the blobs they name, for [`Archive::open`].
struct Loader<'a> {
    archive: &'a str,
    store: &'a Store,
}

impl Loader<'_> {
    fn invalid(&self, file: &str, what: impl Into<String>) -> ArchiveError {
        ArchiveError::Invalid {
            archive: self.archive.to_string(),
            file: file.to_string(),
            what: what.into(),
        }
    }

    fn check_digest<'d>(&self, digest: &'d str, location: &str) -> Result<&'d str, ArchiveError> {
        digest_hex(digest).ok_or_else(|| ArchiveError::BadDigest {
            archive: self.archive.to_string(),
            digest: digest.to_string(),
            location: location.to_string(),
        })
    }

    fn missing(&self, name: &str, referenced_by: &str) -> ArchiveError {
        ArchiveError::MissingBlob {
            archive: self.archive.to_string(),
            name: name.to_string(),
            referenced_by: referenced_by.to_string(),
        }
    }

    /// The bytes of a small file (JSON), `None` when absent.
    fn read_small(&self, name: &str) -> Result<Option<Vec<u8>>, ArchiveError> {
        let Some(loc) = self.store.locate(name) else {
            return Ok(None);
        };
        let io_err = |source| ArchiveError::Io {
            op: "read",
            path: format!("{}: {name}", self.archive),
            source,
        };
        let size = self.store.size(&loc).map_err(io_err)?;
        if size > MAX_JSON {
            return Err(self.invalid(
                name,
                format!("{size} bytes, more than the {MAX_JSON} a JSON file may have"),
            ));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        self.store
            .open(&loc)
            .and_then(|mut r| r.read_to_end(&mut bytes))
            .map_err(io_err)?;
        Ok(Some(bytes))
    }

    /// A blob named by `desc`, verified against its digest and size.
    fn read_blob(
        &self,
        desc: &Descriptor,
        referenced_by: &str,
    ) -> Result<Option<Vec<u8>>, ArchiveError> {
        let hex = self.check_digest(&desc.digest, referenced_by)?;
        let name = format!("blobs/sha256/{hex}");
        let Some(bytes) = self.read_small(&name)? else {
            return Ok(None);
        };
        if bytes.len() as u64 != desc.size {
            return Err(ArchiveError::SizeMismatch {
                archive: self.archive.to_string(),
                what: name,
                expected: desc.size,
                actual: bytes.len() as u64,
            });
        }
        self.verify(&name, &bytes, &desc.digest)?;
        Ok(Some(bytes))
    }

    fn verify(&self, what: &str, bytes: &[u8], expected: &str) -> Result<(), ArchiveError> {
        let actual = sha256_digest(bytes);
        if actual != expected {
            return Err(ArchiveError::DigestMismatch {
                archive: self.archive.to_string(),
                what: what.to_string(),
                expected: expected.to_string(),
                actual,
            });
        }
        Ok(())
    }

    fn parse<T: serde::de::DeserializeOwned>(
        &self,
        file: &str,
        bytes: &[u8],
    ) -> Result<T, ArchiveError> {
        serde_json::from_slice(bytes).map_err(|source| ArchiveError::Json {
            archive: self.archive.to_string(),
            file: file.to_string(),
            source,
        })
    }

    /// The config's diff_ids, each checked.
    fn diff_ids(&self, file: &str, config: &[u8]) -> Result<Vec<String>, ArchiveError> {
        let config: Config = self.parse(file, config)?;
        for d in &config.rootfs.diff_ids {
            self.check_digest(d, &format!("{file} rootfs.diff_ids"))?;
        }
        Ok(config.rootfs.diff_ids)
    }

    /// The images of `index.json` (or a nested index), with the names its descriptors give.
    fn index_images(
        &self,
        file: &str,
        bytes: &[u8],
        depth: usize,
        out: &mut Vec<ArchiveImage>,
    ) -> Result<(), ArchiveError> {
        let index: Index = self.parse(file, bytes)?;
        let nested = depth > 0;
        let mut found = Vec::new();
        for desc in &index.manifests {
            if nested && desc.platform.as_ref().is_some_and(|p| p.os == "unknown") {
                continue;
            }
            let hex = self.check_digest(&desc.digest, file)?;
            let blob = format!("blobs/sha256/{hex}");
            let Some(bytes) = self.read_blob(desc, file)? else {
                if nested {
                    continue;
                }
                return Err(self.missing(&blob, file));
            };
            let mut images = Vec::new();
            match desc.media_type.as_str() {
                MEDIA_TYPE_OCI_INDEX | MEDIA_TYPE_DOCKER_LIST => {
                    if depth >= MAX_DEPTH {
                        return Err(self.invalid(&blob, "indexes nested too deep"));
                    }
                    self.index_images(&blob, &bytes, depth + 1, &mut images)?;
                }
                _ => {
                    let manifest: Manifest = self.parse(&blob, &bytes)?;
                    if manifest.media_type == MEDIA_TYPE_OCI_INDEX
                        || manifest.media_type == MEDIA_TYPE_DOCKER_LIST
                    {
                        self.index_images(&blob, &bytes, depth + 1, &mut images)?;
                    } else if let Some(image) = self.manifest_image(&blob, &manifest)? {
                        images.push(image);
                    }
                }
            }
            let name = desc
                .annotations
                .get(ANNOTATION_CONTAINERD_NAME)
                .or_else(|| desc.annotations.get(ANNOTATION_REF_NAME));
            for mut image in images {
                if let Some(name) = name {
                    image.names.push(name.clone());
                }
                found.push((desc.platform.clone(), image));
            }
        }
        if nested && found.len() > 1 {
            let arch = host_arch();
            if found
                .iter()
                .any(|(p, _)| p.as_ref().is_some_and(|p| p.architecture == arch))
            {
                found.retain(|(p, _)| p.as_ref().is_some_and(|p| p.architecture == arch));
            }
        }
        for (_, image) in found {
            merge(out, image);
        }
        Ok(())
    }

    /// The image of an OCI or docker schema2 manifest; `None` when its config is no image config
    /// (an artifact).
    fn manifest_image(
        &self,
        blob: &str,
        manifest: &Manifest,
    ) -> Result<Option<ArchiveImage>, ArchiveError> {
        let config_type = manifest.config.media_type.as_str();
        if !config_type.is_empty()
            && config_type != MEDIA_TYPE_OCI_CONFIG
            && config_type != DOCKER_CONFIG
        {
            return Ok(None);
        }
        let config_hex = self.check_digest(&manifest.config.digest, blob)?;
        let config_name = format!("blobs/sha256/{config_hex}");
        let config = self
            .read_blob(&manifest.config, blob)?
            .ok_or_else(|| self.missing(&config_name, blob))?;
        let diff_ids = self.diff_ids(&config_name, &config)?;
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for desc in &manifest.layers {
            let hex = self.check_digest(&desc.digest, blob)?;
            let name = format!("blobs/sha256/{hex}");
            let location = self
                .store
                .locate(&name)
                .ok_or_else(|| self.missing(&name, blob))?;
            let size = self
                .store
                .size(&location)
                .map_err(|source| ArchiveError::Io {
                    op: "stat",
                    path: format!("{}: {name}", self.archive),
                    source,
                })?;
            if size != desc.size {
                return Err(ArchiveError::SizeMismatch {
                    archive: self.archive.to_string(),
                    what: name,
                    expected: desc.size,
                    actual: size,
                });
            }
            layers.push(ArchiveLayer {
                digest: Some(desc.digest.clone()),
                media_type: desc.media_type.clone(),
                size,
                location,
            });
        }
        let image = ArchiveImage {
            names: Vec::new(),
            config_digest: manifest.config.digest.clone(),
            config,
            diff_ids,
            layers,
        };
        self.check_count(&image)?;
        Ok(Some(image))
    }

    fn check_count(&self, image: &ArchiveImage) -> Result<(), ArchiveError> {
        if image.layers.len() != image.diff_ids.len() {
            return Err(ArchiveError::LayerCount {
                archive: self.archive.to_string(),
                image: image.label(),
                config: image.config_digest.clone(),
                layers: image.layers.len(),
                diff_ids: image.diff_ids.len(),
            });
        }
        Ok(())
    }

    /// The images of docker's `manifest.json`.
    fn docker_images(&self, bytes: &[u8], out: &mut Vec<ArchiveImage>) -> Result<(), ArchiveError> {
        const FILE: &str = "manifest.json";
        let entries: Vec<DockerEntry> = self.parse(FILE, bytes)?;
        for entry in entries {
            let config_name =
                normalise(&entry.config).ok_or_else(|| self.missing(&entry.config, FILE))?;
            let config = self
                .read_small(&config_name)?
                .ok_or_else(|| self.missing(&entry.config, FILE))?;
            let config_digest = sha256_digest(&config);
            // The file name is the id (`HEX.json` or `blobs/sha256/HEX`): check it when it is one.
            let file = config_name.rsplit('/').next().unwrap_or_default();
            let named = format!("sha256:{}", file.strip_suffix(".json").unwrap_or(file));
            if digest_hex(&named).is_some() {
                self.verify(&config_name, &config, &named)?;
            }
            let diff_ids = self.diff_ids(&config_name, &config)?;
            let mut layers = Vec::with_capacity(entry.layers.len());
            for path in &entry.layers {
                let name = normalise(path).ok_or_else(|| self.missing(path, FILE))?;
                let location = self
                    .store
                    .locate(&name)
                    .ok_or_else(|| self.missing(path, FILE))?;
                let io_err = |source| ArchiveError::Io {
                    op: "read",
                    path: format!("{}: {name}", self.archive),
                    source,
                };
                let size = self.store.size(&location).map_err(io_err)?;
                let magic = self
                    .store
                    .open(&location)
                    .and_then(|mut r| read_magic(&mut r))
                    .map_err(io_err)?;
                let digest = name
                    .strip_prefix("blobs/sha256/")
                    .map(|hex| format!("sha256:{hex}"))
                    .filter(|d| digest_hex(d).is_some());
                let media_type = Compression::sniff(&magic).docker_media_type().to_string();
                layers.push(ArchiveLayer {
                    digest,
                    media_type,
                    size,
                    location,
                });
            }
            let image = ArchiveImage {
                names: entry.repo_tags.unwrap_or_default(),
                config_digest,
                config,
                diff_ids,
                layers,
            };
            self.check_count(&image)?;
            merge(out, image);
        }
        Ok(())
    }
}

/// Add `image` to `images`, or its names to the image with the same config digest.
fn merge(images: &mut Vec<ArchiveImage>, image: ArchiveImage) {
    let into = match images
        .iter_mut()
        .find(|i| i.config_digest == image.config_digest)
    {
        Some(existing) => existing,
        None => {
            images.push(ArchiveImage {
                names: Vec::new(),
                ..image.clone()
            });
            images.last_mut().expect("an image was just pushed")
        }
    };
    for name in image.names {
        if !into.names.contains(&name) {
            into.names.push(name);
        }
    }
}

/// The host's architecture in GOARCH spelling, as OCI platforms write it.
pub(crate) fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

impl ArchiveImage {
    /// The image for messages: its first name, or its config digest.
    fn label(&self) -> String {
        self.names
            .first()
            .cloned()
            .unwrap_or_else(|| self.config_digest.clone())
    }
}

impl Archive {
    /// Open an image archive: a tar file (plain, or gzip'ed / zstd'ed as a whole — then spooled
    /// decompressed into an unnamed file in the temporary folder) or an OCI layout directory.
    ///
    /// Reads every tar header once, then the index, manifests and configs (verified); layer blobs
    /// are only located and sized. Errors: see [`ArchiveError`]; nothing is written but the spool.
    pub fn open(path: &Path) -> Result<Archive, ArchiveError> {
        let name = path.display().to_string();
        let io_err = |op, source| ArchiveError::Io {
            op,
            path: name.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(|e| io_err("stat", e))?;
        if meta.is_dir() {
            return Archive::load(
                name.clone(),
                Store::Dir {
                    root: path.to_path_buf(),
                },
            );
        }
        let file = File::open(path).map_err(|e| io_err("open", e))?;
        let mut magic = [0u8; 4];
        let n = file.read_at(&mut magic, 0).map_err(|e| io_err("read", e))?;
        let file = match Compression::sniff(&magic[..n]) {
            Compression::Plain => file,
            _ => spool(&file, &std::env::temp_dir(), &name)?,
        };
        let store = Store::index_tar(file, &name)?;
        Archive::load(name, store)
    }

    /// Open an archive arriving on a stream (stdin): it is first copied — decompressed when its
    /// first bytes say gzip or zstd — into an unnamed temporary file in `spool_dir`, since a
    /// tar's manifest may come last; then as [`Archive::open`]. The spool is deleted on drop.
    pub fn from_reader(r: impl Read, spool_dir: &Path) -> Result<Archive, ArchiveError> {
        let name = String::from("<stream>");
        let file = spool(r, spool_dir, &name)?;
        let store = Store::index_tar(file, &name)?;
        Archive::load(name, store)
    }

    fn load(name: String, store: Store) -> Result<Archive, ArchiveError> {
        let loader = Loader {
            archive: &name,
            store: &store,
        };
        let index = loader.read_small("index.json")?;
        let docker = loader.read_small("manifest.json")?;
        if index.is_none() && docker.is_none() {
            return Err(ArchiveError::NotAnArchive { archive: name });
        }
        if let Some(layout) = loader.read_small("oci-layout")? {
            let layout: serde_json::Value = loader.parse("oci-layout", &layout)?;
            let version = layout
                .get("imageLayoutVersion")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            if !version.starts_with("1.") {
                return Err(loader.invalid(
                    "oci-layout",
                    format!("imageLayoutVersion {version:?}, expected 1.x"),
                ));
            }
        }
        let mut images = Vec::new();
        if let Some(index) = &index {
            loader.index_images("index.json", index, 0, &mut images)?;
        }
        if let Some(docker) = &docker {
            loader.docker_images(docker, &mut images)?;
        }
        if images.is_empty() {
            let file = if index.is_some() {
                "index.json"
            } else {
                "manifest.json"
            };
            return Err(loader.invalid(file, "lists no images"));
        }
        tracing::debug!(archive = %name, images = images.len(), "image archive opened");
        Ok(Archive {
            name,
            store,
            images,
        })
    }

    /// The images found, in the order of `index.json`, then those only `manifest.json` lists. O(1).
    pub fn images(&self) -> &[ArchiveImage] {
        &self.images
    }

    /// A reader of layer `layer` (0 = bottom) of image `image`, yielding the uncompressed tar.
    ///
    /// Fails when the indices are out of range, the blob cannot be opened, or its first bytes
    /// disagree with its media type about compression. Read it, then call
    /// [`LayerStream::finish`] to have the digests checked.
    pub fn layer(&self, image: usize, layer: usize) -> Result<LayerStream, ArchiveError> {
        let no_such = || ArchiveError::NoSuchLayer {
            archive: self.name.clone(),
            image,
            layer,
            images: self.images.len(),
        };
        let img = self.images.get(image).ok_or_else(no_such)?;
        let l = img.layers.get(layer).ok_or_else(no_such)?;
        let io_err = |source| ArchiveError::Io {
            op: "read",
            path: format!("{}: image {} layer {layer}", self.name, img.label()),
            source,
        };
        let region = self.store.open(&l.location).map_err(io_err)?;
        let magic = {
            let mut m = [0u8; 4];
            let n = region.file.read_at(&mut m, region.pos).map_err(io_err)?;
            m[..n].to_vec()
        };
        let found = Compression::sniff(&magic);
        let media_type_err = |found: Compression| ArchiveError::MediaType {
            archive: self.name.clone(),
            image: img.label(),
            layer,
            media_type: l.media_type.clone(),
            found: found.name(),
        };
        match Compression::of_media_type(&l.media_type) {
            Some(said) if said == found => {}
            _ => return Err(media_type_err(found)),
        }
        let blob = Hashing::new(region);
        let inner = match found {
            Compression::Plain => Decoded::Plain(blob),
            Compression::Gzip => Decoded::Gzip(flate2::read::MultiGzDecoder::new(blob)),
            Compression::Zstd => Decoded::Zstd(zstd::Decoder::new(blob).map_err(io_err)?),
        };
        Ok(LayerStream {
            inner: Hashing::new(inner),
            image: img.label(),
            layer,
            expected_blob: l.digest.clone(),
            expected_diff_id: img.diff_ids[layer].clone(),
        })
    }
}

// ----------------------------------------------------------------------------------------------
// Layer streams

/// A reader that hashes and counts what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    count: u64,
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Hashing<R> {
        Hashing {
            inner,
            hash: Sha256::new(),
            count: 0,
        }
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

enum Decoded {
    Plain(Hashing<Region>),
    Gzip(flate2::read::MultiGzDecoder<Hashing<Region>>),
    Zstd(zstd::Decoder<'static, BufReader<Hashing<Region>>>),
}

impl Read for Decoded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoded::Plain(r) => r.read(buf),
            Decoded::Gzip(r) => r.read(buf),
            Decoded::Zstd(r) => r.read(buf),
        }
    }
}

impl Decoded {
    /// The blob reader underneath, after the decoder is done.
    fn into_blob(self) -> Hashing<Region> {
        match self {
            Decoded::Plain(r) => r,
            Decoded::Gzip(r) => r.into_inner(),
            Decoded::Zstd(r) => r.finish().into_inner(),
        }
    }
}

/// A layer being read: yields the uncompressed tar while hashing both the blob as stored and the
/// uncompressed bytes. Made by [`Archive::layer`]; call [`LayerStream::finish`] at the end.
pub struct LayerStream {
    inner: Hashing<Decoded>,
    image: String,
    layer: usize,
    expected_blob: Option<String>,
    expected_diff_id: String,
}

impl fmt::Debug for LayerStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerStream")
            .field("image", &self.image)
            .field("layer", &self.layer)
            .field("read", &self.inner.count)
            .finish_non_exhaustive()
    }
}

impl Read for LayerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl LayerStream {
    /// Read what is left (of the uncompressed tar, then of the blob past the compressed stream's
    /// end), then check the blob digest against the descriptor's (when the archive has one) and
    /// the diff_id against the config's. A mismatch is [`ArchiveError::LayerDigest`] with the layer
    /// index and both digests; a read failure (truncated or corrupt compression) is
    /// [`ArchiveError::Io`]. O(rest of the layer).
    pub fn finish(mut self) -> Result<LayerDigests, ArchiveError> {
        let io_err = |image: &str, layer, source| ArchiveError::Io {
            op: "read",
            path: format!("image {image} layer {layer}"),
            source,
        };
        io::copy(&mut self.inner, &mut io::sink())
            .map_err(|e| io_err(&self.image, self.layer, e))?;
        let uncompressed_size = self.inner.count;
        let diff_id = format!("sha256:{}", hex(&self.inner.hash.finalize()));
        let mut blob = self.inner.inner.into_blob();
        io::copy(&mut blob, &mut io::sink()).map_err(|e| io_err(&self.image, self.layer, e))?;
        let blob = format!("sha256:{}", hex(&blob.hash.finalize()));
        let mismatch = |which, expected: &str, actual: &str| ArchiveError::LayerDigest {
            image: self.image.clone(),
            layer: self.layer,
            which,
            expected: expected.to_string(),
            actual: actual.to_string(),
        };
        if let Some(expected) = &self.expected_blob
            && *expected != blob
        {
            return Err(mismatch("blob digest", expected, &blob));
        }
        if self.expected_diff_id != diff_id {
            return Err(mismatch("diff_id", &self.expected_diff_id, &diff_id));
        }
        Ok(LayerDigests {
            blob,
            diff_id,
            uncompressed_size,
        })
    }
}

// ----------------------------------------------------------------------------------------------
// Writing

/// Split a full name into (repository, tag): `reg:5000/a/b:v1` → (`reg:5000/a/b`, `v1`). A name
/// without a tag, or pinned by digest, has no tag.
fn split_tag(name: &str) -> Option<(&str, &str)> {
    if name.contains('@') {
        return None;
    }
    let (repo, tag) = name.rsplit_once(':')?;
    (!tag.contains('/') && !tag.is_empty() && !repo.is_empty()).then_some((repo, tag))
}

fn tar_header(path: &str, size: u64, kind: tar::EntryType) -> Result<tar::Header, ArchiveError> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).map_err(|source| ArchiveError::Io {
        op: "write the header of",
        path: path.to_string(),
        source,
    })?;
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    Ok(h)
}

/// A blob to write: bytes in memory, or a layer file.
enum Content<'a> {
    Bytes(Vec<u8>),
    Layer(&'a SaveLayer),
}

#[derive(Serialize)]
struct OutManifest<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Serialize)]
struct OutIndex<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    manifests: Vec<Descriptor>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct OutDockerEntry {
    config: String,
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

fn descriptor(media_type: &str, digest: String, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_string(),
        digest,
        size,
        platform: None,
        annotations: BTreeMap::new(),
    }
}

/// Write `images` as one tar readable both as a `docker save` archive and as an OCI layout (see
/// the module doc for the files). Layers are copied from their files in 1 MiB pieces, hashed on
/// the way: a file whose length differs from `size` or whose bytes do not hash to `diff_id` is an
/// error ([`ArchiveError::Save`]), as is a config whose `rootfs.diff_ids` are not the layers'.
/// After an error `out` holds a partial tar. O(total size); blocks on I/O.
pub fn write_archive(out: impl Write, images: &[SaveImage]) -> Result<(), ArchiveError> {
    let mut blobs: BTreeMap<String, Content<'_>> = BTreeMap::new();
    let mut index = Vec::new();
    let mut docker = Vec::new();
    let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (i, image) in images.iter().enumerate() {
        let label = image
            .names
            .first()
            .cloned()
            .unwrap_or_else(|| format!("#{i}"));
        let save_err = |what: String| ArchiveError::Save {
            image: label.clone(),
            what,
        };
        let config: Config = serde_json::from_slice(&image.config)
            .map_err(|e| save_err(format!("config is not an image config: {e}")))?;
        let diff_ids: Vec<&str> = image.layers.iter().map(|l| l.diff_id.as_str()).collect();
        if config.rootfs.diff_ids != diff_ids {
            return Err(save_err(format!(
                "config rootfs.diff_ids {:?} are not the layers' {diff_ids:?}",
                config.rootfs.diff_ids
            )));
        }
        let config_digest = sha256_digest(&image.config);
        let config_desc = descriptor(
            MEDIA_TYPE_OCI_CONFIG,
            config_digest.clone(),
            image.config.len() as u64,
        );
        blobs.insert(config_digest.clone(), Content::Bytes(image.config.clone()));
        let mut layers = Vec::new();
        for layer in &image.layers {
            if digest_hex(&layer.diff_id).is_none() {
                return Err(save_err(format!("invalid diff_id {:?}", layer.diff_id)));
            }
            layers.push(descriptor(
                MEDIA_TYPE_OCI_LAYER,
                layer.diff_id.clone(),
                layer.size,
            ));
            blobs
                .entry(layer.diff_id.clone())
                .or_insert(Content::Layer(layer));
        }
        let manifest = OutManifest {
            schema_version: 2,
            media_type: MEDIA_TYPE_OCI_MANIFEST,
            config: config_desc,
            layers,
        };
        let manifest = json(&manifest);
        let manifest_digest = sha256_digest(&manifest);
        let manifest_desc = descriptor(
            MEDIA_TYPE_OCI_MANIFEST,
            manifest_digest.clone(),
            manifest.len() as u64,
        );
        blobs.insert(manifest_digest, Content::Bytes(manifest));
        if image.names.is_empty() {
            index.push(manifest_desc.clone());
        }
        let mut repo_tags = Vec::new();
        for name in &image.names {
            let mut desc = manifest_desc.clone();
            desc.annotations
                .insert(ANNOTATION_CONTAINERD_NAME.to_string(), name.clone());
            if let Some((repo, tag)) = split_tag(name) {
                desc.annotations
                    .insert(ANNOTATION_REF_NAME.to_string(), tag.to_string());
                repo_tags.push(name.clone());
                let top = image
                    .layers
                    .last()
                    .map(|l| l.diff_id.trim_start_matches("sha256:").to_string());
                repositories
                    .entry(repo.to_string())
                    .or_default()
                    .insert(tag.to_string(), top.unwrap_or_default());
            }
            index.push(desc);
        }
        docker.push(OutDockerEntry {
            config: format!(
                "blobs/sha256/{}",
                config_digest.trim_start_matches("sha256:")
            ),
            repo_tags,
            layers: image
                .layers
                .iter()
                .map(|l| format!("blobs/sha256/{}", l.diff_id.trim_start_matches("sha256:")))
                .collect(),
        });
    }
    let index = OutIndex {
        schema_version: 2,
        media_type: MEDIA_TYPE_OCI_INDEX,
        manifests: index,
    };

    let mut tar = tar::Builder::new(out);
    let write_err = |path: &str, source| ArchiveError::Io {
        op: "write",
        path: path.to_string(),
        source,
    };
    for dir in ["blobs/", "blobs/sha256/"] {
        let h = tar_header(dir, 0, tar::EntryType::Directory)?;
        tar.append(&h, io::empty()).map_err(|e| write_err(dir, e))?;
    }
    for (digest, content) in &blobs {
        let path = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        match content {
            Content::Bytes(bytes) => {
                let h = tar_header(&path, bytes.len() as u64, tar::EntryType::Regular)?;
                tar.append(&h, bytes.as_slice())
                    .map_err(|e| write_err(&path, e))?;
            }
            Content::Layer(layer) => append_layer(&mut tar, &path, layer)?,
        }
    }
    let files: [(&str, Vec<u8>); 4] = [
        ("index.json", json(&index)),
        ("manifest.json", json(&docker)),
        ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
        ("repositories", json(&repositories)),
    ];
    for (path, bytes) in files {
        let h = tar_header(path, bytes.len() as u64, tar::EntryType::Regular)?;
        tar.append(&h, bytes.as_slice())
            .map_err(|e| write_err(path, e))?;
    }
    tar.into_inner()
        .and_then(|mut out| out.flush())
        .map_err(|e| write_err("the end of the archive", e))?;
    Ok(())
}

/// Copy one layer file into the tar, checking its length and digest.
fn append_layer<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    layer: &SaveLayer,
) -> Result<(), ArchiveError> {
    let file_name = layer.path.display().to_string();
    let save_err = |what: String| ArchiveError::Save {
        image: format!("layer {}", layer.diff_id),
        what,
    };
    let file = File::open(&layer.path).map_err(|source| ArchiveError::Io {
        op: "open",
        path: file_name.clone(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| ArchiveError::Io {
            op: "stat",
            path: file_name.clone(),
            source,
        })?
        .len();
    if len != layer.size {
        return Err(save_err(format!(
            "{file_name} has {len} bytes, not the {} given",
            layer.size
        )));
    }
    let mut reader = Hashing::new(BufReader::with_capacity(1 << 20, file.take(len)));
    let h = tar_header(path, len, tar::EntryType::Regular)?;
    tar.append(&h, &mut reader)
        .map_err(|source| ArchiveError::Io {
            op: "write",
            path: format!("{path} from {file_name}"),
            source,
        })?;
    let actual = format!("sha256:{}", hex(&reader.hash.finalize()));
    if reader.count != len || actual != layer.diff_id {
        return Err(save_err(format!(
            "{file_name} hashes to {actual}, not its diff_id"
        )));
    }
    Ok(())
}

/// Serialise one of the writer's JSON values (cannot fail: only string-keyed maps).
fn json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("archive JSON has only string keys, so it serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_names() {
        assert_eq!(
            normalise("./blobs/sha256/ab").as_deref(),
            Some("blobs/sha256/ab")
        );
        assert_eq!(normalise("/a//b/./c").as_deref(), Some("a/b/c"));
        assert_eq!(normalise("a/../b").as_deref(), Some("b"));
        assert_eq!(normalise("../b"), None);
    }

    #[test]
    fn digests_and_tags() {
        assert!(digest_hex(&format!("sha256:{}", "a".repeat(64))).is_some());
        assert!(digest_hex("sha256:../../etc").is_none());
        assert!(digest_hex(&format!("sha256:{}", "A".repeat(64))).is_none());
        assert!(digest_hex(&format!("sha512:{}", "a".repeat(64))).is_none());
        assert_eq!(split_tag("reg:5000/a/b:v1"), Some(("reg:5000/a/b", "v1")));
        assert_eq!(split_tag("reg:5000/a/b"), None);
        assert_eq!(split_tag("a@sha256:00"), None);
    }

    #[test]
    fn media_types() {
        assert_eq!(
            Compression::of_media_type("application/vnd.oci.image.layer.v1.tar+gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::of_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::of_media_type(MEDIA_TYPE_OCI_LAYER),
            Some(Compression::Plain)
        );
        assert_eq!(
            Compression::of_media_type("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
        assert_eq!(Compression::of_media_type("application/json"), None);
    }
}
