//! The XML form of a pool's logical content, as thin-provisioning-tools 0.9.0 prints it
//! (`thin_dump`) and reads it (`thin_restore`): [`XmlWriter`] turns the IR event stream
//! ([`crate::ir`]) into that text byte for byte, [`read_xml`] turns the text back into events.
//!
//! ```text
//! <superblock uuid="" time="2" transaction="3" flags="0" version="2" data_block_size="128" nr_data_blocks="1024">
//!   <device dev_id="1" mapped_blocks="16" transaction="0" creation_time="0" snap_time="2">
//!     <range_mapping origin_begin="0" data_begin="16" length="4" time="1"/>   (a run, len >= 2)
//!     <single_mapping origin_block="6" data_block="27" time="2"/>             (a run, len == 1)
//!   </device>
//! </superblock>
//! ```
//!
//! What the 0.9.0 tools do, observed (`docs/dm-thin-format.md` sections 10, 11.4, 11.5, 17):
//!
//! - `thin_dump` never prints a `metadata_snap` attribute, not even for a pool with a held root
//!   (`metadata-snap` vector, with and without `-m`), so [`XmlWriter`] does not print
//!   [`Superblock::metadata_snap`] either. `thin_dump -m` differs only in what it reads
//!   (`transaction` of the copy, `nr_data_blocks="0"`).
//! - `thin_restore` requires every attribute except `flags` (default 0), `version` (default 1,
//!   not 2) and `metadata_snap` (which it writes to `held_root` only, breaking the pool); it also
//!   requires `uuid`, which [`read_xml`] lets default to "". It ignores unknown attributes, and
//!   so does [`read_xml`].
//! - `thin_restore` accepts inputs [`read_xml`] rejects, on purpose: a mapping of length 0
//!   (silently dropped), a mapping time >= 2^24 (ORed into the data block number, section
//!   11.4), a `dev_id` >= 2^24 or "-1" (wrapped to 4294967295), mappings or devices out of order,
//!   text between elements, and version 3. It aborts on a `<device>` inside a `<device>`.
//!
//! Example, a round trip:
//!
//! ```
//! use thinpool_thin::xml::{read_xml, XmlWriter};
//!
//! let text = "<superblock uuid=\"\" time=\"0\" transaction=\"1\" flags=\"0\" version=\"2\" \
//!             data_block_size=\"128\" nr_data_blocks=\"1024\">\n\
//!             \x20 <device dev_id=\"1\" mapped_blocks=\"3\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n\
//!             \x20   <range_mapping origin_begin=\"0\" data_begin=\"10\" length=\"3\" time=\"0\"/>\n\
//!             \x20 </device>\n\
//!             </superblock>\n";
//! let mut writer = XmlWriter::new(Vec::new());
//! read_xml(text.as_bytes(), &mut writer).unwrap();
//! assert_eq!(writer.into_inner().unwrap(), text.as_bytes());
//! ```

use std::fmt;
use std::io::{self, BufRead, Read, Write};

use quick_xml::Reader;
use quick_xml::events::attributes::Attribute;
use quick_xml::events::{BytesStart, Event};

use crate::ir::{Device, Map, MetadataVisitor, Superblock};
use crate::staged::Staged;

/// Largest thin device id: ids have 24 bits (`docs/dm-thin-format.md` 5.3).
pub const MAX_DEV_ID: u32 = (1 << 24) - 1;

/// Largest time a mapping can hold: a mapping keeps only the low 24 bits of the pool time
/// (`docs/dm-thin-format.md` 5.2, 11.4).
pub const MAX_MAPPING_TIME: u32 = (1 << 24) - 1;

/// Number of data blocks a mapping can address: the mapping value keeps a 40-bit data block
/// number (`docs/dm-thin-format.md` 5.2).
pub const DATA_BLOCK_LIMIT: u64 = 1 << 40;

// ------------------------------------------------------------------------------------------
// Writing
// ------------------------------------------------------------------------------------------

/// Prints the IR as `thin_dump` 0.9.0 prints XML, byte for byte.
///
/// Text is assembled in an internal buffer (no allocation per line once it has grown) and
/// handed to `out` in chunks of about 64 KiB, at [`MetadataVisitor::superblock_e`] and at
/// [`MetadataVisitor::eof`] (which also flushes `out`). Call [`XmlWriter::into_inner`] to get
/// `out` back with everything written.
///
/// The writer does not check the order of events; it prints what it is given. It never prints
/// [`Superblock::metadata_snap`] (thin_dump 0.9.0 does not, see the module docs).
#[derive(Debug)]
pub struct XmlWriter<W: Write> {
    st: Staged<W>,
}

impl<W: Write> XmlWriter<W> {
    /// A writer printing to `out`. O(1); allocates the 64 KiB staging buffer.
    pub fn new(out: W) -> Self {
        XmlWriter {
            st: Staged::new(out),
        }
    }

    /// The underlying writer (text still in the staging buffer is not in it yet).
    pub fn get_ref(&self) -> &W {
        &self.st.out
    }

    /// Writes out the staged text and returns the underlying writer (not flushed unless
    /// [`MetadataVisitor::eof`] was called). Fails if writing fails.
    pub fn into_inner(self) -> io::Result<W> {
        self.st.into_inner()
    }

    fn drain(&mut self) -> io::Result<()> {
        self.st.drain()
    }

    fn maybe_drain(&mut self) -> io::Result<()> {
        self.st.maybe_drain()
    }

    /// Appends ` name="value"`.
    fn attr(&mut self, name: &[u8], value: u64) {
        self.st.buf.push(b' ');
        self.st.buf.extend_from_slice(name);
        self.st.buf.extend_from_slice(b"=\"");
        push_u64(&mut self.st.buf, value);
        self.st.buf.push(b'"');
    }
}

impl<W: Write> MetadataVisitor for XmlWriter<W> {
    type Error = io::Error;

