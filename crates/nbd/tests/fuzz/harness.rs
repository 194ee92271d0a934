//! The NBD fuzz harness, shared by the bounded property run in CI (`crates/nbd/tests/fuzz.rs`)
//! and the libFuzzer targets in `fuzz/` (which include this file by path). Everything here is
//! a plain function over plain inputs: a check returns `Err(what went wrong)` and the caller
//! panics (libFuzzer) or fails the case (proptest, which then shrinks it).
//!
//! Three levels, from pure to live:
//!
//! ```text
//! check_request   28 header bytes + export rules -> Request::parse, classify: spec rules hold
//! check_options   option data -> parse_go / parse_meta_query: no panic, exact re-encoding
//! Fixture         a server on a MemDevice pool with one 1 MiB volume "vol", on a unix socket
//!   raw_session       any byte stream as a client (optionally behind a valid handshake);
//!                     the server must close once the client has, and stay alive
//!   script_session    a model client: a structured handshake and requests, every reply
//!                     checked (magics, cookies, errno, chunk layout, data against a model)
//!   check_alive       a well-behaved client: handshake, READ, DISC
//! ```
//!
//! The checks tolerate no deviation from the NBD spec; one the server is found to have goes
//! in [`KNOWN_DEVIATIONS`] with an `#[ignore]`d regression test until it is fixed.
#![allow(dead_code)]
// NBD is big-endian on the wire (as in the crate itself).
#![allow(clippy::big_endian_bytes)]
#![deny(clippy::little_endian_bytes)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use thinpool_engine::{Pool, PoolOptions};
use thinpool_io::{BlockDevice, MemDevice};
use thinpool_nbd::proto::*;
use thinpool_nbd::{NbdConfig, NbdServer};

/// The one volume of the fixture pool.
pub const VOLUME: &str = "vol";
/// Its size: 16 pool blocks.
pub const VOLUME_SIZE: u64 = 1 << 20;
const BLOCK_SIZE: u64 = 64 << 10;
/// Longest wait for a reply or for the server to close. Much longer than any reply takes:
/// reaching it means the server hangs.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Deviations from the NBD spec the checks tolerate for now (see the ignored regression
/// tests): each is a `(name, what the spec says)`.
pub const KNOWN_DEVIATIONS: &[(&str, &str)] = &[];

// ---------------------------------------------------------------------------------------------
// Pure targets
// ---------------------------------------------------------------------------------------------

/// Export rules from fuzz bytes: a size (biased to small, block-aligned and odd values) and
/// three flags.
pub fn rules_from(size: u64, flags: u8) -> ExportRules {
    let size = match flags >> 4 {
        0 => 0,
        1 => VOLUME_SIZE,
        2 => size % (1 << 40),
        3 => u64::MAX,
        _ => size,
    };
    ExportRules {
        size,
        read_only: flags & 1 != 0,
        structured: flags & 2 != 0,
        base_allocation: flags & 4 != 0,
    }
}

/// `Request::parse` and `classify` on any header and rules: no panic, and every `Ok` obeys
/// the spec (proto.md, "Request types" and "Error values").
pub fn check_request(header: &[u8; REQUEST_LEN], rules: &ExportRules) -> Result<(), String> {
    let magic = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let req = match Request::parse(header) {
        Ok(r) => r,
        Err(e) if magic != REQUEST_MAGIC => {
            if e.0 != magic {
                return Err(format!("BadMagic({:#x}) for magic {magic:#x}", e.0));
            }
            return Ok(());
        }
        Err(e) => return Err(format!("a header with the right magic was refused: {e}")),
    };
    if magic != REQUEST_MAGIC {
        return Err(format!("magic {magic:#x} was accepted"));
    }
    if &req.encode() != header {
        return Err(format!("{req:?} does not encode back to its bytes"));
    }
    check_classify(&req, rules)
}

/// The flags the spec documents for each command (FUA is valid on all).
fn documented_flags(kind: u16) -> u16 {
    match kind {
        CMD_READ => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM | CMD_FLUSH | CMD_CACHE | CMD_DISC => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => 0,
    }
}

