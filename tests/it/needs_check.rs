//! Clearing NEEDS_CHECK with thinpool's own commands (issue 11): `thinpool meta check
//! --clear-needs-check-flag METADATA` and, for a pool, `thinpool pool check
//! --clear-needs-check-flag`, both like `thin_check --clear-needs-check-flag`.
//!
//! The flag is set through thinpool-thin's `ThinMetadata::set_needs_check`, the call the engine
//! makes when a pool fails in a way the abort cannot undo. Oracles: `thin_check` (clean after),
//! `thin_dump` (`flags="0"`), `thin_check --clear-needs-check-flag` on a copy (the same bytes),
//! and the metadata from before the flag was set (byte-identical after clearing: only the
//! superblock's checksum and flags word, bytes 0..8, ever differ). A check that finds damage
//! leaves the flag and every byte; with a daemon holding the pool clearing is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use thinpool_daemon::{Daemon, DaemonOptions};
use thinpool_io::{BlockDevice, FileDevice};
use thinpool_tests::{
    require_tools, run, run_ok, scratch, small_pool, stdout_of, text, thinpool_in, tool,
};
use thinpool_thin::superblock::Superblock;

/// A pool in `<dir>/root` with a 16 MiB volume `v` holding 3 MiB of data; returns the root.
fn pool(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    small_pool(&root, &[("v", "16M")]);
    let img = dir.join("image");
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&img, data).unwrap();
    run_ok(thinpool_in(&root, &["vol", "import", "v"]).arg(&img));
    root
}

/// Set NEEDS_CHECK as the engine does; returns the flagged bytes, checked to differ from
/// `clean` in the superblock's checksum and flags only.
fn flag(meta: &Path, clean: &[u8]) -> Vec<u8> {
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(meta).unwrap());
    let mut md = thinpool_thin::ThinMetadata::open(dev).unwrap();
    assert!(!md.needs_check(), "flagged already");
    md.set_needs_check().unwrap();
    drop(md);
    let flagged = std::fs::read(meta).unwrap();
    assert_eq!(flagged.len(), clean.len());
    let changed: Vec<usize> = (0..clean.len())
        .filter(|&i| flagged[i] != clean[i])
        .collect();
    assert!(
        !changed.is_empty() && changed.iter().all(|&i| i < 8),
        "set_needs_check changed bytes {:?}",
        &changed[..changed.len().min(10)]
    );
    assert_eq!(flags(&flagged), 1);
    flagged
}

/// The superblock's flags word.
fn flags(meta: &[u8]) -> u32 {
    Superblock::decode(&meta[..4096]).flags
}

/// `thin_check --clear-needs-check-flag` on a copy of `flagged`: the bytes it leaves.
fn thin_check_clear(dir: &Path, flagged: &[u8]) -> Vec<u8> {
    let copy = dir.join("thin_check-copy.meta");
    std::fs::write(&copy, flagged).unwrap();
    run_ok(
        tool("thin_check")
            .arg("--clear-needs-check-flag")
            .arg(&copy),
    );
    std::fs::read(&copy).unwrap()
}

/// The value of `Key: value` in `thinpool pool status`.
fn status_value(root: &Path, key: &str) -> String {
    let status = stdout_of(&mut thinpool_in(root, &["pool", "status"]));
    status
        .lines()
        .find_map(|l| l.trim().strip_prefix(key)?.trim().strip_prefix(':'))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key} in pool status:\n{status}"))
}

/// `vol create NAME`: refused on a flagged pool with a message naming NEEDS_CHECK.
fn assert_create_refused(root: &Path, name: &str) {
    let out = run(&mut thinpool_in(
        root,
        &["vol", "create", name, "--size", "1M"],
    ));
    assert!(!out.status.success(), "vol create on a NEEDS_CHECK pool");
    let err = text(&out.stderr);
    assert!(err.contains("NEEDS_CHECK"), "vol create's refusal: {err}");
}

/// Clean by thin_check, `flags="0"` in thin_dump, byte-identical to `clean`, read-write again.
fn assert_cleared(root: &Path, meta: &Path, clean: &[u8], theirs: &[u8], how: &str) {
    let now = std::fs::read(meta).unwrap();
    assert!(
        now == clean,
        "{how}: the metadata differs from before the flag was set"
    );
    assert!(now == theirs, "{how}: thin_check's clear gives other bytes");
    let tc = run(tool("thin_check").arg(meta));
    assert!(
        tc.status.success(),
        "{how}: thin_check: {}",
        text(&tc.stderr)
    );
    let dump = stdout_of(tool("thin_dump").arg(meta));
    assert!(dump.contains(" flags=\"0\""), "{how}: thin_dump:\n{dump}");
    assert_eq!(status_value(root, "Needs check"), "no", "{how}");
    assert!(status_value(root, "Mode").starts_with("rw "), "{how}");
}

