//! The pool fills: low-water events and autogrow (issue 15), through `thinpool up` as a user
//! runs it. The pool's files sit on a small ext4 made for the test (loop-mounted, root only),
//! so that the host file system's free space is real:
//!
//! - `autogrow_under_fio_grows_in_steps`: 256M of data, threshold 80 %, step 128M, max 1G;
//!   fio writes 700 MiB with crc32c verification through NBD into a 2G volume: no error, no
//!   bad block, the data file grew 256 → 384 → 512 → 640 → 768 → 896 MiB, each grow an event
//!   (control API, `pool events`) and in the metrics; thin_check clean.
//! - `autogrow_stops_at_the_host_file_systems_free_space`: a maximum far past what the host
//!   file system holds: the pool grows only to what fits, a `limited` event says why, and
//!   (virtual − allocated) of the pool's files never exceeds the free space while fio writes.
//! - `a_block_device_pool_gets_the_event_and_is_not_grown`: data on a loop device: low-water
//!   and `cannot_grow` events naming what to do; nothing grown; doing what the message says
//!   (extend the device, `pool grow`) works.
//! - `metadata_autogrow_keeps_the_pool_writable`: 1 MiB of metadata and many mappings: the
//!   metadata file grows by its step before it runs out; no write fails.
//! - `bad_policy_values_are_refused`: thresholds, steps and maximums that cannot work.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use thinpool_tests::daemon::Up;
use thinpool_tests::hostfs::{can_loop_mount, df, small_ext4};
use thinpool_tests::nbd::free_tcp_port;
use thinpool_tests::{run, run_ok, scratch, text, thinpool_in, tool, zeroed_file};

const MIB: u64 = 1 << 20;

/// A loop device over a file, detached when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// What the pool's files may still take: virtual size minus allocated bytes, summed.
fn may_take(files: &[&Path]) -> u64 {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).unwrap();
            m.len().saturating_sub(m.blocks() * 512)
        })
        .sum()
}

/// fio writing `size` of random 64 KiB blocks (every block once) at offset 0 of `uri`, with
/// crc32c checksums verified when the writes end. JSON output (latencies).
fn fio(uri: &str, dir: &Path, size: &str, extra: &[&str]) -> std::process::Child {
    tool("fio")
        .current_dir(dir)
        .args([
            "--name=autogrow",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=8",
            &format!("--size={size}"),
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--output-format=json",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio")
}

/// Wait for fio; assert it succeeded with no error and no bad block; its JSON report.
fn fio_ok(child: std::process::Child) -> Value {
    let out = child.wait_with_output().unwrap();
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "fio failed: {so}{se}");
    assert!(
        !so.contains("verify: bad") && !se.contains("verify: bad"),
        "{so}{se}"
    );
    let start = so.find('{').expect("fio JSON");
    let v: Value = serde_json::from_str(&so[start..]).expect("fio JSON parses");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    v
}

/// The longest write completion latency fio saw, milliseconds.
fn fio_max_write_ms(v: &Value) -> f64 {
    v["jobs"][0]["write"]["clat_ns"]["max"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6
}

/// The daemon's events, through the CLI (`pool events --json`, one object a line).
fn events(up: &Up) -> Vec<Value> {
    up.ok(&["pool", "events", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("an event line parses"))
        .collect()
}

fn of_kind<'a>(ev: &'a [Value], space: &str, kind: &str) -> Vec<&'a Value> {
    ev.iter()
        .filter(|e| e["space"] == space && e["kind"] == kind)
        .collect()
}

/// `GET /metrics` from the daemon's endpoint.
fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// The value of the sample `line` (name with labels) in a scrape.
fn sample(metrics: &str, line: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {line} in:\n{metrics}"))
}

fn data_size(up: &Up) -> u64 {
    let st = up.json(&["pool", "status", "--json"]);
    st["total_data_blocks"].as_u64().unwrap() * st["block_size"].as_u64().unwrap()
}

