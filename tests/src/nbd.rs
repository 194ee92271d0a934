//! Helpers for the NBD end-to-end tests (`tests/it/nbd.rs`): a pool root made with the CLI,
//! `thinpool nbd serve` run as a child process (stopped with SIGTERM and its exit status
//! checked), wrappers for the real clients (qemu-io, nbdinfo, nbdsh, …) and a small raw NBD
//! client over a unix socket or TCP for protocol checks no real client will make.
//!
//! The raw client speaks the NBD protocol (the NBD project's `doc/proto.md`) from scratch with
//! its own constants, so that it checks the server rather than sharing its code.

// NBD is big-endian on the wire.
#![allow(clippy::big_endian_bytes)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{TempDir, describe, require_tool, run, run_ok, scratch, text, thinpool, tool, which};

/// The pool block size the tests use (the default).
pub const BS: u64 = 64 << 10;

/// A pool root in a fresh temporary folder, with a `files/` folder beside it for images.
pub struct PoolRoot {
    dir: TempDir,
    /// The pool root (`--root`).
    pub root: PathBuf,
}

impl PoolRoot {
    /// A 512 MiB / 16 MiB pool (64 KiB blocks) with thin volumes `(name, size)`.
    pub fn new(volumes: &[(&str, &str)]) -> PoolRoot {
        let dir = scratch();
        let root = dir.path().join("root");
        std::fs::create_dir(dir.path().join("files")).expect("create the files folder");
        let r = PoolRoot { dir, root };
        r.ok(&[
            "pool",
            "create",
            "--data-size",
            "512M",
            "--metadata-size",
            "16M",
        ]);
        for (name, size) in volumes {
            r.ok(&["vol", "create", name, "--size", size]);
        }
        r
    }

    /// A path in the scratch folder beside the root (not inside it).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join("files").join(name)
    }

    /// The scratch folder (short, so unix socket paths fit in 108 bytes).
    pub fn scratch_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The pool's metadata file.
    pub fn metadata(&self) -> PathBuf {
        self.root.join("pool").join("metadata")
    }

    /// `thinpool --root ROOT ARGS`.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = thinpool(["--root".as_ref(), self.root.as_os_str()]);
        c.args(args).env_remove("THINPOOL_ROOT");
        c
    }

    /// Run `thinpool --root ROOT ARGS`, require success, return stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        text(&run_ok(&mut self.cmd(args)).stdout)
    }

    /// `vol ls --json`, parsed.
    pub fn volumes(&self) -> Vec<serde_json::Value> {
        let out = self.ok(&["vol", "ls", "--json"]);
        match serde_json::from_str(&out) {
            Ok(serde_json::Value::Array(v)) => v,
            _ => panic!("vol ls --json printed no JSON array:\n{out}"),
        }
    }

    /// `mapped_blocks` of volume `name` from `vol ls --json` (the pool must not be served).
    pub fn mapped_blocks(&self, name: &str) -> u64 {
        self.volumes()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name} not in vol ls --json"))["mapped_blocks"]
            .as_u64()
            .expect("mapped_blocks is a number")
    }

    /// `thin_check` (the real one, thin-provisioning-tools) passes on the pool's metadata.
    pub fn thin_check(&self) {
        if require_tool("thin_check") {
            let out = run(tool("thin_check").arg(self.metadata()));
            assert!(
                out.status.success(),
                "thin_check failed on {}:\n{}{}",
                self.metadata().display(),
                text(&out.stdout),
                text(&out.stderr)
            );
        }
    }

    /// The default unix socket of [`PoolRoot::serve`].
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    /// `thinpool nbd serve --socket SOCKET EXTRA…`, waited for until it is listening.
    pub fn serve(&self, extra: &[&str]) -> Server {
        let sock = self.socket();
        let mut args: Vec<&str> = vec!["nbd", "serve", "--socket", path_str(&sock)];
        args.extend_from_slice(extra);
        Server::spawn(self, &args, Some(sock.clone()), None)
    }

    /// `thinpool nbd serve ARGS` with no default socket: for TCP (`--listen 127.0.0.1:PORT`).
    pub fn serve_tcp(&self, port: u16, extra: &[&str]) -> Server {
        let listen = format!("127.0.0.1:{port}");
        let mut args: Vec<&str> = vec!["nbd", "serve", "--listen", &listen];
        args.extend_from_slice(extra);
        Server::spawn(self, &args, None, Some(port))
    }
}

/// A path as `&str` (temporary paths are UTF-8).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// A `thinpool nbd serve` child process. Dropping it kills it (SIGKILL) if it still runs; a
/// test ends it with [`Server::stop`] to check the clean exit.
pub struct Server {
    child: Option<Child>,
    log: PathBuf,
    /// The unix socket it serves on, if any.
    pub socket: Option<PathBuf>,
    /// The TCP port it serves on, if any.
    pub port: Option<u16>,
}

