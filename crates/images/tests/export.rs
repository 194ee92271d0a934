//! `export_tree` against two readers: GNU tar (`-xSp --xattrs`) and our own applier. A tree
//! with every kind of object the tar carries — a 4 GiB sparse file with three data regions
//! (one unaligned, one ending at the very end), files ending in a hole or all hole, hardlinks,
//! symlinks (one with a target longer than the header field), a path longer than 100 bytes,
//! a FIFO, device nodes, owners, setuid and sticky modes, xattrs (`user.*`, `trusted.*`),
//! nanosecond mtimes, a socket and an empty `lost+found` (both skipped) — is exported, and each
//! extraction must equal the original in everything a layer carries, with the big file still
//! sparse on disk and the tar small. Runs as root.

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use common::*;
use rustix::fs::FileType;
use tar::EntryType;
use thinpool_images::{ExportStats, apply_layer, export_tree};

const GIB: u64 = 1 << 30;
const BIG: u64 = 4 * GIB;

/// The long directory name that makes a path longer than the 100-byte header field.
fn long_dir() -> String {
    "d".repeat(70)
}

/// Builds the test tree under `root` (which must exist).
fn build_tree(root: &Path) {
    let p = |rel: &str| root.join(rel);
    for dir in [
        "etc",
        "bin",
        "tmp",
        "home/user",
        "data",
        "lib",
        "run",
        "dev",
        "lost+found",
        &format!("deep/{}", long_dir()),
    ] {
        fs::create_dir_all(p(dir)).unwrap();
    }
    fs::write(p("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    fs::hard_link(p("etc/hosts"), p("etc/hosts.link")).unwrap();
    fs::write(p("lib/a"), pattern(5000, 1)).unwrap();
    fs::hard_link(p("lib/a"), p("lib/z")).unwrap();
    fs::hard_link(p("lib/a"), p("data/a3")).unwrap();
    fs::write(p("lib/libc.so.6"), pattern(100_000, 2)).unwrap();
    symlink("libc.so.6", p("lib/libc.so")).unwrap();
    symlink(
        format!("../{}/target", "t".repeat(150)),
        p("lib/long-target"),
    )
    .unwrap();
    fs::write(
        p(&format!(
            "deep/{}/a-file-with-a-rather-long-name.txt",
            long_dir()
        )),
        b"long path\n",
    )
    .unwrap();
    fs::write(p("bin/su"), b"#!/bin/sh\necho su\n").unwrap();
    fs::set_permissions(p("bin/su"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(p("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(p("home/user/notes"), b"secret\n").unwrap();
    std::os::unix::fs::lchown(p("home/user"), Some(1000), Some(1000)).unwrap();
    std::os::unix::fs::lchown(p("home/user/notes"), Some(1000), Some(100)).unwrap();
    fs::set_permissions(p("home/user/notes"), fs::Permissions::from_mode(0o640)).unwrap();
    set_xattr(&p("home/user/notes"), "user.comment", b"hello");
    set_xattr(&p("home/user/notes"), "trusted.overlay.x", b"y");
    set_xattr(&p("etc"), "user.dir-attr", b"on a directory");
    write_sparse(
        &p("data/big.img"),
        BIG,
        &[
            (0, &pattern(65_536, 3)),
            (GIB + 12_345, &pattern(100_000, 4)),
            (BIG - 10_240, &pattern(10_240, 5)),
        ],
    );
    write_sparse(
        &p("data/trailing-hole.img"),
        1 << 20,
        &[(0, &pattern(8192, 6))],
    );
    write_sparse(&p("data/all-hole.img"), 1 << 20, &[]);
    // 30 data regions: the map needs the header's 4 slots and two extension headers.
    let chunks: Vec<Vec<u8>> = (0..30).map(|i| pattern(4096, 10 + i)).collect();
    let regions: Vec<(u64, &[u8])> = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| (i as u64 * 65_536, c.as_slice()))
        .collect();
    write_sparse(&p("data/fragmented.img"), 30 * 65_536 + 4096, &regions);
    mknod(&p("run/fifo"), FileType::Fifo, 0o640, 0, 0);
    mknod(&p("dev/null"), FileType::CharacterDevice, 0o666, 1, 3);
    mknod(&p("dev/loop9"), FileType::BlockDevice, 0o660, 7, 9);
    std::os::unix::fs::lchown(p("dev/loop9"), Some(0), Some(6)).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(p("run/sock")).unwrap();
    // Nanosecond mtimes everywhere, children before their directories.
    let mut all = Vec::new();
    collect(root, Path::new(""), &mut all);
    for (i, rel) in all.iter().rev().enumerate() {
        set_mtime(
            &root.join(rel),
            1_600_000_000 + i as i64,
            123_456_789 + i as i64,
        );
    }
}

fn collect(root: &Path, rel: &Path, out: &mut Vec<std::path::PathBuf>) {
    let mut names: Vec<_> = fs::read_dir(root.join(rel))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for name in names {
        let rel = rel.join(name);
        out.push(rel.clone());
        if fs::symlink_metadata(root.join(&rel)).unwrap().is_dir() {
            collect(root, &rel, out);
        }
    }
}

fn export(root: &Path) -> (Vec<u8>, ExportStats) {
    let mut tar = Vec::new();
    let stats = export_tree(root, &mut tar).unwrap();
    (tar, stats)
}

#[test]
fn export_round_trips_through_gnu_tar_and_the_applier() {
    if !is_root() {
        return;
    }
    let Some(tmp) = scratch() else {
        return;
    };
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    build_tree(&src);

    let (tar_bytes, stats) = export(&src);
    eprintln!(
        "export: {} tar bytes, {stats:?}; big.img allocated {} bytes",
        tar_bytes.len(),
        allocated(&src.join("data/big.img"))
    );
    // (c) The 4 GiB file costs its data regions, not its apparent size.
    assert!(
        tar_bytes.len() < 1 << 20,
        "tar is {} bytes",
        tar_bytes.len()
    );
    assert_eq!(stats.sparse_files, 4, "{stats:?}");

    // The entry list: sorted, parents first, no root, no socket, no empty lost+found.
    let entries = common::tar_entries(&tar_bytes);
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths.first(), Some(&"bin/"));
    assert!(
        !paths.iter().any(|p| p.starts_with("lost+found")),
        "{paths:?}"
    );
    assert!(!paths.iter().any(|p| p.contains("sock")), "{paths:?}");
    assert!(
        !paths
            .iter()
            .any(|p| p.starts_with("./") || p.starts_with('/'))
    );
    assert_eq!(stats.entries, entries.len() as u64);
    let kind = |path: &str| {
        entries
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("{path} not in {paths:?}"))
            .clone()
    };
    assert_eq!(kind("data/big.img").kind, EntryType::GNUSparse);
    assert_eq!(kind("data/big.img").size, BIG, "realsize as the entry size");
    // Its three regions, widened to whole file-system blocks: 64 KiB + 100 KiB + 10 KiB.
    let stored = kind("data/big.img").stored;
    eprintln!("big.img: {stored} bytes stored for {BIG}");
    assert!(stored < 256 << 10, "{stored} bytes stored for big.img");
    assert_eq!(kind("data/all-hole.img").kind, EntryType::GNUSparse);
    assert_eq!(kind("data/fragmented.img").kind, EntryType::GNUSparse);
    assert_eq!(kind("etc/hosts").kind, EntryType::Regular);
    let link = kind("etc/hosts.link");
    assert_eq!(
        (link.kind, link.link.as_deref()),
        (EntryType::Link, Some("etc/hosts"))
    );
    assert_eq!(
        kind("data/a3").kind,
        EntryType::Regular,
        "first path of lib/a"
    );
    assert_eq!(kind("lib/a").link.as_deref(), Some("data/a3"));
    assert_eq!(kind("lib/z").link.as_deref(), Some("data/a3"));
    assert_eq!(kind("etc/").kind, EntryType::Directory);
    assert_eq!(kind("run/fifo").kind, EntryType::Fifo);
    assert_eq!(kind("dev/null").kind, EntryType::Char);
    assert_eq!(kind("dev/loop9").kind, EntryType::Block);
    let long = format!("deep/{}/a-file-with-a-rather-long-name.txt", long_dir());
    assert!(long.len() > 100);
    assert_eq!(kind(&long).kind, EntryType::Regular);
    assert!(kind("lib/long-target").link.unwrap().len() > 100);
    for (i, path) in paths.iter().enumerate() {
        let trimmed = path.trim_end_matches('/');
        if let Some((parent, _)) = trimmed.rsplit_once('/') {
            let parent = format!("{parent}/");
            let at = paths.iter().position(|p| *p == parent);
            assert!(at.is_some_and(|at| at < i), "{parent} not before {path}");
        }
    }
    let mut sorted = paths.clone();
    sorted.sort_by(|a, b| {
        a.trim_end_matches('/')
            .split('/')
            .cmp(b.trim_end_matches('/').split('/'))
    });
    assert_eq!(paths, sorted, "sorted by name within each directory");
    // Deterministic.
    assert_eq!(export(&src).0, tar_bytes);

    // (a) GNU tar.
    let gnu = tmp.path().join("gnu");
    fs::create_dir(&gnu).unwrap();
    let tar_file = tmp.path().join("export.tar");
    fs::write(&tar_file, &tar_bytes).unwrap();
    let out = Command::new("tar")
        .args(["-xSpf"])
        .arg(&tar_file)
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-C"])
        .arg(&gnu)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "GNU tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "GNU tar warned: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let diffs = compare_trees(&src, &gnu, &["lost+found"]);
    assert!(
        diffs.is_empty(),
        "GNU tar extraction differs:\n{}",
        diffs.join("\n")
    );
    let listing = Command::new("tar")
        .arg("-tvf")
        .arg(&tar_file)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    let big_line = listing
        .lines()
        .find(|l| l.ends_with("data/big.img"))
        .unwrap();
    assert!(big_line.contains(&BIG.to_string()), "{big_line}");
    let gnu_big = allocated(&gnu.join("data/big.img"));
    assert!(
        gnu_big < 4 << 20,
        "GNU tar's big.img allocates {gnu_big} bytes"
    );

    // (b) Our applier.
    let ours = tmp.path().join("ours");
    fs::create_dir(&ours).unwrap();
    let applied = apply_layer(&ours, tar_bytes.as_slice()).unwrap();
    assert_eq!(applied.entries, stats.entries);
    let diffs = compare_trees(&src, &ours, &["lost+found"]);
    assert!(
        diffs.is_empty(),
        "applied tree differs:\n{}",
        diffs.join("\n")
    );
    let our_big = allocated(&ours.join("data/big.img"));
    assert!(
        our_big < 4 << 20,
        "the applier's big.img allocates {our_big} bytes"
    );
    eprintln!(
        "big.img allocated: source, GNU tar, applier: {} {gnu_big} {our_big}",
        allocated(&src.join("data/big.img"))
    );
}

/// A non-empty top-level `lost+found` is content (fsck put it there); `lost+found` below the
/// top is an ordinary name; an empty tree is an empty archive.
#[test]
fn lost_found_skipped_only_when_empty_at_the_top() {
    if !is_root() {
        return;
    }
    let Some(tmp) = scratch() else {
        return;
    };
    let root = tmp.path();
    let (tar_bytes, stats) = export(root);
    assert_eq!((stats.entries, tar_bytes.len()), (0, 1024));
    fs::create_dir(root.join("lost+found")).unwrap();
    fs::create_dir_all(root.join("x/lost+found")).unwrap();
    let paths: Vec<String> = tar_entries(&export(root).0)
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(paths, ["x/", "x/lost+found/"]);
    fs::write(root.join("lost+found/#1234"), b"recovered").unwrap();
    let paths: Vec<String> = tar_entries(&export(root).0)
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(
        paths,
        ["lost+found/", "lost+found/#1234", "x/", "x/lost+found/"]
    );
}

/// A file of more than 8 GiB with data near its end: realsize and offsets beyond the octal
/// fields' range (base-256), restored by GNU tar and the applier.
#[test]
fn sparse_file_beyond_8_gib() {
    if !is_root() {
        return;
    }
    let Some(tmp) = scratch() else {
        return;
    };
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let size = 15 * GIB + 7;
    write_sparse(
        &src.join("disk.img"),
        size,
        &[(4096, &pattern(1 << 20, 7)), (size - 3, b"end")],
    );
    let (tar_bytes, stats) = export(&src);
    eprintln!("15 GiB file: {} tar bytes, {stats:?}", tar_bytes.len());
    assert!(tar_bytes.len() < 2 << 20, "{} bytes", tar_bytes.len());
    assert_eq!(stats.sparse_files, 1);
    let tar_file = tmp.path().join("t.tar");
    fs::write(&tar_file, &tar_bytes).unwrap();
    let gnu = tmp.path().join("gnu");
    fs::create_dir(&gnu).unwrap();
    let out = Command::new("tar")
        .arg("-xSpf")
        .arg(&tar_file)
        .arg("-C")
        .arg(&gnu)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(compare_trees(&src, &gnu, &[]).is_empty());
    let ours = tmp.path().join("ours");
    fs::create_dir(&ours).unwrap();
    let started = std::time::Instant::now();
    apply_layer(&ours, tar_bytes.as_slice()).unwrap();
    eprintln!("applied in {:?}", started.elapsed());
    let diffs = compare_trees(&src, &ours, &[]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}
