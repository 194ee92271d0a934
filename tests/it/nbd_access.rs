//! Who can reach what over NBD (issue 15, "TCP access"). TCP without TLS gives anyone who can
//! reach the port, loopback included (every local user), read-write access to every volume:
//! `up` and `nbd serve` refuse `--listen` without TLS unless `--insecure-tcp` (or the TOML key
//! `insecure_tcp = true`) says so, and then warn in the log. A TLS-PSK identity named in
//! `--psk-exports IDENTITY=VOL,...` lists and opens only those volumes (real GnuTLS clients:
//! nbdinfo with `tls-psk-file=`); identities not named see every volume.

use std::path::Path;

use serde_json::Value;
use thinpool_tests::nbd::*;
use thinpool_tests::{require_tools, run, scratch, text, tool};

/// `thinpool … up` on an existing pool, with nothing but NBD (no FUSE, no snapshotter).
fn up_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["up", "--no-fuse", "--no-snapshotter"];
    a.extend_from_slice(extra);
    a
}

/// The command was refused (exit status 1, not a crash) with a message naming `--insecure-tcp`
/// and the address, and nothing listens on the port.
fn assert_refused_without_tls(out: &std::process::Output, listen: &str, port: u16) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}: {err}", out.status);
    assert!(
        err.contains("--insecure-tcp") && err.contains(listen) && err.contains("without TLS"),
        "the refusal does not name --insecure-tcp and {listen}: {err}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something listens on {port}"
    );
}

fn assert_warned(log: &str, port: u16) {
    let addr = format!("127.0.0.1:{port}");
    assert!(
        log.contains(&format!(
            "serving TCP {addr} without TLS (--insecure-tcp): anyone who can reach {addr} reads \
             and writes every volume"
        )),
        "no warning in the log:\n{log}"
    );
}

/// Plain TCP on loopback: refused by `up` (before any pool is made) and `nbd serve` without
/// `--insecure-tcp`; served with the flag or the TOML key, with the warning in the log.
#[test]
fn tcp_without_tls_needs_insecure_tcp() {
    if !require_tools(&["nbdinfo", "thin_check"]) {
        return;
    }
    // `up` on an empty root: refused, and no pool made.
    let empty = scratch();
    let root = empty.path().join("root");
    let port = free_tcp_port();
    let listen = format!("127.0.0.1:{port}");
    let out = run(
        thinpool_tests::thinpool_in(&root, &up_args(&["--listen", &listen]))
            .env_remove("THINPOOL_ROOT"),
    );
    assert_refused_without_tls(&out, &listen, port);
    assert!(
        !root.join("pool").exists(),
        "a pool was made before the refusal"
    );

    let r = PoolRoot::new(&[("v", "64M")]);
    let out = run(&mut r.cmd(&up_args(&["--listen", &listen])));
    assert_refused_without_tls(&out, &listen, port);
    let out = run(&mut r.cmd(&["nbd", "serve", "--listen", &listen]));
    assert_refused_without_tls(&out, &listen, port);

    // `nbd serve --insecure-tcp`: served, and the log says what it means.
    let srv = r.serve_tcp(port, &["--insecure-tcp"]);
    let j = nbdinfo_json(&[&format!("nbd://127.0.0.1:{port}/v")]);
    assert_eq!(j["TLS"], false, "{j}");
    assert_eq!(j["exports"][0]["export-size"], 64 << 20, "{j}");
    assert_warned(&srv.log_text(), port);
    srv.stop();

    // `up` with the TOML keys.
    let port = free_tcp_port();
    std::fs::write(
        r.root.join("thinpool.toml"),
        format!("listen = \"127.0.0.1:{port}\"\ninsecure_tcp = true\n"),
    )
    .expect("write thinpool.toml");
    let log = r.scratch_dir().join("up.log");
    let srv = Server::start(r.cmd(&up_args(&[])), log, None, Some(port));
    let j = nbdinfo_json(&["--list", &format!("nbd://127.0.0.1:{port}/")]);
    assert_eq!(j["exports"][0]["export-name"], "v", "{j}");
    assert_warned(&srv.log_text(), port);
    srv.stop();
    r.thin_check();
}

/// Export names nbdinfo lists through TLS-PSK as `id`, with the key file in `dir`.
fn listed(port: u16, id: &str, dir: &Path) -> Vec<String> {
    let j = nbdinfo_json(&["--list", &psk_uri(port, id, dir, "")]);
    let Some(Value::Array(exports)) = j.get("exports") else {
        panic!("{id}: no exports array: {j}");
    };
    exports
        .iter()
        .map(|e| e["export-name"].as_str().expect("export-name").to_string())
        .collect()
}

fn psk_uri(port: u16, id: &str, dir: &Path, export: &str) -> String {
    format!(
        "nbds://{id}@127.0.0.1:{port}/{export}?tls-psk-file={}",
        dir.join("keys.psk").display()
    )
}

