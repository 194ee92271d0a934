//! `thinpool pool …` and `thinpool vol …` driven as a user would: every test makes a small pool
//! (256 MiB of data, 16 MiB of metadata, 64 KiB blocks) in a fresh root given with `--root`, and
//! checks what the commands print (`--json` parsed), the files they write (raw images compared
//! byte for byte, holes measured), and the metadata they leave (`thin_check` and
//! `thinpool meta check` clean).
//!
//! Bad input must fail with a non-zero exit status, a message naming what was wrong, and the pool
//! left exactly as it was (every file under the root hashed before and after).
//!
//! Image contents are random; the seed is printed (`THINPOOL_TEST_SEED` replays it).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use md5::Digest as _;
use rand::rngs::StdRng;
use rand::{RngCore as _, SeedableRng as _};
use serde_json::Value;
use thinpool_tests::{
    TempDir, file_size, require_tool, run, run_ok, scratch, test_seed, text, thinpool, tool,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
/// The pools' block size (the default).
const BS: u64 = 64 * KIB;

/// A fresh pool root in a temporary folder.
struct Root {
    _dir: TempDir,
    path: PathBuf,
    files: PathBuf,
}

impl Root {
    /// A root with no pool in it yet (the folder `root` does not exist).
    fn empty() -> Root {
        let dir = scratch();
        let path = dir.path().join("root");
        let files = dir.path().join("files");
        std::fs::create_dir(&files).expect("create the files folder");
        Root {
            _dir: dir,
            path,
            files,
        }
    }

    /// A root with a 256 MiB / 16 MiB pool.
    fn with_pool() -> Root {
        let r = Root::empty();
        r.ok(&[
            "pool",
            "create",
            "--data-size",
            "256M",
            "--metadata-size",
            "16M",
        ]);
        r
    }

    /// A scratch file path beside the root (not inside it).
    fn file(&self, name: &str) -> PathBuf {
        self.files.join(name)
    }

    fn metadata(&self) -> PathBuf {
        self.path.join("pool").join("metadata")
    }

    /// `thinpool --root <root> ARGS`, with no THINPOOL_ROOT from the caller's environment.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = thinpool(["--root".as_ref(), self.path.as_os_str()]);
        c.args(args).env_remove("THINPOOL_ROOT");
        c
    }

    /// Run and require success; stdout.
    fn ok(&self, args: &[&str]) -> String {
        text(&run_ok(&mut self.cmd(args)).stdout)
    }

    /// Run and require failure; stderr. The pool must be unchanged.
    fn fails(&self, args: &[&str]) -> String {
        let before = fingerprint(&self.path);
        let out = run(&mut self.cmd(args));
        expect_failure(&out, args);
        let after = fingerprint(&self.path);
        assert_same_files(
            &before,
            &after,
            &format!("`thinpool {}` failed but", args.join(" ")),
        );
        text(&out.stderr)
    }

    fn status(&self) -> Value {
        json(&self.ok(&["pool", "status", "--json"]))
    }

    fn volumes(&self) -> Vec<Value> {
        match json(&self.ok(&["vol", "ls", "--json"])) {
            Value::Array(v) => v,
            other => panic!("vol ls --json printed {other}, not an array"),
        }
    }

    fn volume(&self, name: &str) -> Value {
        self.volumes()
            .into_iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name} not in `vol ls --json`"))
    }

    fn names(&self) -> Vec<String> {
        self.volumes()
            .iter()
            .map(|v| v["name"].as_str().expect("name is a string").to_string())
            .collect()
    }

    /// Export `vol` to a fresh file and return its bytes (and check its size and sparseness).
    fn export(&self, vol: &str) -> Vec<u8> {
        let out = self.file(&format!("{vol}.export"));
        let _ = std::fs::remove_file(&out);
        self.ok(&["vol", "export", vol, path_str(&out)]);
        let info = self.volume(vol);
        let bytes = std::fs::read(&out).expect("read the export");
        assert_eq!(
            bytes.len() as u64,
            u64_of(&info["size"]),
            "export size of {vol}"
        );
        let mapped = u64_of(&info["mapped_blocks"]) * BS;
        let allocated = std::fs::metadata(&out).expect("stat export").blocks() * 512;
        assert!(
            allocated <= mapped,
            "export of {vol} is not sparse: {allocated} bytes allocated, {mapped} mapped"
        );
        bytes
    }

    /// Both checkers find the pool's metadata clean.
    fn check_metadata(&self) {
        let meta = self.metadata();
        let ours = run(&mut thinpool([
            "meta".as_ref(),
            "check".as_ref(),
            meta.as_os_str(),
        ]));
        assert!(ours.status.success(), "thinpool meta check failed");
        if require_tool("thin_check") {
            let theirs = run(tool("thin_check").arg(&meta));
            assert!(theirs.status.success(), "thin_check failed");
        }
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}):\n{s}"))
}

fn u64_of(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{v} is not an unsigned integer"))
}