    fn superblock_b(&mut self, sb: &Superblock) -> io::Result<()> {
        self.st.buf.extend_from_slice(b"<superblock uuid=\"");
        push_escaped(&mut self.st.buf, sb.uuid.as_bytes());
        self.st.buf.push(b'"');
        self.attr(b"time", sb.time.into());
        self.attr(b"transaction", sb.transaction);
        self.attr(b"flags", sb.flags.into());
        self.attr(b"version", sb.version.into());
        self.attr(b"data_block_size", sb.data_block_size.into());
        self.attr(b"nr_data_blocks", sb.nr_data_blocks);
        self.st.buf.extend_from_slice(b">\n");
        self.maybe_drain()
    }

    fn superblock_e(&mut self) -> io::Result<()> {
        self.st.buf.extend_from_slice(b"</superblock>\n");
        self.drain()
    }

    fn device_b(&mut self, dev: &Device) -> io::Result<()> {
        self.st.buf.extend_from_slice(b"  <device");
        self.attr(b"dev_id", dev.dev_id.into());
        self.attr(b"mapped_blocks", dev.mapped_blocks);
        self.attr(b"transaction", dev.transaction);
        self.attr(b"creation_time", dev.creation_time.into());
        self.attr(b"snap_time", dev.snap_time.into());
        self.st.buf.extend_from_slice(b">\n");
        self.maybe_drain()
    }

    fn device_e(&mut self) -> io::Result<()> {
        self.st.buf.extend_from_slice(b"  </device>\n");
        self.maybe_drain()
    }

    fn map(&mut self, m: &Map) -> io::Result<()> {
        if m.len == 1 {
            self.st.buf.extend_from_slice(b"    <single_mapping");
            self.attr(b"origin_block", m.origin_begin);
            self.attr(b"data_block", m.data_begin);
        } else {
            self.st.buf.extend_from_slice(b"    <range_mapping");
            self.attr(b"origin_begin", m.origin_begin);
            self.attr(b"data_begin", m.data_begin);
            self.attr(b"length", m.len);
        }
        self.attr(b"time", m.time.into());
        self.st.buf.extend_from_slice(b"/>\n");
        self.maybe_drain()
    }

    fn eof(&mut self) -> io::Result<()> {
        self.drain()?;
        self.st.out.flush()
    }
}

/// Two ASCII digits for each of 0..100.
const DIGIT_PAIRS: [u8; 200] = {
    let mut t = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        t[2 * i] = b'0' + (i / 10) as u8;
        t[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    t
};

/// Appends `n` in decimal. No allocation beyond the growth of `buf`.
pub(crate) fn push_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    while n >= 100 {
        let d = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        tmp[i..i + 2].copy_from_slice(&DIGIT_PAIRS[d..d + 2]);
    }
    if n >= 10 {
        let d = n as usize * 2;
        i -= 2;
        tmp[i..i + 2].copy_from_slice(&DIGIT_PAIRS[d..d + 2]);
    } else {
        i -= 1;
        tmp[i] = b'0' + n as u8;
    }
    buf.extend_from_slice(&tmp[i..]);
}