#[test]
fn autogrow_under_fio_grows_in_steps() {
    if !can_loop_mount(&["mkfs.ext4", "fio", "thin_check"]) {
        return;
    }
    let dir = scratch();
    let fs = small_ext4(dir.path(), "host", 1536 * MIB);
    let data = zeroed_file(&fs.0.join("data"), 256 * MIB);
    let meta = zeroed_file(&fs.0.join("metadata"), 16 * MIB);
    let port = free_tcp_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut up = Up::start(&[
        "--no-fuse",
        "--no-snapshotter",
        "--data",
        data.to_str().unwrap(),
        "--metadata",
        meta.to_str().unwrap(),
        "--autogrow-threshold",
        "80%",
        "--autogrow-step",
        "128M",
        "--max-data-size",
        "1G",
        "--metrics",
        &metrics,
    ]);
    up.ok(&["vol", "create", "v", "--size", "2G"]);
    // A follower started before the writes prints the events as they come.
    let followed = dir.path().join("followed.jsonl");
    let mut follower = up
        .cmd(&["pool", "events", "--follow", "--json"])
        .stdout(std::fs::File::create(&followed).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pool events --follow");
    let fio_dir = scratch();
    let report = fio_ok(fio(&up.uri("v"), fio_dir.path(), "700M", &[]));

    let ev = events(&up);
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines: Vec<Value> = std::fs::read_to_string(&followed)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= ev.len() || Instant::now() >= deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        follower.try_wait().unwrap().is_none(),
        "pool events --follow ended"
    );
    follower.kill().unwrap();
    follower.wait().unwrap();
    // (An event after the listing may follow the listed ones.)
    assert!(lines.len() >= ev.len(), "--follow printed {lines:#?}");
    assert_eq!(
        lines[..ev.len()],
        ev[..],
        "what --follow printed, and the events listed after"
    );
    let grown = of_kind(&ev, "data", "grown");
    let sizes: Vec<u64> = grown
        .iter()
        .map(|e| e["new_size"].as_u64().unwrap() / MIB)
        .collect();
    assert_eq!(sizes, [384, 512, 640, 768, 896], "{ev:#?}");
    let mut old = 256;
    for e in &grown {
        assert_eq!(e["old_size"].as_u64().unwrap() / MIB, old, "{e}");
        old = e["new_size"].as_u64().unwrap() / MIB;
        // Grown at or over 80 %.
        assert!(
            e["used"].as_u64().unwrap() * 100 >= 80 * e["total"].as_u64().unwrap(),
            "{e}"
        );
    }
    let seqs: Vec<u64> = ev.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(!of_kind(&ev, "data", "low_water").is_empty(), "{ev:#?}");
    for bad in ["limited", "grow_failed", "cannot_grow"] {
        assert!(of_kind(&ev, "data", bad).is_empty(), "{ev:#?}");
    }
    assert_eq!(data_size(&up), 896 * MIB);
    assert_eq!(std::fs::metadata(&data).unwrap().len(), 896 * MIB);
    // The text form and --since.
    let last = seqs.last().copied().unwrap();
    let text_out = up.ok(&["pool", "events"]);
    assert!(
        text_out.contains("grown data") && text_out.contains("768.0 MiB -> 896.0 MiB"),
        "{text_out}"
    );
    assert_eq!(up.ok(&["pool", "events", "--since", &last.to_string()]), "");

    let m = scrape(port);
    assert_eq!(
        sample(&m, "thinpool_autogrow_grows_total{space=\"data\"}"),
        5.0
    );
    assert_eq!(
        sample(&m, "thinpool_autogrow_grown_bytes_total{space=\"data\"}"),
        (640 * MIB) as f64
    );
    assert!(sample(&m, "thinpool_low_water_events_total{space=\"data\"}") >= 1.0);
    assert_eq!(
        sample(&m, "thinpool_autogrow_limited_total{space=\"data\"}"),
        0.0
    );
    assert_eq!(sample(&m, "thinpool_low_water_threshold_percent"), 80.0);
    assert_eq!(
        sample(&m, "thinpool_autogrow_max_bytes{space=\"data\"}"),
        (1024 * MIB) as f64
    );
    let longest = sample(&m, "thinpool_autogrow_longest_grow_seconds");
    let took: Vec<u64> = grown
        .iter()
        .map(|e| e["took_ms"].as_u64().unwrap())
        .collect();
    eprintln!(
        "autogrow: grow took {took:?} ms (longest {longest} s); fio's longest write {:.1} ms",
        fio_max_write_ms(&report)
    );
    up.stop();
    up.thin_check();
    drop(fs);
}

