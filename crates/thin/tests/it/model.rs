//! Model-based test of the writable metadata API: random sequences of create, snapshot, delete,
//! insert, remove, commit, metadata-snapshot reserve/release and reopen (= abort to the last
//! commit) run against [`ThinMetadata`] and an in-memory model side by side. Every lookup is
//! compared as it happens; after every commit the image must pass `thin_check` (and `-m` when
//! a snapshot is held) and `thin_dump` must print exactly the model, live and held.
//!
//! Seed: `THINPOOL_TEST_SEED`; cases: `THINPOOL_MODEL_CASES` (default 4); operations per case:
//! `THINPOOL_MODEL_OPS` (default 600).

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use thinpool_thin::ir::{self, MetadataVisitor, RunBuilder};
use thinpool_thin::xml::XmlWriter;
use thinpool_thin::{ThinId, ThinMetadata};

use crate::common::*;

#[derive(Clone, Debug, Default)]
struct Dev {
    map: BTreeMap<u64, (u64, u32)>,
    transaction: u64,
    creation_time: u32,
    snap_time: u32,
}

#[derive(Clone, Debug, Default)]
struct Model {
    devs: BTreeMap<u32, Dev>,
    time: u32,
    trans_id: u64,
}

impl Model {
    fn xml(&self, nr_data_blocks: u64, data_block_size: u32) -> String {
        let mut out = Vec::new();
        let mut w = XmlWriter::new(&mut out);
        w.superblock_b(&ir::Superblock {
            uuid: String::new(),
            time: self.time,
            transaction: self.trans_id,
            flags: 0,
            version: 2,
            data_block_size,
            nr_data_blocks,
            metadata_snap: None,
        })
        .unwrap();
        for (id, d) in &self.devs {
            w.device_b(&ir::Device {
                dev_id: *id,
                mapped_blocks: d.map.len() as u64,
                transaction: d.transaction,
                creation_time: d.creation_time,
                snap_time: d.snap_time,
            })
            .unwrap();
            let mut runs = RunBuilder::default();
            for (v, (b, t)) in &d.map {
                if let Some(r) = runs.push(*v, *b, *t) {
                    w.map(&r).unwrap();
                }
            }
            if let Some(r) = runs.finish() {
                w.map(&r).unwrap();
            }
            w.device_e().unwrap();
        }
        w.superblock_e().unwrap();
        w.eof().unwrap();
        drop(w);
        String::from_utf8(out).unwrap()
    }

