//! A pool whose NEEDS_CHECK flag thinpool wrote (issue 11): `thin_check`, the kernel and
//! thinpool treat it alike, before and after the flag is cleared the documented way
//! (`thin_check --clear-needs-check-flag`, format doc section 16.3). The guest clears it with
//! `thin_check` between its two phases, in one boot; thinpool's own clear (`thinpool meta check
//! --clear-needs-check-flag`, `needs_check`'s test) is checked here on the host, on a copy, to
//! give the very bytes `thin_check`'s does, so the kernel's phase 2 holds for it too.
//!
//! The flag is set through thinpool-thin's `ThinMetadata::set_needs_check`, the call the engine
//! makes when a metadata operation fails and the rollback leaves the pool read-only (no
//! user-facing command sets it). Then:
//!
//! - `thin_check` 0.9.0 exits 0 and says nothing about the flag (it is not an error to it);
//! - thinpool: `pool status` shows read-only mode and "Needs check: yes", `vol create` is
//!   refused with a message naming NEEDS_CHECK (that looking commands write nothing is
//!   `private`'s test);
//! - the kernel, in one VM boot: phase 1 activates the pool as it is: `dmsetup status` shows `ro`
//!   and `needs_check`, the imported data reads back, a write to an unprovisioned block fails,
//!   the metadata device is byte-identical after teardown; then `thin_check
//!   --clear-needs-check-flag` gives back exactly the metadata from before the flag; phase 2:
//!   status `rw` and `-`, and a write to a new block succeeds;
//! - afterwards `thin_check` is clean, thin_dump shows the kernel's new mapping, and thinpool
//!   opens the pool read-write: status `rw`, `vol create` works, `vol export` reads the
//!   imported data and the kernel's block.

use std::sync::Arc;

use thinpool_io::{BlockDevice, FileDevice};
use thinpool_tests::kernel::{kernel_run, md5_hex, pattern, zeros_md5};
use thinpool_tests::{
    kernel_scripts_dir, require_tools, run, run_ok, scratch, small_pool, stdout_of, text,
    thinpool_in, tool,
};

const MIB: u64 = 1 << 20;
const K64: u64 = 65536;

/// The value of `KEY value` line `key` in the guest's stdout.
fn field<'a>(said: &'a str, key: &str) -> &'a str {
    said.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {key} line in the guest's output:\n{said}"))
}

/// `dmsetup status` of a thin-pool: `0 LEN thin-pool TRANS META DATA HELD MODE DISCARD
/// NO_SPACE NEEDS_CHECK [WATERMARK]`; returns (MODE, NEEDS_CHECK).
fn mode_and_flag(status: &str) -> (String, String) {
    let f: Vec<&str> = status.split_whitespace().collect();
    assert!(
        f.len() >= 11 && f[2] == "thin-pool",
        "not a thin-pool status: {status}"
    );
    (f[7].to_string(), f[10].to_string())
}

/// The value of `Key: value` in `thinpool pool status`.
fn status_value(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.trim().strip_prefix(key)?.trim().strip_prefix(':'))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key} in pool status:\n{status}"))
}

