//! The `thinpool meta` toolbox against thin-provisioning-tools 0.9.0 (`thin_dump`, `thin_check`,
//! `thin_ls`, `thin_delta`, `thin_restore`, `thin_repair`, `thin_metadata_size`): the same text on
//! stdout and the same success or failure, on the six committed vectors
//! (`testdata/dm-thin/`) and on random pools written both by `thin_restore` and by us.
//!
//! Random pools print their seed; replay with `THINPOOL_TEST_SEED=<seed>`. The number of random
//! pools per test comes from `THINPOOL_TEST_CASES` (default small, for CI). A failing random pool's
//! XML is kept in `$TMPDIR/thinpool-failed-*.xml`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom as _, SliceRandom as _};
use rand::{Rng as _, SeedableRng as _};
use thinpool_tests::pool::{GenOptions, Generated, Pool, generate};
use thinpool_tests::{
    Failures, VECTORS, env_count, file_size, keep_failed_input, require_tools, run, run_ok,
    scratch, stdout_of, test_seed, text, thinpool, tool, vector, vector_xml, zeroed_file,
};

/// Every oracle these tests use.
const ORACLES: [&str; 7] = [
    "thin_dump",
    "thin_check",
    "thin_ls",
    "thin_delta",
    "thin_restore",
    "thin_repair",
    "thin_metadata_size",
];

/// The field list of the testdata README's `L` command.
const LS_FIELDS: &str =
    "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS,TRANSACTION,CREATE_TIME,SNAP_TIME";

/// Every field `thin_ls` knows, in its own order.
const LS_ALL_FIELDS: &str = "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS,MAPPED_SECTORS,\
EXCLUSIVE_SECTORS,SHARED_SECTORS,MAPPED_BYTES,EXCLUSIVE_BYTES,SHARED_BYTES,MAPPED,EXCLUSIVE,SHARED,\
TRANSACTION,CREATE_TIME,SNAP_TIME";

/// What `thin_check` 0.9.0 prints on stderr for clean metadata.
const THIN_CHECK_CLEAN_STDERR: &str = "examining superblock\nexamining devices tree\n\
examining mapping tree\nchecking space map counts\n";

fn oracles() -> bool {
    require_tools(&ORACLES)
}