/// The one line of `stderr` that starts with `thinpool: error:` (ours) or `error:` (clap's, for
/// bad arguments): log lines and clap's usage hint may surround it.
pub(crate) fn error_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("thinpool: error:") || l.starts_with("error:"))
        .collect();
    assert_eq!(lines.len(), 1, "not one error line in:\n{stderr}");
    lines[0]
}

fn expect_failure(out: &Output, args: &[&str]) {
    assert!(
        !out.status.success(),
        "`thinpool {}` succeeded but should have failed; stdout:\n{}",
        args.join(" "),
        text(&out.stdout)
    );
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "`thinpool {}` did not exit normally: {}",
        args.join(" "),
        out.status
    );
    assert!(
        !out.stderr.is_empty(),
        "`thinpool {}` failed without a message",
        args.join(" ")
    );
}

/// Every file under `dir` (following no links) with its size, allocated bytes, modification
/// time and whole contents ([`content_digest`]); links with their target; other entries
/// (sockets, fifos) by kind. Equal before and after a command: it changed nothing.
pub(crate) fn fingerprint(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let p = e.expect("read_dir entry").path();
        let meta = p.symlink_metadata().expect("lstat");
        if meta.is_dir() {
            out.insert(p.clone(), "dir".to_string());
            out.extend(fingerprint(&p));
        } else if meta.file_type().is_symlink() {
            let t = std::fs::read_link(&p).expect("readlink");
            out.insert(p, format!("link to {}", t.display()));
        } else if meta.is_file() {
            let s = format!(
                "{} allocated, modified {}.{:09}, {}",
                meta.blocks() * 512,
                meta.mtime(),
                meta.mtime_nsec(),
                content_digest(&p)
            );
            out.insert(p, s);
        } else {
            out.insert(p, format!("{:?}", meta.file_type()));
        }
    }
    out
}

/// Panic unless two [`fingerprint`]s are equal, naming each entry that differs:
/// "WHAT changed PATH: BEFORE -> AFTER".
#[track_caller]
pub(crate) fn assert_same_files(
    before: &BTreeMap<PathBuf, String>,
    after: &BTreeMap<PathBuf, String>,
    what: &str,
) {
    let mut changes = Vec::new();
    for p in before
        .keys()
        .chain(after.keys().filter(|p| !before.contains_key(*p)))
    {
        let (b, a) = (before.get(p), after.get(p));
        if b != a {
            let show = |x: Option<&String>| x.map_or("(none)".to_string(), |s| s.clone());
            changes.push(format!(
                "{what} changed {}: {} -> {}",
                p.display(),
                show(b),
                show(a)
            ));
        }
    }
    assert!(changes.is_empty(), "{}", changes.join("\n"));
}

/// The whole contents of a file, cheaply even when it is large and sparse: its size and one MD5
/// over every 64 KiB chunk (at a fixed 64 KiB alignment) that holds a non-zero byte, each with
/// its offset. Two files get the same digest exactly when their bytes are equal (up to MD5
/// collisions). The holes of a data file read as zero chunks, which a `memcmp` skips, so a
/// 256 MiB data file costs a few tens of milliseconds.
pub(crate) fn content_digest(p: &Path) -> String {
    const CHUNK: usize = 64 << 10;
    let mut f = File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let zero = vec![0u8; CHUNK];
    let mut buf = vec![0u8; 16 * CHUNK];
    let mut h = md5::Md5::new();
    let mut size = 0u64;
    loop {
        // Fill the whole buffer (short reads happen) so that chunks keep their alignment.
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("read {}: {e}", p.display()),
            }
        }
        for (i, chunk) in buf[..n].chunks(CHUNK).enumerate() {
            if chunk != &zero[..chunk.len()] {
                h.update((size + (i * CHUNK) as u64).to_le_bytes());
                h.update(chunk);
            }
        }
        size += n as u64;
        if n < buf.len() {
            break;
        }
    }
    format!(
        "{size} bytes, md5 of the non-zero chunks {:x}",
        h.finalize()
    )
}

/// Blocks of `bytes` (pool block size, the last one possibly partial) holding a non-zero byte.
fn nonzero_blocks(bytes: &[u8]) -> u64 {
    bytes
        .chunks(BS as usize)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count() as u64
}

/// What goes where in a test image.
enum Piece {
    /// Random bytes (never a whole zero block).
    Data(u64),
    /// Zeros written out (allocated on disk, not a hole).
    Zeros(u64),
    /// Nothing written: a hole.
    Hole(u64),
    /// One byte `0x5a` at this offset within a zero run of the given length (written out).
    Byte { len: u64, at: u64 },
}

