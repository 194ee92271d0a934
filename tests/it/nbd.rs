//! The NBD server (`thinpool nbd serve`, and `thinpool_nbd::NbdServer` in-process) against real
//! clients: qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh (python libnbd), fio's nbd engine, and
//! TLS (x509 certificates made with openssl, and pre-shared keys); plus a hand-written raw client
//! for protocol corners no real client reaches (bad magic, unknown options, the old
//! `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`, a client vanishing in the middle of a write, plain
//! text on a TLS listener).
//!
//! Every test makes a small pool (512 MiB data, 16 MiB metadata, 64 KiB blocks) with 64 MiB
//! volumes, stops the server with SIGTERM (it must exit 0 and commit), and runs `thin_check` on
//! what is left. Random contents are seeded (`THINPOOL_TEST_SEED` replays).

// NBD is big-endian on the wire.
#![allow(clippy::big_endian_bytes)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{RngCore as _, SeedableRng as _};
use serde_json::Value;
use thinpool_engine::{Pool, PoolConfig, PoolOptions};
use thinpool_nbd::{NbdConfig, NbdServer};
use thinpool_tests::nbd::*;
use thinpool_tests::{require_tools, run, run_ok, scratch, test_seed, text, tool};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Size of the test volumes.
const VOL: u64 = 64 * MIB;

fn s(x: impl Into<String>) -> String {
    x.into()
}

/// Random bytes with zero runs at `zeros` (offset, length), `len` bytes in all. No 4 KiB page of
/// the random part is all zero.
fn random_with_zeros(rng: &mut StdRng, len: u64, zeros: &[(u64, u64)]) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    rng.fill_bytes(&mut b);
    for c in b.chunks_mut(4096) {
        c[0] |= 1;
    }
    for &(o, l) in zeros {
        b[o as usize..(o + l) as usize].fill(0);
    }
    b
}

/// Zero runs used by the image tests: aligned, unaligned across block edges, and at the end.
fn zero_runs() -> Vec<(u64, u64)> {
    vec![
        (MIB, 2 * MIB),            // aligned whole blocks
        (5 * MIB + 123, 70_000),   // unaligned, across a 64 KiB edge
        (9 * MIB - 100, BS + 200), // a whole block and bits of its neighbours
        (20 * MIB + 4096, 4096),   // one page inside a block
        (VOL - MIB - 7, MIB + 7),  // the tail, starting unaligned
    ]
}

