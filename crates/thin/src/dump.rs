//! `thinpool meta dump`: the logical content of a pool as IR events (then XML or JSON), like
//! `thin_dump` 0.9.0 — devices in id order from the details tree, each device's mappings from
//! its bottom tree merged into maximal runs.

use std::sync::Arc;

use thinpool_io::BlockDevice;
use thinpool_pdata::BlockKind;
use thinpool_pdata::block;
use thinpool_pdata::btree;
use thinpool_pdata::transaction::BlockReader;

use crate::ir::{self, MetadataVisitor, RunBuilder};
use crate::metadata::read_superblock;
use crate::superblock::{BlockTime, DeviceDetails, Superblock};
use crate::{Error, Result};

/// Options of a dump.
#[derive(Debug, Clone, Copy, Default)]
pub struct DumpOptions {
    /// Dump the held metadata snapshot instead of the live trees (`thin_dump -m`).
    pub metadata_snap: bool,
}

/// Walk the pool on `dev` and feed `v`. Errors of the visitor come back as
/// [`Error::Output`] when they are I/O errors.
pub fn dump<V>(dev: Arc<dyn BlockDevice>, opts: DumpOptions, v: &mut V) -> Result<()>
where
    V: MetadataVisitor<Error = std::io::Error>,
{
    let sb = read_superblock(&*dev)?;
    let mut reader = BlockReader::new(dev)?;
    let (view, nr_data_blocks) = if opts.metadata_snap {
        if sb.held_root == 0 {
            return Err(Error::MetadataSnap(
                "no metadata snapshot is held (held_root is 0)".into(),
            ));
        }
        let blk = reader.read(sb.held_root, BlockKind::Superblock)?;
        (Superblock::decode(&blk[..]), 0)
    } else {
        let n = sb.data_sm_root.nr_blocks;
        (sb.clone(), n)
    };
    dump_view(&mut reader, &view, nr_data_blocks, v)
}

fn out(e: std::io::Error) -> Error {
    Error::Output(e)
}

fn dump_view<V>(
    reader: &mut BlockReader,
    sb: &Superblock,
    nr_data_blocks: u64,
    v: &mut V,
) -> Result<()>
where
    V: MetadataVisitor<Error = std::io::Error>,
{
    v.superblock_b(&ir::Superblock {
        uuid: String::new(),
        time: sb.time,
        transaction: sb.trans_id,
        flags: sb.flags,
        version: sb.version,
        data_block_size: sb.data_block_size,
        nr_data_blocks,
        metadata_snap: None,
    })
    .map_err(out)?;
    let mut devices = Vec::new();
    btree::walk(
        reader,
        sb.details_root,
        DeviceDetails::SIZE,
        &mut |k, val| {
            devices.push((k, DeviceDetails::decode(val)));
            Ok(true)
        },
    )?;
    for (id, d) in devices {
        let root = btree::lookup_u64(reader, sb.mapping_root, id)?.ok_or_else(|| {
            Error::Inconsistent(format!(
                "thin device {id} is in the details tree but not in the mapping tree"
            ))
        })?;
        v.device_b(&ir::Device {
            dev_id: id as u32,
            mapped_blocks: d.mapped_blocks,
            transaction: d.transaction_id,
            creation_time: d.creation_time,
            snap_time: d.snapshotted_time,
        })
        .map_err(out)?;
        let mut runs = RunBuilder::default();
        let mut err = None;
        btree::walk(reader, root, 8, &mut |k, val| {
            let bt = BlockTime::unpack(block::le_u64(val, 0));
            if let Some(run) = runs.push(k, bt.block, bt.time)
                && let Err(e) = v.map(&run)
            {
                err = Some(e);
                return Ok(false);
            }
            Ok(true)
        })?;
        if let Some(e) = err {
            return Err(out(e));
        }
        if let Some(run) = runs.finish() {
            v.map(&run).map_err(out)?;
        }
        v.device_e().map_err(out)?;
    }
    v.superblock_e().map_err(out)?;
    v.eof().map_err(out)?;
    Ok(())
}