/// Write a sparse image made of `pieces` and return its contents.
fn image(path: &Path, rng: &mut StdRng, pieces: &[Piece]) -> Vec<u8> {
    let mut bytes = Vec::new();
    let f = File::create(path).expect("create image");
    for p in pieces {
        let off = bytes.len() as u64;
        match *p {
            Piece::Data(n) => {
                let mut b = vec![0u8; n as usize];
                rng.fill_bytes(&mut b);
                for c in b.chunks_mut(4096) {
                    c[0] = 0xa5;
                }
                f.write_all_at(&b, off).expect("write image data");
                bytes.extend_from_slice(&b);
            }
            Piece::Zeros(n) => {
                let b = vec![0u8; n as usize];
                f.write_all_at(&b, off).expect("write image zeros");
                bytes.extend_from_slice(&b);
            }
            Piece::Hole(n) => bytes.resize(bytes.len() + n as usize, 0),
            Piece::Byte { len, at } => {
                let mut b = vec![0u8; len as usize];
                b[at as usize] = 0x5a;
                f.write_all_at(&b, off).expect("write image byte");
                bytes.extend_from_slice(&b);
            }
        }
    }
    f.set_len(bytes.len() as u64).expect("size image");
    f.sync_all().expect("sync image");
    bytes
}

/// Image A: data, zero blocks, holes, lone bytes at both ends of blocks, a zero page inside
/// data, and a partial last block — 37 blocks and 1000 bytes.
fn image_a(path: &Path, rng: &mut StdRng) -> Vec<u8> {
    use Piece::*;
    let bytes = image(
        path,
        rng,
        &[
            Data(BS),      // 0
            Zeros(BS),     // 1
            Data(3 * BS),  // 2..=4
            Hole(10 * BS), // 5..=14
            Byte {
                len: BS,
                at: BS - 1,
            }, // 15
            Byte { len: BS, at: 0 }, // 16
            Hole(14 * BS), // 17..=30
            Zeros(BS),     // 31
            Data(2 * BS + 100), // 32, 33, start of 34
            Zeros(4096),   // zero page inside block 34
            Data(3 * BS - 100 - 4096), // rest of 34, 35, 36
            Data(1000),    // partial block 37
        ],
    );
    assert_eq!(bytes.len() as u64, 37 * BS + 1000);
    bytes
}

/// Image B, the same size as A, with data mostly where A has none.
fn image_b(path: &Path, rng: &mut StdRng) -> Vec<u8> {
    use Piece::*;
    let bytes = image(
        path,
        rng,
        &[
            Hole(BS),                   // 0: A had data
            Data(BS),                   // 1: A had zeros
            Zeros(3 * BS),              // 2..=4: A had data
            Data(2 * BS),               // 5, 6: A had a hole
            Hole(8 * BS),               // 7..=14
            Zeros(BS),                  // 15: A had a byte
            Data(BS),                   // 16
            Hole(20 * BS + 500),        // 17..=36 and half of 37
            Byte { len: 500, at: 499 }, // last byte of the partial block
        ],
    );
    assert_eq!(bytes.len() as u64, 37 * BS + 1000);
    bytes
}

/// The image really has holes (or the test would not test hole skipping).
fn assert_has_holes(path: &Path) {
    let m = std::fs::metadata(path).expect("stat image");
    assert!(
        m.blocks() * 512 < m.len(),
        "{} has no holes on this filesystem ({} bytes allocated of {})",
        path.display(),
        m.blocks() * 512,
        m.len()
    );
}

fn assert_same(what: &str, ours: &[u8], expected: &[u8]) {
    assert_eq!(ours.len(), expected.len(), "{what}: sizes differ");
    if let Some(i) = ours.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (block {}): {:#04x} instead of {:#04x}",
            i as u64 / BS,
            ours[i],
            expected[i]
        );
    }
}