/// `classify` against rules restated from the spec, independently of its code.
pub fn check_classify(req: &Request, rules: &ExportRules) -> Result<(), String> {
    let r = classify(req, rules);
    let fail = |why: &str| Err(format!("classify({req:?}, {rules:?}) = {r:?}: {why}"));
    let end = req.offset.checked_add(u64::from(req.length));
    let in_range = end.is_some_and(|e| e <= rules.size);
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    let cmd = match r {
        Err(errno) => {
            let known_flags = CMD_FLAG_FUA
                | CMD_FLAG_NO_HOLE
                | CMD_FLAG_DF
                | CMD_FLAG_REQ_ONE
                | CMD_FLAG_FAST_ZERO;
            if req.kind == CMD_DISC && req.flags & !known_flags == 0 {
                return fail("NBD_CMD_DISC is never refused");
            }
            // Refusals must be for a reason the spec gives, with its errno.
            let known_kind = req.kind <= CMD_BLOCK_STATUS;
            let flags_ok = req.flags & !documented_flags(req.kind) == 0;
            let reason = !known_kind
                || !flags_ok
                || (writes && rules.read_only)
                || (req.kind == CMD_BLOCK_STATUS && (!rules.base_allocation || req.length == 0))
                || (req.flags & CMD_FLAG_DF != 0 && !rules.structured)
                || (matches!(req.kind, CMD_READ | CMD_WRITE) && req.length > MAX_PAYLOAD)
                || (!in_range && req.kind != CMD_FLUSH);
            if !reason {
                return fail("a valid request was refused");
            }
            if writes && rules.read_only && known_kind && flags_ok && errno != Errno::Perm {
                return fail("a write to a read-only export must be EPERM");
            }
            if errno == Errno::Perm && !(writes && rules.read_only) {
                return fail("EPERM is for writes to a read-only export");
            }
            if errno == Errno::NoSpc && (in_range || !writes) {
                return fail("ENOSPC is for writes past the end");
            }
            if !known_kind && errno != Errno::Inval {
                return fail("an unknown command must be EINVAL");
            }
            return Ok(());
        }
        Ok(c) => c,
    };
    let expected_kind = match cmd {
        Command::Read { .. } => CMD_READ,
        Command::Write { .. } => CMD_WRITE,
        Command::Flush => CMD_FLUSH,
        Command::Trim { .. } => CMD_TRIM,
        Command::Cache => CMD_CACHE,
        Command::WriteZeroes { .. } => CMD_WRITE_ZEROES,
        Command::BlockStatus { .. } => CMD_BLOCK_STATUS,
        Command::Disconnect => CMD_DISC,
    };
    if expected_kind != req.kind {
        return fail("the command does not match the request's type");
    }
    let known =
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
    if req.flags & !known != 0 {
        return fail("unknown flags accepted");
    }
    match cmd {
        Command::Flush | Command::Disconnect => return Ok(()),
        Command::Read { df } => {
            if df != (req.flags & CMD_FLAG_DF != 0) || (df && !rules.structured) {
                return fail("DF wrong, or DF without structured replies");
            }
        }
        Command::Write { fua } | Command::Trim { fua } => {
            if fua != (req.flags & CMD_FLAG_FUA != 0) {
                return fail("FUA lost");
            }
        }
        Command::WriteZeroes { fua, no_hole, fast } => {
            if fua != (req.flags & CMD_FLAG_FUA != 0)
                || no_hole != (req.flags & CMD_FLAG_NO_HOLE != 0)
                || fast != (req.flags & CMD_FLAG_FAST_ZERO != 0)
            {
                return fail("write-zeroes flags lost");
            }
        }
        Command::BlockStatus { req_one } => {
            if !rules.base_allocation || req.length == 0 {
                return fail("BLOCK_STATUS without base:allocation, or of zero length");
            }
            if req_one != (req.flags & CMD_FLAG_REQ_ONE != 0) {
                return fail("REQ_ONE lost");
            }
        }
        Command::Cache => {}
    }
    if req.flags & !documented_flags(req.kind) != 0 {
        return fail("a flag not documented for this command was accepted");
    }
    if !in_range {
        return fail("a range outside the export was accepted");
    }
    if matches!(cmd, Command::Read { .. } | Command::Write { .. }) && req.length > MAX_PAYLOAD {
        return fail("a payload over MAX_PAYLOAD was accepted");
    }
    if writes && rules.read_only {
        return fail("a write was accepted on a read-only export");
    }
    Ok(())
}

/// The data of `NBD_OPT_GO` / `NBD_OPT_INFO`, encoded as a client sends it.
pub fn encode_go(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name);
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// The data of the meta context options, encoded as a client sends it.
pub fn encode_meta_query(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name);
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q);
    }
    v
}

/// Both option parsers on any data: no panic, and whatever parses re-encodes to exactly the
/// same bytes (the encoding is canonical: lengths say where everything ends).
pub fn check_options(data: &[u8]) -> Result<(), String> {
    if let Ok(g) = parse_go(data)
        && encode_go(g.name.as_bytes(), &g.infos) != data
    {
        return Err(format!("parse_go({data:?}) = {g:?} does not re-encode"));
    }
    if let Ok(q) = parse_meta_query(data) {
        let qs: Vec<&[u8]> = q.queries.iter().map(|s| s.as_bytes()).collect();
        if encode_meta_query(q.name.as_bytes(), &qs) != data {
            return Err(format!(
                "parse_meta_query({data:?}) = {q:?} does not re-encode"
            ));
        }
    }
    Ok(())
}

/// Round trip of a well-formed `GO` encoding; a name over 4096 bytes or not UTF-8 must be
/// refused, and so must every strict prefix and any extension of the encoding.
pub fn check_go_round_trip(name: &[u8], infos: &[u16]) -> Result<(), String> {
    let infos = &infos[..infos.len().min(usize::from(u16::MAX))];
    let data = encode_go(name, infos);
    let valid = name.len() <= 4096 && std::str::from_utf8(name).is_ok();
    match parse_go(&data) {
        Ok(g) if valid && g.name.as_bytes() == name && g.infos == infos => {}
        Err(_) if !valid => {}
        r => return Err(format!("parse_go(encode({name:?}, {infos:?})) = {r:?}")),
    }
    truncations_refused(&data, |d| parse_go(d).is_ok())
}

/// Round trip of a well-formed meta context query.
pub fn check_meta_round_trip(name: &[u8], queries: &[Vec<u8>]) -> Result<(), String> {
    let qs: Vec<&[u8]> = queries.iter().map(|q| q.as_slice()).collect();
    let data = encode_meta_query(name, &qs);
    let ok = |s: &[u8]| s.len() <= 4096 && std::str::from_utf8(s).is_ok();
    let valid = ok(name) && qs.iter().all(|q| ok(q));
    match parse_meta_query(&data) {
        Ok(m)
            if valid
                && m.name.as_bytes() == name
                && m.queries
                    .iter()
                    .map(|s| s.as_bytes())
                    .eq(qs.iter().copied()) => {}
        Err(_) if !valid => {}
        r => {
            return Err(format!(
                "parse_meta_query(encode({name:?}, {qs:?})) = {r:?}"
            ));
        }
    }
    truncations_refused(&data, |d| parse_meta_query(d).is_ok())
}

