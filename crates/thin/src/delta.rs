//! `thinpool meta delta`: how two thin devices' mappings differ, printed exactly like
//! `thin_delta` 0.9.0.
//!
//! Each device's mappings are first merged into runs of consecutive virtual blocks mapped to
//! consecutive data blocks (times are ignored, as by the tool). The two run lists are then
//! walked together, cutting runs where the other side starts or ends, and every piece is
//! classified as `same` (both map it to the same data block), `different` (both map it, to
//! different data blocks), `left_only` or `right_only`. The plain output merges adjacent pieces
//! of one class into one element; `--verbose` prints every piece as a `<range>` inside one
//! element per stretch of the same class:
//!
//! ```text
//! <superblock uuid="" time="2" transaction="3" data_block_size="128" nr_data_blocks="1024">
//!   <diff left="1" right="3">
//!     <same begin="0" length="4"/>
//!     <different begin="4" length="2"/>
//!   </diff>
//! </superblock>
//! ```
//!
//! With the held metadata snapshot (`-m`) the superblock line shows the held copy's time and
//! transaction and `nr_data_blocks="0"` (the copy has no space maps); without it, a
//! `metadata_snap="N"` attribute appears when a snapshot is held.

use std::fmt::Write as _;
use std::sync::Arc;

use thinpool_io::BlockDevice;

use crate::walk::{self, Reader};
use crate::{Error, Result};

/// Options of [`delta_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DeltaOptions {
    /// The left device (`--thin1`).
    pub thin1: u64,
    /// The right device (`--thin2`).
    pub thin2: u64,
    /// Compare in the held metadata snapshot (`-m`): `Some(None)` = the one the superblock
    /// names, `Some(Some(b))` = the superblock copy at block `b` (`-m b`).
    pub metadata_snap: Option<Option<u64>>,
    /// Print every range with its data blocks (`--verbose`).
    pub verbose: bool,
}

/// `thin_delta --thin1 A --thin2 B [-m] [--verbose]`: the text `thin_delta` 0.9.0 prints.
/// Read-only; walks both devices' mapping trees once. Errors: damaged superblock or trees
/// (naming the block), no held snapshot with `metadata_snap` ("no current metadata snap"), and
/// a device without a mapping tree, with the tool's words: "Unable to find mapping tree for
/// snap1 (A)" (or snap2).
pub fn delta(
    dev: Arc<dyn BlockDevice>,
    thin1: u32,
    thin2: u32,
    metadata_snap: bool,
    verbose: bool,
) -> Result<String> {
    delta_with(
        dev,
        &DeltaOptions {
            thin1: thin1 as u64,
            thin2: thin2 as u64,
            metadata_snap: metadata_snap.then_some(None),
            verbose,
        },
    )
}

/// A run of mappings: virtual `vbegin..vbegin+len` → data `dbegin..dbegin+len`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Run {
    vbegin: u64,
    dbegin: u64,
    len: u64,
}

impl Run {
    fn consume(&mut self, n: u64) {
        let n = n.min(self.len);
        self.vbegin = self.vbegin.wrapping_add(n);
        self.dbegin = self.dbegin.wrapping_add(n);
        self.len -= n;
    }
}

fn runs(r: &mut Reader, root: u64, dev: u64) -> Result<Vec<Run>> {
    let mut out: Vec<Run> = Vec::new();
    walk::walk_mappings(r, root, dev, &mut |v, bt| {
        if let Some(last) = out.last_mut()
            && last.vbegin.wrapping_add(last.len) == v
            && last.dbegin.wrapping_add(last.len) == bt.block
        {
            last.len += 1;
            return Ok(());
        }
        out.push(Run {
            vbegin: v,
            dbegin: bt.block,
            len: 1,
        });
        Ok(())
    })?;
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    LeftOnly,
    RightOnly,
    Different,
    Same,
}

impl Class {
    fn tag(self) -> &'static str {
        match self {
            Class::LeftOnly => "left_only",
            Class::RightOnly => "right_only",
            Class::Different => "different",
            Class::Same => "same",
        }
    }
}

/// One classified piece: virtual begin, left and right data begins (when mapped), length.
#[derive(Debug, Clone, Copy)]
struct Piece {
    class: Class,
    vbegin: u64,
    left: u64,
    right: u64,
    len: u64,
}