#[test]
fn pool_and_volume_lifecycle() {
    let mut rng = StdRng::seed_from_u64(test_seed());
    let r = Root::empty();

    // pool create / status
    let out = r.ok(&[
        "pool",
        "create",
        "--data-size",
        "256M",
        "--metadata-size",
        "16M",
    ]);
    assert!(
        out.contains("256.0 MiB") && out.contains("16.0 MiB"),
        "{out}"
    );
    assert_eq!(file_size(&r.path.join("pool/data")), 256 * MIB);
    assert_eq!(file_size(&r.metadata()), 16 * MIB);
    let s = r.status();
    assert_eq!(u64_of(&s["block_size"]), BS);
    assert_eq!(u64_of(&s["total_data_blocks"]), 256 * MIB / BS);
    assert_eq!(u64_of(&s["used_data_blocks"]), 0);
    assert_eq!(u64_of(&s["total_metadata_blocks"]), 16 * MIB / 4096);
    let used_meta = u64_of(&s["used_metadata_blocks"]);
    assert!(used_meta > 0 && used_meta < 16 * MIB / 4096, "{s}");
    assert_eq!(s["mode"], "rw");
    assert_eq!(u64_of(&s["volumes"]), 0);
    let human = r.ok(&["pool", "status"]);
    for want in ["256.0 MiB", "16.0 MiB", "64.0 KiB", path_str(&r.path)] {
        assert!(
            human.contains(want),
            "`pool status` lacks {want:?}:\n{human}"
        );
    }

    // vol create
    r.ok(&["vol", "create", "base", "--size", "1G"]);
    let base = r.volume("base");
    assert_eq!(u64_of(&base["size"]), GIB);
    assert_eq!(u64_of(&base["mapped_blocks"]), 0);
    assert_eq!(base["kind"], "thin");
    let ls = r.ok(&["vol", "ls"]);
    assert!(ls.contains("base") && ls.contains("1.0 GiB"), "{ls}");

    // vol import into a new volume: created with the file's size, zero blocks and holes skipped
    let a_path = r.file("a.img");
    let a = image_a(&a_path, &mut rng);
    assert_has_holes(&a_path);
    let a_blocks = nonzero_blocks(&a);
    assert_eq!(a_blocks, 1 + 3 + 2 + 5 + 1, "image A's layout");
    r.ok(&["vol", "import", "img", path_str(&a_path)]);
    let img = r.volume("img");
    assert_eq!(u64_of(&img["size"]), a.len() as u64);
    assert_eq!(u64_of(&img["mapped_blocks"]), a_blocks, "{img}");
    assert_eq!(u64_of(&r.status()["used_data_blocks"]), a_blocks);

    // vol export: the same bytes, holes where nothing is mapped
    assert_same("export of img", &r.export("img"), &a);
    r.check_metadata();

    // vol snapshot: shares every block, exports the same
    r.ok(&["vol", "snapshot", "img", "snap"]);
    let snap = r.volume("snap");
    assert_eq!(snap["kind"], "snapshot");
    assert_eq!(snap["parent"], "img");
    assert_eq!(u64_of(&snap["mapped_blocks"]), a_blocks);
    assert_eq!(u64_of(&r.status()["used_data_blocks"]), a_blocks);
    assert_eq!(u64_of(&r.status()["snapshots"]), 1);
    assert_same("export of snap", &r.export("snap"), &a);

    // vol import into the existing origin: it becomes B (zeros where B is zero, even where A
    // had data); the snapshot keeps A
    let b_path = r.file("b.img");
    let b = image_b(&b_path, &mut rng);
    assert_has_holes(&b_path);
    r.ok(&["vol", "import", "img", path_str(&b_path)]);
    assert_eq!(u64_of(&r.volume("img")["size"]), b.len() as u64);
    assert_same("export of img after importing B", &r.export("img"), &b);
    assert_same("export of snap after importing B", &r.export("snap"), &a);
    assert_eq!(
        u64_of(&r.volume("img")["mapped_blocks"]),
        nonzero_blocks(&b)
    );
    r.check_metadata();

    // vol resize: grow (zeros after the old end), shrink (cut)
    let grown = 2 * b.len() as u64 + 12345;
    let out = r.ok(&["vol", "resize", "img", &grown.to_string()]);
    assert!(out.contains("img"), "{out}");
    let mut want = b.clone();
    want.resize(grown as usize, 0);
    assert_same("export of img grown", &r.export("img"), &want);
    r.ok(&["vol", "resize", "img", "200K"]);
    assert_eq!(u64_of(&r.volume("img")["size"]), 200 * KIB);
    assert_same(
        "export of img shrunk",
        &r.export("img"),
        &b[..200 * KIB as usize],
    );
    assert_eq!(
        u64_of(&r.volume("img")["mapped_blocks"]),
        nonzero_blocks(&b[..4 * BS as usize]),
        "shrinking keeps only the blocks up to the new end"
    );
    assert_same("export of snap after resizing img", &r.export("snap"), &a);

    // vol rm
    r.ok(&["vol", "rm", "snap"]);
    assert_eq!(r.names(), ["base", "img"]);
    let img_blocks = u64_of(&r.volume("img")["mapped_blocks"]);
    assert_eq!(u64_of(&r.status()["used_data_blocks"]), img_blocks);
    r.ok(&["vol", "rm", "img"]);
    r.ok(&["vol", "rm", "base"]);
    assert!(r.volumes().is_empty());
    let s = r.status();
    assert_eq!(u64_of(&s["used_data_blocks"]), 0);
    assert_eq!(u64_of(&s["volumes"]), 0);
    r.check_metadata();
}

#[test]
fn import_and_export_at_block_edges_and_other_block_sizes() {
    let mut rng = StdRng::seed_from_u64(test_seed());
    let r = Root::empty();
    // 128 KiB blocks: the import's unit is the pool's block, not 64 KiB.
    r.ok(&[
        "pool",
        "create",
        "--data-size",
        "64MiB",
        "--metadata-size",
        "4096K",
        "--block-size",
        "128K",
    ]);
    let bs = 128 * KIB;
    assert_eq!(u64_of(&r.status()["block_size"]), bs);
    let cases: [(&str, Vec<Piece>); 5] = [
        ("tiny", vec![Piece::Data(1000)]),
        ("one-block", vec![Piece::Data(bs)]),
        ("block-and-a-byte", vec![Piece::Data(bs), Piece::Data(1)]),
        (
            "64k-zero-half",
            // Half a 128 KiB block zero, half data: one block, provisioned once.
            vec![
                Piece::Zeros(64 * KIB),
                Piece::Data(64 * KIB),
                Piece::Hole(bs + 7),
            ],
        ),
        (
            "hole-then-byte",
            vec![
                Piece::Hole(5 * bs),
                Piece::Byte {
                    len: bs / 2,
                    at: bs / 2 - 1,
                },
            ],
        ),
    ];
    for (name, pieces) in cases {
        let p = r.file(&format!("{name}.img"));
        let bytes = image(&p, &mut rng, &pieces);
        r.ok(&["vol", "import", name, path_str(&p)]);
        let info = r.volume(name);
        assert_eq!(u64_of(&info["size"]), bytes.len() as u64, "{name}");
        let want_blocks = bytes
            .chunks(bs as usize)
            .filter(|c| c.iter().any(|&x| x != 0))
            .count() as u64;
        assert_eq!(
            u64_of(&info["mapped_blocks"]),
            want_blocks,
            "{name}: {info}"
        );
        let out = r.file(&format!("{name}.out"));
        r.ok(&["vol", "export", name, path_str(&out)]);
        assert_same(name, &std::fs::read(&out).expect("read export"), &bytes);
    }
    r.check_metadata();
}