#[test]
fn needs_check_pool_is_read_only_for_thin_check_the_kernel_and_thinpool() {
    if !require_tools(&["thin_check", "thin_dump"]) {
        return;
    }
    let dir = scratch();
    let root = dir.path().join("root");
    small_pool(&root, &[("v", "16M")]);
    let mapped = 4 * MIB;
    let free_at = 8 * MIB;
    let image = pattern("NCHECK", mapped as usize);
    let img = dir.path().join("image");
    std::fs::write(&img, &image).unwrap();
    run_ok(thinpool_in(&root, &["vol", "import", "v"]).arg(&img));
    let (meta, data) = (root.join("pool/metadata"), root.join("pool/data"));
    run_ok(tool("thin_check").arg(&meta));
    let clean_meta = std::fs::read(&meta).unwrap();

    // Flag it as the engine does after a failed metadata operation.
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&meta).unwrap());
    let mut md = thinpool_thin::ThinMetadata::open(dev).unwrap();
    assert!(!md.needs_check());
    md.set_needs_check().unwrap();
    drop(md);
    let flagged = std::fs::read(&meta).unwrap();
    assert_ne!(flagged, clean_meta, "set_needs_check wrote nothing");
    let changed: Vec<usize> = (0..flagged.len())
        .filter(|&i| flagged[i] != clean_meta[i])
        .collect();
    assert!(
        changed.iter().all(|&i| i < 8),
        "NEEDS_CHECK changed bytes outside the superblock's checksum and flags: {:?}",
        &changed[..changed.len().min(10)]
    );

    // thin_check 0.9.0: not an error, not even mentioned.
    let tc = run(tool("thin_check").arg(&meta));
    let (tc_out, tc_err) = (text(&tc.stdout), text(&tc.stderr));
    eprintln!(
        "thin_check on the flagged metadata: {}\n{tc_out}{tc_err}",
        tc.status
    );
    assert!(tc.status.success(), "thin_check rejects NEEDS_CHECK");
    assert!(
        !(tc_out.clone() + &tc_err).to_lowercase().contains("needs"),
        "thin_check 0.9.0 was seen to say nothing about the flag; now it does:\n{tc_out}{tc_err}"
    );

    // thinpool: read-only, vol create refused, nothing written.
    let st = stdout_of(&mut thinpool_in(&root, &["pool", "status"]));
    assert!(
        status_value(&st, "Mode").starts_with("ro "),
        "pool status:\n{st}"
    );
    assert_eq!(
        status_value(&st, "Needs check"),
        "yes",
        "pool status:\n{st}"
    );
    let out = run(&mut thinpool_in(
        &root,
        &["vol", "create", "w", "--size", "1M"],
    ));
    let err = text(&out.stderr);
    assert!(!out.status.success(), "vol create on a NEEDS_CHECK pool");
    assert!(err.contains("NEEDS_CHECK"), "vol create's refusal: {err}");
    assert!(
        std::fs::read(&meta).unwrap() == flagged,
        "thinpool wrote the flagged metadata"
    );

    // Ours and thin_check's clear, on copies: both give back the metadata from before the flag.
    let (ours, theirs) = (dir.path().join("ours.meta"), dir.path().join("theirs.meta"));
    for f in [&ours, &theirs] {
        std::fs::write(f, &flagged).unwrap();
    }
    run_ok(thinpool_in(&root, &["meta", "check", "--clear-needs-check-flag"]).arg(&ours));
    run_ok(
        tool("thin_check")
            .arg("--clear-needs-check-flag")
            .arg(&theirs),
    );
    for (who, f) in [("thinpool", &ours), ("thin_check", &theirs)] {
        assert!(
            std::fs::read(f).unwrap() == clean_meta,
            "{who}'s clear does not give back the metadata from before the flag"
        );
    }

    // The kernel, both phases in one boot.
    let args: Vec<String> = [128, 0, 16 * MIB / 512, mapped, free_at]
        .iter()
        .map(u64::to_string)
        .collect();
    let script = kernel_scripts_dir().join("needs-check.guest.sh");
    let Some(out) = kernel_run(&meta, &data, &script, &args) else {
        return;
    };
    let said = text(&out.stdout);
    eprintln!("guest stdout:\n{said}guest stderr:\n{}", text(&out.stderr));
    assert!(out.status.success(), "guest failed");
    assert!(
        text(&out.stderr).contains("unable to switch pool to write mode until repaired"),
        "the kernel's log names why the pool is read-only"
    );

    let (mode1, flag1) = mode_and_flag(field(&said, "STATUS1"));
    assert_eq!(
        (mode1.as_str(), flag1.as_str()),
        ("ro", "needs_check"),
        "phase 1 status"
    );
    assert_eq!(
        field(&said, "READ1"),
        md5_hex(&image),
        "imported data, phase 1"
    );
    assert_eq!(
        field(&said, "FREE1"),
        zeros_md5(K64 as usize),
        "unprovisioned block reads zeros"
    );
    assert_eq!(
        field(&said, "WRITE1"),
        "failed",
        "a write needing a new block, read-only"
    );
    assert_eq!(
        field(&said, "META0"),
        md5_hex(&flagged),
        "the guest saw our metadata"
    );
    assert_eq!(
        field(&said, "META1"),
        field(&said, "META0"),
        "the kernel changed the metadata of a NEEDS_CHECK pool"
    );
    assert_eq!(
        field(&said, "CLEAR"),
        "0",
        "thin_check --clear-needs-check-flag"
    );
    assert_eq!(
        field(&said, "META2"),
        md5_hex(&clean_meta),
        "clearing the flag gives back the metadata from before it was set"
    );
    let (mode2, flag2) = mode_and_flag(field(&said, "STATUS2"));
    assert_eq!(
        (mode2.as_str(), flag2.as_str()),
        ("rw", "-"),
        "phase 2 status"
    );
    assert_eq!(
        field(&said, "WRITE2"),
        "ok",
        "a write to a new block, flag cleared"
    );
    let written: Vec<u8> = b"written by the kernel in phase 2\n"
        .iter()
        .copied()
        .cycle()
        .take(K64 as usize)
        .collect();
    assert_eq!(
        field(&said, "NEW2"),
        md5_hex(&written),
        "the kernel's new block"
    );

    // After: thin_check clean, the kernel's mapping in thin_dump, thinpool read-write.
    let tc = run(tool("thin_check").arg(&meta));
    assert!(
        tc.status.success() && !text(&tc.stderr).contains("error"),
        "thin_check after the kernel: {}\n{}{}",
        tc.status,
        text(&tc.stdout),
        text(&tc.stderr)
    );
    let dump = stdout_of(tool("thin_dump").arg(&meta));
    assert!(
        dump.contains(&format!("origin_block=\"{}\"", free_at / K64))
            || dump.contains(&format!("origin_begin=\"{}\"", free_at / K64)),
        "the kernel's block {} of device 0 is mapped:\n{dump}",
        free_at / K64
    );
    assert!(dump.contains("flags=\"0\""), "flag cleared:\n{dump}");
    let st = stdout_of(&mut thinpool_in(&root, &["pool", "status"]));
    assert!(
        status_value(&st, "Mode").starts_with("rw "),
        "pool status:\n{st}"
    );
    assert_eq!(status_value(&st, "Needs check"), "no", "pool status:\n{st}");
    run_ok(&mut thinpool_in(
        &root,
        &["vol", "create", "w", "--size", "1M"],
    ));
    let exported = dir.path().join("v.out");
    run_ok(thinpool_in(&root, &["vol", "export", "v"]).arg(&exported));
    let v = std::fs::read(&exported).unwrap();
    assert_eq!(v.len() as u64, 16 * MIB);
    assert!(v[..mapped as usize] == image[..], "the imported data");
    assert_eq!(
        md5_hex(&v[free_at as usize..(free_at + K64) as usize]),
        md5_hex(&written),
        "the kernel's block as thinpool reads it"
    );
    run_ok(tool("thin_check").arg(&meta));
}