/// Walk both run lists together and classify every piece (the tool's `dump_diff`).
fn diff(left: &[Run], right: &[Run], emit: &mut dyn FnMut(Piece)) {
    let (mut li, mut ri) = (left.iter(), right.iter());
    let (mut l, mut r) = (Run::default(), Run::default());
    loop {
        if l.len == 0
            && let Some(n) = li.next()
        {
            l = *n;
        }
        if r.len == 0
            && let Some(n) = ri.next()
        {
            r = *n;
        }
        if l.len == 0 || r.len == 0 {
            break;
        }
        if l.vbegin < r.vbegin {
            let n = l.len.min(r.vbegin - l.vbegin);
            emit(Piece {
                class: Class::LeftOnly,
                vbegin: l.vbegin,
                left: l.dbegin,
                right: 0,
                len: n,
            });
            l.consume(n);
        } else if l.vbegin > r.vbegin {
            let n = r.len.min(l.vbegin - r.vbegin);
            emit(Piece {
                class: Class::RightOnly,
                vbegin: r.vbegin,
                left: 0,
                right: r.dbegin,
                len: n,
            });
            r.consume(n);
        } else {
            let n = l.len.min(r.len);
            let class = if l.dbegin != r.dbegin {
                Class::Different
            } else {
                Class::Same
            };
            emit(Piece {
                class,
                vbegin: l.vbegin,
                left: l.dbegin,
                right: r.dbegin,
                len: n,
            });
            l.consume(n);
            r.consume(n);
        }
    }
    for m in std::iter::once(l).chain(li.copied()).filter(|m| m.len > 0) {
        emit(Piece {
            class: Class::LeftOnly,
            vbegin: m.vbegin,
            left: m.dbegin,
            right: 0,
            len: m.len,
        });
    }
    for m in std::iter::once(r).chain(ri.copied()).filter(|m| m.len > 0) {
        emit(Piece {
            class: Class::RightOnly,
            vbegin: m.vbegin,
            left: 0,
            right: m.dbegin,
            len: m.len,
        });
    }
}

