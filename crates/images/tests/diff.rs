//! `diff_layer` against the applier: a lower tree, an upper copy (`cp -a`) with every kind of
//! change a container makes — files added, rewritten, deleted; a directory tree deleted; a
//! directory replaced by a file and a file by a symlink; chmod, chown and xattr changes only;
//! new hardlinks; a new nested directory — diffed, applied onto another copy of lower, and the
//! result must equal upper (except the one documented hardlink case). The tar must hold
//! exactly the expected whiteouts, parents before children, and nothing for unchanged paths;
//! an unchanged copy diffs to an empty layer. Runs as root.

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use common::*;
use tar::EntryType;
use thinpool_images::{DiffStats, apply_layer, diff_layer};

const MIB: u64 = 1 << 20;

fn build_lower(root: &Path) {
    let p = |rel: &str| root.join(rel);
    for dir in [
        "etc",
        "usr/share/doc/pkg/examples",
        "opt/tool",
        "bin",
        "home/u",
        "var/lib",
        "lib",
        "data",
    ] {
        fs::create_dir_all(p(dir)).unwrap();
    }
    fs::write(p("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    fs::write(p("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
    fs::write(p("usr/share/doc/pkg/README"), b"readme\n").unwrap();
    fs::write(p("usr/share/doc/pkg/examples/ex1"), b"example\n").unwrap();
    fs::write(p("usr/share/doc/other"), b"stays\n").unwrap();
    fs::write(p("opt/tool/bin"), b"tool\n").unwrap();
    fs::write(p("bin/sh"), pattern(3000, 1)).unwrap();
    fs::write(p("bin/ls"), pattern(4000, 2)).unwrap();
    fs::write(p("home/u/f"), b"mine\n").unwrap();
    fs::write(p("var/lib/data"), b"data\n").unwrap();
    set_xattr(&p("var/lib/data"), "user.a", b"1");
    set_xattr(&p("var/lib/data"), "trusted.t", b"kept");
    fs::write(p("lib/orig"), pattern(2000, 3)).unwrap();
    write_sparse(
        &p("data/big.img"),
        64 * MIB,
        &[
            (MIB, &pattern(4096, 4)),
            (64 * MIB - 4096, &pattern(4096, 5)),
        ],
    );
    let mut all = Vec::new();
    collect(root, Path::new(""), &mut all);
    for (i, rel) in all.iter().rev().enumerate() {
        set_mtime(
            &root.join(rel),
            1_600_000_000 + i as i64,
            111_111_111 + i as i64,
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

/// The container's changes.
fn change_upper(root: &Path) {
    let p = |rel: &str| root.join(rel);
    // Added.
    fs::write(p("etc/new.conf"), b"new\n").unwrap();
    // Changed content and mtime (same size: only the mtime tells).
    fs::write(p("etc/hosts"), b"127.0.0.1 otherhost\n").unwrap();
    set_mtime(&p("etc/hosts"), 1_700_000_000, 987_654_321);
    // Deleted file, deleted directory with children.
    fs::remove_file(p("etc/passwd")).unwrap();
    fs::remove_dir_all(p("usr/share/doc/pkg")).unwrap();
    // A directory replaced by a file, a file by a symlink.
    fs::remove_dir_all(p("opt/tool")).unwrap();
    fs::write(p("opt/tool"), b"now a file\n").unwrap();
    fs::remove_file(p("bin/sh")).unwrap();
    symlink("busybox", p("bin/sh")).unwrap();
    // chmod only, chown only, xattr only (mtimes kept).
    fs::set_permissions(p("bin/ls"), fs::Permissions::from_mode(0o4711)).unwrap();
    std::os::unix::fs::lchown(p("home/u/f"), Some(1000), Some(1000)).unwrap();
    set_xattr(&p("var/lib/data"), "user.a", b"2");
    // A new hardlink to an unchanged file (sorting before it), and a new file with two links.
    fs::hard_link(p("lib/orig"), p("lib/aaa-link")).unwrap();
    fs::write(p("lib/new1"), b"linked\n").unwrap();
    fs::hard_link(p("lib/new1"), p("lib/new2")).unwrap();
    // A new file in a new nested directory.
    fs::create_dir_all(p("srv/a/b")).unwrap();
    fs::write(p("srv/a/b/c.txt"), b"deep\n").unwrap();
    fs::set_permissions(p("srv/a"), fs::Permissions::from_mode(0o750)).unwrap();
}

fn diff(lower: &Path, upper: &Path) -> (Vec<u8>, DiffStats) {
    let mut tar = Vec::new();
    let stats = diff_layer(lower, upper, &mut tar).unwrap();
    (tar, stats)
}

#[test]
fn diff_applied_onto_lower_gives_upper() {
    if !is_root() {
        return;
    }
    let Some(tmp) = scratch() else {
        return;
    };
    let lower = tmp.path().join("lower");
    fs::create_dir(&lower).unwrap();
    build_lower(&lower);
    let upper = tmp.path().join("upper");
    copy_tree(&lower, &upper);
    assert!(
        compare_trees(&lower, &upper, &[]).is_empty(),
        "cp -a copies exactly"
    );
    change_upper(&upper);

    let (tar_bytes, stats) = diff(&lower, &upper);
    let entries = tar_entries(&tar_bytes);
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    eprintln!(
        "diff: {} tar bytes, {stats:?}\n{}",
        tar_bytes.len(),
        paths.join("\n")
    );

    // Exactly two whiteouts: the file and the directory (one entry for its whole tree).
    let whiteouts: Vec<&str> = paths
        .iter()
        .copied()
        .filter(|p| p.rsplit('/').next().unwrap().starts_with(".wh."))
        .collect();
    assert_eq!(whiteouts, ["etc/.wh.passwd", "usr/share/doc/.wh.pkg"]);
    assert_eq!(stats.deleted, 2);
    // Unchanged objects are not in the layer.
    for unchanged in [
        "data/big.img",
        "lib/orig",
        "usr/share/doc/other",
        "etc/new.conf/",
    ] {
        assert!(!paths.contains(&unchanged), "{unchanged} in {paths:?}");
    }
    let entry = |path: &str| {
        entries
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("{path} not in {paths:?}"))
            .clone()
    };
    assert_eq!(entry("opt/tool").kind, EntryType::Regular, "dir → file");
    assert_eq!(entry("bin/sh").kind, EntryType::Symlink, "file → symlink");
    assert_eq!(entry("bin/ls").kind, EntryType::Regular);
    assert_eq!(entry("home/u/f").kind, EntryType::Regular);
    assert_eq!(entry("var/lib/data").kind, EntryType::Regular);
    assert_eq!(entry("etc/hosts").kind, EntryType::Regular);
    assert_eq!(entry("srv/a/b/c.txt").kind, EntryType::Regular);
    // New path of an unchanged inode: a full file (documented choice).
    assert_eq!(entry("lib/aaa-link").kind, EntryType::Regular);
    assert_eq!(entry("lib/new1").kind, EntryType::Regular);
    let new2 = entry("lib/new2");
    assert_eq!(
        (new2.kind, new2.link.as_deref()),
        (EntryType::Link, Some("lib/new1"))
    );
    // Parents before children, each at most once; the root never.
    for (i, path) in paths.iter().enumerate() {
        assert_eq!(paths.iter().filter(|p| *p == path).count(), 1, "{path}");
        let trimmed = path.trim_end_matches('/');
        if let Some((parent, _)) = trimmed.rsplit_once('/') {
            let parent = format!("{parent}/");
            let at = paths.iter().position(|p| *p == parent);
            assert!(at.is_some_and(|at| at < i), "{parent} not before {path}");
        }
    }
    assert!(!paths.iter().any(|p| *p == "./" || p.is_empty()));
    assert_eq!(stats.entries, entries.len() as u64);

    // Applied onto a copy of lower, the layer gives upper.
    let target = tmp.path().join("target");
    copy_tree(&lower, &target);
    apply_layer(&target, tar_bytes.as_slice()).unwrap();
    let diffs = compare_trees(&upper, &target, &[]);
    // The one documented difference: lib/aaa-link is its own inode in the applied tree.
    assert_eq!(
        diffs.len(),
        1,
        "applied tree differs:\n{}",
        diffs.join("\n")
    );
    assert!(
        diffs[0].starts_with("hardlink groups")
            && diffs[0].contains("aaa-link")
            && diffs[0].contains("lib/orig"),
        "{}",
        diffs[0]
    );
    assert_eq!(
        read(&target.join("lib/aaa-link")),
        read(&upper.join("lib/orig"))
    );

    // Diffing the result against upper gives nothing (the extra inode is not a change).
    let (again, stats) = diff(&target, &upper);
    assert_eq!(stats.entries, 0, "{:?}", tar_entries(&again));
}

#[test]
fn unchanged_tree_gives_an_empty_layer() {
    if !is_root() {
        return;
    }
    let Some(tmp) = scratch() else {
        return;
    };
    let lower = tmp.path().join("lower");
    fs::create_dir(&lower).unwrap();
    build_lower(&lower);
    let upper = tmp.path().join("upper");
    copy_tree(&lower, &upper);
    let (tar_bytes, stats) = diff(&lower, &upper);
    assert_eq!(stats, DiffStats::default());
    assert_eq!(tar_bytes, vec![0u8; 1024], "just the end-of-archive blocks");

    // A touch with the same second but another nanosecond is a change; so is a type change
    // of an empty file into an empty directory.
    let hosts = fs::symlink_metadata(upper.join("etc/hosts")).unwrap();
    set_mtime(
        &upper.join("etc/hosts"),
        std::os::unix::fs::MetadataExt::mtime(&hosts),
        std::os::unix::fs::MetadataExt::mtime_nsec(&hosts) + 1,
    );
    fs::remove_file(upper.join("home/u/f")).unwrap();
    fs::create_dir(upper.join("home/u/f")).unwrap();
    let (tar_bytes, stats) = diff(&lower, &upper);
    let paths: Vec<String> = tar_entries(&tar_bytes)
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(
        paths,
        ["etc/", "etc/hosts", "home/", "home/u/", "home/u/f/"]
    );
    assert_eq!((stats.changed, stats.added, stats.deleted), (3, 0, 0));
}

/// A sparse file changed in upper is written sparse in the layer and restored sparse.
#[test]
fn changed_sparse_file_stays_sparse() {
    if !is_root() {
        return;
    }
    let Some(tmp) = scratch() else {
        return;
    };
    let lower = tmp.path().join("lower");
    fs::create_dir(&lower).unwrap();
    build_lower(&lower);
    let upper = tmp.path().join("upper");
    copy_tree(&lower, &upper);
    let big = upper.join("data/big.img");
    let f = fs::OpenOptions::new().write(true).open(&big).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern(8192, 9), 32 * MIB).unwrap();
    f.set_len(3 * 1024 * MIB).unwrap();
    drop(f);
    let (tar_bytes, stats) = diff(&lower, &upper);
    assert!(tar_bytes.len() < MIB as usize, "{} bytes", tar_bytes.len());
    assert_eq!(stats.changed, 1);
    let target = tmp.path().join("target");
    copy_tree(&lower, &target);
    apply_layer(&target, tar_bytes.as_slice()).unwrap();
    let diffs = compare_trees(&upper, &target, &[]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    assert!(allocated(&target.join("data/big.img")) < 4 * MIB);
}