#[test]
fn autogrow_stops_at_the_host_file_systems_free_space() {
    if !can_loop_mount(&["mkfs.ext4", "fio", "thin_check"]) {
        return;
    }
    let dir = scratch();
    let fs = small_ext4(dir.path(), "host", 600 * MIB);
    let data = zeroed_file(&fs.0.join("data"), 128 * MIB);
    let meta = zeroed_file(&fs.0.join("metadata"), 8 * MIB);
    let mut up = Up::start(&[
        "--no-fuse",
        "--no-snapshotter",
        "--data",
        data.to_str().unwrap(),
        "--metadata",
        meta.to_str().unwrap(),
        "--autogrow-threshold",
        "50",
        "--autogrow-step",
        "128M",
        "--max-data-size",
        "100G",
    ]);
    up.ok(&["vol", "create", "v", "--size", "4G"]);
    let fio_dir = scratch();
    let child = fio(&up.uri("v"), fio_dir.path(), "400M", &[]);
    // While fio writes: what the pool's files may still take always fits in the free space.
    // Each look stops fio (SIGSTOP) until the numbers hold still (its requests in flight
    // done), so that the files and the file system are read at one moment.
    let files = [data.as_path(), meta.as_path()];
    let mut worst = i64::MIN;
    let mut looks = 0;
    let started = Instant::now();
    let mut child = child;
    let pid = child.id().to_string();
    while child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(300) {
        let _ = Command::new("kill").args(["-STOP", &pid]).status();
        let mut last = (u64::MAX, u64::MAX);
        let now = loop {
            std::thread::sleep(Duration::from_millis(30));
            let now = (may_take(&files), df(&fs.0, "avail"));
            if now == last {
                break now;
            }
            last = now;
        };
        let _ = Command::new("kill").args(["-CONT", &pid]).status();
        worst = worst.max(now.0 as i64 - now.1 as i64);
        looks += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    fio_ok(child);
    assert!(looks > 0, "no look while fio wrote");
    // (The slack: ext4's own blocks for the files' extent trees come out of the same space.)
    assert!(
        worst <= MIB as i64,
        "the pool's files may take {worst} bytes more than the host file system has free"
    );

    let ev = events(&up);
    let limited = of_kind(&ev, "data", "limited");
    assert!(!limited.is_empty(), "{ev:#?}");
    assert!(
        limited
            .iter()
            .all(|e| e["message"].as_str().unwrap().contains("host file system")),
        "{ev:#?}"
    );
    let size = data_size(&up);
    // Grown past 384M (three whole steps fit), not to 640M (the file system holds ~570M).
    assert!(size > 384 * MIB && size < 600 * MIB, "{size}");
    assert_eq!(size % (64 << 10), 0);
    assert!(may_take(&files) <= df(&fs.0, "avail") + 2 * MIB);
    assert!(of_kind(&ev, "data", "grow_failed").is_empty(), "{ev:#?}");
    eprintln!(
        "host limit: data grew to {} MiB; may_take - free at worst {worst} bytes in {looks} looks",
        size / MIB
    );
    up.stop();
    up.thin_check();
    drop(fs);
}

#[test]
fn a_block_device_pool_gets_the_event_and_is_not_grown() {
    if !can_loop_mount(&["losetup", "qemu-io", "thin_check"]) {
        return;
    }
    let dir = scratch();
    let backing = zeroed_file(&dir.path().join("backing"), 64 * MIB);
    let dev = text(&run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&backing)).stdout)
        .trim()
        .to_string();
    let lo = Loop(dev.clone());
    let mut up = Up::start(&[
        "--no-fuse",
        "--no-snapshotter",
        "--data",
        &dev,
        "--metadata-size",
        "8M",
        "--autogrow-threshold",
        "50",
        "--autogrow-step",
        "64M",
    ]);
    up.ok(&["vol", "create", "v", "--size", "1G"]);
    let uri = up.uri("v");
    run_ok(tool("qemu-io").args(["-f", "raw", "-c", "write -P 0x3c 0 40M", &uri]));
    let deadline = Instant::now() + Duration::from_secs(10);
    let ev = loop {
        let ev = events(&up);
        if !of_kind(&ev, "data", "cannot_grow").is_empty() || Instant::now() > deadline {
            break ev;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let lw = of_kind(&ev, "data", "low_water");
    assert_eq!(lw.len(), 1, "{ev:#?}");
    let cg = of_kind(&ev, "data", "cannot_grow");
    assert_eq!(cg.len(), 1, "one event, not one per look: {ev:#?}");
    let msg = cg[0]["message"].as_str().unwrap();
    assert!(
        msg.contains("block device")
            && msg.contains("thinpool pool grow")
            && msg.contains("extend"),
        "{msg}"
    );
    assert!(of_kind(&ev, "data", "grown").is_empty(), "{ev:#?}");
    assert!(
        up.log_text().contains("is a block device"),
        "{}",
        up.log_text()
    );
    assert_eq!(data_size(&up), 64 * MIB);
    // Still works; and what the message says to do works.
    run_ok(tool("qemu-io").args(["-f", "raw", "-c", "write -P 0x4d 40M 8M", &uri]));
    std::fs::File::options()
        .write(true)
        .open(&backing)
        .unwrap()
        .set_len(128 * MIB)
        .unwrap();
    run_ok(Command::new("losetup").args(["-c", &dev]));
    up.ok(&["pool", "grow"]);
    assert_eq!(data_size(&up), 128 * MIB);
    run_ok(tool("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x3c 0 40M",
        "-c",
        "read -P 0x4d 40M 8M",
        &uri,
    ]));
    up.stop();
    up.thin_check();
    drop(lo);
}