#[test]
fn import_skips_holes_without_reading_them() {
    // 64 GiB, two data blocks: reading the holes would take minutes, skipping them takes
    // milliseconds. The volume is far larger than the 256 MiB pool (thin provisioning).
    let mut rng = StdRng::seed_from_u64(test_seed());
    let r = Root::with_pool();
    let len = 64 * GIB - 300;
    let p = r.file("sparse.img");
    let f = File::create(&p).expect("create sparse image");
    f.set_len(len).expect("size sparse image");
    let mut head = vec![0u8; BS as usize];
    rng.fill_bytes(&mut head);
    head[0] = 1;
    let mut tail = vec![0u8; 1000];
    rng.fill_bytes(&mut tail);
    tail[999] = 1;
    f.write_all_at(&head, 0).expect("write head");
    f.write_all_at(&tail, len - 1000).expect("write tail");
    drop(f);

    let start = Instant::now();
    r.ok(&["vol", "import", "big", path_str(&p)]);
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "importing a 64 GiB image with 2 data blocks took {took:?}: holes were read"
    );
    let info = r.volume("big");
    assert_eq!(u64_of(&info["size"]), len);
    assert_eq!(u64_of(&info["mapped_blocks"]), 2, "{info}");

    let out = r.file("sparse.out");
    let start = Instant::now();
    r.ok(&["vol", "export", "big", path_str(&out)]);
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "exporting a 64 GiB volume with 2 mapped blocks took {took:?}"
    );
    let m = std::fs::metadata(&out).expect("stat export");
    assert_eq!(m.len(), len);
    assert!(m.blocks() * 512 <= 2 * BS, "export is not sparse: {m:?}");
    let g = File::open(&out).expect("open export");
    let mut got = vec![0u8; BS as usize];
    g.read_exact_at(&mut got, 0).expect("read head");
    assert_same("head", &got, &head);
    let mut got = vec![0u8; 1000];
    g.read_exact_at(&mut got, len - 1000).expect("read tail");
    assert_same("tail", &got, &tail);
    let mut got = vec![0u8; BS as usize];
    g.read_exact_at(&mut got, 32 * GIB).expect("read middle");
    assert!(got.iter().all(|&x| x == 0), "the middle is not zeros");
    r.check_metadata();
}

#[test]
fn sizes_take_1024_based_units() {
    let r = Root::empty();
    r.ok(&[
        "pool",
        "create",
        "--data-size",
        "262144KiB",
        "--metadata-size",
        "16MB",
        "--block-size",
        "65536",
    ]);
    let s = r.status();
    assert_eq!(u64_of(&s["total_data_blocks"]), 256 * MIB / BS);
    assert_eq!(u64_of(&s["total_metadata_blocks"]), 16 * MIB / 4096);
    for (name, size, bytes) in [
        ("g", "10G", 10 * GIB),
        ("gib", "10GiB", 10 * GIB),
        ("gb", "10GB", 10 * GIB),
        ("m", "512M", 512 * MIB),
        ("k", "64K", 64 * KIB),
        ("t", "2T", 2 * 1024 * GIB),
        ("bytes", "123456789", 123_456_789),
    ] {
        r.ok(&["vol", "create", name, "--size", size]);
        assert_eq!(u64_of(&r.volume(name)["size"]), bytes, "{size}");
    }
    let help = r.ok(&["vol", "create", "--help"]);
    assert!(
        help.contains("1024"),
        "--help does not say units are 1024-based:\n{help}"
    );
}