fn truncations_refused(data: &[u8], parses: impl Fn(&[u8]) -> bool) -> Result<(), String> {
    // Every strict prefix misses bytes its lengths promise; a trailing byte is extra.
    for cut in [0, 1, 2, data.len() / 2, data.len().saturating_sub(1)] {
        if cut < data.len() && parses(&data[..cut]) {
            return Err(format!("the prefix {:?} of {data:?} parsed", &data[..cut]));
        }
    }
    let mut longer = data.to_vec();
    longer.push(0);
    if parses(&longer) {
        return Err(format!("{data:?} with a trailing byte parsed"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The live server
// ---------------------------------------------------------------------------------------------

/// A server on an in-memory pool with one volume, on a unix socket in a temporary directory.
/// Dropping it stops the server and removes the directory.
pub struct Fixture {
    server: Option<NbdServer>,
    pool: Option<Arc<Pool>>,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// Create the pool and the volume, start the server.
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("a temporary directory for the pool");
        let data: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4 << 20));
        let meta: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4 << 20));
        let opts = PoolOptions {
            // Never wait for space: the volume fits anyway, and a wait would look like a hang.
            error_if_no_space: true,
            commit_interval: None,
            ..PoolOptions::default()
        };
        let pool = Pool::create_on(&dir.path().join("pool"), data, meta, BLOCK_SIZE, opts)
            .expect("a pool on memory devices");
        pool.create_volume(VOLUME, VOLUME_SIZE)
            .expect("the fixture volume");
        let pool = Arc::new(pool);
        let socket = dir.path().join("nbd.sock");
        let server = NbdServer::start(
            pool.clone(),
            &NbdConfig {
                unix_socket: Some(socket.clone()),
                ..NbdConfig::default()
            },
        )
        .expect("the NBD server starts");
        Fixture {
            server: Some(server),
            pool: Some(pool),
            socket,
            dir,
        }
    }

    fn connect(&self) -> Result<UnixStream, String> {
        let s = UnixStream::connect(&self.socket).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|_| s.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| format!("socket timeouts: {e}"))?;
        Ok(s)
    }

    /// Send `bytes` as a client would, then close the sending half; read everything the
    /// server answers until it closes. `Err` if it does not close within [`IO_TIMEOUT`]
    /// (a hang) or if it is dead afterwards ([`Fixture::check_alive`]).
    pub fn raw_session(&self, prefix: &[u8], bytes: &[u8]) -> Result<usize, String> {
        let mut s = self.connect()?;
        let mut r = s.try_clone().map_err(|e| format!("clone: {e}"))?;
        // Drain on another thread so neither side blocks on a full socket buffer.
        let drain = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            let mut total = 0usize;
            loop {
                match r.read(&mut buf) {
                    Ok(0) => return Ok(total),
                    Ok(n) => total += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(total),
                    Err(e) => return Err(e),
                }
            }
        });
        // The server may close early (bad magic, unknown flags): the rest is not read.
        let _ = s.write_all(prefix).and_then(|_| s.write_all(bytes));
        let _ = s.shutdown(std::net::Shutdown::Write);
        let got = drain
            .join()
            .map_err(|_| "the drain thread panicked".to_string())?
            .map_err(|e| {
                format!("the server did not close the connection after the client did: {e}")
            })?;
        self.check_alive()?;
        Ok(got)
    }

    /// A well-behaved client: fixed newstyle, `GO` on the default export, one READ, DISC.
    pub fn check_alive(&self) -> Result<(), String> {
        let mut c = Client::new(self.connect()?);
        c.greeting()?;
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
        c.send_option(OPT_GO, &encode_go(b"", &[]))?;
        let (_, flags) = c.go_replies(OPT_GO, false)?;
        if flags & TFLAG_HAS_FLAGS == 0 {
            return Err(format!("transmission flags {flags:#x} lack HAS_FLAGS"));
        }
        let cookie = 0x00c0_ffee;
        c.send(
            &Request {
                flags: 0,
                kind: CMD_READ,
                cookie,
                offset: 0,
                length: 4096,
            }
            .encode(),
        )?;
        let (c2, err) = c.simple_reply()?;
        if c2 != cookie || err != 0 {
            return Err(format!("liveness READ: cookie {c2:#x}, error {err}"));
        }
        c.recv(4096)?;
        c.disconnect()
    }

    /// A client in transmission on the default export, after the handshake
    /// [`handshake_prefix`] sends (its replies read and checked).
    pub fn transmission(&self, structured: bool, meta: bool) -> Result<Client, String> {
        let mut c = Client::new(self.connect()?);
        c.greeting()?;
        c.send(&handshake_prefix(structured, meta))?;
        if structured {
            c.expect_reply(OPT_STRUCTURED_REPLY, REP_ACK)?;
            if meta {
                c.option_reply(OPT_SET_META_CONTEXT)?;
                c.expect_reply(OPT_SET_META_CONTEXT, REP_ACK)?;
            }
        }
        let (_, f) = c.go_replies(OPT_GO, false)?;
        check_tflags(f, false, structured)?;
        Ok(c)
    }

    /// Run a structured client session, checking every reply against the spec and a model of
    /// the volume's bytes. Returns how many transmission requests were answered and checked.
    pub fn script_session(&self, script: &Script) -> Result<usize, String> {
        let mut c = Client::new(self.connect()?);
        let r = run_script(&mut c, script);
        drop(c);
        let n = r.map_err(|e| format!("{e}\n  in {script:#?}"))?;
        self.check_alive()?;
        Ok(n)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
        if let Some(p) = self.pool.take().and_then(Arc::into_inner) {
            let _ = p.close();
        }
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture::new()
    }
}

/// The client bytes of a valid handshake up to transmission on the default export:
/// optionally with structured replies and `base:allocation`.
pub fn handshake_prefix(structured: bool, meta: bool) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    let mut opt = |o: u32, data: &[u8]| {
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
    };
    if structured {
        opt(OPT_STRUCTURED_REPLY, &[]);
        if meta {
            opt(
                OPT_SET_META_CONTEXT,
                &encode_meta_query(b"", &[BASE_ALLOCATION.as_bytes()]),
            );
        }
    }
    opt(OPT_GO, &encode_go(b"", &[]));
    v
}

// ---------------------------------------------------------------------------------------------
// Structured sessions
// ---------------------------------------------------------------------------------------------