/// Appends `s` escaped for a double-quoted XML attribute. Tab, CR and LF become character
/// references, because a parser turns them into spaces otherwise.
fn push_escaped(buf: &mut Vec<u8>, s: &[u8]) {
    for &b in s {
        match b {
            b'&' => buf.extend_from_slice(b"&amp;"),
            b'<' => buf.extend_from_slice(b"&lt;"),
            b'>' => buf.extend_from_slice(b"&gt;"),
            b'"' => buf.extend_from_slice(b"&quot;"),
            b'\t' => buf.extend_from_slice(b"&#9;"),
            b'\n' => buf.extend_from_slice(b"&#10;"),
            b'\r' => buf.extend_from_slice(b"&#13;"),
            _ => buf.push(b),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Reading
// ------------------------------------------------------------------------------------------

/// What went wrong in [`read_xml`], and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum XmlError<E> {
    /// The text is not well-formed XML or not the thin_dump format: `message` says what was
    /// expected and what was found; `line` is 1-based (the line where the offending element
    /// starts, or where parsing stopped for a syntax error).
    #[error("xml line {line}: {message}")]
    Parse {
        /// 1-based line number.
        line: u64,
        /// What is wrong, e.g. `missing attribute "time" on <single_mapping>`.
        message: String,
    },
    /// The visitor returned an error for the element at `line`; reading stopped there.
    #[error("xml line {line}: the consumer of the metadata failed")]
    Visitor {
        /// 1-based line of the element whose event failed (the last line for `eof`).
        line: u64,
        /// The visitor's error.
        #[source]
        source: E,
    },
    /// Reading the input failed.
    #[error("xml line {line}: read failed")]
    Io {
        /// 1-based line where reading stopped.
        line: u64,
        /// The error of the input.
        #[source]
        source: io::Error,
    },
}

/// Parses thin_dump XML from `input` and calls `visitor` for each element, streaming: memory
/// use does not grow with the input. O(n) in the input size, with one visitor call per
/// element; reads `input` (blocking as it blocks) and does nothing else.
///
/// Accepted: attributes in any order; `flags` (default 0), `version` (default 1, as
/// `thin_restore` 0.9.0), `uuid` (default "") and `metadata_snap` (default none) optional;
/// unknown attributes ignored; an XML declaration, comments, processing instructions, a
/// DOCTYPE and whitespace anywhere; mapping elements written as `<x .../>` or `<x ...></x>`.
///
/// Rejected with [`XmlError::Parse`] (never a panic), besides malformed XML: an unknown
/// element; a missing required attribute or a duplicated one; a number that is not plain
/// decimal digits or does not fit its field; `version` other than 1 or 2; a `<device>` outside
/// the `<superblock>` or inside a `<device>`, a mapping outside a `<device>`, anything after
/// `</superblock>`, input ending inside an element; text other than whitespace; a `dev_id`
/// above [`MAX_DEV_ID`] or not above the previous device's; a mapping of length 0, with a time
/// above [`MAX_MAPPING_TIME`], with a data block at or beyond [`DATA_BLOCK_LIMIT`], with
/// virtual blocks beyond `u64`, or not after the previous mapping of its device (the visitor's
/// contract promises ascending, non-overlapping runs).
///
/// Not checked: `mapped_blocks` against the mappings (`thin_restore` recounts), data blocks
/// against `nr_data_blocks`, `data_block_size` limits.
///
/// Events: `superblock_b`, then per device `device_b`, one `map` per mapping element (runs are
/// passed as written, not merged), `device_e`; `superblock_e`; `eof` at the end of the input.
/// A visitor error stops reading ([`XmlError::Visitor`]); [`XmlError::Io`] when `input` fails.
pub fn read_xml<R: BufRead, V: MetadataVisitor>(
    input: R,
    visitor: &mut V,
) -> Result<(), XmlError<V::Error>> {
    let mut reader = Reader::from_reader(LineCounter {
        inner: input,
        newlines: 0,
        failure: None,
    });
    let config = reader.config_mut();
    config.trim_text(false);
    config.check_end_names = true;
    config.expand_empty_elements = false;
    let mut parser = Parser {
        reader,
        state: State::Prolog,
        superblock_line: 0,
        device: None,
        prev_dev_id: None,
        last_origin: None,
    };
    let mut buf = Vec::with_capacity(1024);
    loop {
        buf.clear();
        // Whitespace between elements arrives as its own Text event (trimming is off), so the
        // line counted before a read is the line where the next element starts.
        let line = parser.line();
        let event = match parser.reader.read_event_into(&mut buf) {
            Ok(event) => event,
            Err(e) => return Err(parser.reader_error(e)),
        };
        match event {
            Event::Start(e) => parser.start(&e, false, line, visitor)?,
            Event::Empty(e) => parser.start(&e, true, line, visitor)?,
            Event::End(e) => parser.end(e.name().as_ref(), line, visitor)?,
            Event::Text(t) => {
                if let Some(pos) = t.iter().position(|b| !b.is_ascii_whitespace()) {
                    // Report the line of the first non-blank byte, not of the text's start.
                    let line = line + count_newlines(&t[..pos]);
                    return Err(parse_error(
                        line,
                        format!(
                            "unexpected text {} {}",
                            Quoted(&t[pos..]),
                            parser.where_am_i()
                        ),
                    ));
                }
            }
            Event::GeneralRef(r) => {
                return Err(parse_error(
                    line,
                    format!(
                        "unexpected text &{}; {}",
                        String::from_utf8_lossy(&r),
                        parser.where_am_i()
                    ),
                ));
            }
            Event::CData(_) => {
                return Err(parse_error(
                    line,
                    format!("unexpected CDATA section {}", parser.where_am_i()),
                ));
            }
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
            Event::Eof => return parser.eof(line, visitor),
        }
    }
}

/// A `BufRead` adapter that counts the newlines the XML reader has consumed, so errors can
/// name a line, and keeps the input's own I/O error (the XML reader only passes on a shared
/// copy).
struct LineCounter<R> {
    inner: R,
    newlines: u64,
    failure: Option<io::Error>,
}

impl<R: BufRead> Read for LineCounter<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = {
            let available = self.fill_buf()?;
            let n = available.len().min(out.len());
            out[..n].copy_from_slice(&available[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for LineCounter<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        match self.inner.fill_buf() {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let kind = e.kind();
                self.failure = Some(e);
                Err(io::Error::from(kind))
            }
        }
    }

    fn consume(&mut self, amt: usize) {
        // `consume` follows a successful `fill_buf`, so this returns the same buffered bytes
        // without I/O.
        if let Ok(b) = self.inner.fill_buf() {
            self.newlines += count_newlines(&b[..amt.min(b.len())]);
        }
        self.inner.consume(amt);
    }
}

fn count_newlines(b: &[u8]) -> u64 {
    b.iter().filter(|&&c| c == b'\n').count() as u64
}

/// The elements of the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Element {
    Superblock,
    Device,
    Single,
    Range,
}

impl Element {
    fn from_name(name: &[u8]) -> Option<Element> {
        match name {
            b"superblock" => Some(Element::Superblock),
            b"device" => Some(Element::Device),
            b"single_mapping" => Some(Element::Single),
            b"range_mapping" => Some(Element::Range),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Element::Superblock => "superblock",
            Element::Device => "device",
            Element::Single => "single_mapping",
            Element::Range => "range_mapping",
        }
    }
}

/// Where the parser is in the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before `<superblock>`.
    Prolog,
    /// Inside `<superblock>`, between devices.
    Superblock,
    /// Inside `<device>`.
    Device,
    /// Inside a mapping written with an end tag (`<single_mapping ...></single_mapping>`).
    Mapping(Element),
    /// After `</superblock>`.
    Done,
}

/// The open device: its id and the line of its start tag.
#[derive(Debug, Clone, Copy)]
struct OpenDevice {
    dev_id: u32,
    line: u64,
}

struct Parser<R> {
    reader: Reader<LineCounter<R>>,
    state: State,
    superblock_line: u64,
    device: Option<OpenDevice>,
    /// The last device's id, for the ascending-order check.
    prev_dev_id: Option<u32>,
    /// The last virtual block of the open device's previous mapping.
    last_origin: Option<u64>,
}

fn parse_error<E>(line: u64, message: String) -> XmlError<E> {
    XmlError::Parse { line, message }
}

impl<R: BufRead> Parser<R> {
    fn line(&self) -> u64 {
        self.reader.get_ref().newlines + 1
    }

    fn reader_error<E>(&mut self, e: quick_xml::Error) -> XmlError<E> {
        let line = self.line();
        match e {
            quick_xml::Error::Io(shared) => {
                let source = self
                    .reader
                    .get_mut()
                    .failure
                    .take()
                    .unwrap_or_else(|| io::Error::new(shared.kind(), shared.to_string()));
                XmlError::Io { line, source }
            }
            other => parse_error(
                line,
                format!(
                    "malformed xml at byte {}: {other}",
                    self.reader.error_position()
                ),
            ),
        }
    }