#[test]
fn malformed_sizes_are_refused() {
    let r = Root::with_pool();
    for bad in ["10Q", "1.5G", "abc", "", "G", "+1", "99999999P", "10 GiBs"] {
        let err = r.fails(&["vol", "create", "x", "--size", bad]);
        assert!(err.contains("invalid"), "size {bad:?}: {err}");
    }
    // `vol resize` also takes +DELTA, so "+1" is a size there; a malformed delta is not.
    for bad in [
        "10Q",
        "1.5G",
        "abc",
        "",
        "G",
        "+",
        "++1G",
        "+1.5G",
        "99999999P",
        "10 GiBs",
    ] {
        let err = r.fails(&["vol", "resize", "x", bad]);
        assert!(err.contains("invalid"), "size {bad:?}: {err}");
    }
    assert!(r.volumes().is_empty());
    let fresh = Root::empty();
    let err = fresh.fails(&["pool", "create", "--data-size", "12X"]);
    assert!(err.contains("12X"), "{err}");
    assert!(
        !fresh.path.exists(),
        "a refused pool create made {}",
        fresh.path.display()
    );
    // Valid syntax, invalid value: refused by the engine, with the value.
    let err = fresh.fails(&[
        "pool",
        "create",
        "--block-size",
        "96K",
        "--data-size",
        "256M",
    ]);
    assert!(err.contains("98304"), "{err}");
    assert!(!fresh.path.join("pool/metadata").exists());
}

#[test]
fn unknown_volumes_are_named_in_the_error() {
    let r = Root::with_pool();
    r.ok(&["vol", "create", "a", "--size", "1M"]);
    let out = r.file("out");
    let img = r.file("img");
    std::fs::write(&img, b"data").expect("write image");
    for args in [
        vec!["vol", "rm", "nope"],
        vec!["vol", "resize", "nope", "2M"],
        vec!["vol", "snapshot", "nope", "s"],
        vec!["vol", "export", "nope", path_str(&out)],
    ] {
        let err = r.fails(&args);
        assert!(err.contains("nope"), "{args:?}: {err}");
        assert!(
            err.contains(path_str(&r.path)),
            "{args:?} does not name the pool: {err}"
        );
    }
    assert!(
        !out.exists(),
        "export of an unknown volume created its file"
    );
    assert_eq!(r.names(), ["a"]);
}

#[test]
fn duplicate_names_are_refused() {
    let r = Root::with_pool();
    r.ok(&["vol", "create", "a", "--size", "1M"]);
    r.ok(&["vol", "create", "b", "--size", "1M"]);
    let err = r.fails(&["vol", "create", "a", "--size", "2M"]);
    assert_eq!(
        error_line(&err),
        format!(
            "thinpool: error: creating volume \"a\" in the pool at {}: a volume named a already \
             exists",
            r.path.display()
        )
    );
    let err = r.fails(&["vol", "snapshot", "a", "b"]);
    assert_eq!(
        error_line(&err),
        format!(
            "thinpool: error: snapshotting volume \"a\" as \"b\" in the pool at {}: a volume \
             named b already exists",
            r.path.display()
        )
    );
    assert_eq!(u64_of(&r.volume("a")["size"]), MIB);
    assert_eq!(r.volume("b")["kind"], "thin");
}

#[test]
fn pool_create_twice_is_refused() {
    let r = Root::with_pool();
    r.ok(&["vol", "create", "keep", "--size", "1M"]);
    let err = r.fails(&[
        "pool",
        "create",
        "--data-size",
        "128M",
        "--metadata-size",
        "8M",
    ]);
    assert!(err.contains(path_str(&r.path)), "{err}");
    assert_eq!(r.names(), ["keep"]);
    assert_eq!(file_size(&r.path.join("pool/data")), 256 * MIB);
    r.check_metadata();
}

#[test]
fn a_pool_held_by_another_process_is_busy() {
    let r = Root::with_pool();
    r.ok(&["vol", "create", "a", "--size", "1M"]);
    // The engine takes flock(2) on <root>/lock; holding it here stands for another process
    // (flock locks belong to the open file, so the thinpool child conflicts with it).
    let lock = File::options()
        .write(true)
        .open(r.path.join("lock"))
        .expect("open the lock file");
    lock.try_lock().expect("nobody holds the pool now");
    for args in [
        vec!["pool", "status"],
        vec!["vol", "ls"],
        vec!["vol", "create", "b", "--size", "1M"],
        vec!["vol", "rm", "a"],
    ] {
        let err = r.fails(&args);
        assert!(err.contains("in use"), "{args:?}: {err}");
        assert!(err.contains(path_str(&r.path)), "{args:?}: {err}");
    }
    lock.unlock().expect("unlock");
    drop(lock);
    r.ok(&["vol", "create", "b", "--size", "1M"]);
    assert_eq!(r.names(), ["a", "b"]);

    // The same with a separate process holding the lock: flock(1) runs `cat`, which holds it
    // until its stdin closes; "held" on stdout says the lock is taken (no sleeping).
    if !require_tool("flock") {
        return;
    }
    let mut holder = tool("flock")
        .arg(r.path.join("lock"))
        .args(["sh", "-c", "echo held; exec cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start flock");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().expect("stdout is piped"))
        .read_line(&mut line)
        .expect("read from flock");
    assert_eq!(line, "held\n");
    let err = r.fails(&["vol", "rm", "a"]);
    assert!(err.contains("in use"), "{err}");
    drop(holder.stdin.take());
    assert!(holder.wait().expect("wait for flock").success());
    r.ok(&["vol", "rm", "a"]);
    assert_eq!(r.names(), ["b"]);
}

