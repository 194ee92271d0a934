//! `thinpool up` driven as a user would: a fresh root, the daemon started by the real binary,
//! volumes created and snapshotted through the control socket, data written and read through
//! NBD with qemu-io and fio, the pool grown while fio writes, the numbers checked in `--json`,
//! volumes removed, SIGTERM, and `thin_check` on what is left. Then the bad inputs: each must
//! fail with a clear message, a non-zero exit status, and change nothing.

use std::process::Stdio;
use std::time::Duration;

use crate::cli_pool::{assert_same_files, error_line, fingerprint};
use serde_json::Value;
use thinpool_tests::daemon::Up;
use thinpool_tests::{require_tools, run, run_ok, scratch, text, tool};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 << 10;
/// What the checksum of block 0 of the foreign metadata in
/// `bad_input_fails_clearly_and_changes_nothing` should be: CRC-32C of its bytes 4..4096, xor
/// `0xffffffff` and the superblock salt 160774 (worked out once, outside thinpool's code).
const FOREIGN_CSUM: u32 = 0xb336_ba63;

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri);
    let out = run_ok(&mut c);
    let s = text(&out.stdout);
    assert!(
        !s.contains("Pattern verification failed") && !s.contains("failed"),
        "qemu-io {cmds:?}: {s}"
    );
    s
}

fn volume<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .expect("vol ls --json is an array")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name} in {list}"))
}

#[test]
fn up_create_write_snapshot_grow_while_writing_remove_stop() {
    if !require_tools(&["qemu-io", "fio", "thin_check"]) {
        return;
    }
    let mut up = Up::start(&["--data-size", "1G", "--metadata-size", "64M"]);
    let st = up.json(&["pool", "status", "--json"]);
    assert_eq!(st["block_size"], BLOCK, "{st}");
    assert_eq!(st["total_data_blocks"], (1u64 << 30) / BLOCK, "{st}");
    assert_eq!(st["used_data_blocks"], 0, "{st}");
    assert_eq!(
        std::fs::metadata(up.root.join("pool/data")).unwrap().len(),
        1 << 30,
        "sparse data file of the asked size"
    );

    up.ok(&["vol", "create", "v", "--size", "512M"]);
    qemu_io(
        &up.uri("v"),
        &["write -P 0x5a 0 1M", "write -P 0xa5 3M 100k"],
    );
    up.ok(&["vol", "snapshot", "v", "s"]);
    qemu_io(&up.uri("v"), &["write -P 0x11 0 64k"]);
    qemu_io(
        &up.uri("s"),
        &[
            "read -P 0x5a 0 1M",
            "read -P 0xa5 3M 100k",
            "read -P 0 2M 1M",
        ],
    );
    qemu_io(
        &up.uri("v"),
        &["read -P 0x11 0 64k", "read -P 0x5a 64k 960k"],
    );

    // fio writes 256 MiB of random 64 KiB blocks with checksums into v while the pool grows.
    let fio_dir = scratch();
    let fio = thinpool_tests::nbd::spawn_fio_verify("grow", &up.uri("v"), fio_dir.path());
    std::thread::sleep(Duration::from_millis(300));
    up.ok(&["pool", "grow", "--data-size", "2G"]);
    let out = fio.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fio while growing: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        !text(&out.stdout).contains("verify: bad"),
        "{}",
        text(&out.stdout)
    );

    let st = up.json(&["pool", "status", "--json"]);
    let vols = up.json(&["vol", "ls", "--json"]);
    let v = volume(&vols, "v");
    let s = volume(&vols, "s");
    assert_eq!(st["total_data_blocks"], (2u64 << 30) / BLOCK, "{st}");
    assert_eq!(
        std::fs::metadata(up.root.join("pool/data")).unwrap().len(),
        2 << 30
    );
    // s: the 16 blocks of the first MiB and the 2 blocks under 3M..3M+100k, all shared with
    // v except block 0, which v rewrote (copy-on-write).
    assert_eq!(s["mapped_blocks"], 18, "{s}");
    // v: the same 18, and the 4096 blocks fio wrote (256 MiB at 128 MiB, every block).
    assert_eq!(v["mapped_blocks"], 18 + 4096, "{v}");
    // Used: v's blocks, plus the one block only s still maps.
    assert_eq!(st["used_data_blocks"], 18 + 4096 + 1, "{st}");
    assert_eq!(st["volumes"], 1, "{st}");
    assert_eq!(st["snapshots"], 1, "{st}");
    // `info --json`: Docker's fields, in bytes, agree with the status and the files.
    let info = up.json(&["info", "--json"]);
    let used = (18 + 4096 + 1) * BLOCK;
    assert_eq!(info["pool_blocksize"], BLOCK, "{info}");
    assert_eq!(info["data_space_used"], used, "{info}");
    assert_eq!(info["data_space_total"], 2u64 << 30, "{info}");
    assert_eq!(info["data_space_available"], (2u64 << 30) - used, "{info}");
    assert_eq!(info["metadata_space_total"], 64 * MIB, "{info}");
    assert_eq!(
        info["metadata_space_used"],
        st["used_metadata_blocks"].as_u64().unwrap() * 4096,
        "{info}"
    );
    assert_eq!(
        info["metadata_space_available"],
        64 * MIB - st["used_metadata_blocks"].as_u64().unwrap() * 4096,
        "{info}"
    );
    assert_eq!(info["volumes"], 1, "{info}");
    assert_eq!(info["snapshots"], 1, "{info}");
    assert_eq!(info["transaction_id"], st["transaction_id"], "{info}");
    assert_eq!(info["mode"], "rw", "{info}");
    assert_eq!(info["daemon"]["running"], true, "{info}");
    assert_eq!(
        info["data_file"],
        up.root.join("pool/data").display().to_string(),
        "{info}"
    );
    assert_eq!(info["deferred_deleted_device_count"], 0, "{info}");

    up.ok(&["vol", "rm", "s"]);
    up.ok(&["vol", "rm", "v"]);
    assert_eq!(up.json(&["vol", "ls", "--json"]), serde_json::json!([]));
    assert_eq!(
        up.json(&["pool", "status", "--json"])["used_data_blocks"],
        0
    );
    up.stop();
    up.thin_check();
    // Freed blocks were punched out of the data file.
    let allocated = std::fs::metadata(up.root.join("pool/data"))
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap();
    assert!(
        allocated < 8 * MIB,
        "{allocated} bytes still allocated in the data file"
    );
}

