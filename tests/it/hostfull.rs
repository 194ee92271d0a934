//! The host file system under the pool's sparse files fills up (issue 11), as it did under
//! Docker's loop files. Two tests, both loop-mounting a small ext4 (root only):
//!
//! - the whole pool root in a 96 MiB ext4 holding a 20 MiB filler, a client writing 120 MiB:
//!   the data file's growth hits ENOSPC;
//! - only the metadata file (`up --metadata`) in an 8 MiB ext4 filled to its last 192 KiB,
//!   the data file on the roomy scratch file system: batches of small scattered writes, each
//!   followed by a flush, grow the mapping tree until the metadata file's growth hits ENOSPC.
//!
//! Either way the client's failing requests must fail with ENOSPC (not EIO), `pool status`
//! must say the pool is writable and name the full host file system and the file, the daemon
//! must answer and take new clients throughout, and once the filler is deleted, writes and
//! flushes work again without a restart; every flushed write reads back (after a restart too),
//! SIGTERM exits 0 and `thin_check` passes. `up` warns at start that the sparse files can
//! outgrow the host.
//!
//! And the other failure of the host file system under the metadata file: it is shut down
//! (`xfs_io -x -c shutdown`, as ext4 does itself on a journal error), so the metadata file's
//! writes and reads fail with EIO. The next flush's commit fails with EIO; the abort cannot
//! read the last commit back, so the pool fails (mode `fail`, as the kernel's dm-thin does
//! when `dm_pool_abort_metadata` fails); `pool status` answers and names the cause; a new
//! client is refused with an error naming the metadata file, without a hang; SIGTERM exits
//! non-zero without writing anything; after a remount the pool opens, `thin_check` passes and
//! every flushed write is there.
//!
//! And a metadata device that fails writes but still reads: a loop device over a file on a
//! full tmpfs (the loop driver's failed writes reach `fsync` of the block device as EIO,
//! like a disk that fails writes). A commit fails, the abort reads the last commit back, the
//! pool goes read-only (mode `ro`) with the cause in `pool status`; new clients connect and
//! read every flushed write, writes that need a new mapping and flushes fail; after the
//! device works again, `thin_check` passes and a restart reads everything flushed.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thinpool_tests::hostfs::{Mounted, can_loop_mount, small_ext4};
use thinpool_tests::nbd::{CMD_FLUSH, CMD_READ, CMD_WRITE, RawClient, Server, qemu_io};
use thinpool_tests::{run, run_ok, scratch, text, thinpool_in, tool, zeroed_file};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// The pool's block size (the default).
const BS: u64 = 64 * KIB;
/// NBD error values (the protocol's, Linux's numbers).
const EIO: u32 = 5;
const ENOSPC: u32 = 28;

fn status(root: &Path) -> serde_json::Value {
    let out = run_ok(&mut thinpool_in(root, &["pool", "status", "--json"]));
    serde_json::from_slice(&out.stdout).expect("pool status --json parses")
}

