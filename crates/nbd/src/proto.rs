//! The NBD wire format (the NBD project's `doc/proto.md`): constants, parsers for what a client
//! sends, and encoders for what the server answers. Pure functions over byte slices, so the
//! fuzz harness can drive them without sockets. Everything on the wire is big-endian.

use std::fmt;

/// `NBDMAGIC`: first eight bytes of the server's greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle greeting magic, and the prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zero padding.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// An export in the list.
pub const REP_SERVER: u32 = 2;
/// An information item of `INFO`/`GO`.
pub const REP_INFO: u32 = 3;
/// A metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option unknown to the server.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Forbidden by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Malformed option or not allowed now.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// TLS is required first.
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// The option's data is too big.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
/// Canonical name.
pub const INFO_NAME: u16 = 1;
/// Description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Read-only export.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Flush supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// FUA supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Trim supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Write-zeroes supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// DF (don't fragment) supported for structured reads.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Flushes are global: many connections may be used at once.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Cache (prefetch) supported.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// Fast-zero supported.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Write-zeroes must allocate.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Do not fragment a structured read.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: one descriptor only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Write-zeroes: fail fast if zeroing would be slow.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim.
pub const CMD_TRIM: u16 = 4;
/// Cache (prefetch).
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Structured reply flag: last chunk.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply chunk types.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A hole (reads as zeros) at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// An error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1 << 0;
/// Reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// The metadata context we offer.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its id on the wire.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Largest payload of a request or read we accept (and advertise as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload we read (names and queries are at most 4 KiB each).
pub const MAX_OPTION: u32 = 64 << 10;

/// NBD error numbers (errno values fixed by the protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    /// Not permitted (write to a read-only export).
    Perm = 1,
    /// I/O error (or damaged metadata).
    Io = 5,
    /// Out of memory.
    NoMem = 12,
    /// Bad request.
    Inval = 22,
    /// No space.
    NoSpc = 28,
    /// Request too large for a non-fragmented reply.
    Overflow = 75,
    /// Not supported (fast zero that would be slow).
    NotSup = 95,
    /// Server shutting down.
    Shutdown = 108,
}

/// A transmission request header (28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;

/// Why a request header is unusable: the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMagic(pub u32);

impl fmt::Display for BadMagic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "request magic {:#010x} is not {REQUEST_MAGIC:#010x}",
            self.0
        )
    }
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

impl Request {
    /// Parse a request header.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request, BadMagic> {
        let magic = be32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(Request {
            flags: be16(&b[4..6]),
            kind: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }

    /// Encode (for tests and fuzzing).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Whether a payload of `length` bytes follows the header.
    pub fn has_payload(&self) -> bool {
        self.kind == CMD_WRITE
    }
}

/// What a request asks for, checked against the export: the decision the transmission loop
/// acts on. Pure, so the fuzz harness can check it never panics and never lets a bad range
/// through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes.
    Read {
        /// Don't fragment the structured reply.
        df: bool,
    },
    /// Write the payload.
    Write {
        /// Durable before the reply.
        fua: bool,
    },
    /// Flush everything.
    Flush,
    /// Unmap.
    Trim {
        /// Durable before the reply.
        fua: bool,
    },
    /// Prefetch (a no-op that checks the range).
    Cache,
    /// Make the range read zeros.
    WriteZeroes {
        /// Durable before the reply.
        fua: bool,
        /// The range must stay allocated.
        no_hole: bool,
        /// Fail with ENOTSUP instead of being slow.
        fast: bool,
    },
    /// Block status of `base:allocation`.
    BlockStatus {
        /// One descriptor only.
        req_one: bool,
    },
    /// Disconnect after the requests in flight.
    Disconnect,
}

/// What the export allows, for [`classify`].
#[derive(Debug, Clone, Copy)]
pub struct ExportRules {
    /// Export size in bytes.
    pub size: u64,
    /// Read-only export.
    pub read_only: bool,
    /// Structured replies negotiated.
    pub structured: bool,
    /// `base:allocation` negotiated.
    pub base_allocation: bool,
}

