//! A JSON form of a pool's logical content: the same information as the XML of
//! [`crate::xml`] (thin_dump's format, `docs/dm-thin-format.md` 18.1), for programs that would
//! rather not parse XML. [`JsonWriter`] streams it from the IR events ([`crate::ir`]) without
//! building a tree, so a dump of millions of mappings costs no more memory than one of ten.
//!
//! The shape (one device and one mapping per line; `metadata_snap` is `null` without a held
//! root):
//!
//! ```text
//! {"superblock":{"uuid":"","time":2,"transaction":3,"flags":0,"version":2,"data_block_size":128,"nr_data_blocks":1024,"metadata_snap":null},"devices":[
//! {"dev_id":1,"mapped_blocks":16,"transaction":0,"creation_time":0,"snap_time":2,"mappings":[
//! {"origin_begin":0,"data_begin":16,"length":4,"time":1},
//! {"origin_begin":4,"data_begin":24,"length":2,"time":2}
//! ]}
//! ]}
//! ```
//!
//! Every mapping is a run (`length` >= 1); the XML's `single_mapping` is a run of length 1.
//!
//! ```
//! use thinpool_thin::ir::{Device, Map, MetadataVisitor, Superblock};
//! use thinpool_thin::json::JsonWriter;
//!
//! let mut w = JsonWriter::new(Vec::new());
//! w.superblock_b(&Superblock { version: 2, data_block_size: 128, ..Default::default() })?;
//! w.device_b(&Device { dev_id: 1, mapped_blocks: 4, ..Default::default() })?;
//! w.map(&Map { origin_begin: 0, data_begin: 16, len: 4, time: 1 })?;
//! w.device_e()?;
//! w.superblock_e()?;
//! w.eof()?;
//! let text = String::from_utf8(w.into_inner()?).unwrap();
//! assert!(text.starts_with(r#"{"superblock":{"uuid":"","time":0,"#));
//! assert!(text.contains(r#"{"origin_begin":0,"data_begin":16,"length":4,"time":1}"#));
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::{self, Write};

use crate::ir::{Device, Map, MetadataVisitor, Superblock};
use crate::staged::Staged;
use crate::xml::push_u64;

/// Streams the IR as JSON (shape in the module docs).
///
/// Like [`crate::xml::XmlWriter`]: text is staged in an internal buffer and handed to `out`
/// in chunks of about 64 KiB, at [`MetadataVisitor::superblock_e`] and at
/// [`MetadataVisitor::eof`] (which also flushes `out`). Events must come in the order the IR
/// defines; the writer keeps only two flags (first device, first mapping) and does not check.
#[derive(Debug)]
pub struct JsonWriter<W: Write> {
    st: Staged<W>,
    first_device: bool,
    first_mapping: bool,
}