    fn data_blocks(&self, into: &mut BTreeSet<u64>) {
        for d in self.devs.values() {
            into.extend(d.map.values().map(|(b, _)| *b));
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn random_operations_match_the_model_and_the_tools() {
    let oracle = have_tool("thin_check") && have_tool("thin_dump");
    let seed = env_u64("THINPOOL_TEST_SEED", rand::random());
    let cases = env_u64("THINPOOL_MODEL_CASES", 4);
    let ops = env_u64("THINPOOL_MODEL_OPS", 600);
    eprintln!("model test: seed {seed} (THINPOOL_TEST_SEED), {cases} cases x {ops} operations");
    let mut rng = StdRng::seed_from_u64(seed);
    for case in 0..cases {
        run_case(&mut rng, case, ops, oracle);
    }
}

fn run_case(rng: &mut StdRng, case: u64, nr_ops: u64, oracle: bool) {
    const NR_DATA: u64 = 200_000;
    const DBS: u32 = 128;
    let m = TempMeta::new(32 << 20);
    let mut md = ThinMetadata::format(m.dev(), DBS, NR_DATA).unwrap();
    // Odd cases write changed nodes back early, long before the commit.
    let dirty_limit = if case % 2 == 1 { 32 } else { 1 << 20 };
    md.set_dirty_limit(dirty_limit);
    let mut live = Model::default();
    let mut committed = live.clone();
    let mut held: Option<Model> = None;
    let mut total_mappings = 0usize;
    for step in 0..nr_ops {
        let ctx = format!("case {case} step {step}");
        let ids: Vec<u32> = live.devs.keys().copied().collect();
        let pick = |rng: &mut StdRng| ids[rng.random_range(0..ids.len())];
        match rng.random_range(0..100) {
            0..=7 => {
                let id = rng.random_range(0..64u32);
                let r = md.create_thin(ThinId::new(id as u64).unwrap());
                if live.devs.contains_key(&id) {
                    assert!(r.is_err(), "{ctx}: create_thin {id} of an existing id");
                } else {
                    r.unwrap();
                    live.devs.insert(
                        id,
                        Dev {
                            transaction: live.trans_id,
                            creation_time: live.time,
                            snap_time: live.time,
                            ..Default::default()
                        },
                    );
                }
            }
            8..=14 if !ids.is_empty() => {
                let origin = pick(rng);
                let id = rng.random_range(0..64u32);
                let r = md.create_snap(
                    ThinId::new(id as u64).unwrap(),
                    ThinId::new(origin as u64).unwrap(),
                );
                if live.devs.contains_key(&id) {
                    assert!(r.is_err(), "{ctx}: create_snap onto existing {id}");
                } else {
                    r.unwrap();
                    live.time += 1;
                    let t = live.time;
                    let o = live.devs.get_mut(&origin).unwrap();
                    o.snap_time = t;
                    let mut d = o.clone();
                    d.transaction = live.trans_id;
                    d.creation_time = t;
                    d.snap_time = t;
                    live.devs.insert(id, d);
                }
            }
            15..=18 if !ids.is_empty() => {
                let id = pick(rng);
                md.delete_thin(ThinId::new(id as u64).unwrap()).unwrap();
                live.devs.remove(&id);
            }
            19..=60 if !ids.is_empty() => {
                // A run of writes: new mappings or remaps (copy-on-write style).
                let id = pick(rng);
                let tid = ThinId::new(id as u64).unwrap();
                let len = if rng.random_bool(0.1) {
                    rng.random_range(1..4000)
                } else {
                    rng.random_range(1..40)
                };
                let start = rng.random_range(0..50_000u64);
                for v in start..start + len {
                    if total_mappings > 100_000 {
                        break;
                    }
                    let Some(b) = md.alloc_data_block().unwrap() else {
                        break;
                    };
                    md.insert_block(tid, v, b).unwrap();
                    if live
                        .devs
                        .get_mut(&id)
                        .unwrap()
                        .map
                        .insert(v, (b, live.time))
                        .is_none()
                    {
                        total_mappings += 1;
                    }
                }
            }
            61..=72 if !ids.is_empty() => {
                let id = pick(rng);
                let tid = ThinId::new(id as u64).unwrap();
                let start = rng.random_range(0..50_000u64);
                let len = if rng.random_bool(0.2) {
                    rng.random_range(1..8000)
                } else {
                    rng.random_range(1..20)
                };
                let n = md.remove_range(tid, start, start + len).unwrap();
                let d = live.devs.get_mut(&id).unwrap();
                let keys: Vec<u64> = d.map.range(start..start + len).map(|(k, _)| *k).collect();
                for k in &keys {
                    d.map.remove(k);
                }
                assert_eq!(n, keys.len() as u64, "{ctx}: removed count");
            }
            73..=82 if !ids.is_empty() => {
                // Lookups compared with the model, including the sharing test.
                let id = pick(rng);
                let tid = ThinId::new(id as u64).unwrap();
                let d = &live.devs[&id];
                for _ in 0..20 {
                    let v = rng.random_range(0..50_000u64);
                    let got = md.find_block(tid, v).unwrap();
                    let want = d.map.get(&v);
                    assert_eq!(
                        got.map(|l| (l.data_block, l.time)),
                        want.copied(),
                        "{ctx}: find_block({id}, {v})"
                    );
                    if let (Some(l), Some((_, t))) = (got, want) {
                        assert_eq!(l.shared, d.snap_time > *t, "{ctx}: sharing of ({id}, {v})");
                    }
                }
            }
            83..=90 => {
                let new = live.trans_id + 1;
                md.set_transaction_id(live.trans_id, new).unwrap();
                live.trans_id = new;
                md.commit().unwrap();
                committed = live.clone();
                verify(&m, &md, &live, held.as_ref(), oracle, &ctx);
            }
            91..=93 => {
                if held.is_none() {
                    md.reserve_metadata_snap().unwrap();
                    committed = live.clone();
                    held = Some(live.clone());
                } else {
                    assert!(md.reserve_metadata_snap().is_err(), "{ctx}: second reserve");
                    md.release_metadata_snap().unwrap();
                    committed = live.clone();
                    held = None;
                }
                verify(&m, &md, &live, held.as_ref(), oracle, &ctx);
            }
            94..=96 => {
                // Reopen without commit: the open transaction is lost (abort).
                drop(md);
                md = ThinMetadata::open(m.dev()).unwrap();
                md.set_dirty_limit(dirty_limit);
                live = committed.clone();
                total_mappings = live.devs.values().map(|d| d.map.len()).sum();
            }
            _ => {}
        }
    }
    md.commit().unwrap();
    verify(
        &m,
        &md,
        &live,
        held.as_ref(),
        oracle,
        &format!("case {case} end"),
    );
    eprintln!(
        "case {case}: {} devices, {} mappings, time {}",
        live.devs.len(),
        live.devs.values().map(|d| d.map.len()).sum::<usize>(),
        live.time
    );
}

fn verify(
    m: &TempMeta,
    md: &ThinMetadata,
    live: &Model,
    held: Option<&Model>,
    oracle: bool,
    ctx: &str,
) {
    // Data blocks in use are exactly those some live or held mapping names.
    let mut used = BTreeSet::new();
    live.data_blocks(&mut used);
    if let Some(h) = held {
        h.data_blocks(&mut used);
    }
    assert_eq!(
        md.nr_data_blocks() - md.nr_free_data_blocks(),
        used.len() as u64,
        "{ctx}: data blocks in use"
    );
    let report = thinpool_thin::check::check(m.dev(), &Default::default(), &mut |_, _| {}).unwrap();
    assert!(
        report.errors.is_empty(),
        "{ctx}: meta check failed:\n{}",
        report.render()
    );
    if !oracle {
        return;
    }
    let (ok, out) = thin_check(&m.path);
    assert!(ok, "{ctx}: thin_check failed:\n{out}");
    let want = live.xml(md.nr_data_blocks(), md.data_block_size());
    let got = thin_dump(&m.path, &[]);
    assert!(got == want, "{ctx}: thin_dump differs from the model");
    if let Some(h) = held {
        // thin_dump -m prints the held copy's superblock fields and nr_data_blocks 0.
        let want = h.xml(0, md.data_block_size());
        let got = thin_dump(&m.path, &["-m"]);
        assert!(
            got == want,
            "{ctx}: thin_dump -m differs from the held model\n{got}\n{want}"
        );
    }
}