/// `--psk-exports`: alice sees a and c, carol only b (and gets it for the empty name), bob,
/// not named, sees all; a volume out of an identity's scope is unknown to it, exactly as a
/// volume that does not exist (nbdinfo, and libnbd's option mode for `NBD_OPT_INFO` and
/// `NBD_OPT_LIST_META_CONTEXT`); the log names the identity of each connection. Identities
/// without a key and restrictions without PSK are refused at start.
#[test]
fn psk_identities_see_only_their_volumes() {
    if !require_tools(&["nbdinfo", "nbdsh", "thin_check"]) {
        return;
    }
    let r = PoolRoot::new(&[("a", "16M"), ("b", "16M"), ("c", "16M")]);
    let dir = r.scratch_dir().join("psk");
    std::fs::create_dir(&dir).expect("mkdir");
    // Fixed test keys: the file is both the server's and the clients'.
    std::fs::write(
        dir.join("keys.psk"),
        "alice:000102030405060708090a0b0c0d0e0f\n\
         bob:101112131415161718191a1b1c1d1e1f\n\
         carol:202122232425262728292a2b2c2d2e2f\n",
    )
    .expect("write keys.psk");
    let keys = dir.join("keys.psk");
    let keys = path_str(&keys);

    // Refused at start: an identity with no key, a restriction without PSK, no volumes.
    for (args, says) in [
        (
            vec!["--tls-psk", keys, "--psk-exports", "dave=a"],
            "PSK identity dave, which has no key",
        ),
        (vec!["--psk-exports", "alice=a"], "needs --tls-psk"),
        (
            vec!["--tls-psk", keys, "--psk-exports", "alice="],
            "one or more volume names",
        ),
    ] {
        let sock = r.scratch_dir().join("refused.sock");
        let mut a = vec!["nbd", "serve", "--socket", path_str(&sock)];
        a.extend_from_slice(&args);
        let out = run(&mut r.cmd(&a));
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {}: {err}",
            out.status
        );
    }

    let port = free_tcp_port();
    let srv = r.serve_tcp(
        port,
        &[
            "--tls-psk",
            keys,
            "--psk-exports",
            "alice=a,c",
            "--psk-exports",
            "carol=b",
        ],
    );
    assert_eq!(listed(port, "alice", &dir), ["a", "c"]);
    assert_eq!(listed(port, "carol", &dir), ["b"]);
    assert_eq!(listed(port, "bob", &dir), ["a", "b", "c"]);

    // Opening: in scope (read-only too), out of scope, and a name no volume has.
    let j = nbdinfo_json(&[&psk_uri(port, "alice", &dir, "c")]);
    assert_eq!(j["exports"][0]["export-size"], 16 << 20, "{j}");
    assert_eq!(j["exports"][0]["is_read_only"], false, "{j}");
    let j = nbdinfo_json(&[&psk_uri(port, "alice", &dir, "a@ro")]);
    assert_eq!(j["exports"][0]["is_read_only"], true, "{j}");
    for name in ["b", "b@ro", "nosuch"] {
        let out = run(tool("nbdinfo").arg(psk_uri(port, "alice", &dir, name)));
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains("No such file or directory"),
            "alice opening {name}: {}: {err}",
            out.status
        );
    }
    let log = srv.log_text();
    assert!(
        log.contains("export \"b\" is not among the volumes of PSK identity alice")
            && log.contains("export \"nosuch\" is not among the volumes of PSK identity alice"),
        "the refusals are not in the log (or differ for a volume that exists):\n{log}"
    );
    // The empty name: carol's only volume; bob has three to choose from.
    let j = nbdinfo_json(&[&psk_uri(port, "carol", &dir, "")]);
    assert_eq!(j["exports"][0]["export-size"], 16 << 20, "{j}");
    let out = run(tool("nbdinfo").arg(psk_uri(port, "bob", &dir, "")));
    assert!(!out.status.success(), "bob got a default export");
    // bob is not restricted.
    let j = nbdinfo_json(&[&psk_uri(port, "bob", &dir, "b")]);
    assert_eq!(j["exports"][0]["export-size"], 16 << 20, "{j}");
    // Option by option on one connection (libnbd's option mode): NBD_OPT_INFO and
    // NBD_OPT_LIST_META_CONTEXT answer for a and refuse b exactly as a name no volume has;
    // NBD_OPT_GO then opens c and reads it.
    let out = nbdsh_ok(&format!(
        r#"
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_psk_file("{keys}")
h.set_tls_username("alice")
h.set_opt_mode(True)
h.connect_tcp("127.0.0.1", "{port}")
def ask(name):
    h.set_export_name(name)
    try:
        h.opt_info()
        info = h.get_size()
    except nbd.Error as e:
        info = e.errno
    seen = []
    try:
        meta = h.opt_list_meta_context(lambda ctx: seen.append(ctx))
    except nbd.Error as e:
        meta = e.errno
    return info, meta, seen
a, b, nosuch = ask("a"), ask("b"), ask("nosuch")
assert a == ({size}, 1, ["base:allocation"]), a
assert b[0] in ("ENOENT", errno.ENOENT), b
assert b == nosuch, (b, nosuch)
h.set_export_name("c")
h.opt_go()
assert len(h.pread(4096, 0)) == 4096
print("ok")
"#,
        size = 16 << 20
    ));
    assert_eq!(out.trim(), "ok");
    let log = srv.log_text();
    assert!(
        log.contains("client connected conn=")
            && log.contains("volume=\"c\" psk_identity=\"alice\""),
        "the connection's log line does not name its PSK identity:\n{log}"
    );
    srv.stop();
    r.thin_check();
}