#[test]
fn a_missing_metadata_file_is_a_clear_error() {
    let r = Root::with_pool();
    r.ok(&["vol", "create", "a", "--size", "1M"]);
    std::fs::rename(r.metadata(), r.file("metadata.moved")).expect("move metadata away");
    for args in [
        vec!["pool", "status"],
        vec!["vol", "ls"],
        vec!["pool", "grow", "--data-size", "512M"],
    ] {
        let err = r.fails(&args);
        assert!(err.contains("metadata"), "{args:?}: {err}");
        assert!(err.contains(path_str(&r.path)), "{args:?}: {err}");
    }
    assert_eq!(file_size(&r.path.join("pool/data")), 256 * MIB);
    std::fs::rename(r.file("metadata.moved"), r.metadata()).expect("move metadata back");
    assert_eq!(r.names(), ["a"]);

    // A root with no pool at all: refused, and not created.
    let none = Root::empty();
    let err = none.fails(&["vol", "ls"]);
    assert!(
        err.contains("no pool") && err.contains(path_str(&none.path)),
        "{err}"
    );
    assert!(!none.path.exists());
}

#[test]
fn root_comes_from_thinpool_root_when_not_given() {
    let r = Root::empty();
    let env_cmd = |args: &[&str]| {
        let mut c = thinpool(args);
        c.env("THINPOOL_ROOT", &r.path);
        c
    };
    run_ok(&mut env_cmd(&[
        "pool",
        "create",
        "--data-size",
        "256M",
        "--metadata-size",
        "16M",
    ]));
    assert!(r.metadata().exists(), "THINPOOL_ROOT was not used");
    run_ok(&mut env_cmd(&["vol", "create", "e", "--size", "1M"]));
    assert_eq!(r.names(), ["e"]);
    // --root wins over the environment.
    let other = Root::empty();
    let mut c = env_cmd(&["--root", path_str(&other.path), "vol", "ls"]);
    let out = run(&mut c);
    assert!(
        !out.status.success(),
        "--root did not override THINPOOL_ROOT"
    );
    assert!(text(&out.stderr).contains(path_str(&other.path)));
}

#[test]
fn pool_grow_grows_data_and_metadata() {
    let r = Root::with_pool();
    r.ok(&["vol", "create", "a", "--size", "1M"]);
    let out = r.ok(&["pool", "grow", "--data-size", "512M"]);
    assert!(out.contains("512.0 MiB"), "{out}");
    let s = r.status();
    assert_eq!(u64_of(&s["total_data_blocks"]), 512 * MIB / BS);
    assert_eq!(u64_of(&s["total_metadata_blocks"]), 16 * MIB / 4096);
    assert_eq!(file_size(&r.path.join("pool/data")), 512 * MIB);
    r.ok(&["pool", "grow", "--metadata-size", "32M"]);
    let s = r.status();
    assert_eq!(u64_of(&s["total_metadata_blocks"]), 32 * MIB / 4096);
    assert_eq!(file_size(&r.metadata()), 32 * MIB);
    let err = r.fails(&["pool", "grow", "--data-size", "256M"]);
    assert!(err.contains("shrink"), "{err}");
    assert_eq!(r.names(), ["a"]);
    r.check_metadata();
}

#[test]
fn failed_imports_and_exports_leave_the_pool_alone() {
    let r = Root::with_pool();
    r.ok(&["vol", "create", "small", "--size", "64K"]);
    let missing = r.file("missing.img");
    let err = r.fails(&["vol", "import", "new", path_str(&missing)]);
    assert!(err.contains(path_str(&missing)), "{err}");
    let empty = r.file("empty.img");
    File::create(&empty).expect("create empty image");
    let err = r.fails(&["vol", "import", "new", path_str(&empty)]);
    assert!(err.contains("empty"), "{err}");
    let err = r.fails(&["vol", "import", "new", path_str(&r.files)]);
    assert!(err.contains("not a regular file"), "{err}");
    let big = r.file("big.img");
    std::fs::write(&big, vec![1u8; 65 * KIB as usize]).expect("write image");
    let err = r.fails(&["vol", "import", "small", path_str(&big)]);
    assert!(err.contains("resize") && err.contains("small"), "{err}");
    assert_eq!(r.names(), ["small"]);

    // Never onto the pool's own files.
    for own in ["pool/data", "pool/metadata"] {
        let err = r.fails(&["vol", "export", "small", path_str(&r.path.join(own))]);
        assert!(err.contains("refusing"), "{err}");
    }
    r.check_metadata();
}