/// Check a request against the protocol's rules: known command, known flags, range inside
/// the export, length within limits, writes allowed. `Err` is the errno to answer with.
pub fn classify(req: &Request, rules: &ExportRules) -> Result<Command, Errno> {
    let known =
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
    if req.flags & !known != 0 {
        return Err(Errno::Inval);
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let cmd = match req.kind {
        CMD_READ => Command::Read {
            df: req.flags & CMD_FLAG_DF != 0,
        },
        CMD_WRITE => Command::Write { fua },
        CMD_DISC => return Ok(Command::Disconnect),
        CMD_FLUSH => return Ok(Command::Flush),
        CMD_TRIM => Command::Trim { fua },
        CMD_CACHE => Command::Cache,
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            fua,
            no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
            fast: req.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS => {
            if !rules.base_allocation {
                return Err(Errno::Inval);
            }
            Command::BlockStatus {
                req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
            }
        }
        _ => return Err(Errno::Inval),
    };
    // Flags that only make sense on some commands. FUA is accepted on every command (the
    // protocol says so once `SEND_FUA` is advertised) and ignored where nothing is written.
    let allowed = CMD_FLAG_FUA
        | match cmd {
            Command::Read { .. } => CMD_FLAG_DF,
            Command::WriteZeroes { .. } => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Command::BlockStatus { .. } => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    if req.flags & !allowed != 0 {
        return Err(Errno::Inval);
    }
    if matches!(cmd, Command::Read { df: true }) && !rules.structured {
        return Err(Errno::Inval);
    }
    let writes = matches!(
        cmd,
        Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }
    );
    if writes && rules.read_only {
        return Err(Errno::Perm);
    }
    let moves_data = matches!(cmd, Command::Read { .. } | Command::Write { .. });
    if moves_data && req.length > MAX_PAYLOAD {
        return Err(Errno::Inval);
    }
    if req.length == 0 && matches!(cmd, Command::BlockStatus { .. }) {
        return Err(Errno::Inval);
    }
    match req.offset.checked_add(u64::from(req.length)) {
        Some(end) if end <= rules.size => Ok(cmd),
        // A write past the end is "no space"; a read or trim out of range is invalid.
        _ if matches!(cmd, Command::Write { .. } | Command::WriteZeroes { .. }) => {
            Err(Errno::NoSpc)
        }
        _ => Err(Errno::Inval),
    }
}

/// Encode a simple reply header.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encode a structured reply chunk header (20 bytes) for a payload of `len` bytes.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// Encode an option reply header (20 bytes).
pub fn option_reply(option: u32, kind: u32, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&kind.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// Why an option's data is malformed: answered with `NBD_REP_ERR_INVALID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// A cursor over an option's data.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, Malformed> {
        Ok(be16(self.take(2, what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, Malformed> {
        Ok(be32(self.take(4, what)?))
    }
    fn string(&mut self, what: &'static str) -> Result<String, Malformed> {
        let n = self.u32(what)? as usize;
        if n > 4096 {
            return Err(Malformed("string longer than 4096 bytes"));
        }
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| Malformed("string is not UTF-8"))
    }
    fn done(&self) -> Result<(), Malformed> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Malformed("trailing bytes in option data"))
        }
    }
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRequest {
    /// Export name.
    pub name: String,
    /// Information types asked for.
    pub infos: Vec<u16>,
}

/// Parse the data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn parse_go(data: &[u8]) -> Result<GoRequest, Malformed> {
    let mut c = Cursor(data);
    let name = c.string("export name length past the option's end")?;
    let n = c.u16("missing information request count")?;
    let mut infos = Vec::with_capacity(usize::from(n).min(64));
    for _ in 0..n {
        infos.push(c.u16("information request list shorter than its count")?);
    }
    c.done()?;
    Ok(GoRequest { name, infos })
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaQuery {
    /// Export name.
    pub name: String,
    /// Queries (`base:allocation`, `base:`, ...).
    pub queries: Vec<String>,
}

/// Parse the data of the meta context options.
pub fn parse_meta_query(data: &[u8]) -> Result<MetaQuery, Malformed> {
    let mut c = Cursor(data);
    let name = c.string("export name length past the option's end")?;
    let n = c.u32("missing query count")?;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(c.string("query list shorter than its count")?);
    }
    c.done()?;
    Ok(MetaQuery { name, queries })
}