    /// "inside <device dev_id=N> (line L)" and the like, for messages.
    fn where_am_i(&self) -> String {
        match self.state {
            State::Prolog => "before <superblock>".to_string(),
            State::Superblock => format!(
                "inside <superblock> (opened at line {})",
                self.superblock_line
            ),
            State::Device | State::Mapping(_) => match self.device {
                Some(d) => {
                    let inner = match self.state {
                        State::Mapping(m) => format!("<{}> in ", m.name()),
                        _ => String::new(),
                    };
                    format!(
                        "inside {inner}<device dev_id=\"{}\"> (opened at line {})",
                        d.dev_id, d.line
                    )
                }
                None => "inside <device>".to_string(),
            },
            State::Done => "after </superblock>".to_string(),
        }
    }

    fn start<V: MetadataVisitor>(
        &mut self,
        e: &BytesStart<'_>,
        empty: bool,
        line: u64,
        visitor: &mut V,
    ) -> Result<(), XmlError<V::Error>> {
        let name = e.name();
        let Some(element) = Element::from_name(name.as_ref()) else {
            let expected = match self.state {
                State::Prolog => "<superblock>",
                State::Superblock => "<device>",
                State::Device => "<single_mapping> or <range_mapping>",
                State::Mapping(_) => "no element",
                State::Done => "nothing",
            };
            return Err(parse_error(
                line,
                format!(
                    "unknown element <{}> {}: expected {expected}",
                    String::from_utf8_lossy(name.as_ref()),
                    self.where_am_i()
                ),
            ));
        };
        match (self.state, element) {
            (State::Prolog, Element::Superblock) => {
                let sb =
                    parse_superblock(e, self.reader.decoder()).map_err(|m| parse_error(line, m))?;
                self.superblock_line = line;
                visitor
                    .superblock_b(&sb)
                    .map_err(|source| XmlError::Visitor { line, source })?;
                self.state = State::Superblock;
                if empty {
                    self.close_superblock(line, visitor)?;
                }
                Ok(())
            }
            (State::Superblock, Element::Device) => {
                let dev = parse_device(e).map_err(|m| parse_error(line, m))?;
                if let Some(prev) = self.prev_dev_id {
                    if dev.dev_id == prev {
                        return Err(parse_error(
                            line,
                            format!("duplicate <device dev_id=\"{}\">", dev.dev_id),
                        ));
                    }
                    if dev.dev_id < prev {
                        return Err(parse_error(
                            line,
                            format!(
                                "<device dev_id=\"{}\"> after <device dev_id=\"{prev}\">: \
                                 devices must be in ascending dev_id order",
                                dev.dev_id
                            ),
                        ));
                    }
                }
                self.prev_dev_id = Some(dev.dev_id);
                self.device = Some(OpenDevice {
                    dev_id: dev.dev_id,
                    line,
                });
                self.last_origin = None;
                visitor
                    .device_b(&dev)
                    .map_err(|source| XmlError::Visitor { line, source })?;
                self.state = State::Device;
                if empty {
                    self.close_device(line, visitor)?;
                }
                Ok(())
            }
            (State::Device, Element::Single | Element::Range) => {
                let m = parse_mapping(e, element).map_err(|m| parse_error(line, m))?;
                // parse_mapping checked that the run ends within u64.
                let last = m.origin_begin + (m.len - 1);
                if let Some(prev_last) = self.last_origin
                    && m.origin_begin <= prev_last
                {
                    return Err(parse_error(
                        line,
                        format!(
                            "<{}> at virtual block {} overlaps or precedes the previous \
                             mapping, which ends at virtual block {prev_last}: mappings must \
                             be in ascending, non-overlapping order",
                            element.name(),
                            m.origin_begin
                        ),
                    ));
                }
                self.last_origin = Some(last);
                visitor
                    .map(&m)
                    .map_err(|source| XmlError::Visitor { line, source })?;
                if !empty {
                    self.state = State::Mapping(element);
                }
                Ok(())
            }
            (State::Prolog, _) => Err(parse_error(
                line,
                format!(
                    "<{}> before <superblock>: the document must start with <superblock>",
                    element.name()
                ),
            )),
            (State::Done, _) => Err(parse_error(
                line,
                format!(
                    "<{}> after </superblock>: a document holds one <superblock>",
                    element.name()
                ),
            )),
            (State::Superblock, Element::Single | Element::Range) => Err(parse_error(
                line,
                format!(
                    "<{}> outside a <device> (directly inside <superblock>)",
                    element.name()
                ),
            )),
            (State::Device, Element::Device) => {
                let inner = parse_device(e)
                    .map(|d| format!("<device dev_id=\"{}\">", d.dev_id))
                    .unwrap_or_else(|_| "<device>".to_string());
                Err(parse_error(
                    line,
                    format!("{inner} {}: devices do not nest", self.where_am_i()),
                ))
            }
            (_, _) => Err(parse_error(
                line,
                format!(
                    "<{}> {}: not allowed there",
                    element.name(),
                    self.where_am_i()
                ),
            )),
        }
    }

    fn end<V: MetadataVisitor>(
        &mut self,
        name: &[u8],
        line: u64,
        visitor: &mut V,
    ) -> Result<(), XmlError<V::Error>> {
        match (self.state, Element::from_name(name)) {
            (State::Superblock, Some(Element::Superblock)) => self.close_superblock(line, visitor),
            (State::Device, Some(Element::Device)) => self.close_device(line, visitor),
            (State::Mapping(open), Some(closed)) if open == closed => {
                self.state = State::Device;
                Ok(())
            }
            _ => Err(parse_error(
                line,
                format!(
                    "unexpected </{}> {}",
                    String::from_utf8_lossy(name),
                    self.where_am_i()
                ),
            )),
        }
    }

    fn close_superblock<V: MetadataVisitor>(
        &mut self,
        line: u64,
        visitor: &mut V,
    ) -> Result<(), XmlError<V::Error>> {
        visitor
            .superblock_e()
            .map_err(|source| XmlError::Visitor { line, source })?;
        self.state = State::Done;
        Ok(())
    }

    fn close_device<V: MetadataVisitor>(
        &mut self,
        line: u64,
        visitor: &mut V,
    ) -> Result<(), XmlError<V::Error>> {
        visitor
            .device_e()
            .map_err(|source| XmlError::Visitor { line, source })?;
        self.device = None;
        self.state = State::Superblock;
        Ok(())
    }