/// An export name a script asks for.
#[derive(Debug, Clone, Arbitrary)]
pub enum ExportName {
    /// `""`: the only volume.
    Default,
    /// `"vol"`.
    Volume,
    /// `"vol@ro"`.
    ReadOnly,
    /// Anything else (refused unless it happens to be one of the above).
    Other(String),
}

impl ExportName {
    fn as_str(&self) -> &str {
        match self {
            ExportName::Default => "",
            ExportName::Volume => VOLUME,
            ExportName::ReadOnly => "vol@ro",
            ExportName::Other(s) => s,
        }
    }
    /// The server strips one `@ro` and takes an empty name as the only volume.
    fn exists(&self) -> bool {
        let s = self.as_str();
        matches!(s.strip_suffix("@ro").unwrap_or(s), "" | VOLUME)
    }
    fn read_only(&self) -> bool {
        self.as_str().ends_with("@ro")
    }
}

/// One handshake step.
#[derive(Debug, Clone, Arbitrary)]
pub enum Opt {
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_LIST` with data (refused).
    ListWithData(u8),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    Structured,
    /// `NBD_OPT_STRUCTURED_REPLY` with data (refused).
    StructuredWithData(u8),
    /// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
    Meta {
        /// Set rather than list.
        set: bool,
        /// Export.
        name: ExportName,
        /// Queries.
        queries: Vec<Query>,
    },
    /// `NBD_OPT_INFO`.
    Info {
        /// Export.
        name: ExportName,
        /// Information asked for.
        infos: Vec<u16>,
    },
    /// `NBD_OPT_GO` / `NBD_OPT_INFO` with a cut or extended encoding (refused).
    Malformed {
        /// GO rather than INFO.
        go: bool,
        /// Export.
        name: ExportName,
        /// Information asked for.
        infos: Vec<u16>,
        /// Bytes cut from the end (at least one), or one added when zero.
        cut: u8,
    },
    /// `NBD_OPT_STARTTLS` (no TLS configured: unsupported).
    StartTls,
    /// An option the server does not know.
    Unknown(u32, Vec<u8>),
    /// An option that ends the session (one variant, so that few scripts end early).
    End(End),
}

/// Options after which the session is over.
#[derive(Debug, Clone, Arbitrary)]
pub enum End {
    /// `NBD_OPT_ABORT`.
    Abort,
    /// An option header without `IHAVEOPT`: the server closes.
    BadMagic(u64),
    /// Option data over `MAX_OPTION`: the server closes.
    TooBig,
}

/// A meta context query.
#[derive(Debug, Clone, Arbitrary)]
pub enum Query {
    /// `base:allocation`.
    BaseAllocation,
    /// `base:` (the whole namespace).
    Base,
    /// Anything else.
    Other(String),
}

impl Query {
    fn as_str(&self) -> &str {
        match self {
            Query::BaseAllocation => BASE_ALLOCATION,
            Query::Base => "base:",
            Query::Other(s) => s,
        }
    }
}

/// How the handshake ends.
#[derive(Debug, Clone, Arbitrary)]
pub enum Finish {
    /// `NBD_OPT_GO`.
    Go {
        /// Export.
        name: ExportName,
        /// Information asked for.
        infos: Vec<u16>,
    },
    /// `NBD_OPT_EXPORT_NAME`.
    ExportName(ExportName),
}

/// A request offset: mostly inside the export.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Offset {
    /// `x % size`.
    Inside(u32),
    /// `size - x`.
    FromEnd(u16),
    /// As given.
    Raw(u64),
}

/// A request length: mostly small.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Length {
    /// Up to 64 KiB.
    Small(u16),
    /// Up to the export size.
    Medium(u32),
    /// As given.
    Raw(u32),
}

/// One transmission request.
#[derive(Debug, Clone, Arbitrary)]
pub struct Req {
    /// Command type (any value: unknown ones must be refused).
    pub kind: u16,
    /// Command flags.
    pub flags: u16,
    /// Cookie.
    pub cookie: u64,
    /// Offset.
    pub offset: Offset,
    /// Length.
    pub length: Length,
    /// Seed of a write's payload.
    pub fill: u8,
}

impl Req {
    fn to_request(&self) -> Request {
        let offset = match self.offset {
            Offset::Inside(x) => u64::from(x) % VOLUME_SIZE,
            Offset::FromEnd(x) => VOLUME_SIZE.saturating_sub(u64::from(x)),
            Offset::Raw(x) => x,
        };
        let length = match self.length {
            Length::Small(x) => u32::from(x),
            Length::Medium(x) => x % (VOLUME_SIZE as u32 + 1),
            Length::Raw(x) => x,
        };
        Request {
            flags: self.flags,
            // Mostly known commands, so most requests do something.
            kind: if self.kind < 0xfff0 {
                self.kind % 10
            } else {
                self.kind
            },
            cookie: self.cookie,
            offset,
            length,
        }
    }
}

/// A whole client session.
#[derive(Debug, Clone, Arbitrary)]
pub struct Script {
    /// Ask for no zero padding after `EXPORT_NAME`.
    pub no_zeroes: bool,
    /// Unknown client flag bits when `>= 0xf0` (the server must close); else none.
    pub unknown_flags: u8,
    /// Options before the end of the handshake.
    pub options: Vec<Opt>,
    /// The end of the handshake.
    pub finish: Finish,
    /// Requests in transmission (one at a time, each reply checked).
    pub requests: Vec<Req>,
}

impl Script {
    /// Decode a script from fuzz bytes (any bytes give a script).
    pub fn from_bytes(data: &[u8]) -> Script {
        Script::arbitrary_take_rest(Unstructured::new(data)).unwrap_or_else(|_| Script {
            no_zeroes: true,
            unknown_flags: 0,
            options: Vec::new(),
            finish: Finish::Go {
                name: ExportName::Default,
                infos: Vec::new(),
            },
            requests: Vec::new(),
        })
    }
}

/// A client over a socket, with reads that fail rather than block forever. Methods return
/// `Err` on anything the spec does not allow.
pub struct Client {
    s: UnixStream,
}

fn io_err(what: &str) -> impl FnOnce(io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Client {
    pub fn new(s: UnixStream) -> Client {
        Client { s }
    }

    pub fn send(&mut self, b: &[u8]) -> Result<(), String> {
        self.s.write_all(b).map_err(io_err("sending"))
    }

    pub fn recv(&mut self, n: usize) -> Result<Vec<u8>, String> {
        let mut b = vec![0u8; n];
        self.s
            .read_exact(&mut b)
            .map_err(io_err("waiting for the server"))?;
        Ok(b)
    }

    pub fn u16(&mut self) -> Result<u16, String> {
        let b = self.recv(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, String> {
        let b = self.recv(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, String> {
        let b = self.recv(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_be_bytes(a))
    }

    /// The server must close without sending anything more.
    pub fn expect_eof(&mut self) -> Result<(), String> {
        let mut b = [0u8; 64];
        let r = loop {
            match self.s.read(&mut b) {
                // libFuzzer's timers interrupt reads.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r,
            }
        };
        match r {
            Ok(0) => Ok(()),
            Ok(n) => Err(format!(
                "expected the server to close, got {n} more bytes: {:?}",
                &b[..n]
            )),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(format!("expected the server to close: {e}")),
        }
    }

    pub fn greeting(&mut self) -> Result<(), String> {
        let (m, o, f) = (self.u64()?, self.u64()?, self.u16()?);
        if m != NBDMAGIC || o != IHAVEOPT || f != FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES {
            return Err(format!("bad greeting {m:#x} {o:#x} {f:#x}"));
        }
        Ok(())
    }

    pub fn send_option(&mut self, opt: u32, data: &[u8]) -> Result<(), String> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b)
    }

    /// One option reply: `(type, data)`.
    pub fn option_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>), String> {
        let magic = self.u64()?;
        let o = self.u32()?;
        let kind = self.u32()?;
        let len = self.u32()?;
        if magic != REPLY_MAGIC || o != opt {
            return Err(format!(
                "option reply magic {magic:#x} for option {o}, expected option {opt}"
            ));
        }
        if len > MAX_OPTION {
            return Err(format!("option reply of {len} bytes"));
        }
        let data = self.recv(len as usize)?;
        if kind & (1 << 31) != 0 && std::str::from_utf8(&data).is_err() {
            return Err(format!("error reply {kind:#x} with a message not in UTF-8"));
        }
        Ok((kind, data))
    }

    /// Exactly one reply, of type `want`.
    pub fn expect_reply(&mut self, opt: u32, want: u32) -> Result<(), String> {
        let (kind, data) = self.option_reply(opt)?;
        if kind != want {
            return Err(format!(
                "option {opt}: reply {kind:#x} ({:?}), expected {want:#x}",
                String::from_utf8_lossy(&data)
            ));
        }
        if want == REP_ACK && !data.is_empty() {
            return Err(format!("option {opt}: ACK with data"));
        }
        Ok(())
    }

    /// The replies to a successful `INFO`/`GO`: `(size, transmission flags)`.
    pub fn go_replies(&mut self, opt: u32, names: bool) -> Result<(u64, u16), String> {
        let mut export = None;
        loop {
            let (kind, d) = self.option_reply(opt)?;
            match kind {
                REP_ACK if d.is_empty() => break,
                REP_INFO if d.len() >= 2 => {
                    let t = u16::from_be_bytes([d[0], d[1]]);
                    match t {
                        INFO_EXPORT if d.len() == 12 => {
                            let mut a = [0u8; 8];
                            a.copy_from_slice(&d[2..10]);
                            export =
                                Some((u64::from_be_bytes(a), u16::from_be_bytes([d[10], d[11]])));
                        }
                        INFO_BLOCK_SIZE if d.len() == 14 => {}
                        INFO_NAME | INFO_DESCRIPTION if names => {}
                        _ => return Err(format!("option {opt}: bad NBD_REP_INFO {d:?}")),
                    }
                }
                _ => {
                    return Err(format!(
                        "option {opt}: reply {kind:#x} ({:?}) to a valid request",
                        String::from_utf8_lossy(&d)
                    ));
                }
            }
        }
        let (size, flags) = export.ok_or(format!("option {opt}: no NBD_INFO_EXPORT"))?;
        if size != VOLUME_SIZE {
            return Err(format!("export size {size}, expected {VOLUME_SIZE}"));
        }
        Ok((size, flags))
    }

    pub fn simple_reply(&mut self) -> Result<(u64, u32), String> {
        let magic = self.u32()?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(format!("simple reply magic {magic:#x}"));
        }
        let err = self.u32()?;
        let cookie = self.u64()?;
        Ok((cookie, err))
    }

    pub fn disconnect(&mut self) -> Result<(), String> {
        self.send(
            &Request {
                flags: 0,
                kind: CMD_DISC,
                cookie: 0,
                offset: 0,
                length: 0,
            }
            .encode(),
        )?;
        self.expect_eof()
    }
}

/// What the handshake negotiated.
struct Negotiated {
    rules: ExportRules,
}

/// Handshake: `None` when the script ends the session before transmission.
fn run_handshake(c: &mut Client, script: &Script) -> Result<Option<Negotiated>, String> {
    c.greeting()?;
    let mut flags = FLAG_C_FIXED_NEWSTYLE;
    if script.no_zeroes {
        flags |= FLAG_C_NO_ZEROES;
    }
    let unknown = script.unknown_flags >= 0xf0;
    if unknown {
        flags |= u32::from(script.unknown_flags & 0x0f | 1) << 2;
    }
    c.send(&flags.to_be_bytes())?;
    if unknown {
        return c.expect_eof().map(|_| None);
    }
    let mut structured = false;
    let mut meta_for: Option<String> = None;
    for opt in &script.options {
        match opt {
            Opt::List => {
                c.send_option(OPT_LIST, &[])?;
                let mut names = Vec::new();
                loop {
                    let (kind, d) = c.option_reply(OPT_LIST)?;
                    match kind {
                        REP_ACK => break,
                        REP_SERVER if d.len() >= 4 => {
                            let n = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
                            let name = d
                                .get(4..4 + n)
                                .ok_or(format!("NBD_REP_SERVER name past its end: {d:?}"))?;
                            names.push(String::from_utf8_lossy(name).into_owned());
                        }
                        _ => return Err(format!("NBD_OPT_LIST: reply {kind:#x} {d:?}")),
                    }
                }
                if names != [VOLUME] {
                    return Err(format!("NBD_OPT_LIST gave {names:?}"));
                }
            }
            Opt::ListWithData(b) => {
                c.send_option(OPT_LIST, &[*b])?;
                c.expect_reply(OPT_LIST, REP_ERR_INVALID)?;
            }
            Opt::Structured => {
                c.send_option(OPT_STRUCTURED_REPLY, &[])?;
                c.expect_reply(OPT_STRUCTURED_REPLY, REP_ACK)?;
                structured = true;
            }
            Opt::StructuredWithData(b) => {
                c.send_option(OPT_STRUCTURED_REPLY, &[*b])?;
                c.expect_reply(OPT_STRUCTURED_REPLY, REP_ERR_INVALID)?;
            }
            Opt::Meta { set, name, queries } => {
                let o = if *set {
                    OPT_SET_META_CONTEXT
                } else {
                    OPT_LIST_META_CONTEXT
                };
                let qs: Vec<&[u8]> = queries.iter().map(|q| q.as_str().as_bytes()).collect();
                c.send_option(o, &encode_meta_query(name.as_str().as_bytes(), &qs))?;
                let too_long = name.as_str().len() > 4096 || qs.iter().any(|q| q.len() > 4096);
                if !structured || too_long {
                    c.expect_reply(o, REP_ERR_INVALID)?;
                    continue;
                }
                if !name.exists() {
                    c.expect_reply(o, REP_ERR_UNKNOWN)?;
                    continue;
                }
                let selected = if *set {
                    queries.iter().any(|q| q.as_str() == BASE_ALLOCATION)
                } else {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| matches!(q.as_str(), "base:allocation" | "base:"))
                };
                if selected {
                    let (kind, d) = c.option_reply(o)?;
                    let want = rep_meta_context(BASE_ALLOCATION_ID, BASE_ALLOCATION);
                    if kind != REP_META_CONTEXT || d != want {
                        return Err(format!("meta context reply {kind:#x} {d:?}"));
                    }
                }
                c.expect_reply(o, REP_ACK)?;
                if *set {
                    meta_for = selected.then(|| name.as_str().to_string());
                }
            }
            Opt::Info { name, infos } => {
                c.send_option(OPT_INFO, &encode_go(name.as_str().as_bytes(), infos))?;
                if name.as_str().len() > 4096 || infos.len() > usize::from(u16::MAX) {
                    c.expect_reply(OPT_INFO, REP_ERR_INVALID)?;
                } else if !name.exists() {
                    c.expect_reply(OPT_INFO, REP_ERR_UNKNOWN)?;
                } else {
                    let (_, f) = c.go_replies(OPT_INFO, true)?;
                    check_tflags(f, name.read_only(), structured)?;
                }
            }
            Opt::Malformed {
                go,
                name,
                infos,
                cut,
            } => {
                let o = if *go { OPT_GO } else { OPT_INFO };
                let mut d = encode_go(name.as_str().as_bytes(), infos);
                if *cut == 0 {
                    d.push(0);
                } else {
                    d.truncate(d.len() - (usize::from(*cut)).min(d.len()));
                }
                c.send_option(o, &d)?;
                c.expect_reply(o, REP_ERR_INVALID)?;
            }
            Opt::StartTls => {
                c.send_option(OPT_STARTTLS, &[])?;
                c.expect_reply(OPT_STARTTLS, REP_ERR_UNSUP)?;
            }
            Opt::Unknown(o, data) => {
                let known = [1, 2, 3, 5, 6, 7, 8, 9, 10];
                let o = if known.contains(o) { o + 100 } else { *o };
                c.send_option(o, data)?;
                c.expect_reply(o, REP_ERR_UNSUP)?;
            }
            Opt::End(End::Abort) => {
                c.send_option(OPT_ABORT, &[])?;
                c.expect_reply(OPT_ABORT, REP_ACK)?;
                return c.expect_eof().map(|_| None);
            }
            Opt::End(End::BadMagic(m)) => {
                let m = if *m == IHAVEOPT { m + 1 } else { *m };
                let mut b = m.to_be_bytes().to_vec();
                b.extend_from_slice(&OPT_LIST.to_be_bytes());
                b.extend_from_slice(&0u32.to_be_bytes());
                c.send(&b)?;
                return c.expect_eof().map(|_| None);
            }
            Opt::End(End::TooBig) => {
                let mut b = IHAVEOPT.to_be_bytes().to_vec();
                b.extend_from_slice(&OPT_GO.to_be_bytes());
                b.extend_from_slice(&(MAX_OPTION + 1).to_be_bytes());
                c.send(&b)?;
                return c.expect_eof().map(|_| None);
            }
        }
    }
    let (name, flags) = match &script.finish {
        Finish::Go { name, infos } => {
            c.send_option(OPT_GO, &encode_go(name.as_str().as_bytes(), infos))?;
            if name.as_str().len() > 4096 || infos.len() > usize::from(u16::MAX) {
                c.expect_reply(OPT_GO, REP_ERR_INVALID)?;
                return abort(c);
            }
            if !name.exists() {
                c.expect_reply(OPT_GO, REP_ERR_UNKNOWN)?;
                return abort(c);
            }
            let (_, f) = c.go_replies(OPT_GO, true)?;
            (name, f)
        }
        Finish::ExportName(name) => {
            c.send_option(OPT_EXPORT_NAME, name.as_str().as_bytes())?;
            if !name.exists() {
                return c.expect_eof().map(|_| None);
            }
            let size = c.u64()?;
            let f = c.u16()?;
            if !script.no_zeroes && c.recv(124)? != [0u8; 124] {
                return Err("the 124 bytes after EXPORT_NAME are not zeros".into());
            }
            if size != VOLUME_SIZE {
                return Err(format!("EXPORT_NAME size {size}"));
            }
            (name, f)
        }
    };
    check_tflags(flags, name.read_only(), structured)?;
    Ok(Some(Negotiated {
        rules: ExportRules {
            size: VOLUME_SIZE,
            read_only: name.read_only(),
            structured,
            base_allocation: meta_for.as_deref() == Some(name.as_str()),
        },
    }))
}

fn abort(c: &mut Client) -> Result<Option<Negotiated>, String> {
    c.send_option(OPT_ABORT, &[])?;
    c.expect_reply(OPT_ABORT, REP_ACK)?;
    c.expect_eof().map(|_| None)
}

fn check_tflags(f: u16, read_only: bool, structured: bool) -> Result<(), String> {
    let must = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
    let ok = f & must == must
        && (f & TFLAG_READ_ONLY != 0) == read_only
        && (f & TFLAG_SEND_DF != 0) == structured
        && (!read_only || f & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES) == 0);
    if !ok {
        return Err(format!(
            "transmission flags {f:#x} (read-only {read_only}, structured {structured})"
        ));
    }
    Ok(())
}

/// What the client knows of the volume: bytes, and whether each is known (after TRIM the
/// content is unspecified until rewritten).
struct Model {
    bytes: Vec<u8>,
    known: Vec<bool>,
}

impl Model {
    fn check(&self, offset: u64, got: &[u8], what: &str) -> Result<(), String> {
        let o = offset as usize;
        for (i, &b) in got.iter().enumerate() {
            if self.known[o + i] && self.bytes[o + i] != b {
                return Err(format!(
                    "{what}: byte {} reads {b:#04x}, model says {:#04x}",
                    o + i,
                    self.bytes[o + i]
                ));
            }
        }
        Ok(())
    }
    fn set(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.bytes[o..o + data.len()].copy_from_slice(data);
        self.known[o..o + data.len()].fill(true);
    }
    fn forget(&mut self, offset: u64, len: u64) {
        let o = offset as usize;
        self.known[o..o + len as usize].fill(false);
    }
}

fn payload(fill: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (offset as usize + i).wrapping_mul(31) as u8 ^ fill)
        .collect()
}

fn run_script(c: &mut Client, script: &Script) -> Result<usize, String> {
    let Some(n) = run_handshake(c, script)? else {
        return Ok(0);
    };
    let rules = n.rules;
    // The volume may hold anything from earlier sessions: read it all first.
    let mut model = Model {
        bytes: vec![0; VOLUME_SIZE as usize],
        known: vec![true; VOLUME_SIZE as usize],
    };
    let all = Request {
        flags: 0,
        kind: CMD_READ,
        cookie: u64::MAX,
        offset: 0,
        length: VOLUME_SIZE as u32,
    };
    c.send(&all.encode())?;
    let data = read_reply(c, &all, &rules)?;
    model.bytes = data;

    for (done, r) in script.requests.iter().enumerate() {
        let req = r.to_request();
        if req.kind == CMD_DISC {
            c.send(&req.encode())?;
            return c.expect_eof().map(|_| done);
        }
        if req.kind == CMD_WRITE && req.length > MAX_PAYLOAD {
            // Too big to skip: the server closes.
            c.send(&req.encode())?;
            return c.expect_eof().map(|_| done);
        }
        let mut msg = req.encode().to_vec();
        let data = if req.kind == CMD_WRITE {
            let d = payload(r.fill, req.offset, req.length as usize);
            msg.extend_from_slice(&d);
            d
        } else {
            Vec::new()
        };
        c.send(&msg)?;
        let expected = classify(&req, &rules);
        match expected {
            Ok(Command::Read { .. }) => {
                let got = read_reply(c, &req, &rules)?;
                model.check(req.offset, &got, &format!("READ {req:?}"))?;
            }
            Ok(Command::BlockStatus { req_one }) => block_status_reply(c, &req, req_one, &model)?,
            Ok(Command::WriteZeroes {
                no_hole: true,
                fast: true,
                ..
            }) => expect_error(c, &req, &rules, Errno::NotSup)?,
            Ok(cmd) => {
                let (cookie, err) = c.simple_reply()?;
                if cookie != req.cookie || err != 0 {
                    return Err(format!(
                        "{req:?}: reply cookie {cookie:#x} error {err}, expected success"
                    ));
                }
                match cmd {
                    Command::Write { .. } => model.set(req.offset, &data),
                    Command::WriteZeroes { .. } => {
                        model.set(req.offset, &vec![0; req.length as usize])
                    }
                    Command::Trim { .. } => model.forget(req.offset, u64::from(req.length)),
                    _ => {}
                }
            }
            Err(errno) => expect_error(c, &req, &rules, errno)?,
        }
    }
    c.disconnect().map(|_| script.requests.len())
}

/// The error reply the spec asks for: an error chunk for READ and BLOCK_STATUS with
/// structured replies, else a simple reply; the request's cookie either way.
pub fn expect_error(
    c: &mut Client,
    req: &Request,
    rules: &ExportRules,
    errno: Errno,
) -> Result<(), String> {
    if rules.structured && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS) {
        let (flags, kind, len) = chunk_header_for(c, req)?;
        let d = c.recv(len as usize)?;
        if flags & REPLY_FLAG_DONE == 0 || kind != REPLY_TYPE_ERROR || d.len() < 6 {
            return Err(format!(
                "{req:?}: expected one error chunk, got type {kind:#x} flags {flags:#x} {d:?}"
            ));
        }
        let e = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
        let mlen = u16::from_be_bytes([d[4], d[5]]) as usize;
        if e != errno as u32 || mlen != d.len() - 6 {
            return Err(format!(
                "{req:?}: error chunk {e} (+{mlen} bytes), expected {errno:?}"
            ));
        }
    } else {
        let (cookie, err) = c.simple_reply()?;
        if cookie != req.cookie || err != errno as u32 {
            return Err(format!(
                "{req:?}: reply cookie {cookie:#x} error {err}, expected {errno:?}"
            ));
        }
    }
    Ok(())
}

fn chunk_header_for(c: &mut Client, req: &Request) -> Result<(u16, u16, u32), String> {
    let magic = c.u32()?;
    let flags = c.u16()?;
    let kind = c.u16()?;
    let cookie = c.u64()?;
    let len = c.u32()?;
    if magic != STRUCTURED_REPLY_MAGIC || cookie != req.cookie {
        return Err(format!(
            "{req:?}: chunk magic {magic:#x} cookie {cookie:#x} (structured replies negotiated)"
        ));
    }
    if len > MAX_PAYLOAD + 64 {
        return Err(format!("{req:?}: chunk of {len} bytes"));
    }
    Ok((flags, kind, len))
}

/// A successful READ's reply: the bytes read, with every chunk checked (proto.md,
/// "Structured replies" and `NBD_CMD_READ`).
pub fn read_reply(c: &mut Client, req: &Request, rules: &ExportRules) -> Result<Vec<u8>, String> {
    let len = req.length as usize;
    if !rules.structured {
        let (cookie, err) = c.simple_reply()?;
        if cookie != req.cookie || err != 0 {
            return Err(format!("{req:?}: reply cookie {cookie:#x} error {err}"));
        }
        return c.recv(len);
    }
    let df = req.flags & CMD_FLAG_DF != 0;
    let mut out = vec![0u8; len];
    let mut covered = vec![false; len];
    let mut content_chunks = 0;
    loop {
        let (flags, kind, clen) = chunk_header_for(c, req)?;
        let done = flags & REPLY_FLAG_DONE != 0;
        match kind {
            REPLY_TYPE_NONE if done && clen == 0 => break,
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                content_chunks += 1;
                let body = c.recv(clen as usize)?;
                if body.len() < 8 {
                    return Err(format!("{req:?}: content chunk of {clen} bytes"));
                }
                let mut a = [0u8; 8];
                a.copy_from_slice(&body[..8]);
                let off = u64::from_be_bytes(a);
                let (n, data) = if kind == REPLY_TYPE_OFFSET_HOLE {
                    if body.len() != 12 {
                        return Err(format!("{req:?}: hole chunk of {clen} bytes"));
                    }
                    let n = u32::from_be_bytes([body[8], body[9], body[10], body[11]]) as usize;
                    (n, None)
                } else {
                    (body.len() - 8, Some(&body[8..]))
                };
                if n == 0 {
                    return Err(format!("{req:?}: a content chunk describes no bytes"));
                }
                let start = off
                    .checked_sub(req.offset)
                    .map(|s| s as usize)
                    .filter(|&s| s + n <= len)
                    .ok_or(format!("{req:?}: chunk at {off}+{n} outside the request"))?;
                if covered[start..start + n].iter().any(|&b| b) {
                    return Err(format!("{req:?}: chunk at {off}+{n} overlaps another"));
                }
                covered[start..start + n].fill(true);
                if let Some(d) = data {
                    out[start..start + n].copy_from_slice(d);
                }
                if done {
                    break;
                }
            }
            _ => {
                let body = c.recv(clen as usize)?;
                return Err(format!(
                    "{req:?}: unexpected chunk type {kind:#x} flags {flags:#x} {body:?}"
                ));
            }
        }
    }
    if covered.iter().any(|&b| !b) {
        return Err(format!("{req:?}: the chunks do not cover the whole read"));
    }
    if df && content_chunks > 1 {
        return Err(format!("{req:?}: DF read in {content_chunks} chunks"));
    }
    Ok(out)
}

fn block_status_reply(
    c: &mut Client,
    req: &Request,
    req_one: bool,
    model: &Model,
) -> Result<(), String> {
    let (flags, kind, len) = chunk_header_for(c, req)?;
    let d = c.recv(len as usize)?;
    if flags & REPLY_FLAG_DONE == 0 || kind != REPLY_TYPE_BLOCK_STATUS {
        return Err(format!(
            "{req:?}: block status chunk type {kind:#x} flags {flags:#x}"
        ));
    }
    if d.len() < 12 || (d.len() - 4) % 8 != 0 {
        return Err(format!(
            "{req:?}: block status payload of {} bytes",
            d.len()
        ));
    }
    let id = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
    if id != BASE_ALLOCATION_ID {
        return Err(format!("{req:?}: context id {id}"));
    }
    let descs: Vec<(u32, u32)> = d[4..]
        .chunks(8)
        .map(|x| {
            (
                u32::from_be_bytes([x[0], x[1], x[2], x[3]]),
                u32::from_be_bytes([x[4], x[5], x[6], x[7]]),
            )
        })
        .collect();
    if req_one && descs.len() != 1 {
        return Err(format!("{req:?}: REQ_ONE answered with {descs:?}"));
    }
    let mut pos = req.offset;
    for &(l, st) in &descs {
        if l == 0 {
            return Err(format!("{req:?}: zero-length descriptor in {descs:?}"));
        }
        let end = pos + u64::from(l);
        if end > req.offset + u64::from(req.length) {
            return Err(format!("{req:?}: descriptors {descs:?} exceed the request"));
        }
        if st & STATE_ZERO != 0 {
            let zeros = vec![0u8; l as usize];
            model.check(pos, &zeros, &format!("BLOCK_STATUS {req:?} says zero"))?;
        }
        pos = end;
    }
    Ok(())
}