/// `-m` / `--metadata-snap` or nothing.
fn snap_flag(snap: bool, flag: &'static str) -> Vec<&'static str> {
    if snap { vec![flag] } else { vec![] }
}

/// Compare a thinpool run with an oracle run of the same question: when the oracle succeeds we
/// must succeed with the same stdout; when it fails, so must we.
fn same_answer(f: &mut Failures, what: &str, ours: &Output, theirs: &Output) {
    match (theirs.status.success(), ours.status.success()) {
        (true, true) => f.eq_text(what, &text(&ours.stdout), &text(&theirs.stdout)),
        (true, false) => f.add(format!(
            "{what}: the oracle succeeds but thinpool exits {}: {}",
            ours.status,
            text(&ours.stderr).trim_end()
        )),
        (false, true) => f.add(format!(
            "{what}: the oracle fails ({}: {}) but thinpool succeeds",
            theirs.status,
            text(&theirs.stderr).trim_end()
        )),
        (false, false) => {}
    }
}

fn our_dump(meta: &Path, snap: bool) -> Output {
    let mut args = vec!["meta", "dump"];
    args.extend(snap_flag(snap, "--metadata-snap"));
    run(thinpool(args).arg(meta))
}

fn their_dump(meta: &Path, snap: bool) -> Output {
    run(tool("thin_dump").args(snap_flag(snap, "-m")).arg(meta))
}

fn our_ls(meta: &Path, fields: Option<&str>, snap: bool) -> Output {
    let mut cmd = thinpool(["meta", "ls"]);
    if let Some(fields) = fields {
        cmd.args(["-o", fields]);
    }
    cmd.args(snap_flag(snap, "--metadata-snap"));
    run(cmd.arg(meta))
}

fn their_ls(meta: &Path, fields: Option<&str>, snap: bool) -> Output {
    let mut cmd = tool("thin_ls");
    if let Some(fields) = fields {
        cmd.args(["-o", fields]);
    }
    cmd.args(snap_flag(snap, "-m"));
    run(cmd.arg(meta))
}

fn our_delta(meta: &Path, a: u32, b: u32, snap: bool) -> Output {
    let mut cmd = thinpool(["meta", "delta"]);
    cmd.args(snap_flag(snap, "--metadata-snap"));
    cmd.args(["--thin1", &a.to_string(), "--thin2", &b.to_string()]);
    run(cmd.arg(meta))
}

fn their_delta(meta: &Path, a: u32, b: u32, snap: bool) -> Output {
    let mut cmd = tool("thin_delta");
    cmd.args(snap_flag(snap, "-m"));
    cmd.args(["--thin1", &a.to_string(), "--thin2", &b.to_string()]);
    run(cmd.arg(meta))
}

/// `thin_check` must pass with the clean report, and the `TRANSACTION_ID` line must be `transaction`.
fn thin_check_clean(f: &mut Failures, what: &str, meta: &Path, transaction: u64) {
    let out = run(tool("thin_check").arg(meta));
    if !out.status.success() {
        f.add(format!(
            "{what}: thin_check exits {}:\n{}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        ));
        return;
    }
    f.eq_text(
        &format!("{what}: thin_check's report (stderr)"),
        &text(&out.stderr),
        THIN_CHECK_CLEAN_STDERR,
    );
    let first = text(&out.stdout).lines().next().unwrap_or("").to_string();
    f.check(
        &format!("{what}: thin_check prints {first:?}, want TRANSACTION_ID={transaction}"),
        first == format!("TRANSACTION_ID={transaction}"),
    );
}

/// `thinpool meta check` must exit 0.
fn our_check_clean(f: &mut Failures, what: &str, meta: &Path) {
    let out = run(thinpool(["meta", "check"]).arg(meta));
    if out.status.code() != Some(0) {
        f.add(format!(
            "{what}: thinpool meta check exits {}:\n{}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        ));
    }
}

/// `thinpool meta restore -i XML -o META` into a zeroed file of `size` bytes.
fn our_restore(dir: &Path, name: &str, xml: &str, size: u64) -> (std::path::PathBuf, Output) {
    let xml_path = dir.join(format!("{name}.xml"));
    std::fs::write(&xml_path, xml).expect("write the XML");
    let meta = zeroed_file(&dir.join(format!("{name}.ours.meta")), size);
    let out = run(thinpool(["meta", "restore", "-i"])
        .arg(&xml_path)
        .arg("-o")
        .arg(&meta));
    (meta, out)
}

/// `thin_restore -i XML -o META` into a zeroed file of `size` bytes.
fn their_restore(dir: &Path, name: &str, xml: &str, size: u64) -> std::path::PathBuf {
    let xml_path = dir.join(format!("{name}.xml"));
    std::fs::write(&xml_path, xml).expect("write the XML");
    let meta = zeroed_file(&dir.join(format!("{name}.theirs.meta")), size);
    run_ok(
        tool("thin_restore")
            .arg("-q")
            .arg("-i")
            .arg(&xml_path)
            .arg("-o")
            .arg(&meta),
    );
    meta
}

// ------------------------------------------------------------------ the committed vectors

#[test]
fn vectors_dump_equals_thin_dump_and_committed_xml() {
    if !oracles() {
        return;
    }
    let dir = scratch();
    let mut f = Failures::new();
    for name in VECTORS {
        let meta = vector(name);
        let want = vector_xml(name);
        let theirs = their_dump(&meta, false);
        // the oracle itself must agree with the committed text, or the vectors are stale
        assert_eq!(text(&theirs.stdout), want, "thin_dump {name} != {name}.xml");
        let ours = our_dump(&meta, false);
        same_answer(
            &mut f,
            &format!("{name}: meta dump vs thin_dump"),
            &ours,
            &theirs,
        );

        // the same through --format xml and -o FILE
        let out_file = dir.path().join(format!("{name}.dump.xml"));
        let o = run(thinpool(["meta", "dump", "--format", "xml", "-o"])
            .arg(&out_file)
            .arg(&*meta));
        if o.status.success() {
            let written = std::fs::read_to_string(&out_file).unwrap_or_default();
            f.eq_text(
                &format!("{name}: meta dump --format xml -o FILE"),
                &written,
                &want,
            );
            f.check(
                &format!("{name}: meta dump -o FILE also printed to stdout"),
                o.stdout.is_empty(),
            );
        } else {
            f.add(format!(
                "{name}: meta dump --format xml -o FILE exits {}",
                o.status
            ));
        }
    }
    f.finish();
}

/// No oracle prints JSON: `meta dump --format json` must at least succeed and be valid JSON.
#[test]
fn vectors_dump_json_is_json() {
    let mut f = Failures::new();
    for name in VECTORS {
        let meta = vector(name);
        let out = run(thinpool(["meta", "dump", "--format", "json"]).arg(&*meta));
        if !out.status.success() {
            f.add(format!(
                "{name}: meta dump --format json exits {}",
                out.status
            ));
            continue;
        }
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            f.add(format!("{name}: meta dump --format json is not JSON: {e}"));
        }
    }
    f.finish();
}

#[test]
fn vectors_dump_metadata_snap_equals_thin_dump_m() {
    if !oracles() {
        return;
    }
    let mut f = Failures::new();
    for name in VECTORS {
        let meta = vector(name);
        let theirs = their_dump(&meta, true);
        // only metadata-snap holds a metadata snapshot; for the others both must fail
        assert_eq!(
            theirs.status.success(),
            name == "metadata-snap",
            "thin_dump -m {name}"
        );
        let ours = our_dump(&meta, true);
        same_answer(
            &mut f,
            &format!("{name}: meta dump --metadata-snap vs thin_dump -m"),
            &ours,
            &theirs,
        );
    }
    f.finish();
}

#[test]
fn vectors_check_clean() {
    if !oracles() {
        return;
    }
    let mut f = Failures::new();
    for name in VECTORS {
        let meta = vector(name);
        run_ok(tool("thin_check").arg("-q").arg(&*meta));
        our_check_clean(&mut f, name, &meta);
        let q = run(thinpool(["meta", "check", "-q"]).arg(&*meta));
        f.check(
            &format!("{name}: meta check -q exits {}", q.status),
            q.status.code() == Some(0),
        );
        f.check(
            &format!(
                "{name}: meta check -q prints on stdout: {:?}",
                text(&q.stdout)
            ),
            q.stdout.is_empty(),
        );
    }
    f.finish();
}

/// Damaged metadata: `thin_check` exits 1, so must `thinpool meta check` (with or without `-q`),
/// and its message must name the damaged block.
#[test]
fn check_fails_on_damaged_metadata_like_thin_check() {
    if !oracles() {
        return;
    }
    // (vector, metadata block, byte in the block, what is there)
    let cases: [(&str, u64, u64, &str); 6] = [
        ("one-thin", 0, 40, "superblock"),
        ("one-thin", 10, 200, "bottom-level mapping leaf of device 1"),
        ("snapshots", 6, 100, "device details root"),
        (
            "many-devices",
            7,
            100,
            "top-level mapping tree internal root",
        ),
        ("one-thin", 9, 300, "data space map bitmap"),
        ("one-thin", 3, 300, "metadata space map bitmap"),
    ];
    let dir = scratch();
    let mut f = Failures::new();
    for (name, block, offset, what) in cases {
        let meta = dir.path().join(format!("{name}-{block}.meta"));
        std::fs::copy(&*vector(name), &meta).expect("copy the vector");
        flip_byte(&meta, block * 4096 + offset);
        let theirs = run(tool("thin_check").arg(&meta));
        assert_eq!(
            theirs.status.code(),
            Some(1),
            "thin_check on {name} with {what} damaged"
        );
        let ours = run(thinpool(["meta", "check"]).arg(&meta));
        let label = format!("{name}, {what} (block {block}) damaged");
        f.check(
            &format!("{label}: meta check exits {}, want 1", ours.status),
            ours.status.code() == Some(1),
        );
        let said = format!("{}{}", text(&ours.stdout), text(&ours.stderr));
        let names_it = if block == 0 {
            said.contains("superblock")
        } else {
            said.contains(&format!("block {block}"))
        };
        f.check(
            &format!("{label}: meta check does not name the block: {said:?}"),
            names_it,
        );
        let q = run(thinpool(["meta", "check", "-q"]).arg(&meta));
        f.check(
            &format!("{label}: meta check -q exits {}, want 1", q.status),
            q.status.code() == Some(1),
        );
    }
    // all zeros: no superblock at all
    let zero = zeroed_file(&dir.path().join("zero.meta"), 4 << 20);
    assert_eq!(run(tool("thin_check").arg(&zero)).status.code(), Some(1));
    let ours = run(thinpool(["meta", "check"]).arg(&zero));
    f.check(
        &format!("zeroed file: meta check exits {}, want 1", ours.status),
        ours.status.code() == Some(1),
    );
    f.finish();
}

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open for writing");
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, at).expect("read a byte");
    b[0] ^= 0xff;
    file.write_all_at(&b, at).expect("write a byte");
}

#[test]
fn vectors_ls_equals_thin_ls() {
    if !oracles() {
        return;
    }
    let mut f = Failures::new();
    for name in VECTORS {
        let meta = vector(name);
        for fields in [None, Some(LS_FIELDS), Some(LS_ALL_FIELDS)] {
            let what = format!("{name}: meta ls -o {}", fields.unwrap_or("(default)"));
            same_answer(
                &mut f,
                &what,
                &our_ls(&meta, fields, false),
                &their_ls(&meta, fields, false),
            );
        }
        // through the held metadata snapshot: only metadata-snap has one
        let theirs = their_ls(&meta, Some(LS_FIELDS), true);
        assert_eq!(
            theirs.status.success(),
            name == "metadata-snap",
            "thin_ls -m {name}"
        );
        same_answer(
            &mut f,
            &format!("{name}: meta ls --metadata-snap"),
            &our_ls(&meta, Some(LS_FIELDS), true),
            &theirs,
        );
    }
    f.finish();
}

#[test]
fn vectors_delta_equals_thin_delta() {
    if !oracles() {
        return;
    }
    let pairs: &[(&str, &[(u32, u32)])] = &[
        ("one-thin", &[(1, 1)]),
        (
            "snapshots",
            &[(1, 2), (1, 3), (2, 3), (3, 1), (2, 1), (2, 2)],
        ),
        ("metadata-snap", &[(1, 2), (1, 3), (2, 3), (3, 1), (2, 1)]),
        ("shared-root", &[(1, 2), (2, 3), (1, 3), (3, 2)]),
        (
            "many-devices",
            &[(0, 7), (7, 14), (14, 7), (2093, 0), (7, 2093), (0, 0)],
        ),
    ];
    let mut f = Failures::new();
    for (name, pairs) in pairs {
        let meta = vector(name);
        for &(a, b) in *pairs {
            let theirs = their_delta(&meta, a, b, false);
            assert!(theirs.status.success(), "thin_delta {a} {b} on {name}");
            same_answer(
                &mut f,
                &format!("{name}: meta delta --thin1 {a} --thin2 {b}"),
                &our_delta(&meta, a, b, false),
                &theirs,
            );
            if *name == "metadata-snap" {
                same_answer(
                    &mut f,
                    &format!("{name}: meta delta --metadata-snap --thin1 {a} --thin2 {b}"),
                    &our_delta(&meta, a, b, true),
                    &their_delta(&meta, a, b, true),
                );
            }
        }
    }
    // a device that does not exist: thin_delta fails, so must we
    let meta = vector("snapshots");
    let theirs = their_delta(&meta, 1, 99, false);
    assert!(!theirs.status.success());
    same_answer(
        &mut f,
        "snapshots: meta delta with a missing device",
        &our_delta(&meta, 1, 99, false),
        &theirs,
    );
    f.finish();
}

#[test]
fn vectors_restore_round_trip() {
    if !oracles() {
        return;
    }
    let dir = scratch();
    let mut f = Failures::new();
    for name in VECTORS {
        let xml = vector_xml(name);
        let size = file_size(&vector(name));
        let (meta, out) = our_restore(dir.path(), name, &xml, size);
        if !out.status.success() {
            f.add(format!("{name}: meta restore exits {}", out.status));
            continue;
        }
        let pool = Pool::from_xml(&xml).expect("parse the committed XML");
        thin_check_clean(
            &mut f,
            &format!("{name} restored by us"),
            &meta,
            pool.transaction,
        );
        our_check_clean(&mut f, &format!("{name} restored by us"), &meta);
        f.eq_text(
            &format!("{name} restored by us: thin_dump vs the input XML"),
            &text(&their_dump(&meta, false).stdout),
            &xml,
        );
        f.eq_text(
            &format!("{name} restored by us: meta dump vs the input XML"),
            &text(&our_dump(&meta, false).stdout),
            &xml,
        );
    }
    f.finish();
}

#[test]
fn vectors_repair() {
    if !oracles() {
        return;
    }
    let dir = scratch();
    let mut f = Failures::new();
    for name in VECTORS {
        let input = vector(name);
        let xml = vector_xml(name);
        let out_meta = zeroed_file(
            &dir.path().join(format!("{name}.repaired")),
            file_size(&input),
        );
        let out = run(thinpool(["meta", "repair", "-i"])
            .arg(&*input)
            .arg("-o")
            .arg(&out_meta));
        if !out.status.success() {
            f.add(format!("{name}: meta repair exits {}", out.status));
            continue;
        }
        let pool = Pool::from_xml(&xml).expect("parse the committed XML");
        thin_check_clean(
            &mut f,
            &format!("{name} repaired by us"),
            &out_meta,
            pool.transaction,
        );
        f.eq_text(
            &format!("{name} repaired by us: thin_dump vs {name}.xml"),
            &text(&their_dump(&out_meta, false).stdout),
            &xml,
        );
    }
    f.finish();
}

/// Random `meta size` argument sets per run by default: each costs two process starts (ours
/// and the oracle's, about 8 ms together on an idle machine), so this is about 5 s.
const SIZE_CASES: usize = 600;

/// `thinpool meta size` prints what `thin_metadata_size` prints, and fails where it fails: the
/// documented examples, then a seeded random sweep over block sizes (mostly powers of two in a
/// unit that divides them, some not), pool sizes, max thins, output units (letters, prefixes of
/// the long names, junk), `-n` in each form, the options' short, long, attached and `=`
/// spellings in random order, and invalid combinations (a missing or repeated option, a zero or
/// non-power-of-two block size, a pool smaller than a block, a bad unit, numbers past 64 bits).
/// The seed is printed (`THINPOOL_TEST_SEED` replays it); `THINPOOL_SIZE_CASES` sets the count
/// (default [`SIZE_CASES`]).
///
/// Not generated, where thinpool differs from the oracle on purpose or not yet: abbreviated
/// long options, stray positional arguments and `-n short` with a space (getopt gives `-n` no
/// argument there), all of which clap refuses; a repeated `-u` (the oracle takes the last one,
/// thinpool refuses); a unitless `-b`/`-s` after `-u` (the oracle computes it in sectors but
/// echoes it with `-u`'s unit name, `-u g -b 16` → `--block-size=16gibibytes`; thinpool echoes
/// `16sectors`).
#[test]
fn metadata_size_equals_thin_metadata_size() {
    if !oracles() {
        return;
    }
    let cases: &[&[&str]] = &[
        &["-b", "64k", "-s", "100g", "-m", "1000"],
        &["-b", "64k", "-s", "100g", "-m", "1000", "-u", "m"],
        &["-b", "64k", "-s", "100g", "-m", "1000", "-n"],
        &["-b", "64k", "-s", "100g", "-m", "1000", "-u", "m", "-n"],
        &["-b", "64k", "-s", "100g", "-m", "1000", "-u", "b"],
        &["-b", "128s", "-s", "1t", "-m", "10", "-u", "k"],
        &["-b", "1m", "-s", "10t", "-m", "100000", "-u", "G"],
        &["-b", "4m", "-s", "16777216k", "-m", "1"],
        &["-b", "64k", "-s", "1p", "-m", "200", "-u", "M", "-n"],
        &["-b", "64k", "-s", "2g", "-m", "1", "-u", "k", "-n"],
        &[
            "--block-size",
            "512k",
            "--pool-size",
            "500g",
            "--max-thins",
            "50",
            "--unit",
            "m",
        ],
    ];
    let mut f = Failures::new();
    for args in cases {
        let theirs = run(tool("thin_metadata_size").args(*args));
        assert!(theirs.status.success(), "thin_metadata_size {args:?}");
        let ours = run(thinpool(["meta", "size"]).args(*args));
        same_answer(
            &mut f,
            &format!("meta size {}", args.join(" ")),
            &ours,
            &theirs,
        );
    }
    // refused by the oracle: block size not a power of two, no --max-thins
    let refused: &[&[&str]] = &[
        &["-b", "192k", "-s", "2T", "-m", "5"],
        &["-b", "64k", "-s", "100g"],
    ];
    for args in refused {
        let theirs = run(tool("thin_metadata_size").args(*args));
        assert!(
            !theirs.status.success(),
            "thin_metadata_size {args:?} should fail"
        );
        let ours = run(thinpool(["meta", "size"]).args(*args));
        same_answer(
            &mut f,
            &format!("meta size {} (refused)", args.join(" ")),
            &ours,
            &theirs,
        );
    }

    let seed = test_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let count = env_count("THINPOOL_SIZE_CASES", SIZE_CASES);
    let started = Instant::now();
    let mut answered = 0;
    // The oracle's refusals by message, to show which invalid inputs the sweep reached.
    let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..count {
        let args = random_size_args(&mut rng);
        // Output, not `run`: hundreds of refusals are expected and need no log.
        let quiet = |cmd: &mut Command| {
            cmd.stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot start `{cmd:?}`: {e}"))
        };
        let theirs = quiet(tool("thin_metadata_size").args(&args));
        let ours = quiet(thinpool(["meta", "size"]).args(&args));
        if theirs.status.success() {
            answered += 1;
        } else {
            let why = text(&theirs.stderr);
            let why = why.lines().next().unwrap_or("(no message)");
            *refusals.entry(why.to_string()).or_default() += 1;
        }
        same_answer(
            &mut f,
            &format!("random case {i} of seed {seed}: meta size {args:?}"),
            &ours,
            &theirs,
        );
        if f.len() >= 20 {
            eprintln!("stopping after 20 failures (case {i} of {count})");
            break;
        }
    }
    let refused: usize = refusals.values().sum();
    eprintln!(
        "{count} random argument sets in {:.1} s: thin_metadata_size answered {answered} and \
         refused {refused}:",
        started.elapsed().as_secs_f64()
    );
    for (why, n) in &refusals {
        eprintln!("  {n:6}  {why}");
    }
    // The sweep must cover both sides, or it could pass by comparing refusals only.
    if f.is_empty() && count >= 100 {
        assert!(
            answered >= count / 3 && refused >= count / 10,
            "the generator is off balance: {answered} answered, {refused} refused of {count}"
        );
    }
    f.finish();
}

/// The units of `thin_metadata_size`, in its order: the letter and the long name it prints.
const SIZE_UNITS: [(char, &str); 18] = [
    ('b', "bytes"),
    ('s', "sectors"),
    ('k', "kibibytes"),
    ('K', "kilobytes"),
    ('m', "mebibytes"),
    ('M', "megabytes"),
    ('g', "gibibytes"),
    ('G', "gigabytes"),
    ('t', "tebibytes"),
    ('T', "terabytes"),
    ('p', "pebibytes"),
    ('P', "petabytes"),
    ('e', "ebibytes"),
    ('E', "exabytes"),
    ('z', "zebibytes"),
    ('Z', "zetabytes"),
    ('y', "yobibytes"),
    ('Y', "yottabytes"),
];

/// A unit for a size or for `-u`: a letter, a non-empty prefix of a long name, or junk.
fn random_unit(rng: &mut StdRng) -> String {
    let (letter, name) = *SIZE_UNITS.choose(rng).expect("units");
    match rng.random_range(0..20) {
        0..=12 => letter.to_string(),
        13..=18 => name[..rng.random_range(1..=name.len())].to_string(),
        _ => (*["x", "KiB", "gibibytesx", "-", "kB", "S"]
            .choose(rng)
            .expect("junk"))
        .to_string(),
    }
}

/// A number as the tool reads it: mostly small, sometimes 0, large, or past 64 bits.
fn random_number(rng: &mut StdRng) -> String {
    match rng.random_range(0..20) {
        0 => "0".into(),
        1 => rng.random::<u64>().to_string(),
        2 => format!(
            "{}{:010}",
            rng.random::<u64>(),
            rng.random_range(0..10_000_000_000u64)
        ),
        3..=7 => rng.random_range(1..1u64 << 40).to_string(),
        _ => rng.random_range(1..=4096u64).to_string(),
    }
}

/// A number, with a unit two times in three.
fn random_size(rng: &mut StdRng) -> String {
    let n = random_number(rng);
    if rng.random_bool(2.0 / 3.0) {
        n + &random_unit(rng)
    } else {
        n
    }
}

/// One random argument list for `thin_metadata_size` / `thinpool meta size`.
fn random_size_args(rng: &mut StdRng) -> Vec<String> {
    let block = if rng.random_bool(0.85) {
        // A power of two from 512 bytes to 1 GiB, in a unit that divides it (no unit: sectors).
        let k: u32 = rng.random_range(9..=30);
        let units: Vec<(&str, u32)> =
            [("b", 0), ("s", 9), ("", 9), ("k", 10), ("m", 20), ("g", 30)]
                .into_iter()
                .filter(|&(_, shift)| shift <= k)
                .collect();
        let (unit, shift) = *units.choose(rng).expect("512 bytes fit every unit list");
        format!("{}{unit}", 1u64 << (k - shift))
    } else {
        random_size(rng)
    };
    let pool = if rng.random_bool(0.85) {
        let unit = *["m", "g", "t", "p", "M", "G", "T", "s", "k"]
            .choose(rng)
            .expect("units");
        format!("{}{unit}", rng.random_range(1..=4096u32))
    } else {
        random_size(rng)
    };
    let thins = match rng.random_range(0..10) {
        0 => random_size(rng),
        1 => format!(
            "{}{}",
            rng.random_range(1..=64u32),
            ["k", "K", "m", "s", "b"].choose(rng).expect("units")
        ),
        _ => rng.random_range(1..=100_000u32).to_string(),
    };
    // (short, long, value); each of -b, -s, -m left out now and then, -u half the time.
    let mut opts: Vec<(&str, &str, String)> = Vec::new();
    for (short, long, value) in [
        ("b", "block-size", block),
        ("s", "pool-size", pool),
        ("m", "max-thins", thins),
    ] {
        if rng.random_bool(0.95) {
            opts.push((short, long, value));
        }
    }
    if rng.random_bool(0.5) {
        opts.push(("u", "unit", random_unit(rng)));
    }
    if rng.random_bool(0.03)
        && let Some(again) = opts
            .iter()
            .filter(|o| o.0 != "u")
            .collect::<Vec<_>>()
            .choose(rng)
    {
        let again = (*again).clone();
        opts.push(again);
    }
    opts.shuffle(rng);
    // A unitless -b or -s after -u is echoed with -u's unit name by the oracle (see above):
    // keep -u after them then.
    let unitless = |v: &str| v.bytes().all(|b| b.is_ascii_digit());
    if opts
        .iter()
        .any(|(short, _, v)| matches!(*short, "b" | "s") && unitless(v))
        && let Some(at) = opts.iter().position(|o| o.0 == "u")
    {
        let u = opts.remove(at);
        opts.push(u);
    }
    let mut args: Vec<String> = Vec::new();
    for (short, long, value) in opts {
        match rng.random_range(0..4) {
            0 => args.extend([format!("-{short}"), value]),
            1 => args.push(format!("-{short}{value}")),
            2 => args.extend([format!("--{long}"), value]),
            _ => args.push(format!("--{long}={value}")),
        }
    }
    if rng.random_bool(0.4) {
        let n = [
            "-n",
            "-nshort",
            "-nlong",
            "--numeric-only",
            "--numeric-only=short",
            "--numeric-only=long",
            "-nfoo",
            "--numeric-only=bogus",
        ];
        // The invalid forms one time in ten.
        let form = if rng.random_bool(0.1) {
            n[rng.random_range(6..8)]
        } else {
            n[rng.random_range(0..6)]
        };
        let at = rng.random_range(0..=args.len());
        args.insert(at, form.to_string());
        // A repeated -n, refused by both, now and then.
        if rng.random_bool(0.05) {
            let at = rng.random_range(0..=args.len());
            args.insert(at, n[rng.random_range(0..6)].to_string());
        }
    }
    args
}

// ------------------------------------------------------------------ random pools

/// Generate a pool and check that the oracles accept it as we mean it: `thin_restore` of its XML
/// dumps back byte for byte. A failure here is a bug in the generator, not in thinpool.
fn generated(seed: u64, opts: &GenOptions) -> Generated {
    let mut rng = StdRng::seed_from_u64(seed);
    generate(&mut rng, opts)
}

/// Everything we check on one random pool; comparisons go to `f`.
fn check_generated_pool(f: &mut Failures, label: &str, g: &Generated, rng: &mut StdRng) {
    let dir = scratch();
    let pool = &g.pool;
    let xml = pool.to_xml();
    let size = pool.metadata_size();
    let kept = || keep_failed_input(&format!("{label}.xml"), &xml);

    // The oracle's own round trip: the generated XML is valid and printed as thin_dump prints.
    let theirs = their_restore(dir.path(), "pool", &xml, size);
    let dumped = stdout_of(tool("thin_dump").arg(&theirs));
    if dumped != xml {
        panic!(
            "{label}: generator bug: thin_dump(thin_restore(xml)) != xml (kept in {}):\n{}",
            kept().display(),
            thinpool_tests::first_diff("thin_dump", &dumped, "generated", &xml)
        );
    }
    let before = f.len();

    // our restore -> thin_check, thin_dump, our check, our dump
    let (ours, out) = our_restore(dir.path(), "pool", &xml, size);
    if out.status.success() {
        thin_check_clean(
            f,
            &format!("{label}: restored by us"),
            &ours,
            pool.transaction,
        );
        f.eq_text(
            &format!("{label}: thin_dump of our restore vs the input"),
            &stdout_of(tool("thin_dump").arg(&ours)),
            &xml,
        );
        our_check_clean(f, &format!("{label}: restored by us"), &ours);
        f.eq_text(
            &format!("{label}: meta dump of our restore vs the input"),
            &text(&our_dump(&ours, false).stdout),
            &xml,
        );
    } else {
        f.add(format!("{label}: meta restore exits {}", out.status));
    }

    // thin_restore's pool: our check and dump
    our_check_clean(f, &format!("{label}: restored by thin_restore"), &theirs);
    f.eq_text(
        &format!("{label}: meta dump of thin_restore's pool vs the input"),
        &text(&our_dump(&theirs, false).stdout),
        &xml,
    );

    // ls on both pools
    let mut metas = vec![("thin_restore", theirs.clone())];
    if out.status.success() {
        metas.push(("our restore", ours.clone()));
    }
    for (whose, meta) in &metas {
        for fields in [None, Some(LS_FIELDS), Some(LS_ALL_FIELDS)] {
            same_answer(
                f,
                &format!(
                    "{label} ({whose}): meta ls -o {}",
                    fields.unwrap_or("(default)")
                ),
                &our_ls(meta, fields, false),
                &their_ls(meta, fields, false),
            );
        }
    }

    // delta: origin/snapshot pairs (both ways), the big device, random pairs
    let ids: Vec<u32> = pool.devices.keys().copied().collect();
    let mut pairs: Vec<(u32, u32)> = g.snapshots.clone();
    pairs.shuffle(rng);
    pairs.truncate(8);
    let swapped: Vec<(u32, u32)> = pairs.iter().take(3).map(|&(a, b)| (b, a)).collect();
    pairs.extend(swapped);
    if let Some(big) = g.big
        && let Some(&(p, c)) = g.snapshots.iter().find(|(p, _)| *p == big)
    {
        pairs.push((p, c));
    }
    for _ in 0..4 {
        if let (Some(&a), Some(&b)) = (ids.choose(rng), ids.choose(rng)) {
            pairs.push((a, b));
        }
    }
    for (a, b) in pairs {
        same_answer(
            f,
            &format!("{label}: meta delta --thin1 {a} --thin2 {b}"),
            &our_delta(&theirs, a, b, false),
            &their_delta(&theirs, a, b, false),
        );
    }

    if f.len() > before {
        eprintln!("{label}: input kept in {}", kept().display());
    }
}

/// One big pool: 200 devices, one of them with enough mappings for a 3-level bottom tree and a
/// snapshot of it.
#[test]
fn generated_pool_big() {
    if !oracles() {
        return;
    }
    let seed = test_seed();
    let mut rng = StdRng::seed_from_u64(seed ^ 0xb16);
    let g = generated(
        seed,
        &GenOptions {
            devices: 200,
            big_device: true,
            data_block_size: Some(128),
        },
    );
    describe_pool("big", &g);
    let mut f = Failures::new();
    check_generated_pool(&mut f, &format!("big-seed{seed}"), &g, &mut rng);
    f.finish();
}

/// Pools with odd block sizes (384 and 1152 sectors: not powers of two) and a few devices.
#[test]
fn generated_pools_odd_block_sizes() {
    if !oracles() {
        return;
    }
    let seed = test_seed();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0dd);
    let mut f = Failures::new();
    for (i, (dbs, devices)) in [(384u32, 12usize), (1152, 40), (128, 3)]
        .into_iter()
        .enumerate()
    {
        let case_seed = seed.wrapping_add(i as u64 + 1);
        let g = generated(
            case_seed,
            &GenOptions {
                devices,
                big_device: false,
                data_block_size: Some(dbs),
            },
        );
        let label = format!("odd{dbs}-seed{seed}-case{i}");
        describe_pool(&label, &g);
        check_generated_pool(&mut f, &label, &g, &mut rng);
    }
    f.finish();
}

/// `THINPOOL_TEST_CASES` random pools (default 4) of every shape.
#[test]
fn generated_pools_random() {
    if !oracles() {
        return;
    }
    let seed = test_seed();
    let cases = thinpool_tests::env_count("THINPOOL_TEST_CASES", 4);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7a11);
    let mut f = Failures::new();
    for i in 0..cases {
        use rand::Rng as _;
        let case_seed = seed.wrapping_mul(31).wrapping_add(i as u64);
        let opts = GenOptions {
            devices: rng.random_range(1..=120),
            big_device: false,
            data_block_size: None,
        };
        let g = generated(case_seed, &opts);
        let label = format!("random-seed{seed}-case{i}");
        describe_pool(&label, &g);
        check_generated_pool(&mut f, &label, &g, &mut rng);
    }
    f.finish();
}

fn describe_pool(label: &str, g: &Generated) {
    let p = &g.pool;
    eprintln!(
        "{label}: {} devices, {} mappings, {} snapshots, block size {} sectors, {} data blocks, \
         time {}, transaction {}",
        p.devices.len(),
        p.total_mappings(),
        g.snapshots.len(),
        p.data_block_size,
        p.nr_data_blocks,
        p.time,
        p.transaction
    );
}