fn write_file(p: &Path, b: &[u8]) {
    std::fs::write(p, b).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

// ---------------------------------------------------------------------------------------------
// 1. qemu-img

#[test]
fn qemu_img_info_and_convert_round_trip() {
    if !require_tools(&["qemu-img", "cmp", "thin_check"]) {
        return;
    }
    let mut rng = StdRng::seed_from_u64(test_seed());
    let r = PoolRoot::new(&[("v", "64M")]);
    let srv = r.serve(&[]);

    let info = run_ok(tool("qemu-img").args(["info", "--output=json", &srv.uri("v")]));
    let info: Value = serde_json::from_slice(&info.stdout).expect("qemu-img info JSON");
    assert_eq!(info["virtual-size"], VOL, "qemu-img info: {info}");
    assert_eq!(info["format"], "raw", "qemu-img info: {info}");

    // First all random data, then an image with zero runs over it: the zeros must be written.
    let full = r.file("full.img");
    write_file(&full, &random_with_zeros(&mut rng, VOL, &[]));
    let holey = r.file("holey.img");
    write_file(&holey, &random_with_zeros(&mut rng, VOL, &zero_runs()));
    for src in [&full, &holey] {
        run_ok(
            tool("qemu-img")
                .args(["convert", "-n", "-f", "raw", "-O", "raw"])
                .arg(src)
                .arg(srv.uri("v")),
        );
        let back = r.file("back.img");
        let _ = std::fs::remove_file(&back);
        run_ok(
            tool("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw", &srv.uri("v")])
                .arg(&back),
        );
        assert_cmp(src, &back);
    }

    // A read-only export refuses to be written, and keeps its data.
    let out = run(tool("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&full)
        .arg(srv.uri("v@ro")));
    assert!(!out.status.success(), "qemu-img convert to v@ro succeeded");
    let back = r.file("back-ro.img");
    run_ok(
        tool("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &srv.uri("v@ro")])
            .arg(&back),
    );
    assert_cmp(&holey, &back);
    srv.stop();
    r.thin_check();
}

// ---------------------------------------------------------------------------------------------
// 2. qemu-io

#[test]
fn qemu_io_patterns_across_block_boundaries() {
    if !require_tools(&["qemu-io", "thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("v", "64M")]);
    let srv = r.serve(&[]);
    let uri = srv.uri("v");
    // Offsets: 65000 is just below the first 64 KiB edge, 196600 straddles the third, etc.
    let writes = vec![
        s("write -P 0xab 0 1M"),
        s("write -P 0xcd 65000 70000"), // unaligned across blocks 0/1/2
        s("write -f -P 0xef 196600 16"), // FUA, straddling the 196608 edge
        s("discard 262144 131072"),     // blocks 4 and 5: unmapped, read zeros
        s("write -z 400000 100000"),    // NO_HOLE zeroes, unaligned
        s("write -z -u 589820 131080"), // may-unmap zeroes covering block 9 and bits
        s("write -P 0x11 67043328 65536"), // the last block
        s("write -P 0x12 67108863 1"),  // the last byte
    ];
    let checks = vec![
        s("read -P 0xab 0 65000"),
        s("read -P 0xcd 65000 70000"),
        s("read -P 0xab 135000 61600"),
        s("read -P 0xef 196600 16"),
        s("read -P 0xab 196616 65528"),
        s("read -P 0 262144 131072"),
        s("read -P 0xab 393216 6784"),
        s("read -P 0 400000 100000"),
        s("read -P 0xab 500000 89820"),
        s("read -P 0 589820 131080"),
        s("read -P 0xab 720900 327676"),
        s("read -P 0 1048576 65994752"),
        s("read -P 0x11 67043328 65535"),
        s("read -P 0x12 67108863 1"),
    ];
    let mut all = writes.clone();
    all.extend(checks.iter().cloned());
    qemu_io_ok(&uri, false, &all);
    // A new connection (read-only) sees the same.
    qemu_io_ok(&srv.uri("v@ro"), true, &checks);
    // The check can fail: a wrong pattern is reported.
    let out = qemu_io(&uri, true, &[s("read -P 0xab 65000 10")]);
    assert!(
        !out.status.success() || text(&out.stdout).contains("verification failed"),
        "qemu-io did not notice a wrong pattern"
    );
    srv.stop();
    // After the stop, on a fresh server, the same again.
    let srv = r.serve(&[]);
    qemu_io_ok(&srv.uri("v"), true, &checks);
    srv.stop();
    r.thin_check();
}

// ---------------------------------------------------------------------------------------------
// 3. nbdinfo

/// `nbdinfo --map --json` as (offset, length, type) with neighbours of the same type merged.
fn map_of(uri: &str) -> Vec<(u64, u64, u64)> {
    let v = run_ok(tool("nbdinfo").args(["--map", "--json", uri]));
    let j: Value = serde_json::from_slice(&v.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --map --json: {e}\n{}", text(&v.stdout)));
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for e in j.as_array().expect("map is an array") {
        let (o, l, t) = (
            e["offset"].as_u64().expect("offset"),
            e["length"].as_u64().expect("length"),
            e["type"].as_u64().expect("type"),
        );
        match out.last_mut() {
            Some(last) if last.2 == t && last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l, t)),
        }
    }
    out
}

/// The map expected for a volume of `size` bytes whose mapped blocks are `mapped`: data (type
/// 0) and hole+zero (type 3) runs.
fn expected_map(size: u64, mapped: &BTreeSet<u64>) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for b in 0..size.div_ceil(BS) {
        let t = if mapped.contains(&b) { 0 } else { 3 };
        let (o, l) = (b * BS, BS.min(size - b * BS));
        match out.last_mut() {
            Some(last) if last.2 == t => last.1 += l,
            _ => out.push((o, l, t)),
        }
    }
    out
}

#[test]
fn nbdinfo_map_json_and_list() {
    if !require_tools(&["nbdinfo", "qemu-io", "thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("v", "64M"), ("w", "64M")]);
    r.ok(&["vol", "snapshot", "w", "snap"]);
    let srv = r.serve(&[]);
    let uri = srv.uri("v");
    assert_eq!(
        map_of(&uri),
        expected_map(VOL, &BTreeSet::new()),
        "a new volume is one hole"
    );
    qemu_io_ok(
        &uri,
        false,
        &[
            s("write -P 1 0 65536"),         // block 0, aligned
            s("write -P 2 200000 10"),       // block 3, unaligned
            s("write -P 3 1048476 200"),     // blocks 15 and 16
            s("write -P 4 5242880 196608"),  // blocks 80..=82
            s("write -P 5 67108863 1"),      // block 1023, the last byte
            s("write -z 10485860 1000"),     // NO_HOLE zeroes allocate block 160
            s("write -P 6 13107200 131072"), // blocks 200, 201 ...
            s("discard 13107200 131072"),    // ... unmapped again
            s("write -z -u 5242880 65536"),  // may-unmap zeroes: block 80 unmapped
            s("discard 196609 65000"),       // partial block 3: stays mapped
        ],
    );
    let mapped: BTreeSet<u64> = [0, 3, 15, 16, 81, 82, 160, 1023].into_iter().collect();
    assert_eq!(map_of(&uri), expected_map(VOL, &mapped), "map of v");
    assert_eq!(
        map_of(&srv.uri("v@ro")),
        expected_map(VOL, &mapped),
        "map of v@ro"
    );

    // nbdinfo --json: size, flags, block sizes, contexts.
    let j = nbdinfo_json(&[&uri]);
    assert_eq!(j["protocol"], "newstyle-fixed", "{j}");
    assert_eq!(j["TLS"], false);
    assert_eq!(j["structured"], true);
    let e = &j["exports"][0];
    assert_eq!(e["export-name"], "v", "{e}");
    assert_eq!(e["export-size"], VOL, "{e}");
    assert_eq!(e["is_read_only"], false, "{e}");
    for f in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(e[f], true, "{f} in {e}");
    }
    assert!(
        e["contexts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|x| x == "base:allocation")),
        "base:allocation not offered: {e}"
    );
    let (min, pref, max) = (
        e["block_size_minimum"].as_u64().expect("minimum"),
        e["block_size_preferred"].as_u64().expect("preferred"),
        e["block_size_maximum"].as_u64().expect("maximum"),
    );
    assert!(min >= 1 && min <= pref && pref <= max && max >= MIB, "{e}");
    let ro = nbdinfo_json(&[&srv.uri("v@ro")]);
    let e = &ro["exports"][0];
    assert_eq!(e["is_read_only"], true, "{e}");
    assert_eq!(e["can_trim"], false, "{e}");
    assert_eq!(e["can_zero"], false, "{e}");
    assert_eq!(e["export-size"], VOL, "{e}");
    let snap = nbdinfo_json(&[&srv.uri("snap")]);
    assert!(
        snap["exports"][0]["description"]
            .as_str()
            .is_some_and(|d| d.contains("snapshot of w")),
        "{snap}"
    );

    // nbdinfo --list: every volume, snapshots too.
    let sock = srv.socket.clone().expect("unix socket");
    let list = nbdinfo_json(&["--list", &format!("nbd+unix:///?socket={}", sock.display())]);
    let names: BTreeSet<String> = list["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| e["export-name"].as_str().expect("name").to_string())
        .collect();
    let want: BTreeSet<String> = ["v", "w", "snap"].iter().map(|x| x.to_string()).collect();
    assert_eq!(names, want, "nbdinfo --list");
    srv.stop();
    // The map is the engine's truth: vol ls counts the same blocks.
    assert_eq!(r.mapped_blocks("v"), mapped.len() as u64);
    r.thin_check();
}

// ---------------------------------------------------------------------------------------------
// 4. nbdcopy

#[test]
fn nbdcopy_file_to_export_back_and_export_to_export() {
    if !require_tools(&["nbdcopy", "qemu-io", "cmp", "thin_check"]) {
        return;
    }
    let mut rng = StdRng::seed_from_u64(test_seed());
    let r = PoolRoot::new(&[("a", "64M"), ("b", "64M")]);
    let srv = r.serve(&[]);
    let src = r.file("src.img");
    write_file(&src, &random_with_zeros(&mut rng, VOL, &zero_runs()));
    run_ok(tool("nbdcopy").arg(&src).arg(srv.uri("a")));
    let out = r.file("out.img");
    run_ok(tool("nbdcopy").arg(srv.uri("a")).arg(&out));
    assert_cmp(&src, &out);
    // b is full of 0x99 first: the copy must zero what is zero in a.
    qemu_io_ok(&srv.uri("b"), false, &[s("write -P 0x99 0 64M")]);
    run_ok(tool("nbdcopy").arg(srv.uri("a")).arg(srv.uri("b")));
    let out_b = r.file("out-b.img");
    run_ok(tool("nbdcopy").arg(srv.uri("b")).arg(&out_b));
    assert_cmp(&src, &out_b);
    srv.stop();
    r.thin_check();
}

// ---------------------------------------------------------------------------------------------
// 5. Errors, with nbdsh (libnbd with its client-side checks off) and a raw client.

#[test]
fn nbdsh_error_replies() {
    if !require_tools(&["nbdsh", "nbdinfo", "thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("v", "64M"), ("w", "64M")]);
    let srv = r.serve(&[]);
    let script = format!(
        r#"
def expect(what, errname, f):
    try:
        f()
    except nbd.Error as e:
        got = e.errno if isinstance(e.errno, str) else errno.errorcode.get(e.errno)
        if errname == "ENOTSUP" and got == "EOPNOTSUPP":
            got = "ENOTSUP"
        assert got == errname, "%s: expected %s, got %s (%s)" % (what, errname, got, e.string)
        print("ok", what, got)
        return
    raise AssertionError("%s: succeeded, expected %s" % (what, errname))

h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri("{v}")
size = h.get_size()
assert size == {vol}, size
h.pwrite(b"\x5a" * 4096, 0)
expect("read past the end", "EINVAL", lambda: h.pread(512, size - 256))
expect("read starting past the end", "EINVAL", lambda: h.pread(1, size))
expect("write past the end", "ENOSPC", lambda: h.pwrite(b"x" * 512, size - 256))
expect("zero past the end", "ENOSPC", lambda: h.zero(4096, size))
expect("cache past the end", "EINVAL", lambda: h.cache(8192, size - 4096))
expect("read with an unknown flag", "EINVAL", lambda: h.pread(512, 0, flags=1 << 9))
expect("trim with DF", "EINVAL", lambda: h.trim(65536, 0, flags=nbd.CMD_FLAG_DF))
# FUA is valid on every command once SEND_FUA is advertised (the protocol: the server MUST
# accept it, even where it has nothing to do).
assert h.pread(512, 0, flags=nbd.CMD_FLAG_FUA) == b"\x5a" * 512
expect("write with an unknown flag", "EINVAL", lambda: h.pwrite(b"y" * 512, 0, flags=1 << 12))
expect("block status without a meta context", "EINVAL",
       lambda: h.block_status(65536, 0, lambda *a: 0))
expect("allocating fast zero", "ENOTSUP",
       lambda: h.zero(65536, 0, flags=nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE))
h.cache(65536, 0)
# Fast zeroing that may punch holes is fast here: it succeeds and reads back zeros.
h.pwrite(b"\x33" * 65536, 65536)
h.zero(65536, 65536, flags=nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(65536, 65536) == b"\0" * 65536
# The connection survives all of that, and nothing was written by the refused requests.
assert h.pread(4096, 0) == b"\x5a" * 4096
assert h.pread(512, size - 512) == b"\0" * 512
h.flush()
h.shutdown()

ro = nbd.NBD()
ro.set_strict_mode(0)
ro.connect_uri("{v_ro}")
assert ro.is_read_only()
expect("write to @ro", "EPERM", lambda: ro.pwrite(b"z" * 512, 0))
expect("trim on @ro", "EPERM", lambda: ro.trim(65536, 0))
expect("zero on @ro", "EPERM", lambda: ro.zero(65536, 0))
assert ro.pread(4096, 0) == b"\x5a" * 4096
ro.flush()
ro.shutdown()

bs = nbd.NBD()
bs.add_meta_context("base:allocation")
bs.connect_uri("{v}")
ext = []
bs.block_status(4 * 65536, 0, lambda ctx, off, e, err: ext.extend(e) or 0)
assert ext[:4] == [65536, 0, 3 * 65536, 3], ext
bs.set_strict_mode(0)
expect("block status past the end", "EINVAL",
       lambda: bs.block_status(2 * 65536, size - 65536, lambda *a: 0))
bs.shutdown()
"#,
        v = srv.uri("v"),
        v_ro = srv.uri("v@ro"),
        vol = VOL,
    );
    let out = nbdsh_ok(&script);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        14,
        "{out}"
    );

    // Unknown export: the handshake fails and the error names it.
    let out = run(tool("nbdinfo").arg(srv.uri("nosuch")));
    assert!(
        !out.status.success(),
        "nbdinfo on an unknown export succeeded"
    );
    assert!(
        text(&out.stderr).contains("nosuch"),
        "the error does not name the export:\n{}",
        text(&out.stderr)
    );
    // Empty name with two volumes: no default export.
    let out = run(tool("nbdinfo").arg(srv.uri("")));
    assert!(
        !out.status.success(),
        "the empty export name picked a volume of two"
    );
    srv.stop();
    r.thin_check();
}

/// The protocol: "The server SHOULD return `ENOSPC` if it receives a write request including
/// one or more sectors beyond the size of the device. It SHOULD return `EINVAL` if it receives
/// a read or trim request including one or more sectors beyond the size of the device."
#[test]
fn trim_past_the_end_is_einval() {
    if !require_tools(&["thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("v", "64M")]);
    let srv = r.serve(&[]);
    let mut c = RawClient::connect(srv.socket.as_ref().expect("unix socket"), 3);
    c.go("v");
    c.request(CMD_TRIM, 0, 1, VOL - BS, 2 * BS as u32, &[]);
    let trim = c.simple_reply();
    c.request(CMD_WRITE_ZEROES, 0, 2, VOL - BS, 2 * BS as u32, &[]);
    let zero = c.simple_reply();
    c.request(CMD_DISC, 0, 3, 0, 0, &[]);
    srv.stop();
    r.thin_check();
    assert_eq!(zero, (28, 2), "write zeroes past the end: ENOSPC");
    assert_eq!(
        trim,
        (22, 1),
        "trim past the end: EINVAL (the protocol's SHOULD), not ENOSPC"
    );
}

#[test]
fn client_vanishing_mid_write_loses_nothing_flushed() {
    if !require_tools(&["qemu-io", "thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("v", "64M")]);
    let srv = r.serve(&[]);
    let sock = srv.socket.clone().expect("unix socket");
    qemu_io_ok(&srv.uri("v"), false, &[s("write -P 0x42 0 2M"), s("flush")]);
    // A client sends a 1 MiB write with 4 KiB of its payload, then vanishes.
    {
        let mut c = RawClient::connect(&sock, 3);
        c.go("v");
        c.request(CMD_WRITE, 0, 1, 0, 1 << 20, &[0xee; 4096]);
    }
    // Another sends only a write header.
    {
        let mut c = RawClient::connect(&sock, 3);
        c.go("v");
        c.send(&request_header(
            REQUEST_MAGIC,
            CMD_WRITE,
            0,
            2,
            65536,
            65536,
        ));
    }
    // And one vanishes in the middle of the handshake.
    {
        let mut c = RawClient::connect(&sock, 3);
        c.option(OPT_GO, &[0, 0]);
    }
    // The server still serves: reads and writes on new connections, nothing of the partial
    // writes applied.
    qemu_io_ok(
        &srv.uri("v"),
        false,
        &[s("read -P 0x42 0 2M"), s("write -P 0x43 4M 1M"), s("flush")],
    );
    // Crash the server: what was flushed must be there.
    srv.crash();
    let srv = r.serve(&[]);
    qemu_io_ok(
        &srv.uri("v"),
        true,
        &[s("read -P 0x42 0 2M"), s("read -P 0x43 4M 1M")],
    );
    srv.stop();
    r.thin_check();
}

/// Wrong request magic: the server closes the connection (nothing to answer: the cookie is not
/// trustworthy), and keeps serving others.
#[test]
fn raw_bad_request_magic_closes_the_connection() {
    if !require_tools(&["thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("v", "64M")]);
    let srv = r.serve(&[]);
    let sock = srv.socket.clone().expect("unix socket");
    let mut c = RawClient::connect(&sock, 3);
    c.go("v");
    c.send(&request_header(0xdead_beef, CMD_READ, 0, 7, 0, 512));
    assert!(c.closed_by_server());

    // An unknown command type is refused with EINVAL, and the connection goes on.
    drop(c);
    let mut c = RawClient::connect(&sock, 3);
    c.go("v");
    c.request(99, 0, 8, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (22, 8), "unknown command: EINVAL");
    c.request(CMD_READ, 0, 9, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (0, 9));
    assert_eq!(c.read_n(512), vec![0u8; 512]);
    c.request(CMD_DISC, 0, 10, 0, 0, &[]);
    assert!(c.closed_by_server(), "NBD_CMD_DISC: the server closes");
    drop(c);
    srv.stop();
    r.thin_check();
}

#[test]
fn raw_handshake_options() {
    if !require_tools(&["thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("v", "64M"), ("w", "1M")]);
    let srv = r.serve(&[]);
    let sock = srv.socket.clone().expect("unix socket");

    // The greeting offers FIXED_NEWSTYLE and NO_ZEROES.
    let mut c = RawClient::connect(&sock, 3);
    assert_eq!(
        c.server_flags & 3,
        3,
        "handshake flags {:#x}",
        c.server_flags
    );
    // An unknown option: NBD_REP_ERR_UNSUP for that option, and the handshake goes on.
    c.option(0x4242, b"whatever");
    let rep = c.opt_reply();
    assert_eq!(rep.option, 0x4242);
    assert_eq!(rep.kind, REP_ERR_UNSUP, "{rep:?}");
    // NBD_OPT_LIST still works, with every volume.
    c.option(OPT_LIST, &[]);
    let reps = c.opt_replies();
    assert_eq!(reps.last().expect("replies").kind, REP_ACK);
    let names: BTreeSet<String> = reps
        .iter()
        .filter(|r| r.kind == REP_SERVER)
        .map(|r| {
            let n = u32_at(&r.data, 0) as usize;
            String::from_utf8(r.data[4..4 + n].to_vec()).expect("UTF-8 name")
        })
        .collect();
    assert_eq!(names, ["v", "w"].iter().map(|x| x.to_string()).collect());
    // GO on an unknown export: NBD_REP_ERR_UNKNOWN, still negotiating.
    let mut d = Vec::new();
    d.extend_from_slice(&6u32.to_be_bytes());
    d.extend_from_slice(b"nosuch");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.option(OPT_GO, &d);
    let reps = c.opt_replies();
    assert_eq!(reps.len(), 1);
    assert_eq!(reps[0].kind, REP_ERR_UNKNOWN, "{reps:?}");
    // Then structured replies, base:allocation, GO: reads come as chunks.
    c.structured_replies();
    let ctx = c.set_base_allocation("v");
    let (size, flags) = c.go("v");
    assert_eq!(size, VOL);
    assert_eq!(flags & TFLAG_HAS_FLAGS, TFLAG_HAS_FLAGS);
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    let data: Vec<u8> = (0..BS as usize + 1000)
        .map(|i| (i % 251) as u8 + 1)
        .collect();
    c.request(CMD_WRITE, 0, 1, 0, data.len() as u32, &data);
    assert_eq!(c.simple_reply(), (0, 1));
    c.request(CMD_FLUSH, 0, 2, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (0, 2));
    // A read over data and holes: data and hole chunks that tile the range exactly.
    let len = 4 * BS;
    c.request(CMD_READ, 0, 3, 0, len as u32, &[]);
    let mut image = vec![0xffu8; len as usize];
    let mut covered = 0u64;
    for ch in c.chunks() {
        assert_eq!(ch.cookie, 3);
        let off = u64_at(&ch.data, 0);
        match ch.kind {
            REPLY_TYPE_OFFSET_DATA => {
                let d = &ch.data[8..];
                image[off as usize..off as usize + d.len()].copy_from_slice(d);
                covered += d.len() as u64;
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let n = u32_at(&ch.data, 8) as usize;
                image[off as usize..off as usize + n].fill(0);
                covered += n as u64;
            }
            k => panic!("unexpected chunk type {k} in a read reply"),
        }
    }
    assert_eq!(covered, len, "chunks do not tile the read");
    let mut want = data.clone();
    want.resize(len as usize, 0);
    assert!(image == want, "structured read returned the wrong bytes");
    // Block status: data for blocks 0..=1, hole for 2..=3.
    c.request(CMD_BLOCK_STATUS, 0, 4, 0, len as u32, &[]);
    let chunks = c.chunks();
    let bs = chunks
        .iter()
        .find(|c| c.kind == REPLY_TYPE_BLOCK_STATUS)
        .expect("a block status chunk");
    assert_eq!(u32_at(&bs.data, 0), ctx);
    let desc: Vec<(u32, u32)> = bs.data[4..]
        .chunks(8)
        .map(|d| (u32_at(d, 0), u32_at(d, 4)))
        .collect();
    assert_eq!(desc, vec![(2 * BS as u32, 0), (2 * BS as u32, 3)]);
    // Many requests in flight at once: every one answered once, whatever the order.
    for k in 0..40u64 {
        c.request(CMD_READ, 0, 100 + k, k * 4096, 4096, &[]);
    }
    let mut seen = BTreeSet::new();
    while seen.len() < 40 {
        for ch in c.chunks() {
            assert!(
                (100..140).contains(&ch.cookie),
                "stray cookie {}",
                ch.cookie
            );
            if ch.flags & REPLY_FLAG_DONE != 0 {
                assert!(
                    seen.insert(ch.cookie),
                    "cookie {} answered twice",
                    ch.cookie
                );
            }
        }
    }
    // A structured error chunk for a read past the end.
    c.request(CMD_READ, 0, 5, VOL - 10, 20, &[]);
    let ch = c.chunks();
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].kind, REPLY_TYPE_ERROR);
    assert_eq!(u32_at(&ch[0].data, 0), 22, "EINVAL");
    assert_eq!(
        u16_at(&ch[0].data, 4) as usize,
        ch[0].data.len() - 6,
        "error message length"
    );
    c.request(CMD_DISC, 0, 6, 0, 0, &[]);
    assert!(c.closed_by_server());

    // Block status without a meta context: a structured error, not a crash.
    drop(c);
    let mut c = RawClient::connect(&sock, 3);
    c.structured_replies();
    c.go("v");
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, 4096, &[]);
    let ch = c.chunks();
    assert_eq!(ch.len(), 1, "{ch:?}");
    assert_eq!(ch[0].kind, REPLY_TYPE_ERROR);
    assert_eq!(u32_at(&ch[0].data, 0), 22, "EINVAL");

    // NBD_OPT_ABORT: acknowledged, then the server closes.
    drop(c);
    let mut c = RawClient::connect(&sock, 3);
    c.option(OPT_ABORT, &[]);
    let rep = c.opt_reply();
    assert_eq!(
        (rep.option, rep.kind, rep.data.len()),
        (OPT_ABORT, REP_ACK, 0)
    );
    assert!(c.closed_by_server());

    // Unknown client flags: the server closes.
    drop(c);
    let mut c = RawClient::connect(&sock, 1 << 7);
    assert!(c.closed_by_server());
    drop(c);
    srv.stop();
    r.thin_check();
}

#[test]
fn raw_export_name_old_style() {
    if !require_tools(&["thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("v", "64M")]);
    let srv = r.serve(&[]);
    let sock = srv.socket.clone().expect("unix socket");
    // With NO_ZEROES: size and flags only.
    let mut c = RawClient::connect(&sock, 3);
    c.option(OPT_EXPORT_NAME, b"v");
    let rep = c.read_n(10);
    assert_eq!(u64_at(&rep, 0), VOL);
    let flags = u16_at(&rep, 8);
    assert_eq!(flags & (TFLAG_HAS_FLAGS | TFLAG_READ_ONLY), TFLAG_HAS_FLAGS);
    let data = vec![0x3cu8; 3000];
    c.request(CMD_WRITE, 0, 1, BS - 1000, 3000, &data);
    assert_eq!(c.simple_reply(), (0, 1));
    c.request(CMD_READ, 0, 2, BS - 1000, 3000, &[]);
    assert_eq!(c.simple_reply(), (0, 2));
    assert!(c.read_n(3000) == data);
    c.request(CMD_DISC, 0, 3, 0, 0, &[]);
    assert!(c.closed_by_server());

    // Without NO_ZEROES: 124 zero bytes follow; `v@ro` is read-only.
    drop(c);
    let mut c = RawClient::connect(&sock, 1);
    c.option(OPT_EXPORT_NAME, b"v@ro");
    let rep = c.read_n(134);
    assert_eq!(u64_at(&rep, 0), VOL);
    assert_ne!(
        u16_at(&rep, 8) & TFLAG_READ_ONLY,
        0,
        "v@ro is not read-only"
    );
    assert!(rep[10..].iter().all(|&b| b == 0), "padding is not zero");
    c.request(CMD_READ, 0, 4, BS - 1000, 3000, &[]);
    assert_eq!(c.simple_reply(), (0, 4));
    assert!(c.read_n(3000) == data);
    c.request(CMD_WRITE, 0, 5, 0, 512, &[1; 512]);
    assert_eq!(c.simple_reply(), (1, 5), "write to v@ro: EPERM");

    // An empty name picks the only volume.
    drop(c);
    let mut c = RawClient::connect(&sock, 3);
    c.option(OPT_EXPORT_NAME, b"");
    assert_eq!(u64_at(&c.read_n(10), 0), VOL);

    // An unknown name: the server can only close.
    drop(c);
    let mut c = RawClient::connect(&sock, 3);
    c.option(OPT_EXPORT_NAME, b"nosuch");
    assert!(c.closed_by_server());
    drop(c);
    srv.stop();
    r.thin_check();
}

// ---------------------------------------------------------------------------------------------
// 6. fio

fn fio(dir: &Path, uri: &str, extra: &[&str]) -> std::process::Output {
    let mut c = tool("fio");
    // In a scratch folder, with no verify state files saved on a failed verify.
    c.current_dir(dir)
        .args([
            "--verify_state_save=0",
            "--name=thinpool",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=8M",
            "--numjobs=4",
            "--offset_increment=8M",
            "--iodepth=16",
            "--verify=crc32c",
            "--group_reporting",
        ])
        .args(extra);
    run(&mut c)
}

#[test]
fn fio_random_writes_verify_over_four_connections() {
    if !require_tools(&["fio", "qemu-io", "thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("v", "64M")]);
    let srv = r.serve(&[]);
    let uri = srv.uri("v");
    // Four jobs (four connections), 8 MiB each at 0, 8, 16, 24 MiB; verified as written.
    let out = fio(r.scratch_dir(), &uri, &["--do_verify=1"]);
    assert!(out.status.success(), "fio write+verify failed");
    assert!(
        text(&out.stdout).contains("err= 0"),
        "{}",
        text(&out.stdout)
    );
    // A second run reads everything back and verifies it.
    let out = fio(r.scratch_dir(), &uri, &["--verify_only"]);
    assert!(out.status.success(), "fio verify-only failed");
    // The check can fail: spoil a page of the third job's range, and the verify must notice.
    qemu_io_ok(&uri, false, &[s("write -P 0 17825792 4096")]);
    let out = fio(r.scratch_dir(), &uri, &["--verify_only"]);
    assert!(
        !out.status.success(),
        "fio verify did not notice a spoiled page"
    );
    srv.stop();
    r.thin_check();
}

// ---------------------------------------------------------------------------------------------
// 7. TLS

/// A CA and a server certificate for 127.0.0.1/localhost made with openssl: returns the folder
/// with ca-cert.pem, server-cert.pem and server-key.pem.
fn make_pki(dir: &Path, subject: &str) {
    std::fs::create_dir_all(dir).expect("create the pki folder");
    let ossl = |args: &[&str]| {
        run_ok(tool("openssl").current_dir(dir).args(args));
    };
    ossl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        &format!("/CN={subject} CA"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    ossl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "server-key.pem",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n\
         subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("write ext.cnf");
    ossl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca-cert.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-out",
        "server-cert.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

#[test]
fn tls_nbdinfo_and_qemu_img_round_trip() {
    if !require_tools(&["openssl", "nbdinfo", "qemu-img", "cmp", "thin_check"]) {
        return;
    }
    let mut rng = StdRng::seed_from_u64(test_seed());
    let r = PoolRoot::new(&[("v", "64M")]);
    let pki = r.scratch_dir().join("pki");
    make_pki(&pki, "thinpool test");
    // What the clients get: only the CA.
    let client = r.scratch_dir().join("client");
    std::fs::create_dir(&client).expect("mkdir");
    std::fs::copy(pki.join("ca-cert.pem"), client.join("ca-cert.pem")).expect("copy CA");
    let other = r.scratch_dir().join("other");
    make_pki(&other, "another");

    let port = free_tcp_port();
    let cert = pki.join("server-cert.pem");
    let key = pki.join("server-key.pem");
    let srv = r.serve_tcp(
        port,
        &["--tls-cert", path_str(&cert), "--tls-key", path_str(&key)],
    );
    let tls_uri = |export: &str, dir: &Path| {
        format!(
            "nbds://127.0.0.1:{port}/{export}?tls-certificates={}",
            dir.display()
        )
    };
    // With the CA (and the hostname checked against the certificate's IP SAN).
    let j = nbdinfo_json(&[&tls_uri("v", &client)]);
    assert_eq!(j["TLS"], true, "{j}");
    assert_eq!(j["exports"][0]["export-size"], VOL, "{j}");
    // A CA that did not sign the server's certificate: refused by the client.
    let out = run(tool("nbdinfo").arg(tls_uri("v", &other)));
    assert!(
        !out.status.success(),
        "nbdinfo trusted a certificate of another CA"
    );
    // Without TLS: the server refuses.
    assert_plain_refused(port, "TLS");

    // qemu-img over TLS, both ways.
    let src = r.file("src.img");
    write_file(&src, &random_with_zeros(&mut rng, VOL, &zero_runs()));
    let creds = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        client.display()
    );
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=v,tls-creds=tls0"
    );
    run_ok(
        tool("qemu-img")
            .args(["convert", "-n", "--object", &creds, "-f", "raw"])
            .arg("--target-image-opts")
            .arg(&src)
            .arg(&opts),
    );
    let back = r.file("back.img");
    run_ok(
        tool("qemu-img")
            .args([
                "convert",
                "--object",
                &creds,
                "--image-opts",
                &opts,
                "-O",
                "raw",
            ])
            .arg(&back),
    );
    assert_cmp(&src, &back);
    srv.stop();
    r.thin_check();
}

/// `count` random bytes as lowercase hex (a PSK as `psktool` writes it).
fn random_hex(rng: &mut StdRng, count: usize) -> String {
    let mut b = vec![0u8; count];
    rng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// TLS with pre-shared keys (`--tls-psk FILE`: OpenSSL on our side, GnuTLS in libnbd and qemu)
/// on a TCP loopback port: nbdinfo connects with the key file and an identity from it (libnbd
/// takes the identity from the URI's user part), qemu-img writes an image and reads it back
/// through `tls-creds-psk` (which reads `DIR/keys.psk`). A wrong key, a known key under an
/// identity the server does not have, and plain-text clients are all refused.
#[test]
fn tls_psk_nbdinfo_and_qemu_img_round_trip() {
    if !require_tools(&["nbdinfo", "qemu-img", "cmp", "thin_check"]) {
        return;
    }
    let mut rng = StdRng::seed_from_u64(test_seed());
    let r = PoolRoot::new(&[("v", "64M")]);
    let (alice, bob) = (random_hex(&mut rng, 32), random_hex(&mut rng, 16));
    let psk_dir = |name: &str, lines: &str| {
        let dir = r.scratch_dir().join(name);
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("keys.psk"), lines).expect("write keys.psk");
        dir
    };
    let keys = psk_dir("keys", &format!("# test keys\nalice:{alice}\nbob:{bob}\n"));
    // The client's own copies: the right one, alice with another key, alice's key as carol.
    let good = psk_dir("good", &format!("alice:{alice}\nbob:{bob}\n"));
    let wrong = psk_dir("wrong", &format!("alice:{}\n", random_hex(&mut rng, 32)));
    let stranger = psk_dir("stranger", &format!("carol:{alice}\n"));

    let port = free_tcp_port();
    let srv = r.serve_tcp(port, &["--tls-psk", path_str(&keys.join("keys.psk"))]);
    let uri = |id: &str, dir: &Path| {
        format!(
            "nbds://{id}@127.0.0.1:{port}/v?tls-psk-file={}",
            dir.join("keys.psk").display()
        )
    };
    for id in ["alice", "bob"] {
        let j = nbdinfo_json(&[&uri(id, &good)]);
        assert_eq!(j["TLS"], true, "{id}: {j}");
        assert_eq!(j["exports"][0]["export-size"], VOL, "{id}: {j}");
    }
    for (what, id, dir) in [
        ("a wrong key", "alice", &wrong),
        ("an unknown identity", "carol", &stranger),
    ] {
        let out = run(tool("nbdinfo").arg(uri(id, dir)));
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains("gnutls_handshake"),
            "nbdinfo with {what} was not refused in the TLS handshake ({}):\n{err}",
            out.status
        );
    }
    // Plain text: real clients fail, and the server says why to a raw one.
    assert_plain_refused(port, "PSK");
    let mut raw = RawClient::connect_tcp(port, 3);
    for opt in [OPT_LIST, OPT_GO] {
        let data = if opt == OPT_GO {
            b"\0\0\0\x01v\0\0".as_slice()
        } else {
            &[]
        };
        raw.option(opt, data);
        let reply = raw.opt_reply();
        assert_eq!(
            (reply.option, reply.kind),
            (opt, REP_ERR_TLS_REQD),
            "option {opt} in plain text: {reply:?} ({})",
            String::from_utf8_lossy(&reply.data)
        );
    }
    raw.option(OPT_ABORT, &[]);
    drop(raw);

    // qemu-img over TLS-PSK, both ways.
    let src = r.file("src.img");
    write_file(&src, &random_with_zeros(&mut rng, VOL, &zero_runs()));
    let creds = |dir: &Path| {
        format!(
            "tls-creds-psk,id=tls0,endpoint=client,dir={},username=alice",
            dir.display()
        )
    };
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=v,tls-creds=tls0"
    );
    run_ok(
        tool("qemu-img")
            .args(["convert", "-n", "--object", &creds(&good), "-f", "raw"])
            .arg("--target-image-opts")
            .arg(&src)
            .arg(&opts),
    );
    let back = r.file("back.img");
    run_ok(
        tool("qemu-img")
            .args(["convert", "--object", &creds(&good), "--image-opts", &opts])
            .args(["-O", "raw"])
            .arg(&back),
    );
    assert_cmp(&src, &back);
    let out =
        run(tool("qemu-img").args(["info", "--object", &creds(&wrong), "--image-opts", &opts]));
    assert!(!out.status.success(), "qemu-img connected with a wrong key");
    srv.stop();
    r.thin_check();
}

#[test]
fn listening_on_all_addresses_without_tls_is_refused() {
    let r = PoolRoot::new(&[("v", "64M")]);
    let port = free_tcp_port();
    let listen = format!("0.0.0.0:{port}");
    let out = run(&mut r.cmd(&["nbd", "serve", "--listen", &listen]));
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "serving on {listen} without TLS: {}",
        out.status
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("TLS") && err.contains(&listen),
        "the message does not say why: {err}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something listens on {port}"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Snapshots

#[test]
fn snapshot_exports_are_read_only_and_keep_their_data() {
    if !require_tools(&["qemu-io", "nbdsh", "nbdinfo", "thin_check"]) {
        return;
    }
    let dir = scratch();
    let root = dir.path().join("root");
    let cfg = PoolConfig {
        data_size: 512 * MIB,
        metadata_size: 16 * MIB,
        ..PoolConfig::default()
    };
    let pool = Arc::new(Pool::create(&root, &cfg, PoolOptions::default()).expect("create pool"));
    pool.create_volume("v", VOL).expect("create v");
    let sock = dir.path().join("a.sock");
    let server = NbdServer::start(
        pool.clone(),
        &NbdConfig {
            unix_socket: Some(sock.clone()),
            ..NbdConfig::default()
        },
    )
    .expect("start the server");
    assert_eq!(server.unix_socket(), Some(sock.as_path()));
    let uri = |sock: &Path, e: &str| format!("nbd+unix:///{e}?socket={}", sock.display());

    qemu_io_ok(&uri(&sock, "v"), false, &[s("write -P 0xaa 0 1M")]);
    // Snapshot while the server runs, then overwrite part of the origin through NBD.
    pool.snapshot("v", "snap").expect("snapshot v");
    qemu_io_ok(
        &uri(&sock, "v"),
        false,
        &[s("write -P 0xbb 0 512K"), s("write -P 0xcc 1M 64K")],
    );
    let snap_checks = [s("read -P 0xaa 0 1M"), s("read -P 0 1M 63M")];
    qemu_io_ok(&uri(&sock, "snap@ro"), true, &snap_checks);
    qemu_io_ok(&uri(&sock, "snap"), true, &snap_checks);
    qemu_io_ok(
        &uri(&sock, "v"),
        true,
        &[
            s("read -P 0xbb 0 512K"),
            s("read -P 0xaa 512K 512K"),
            s("read -P 0xcc 1M 64K"),
        ],
    );
    // snap@ro refuses writes: qemu cannot open it read-write, and the server says EPERM.
    let out = qemu_io(&uri(&sock, "snap@ro"), false, &[s("write -P 1 0 4k")]);
    assert!(!out.status.success(), "qemu-io wrote to snap@ro");
    let ro_write = |u: &str| {
        format!(
            r#"
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri("{u}")
assert h.is_read_only(), "not read-only"
try:
    h.pwrite(b"\x01" * 4096, 0)
    raise AssertionError("write succeeded")
except nbd.Error as e:
    assert e.errno in ("EPERM", errno.EPERM), e.errno
try:
    h.zero(65536, 0)
    raise AssertionError("zero succeeded")
except nbd.Error as e:
    assert e.errno in ("EPERM", errno.EPERM), e.errno
assert h.pread(4, 0) == b"\xaa" * 4
print("refused")
"#
        )
    };
    assert!(nbdsh_ok(&ro_write(&uri(&sock, "snap@ro"))).contains("refused"));
    // Without @ro and without --snapshots-read-only, the snapshot is writable.
    let j = nbdinfo_json(&[&uri(&sock, "snap")]);
    assert_eq!(j["exports"][0]["is_read_only"], false, "{j}");

    // A second server on the same pool with snapshots read-only: the snapshot is, v is not.
    let sock2 = dir.path().join("b.sock");
    let server2 = NbdServer::start(
        pool.clone(),
        &NbdConfig {
            unix_socket: Some(sock2.clone()),
            snapshots_read_only: true,
            ..NbdConfig::default()
        },
    )
    .expect("start the second server");
    let j = nbdinfo_json(&[&uri(&sock2, "snap")]);
    assert_eq!(j["exports"][0]["is_read_only"], true, "{j}");
    let j = nbdinfo_json(&[&uri(&sock2, "v")]);
    assert_eq!(j["exports"][0]["is_read_only"], false, "{j}");
    assert!(nbdsh_ok(&ro_write(&uri(&sock2, "snap"))).contains("refused"));
    qemu_io_ok(&uri(&sock2, "v"), false, &[s("write -P 0xdd 2M 64K")]);
    qemu_io_ok(&uri(&sock2, "snap"), true, &snap_checks);
    server2.stop();
    server.stop();
    assert!(!sock.exists() && !sock2.exists(), "sockets left behind");
    // `NbdServer::stop` joins every connection thread: the pool is ours alone again.
    Arc::try_unwrap(pool)
        .unwrap_or_else(|_| panic!("the pool is still shared after the servers stopped"))
        .close()
        .expect("close the pool");

    // The CLI's --snapshots-read-only does the same.
    let r_meta = root.join("pool").join("metadata");
    let out = run(tool("thin_check").arg(&r_meta));
    assert!(
        out.status.success(),
        "thin_check after the in-process servers"
    );
    let mut cmd = thinpool_tests::thinpool(["--root".as_ref(), root.as_os_str()]);
    let sock3 = dir.path().join("c.sock");
    cmd.args(["nbd", "serve", "--snapshots-read-only", "--socket"])
        .arg(&sock3)
        .env_remove("THINPOOL_ROOT");
    let cli = Server::start(cmd, dir.path().join("serve.log"), Some(sock3.clone()), None);
    assert!(nbdsh_ok(&ro_write(&uri(&sock3, "snap"))).contains("refused"));
    qemu_io_ok(&uri(&sock3, "snap"), true, &snap_checks);
    qemu_io_ok(&uri(&sock3, "v"), true, &[s("read -P 0xdd 2M 64K")]);
    qemu_io_ok(&uri(&sock3, "v"), false, &[s("write -P 0xee 3M 64K")]);
    cli.stop();
    let out = run(tool("thin_check").arg(&r_meta));
    assert!(out.status.success(), "thin_check after the CLI server");
}

// ---------------------------------------------------------------------------------------------
// 9. Graceful stop

#[test]
fn sigterm_commits_unflushed_writes() {
    if !require_tools(&["qemu-io", "thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("v", "64M")]);
    let srv = r.serve(&[]);
    let sock = srv.socket.clone().expect("unix socket");
    qemu_io_ok(&srv.uri("v"), false, &[s("write -P 0x5a 0 3M")]);
    // A raw client writes without flushing and stays connected through the SIGTERM.
    let mut c = RawClient::connect(&sock, 3);
    c.go("v");
    let data = vec![0x77u8; 200_000];
    c.request(CMD_WRITE, 0, 1, 8 * MIB + 1000, data.len() as u32, &data);
    assert_eq!(c.simple_reply(), (0, 1));
    c.request(CMD_DISC, 0, 2, 0, 0, &[]);
    assert!(c.closed_by_server());
    srv.stop();
    // 3 MiB = 48 blocks, plus 8 MiB + 1000 .. + 201000 = blocks 128..=131.
    assert_eq!(r.mapped_blocks("v"), 48 + 4);
    r.thin_check();
    let srv = r.serve(&[]);
    qemu_io_ok(
        &srv.uri("v"),
        true,
        &[
            s("read -P 0x5a 0 3M"),
            s("read -P 0 3M 5M"),
            s("read -P 0 8M 1000"),
            s("read -P 0x77 8389608 200000"),
            s("read -P 0 8589608 4000"),
        ],
    );
    srv.stop();
    r.thin_check();
}

// ---------------------------------------------------------------------------------------------
// Stop and the pool

/// `NbdServer::stop` says the caller commits the pool afterwards (`thinpool nbd serve` takes it
/// back with `Arc::try_unwrap` and closes it): once `stop` returns, no connection may still hold
/// the pool. Clients that disconnect just as the server stops must not keep it.
#[test]
fn stop_right_after_clients_leave_releases_the_pool() {
    let dir = scratch();
    let root = dir.path().join("root");
    let cfg = PoolConfig {
        data_size: 512 * MIB,
        metadata_size: 16 * MIB,
        ..PoolConfig::default()
    };
    let pool = Arc::new(Pool::create(&root, &cfg, PoolOptions::default()).expect("create pool"));
    pool.create_volume("v", VOL).expect("create v");
    let sock = dir.path().join("s.sock");
    let rounds = 100;
    let mut held = 0;
    for _ in 0..rounds {
        let server = NbdServer::start(
            pool.clone(),
            &NbdConfig {
                unix_socket: Some(sock.clone()),
                ..NbdConfig::default()
            },
        )
        .expect("start the server");
        let mut clients: Vec<RawClient> = (0..4)
            .map(|_| {
                let mut c = RawClient::connect(&sock, 3);
                c.go("v");
                c
            })
            .collect();
        for c in &mut clients {
            c.request(CMD_DISC, 0, 1, 0, 0, &[]);
        }
        drop(clients);
        server.stop();
        if Arc::strong_count(&pool) != 1 {
            held += 1;
        }
        // Let stray threads finish before the next round.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(&pool) != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the pool is never released"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    Arc::try_unwrap(pool)
        .unwrap_or_else(|_| panic!("the pool is still shared"))
        .close()
        .expect("close the pool");
    assert_eq!(
        held, 0,
        "in {held} of {rounds} rounds a connection thread still held the pool after \
         NbdServer::stop returned (`thinpool nbd serve` then fails with \"the pool is still in \
         use\" and exits 1 without closing the pool)"
    );
}

/// SIGTERM while clients are connected (one idle after an unflushed write, one in the middle of
/// the handshake): the server closes them, commits, and exits 0; the write is kept. Several
/// rounds, since the bug this found is a race.
#[test]
fn sigterm_with_clients_connected_exits_0() {
    if !require_tools(&["qemu-io", "thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("v", "64M")]);
    let mut failures = Vec::new();
    for round in 0..10u64 {
        let srv = r.serve(&[]);
        let sock = srv.socket.clone().expect("unix socket");
        let mut c = RawClient::connect(&sock, 3);
        c.go("v");
        let data = vec![0x60 + round as u8; 4096];
        c.request(CMD_WRITE, 0, 1, round * BS, 4096, &data);
        assert_eq!(c.simple_reply(), (0, 1));
        let mut half = RawClient::connect(&sock, 3);
        half.option(OPT_LIST, &[]);
        let _ = half.opt_replies();
        let mut srv = srv;
        let st = srv.terminate();
        assert!(c.closed_by_server(), "the connection outlived the server");
        if !st.success() {
            failures.push(format!(
                "round {round}: exit status {st}:\n{}",
                srv.log_text()
            ));
        }
        drop(srv);
        r.thin_check();
    }
    // Whatever the exit status, nothing acknowledged may be lost once the server is gone
    // (a server that did not close the pool relies on the commit timer or the pool's drop).
    let srv = r.serve(&[]);
    let cmds: Vec<String> = (0..10u64)
        .map(|k| format!("read -P {:#x} {} 4096", 0x60 + k, k * BS))
        .collect();
    let out = qemu_io(&srv.uri("v"), true, &cmds);
    if !out.status.success() {
        failures.push(format!(
            "acknowledged writes lost across SIGTERM:\n{}",
            text(&out.stdout)
        ));
    }
    srv.stop();
    r.thin_check();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Plain (non-TLS) nbdinfo, for an export and for the list, is refused by the server on
/// 127.0.0.1:`port`, a `kind` (TLS or PSK) listener.
fn assert_plain_refused(port: u16, kind: &str) {
    let out = run(tool("nbdinfo").arg(format!("nbd://127.0.0.1:{port}/v")));
    assert!(
        !out.status.success(),
        "plain NBD was served on a {kind} listener"
    );
    let out = run(tool("nbdinfo").args(["--list", &format!("nbd://127.0.0.1:{port}/")]));
    assert!(
        !out.status.success(),
        "plain NBD listed exports on a {kind} listener"
    );
}