    fn eof<V: MetadataVisitor>(
        &mut self,
        line: u64,
        visitor: &mut V,
    ) -> Result<(), XmlError<V::Error>> {
        match self.state {
            State::Done => visitor
                .eof()
                .map_err(|source| XmlError::Visitor { line, source }),
            State::Prolog => Err(parse_error(
                line,
                "no <superblock> element in the input".to_string(),
            )),
            _ => Err(parse_error(
                line,
                format!("unexpected end of input {}", self.where_am_i()),
            )),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Attributes
// ------------------------------------------------------------------------------------------

/// Collects the attributes named in `names` (by index) from `e`; unknown attributes are
/// ignored, a known one given twice is an error.
fn collect<'a, const N: usize>(
    e: &'a BytesStart<'a>,
    element: &str,
    names: &[&str; N],
) -> Result<[Option<Attribute<'a>>; N], String> {
    let mut found: [Option<Attribute<'a>>; N] = [const { None }; N];
    let mut attrs = e.attributes();
    // Duplicates of the attributes we know are caught below; skipping quick-xml's own check
    // saves an allocation per element.
    attrs.with_checks(false);
    for attr in attrs {
        let attr = attr.map_err(|err| format!("malformed attribute on <{element}>: {err}"))?;
        let key = attr.key.as_ref();
        if let Some(i) = names.iter().position(|n| n.as_bytes() == key) {
            if found[i].is_some() {
                return Err(format!(
                    "duplicate attribute \"{}\" on <{element}>",
                    names[i]
                ));
            }
            found[i] = Some(attr);
        }
    }
    Ok(found)
}

/// The value of a required numeric attribute, at most `max`.
fn required(
    found: &[Option<Attribute<'_>>],
    names: &[&str],
    i: usize,
    element: &str,
    max: u64,
) -> Result<u64, String> {
    optional(found, names, i, element, max)?
        .ok_or_else(|| format!("missing attribute \"{}\" on <{element}>", names[i]))
}

/// The value of an optional numeric attribute, at most `max`.
fn optional(
    found: &[Option<Attribute<'_>>],
    names: &[&str],
    i: usize,
    element: &str,
    max: u64,
) -> Result<Option<u64>, String> {
    let Some(attr) = &found[i] else {
        return Ok(None);
    };
    let raw = attr.value.as_ref();
    match parse_decimal(raw) {
        Some(v) if v <= max => Ok(Some(v)),
        _ if !raw.is_empty() && raw.iter().all(u8::is_ascii_digit) => Err(format!(
            "number {} for attribute \"{}\" on <{element}> is out of range (at most {max})",
            Quoted(raw),
            names[i]
        )),
        _ => Err(format!(
            "bad number {} for attribute \"{}\" on <{element}>: expected decimal digits",
            Quoted(raw),
            names[i]
        )),
    }
}

/// Plain decimal digits to `u64`; `None` when empty, not all digits, or too large.
fn parse_decimal(raw: &[u8]) -> Option<u64> {
    if raw.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &b in raw {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

const U32: u64 = u32::MAX as u64;

fn parse_superblock(
    e: &BytesStart<'_>,
    decoder: quick_xml::encoding::Decoder,
) -> Result<Superblock, String> {
    const NAMES: [&str; 8] = [
        "uuid",
        "time",
        "transaction",
        "flags",
        "version",
        "data_block_size",
        "nr_data_blocks",
        "metadata_snap",
    ];
    const EL: &str = "superblock";
    let f = collect(e, EL, &NAMES)?;
    let uuid = match &f[0] {
        Some(attr) => attr
            .decode_and_unescape_value(decoder)
            .map_err(|err| format!("bad value for attribute \"uuid\" on <superblock>: {err}"))?
            .into_owned(),
        None => String::new(),
    };
    let version = optional(&f, &NAMES, 4, EL, U32)?.unwrap_or(1);
    if version != 1 && version != 2 {
        return Err(format!(
            "version {version} on <superblock>: only versions 1 and 2 exist \
             (docs/dm-thin-format.md 11.5)"
        ));
    }
    Ok(Superblock {
        uuid,
        time: required(&f, &NAMES, 1, EL, U32)? as u32,
        transaction: required(&f, &NAMES, 2, EL, u64::MAX)?,
        flags: optional(&f, &NAMES, 3, EL, U32)?.unwrap_or(0) as u32,
        version: version as u32,
        data_block_size: required(&f, &NAMES, 5, EL, U32)? as u32,
        nr_data_blocks: required(&f, &NAMES, 6, EL, u64::MAX)?,
        metadata_snap: optional(&f, &NAMES, 7, EL, u64::MAX)?,
    })
}

fn parse_device(e: &BytesStart<'_>) -> Result<Device, String> {
    const NAMES: [&str; 5] = [
        "dev_id",
        "mapped_blocks",
        "transaction",
        "creation_time",
        "snap_time",
    ];
    const EL: &str = "device";
    let f = collect(e, EL, &NAMES)?;
    let dev_id = required(&f, &NAMES, 0, EL, U32)?;
    if dev_id > u64::from(MAX_DEV_ID) {
        return Err(format!(
            "dev_id {dev_id} on <device> is out of range: thin device ids have 24 bits \
             (at most {MAX_DEV_ID}, docs/dm-thin-format.md 5.3)"
        ));
    }
    Ok(Device {
        dev_id: dev_id as u32,
        mapped_blocks: required(&f, &NAMES, 1, EL, u64::MAX)?,
        transaction: required(&f, &NAMES, 2, EL, u64::MAX)?,
        creation_time: required(&f, &NAMES, 3, EL, U32)? as u32,
        snap_time: required(&f, &NAMES, 4, EL, U32)? as u32,
    })
}

fn parse_mapping(e: &BytesStart<'_>, element: Element) -> Result<Map, String> {
    let el = element.name();
    let (origin_begin, data_begin, len, time) = match element {
        Element::Single => {
            const NAMES: [&str; 3] = ["origin_block", "data_block", "time"];
            let f = collect(e, el, &NAMES)?;
            (
                required(&f, &NAMES, 0, el, u64::MAX)?,
                required(&f, &NAMES, 1, el, u64::MAX)?,
                1,
                required(&f, &NAMES, 2, el, U32)?,
            )
        }
        _ => {
            const NAMES: [&str; 4] = ["origin_begin", "data_begin", "length", "time"];
            let f = collect(e, el, &NAMES)?;
            (
                required(&f, &NAMES, 0, el, u64::MAX)?,
                required(&f, &NAMES, 1, el, u64::MAX)?,
                required(&f, &NAMES, 2, el, u64::MAX)?,
                required(&f, &NAMES, 3, el, U32)?,
            )
        }
    };
    if len == 0 {
        return Err(format!(
            "<{el}> with length 0: a mapping covers at least one block"
        ));
    }
    if time > u64::from(MAX_MAPPING_TIME) {
        return Err(format!(
            "time {time} on <{el}> does not fit in 24 bits: a mapping stores only the low 24 \
             bits of the pool time (at most {MAX_MAPPING_TIME}, docs/dm-thin-format.md 11.4)"
        ));
    }
    if origin_begin.checked_add(len - 1).is_none() {
        return Err(format!(
            "<{el}> at virtual block {origin_begin} with length {len} runs past the last \
             virtual block ({})",
            u64::MAX
        ));
    }
    match data_begin.checked_add(len - 1) {
        Some(last) if last < DATA_BLOCK_LIMIT => {}
        _ => {
            return Err(format!(
                "<{el}> at data block {data_begin} with length {len} runs past data block \
                 {}: a mapping stores a 40-bit data block number (docs/dm-thin-format.md 5.2)",
                DATA_BLOCK_LIMIT - 1
            ));
        }
    }
    Ok(Map {
        origin_begin,
        data_begin,
        len,
        time: time as u32,
    })
}

/// Bytes from the input shown in a message: quoted, lossy UTF-8, cut after 40 characters.
struct Quoted<'a>(&'a [u8]);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX: usize = 40;
        let s = String::from_utf8_lossy(self.0);
        let mut chars = s.chars();
        let shown: String = chars.by_ref().take(MAX).collect();
        if chars.next().is_some() {
            write!(f, "{:?}...", shown)
        } else {
            write!(f, "{:?}", shown)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::walk::testutil::{VECTORS, vector_xml};

    /// Every event, for comparing streams.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        SbB(Superblock),
        SbE,
        DevB(Device),
        DevE,
        Map(Map),
        Eof,
    }

    #[derive(Default)]
    struct Recorder {
        events: Vec<Ev>,
        /// Fail on the n-th `map` call (1-based), if set.
        fail_map_at: Option<usize>,
        maps: usize,
    }

    impl MetadataVisitor for Recorder {
        type Error = String;
        fn superblock_b(&mut self, sb: &Superblock) -> Result<(), String> {
            self.events.push(Ev::SbB(sb.clone()));
            Ok(())
        }
        fn superblock_e(&mut self) -> Result<(), String> {
            self.events.push(Ev::SbE);
            Ok(())
        }
        fn device_b(&mut self, dev: &Device) -> Result<(), String> {
            self.events.push(Ev::DevB(*dev));
            Ok(())
        }
        fn device_e(&mut self) -> Result<(), String> {
            self.events.push(Ev::DevE);
            Ok(())
        }
        fn map(&mut self, m: &Map) -> Result<(), String> {
            self.maps += 1;
            if self.fail_map_at == Some(self.maps) {
                return Err(format!("refused map {}", self.maps));
            }
            self.events.push(Ev::Map(*m));
            Ok(())
        }
        fn eof(&mut self) -> Result<(), String> {
            self.events.push(Ev::Eof);
            Ok(())
        }
    }

    fn roundtrip(input: &[u8]) -> Result<Vec<u8>, XmlError<io::Error>> {
        let mut w = XmlWriter::new(Vec::new());
        read_xml(input, &mut w)?;
        Ok(w.into_inner().expect("writing to a Vec does not fail"))
    }

    fn parse_err(input: &str) -> (u64, String) {
        let mut r = Recorder::default();
        match read_xml(input.as_bytes(), &mut r) {
            Err(XmlError::Parse { line, message }) => (line, message),
            other => panic!("expected a parse error for {input:?}, got {other:?}"),
        }
    }

    const SB: &str = r#"<superblock uuid="" time="2" transaction="3" flags="0" version="2" data_block_size="128" nr_data_blocks="1024">"#;
    const DEV: &str =
        r#"<device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">"#;

    #[test]
    fn xml_vectors_round_trip_byte_identical() {
        for name in VECTORS {
            let want = vector_xml(name);
            let got = roundtrip(&want).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                got == want,
                "{name}: XmlWriter output differs from thin_dump's"
            );
        }
    }

    #[test]
    fn xml_read_events_of_one_thin() {
        let mut r = Recorder::default();
        read_xml(&vector_xml("one-thin")[..], &mut r).unwrap();
        let m = |o, d, len| {
            Ev::Map(Map {
                origin_begin: o,
                data_begin: d,
                len,
                time: 0,
            })
        };
        assert_eq!(
            r.events,
            vec![
                Ev::SbB(Superblock {
                    uuid: String::new(),
                    time: 0,
                    transaction: 1,
                    flags: 0,
                    version: 2,
                    data_block_size: 384,
                    nr_data_blocks: 4096,
                    metadata_snap: None,
                }),
                Ev::DevB(Device {
                    dev_id: 1,
                    mapped_blocks: 17,
                    transaction: 0,
                    creation_time: 0,
                    snap_time: 0,
                }),
                m(0, 0, 1),
                m(10, 100, 10),
                m(1000, 5, 1),
                m(4096, 4090, 4),
                m(1048575, 4095, 1),
                Ev::DevE,
                Ev::SbE,
                Ev::Eof,
            ]
        );
    }

    #[test]
    fn xml_many_devices_counts() {
        let mut r = Recorder::default();
        read_xml(&vector_xml("many-devices")[..], &mut r).unwrap();
        let devices = r.events.iter().filter(|e| matches!(e, Ev::DevB(_))).count();
        let blocks: u64 = r
            .events
            .iter()
            .map(|e| if let Ev::Map(m) = e { m.len } else { 0 })
            .sum();
        assert_eq!(devices, 300);
        assert_eq!(blocks, 69_900);
    }

    #[test]
    fn xml_defaults_like_thin_restore() {
        let mut r = Recorder::default();
        let text = r#"<superblock nr_data_blocks="9" data_block_size="128" transaction="3" time="2"></superblock>"#;
        read_xml(text.as_bytes(), &mut r).unwrap();
        let Ev::SbB(sb) = &r.events[0] else {
            panic!("first event is not superblock_b")
        };
        assert_eq!(
            sb.version, 1,
            "thin_restore 0.9.0 writes version 1 without the attribute"
        );
        assert_eq!(sb.flags, 0);
        assert_eq!(sb.uuid, "");
        assert_eq!(sb.metadata_snap, None);
        assert_eq!(
            (
                sb.time,
                sb.transaction,
                sb.data_block_size,
                sb.nr_data_blocks
            ),
            (2, 3, 128, 9)
        );
    }

    #[test]
    fn xml_metadata_snap_is_read_but_not_printed() {
        let text = r#"<superblock uuid="" time="2" transaction="4" flags="0" version="2" data_block_size="128" nr_data_blocks="1024" metadata_snap="13">
</superblock>
"#;
        let mut r = Recorder::default();
        read_xml(text.as_bytes(), &mut r).unwrap();
        let Ev::SbB(sb) = &r.events[0] else {
            panic!("first event is not superblock_b")
        };
        assert_eq!(sb.metadata_snap, Some(13));
        // thin_dump 0.9.0 prints no metadata_snap attribute, even for metadata-snap.meta.
        let out = roundtrip(text.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            text.replace(r#" metadata_snap="13""#, "")
        );
    }

    #[test]
    fn xml_accepts_what_thin_restore_accepts() {
        // Attributes in any order, unknown attributes, declaration, comments, explicit end tags
        // on mappings, an empty-element device, CRLF line ends.
        let text = "<?xml version=\"1.0\"?>\r\n<!-- dump -->\r\n\
            <superblock nr_data_blocks=\"1024\" data_block_size=\"128\" version=\"2\" flags=\"1\" \
            transaction=\"3\" time=\"2\" uuid=\"a&amp;b\" extra=\"x\">\r\n\
            <device snap_time=\"2\" creation_time=\"0\" transaction=\"0\" mapped_blocks=\"5\" dev_id=\"1\">\
            <single_mapping time=\"1\" data_block=\"7\" origin_block=\"3\"></single_mapping>\
            <!-- c --><range_mapping length=\"4\" time=\"0\" data_begin=\"20\" origin_begin=\"10\"/>\
            </device><device dev_id=\"5\" mapped_blocks=\"0\" transaction=\"1\" creation_time=\"1\" snap_time=\"1\"/>\
            </superblock>\r\n<!-- trailing -->\r\n";
        let out = String::from_utf8(roundtrip(text.as_bytes()).unwrap()).unwrap();
        assert_eq!(
            out,
            r#"<superblock uuid="a&amp;b" time="2" transaction="3" flags="1" version="2" data_block_size="128" nr_data_blocks="1024">
  <device dev_id="1" mapped_blocks="5" transaction="0" creation_time="0" snap_time="2">
    <single_mapping origin_block="3" data_block="7" time="1"/>
    <range_mapping origin_begin="10" data_begin="20" length="4" time="0"/>
  </device>
  <device dev_id="5" mapped_blocks="0" transaction="1" creation_time="1" snap_time="1">
  </device>
</superblock>
"#
        );
    }

    #[test]
    fn xml_uuid_escaping_round_trips() {
        let sb = Superblock {
            uuid: "<\"&'>\t\n\r x".to_string(),
            version: 2,
            ..Superblock::default()
        };
        let mut w = XmlWriter::new(Vec::new());
        w.superblock_b(&sb).unwrap();
        w.superblock_e().unwrap();
        let text = w.into_inner().unwrap();
        let mut r = Recorder::default();
        read_xml(&text[..], &mut r).unwrap();
        assert_eq!(r.events[0], Ev::SbB(sb));
    }

    #[test]
    fn xml_errors_say_where_and_what() {
        let cases: Vec<(String, u64, &str)> = vec![
            (String::new(), 1, "no <superblock>"),
            (format!("{SB}\n  <foo/>\n</superblock>"), 2, "unknown element <foo> inside <superblock>"),
            (
                format!("{SB}\n  {DEV}\n    <single_mapping origin_block=\"1\" time=\"0\"/>"),
                3,
                "missing attribute \"data_block\" on <single_mapping>",
            ),
            (
                format!("{SB}\n<device dev_id=\"abc\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>"),
                2,
                "bad number \"abc\" for attribute \"dev_id\" on <device>",
            ),
            (
                format!("{SB}\n<device dev_id=\"-1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>"),
                2,
                "bad number \"-1\"",
            ),
            (
                format!("{SB}\n<device dev_id=\" 5\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>"),
                2,
                "bad number \" 5\"",
            ),
            (
                r#"<superblock uuid="" time="4294967296" transaction="3" data_block_size="128" nr_data_blocks="1"/>"#.to_string(),
                1,
                "number \"4294967296\" for attribute \"time\" on <superblock> is out of range",
            ),
            (
                r#"<superblock uuid="" time="1" transaction="99999999999999999999" data_block_size="128" nr_data_blocks="1"/>"#.to_string(),
                1,
                "out of range",
            ),
            (
                r#"<superblock uuid="" time="1" transaction="1" version="3" data_block_size="128" nr_data_blocks="1"/>"#.to_string(),
                1,
                "version 3 on <superblock>",
            ),
            (
                r#"<superblock time="1" time="2" transaction="1" data_block_size="128" nr_data_blocks="1"/>"#.to_string(),
                1,
                "duplicate attribute \"time\"",
            ),
            (
                format!("{SB}\n<single_mapping origin_block=\"0\" data_block=\"1\" time=\"0\"/>"),
                2,
                "<single_mapping> outside a <device>",
            ),
            (format!("{SB}\n{DEV}\n\n{DEV}"), 4, "inside <device dev_id=\"1\"> (opened at line 2)"),
            (
                format!("{SB}\n{DEV}\n<range_mapping origin_begin=\"0\" data_begin=\"1\" length=\"0\" time=\"0\"/>"),
                3,
                "length 0",
            ),
            (
                format!("{SB}\n{DEV}\n<single_mapping origin_block=\"0\" data_block=\"100\" time=\"16777216\"/>"),
                3,
                "time 16777216 on <single_mapping> does not fit in 24 bits",
            ),
            (
                format!("{SB}\n<device dev_id=\"16777216\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>"),
                2,
                "dev_id 16777216 on <device> is out of range",
            ),
            (
                format!("{SB}\n{DEV}\n<single_mapping origin_block=\"0\" data_block=\"1099511627776\" time=\"0\"/>"),
                3,
                "40-bit data block",
            ),
            (
                format!("{SB}\n{DEV}\n<range_mapping origin_begin=\"18446744073709551615\" data_begin=\"1\" length=\"2\" time=\"0\"/>"),
                3,
                "runs past the last virtual block",
            ),
            (
                format!("{SB}\n{DEV}\n<single_mapping origin_block=\"5\" data_block=\"1\" time=\"0\"/>\n<single_mapping origin_block=\"5\" data_block=\"2\" time=\"0\"/>"),
                4,
                "overlaps or precedes the previous mapping, which ends at virtual block 5",
            ),
            (
                format!("{SB}\n{DEV}</device>\n{DEV}"),
                3,
                "duplicate <device dev_id=\"1\">",
            ),
            (
                format!("{SB}\n<device dev_id=\"7\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>\n{DEV}"),
                3,
                "ascending dev_id order",
            ),
            (format!("{SB}\n{DEV}\n  hello\n"), 3, "unexpected text \"hello"),
            (format!("{SB}\n{DEV}\n"), 3, "unexpected end of input inside <device dev_id=\"1\">"),
            (format!("{SB}</superblock>\n{SB}"), 2, "after </superblock>"),
            (DEV.to_string(), 1, "<device> before <superblock>"),
            (format!("{SB}\n<device dev_id=\"1\""), 2, "malformed xml"),
            (format!("{SB}\n</device>"), 2, "malformed xml"),
            (format!("{SB}\n<device dev_id=1/>"), 2, "malformed attribute on <device>"),
        ];
        for (input, want_line, want) in cases {
            let (line, message) = parse_err(&input);
            assert!(
                message.contains(want),
                "input {input:?}: message {message:?} lacks {want:?}"
            );
            assert_eq!(line, want_line, "input {input:?}: message {message:?}");
        }
    }

    #[test]
    fn xml_visitor_error_stops_reading() {
        let mut r = Recorder {
            fail_map_at: Some(2),
            ..Recorder::default()
        };
        match read_xml(&vector_xml("one-thin")[..], &mut r) {
            Err(XmlError::Visitor { line, source }) => {
                assert_eq!(line, 4);
                assert_eq!(source, "refused map 2");
            }
            other => panic!("expected a visitor error, got {other:?}"),
        }
        assert!(!r.events.contains(&Ev::DevE));
    }

    /// A reader that fails after `ok` bytes.
    struct Failing<'a> {
        data: &'a [u8],
        ok: usize,
    }

    impl Read for Failing<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.ok == 0 {
                return Err(io::Error::other("disk on fire"));
            }
            let n = out.len().min(self.ok).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            self.ok -= n;
            Ok(n)
        }
    }

    #[test]
    fn xml_io_error_is_passed_on() {
        let data = vector_xml("snapshots");
        let input = io::BufReader::with_capacity(
            16,
            Failing {
                data: &data,
                ok: 300,
            },
        );
        let mut r = Recorder::default();
        match read_xml(input, &mut r) {
            Err(XmlError::Io { line, source }) => {
                assert_eq!(source.to_string(), "disk on fire");
                assert!((2..=5).contains(&line), "line {line}");
            }
            other => panic!("expected an I/O error, got {other:?}"),
        }
    }

    /// xorshift64*, deterministic.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Whatever comes out of a successful read must print and read back to itself.
    fn check_stable(input: &[u8]) {
        if let Ok(out) = roundtrip(input) {
            let again = roundtrip(&out).expect("our own output must read back");
            assert_eq!(again, out);
        }
    }

    #[test]
    fn xml_truncations_and_mutations_never_panic() {
        let full = vector_xml("snapshots");
        for cut in 0..full.len() {
            let r = roundtrip(&full[..cut]);
            // Only the cut that drops nothing but the final newline is complete.
            assert_eq!(r.is_ok(), cut == full.len() - 1, "cut at {cut}");
        }
        const INTERESTING: &[u8] = b"<>/=\"'&;!?- \n\t0123456789abcxyz_\xff\x00";
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut ok = 0;
        for _ in 0..20_000 {
            let mut v = full.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(v.len());
                match rng.below(3) {
                    0 => v[i] = INTERESTING[rng.below(INTERESTING.len())],
                    1 => {
                        v.remove(i);
                    }
                    _ => v.insert(i, INTERESTING[rng.below(INTERESTING.len())]),
                }
            }
            if roundtrip(&v).is_ok() {
                ok += 1;
            }
            check_stable(&v);
        }
        // Some mutations (in whitespace, in a digit) stay valid; most do not.
        assert!(ok > 0 && ok < 20_000, "{ok} mutants accepted");
    }

    #[test]
    fn xml_push_u64() {
        for n in [
            0,
            7,
            9,
            10,
            42,
            99,
            100,
            101,
            999,
            1000,
            65535,
            1 << 40,
            u64::MAX,
        ] {
            let mut b = Vec::new();
            push_u64(&mut b, n);
            assert_eq!(String::from_utf8(b).unwrap(), n.to_string());
        }
    }
}