/// Which of our contexts a query selects: `base:allocation` for `base:allocation` itself, for
/// `base:` (all of the namespace) and, when listing, for no query at all.
pub fn matches_base_allocation(query: &str) -> bool {
    query == BASE_ALLOCATION || query == "base:"
}

/// The payload of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// The payload of `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&preferred.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v
}

/// The payload of `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn info_text(kind: u16, text: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + text.len());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(text.as_bytes());
    v
}

/// The payload of `NBD_REP_SERVER`: a name and a description.
pub fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len() + description.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(description.as_bytes());
    v
}

/// The payload of `NBD_REP_META_CONTEXT`.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// The payload of a structured `NBD_REPLY_TYPE_ERROR` chunk.
pub fn error_chunk(errno: Errno, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut v = Vec::with_capacity(6 + msg.len());
    v.extend_from_slice(&(errno as u32).to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// The payload of a `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for `base:allocation`:
/// `(length, flags)` descriptors.
pub fn block_status_chunk(extents: &[(u32, u32)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + 8 * extents.len());
    v.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for &(len, flags) in extents {
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> ExportRules {
        ExportRules {
            size: 1 << 20,
            read_only: false,
            structured: true,
            base_allocation: true,
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn header_round_trip_and_bad_magic() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        assert_eq!(Request::parse(&r.encode()), Ok(r));
        let mut b = r.encode();
        b[0] ^= 1;
        assert!(Request::parse(&b).is_err());
    }

    #[test]
    fn classify_rules() {
        let r = rules();
        assert_eq!(
            classify(&req(CMD_READ, 0, 0, 4096), &r),
            Ok(Command::Read { df: false })
        );
        assert_eq!(
            classify(&req(CMD_READ, 0, (1 << 20) - 1, 2), &r),
            Err(Errno::Inval)
        );
        assert_eq!(
            classify(&req(CMD_WRITE, 0, (1 << 20) - 1, 2), &r),
            Err(Errno::NoSpc)
        );
        assert_eq!(
            classify(&req(CMD_READ, 0, u64::MAX, 2), &r),
            Err(Errno::Inval)
        );
        assert_eq!(classify(&req(99, 0, 0, 1), &r), Err(Errno::Inval));
        assert_eq!(
            classify(&req(CMD_READ, 1 << 9, 0, 1), &r),
            Err(Errno::Inval)
        );
        assert_eq!(
            classify(&req(CMD_READ, CMD_FLAG_FUA, 0, 1), &r),
            Ok(Command::Read { df: false })
        );
        assert_eq!(
            classify(&req(CMD_TRIM, CMD_FLAG_DF, 0, 1), &r),
            Err(Errno::Inval)
        );
        assert_eq!(
            classify(&req(CMD_BLOCK_STATUS, 0, 0, 0), &r),
            Err(Errno::Inval)
        );
        let ro = ExportRules {
            read_only: true,
            ..r
        };
        assert_eq!(classify(&req(CMD_TRIM, 0, 0, 1), &ro), Err(Errno::Perm));
        assert_eq!(classify(&req(CMD_FLUSH, 0, 0, 0), &ro), Ok(Command::Flush));
        let plain = ExportRules {
            structured: false,
            base_allocation: false,
            ..r
        };
        assert_eq!(
            classify(&req(CMD_BLOCK_STATUS, 0, 0, 1), &plain),
            Err(Errno::Inval)
        );
        assert_eq!(
            classify(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &plain),
            Err(Errno::Inval)
        );
    }

    #[test]
    fn options_parse() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_go(&d),
            Ok(GoRequest {
                name: "vol".into(),
                infos: vec![INFO_BLOCK_SIZE]
            })
        );
        assert!(parse_go(&d[..d.len() - 1]).is_err());
        let mut bad = d.clone();
        bad[3] = 200;
        assert!(parse_go(&bad).is_err());
        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_be_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        let q = parse_meta_query(&m).unwrap();
        assert_eq!(q.queries, vec!["base:allocation".to_string()]);
        m.push(0);
        assert!(parse_meta_query(&m).is_err());
    }
}