/// What clap prints for a size it cannot parse, for the argument shown as `arg`.
fn bad_size(value: &str, arg: &str, unit: &str) -> String {
    format!(
        "error: invalid value '{value}' for '{arg}': invalid size '{value}': unknown unit \
         '{unit}': use bytes or K/M/G/T/P (1024-based, optionally followed by iB or B; e.g. 4096, \
         512M, 10G, 10GiB)"
    )
}

#[test]
fn bad_input_fails_clearly_and_changes_nothing() {
    if !require_tools(&["qemu-io", "thin_check"]) {
        return;
    }
    let mut up = Up::start(&[
        "--data-size",
        "256M",
        "--metadata-size",
        "16M",
        "--error-if-no-space",
    ]);
    up.ok(&["vol", "create", "v", "--size", "1G"]);
    let before = up.ok(&["vol", "ls", "--json"]);
    let root = up.root.display().to_string();

    let e = up.fails(&["vol", "create", "x", "--size", "12X"]);
    assert_eq!(error_line(&e), bad_size("12X", "--size <SIZE>", "X"), "{e}");
    let e = up.fails(&["vol", "rm", "nope"]);
    assert_eq!(
        error_line(&e),
        format!(
            "thinpool: error: removing volume \"nope\" from the pool at {root}: no volume named nope"
        )
    );
    let e = up.fails(&["vol", "snapshot", "nope", "s"]);
    assert_eq!(
        error_line(&e),
        format!(
            "thinpool: error: snapshotting volume \"nope\" as \"s\" in the pool at {root}: no \
             volume named nope"
        )
    );
    let e = up.fails(&["vol", "create", "v", "--size", "1M"]);
    assert_eq!(
        error_line(&e),
        format!(
            "thinpool: error: creating volume \"v\" in the pool at {root}: a volume named v \
             already exists"
        )
    );
    let e = up.fails(&["vol", "resize", "v", "12X"]);
    assert_eq!(error_line(&e), bad_size("12X", "<SIZE|+SIZE>", "X"), "{e}");
    assert_eq!(
        up.ok(&["vol", "ls", "--json"]),
        before,
        "a failed command changed the pool"
    );

    // A second daemon on the same root.
    let out = run(up.cmd(&["up"]).stdout(Stdio::null()));
    assert!(!out.status.success());
    let pid = up.child.as_ref().expect("running").id();
    assert_eq!(
        error_line(&text(&out.stderr)),
        format!("thinpool: error: another thinpool daemon is serving {root} (pid {pid})")
    );

    // Pool full: 256 MiB of data, a 1 GiB volume; writes past the space fail with ENOSPC at
    // once (--error-if-no-space), the data written before stays readable.
    let mut c = tool("qemu-io");
    c.args(["-f", "raw", "-c", "write -P 0x33 0 300M", &up.uri("v")]);
    let out = run(&mut c);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(all.contains("No space left on device"), "{all}");
    let st = up.json(&["pool", "status", "--json"]);
    assert_eq!(st["used_data_blocks"], st["total_data_blocks"], "{st}");
    assert_eq!(st["mode"], "out_of_data_space", "{st}");
    qemu_io(&up.uri("v"), &["discard 0 300M"]);
    up.stop();
    up.thin_check();

    // Missing metadata file: refused, nothing created or changed.
    let meta = up.root.join("pool/metadata");
    let saved = up.root.join("metadata.saved");
    std::fs::rename(&meta, &saved).unwrap();
    let files = fingerprint(&up.root);
    let out = run(up.cmd(&["up"]).stdout(Stdio::null()));
    assert!(!out.status.success());
    assert_eq!(
        error_line(&text(&out.stderr)),
        format!(
            "thinpool: error: opening the pool at {root}: no pool in {root}: {} does not exist \
             (create one with `thinpool pool create`)",
            meta.display()
        )
    );
    assert_same_files(&files, &fingerprint(&up.root), "a refused start");

    // Foreign metadata: a file of random bytes where the metadata should be.
    let junk: Vec<u8> = (0..16 * MIB)
        .map(|i| (i * 2654435761 % 251) as u8)
        .collect();
    std::fs::write(&meta, &junk).unwrap();
    let files = fingerprint(&up.root);
    let out = run(up.cmd(&["up"]).stdout(Stdio::null()));
    assert!(!out.status.success());
    // Block 0 of the junk: the stored checksum is its first 4 bytes (little-endian).
    let stored = u32::from_le_bytes(junk[..4].try_into().unwrap());
    let cause = format!(
        "superblock (metadata block 0): bad checksum for a superblock (stored {stored:#010x}, \
         computed {FOREIGN_CSUM:#010x}) on {}",
        meta.display()
    );
    let stderr = text(&out.stderr);
    let e = error_line(&stderr);
    let expected = format!("thinpool: error: opening the pool at {root}: pool metadata: {cause}");
    // The engine's "pool metadata: CAUSE" also reports CAUSE as its source, so the error chain
    // prints CAUSE twice today; the line is exact either way.
    assert!(
        e == expected || e == format!("{expected}: {cause}"),
        "expected\n  {expected}\ngot\n  {e}"
    );
    assert_same_files(&files, &fingerprint(&up.root), "a refused start");

    // Put the real metadata back: the pool opens and has its volume.
    std::fs::rename(&saved, &meta).unwrap();
    up.spawn(&[]);
    assert!(up.ok(&["vol", "ls"]).contains('v'));
    up.stop();
    up.thin_check();
}