#[test]
fn metadata_autogrow_keeps_the_pool_writable() {
    if !can_loop_mount(&["mkfs.ext4", "fio", "thin_check"]) {
        return;
    }
    let dir = scratch();
    let fs = small_ext4(dir.path(), "host", 512 * MIB);
    let meta = zeroed_file(&fs.0.join("metadata"), MIB);
    let mut up = Up::start(&[
        "--no-fuse",
        "--no-snapshotter",
        "--data-size",
        "4G",
        "--metadata",
        meta.to_str().unwrap(),
        "--autogrow-threshold",
        "50",
        "--metadata-autogrow-step",
        "1M",
        "--max-metadata-size",
        "8M",
    ]);
    up.ok(&["vol", "create", "v", "--size", "4G"]);
    // One 4 KiB write in every 64 KiB block: a mapping per write, 16 384 of them.
    let fio_dir = scratch();
    let out = tool("fio")
        .current_dir(fio_dir.path())
        .args([
            "--name=mappings",
            "--ioengine=nbd",
            &format!("--uri={}", up.uri("v")),
            "--rw=write:60k",
            "--bs=4k",
            "--iodepth=8",
            "--size=1G",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success() && !text(&out.stdout).contains("verify: bad"),
        "fio: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let st = up.json(&["pool", "status", "--json"]);
    assert_eq!(st["mode"], "rw", "{st}");
    let total = st["total_metadata_blocks"].as_u64().unwrap();
    assert!(total > 256, "the metadata grew: {st}");
    let ev = events(&up);
    let grown = of_kind(&ev, "metadata", "grown");
    assert!(!grown.is_empty(), "{ev:#?}");
    assert_eq!(grown[0]["old_size"], MIB, "{ev:#?}");
    assert_eq!(grown[0]["new_size"], 2 * MIB, "{ev:#?}");
    assert_eq!(std::fs::metadata(&meta).unwrap().len(), total * 4096);
    assert_eq!(up.volume("v")["mapped_blocks"], 16384);
    eprintln!(
        "metadata autogrow: {} -> {} blocks in {} grows",
        256,
        total,
        grown.len()
    );
    up.stop();
    up.thin_check();
    drop(fs);
}

#[test]
fn bad_policy_values_are_refused() {
    let dir = scratch();
    let root = dir.path().join("root");
    let refused = |args: &[&str], want: &str| {
        let mut a = vec!["up", "--no-fuse", "--no-snapshotter", "--data-size", "1G"];
        a.extend_from_slice(args);
        let out = run(&mut thinpool_in(&root, &a));
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(err.contains(want), "{args:?}: {err}");
    };
    for t in ["0", "100", "100%", "eighty", "-5"] {
        refused(
            &[&format!("--autogrow-threshold={t}")],
            "is not a percentage from 1 to 99",
        );
    }
    // Refused before the pool is made.
    refused(
        &["--autogrow-step", "0"],
        "the step must be more than 0 bytes",
    );
    refused(&["--max-data-size", "2G"], "--autogrow-step");
    refused(
        &["--autogrow-step", "1G", "--max-data-size", "512M"],
        "is smaller than one --autogrow-step",
    );
    refused(
        &["--metadata-autogrow-step", "1000"],
        "is not a multiple of 4 KiB",
    );
    refused(
        &[
            "--metadata-autogrow-step",
            "1M",
            "--max-metadata-size",
            "20G",
        ],
        "dm-thin uses at most",
    );
    assert!(!root.join("pool").exists(), "no pool made");
    // Against the pool: its block size, its current size — the pool about to be made (and
    // then not made), then a pool that exists.
    let against_the_pool = || {
        refused(
            &["--autogrow-step", "100000"],
            "is not a multiple of the pool's block size (65536 bytes)",
        );
        refused(
            &["--autogrow-step", "64M", "--max-data-size", "512M"],
            "is smaller than the data device already is (1073741824 bytes)",
        );
    };
    against_the_pool();
    assert!(!root.join("pool").exists(), "no pool made");
    run_ok(&mut thinpool_in(
        &root,
        &["pool", "create", "--data-size", "1G"],
    ));
    against_the_pool();
    std::fs::remove_dir_all(&root).unwrap();
    // The same keys in the config file, named with the file.
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "autogrow_threshold = \"120%\"\n").unwrap();
    refused(
        &["--config", cfg.to_str().unwrap()],
        "autogrow_threshold = \"120%\"",
    );
    std::fs::write(&cfg, "max_data_size = \"2G\"\n").unwrap();
    refused(
        &["--config", cfg.to_str().unwrap()],
        "max_data_size is set without autogrow_step",
    );
    // Good keys are taken.
    std::fs::write(
        &cfg,
        "autogrow_threshold = 70\nautogrow_step = \"64M\"\nmax_data_size = \"2G\"\n\
         metadata_autogrow_step = \"4M\"\nmax_metadata_size = \"4G\"\nmetrics = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let mut up = Up::start(&[
        "--no-fuse",
        "--no-snapshotter",
        "--data-size",
        "1G",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(up.ok(&["pool", "events"]), "");
    up.stop();
    up.thin_check();
}