/// `thin_delta` with every option: see [`delta`].
pub fn delta_with(dev: Arc<dyn BlockDevice>, opts: &DeltaOptions) -> Result<String> {
    let mut r = Reader::new(dev)?;
    let view = walk::open_view(&mut r, opts.metadata_snap)?;
    let top = walk::read_top_level(&mut r, view.sb.mapping_root)?;
    let root1 = *top.get(&opts.thin1).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "Unable to find mapping tree for snap1 ({})",
            opts.thin1
        ))
    })?;
    let root2 = *top.get(&opts.thin2).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "Unable to find mapping tree for snap2 ({})",
            opts.thin2
        ))
    })?;
    let left = runs(&mut r, root1, opts.thin1)?;
    let right = runs(&mut r, root2, opts.thin2)?;
    let nr_data_blocks = if opts.metadata_snap.is_some() {
        0
    } else {
        view.live.data_sm_root.nr_blocks
    };

    let sb = &view.sb;
    let mut out = String::new();
    let _ = write!(
        out,
        "<superblock uuid=\"\" time=\"{}\" transaction=\"{}\" data_block_size=\"{}\" nr_data_blocks=\"{}\"",
        sb.time, sb.trans_id, sb.data_block_size, nr_data_blocks
    );
    if sb.held_root != 0 {
        let _ = write!(out, " metadata_snap=\"{}\"", sb.held_root);
    }
    out.push_str(">\n");
    let _ = writeln!(
        out,
        "  <diff left=\"{}\" right=\"{}\">",
        opts.thin1, opts.thin2
    );
    if opts.verbose {
        let mut open: Option<Class> = None;
        diff(&left, &right, &mut |p| {
            if open != Some(p.class) {
                if let Some(c) = open {
                    let _ = writeln!(out, "    </{}>", c.tag());
                }
                let _ = writeln!(out, "    <{}>", p.class.tag());
                open = Some(p.class);
            }
            let _ = match p.class {
                Class::LeftOnly => writeln!(
                    out,
                    "      <range begin=\"{}\" data_begin=\"{}\" length=\"{}\"/>",
                    p.vbegin, p.left, p.len
                ),
                Class::RightOnly => writeln!(
                    out,
                    "      <range begin=\"{}\" data_begin=\"{}\" length=\"{}\"/>",
                    p.vbegin, p.right, p.len
                ),
                Class::Same => writeln!(
                    out,
                    "      <range begin=\"{}\" data_begin=\"{}\" length=\"{}\"/>",
                    p.vbegin, p.left, p.len
                ),
                Class::Different => writeln!(
                    out,
                    "      <range begin=\"{}\" left_data_begin=\"{}\" right_data_begin=\"{}\" length=\"{}\"/>",
                    p.vbegin, p.left, p.right, p.len
                ),
            };
        });
        if let Some(c) = open {
            let _ = writeln!(out, "    </{}>", c.tag());
        }
    } else {
        let mut cur: Option<(Class, u64, u64)> = None;
        let flush = |out: &mut String, c: Option<(Class, u64, u64)>| {
            if let Some((class, b, e)) = c {
                let _ = writeln!(
                    out,
                    "    <{} begin=\"{b}\" length=\"{}\"/>",
                    class.tag(),
                    e.wrapping_sub(b)
                );
            }
        };
        diff(&left, &right, &mut |p| match &mut cur {
            Some((class, _, end)) if *class == p.class && *end == p.vbegin => {
                *end = end.wrapping_add(p.len);
            }
            _ => {
                flush(&mut out, cur.take());
                cur = Some((p.class, p.vbegin, p.vbegin.wrapping_add(p.len)));
            }
        });
        flush(&mut out, cur);
    }
    out.push_str("  </diff>\n</superblock>\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::walk::testutil::{VECTORS, have, mem, restore, run_on, vector};

    #[test]
    fn readme_example() {
        let img = vector("snapshots");
        assert_eq!(
            delta(mem(img.clone()), 1, 3, false, false).unwrap(),
            "<superblock uuid=\"\" time=\"2\" transaction=\"3\" data_block_size=\"128\" nr_data_blocks=\"1024\">\n  <diff left=\"1\" right=\"3\">\n    <same begin=\"0\" length=\"4\"/>\n    <different begin=\"4\" length=\"2\"/>\n    <same begin=\"6\" length=\"10\"/>\n    <right_only begin=\"30\" length=\"1\"/>\n  </diff>\n</superblock>\n"
        );
        let e = delta(mem(img.clone()), 1, 9, false, false).unwrap_err();
        assert_eq!(e.to_string(), "Unable to find mapping tree for snap2 (9)");
        let e = delta(mem(img.clone()), 9, 1, false, false).unwrap_err();
        assert_eq!(e.to_string(), "Unable to find mapping tree for snap1 (9)");
        let e = delta(mem(img), 1, 2, true, false).unwrap_err();
        assert_eq!(e.to_string(), "no current metadata snap");
    }

    fn compare(img: &[u8], ids: &[u64], what: &str) {
        for &a in ids {
            for &b in ids {
                for extra in [
                    &[][..],
                    &["--verbose"][..],
                    &["-m"][..],
                    &["-m", "--verbose"][..],
                ] {
                    let (sa, sb) = (a.to_string(), b.to_string());
                    let mut args = vec!["--thin1", sa.as_str(), "--thin2", sb.as_str()];
                    args.extend_from_slice(extra);
                    let o = run_on("thin_delta", &args, img);
                    let ours = delta_with(
                        mem(img.to_vec()),
                        &DeltaOptions {
                            thin1: a,
                            thin2: b,
                            metadata_snap: extra.contains(&"-m").then_some(None),
                            verbose: extra.contains(&"--verbose"),
                        },
                    );
                    match ours {
                        Ok(text) => {
                            assert!(o.status.success(), "{what} {args:?}: thin_delta failed");
                            assert_eq!(text, String::from_utf8_lossy(&o.stdout), "{what} {args:?}");
                        }
                        Err(e) => {
                            assert!(!o.status.success(), "{what} {args:?}: we failed ({e})");
                            let first = String::from_utf8_lossy(&o.stderr)
                                .lines()
                                .next()
                                .unwrap_or("")
                                .to_string();
                            assert_eq!(e.to_string(), first, "{what} {args:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn vectors_match_thin_delta() {
        if !have("thin_delta") {
            return;
        }
        for name in VECTORS {
            let img = vector(name);
            let ids: &[u64] = match name {
                "many-devices" => &[0, 7, 2093, 5],
                _ => &[0, 1, 2, 3],
            };
            compare(&img, ids, name);
        }
    }

    /// Random pairs of devices made of overlapping runs: same, different, one-sided, split runs.
    #[test]
    fn random_pools_match_thin_delta() {
        if !have("thin_delta") || !have("thin_restore") {
            return;
        }
        let seed = std::env::var("THINPOOL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(7u64);
        eprintln!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for round in 0..5 {
            let mut xml = String::from(
                "<superblock uuid=\"\" time=\"1\" transaction=\"1\" flags=\"0\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"100000\">\n",
            );
            for id in 1..=3 {
                xml += &format!(
                    "  <device dev_id=\"{id}\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n"
                );
                let mut v = 0u64;
                let nruns = rng.random_range(0..(5 + round * 10));
                for _ in 0..nruns {
                    v += rng.random_range(0..6);
                    let len = rng.random_range(1..8);
                    // Data blocks from a small pool so that the devices often agree.
                    let d = rng.random_range(0..4) * 8 + (v % 8);
                    xml += &format!(
                        "    <range_mapping origin_begin=\"{v}\" data_begin=\"{}\" length=\"{len}\" time=\"{}\"/>\n",
                        d + 1000 * (rng.random_range(0..2) as u64) * id,
                        rng.random_range(0..2)
                    );
                    v += len;
                }
                xml += "  </device>\n";
            }
            xml += "</superblock>\n";
            let img = restore(&xml, 4 << 20);
            compare(&img, &[1, 2, 3], &format!("round {round}"));
        }
    }
}