impl Server {
    fn spawn(root: &PoolRoot, args: &[&str], socket: Option<PathBuf>, port: Option<u16>) -> Server {
        let log = root.dir.path().join(format!(
            "serve-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        Server::start(root.cmd(args), log, socket, port)
    }

    /// Start `cmd` (a `thinpool … nbd serve …` command line) with its stderr in the file
    /// `log`, and wait until it says it is listening.
    pub fn start(
        mut cmd: Command,
        log: PathBuf,
        socket: Option<PathBuf>,
        port: Option<u16>,
    ) -> Server {
        let logf = std::fs::File::create(&log).expect("create the server log");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .env("RUST_LOG", "thinpool_nbd=debug,info");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(&cmd)));
        let mut s = Server {
            child: Some(child),
            log,
            socket,
            port,
        };
        s.wait_listening(&cmd);
        s
    }

    fn wait_listening(&mut self, cmd: &Command) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log_text();
            if log.contains("serving NBD on") {
                return;
            }
            if let Some(st) = self
                .child
                .as_mut()
                .expect("running")
                .try_wait()
                .expect("wait")
            {
                panic!(
                    "`{}` exited with {st} before listening:\n{log}",
                    describe(cmd)
                );
            }
            assert!(
                Instant::now() < deadline,
                "`{}` did not start listening within 30 s:\n{log}",
                describe(cmd)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the server wrote to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `nbd+unix:///EXPORT?socket=SOCKET`.
    pub fn uri(&self, export: &str) -> String {
        let s = self.socket.as_ref().expect("served on a unix socket");
        format!("nbd+unix:///{export}?socket={}", s.display())
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn signal_and_wait(&mut self, sig: &str) -> ExitStatus {
        let mut child = self.child.take().expect("server still running");
        let kill = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(kill.success(), "kill -{sig} {} failed", child.id());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().expect("wait for the server") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the server did not exit within 60 s of SIG{sig}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM now, with no wait for clients that are still leaving: the server must answer
    /// what it read, commit, stop, remove its unix socket and exit 0 whatever its connections
    /// are doing. (A connection thread that still held the pool once made `thinpool nbd serve`
    /// exit 1 with "the pool is still in use"; `stop_right_after_clients_leave_releases_the_pool`
    /// and `sigterm_with_clients_connected_exits_0` aim at that race, and every test that stops
    /// a server right after its clients exit meets it too.)
    pub fn stop(mut self) {
        let st = self.signal_and_wait("TERM");
        assert!(
            st.success(),
            "the server exited with {st} after SIGTERM:\n{}",
            self.log_text()
        );
        if let Some(s) = &self.socket {
            assert!(
                !s.exists(),
                "the server left its socket {} behind",
                s.display()
            );
        }
    }

    /// SIGTERM and wait, whatever the exit status (the caller checks it).
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal_and_wait("TERM")
    }

    /// SIGKILL: a crash, no commit on the way out.
    pub fn crash(mut self) {
        let st = self.signal_and_wait("KILL");
        assert!(!st.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if !std::thread::panicking() {
                eprintln!("server log:\n{}", self.log_text());
            }
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound and released: a tiny race with other processes).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Start fio writing 256 MiB of random 64 KiB blocks at offset 128 MiB of `uri` with crc32c
/// checksums, verified when the writes end (run in `dir`, which receives fio's files).
pub fn spawn_fio_verify(name: &str, uri: &str, dir: &Path) -> Child {
    tool("fio")
        .current_dir(dir)
        .args([
            &format!("--name={name}"),
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=8",
            "--offset=128M",
            "--size=256M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio")
}

/// `qemu-io -f raw [-r] -c CMD… URI`.
pub fn qemu_io(uri: &str, read_only: bool, cmds: &[String]) -> Output {
    let mut c = tool("qemu-io");
    c.arg("-f").arg("raw");
    if read_only {
        c.arg("-r");
    }
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    run(&mut c)
}

/// [`qemu_io`] that must succeed: exit 0 and no failed pattern check or error in its output.
pub fn qemu_io_ok(uri: &str, read_only: bool, cmds: &[String]) -> String {
    let out = qemu_io(uri, read_only, cmds);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success()
            && !all.contains("verification failed")
            && !all.to_lowercase().contains("error"),
        "qemu-io {cmds:?} on {uri} failed ({}):\n{all}",
        out.status
    );
    all
}

/// `nbdsh -c SCRIPT` (python with `h` not connected; `nbd` and `errno` imported). `nbdsh`
/// runs `python3 -m nbd` from `PATH`: the folder holding nbdsh (where the distribution's python3
/// with the `nbd` module lives) goes first, so a python from pyenv or a venv does not shadow it.
pub fn nbdsh(script: &str) -> Output {
    let nbdsh = which("nbdsh").unwrap_or_else(|| PathBuf::from("nbdsh"));
    let mut path = nbdsh
        .parent()
        .map(|p| p.as_os_str().to_owned())
        .unwrap_or_default();
    if let Some(old) = std::env::var_os("PATH") {
        path.push(":");
        path.push(old);
    }
    let mut c = Command::new(&nbdsh);
    c.env("PATH", path)
        .arg("-c")
        .arg(format!("import errno\n{script}"));
    run(&mut c)
}

/// [`nbdsh`] that must exit 0; its stdout.
pub fn nbdsh_ok(script: &str) -> String {
    let out = nbdsh(script);
    assert!(
        out.status.success(),
        "nbdsh script failed ({}):\n{}\n---- script:\n{script}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `nbdinfo ARGS`, output parsed as JSON (`--json` is added).
pub fn nbdinfo_json(args: &[&str]) -> serde_json::Value {
    let out = run_ok(tool("nbdinfo").arg("--json").args(args));
    let s = text(&out.stdout);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("nbdinfo printed no JSON ({e}):\n{s}"))
}

/// Run `cmp A B` and require the files to be equal.
pub fn assert_cmp(a: &Path, b: &Path) {
    let out = run(Command::new("cmp").arg(a).arg(b));
    assert!(
        out.status.success(),
        "{} and {} differ: {}",
        a.display(),
        b.display(),
        text(&out.stdout)
    );
}

// ---------------------------------------------------------------------------------------------
// A raw NBD client.

/// `NBDMAGIC`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Option reply magic.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
/// `NBD_REP_ERR_TLS_REQD`.
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
/// `NBD_REP_ERR_UNKNOWN`.
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

/// Transmission flag `HAS_FLAGS`.
pub const TFLAG_HAS_FLAGS: u16 = 1;
/// Transmission flag `READ_ONLY`.
pub const TFLAG_READ_ONLY: u16 = 2;

/// Commands.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Structured reply chunk types.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_ERROR`.
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
/// `NBD_REPLY_FLAG_DONE`.
pub const REPLY_FLAG_DONE: u16 = 1;

/// One option reply.
#[derive(Debug, Clone)]
pub struct OptReply {
    /// The option it answers.
    pub option: u32,
    /// Reply type.
    pub kind: u32,
    /// Payload.
    pub data: Vec<u8>,
}

/// One structured reply chunk.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Flags (`DONE`).
    pub flags: u16,
    /// Chunk type.
    pub kind: u16,
    /// Cookie.
    pub cookie: u64,
    /// Payload.
    pub data: Vec<u8>,
}

/// The socket of a [`RawClient`].
pub enum RawSock {
    /// A unix socket.
    Unix(UnixStream),
    /// TCP (for the listeners that require TLS).
    Tcp(TcpStream),
}

impl Read for RawSock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            RawSock::Unix(s) => s.read(buf),
            RawSock::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for RawSock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            RawSock::Unix(s) => s.write(buf),
            RawSock::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            RawSock::Unix(s) => s.flush(),
            RawSock::Tcp(s) => s.flush(),
        }
    }
}

/// A hand-written NBD client on a unix socket or TCP (reads time out after 20 s so a silent
/// server fails the test instead of hanging it).
pub struct RawClient {
    /// The socket.
    pub s: RawSock,
    /// Handshake flags of the greeting.
    pub server_flags: u16,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl RawClient {
    /// Connect to a unix socket, check the fixed-newstyle greeting and send the client flags.
    pub fn connect(socket: &Path, client_flags: u32) -> RawClient {
        let s = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("set timeout");
        RawClient::greet(RawSock::Unix(s), client_flags)
    }

    /// [`RawClient::connect`] over TCP to `127.0.0.1:port`, in plain text.
    pub fn connect_tcp(port: u16, client_flags: u32) -> RawClient {
        let s = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("set timeout");
        RawClient::greet(RawSock::Tcp(s), client_flags)
    }

    fn greet(s: RawSock, client_flags: u32) -> RawClient {
        let mut c = RawClient { s, server_flags: 0 };
        let g = c.read_n(18);
        assert_eq!(be64(&g[0..8]), NBDMAGIC, "greeting magic");
        assert_eq!(be64(&g[8..16]), IHAVEOPT, "greeting is not newstyle");
        c.server_flags = be16(&g[16..18]);
        assert!(
            c.server_flags & 1 != 0,
            "server does not offer FIXED_NEWSTYLE"
        );
        c.send(&client_flags.to_be_bytes());
        c
    }

    /// Exactly `n` bytes, or panic (EOF, timeout).
    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("reading {n} bytes from the server: {e}"));
        b
    }