impl<W: Write> JsonWriter<W> {
    /// A writer printing to `out`. O(1); allocates the 64 KiB staging buffer.
    pub fn new(out: W) -> Self {
        JsonWriter {
            st: Staged::new(out),
            first_device: true,
            first_mapping: true,
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

    /// Appends `"name":value` preceded by a comma.
    fn field(&mut self, name: &[u8], value: u64) {
        self.st.buf.extend_from_slice(b",\"");
        self.st.buf.extend_from_slice(name);
        self.st.buf.extend_from_slice(b"\":");
        push_u64(&mut self.st.buf, value);
    }
}

impl<W: Write> MetadataVisitor for JsonWriter<W> {
    type Error = io::Error;

    fn superblock_b(&mut self, sb: &Superblock) -> io::Result<()> {
        self.st.buf.extend_from_slice(b"{\"superblock\":{\"uuid\":");
        serde_json::to_writer(&mut self.st.buf, &sb.uuid).map_err(io::Error::other)?;
        self.field(b"time", sb.time.into());
        self.field(b"transaction", sb.transaction);
        self.field(b"flags", sb.flags.into());
        self.field(b"version", sb.version.into());
        self.field(b"data_block_size", sb.data_block_size.into());
        self.field(b"nr_data_blocks", sb.nr_data_blocks);
        match sb.metadata_snap {
            Some(root) => self.field(b"metadata_snap", root),
            None => self.st.buf.extend_from_slice(b",\"metadata_snap\":null"),
        }
        self.st.buf.extend_from_slice(b"},\"devices\":[");
        self.first_device = true;
        self.maybe_drain()
    }

    fn superblock_e(&mut self) -> io::Result<()> {
        self.st.buf.extend_from_slice(b"\n]}\n");
        self.drain()
    }

    fn device_b(&mut self, dev: &Device) -> io::Result<()> {
        if !self.first_device {
            self.st.buf.push(b',');
        }
        self.first_device = false;
        self.first_mapping = true;
        self.st.buf.extend_from_slice(b"\n{\"dev_id\":");
        push_u64(&mut self.st.buf, dev.dev_id.into());
        self.field(b"mapped_blocks", dev.mapped_blocks);
        self.field(b"transaction", dev.transaction);
        self.field(b"creation_time", dev.creation_time.into());
        self.field(b"snap_time", dev.snap_time.into());
        self.st.buf.extend_from_slice(b",\"mappings\":[");
        self.maybe_drain()
    }

    fn device_e(&mut self) -> io::Result<()> {
        self.st.buf.extend_from_slice(b"\n]}");
        self.maybe_drain()
    }

    fn map(&mut self, m: &Map) -> io::Result<()> {
        if !self.first_mapping {
            self.st.buf.push(b',');
        }
        self.first_mapping = false;
        self.st.buf.extend_from_slice(b"\n{\"origin_begin\":");
        push_u64(&mut self.st.buf, m.origin_begin);
        self.field(b"data_begin", m.data_begin);
        self.field(b"length", m.len);
        self.field(b"time", m.time.into());
        self.st.buf.push(b'}');
        self.maybe_drain()
    }

    fn eof(&mut self) -> io::Result<()> {
        self.drain()?;
        self.st.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::walk::testutil::vector_xml;
    use crate::xml::read_xml;
    use serde_json::Value;

    fn json_of(name: &str) -> Value {
        let mut w = JsonWriter::new(Vec::new());
        read_xml(&vector_xml(name)[..], &mut w).unwrap();
        let text = w.into_inner().unwrap();
        serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{name}: not JSON: {e}"))
    }

    #[test]
    fn json_many_devices_parses_with_right_counts() {
        let v = json_of("many-devices");
        let sb = &v["superblock"];
        assert_eq!(sb["transaction"], 300);
        assert_eq!(sb["nr_data_blocks"], 131072);
        assert_eq!(sb["version"], 2);
        assert_eq!(sb["uuid"], "");
        assert!(sb["metadata_snap"].is_null());
        let devices = v["devices"].as_array().unwrap();
        assert_eq!(devices.len(), 300);
        let mut blocks = 0;
        for d in devices {
            let runs = d["mappings"].as_array().unwrap();
            let mapped: u64 = runs.iter().map(|m| m["length"].as_u64().unwrap()).sum();
            assert_eq!(
                d["mapped_blocks"].as_u64().unwrap(),
                mapped,
                "device {}",
                d["dev_id"]
            );
            blocks += mapped;
        }
        assert_eq!(blocks, 69_900);
        assert_eq!(devices[0]["dev_id"], 0);
        assert_eq!(devices[0]["mappings"].as_array().unwrap().len(), 400);
        assert_eq!(devices[299]["dev_id"], 2093);
        // 50-block run plus 50 single mappings.
        assert_eq!(devices[1]["mappings"].as_array().unwrap().len(), 51);
    }

    #[test]
    fn json_snapshots_content() {
        let v = json_of("snapshots");
        assert_eq!(v["superblock"]["time"], 2);
        let d1 = &v["devices"][0];
        assert_eq!(d1["snap_time"], 2);
        assert_eq!(
            d1["mappings"][0],
            serde_json::json!({"origin_begin":0,"data_begin":16,"length":4,"time":1})
        );
        let d3 = &v["devices"][2];
        assert_eq!(
            d3["mappings"][2],
            serde_json::json!({"origin_begin":30,"data_begin":26,"length":1,"time":2})
        );
    }

    #[test]
    fn json_empty_pool_device_and_held_root() {
        let mut w = JsonWriter::new(Vec::new());
        w.superblock_b(&Superblock {
            uuid: "q\"\\\n".to_string(),
            metadata_snap: Some(13),
            ..Superblock::default()
        })
        .unwrap();
        w.device_b(&Device::default()).unwrap();
        w.device_e().unwrap();
        w.device_b(&Device {
            dev_id: 4,
            ..Device::default()
        })
        .unwrap();
        w.device_e().unwrap();
        w.superblock_e().unwrap();
        w.eof().unwrap();
        let v: Value = serde_json::from_slice(&w.into_inner().unwrap()).unwrap();
        assert_eq!(v["superblock"]["uuid"], "q\"\\\n");
        assert_eq!(v["superblock"]["metadata_snap"], 13);
        assert_eq!(v["devices"][1]["dev_id"], 4);
        assert_eq!(v["devices"][1]["mappings"].as_array().unwrap().len(), 0);

        let v = json_of("empty");
        assert_eq!(v["devices"].as_array().unwrap().len(), 0);
    }
}