#[test]
fn a_full_host_file_system_gives_enospc_and_the_pool_recovers() {
    if !can_loop_mount(&["mkfs.ext4", "qemu-io", "nbdinfo", "thin_check"]) {
        return;
    }
    let dir = scratch();
    let img = zeroed_file(&dir.path().join("fs.img"), 96 * MIB);
    run_ok(tool("mkfs.ext4").args(["-q", "-F"]).arg(&img));
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt),
    );
    let _mounted = Mounted(mnt.clone());
    let root = mnt.join("root");
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![1u8; 20 * MIB as usize]).unwrap();

    let mut up: Child = thinpool_in(
        &root,
        &["up", "--data-size", "256M", "--metadata-size", "16M"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start thinpool up");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(root.join("nbd.sock").exists() && root.join("control.sock").exists()) {
        assert!(up.try_wait().unwrap().is_none(), "thinpool up exited");
        assert!(Instant::now() < deadline, "thinpool up did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    run_ok(&mut thinpool_in(
        &root,
        &["vol", "create", "v", "--size", "200M"],
    ));
    let uri = format!("nbd+unix:///v?socket={}", root.join("nbd.sock").display());

    // 120 MiB into a file system with about 70 MiB free.
    let out = qemu_io(
        &uri,
        false,
        &["write -P 0x5a 0 120M".into(), "flush".into()],
    );
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    eprintln!("qemu-io on the full host:\n{said}");
    assert!(
        said.contains("No space left on device"),
        "the client must see ENOSPC:\n{said}"
    );
    assert!(!said.contains("Input/output error"), "not EIO:\n{said}");
    // The daemon answers, the pool stays writable, new clients connect.
    let st = status(&root);
    assert_eq!(st["mode"], "rw", "{st}");
    let failure = st["failure"].as_str().unwrap_or_default();
    assert!(
        failure.starts_with("host file system full: ")
            && failure.contains(&root.display().to_string()),
        "pool status names the full host file system and the file: {st}"
    );
    run_ok(tool("nbdinfo").arg(&uri));

    // Space again: the same requests succeed, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let out = qemu_io(
        &uri,
        false,
        &["write -P 0x6b 100M 8M".into(), "flush".into()],
    );
    assert!(
        out.status.success() && !text(&out.stdout).contains("failed"),
        "write after the host has space again:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = qemu_io(&uri, true, &["read -P 0x6b 100M 8M".into()]);
    let said = text(&out.stdout);
    assert!(
        out.status.success() && !said.contains("failed") && !said.contains("mismatch"),
        "{said}"
    );
    let st = status(&root);
    assert_eq!(
        (&st["mode"], &st["failure"]),
        (&"rw".into(), &serde_json::Value::Null),
        "{st}"
    );

    let pid = up.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let done = up.wait_with_output().unwrap();
    let log = text(&done.stderr);
    assert!(
        done.status.success(),
        "thinpool up after SIGTERM: {}\n{log}",
        done.status,
    );
    // It said so at start: 272 MiB of sparse files on a 96 MiB file system.
    assert!(
        log.contains("the pool's sparse files may grow by")
            && log.contains("writes will fail with ENOSPC before the pool is full"),
        "no warning about the host's free space:\n{log}"
    );
    let check = run(tool("thin_check").arg(root.join("pool/metadata")));
    assert!(check.status.success(), "{}", text(&check.stderr));
}

/// Fill the file system holding `filler` until it is full, then give back `leave` bytes.
fn fill_up(filler: &Path, leave: u64) {
    let mut f = std::fs::File::create(filler).unwrap();
    for chunk in [64 * KIB as usize, 1024] {
        let bytes = vec![0xa5u8; chunk];
        loop {
            match f.write(&bytes) {
                Ok(n) if n == chunk => {}
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling {}: {e}", filler.display()),
            }
        }
    }
    let len = f.metadata().unwrap().len();
    f.set_len(len.saturating_sub(leave)).unwrap();
    f.sync_all().unwrap();
    run_ok(Command::new("sync").arg("-f").arg(filler));
}