    /// Send bytes.
    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send to the server");
    }

    /// True if the server closes the connection (EOF or reset) within the read timeout without
    /// sending anything more. Panics if it sends bytes.
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 64];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(n) => panic!(
                "expected the server to close, it sent {n} bytes: {:02x?}",
                &b[..n]
            ),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
            Err(e) => panic!("expected the server to close, got {e}"),
        }
    }

    /// Send option `opt` with `data`.
    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// Read one option reply.
    pub fn opt_reply(&mut self) -> OptReply {
        let h = self.read_n(20);
        assert_eq!(be64(&h[0..8]), OPT_REPLY_MAGIC, "option reply magic");
        let len = be32(&h[16..20]) as usize;
        OptReply {
            option: be32(&h[8..12]),
            kind: be32(&h[12..16]),
            data: self.read_n(len),
        }
    }

    /// Option replies up to and including the final one (ACK or an error).
    pub fn opt_replies(&mut self) -> Vec<OptReply> {
        let mut v = Vec::new();
        loop {
            let r = self.opt_reply();
            let last = r.kind == REP_ACK || r.kind & 0x8000_0000 != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// `NBD_OPT_GO` for `name` (no info requests); returns (size, transmission flags). Panics
    /// unless the server accepts.
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        let replies = self.opt_replies();
        let last = replies.last().expect("at least one reply");
        assert_eq!(
            last.kind,
            REP_ACK,
            "NBD_OPT_GO {name:?} refused: {last:?} ({})",
            String::from_utf8_lossy(&last.data)
        );
        let export = replies
            .iter()
            .find(|r| r.kind == REP_INFO && be16(&r.data) == 0)
            .expect("NBD_OPT_GO sent no NBD_INFO_EXPORT");
        assert_eq!(export.data.len(), 12, "NBD_INFO_EXPORT length");
        (be64(&export.data[2..10]), be16(&export.data[10..12]))
    }

    /// `NBD_OPT_STRUCTURED_REPLY`, which must be acknowledged.
    pub fn structured_replies(&mut self) {
        self.option(OPT_STRUCTURED_REPLY, &[]);
        let r = self.opt_replies();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].kind, REP_ACK, "structured replies refused: {r:?}");
    }

    /// `NBD_OPT_SET_META_CONTEXT` for `name` with `base:allocation`; returns the context id.
    pub fn set_base_allocation(&mut self, name: &str) -> u32 {
        let q = b"base:allocation";
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
        self.option(OPT_SET_META_CONTEXT, &d);
        let r = self.opt_replies();
        assert_eq!(r.len(), 2, "one context and an ACK: {r:?}");
        assert_eq!(r[0].kind, REP_META_CONTEXT);
        assert_eq!(&r[0].data[4..], q);
        assert_eq!(r[1].kind, REP_ACK);
        be32(&r[0].data[0..4])
    }

    /// Send a transmission request (with `payload` for a write).
    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        self.send(&request_header(
            REQUEST_MAGIC,
            kind,
            flags,
            cookie,
            offset,
            length,
        ));
        if !payload.is_empty() {
            self.send(payload);
        }
    }

    /// Read a simple reply header: (error, cookie).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        assert_eq!(
            be32(&h[0..4]),
            SIMPLE_REPLY_MAGIC,
            "simple reply magic: {h:02x?}"
        );
        (be32(&h[4..8]), be64(&h[8..16]))
    }

    /// Read one structured reply chunk.
    pub fn chunk(&mut self) -> Chunk {
        let h = self.read_n(20);
        assert_eq!(
            be32(&h[0..4]),
            STRUCTURED_REPLY_MAGIC,
            "structured reply magic: {h:02x?}"
        );
        let len = be32(&h[16..20]) as usize;
        Chunk {
            flags: be16(&h[4..6]),
            kind: be16(&h[6..8]),
            cookie: be64(&h[8..16]),
            data: self.read_n(len),
        }
    }

    /// Chunks up to and including the one flagged DONE.
    pub fn chunks(&mut self) -> Vec<Chunk> {
        let mut v = Vec::new();
        loop {
            let c = self.chunk();
            let done = c.flags & REPLY_FLAG_DONE != 0;
            v.push(c);
            if done {
                return v;
            }
        }
    }
}

/// A 28-byte request header with the given magic.
pub fn request_header(
    magic: u32,
    kind: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u32,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&magic.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&length.to_be_bytes());
    b
}

/// Big-endian u32 at `at` of `b` (for parsing replies in tests).
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    be32(&b[at..at + 4])
}

/// Big-endian u64 at `at` of `b`.
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    be64(&b[at..at + 8])
}

/// Big-endian u16 at `at` of `b`.
pub fn u16_at(b: &[u8], at: usize) -> u16 {
    be16(&b[at..at + 2])
}