#[test]
fn a_pool_on_given_files_links_to_them() {
    let mut rng = StdRng::seed_from_u64(test_seed());
    let r = Root::empty();
    let (data, meta) = (r.file("data.dev"), r.file("meta.dev"));
    File::create(&data)
        .and_then(|f| f.set_len(128 * MIB))
        .expect("make the data file");
    File::create(&meta)
        .and_then(|f| f.set_len(8 * MIB))
        .expect("make the metadata file");
    r.ok(&[
        "pool",
        "create",
        "--data",
        path_str(&data),
        "--metadata",
        path_str(&meta),
    ]);
    assert_eq!(
        std::fs::read_link(r.path.join("pool/data")).expect("pool/data is a link"),
        data
    );
    assert_eq!(
        std::fs::read_link(r.metadata()).expect("pool/metadata is a link"),
        meta
    );
    let s = r.status();
    assert_eq!(u64_of(&s["total_data_blocks"]), 128 * MIB / BS);
    assert_eq!(u64_of(&s["total_metadata_blocks"]), 8 * MIB / 4096);
    let human = r.ok(&["pool", "status"]);
    assert!(human.contains(&format!("-> {}", data.display())), "{human}");

    let img = r.file("img");
    let bytes = image(&img, &mut rng, &[Piece::Data(3 * BS + 17)]);
    r.ok(&["vol", "import", "v", path_str(&img)]);
    assert_same("export", &r.export("v"), &bytes);
    r.check_metadata();
    // Never onto the devices behind the links either.
    let err = r.fails(&["vol", "export", "v", path_str(&data)]);
    assert!(err.contains("refusing"), "{err}");

    // A metadata device that is not blank is refused and left as it was.
    let other = Root::empty();
    let used = other.file("used.meta");
    std::fs::write(&used, vec![7u8; 8 * MIB as usize]).expect("write used metadata");
    let out = run(&mut other.cmd(&[
        "pool",
        "create",
        "--data",
        path_str(&data),
        "--metadata",
        path_str(&used),
    ]));
    expect_failure(&out, &["pool", "create"]);
    assert!(
        text(&out.stderr).contains(path_str(&used)),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&used).expect("read"),
        vec![7u8; 8 * MIB as usize]
    );
    assert!(!other.metadata().exists());
}

/// Issue 15: `pool create --data/--metadata` took whatever path it was given. A FIFO blocked
/// the command (or took the pool into a pipe), `/dev/null` swallowed the metadata, a folder
/// failed half-way and left `pool/` behind. Each is now refused before anything is written,
/// with what it is, and the root is left as it was: a create with good arguments then works.
#[test]
fn pool_create_refuses_targets_that_are_not_files_or_block_devices() {
    use std::os::unix::fs::FileTypeExt as _;
    let r = Root::empty();
    let fifo = r.file("fifo");
    run_ok(tool("mkfifo").arg(&fifo));
    let folder = r.file("folder");
    std::fs::create_dir(&folder).unwrap();
    let null_link = r.file("null-link");
    std::os::unix::fs::symlink("/dev/null", &null_link).unwrap();
    let dev_null = PathBuf::from("/dev/null");
    let cases: [(&str, &Path, &str); 7] = [
        ("--data", &fifo, "a FIFO"),
        ("--metadata", &fifo, "a FIFO"),
        ("--data", &dev_null, "a character device"),
        ("--metadata", &dev_null, "a character device"),
        ("--data", &folder, "a directory"),
        ("--metadata", &folder, "a directory"),
        ("--data", &null_link, "a character device"),
    ];
    for (flag, path, kind) in cases {
        let args = [
            "pool",
            "create",
            "--data-size",
            "64M",
            "--metadata-size",
            "4M",
            flag,
            path_str(path),
        ];
        let out = run(&mut r.cmd(&args));
        expect_failure(&out, &args);
        let what = flag.trim_start_matches("--");
        assert_eq!(
            error_line(&text(&out.stderr)),
            format!(
                "thinpool: error: creating a pool at {}: {what} device {} is {kind}: give a \
                 regular file or a block device (or a symlink to one)",
                r.path.display(),
                path.display()
            )
        );
        assert!(!r.path.exists(), "{flag} {path:?}: the root was made");
    }
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert_eq!(std::fs::read_dir(&folder).unwrap().count(), 0);

    // The same file for both.
    let img = r.file("both.img");
    File::create(&img).unwrap().set_len(64 * MIB).unwrap();
    let err = r.fails(&[
        "pool",
        "create",
        "--data",
        path_str(&img),
        "--metadata",
        path_str(&img),
    ]);
    assert!(
        error_line(&err).ends_with(&format!(
            "data device {0} and metadata device {0} are the same file ({0}): give two",
            img.display()
        )),
        "{err}"
    );
    assert!(!r.path.exists());

    // Good arguments on the same root: a symlink to a regular file is a metadata device.
    let meta = r.file("meta.img");
    File::create(&meta).unwrap().set_len(4 * MIB).unwrap();
    let meta_link = r.file("meta-link");
    std::os::unix::fs::symlink(&meta, &meta_link).unwrap();
    r.ok(&[
        "pool",
        "create",
        "--data-size",
        "64M",
        "--metadata",
        path_str(&meta_link),
    ]);
    r.ok(&["vol", "create", "v", "--size", "1M"]);
    assert_eq!(r.names(), ["v"]);
    r.check_metadata();
}