/// `thinpool up ARGS` on `root` (stderr in `log`), waited for until it serves NBD and its
/// control socket is there.
fn start_up(root: &Path, args: &[&str], log: PathBuf) -> Server {
    let mut all = vec!["up"];
    all.extend_from_slice(args);
    let up = Server::start(
        thinpool_in(root, &all),
        log,
        Some(root.join("nbd.sock")),
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !root.join("control.sock").exists() {
        assert!(
            Instant::now() < deadline,
            "thinpool up made no control socket:\n{}",
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    up
}

/// `thinpool up` on `root` with a 1 GiB data file beside it and the metadata on `metadata` (a
/// file or a device), a 1 GiB volume `v`, and a client that wrote batch 0 and flushed it
/// (`when` says when, for the message).
fn up_with_batch_0(root: &Path, metadata: &str, log: PathBuf, when: &str) -> (Server, RawClient) {
    let up = start_up(root, &["--data-size", "1G", "--metadata", metadata], log);
    run_ok(&mut thinpool_in(
        root,
        &["vol", "create", "v", "--size", "1G"],
    ));
    let mut c = client(root);
    let (errs, flush) = write_batch(&mut c, 0, true);
    assert!(
        errs.iter().all(|&e| e == 0) && flush == Some(0),
        "batch 0, {when}: writes {errs:?}, flush {flush:?}"
    );
    (up, c)
}

fn client(root: &Path) -> RawClient {
    let mut c = RawClient::connect(&root.join("nbd.sock"), 3);
    c.go("v");
    c
}

/// The 4 KiB that write `k` of batch `batch` puts at [`spot`]: distinct for every write.
fn payload(batch: u64, k: u64) -> Vec<u8> {
    let mut b = vec![(batch * 31 + k) as u8 | 1; 4096];
    b[..8].copy_from_slice(&batch.to_le_bytes());
    b[8..16].copy_from_slice(&k.to_le_bytes());
    b
}

/// Writes per batch, and the stride between the pool blocks one batch writes: batch `b`'s
/// write `k` goes into pool block `k * STRIDE + b`, so every batch touches the whole spread
/// of the mapping tree and no two writes share a block.
const PER_BATCH: u64 = 200;
const STRIDE: u64 = 64;

/// Where write `k` of batch `batch` goes (a 4 KiB piece of its own pool block).
fn spot(batch: u64, k: u64) -> u64 {
    (k * STRIDE + batch) * BS + (k % 16) * 4096
}

/// What [`write_until_a_request_fails`] saw.
struct FirstFailure {
    /// The batches written and flushed without an error, 0 included.
    flushed: Vec<u64>,
    /// The batch with a failed request.
    batch: u64,
    /// Its writes' errors (0 = done) and its flush's.
    errs: Vec<u32>,
    flush: Option<u32>,
    /// Its nonzero errors, writes then flush.
    failed: Vec<u32>,
}

/// Write and flush batches 1, 2, … (batch 0 is written) until a request of one fails; panics
/// with `none_failed(b)` when batch `b` reaches `limit` first.
fn write_until_a_request_fails(
    c: &mut RawClient,
    limit: u64,
    none_failed: impl Fn(u64) -> String,
) -> FirstFailure {
    let mut flushed = vec![0];
    loop {
        let b = flushed.len() as u64;
        assert!(b < limit, "{}", none_failed(b));
        let (errs, flush) = write_batch(c, b, true);
        if errs.iter().any(|&e| e != 0) || flush != Some(0) {
            let failed = errs
                .iter()
                .copied()
                .chain(flush)
                .filter(|&e| e != 0)
                .collect();
            return FirstFailure {
                flushed,
                batch: b,
                errs,
                flush,
                failed,
            };
        }
        flushed.push(b);
    }
}

/// Send batch `batch` (16 writes in flight at a time), then flush, unless `flush` is false.
/// Returns the error of every write (0 = done) and of the flush.
fn write_batch(c: &mut RawClient, batch: u64, flush: bool) -> (Vec<u32>, Option<u32>) {
    let mut errs = vec![u32::MAX; PER_BATCH as usize];
    for group in (0..PER_BATCH).collect::<Vec<_>>().chunks(16) {
        for &k in group {
            c.request(CMD_WRITE, 0, k, spot(batch, k), 4096, &payload(batch, k));
        }
        for _ in group {
            let (err, cookie) = c.simple_reply();
            errs[cookie as usize] = err;
        }
    }
    let flushed = flush.then(|| {
        c.request(CMD_FLUSH, 0, u64::MAX, 0, 0, &[]);
        let (err, cookie) = c.simple_reply();
        assert_eq!(cookie, u64::MAX, "flush reply");
        err
    });
    (errs, flushed)
}

/// Read back batch `batch`; the writes that do not read as written (by index), or an error.
fn check_batch(c: &mut RawClient, batch: u64) -> Result<Vec<u64>, String> {
    let mut wrong = Vec::new();
    for k in 0..PER_BATCH {
        c.request(CMD_READ, 0, k, spot(batch, k), 4096, &[]);
        let (err, cookie) = c.simple_reply();
        if err != 0 {
            return Err(format!(
                "read of batch {batch} write {k} failed with error {err}"
            ));
        }
        assert_eq!(cookie, k);
        if c.read_n(4096) != payload(batch, k) {
            wrong.push(k);
        }
    }
    Ok(wrong)
}

#[test]
fn a_full_host_file_system_under_the_metadata_file_gives_enospc_and_the_pool_recovers() {
    if !can_loop_mount(&["mkfs.ext4", "nbdinfo", "thin_check"]) {
        return;
    }
    let dir = scratch();
    let fs = small_ext4(dir.path(), "mnt", 8 * MIB);
    let meta = zeroed_file(&fs.0.join("metadata"), 16 * MIB);
    let filler = fs.0.join("filler");
    let root = dir.path().join("root");
    let meta_arg = meta.to_str().unwrap();
    // Batch 0 with room to spare; then the metadata file's file system keeps 192 KiB.
    let (up, mut c) = up_with_batch_0(
        &root,
        meta_arg,
        dir.path().join("up.log"),
        "before the host file system was filled",
    );
    let uri = format!("nbd+unix:///v?socket={}", root.join("nbd.sock").display());
    fill_up(&filler, 192 * KIB);
    let meta_blocks = |p: &Path| {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    let at_fill = meta_blocks(&meta);

    // Batches until one fails: the ones flushed before it must read back.
    let FirstFailure {
        mut flushed,
        batch: failed_batch,
        errs,
        flush,
        failed,
    } = write_until_a_request_fails(&mut c, STRIDE, |b| {
        format!(
            "{b} batches of {PER_BATCH} scattered writes and no error: the metadata file grew \
             from {at_fill} to {} bytes allocated without hitting ENOSPC",
            meta_blocks(&meta)
        )
    });
    eprintln!(
        "batch {failed_batch} failed ({} of {PER_BATCH} writes, flush error {flush:?}) after {} \
         batches flushed; the metadata file took {at_fill} bytes at the fill, {} now",
        errs.iter().filter(|&&e| e != 0).count(),
        flushed.len(),
        meta_blocks(&meta)
    );
    assert!(
        failed.iter().all(|&e| e == ENOSPC),
        "every failed request must fail with ENOSPC ({ENOSPC}), not EIO ({EIO}) or another \
         error: writes {errs:?}, flush {flush:?}\n{}",
        up.log_text()
    );
    assert!(
        flushed.len() > 1,
        "the first batch on the filled file system failed: no batch was flushed there"
    );

    // Still full: the daemon answers, the pool is writable and says why requests fail, new
    // clients connect and read what was flushed.
    let st = status(&root);
    assert_eq!(st["mode"], "rw", "{st}");
    let failure = st["failure"].as_str().unwrap_or_default();
    let link = root.join("pool/metadata");
    assert!(
        failure.starts_with("host file system full: ")
            && (failure.contains(meta_arg) || failure.contains(link.to_str().unwrap())),
        "pool status must name the full host file system and the metadata file: {st}"
    );
    run_ok(tool("nbdinfo").arg(&uri));
    let mut reader = client(&root);
    for &b in &flushed {
        assert_eq!(
            check_batch(&mut reader, b),
            Ok(vec![]),
            "flushed batch {b} does not read back while the host is full"
        );
    }
    drop(reader);

    // Space again: the same connection writes and flushes, without a restart.
    std::fs::remove_file(&filler).unwrap();
    run_ok(Command::new("sync").arg("-f").arg(&fs.0));
    let (errs, flush) = write_batch(&mut c, failed_batch, true);
    assert!(
        errs.iter().all(|&e| e == 0),
        "writes after the host has space again: {errs:?}"
    );
    // Its failed flush reported the loss: this one must not fail for it again.
    assert_eq!(
        flush,
        Some(0),
        "the first flush on the same connection once there is space"
    );
    flushed.push(failed_batch);
    // And a new client.
    let mut c2 = client(&root);
    let next = failed_batch + 1;
    let (errs, flush) = write_batch(&mut c2, next, true);
    assert!(
        errs.iter().all(|&e| e == 0) && flush == Some(0),
        "a new client once there is space: writes {errs:?}, flush {flush:?}"
    );
    flushed.push(next);
    drop((c, c2));
    let st = status(&root);
    assert_eq!(
        (&st["mode"], &st["failure"]),
        (&"rw".into(), &serde_json::Value::Null),
        "{st}"
    );
    up.stop();

    // Every flushed batch is there after a restart; the metadata passes thin_check.
    let up = start_up(&root, &[], dir.path().join("up-2.log"));
    let mut c = client(&root);
    for &b in &flushed {
        assert_eq!(
            check_batch(&mut c, b),
            Ok(vec![]),
            "flushed batch {b} after a restart"
        );
    }
    drop(c);
    up.stop();
    let check = run(tool("thin_check").arg(&meta));
    assert!(
        check.status.success(),
        "thin_check {}: {}",
        meta.display(),
        text(&check.stderr)
    );
}

/// `OPT_GO` for `name` on a new connection: the server's final reply type and its message.
#[allow(clippy::big_endian_bytes)] // NBD is big-endian on the wire
fn go_reply(root: &Path, name: &str) -> (u32, String) {
    let mut c = RawClient::connect(&root.join("nbd.sock"), 3);
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    c.option(thinpool_tests::nbd::OPT_GO, &d);
    let replies = c.opt_replies();
    let last = replies.last().expect("at least one reply");
    (last.kind, String::from_utf8_lossy(&last.data).into_owned())
}

#[test]
fn a_shut_down_host_file_system_under_the_metadata_file_fails_the_pool_cleanly() {
    if !can_loop_mount(&["mkfs.ext4", "xfs_io", "thin_check"]) {
        return;
    }
    let dir = scratch();
    let fs = small_ext4(dir.path(), "mnt", 16 * MIB);
    let meta = zeroed_file(&fs.0.join("metadata"), 16 * MIB);
    let root = dir.path().join("root");
    let meta_arg = meta.to_str().unwrap();
    let (mut up, mut c) = up_with_batch_0(
        &root,
        meta_arg,
        dir.path().join("up.log"),
        "before the shutdown",
    );

    run_ok(tool("xfs_io").args(["-x", "-c", "shutdown"]).arg(&fs.0));
    // The writes need no metadata I/O yet (the mapping changes stay in memory until the
    // commit); the flush's commit cannot write the metadata file.
    let (errs, flush) = write_batch(&mut c, 1, true);
    eprintln!(
        "after the shutdown: {} of {PER_BATCH} writes failed, the flush with error {flush:?}",
        errs.iter().filter(|&&e| e != 0).count()
    );
    assert!(
        errs.iter().chain(&flush).all(|&e| e == 0 || e == EIO) && flush == Some(EIO),
        "a failed metadata commit is EIO ({EIO}): writes {errs:?}, flush {flush:?}\n{}",
        up.log_text()
    );
    // Later requests fail too, naming no success: a flush, a read of flushed data.
    c.request(CMD_FLUSH, 0, 1, 0, 0, &[]);
    let (flush_err, _) = c.simple_reply();
    c.request(CMD_READ, 0, 2, spot(0, 0), 4096, &[]);
    let (read_err, _) = c.simple_reply();
    eprintln!("then a flush: error {flush_err}; a read of flushed data: error {read_err}");
    assert!(
        flush_err != 0 && read_err != 0,
        "a flush and a read after the pool failed (the kernel fails every I/O)"
    );

    // The daemon answers; the status names the failed commit, the file and why the pool
    // could not go on read-only.
    let st = status(&root);
    eprintln!("pool status after the shutdown: {st}");
    let failure = st["failure"].as_str().unwrap_or_default();
    let link = root.join("pool/metadata");
    let names_file = failure.contains(meta_arg) || failure.contains(link.to_str().unwrap());
    assert!(
        st["mode"] == "fail"
            && failure.starts_with("commit failed (")
            && failure.contains("the last commit cannot be read back")
            && names_file,
        "pool status after the shutdown: {st}"
    );
    // A new client: a clean refusal that names the metadata file, not a hang or a hang-up.
    let (kind, msg) = go_reply(&root, "v");
    eprintln!("a new client's NBD_OPT_GO: reply {kind:#x}: {msg}");
    assert!(
        kind & 0x8000_0000 != 0 && (msg.contains(meta_arg) || msg.contains(link.to_str().unwrap())),
        "a new client after the shutdown: reply {kind:#x} {msg:?}"
    );
    assert!(up.is_running(), "the daemon must keep running");

    // SIGTERM: the final commit cannot happen; nothing is written.
    drop(c);
    let st = up.terminate();
    let log = up.log_text();
    eprintln!("thinpool up after SIGTERM: {st}");
    assert!(
        st.code().is_some() && log.contains("daemon stopped"),
        "thinpool up must stop on SIGTERM, not crash ({st}):\n{log}"
    );
    drop(up);

    // Remount (the journal is replayed): the pool opens at its last commit.
    let img = dir.path().join("mnt.img");
    run_ok(Command::new("umount").arg(&fs.0));
    run_ok(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&fs.0),
    );
    let check = run(tool("thin_check").arg(&meta));
    assert!(
        check.status.success(),
        "thin_check {} after the remount: {}",
        meta.display(),
        text(&check.stderr)
    );
    let up = start_up(&root, &[], dir.path().join("up-2.log"));
    let mut c = client(&root);
    assert_eq!(check_batch(&mut c, 0), Ok(vec![]), "flushed batch 0");
    drop(c);
    up.stop();
    drop(fs);
}

/// A loop device over `file`, detached when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn a_metadata_device_failing_writes_makes_the_pool_read_only_and_new_clients_read() {
    if !can_loop_mount(&["losetup", "nbdinfo", "thin_check"]) {
        return;
    }
    let dir = scratch();
    let tmp = dir.path().join("tmpfs");
    std::fs::create_dir(&tmp).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(&tmp),
    );
    let fs = Mounted(tmp.clone());
    let backing = zeroed_file(&tmp.join("meta.img"), 16 * MIB);
    let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&backing));
    let dev = Loop(text(&out.stdout).trim().to_string());
    let root = dir.path().join("root");
    let (up, mut c) = up_with_batch_0(&root, &dev.0, dir.path().join("up.log"), "with room");
    let uri = format!("nbd+unix:///v?socket={}", root.join("nbd.sock").display());

    // The tmpfs is full: the metadata blocks a commit writes where the file has no pages yet
    // cannot reach it. Batches until one fails.
    let filler = tmp.join("filler");
    fill_up(&filler, 0);
    let FirstFailure {
        flushed,
        batch: failed_batch,
        errs,
        flush,
        failed,
    } = write_until_a_request_fails(&mut c, 8, |b| {
        format!("{b} batches and the metadata device never failed a write")
    });
    eprintln!(
        "batch {failed_batch} failed: {} of {PER_BATCH} writes, flush error {flush:?}",
        failed.len() - usize::from(flush != Some(0))
    );
    // The commit that failed answers EIO; requests after the abort find the pool read-only.
    assert!(
        failed.iter().all(|&e| e == EIO) && !failed.is_empty(),
        "a failed metadata commit is EIO ({EIO}), and so are later changes, as in the kernel: writes \
         {errs:?}, flush {flush:?}\n{}",
        up.log_text()
    );

    let st = status(&root);
    eprintln!("pool status after the failed commit: {st}");
    let failure = st["failure"].as_str().unwrap_or_default();
    let link = root.join("pool/metadata");
    assert!(
        st["mode"] == "ro"
            && !st["needs_check"].as_bool().unwrap_or(true)
            && failure.starts_with("commit failed: ")
            && (failure.contains(link.to_str().unwrap()) || failure.contains(&dev.0)),
        "pool status names the failed commit and the metadata device: {st}"
    );
    // New clients connect and read everything flushed; what the failed batch wrote is gone
    // with the aborted transaction or there, never anything else.
    run_ok(tool("nbdinfo").arg(&uri));
    let mut c2 = client(&root);
    for &b in &flushed {
        assert_eq!(check_batch(&mut c2, b), Ok(vec![]), "flushed batch {b}");
    }
    // A change that needs the metadata fails, and so does a flush, on either connection.
    for (who, conn) in [("the old client", &mut c), ("a new client", &mut c2)] {
        let k = 7;
        conn.request(CMD_WRITE, 0, 1, spot(STRIDE - 1, k), 4096, &payload(99, k));
        let (werr, _) = conn.simple_reply();
        conn.request(CMD_FLUSH, 0, 2, 0, 0, &[]);
        let (ferr, _) = conn.simple_reply();
        assert!(
            werr == EIO && ferr != 0,
            "{who}: a write needing a new mapping ({werr}) and a flush ({ferr}) on a read-only pool"
        );
    }
    drop((c, c2));
    let mut up = up;
    let st = up.terminate();
    let log = up.log_text();
    eprintln!("thinpool up after SIGTERM: {st}");
    assert!(
        st.code().is_some() && log.contains("daemon stopped"),
        "thinpool up must stop on SIGTERM ({st}):\n{log}"
    );
    drop(up);

    // The device takes writes again: the metadata is whole, a restart reads what was flushed.
    std::fs::remove_file(&filler).unwrap();
    let check = run(tool("thin_check").arg(&dev.0));
    assert!(
        check.status.success(),
        "thin_check {}: {}",
        dev.0,
        text(&check.stderr)
    );
    let up = start_up(&root, &[], dir.path().join("up-2.log"));
    let mut c = client(&root);
    for &b in &flushed {
        assert_eq!(
            check_batch(&mut c, b),
            Ok(vec![]),
            "flushed batch {b} after a restart"
        );
    }
    drop(c);
    up.stop();
    drop(dev);
    drop(fs);
}