#[test]
fn clear_needs_check_flag_after_a_clean_check_gives_the_pool_back() {
    if !require_tools(&["thin_check", "thin_dump"]) {
        return;
    }
    let dir = scratch();
    let root = pool(dir.path());
    let meta = root.join("pool/metadata");
    let meta_arg = meta.to_str().unwrap();
    run_ok(tool("thin_check").arg(&meta));
    let clean = std::fs::read(&meta).unwrap();

    let flagged = flag(&meta, &clean);
    let theirs = thin_check_clear(dir.path(), &flagged);
    assert!(
        theirs == clean,
        "thin_check's clear differs from the pre-flag metadata"
    );
    assert_create_refused(&root, "w");
    assert_eq!(status_value(&root, "Needs check"), "yes");

    // Without the option: a clean check that writes nothing and says how to clear.
    for args in [&["meta", "check", meta_arg][..], &["pool", "check"]] {
        let out = run(&mut thinpool_in(&root, args));
        let err = text(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("--clear-needs-check-flag"),
            "{args:?} does not say how to clear the flag: {err}"
        );
        assert!(
            std::fs::read(&meta).unwrap() == flagged,
            "{args:?} wrote without --clear-needs-check-flag"
        );
    }
    assert_create_refused(&root, "w");

    // meta check --clear-needs-check-flag.
    let out = run(&mut thinpool_in(
        &root,
        &["meta", "check", "--clear-needs-check-flag", meta_arg],
    ));
    let err = text(&out.stderr);
    assert!(out.status.success(), "meta check --clear: {err}");
    assert!(
        err.contains("NEEDS_CHECK cleared"),
        "meta check --clear: {err}"
    );
    assert_cleared(&root, &meta, &clean, &theirs, "meta check --clear");
    // Again: nothing to clear, nothing written.
    let out = run(&mut thinpool_in(
        &root,
        &["meta", "check", "--clear-needs-check-flag", meta_arg],
    ));
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("was not set"));
    assert!(std::fs::read(&meta).unwrap() == clean, "second clear wrote");

    // pool check --clear-needs-check-flag, on the same pool flagged again.
    let flagged = flag(&meta, &clean);
    assert_create_refused(&root, "w");
    let out = run(&mut thinpool_in(
        &root,
        &["pool", "check", "--clear-needs-check-flag"],
    ));
    let err = text(&out.stderr);
    assert!(out.status.success(), "pool check --clear: {err}");
    assert!(
        err.contains("NEEDS_CHECK cleared"),
        "pool check --clear: {err}"
    );
    assert_ne!(std::fs::read(&meta).unwrap(), flagged);
    assert_cleared(&root, &meta, &clean, &theirs, "pool check --clear");

    // Read-write again: a volume can be made, and the metadata stays clean.
    run_ok(&mut thinpool_in(
        &root,
        &["vol", "create", "w", "--size", "1M"],
    ));
    run_ok(tool("thin_check").arg(&meta));
    assert_eq!(flags(&std::fs::read(&meta).unwrap()), 0);
}

#[test]
fn damaged_metadata_keeps_needs_check() {
    if !require_tools(&["thin_check"]) {
        return;
    }
    let dir = scratch();
    let root = pool(dir.path());
    let meta = root.join("pool/metadata");
    let clean = std::fs::read(&meta).unwrap();
    let flagged = flag(&meta, &clean);
    // Break the checksum of the top-level mapping tree's root node.
    let b = Superblock::decode(&flagged[..4096]).mapping_root as usize;
    assert!(b > 0 && (b + 1) * 4096 <= flagged.len());
    let mut broken = flagged.clone();
    broken[b * 4096 + 200] ^= 0x5A;
    std::fs::write(&meta, &broken).unwrap();
    let tc = run(tool("thin_check").arg(&meta));
    assert!(!tc.status.success(), "thin_check accepts the broken node");

    let meta_arg = meta.to_str().unwrap();
    for args in [
        &["meta", "check", "--clear-needs-check-flag", meta_arg][..],
        &["pool", "check", "--clear-needs-check-flag"],
    ] {
        let out = run(&mut thinpool_in(&root, args));
        let (said, err) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{args:?}: {said}{err}");
        assert!(
            said.contains(&format!("metadata block {b}")),
            "{args:?} does not name the broken block {b}: {said}"
        );
        assert!(
            err.contains("NEEDS_CHECK stays set"),
            "{args:?} does not say the flag stays: {err}"
        );
        let now = std::fs::read(&meta).unwrap();
        assert!(now == broken, "{args:?} wrote to damaged metadata");
        assert_eq!(flags(&now), 1);
    }
}

#[test]
fn clearing_is_refused_while_a_daemon_holds_the_pool() {
    if !require_tools(&["thin_check"]) {
        return;
    }
    let dir = scratch();
    let root = pool(dir.path());
    let meta = root.join("pool/metadata");
    let clean = std::fs::read(&meta).unwrap();
    let flagged = flag(&meta, &clean);
    let daemon = Daemon::start(&root, DaemonOptions::default()).expect("start the daemon");
    assert!(
        daemon.pool().status().unwrap().needs_check,
        "the daemon's pool is not flagged"
    );
    let out = run(&mut thinpool_in(
        &root,
        &["pool", "check", "--clear-needs-check-flag"],
    ));
    let err = text(&out.stderr);
    assert!(!out.status.success(), "pool check --clear with a daemon");
    assert!(
        err.contains("stop the daemon") && err.contains(&format!("pid {}", std::process::id())),
        "the refusal: {err}"
    );
    assert!(
        std::fs::read(&meta).unwrap() == flagged,
        "written with a daemon"
    );
    daemon.stop().expect("stop the daemon");
    assert!(std::fs::read(&meta).unwrap() == flagged, "the daemon wrote");
    // Stopped: the same command clears.
    run_ok(&mut thinpool_in(
        &root,
        &["pool", "check", "--clear-needs-check-flag"],
    ));
    assert!(std::fs::read(&meta).unwrap() == clean);
    run_ok(tool("thin_check").arg(&meta));
}
