//! `thinpool meta repair` of a superblock whose `nr_data_blocks` (the data space map's
//! `nr_blocks`) is absurd (issue 11): the number is derived from the mappings, and from the data
//! file when `--data` gives it; every mapping is kept; `thin_check` is clean and `thin_dump`
//! shows the pool as it was with the derived number.
//!
//! The damaged images are a real thinpool pool's metadata with that one field rewritten and the
//! superblock checksum redone (format doc section 2), so only the number is wrong. What the
//! oracles make of them (thin-provisioning-tools 0.9.0) is asserted too: `thin_check` accepts
//! them all (it does not look at `nr_data_blocks`, format doc section 17) and `thin_repair`
//! fails on them, while `thinpool meta check` rejects the ones with an absurd number.

use std::path::{Path, PathBuf};

use thinpool_pdata::BlockKind;
use thinpool_pdata::block::stamp;
use thinpool_tests::kernel::pattern;
use thinpool_tests::{
    require_tools, run, run_ok, scratch, small_pool, stdout_of, text, thinpool, thinpool_in, tool,
    zeroed_file,
};

const MIB: u64 = 1 << 20;
/// The pool's data file: 64 MiB of 64 KiB blocks.
const DATA_BLOCKS: u64 = 1024;

/// A copy of `meta` at `to` with the superblock's nr_data_blocks set to `n`.
fn with_nr_data_blocks(meta: &Path, to: &Path, n: u64) -> PathBuf {
    let mut img = std::fs::read(meta).unwrap();
    let sb = &mut img[..4096];
    // data_space_map_root at 0x40 starts with nr_blocks (u64 LE).
    sb[0x40..0x48].copy_from_slice(&n.to_le_bytes());
    stamp(sb, BlockKind::Superblock, 0);
    std::fs::write(to, &img).unwrap();
    to.to_path_buf()
}

/// `thin_dump`'s text with the superblock's nr_data_blocks replaced.
fn dump_with(dump: &str, n: u64) -> String {
    let from = format!("nr_data_blocks=\"{DATA_BLOCKS}\"");
    assert_eq!(dump.matches(&from).count(), 1, "{dump}");
    dump.replacen(&from, &format!("nr_data_blocks=\"{n}\""), 1)
}

