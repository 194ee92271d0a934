//! `thinpool meta restore`: build a metadata image from IR events (XML, JSON or a salvage),
//! like `thin_restore`. Each device gets its own mapping tree, so a data block's reference
//! count is the number of devices mapping it (as with `thin_restore`, section 17).

use std::sync::Arc;

use thinpool_io::BlockDevice;

use crate::ir::{self, MetadataVisitor};
use crate::metadata::{ThinId, ThinMetadata};
use crate::superblock::DeviceDetails;
use crate::{Error, Result};

/// A visitor that writes what it is fed into a fresh metadata device.
pub struct Restorer {
    dev: Arc<dyn BlockDevice>,
    md: Option<ThinMetadata>,
    sb: Option<ir::Superblock>,
    device: Option<(ThinId, ir::Device, u64)>,
    progress: Option<Box<dyn FnMut(u64)>>,
    mappings: u64,
}

impl Restorer {
    /// Restore onto `dev` (formatted anew; its old content is lost).
    pub fn new(dev: Arc<dyn BlockDevice>) -> Self {
        Restorer {
            dev,
            md: None,
            sb: None,
            device: None,
            progress: None,
            mappings: 0,
        }
    }

    /// Call `f` with the number of mappings restored so far, every 65536 mappings.
    pub fn with_progress(mut self, f: Box<dyn FnMut(u64)>) -> Self {
        self.progress = Some(f);
        self
    }

    fn md(&mut self) -> Result<&mut ThinMetadata> {
        self.md
            .as_mut()
            .ok_or_else(|| Error::Input("input has no <superblock> before its content".into()))
    }
}

impl MetadataVisitor for Restorer {
    type Error = Error;

    fn superblock_b(&mut self, sb: &ir::Superblock) -> Result<()> {
        if self.md.is_some() {
            return Err(Error::Input("a second <superblock>".into()));
        }
        let mut md = ThinMetadata::format(self.dev.clone(), sb.data_block_size, sb.nr_data_blocks)?;
        let old = md.transaction_id();
        md.set_transaction_id(old, sb.transaction)?;
        md.set_restored_fields(sb.time, sb.flags, sb.version);
        self.md = Some(md);
        self.sb = Some(sb.clone());
        Ok(())
    }

    fn superblock_e(&mut self) -> Result<()> {
        self.md()?.commit()
    }

    fn device_b(&mut self, dev: &ir::Device) -> Result<()> {
        if self.device.is_some() {
            return Err(Error::Input(format!(
                "device {} starts inside another device",
                dev.dev_id
            )));
        }
        let id = ThinId::new(dev.dev_id as u64)?;
        self.md()?.create_thin(id)?;
        self.device = Some((id, *dev, 0));
        Ok(())
    }

    fn device_e(&mut self) -> Result<()> {
        let (id, dev, _) = self
            .device
            .take()
            .ok_or_else(|| Error::Input("end of a device that was not started".into()))?;
        let md = self.md()?;
        // mapped_blocks is recounted (thin_restore ignores the XML's value too).
        let mapped = md.device_details(id)?.mapped_blocks;
        md.set_details(
            id,
            DeviceDetails {
                mapped_blocks: mapped,
                transaction_id: dev.transaction,
                creation_time: dev.creation_time,
                snapshotted_time: dev.snap_time,
            },
        );
        Ok(())
    }

    fn map(&mut self, m: &ir::Map) -> Result<()> {
        let (id, _, _) = self
            .device
            .ok_or_else(|| Error::Input("a mapping outside any device".into()))?;
        let nr_data = self.md()?.nr_data_blocks();
        if m.data_begin
            .checked_add(m.len)
            .is_none_or(|end| end > nr_data)
        {
            return Err(Error::Input(format!(
                "device {}: mapping of data blocks {}..{} is beyond nr_data_blocks {nr_data}",
                id.get(),
                m.data_begin,
                m.data_begin.saturating_add(m.len)
            )));
        }
        for i in 0..m.len {
            let md = self.md.as_mut().expect("checked above");
            md.inc_data_block(m.data_begin + i)?;
            md.insert_block_with_time(id, m.origin_begin + i, m.data_begin + i, m.time)?;
            self.mappings += 1;
            if self.mappings.is_multiple_of(65536)
                && let Some(p) = &mut self.progress
            {
                p(self.mappings);
            }
        }
        Ok(())
    }
}