#[test]
fn absurd_nr_data_blocks_is_derived_from_the_mappings_and_the_data_file() {
    if !require_tools(&["thin_check", "thin_dump", "thin_repair"]) {
        return;
    }
    let dir = scratch();
    let root = dir.path().join("root");
    small_pool(&root, &[("v", "8M"), ("w", "8M")]);
    // Two volumes: 3 MiB into v (data blocks 0..48), 1 MiB into w (48..64).
    let image = pattern("REPAIR", 3 * MIB as usize);
    for (vol, len) in [("v", 3 * MIB), ("w", MIB)] {
        let img = dir.path().join(format!("{vol}.img"));
        std::fs::write(&img, &image[..len as usize]).unwrap();
        run_ok(thinpool_in(&root, &["vol", "import", vol]).arg(&img));
    }
    let (meta, data) = (root.join("pool/metadata"), root.join("pool/data"));
    run_ok(tool("thin_check").arg(&meta));
    let good_dump = stdout_of(tool("thin_dump").arg(&meta));
    let mapped_end = 64; // highest mapped data block 63, + 1
    assert!(
        good_dump.contains("data_begin=\"48\" length=\"16\""),
        "w's blocks are the last mapped ones:\n{good_dump}"
    );

    // (absurd value, derived without --data, derived with --data, what the repair says)
    let cases: [(u64, u64, u64, &str); 4] = [
        (
            1 << 60,
            mapped_end,
            DATA_BLOCKS,
            "more than a mapping can address",
        ),
        (
            20,
            mapped_end,
            DATA_BLOCKS,
            "below the highest mapped data block (63) + 1",
        ),
        (
            0,
            mapped_end,
            DATA_BLOCKS,
            "below the highest mapped data block (63) + 1",
        ),
        // Beyond the data file: only the data file can tell; without it, it is kept.
        (
            2 * DATA_BLOCKS,
            2 * DATA_BLOCKS,
            DATA_BLOCKS,
            "beyond the data device",
        ),
    ];
    let mut repairs = 0;
    for (bad, without, with, says) in cases {
        let input = with_nr_data_blocks(&meta, &dir.path().join(format!("bad-{bad}")), bad);
        // The oracles on the damaged image.
        let tc = run(tool("thin_check").arg(&input));
        assert!(
            tc.status.success(),
            "thin_check 0.9.0 ignores nr_data_blocks ({bad}); now it says: {}\n{}",
            text(&tc.stdout),
            text(&tc.stderr)
        );
        let shown = stdout_of(tool("thin_dump").arg(&input));
        assert!(
            shown.contains(&format!("nr_data_blocks=\"{bad}\"")),
            "{shown}"
        );
        let theirs = zeroed_file(&dir.path().join(format!("theirs-{bad}")), 8 * MIB);
        let tr = run(tool("thin_repair")
            .arg("-i")
            .arg(&input)
            .arg("-o")
            .arg(&theirs));
        eprintln!(
            "thin_repair on nr_data_blocks {bad}: {}\n{}",
            tr.status,
            text(&tr.stderr)
        );
        if bad != 2 * DATA_BLOCKS {
            assert!(
                !tr.status.success(),
                "thin_repair repaired nr_data_blocks {bad}"
            );
        }
        let ours = run(thinpool(["meta", "check"]).arg(&input));
        assert_eq!(
            ours.status.success(),
            bad == 2 * DATA_BLOCKS,
            "meta check on nr_data_blocks {bad}: {}",
            text(&ours.stdout)
        );

        for data_arg in [None, Some(&data)] {
            let want = if data_arg.is_some() { with } else { without };
            let out = zeroed_file(
                &dir.path().join(format!("out-{bad}-{}", data_arg.is_some())),
                8 * MIB,
            );
            let mut cmd = thinpool(["meta", "repair", "-i"]);
            cmd.arg(&input).arg("-o").arg(&out);
            if let Some(d) = data_arg {
                cmd.arg("--data").arg(d);
            }
            let said = text(&run_ok(&mut cmd).stderr);
            repairs += 1;
            let what = format!("nr_data_blocks {bad}, --data: {}", data_arg.is_some());
            if want == bad {
                assert!(!said.contains("nr_data_blocks"), "{what}: {said}");
            } else {
                assert!(said.contains(says), "{what}: {said}");
                assert!(said.contains(&format!("set to {want} ")), "{what}: {said}");
                let from = if data_arg.is_some() {
                    "from the data device's size (67108864 bytes / 65536 bytes a block"
                } else {
                    "from the mappings alone (the highest mapped data block is 63"
                };
                assert!(said.contains(from), "{what}: {said}");
            }
            let tc = run(tool("thin_check").arg(&out));
            assert!(
                tc.status.success() && !text(&tc.stderr).contains("error"),
                "{what}: thin_check on the repaired metadata: {}{}",
                text(&tc.stdout),
                text(&tc.stderr)
            );
            assert_eq!(
                stdout_of(tool("thin_dump").arg(&out)),
                dump_with(&good_dump, want),
                "{what}: every mapping kept, nr_data_blocks {want}"
            );
        }
    }
    assert_eq!(repairs, 8);

    // A number given on the command line is taken as given (mappings past it are dropped,
    // and said so), and wins over --data.
    let input = with_nr_data_blocks(&meta, &dir.path().join("bad-given"), 1 << 60);
    let out = zeroed_file(&dir.path().join("out-given"), 8 * MIB);
    let said = text(
        &run_ok(
            thinpool(["-v", "meta", "repair", "-i"])
                .arg(&input)
                .arg("-o")
                .arg(&out)
                .args(["--nr-data-blocks", "56", "--data"])
                .arg(&data),
        )
        .stderr,
    );
    assert!(said.contains("8 mappings to data blocks beyond"), "{said}");
    let dump = stdout_of(tool("thin_dump").arg(&out));
    assert!(dump.contains("nr_data_blocks=\"56\""), "{dump}");
    assert!(dump.contains("data_begin=\"48\" length=\"8\""), "{dump}");

    // Bad --data arguments: clear errors.
    for (arg, msg) in [
        (root.clone(), "a directory, not a data file or device"),
        (dir.path().join("missing"), "missing"),
    ] {
        let o = run(thinpool(["meta", "repair", "-i"])
            .arg(&input)
            .arg("-o")
            .arg(&out)
            .arg("--data")
            .arg(&arg));
        let err = text(&o.stderr);
        assert!(
            !o.status.success() && err.contains(msg) && !err.contains("panicked"),
            "--data {}: {err}",
            arg.display()
        );
    }

    // The pool repaired with --data is the pool: thinpool reads the volumes back through it.
    let repaired = dir.path().join(format!("out-{}-true", 1u64 << 60));
    std::fs::copy(&repaired, &meta).unwrap();
    let v_out = dir.path().join("v.out");
    run_ok(thinpool_in(&root, &["vol", "export", "v"]).arg(&v_out));
    let v = std::fs::read(&v_out).unwrap();
    assert!(
        v[..image.len()] == image[..],
        "v reads back after the repair"
    );
    run_ok(tool("thin_check").arg(&meta));
}
