//! The kill -9 soak (issue 11): `thinpool nbd serve` takes random writes of self-checking records
//! over several NBD connections, with flushes, and is killed with SIGKILL at a random moment
//! while requests are in flight; then `thin_check` runs on the metadata it left, the server is
//! started again and every sector of every volume is read back and judged against a model of
//! what the client was promised.
//!
//! - Pool: 512 MiB data, 16 MiB metadata, 64 KiB blocks (`PoolRoot`); volumes `a` and `b`
//!   (64 MiB), and from round 1 on a snapshot: after the kill of every even round the previous
//!   snapshot is removed offline (`vol rm`, so its blocks are freed and later provisioned again)
//!   and a new one is taken of `a` or `b` (`vol snapshot`), so later rounds write into shared
//!   blocks (copy-on-write) and into reused ones.
//! - Records: every 512-byte sector of every write is a record: magic, volume id, connection
//!   id, write sequence number, round, the sector's byte offset in its volume, the test seed, a
//!   payload drawn from a PRNG seeded with those fields, and an FNV-1a checksum. A sector read
//!   back is either all zero, or exactly one write's record for exactly that offset, or a
//!   failure (foreign, torn, misplaced).
//! - Workload: 6 connections (raw NBD client, up to 12 requests in flight each, replies taken
//!   out of order), spread over the volumes. Each volume is cut into 96 KiB stripes (1.5 pool
//!   blocks, so neighbouring connections share the block at a stripe edge) dealt out to that
//!   volume's connections, a new dealing each round, so a connection owns its locations and
//!   the order of the writes to a location is its order. Writes are 512 B .. 96 KiB at sector or
//!   4 KiB offsets, crossing block edges, half of them into a hot quarter of the stripes
//!   (overwrites) and half anywhere (new blocks); a connection never sends a write overlapping
//!   one of its own still in flight. About one request in 16 is a FLUSH, one write in 128 has FUA
//!   (a FUA commits the whole pool: more of them would hide a FLUSH that commits nothing).
//! - Model: a write is durable when it was acknowledged with FUA, or acknowledged before a
//!   FLUSH on the same connection was sent and that FLUSH was acknowledged (the NBD rule; the
//!   server's CAN_MULTI_CONN promises more, which this does not count on). Per sector the latest
//!   durable write is "durable" and every write after it, acknowledged or not (in flight at the
//!   kill), is "maybe". After the restart a sector must read as its durable record or one of its
//!   maybe records: never an older record, never a foreign or torn sector, zero only where no
//!   write was durable yet. A new snapshot must read sector for sector as its origin. What is
//!   read becomes the durable state of the next round (a crash cannot take back what a restart
//!   found committed), so later rounds overwrite earlier rounds' data.
//! - `thin_check` must pass on the metadata right after every kill (before the restart, and
//!   before any offline `vol` command) and at the end after a SIGTERM.
//!
//! What a kill can and cannot show: SIGKILL ends the server, not the host, so whatever it wrote
//! to the pool's files stays in the host's page cache and is read back after the restart. A
//! flush that skips the data `fsync` is therefore invisible here (that needs a power cut: the
//! kernel tests and the engine's crash tests simulate those). What the soak catches is any
//! flush that answers before the metadata commit that maps the data is on its file — an
//! acknowledged write whose mapping is lost, or a commit that maps blocks whose data was never
//! written, or that exposes freed blocks — and any crash-torn or foreign data.
//!
//! Rounds: `THINPOOL_SOAK_ROUNDS` (default 5, for CI); `scripts/kill9-soak [ROUNDS]` runs many.
//! The seed is printed; `THINPOOL_TEST_SEED` replays the same workload and kill delays (the
//! interleaving with the server's threads is up to the scheduler).

// NBD is big-endian on the wire.
#![allow(clippy::big_endian_bytes)]

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use thinpool_tests::nbd::*;
use thinpool_tests::{env_count, require_tools, run, test_seed, text, tool};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Size of every volume.
const VOL: u64 = 64 * MIB;
/// The record unit.
const SECTOR: u64 = 512;
const SECTORS: usize = (VOL / SECTOR) as usize;
/// A stripe: the unit of ownership (not a multiple of the pool block, on purpose).
const STRIPE: u64 = 96 * KIB;
const STRIPE_SECTORS: u64 = STRIPE / SECTOR;
const STRIPES: u64 = VOL / STRIPE;
/// Connections per round.
const CONNS: usize = 6;
/// Requests in flight per connection.
const WINDOW: usize = 12;
/// Reads of the verification pass.
const READ_CHUNK: u64 = MIB;
const MAGIC: [u8; 8] = *b"TPSOAK01";
/// Where the checksum sits in a sector.
const SUM_AT: usize = 504;
/// Failure messages printed in full (the rest are counted).
const SHOWN: usize = 20;

/// The write that produced a record.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Rec {
    vol: u32,
    conn: u32,
    seq: u32,
    round: u32,
}

impl std::fmt::Display for Rec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vol {} conn {} write {} (round {})",
            self.vol, self.conn, self.seq, self.round
        )
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Fill `out` (one sector) with the record of `rec` at byte `offset` of its volume.
fn encode(out: &mut [u8], rec: Rec, offset: u64, seed: u64) {
    out[0..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&rec.vol.to_le_bytes());
    out[12..16].copy_from_slice(&rec.conn.to_le_bytes());
    out[16..20].copy_from_slice(&rec.seq.to_le_bytes());
    out[20..24].copy_from_slice(&rec.round.to_le_bytes());
    out[24..32].copy_from_slice(&offset.to_le_bytes());
    out[32..40].copy_from_slice(&seed.to_le_bytes());
    let mut st = seed
        ^ u64::from(rec.vol) << 56
        ^ u64::from(rec.conn) << 32
        ^ u64::from(rec.seq)
        ^ offset.rotate_left(17);
    for w in out[40..SUM_AT].chunks_mut(8) {
        w.copy_from_slice(&splitmix(&mut st).to_le_bytes());
    }
    let sum = fnv1a(&out[..SUM_AT]);
    out[SUM_AT..SECTOR as usize].copy_from_slice(&sum.to_le_bytes());
}

/// What one sector read back holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Found {
    Zero,
    Rec(Rec),
}

/// Decode a sector read at byte `offset`: zero, a record of exactly this offset and run, or why
/// it is neither.
fn decode(b: &[u8], offset: u64, seed: u64) -> Result<Found, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(Found::Zero);
    }
    if b[0..8] != MAGIC {
        return Err(format!("foreign data (starts {:02x?})", &b[0..16]));
    }
    if le64(b, SUM_AT) != fnv1a(&b[..SUM_AT]) {
        return Err("torn record (checksum mismatch)".into());
    }
    let rec = Rec {
        vol: le32(b, 8),
        conn: le32(b, 12),
        seq: le32(b, 16),
        round: le32(b, 20),
    };
    if le64(b, 32) != seed {
        return Err(format!("record of another run (seed {})", le64(b, 32)));
    }
    let at = le64(b, 24);
    if at != offset {
        return Err(format!("misplaced record: {rec} written at offset {at}"));
    }
    let mut want = [0u8; SECTOR as usize];
    encode(&mut want, rec, offset, seed);
    if want[..] != b[..] {
        return Err(format!("record of {rec} with a wrong payload"));
    }
    Ok(Found::Rec(rec))
}

/// What the client was promised about one sector.
#[derive(Clone, Default)]
struct Loc {
    /// The latest durable record (`None`: nothing durable, zero allowed).
    durable: Option<Rec>,
    /// The writes issued after it, in order: each may or may not have survived.
    maybe: Vec<Rec>,
}

/// One volume as the model sees it.
#[derive(Clone)]
struct VolModel {
    name: String,
    id: u32,
    locs: Vec<Loc>,
    /// What the last verification read (all zero at first).
    last: Vec<Option<Rec>>,
}

/// What a connection is told to do.
struct Plan {
    conn: u32,
    vol: u32,
    round: u32,
    seed: u64,
    rng_seed: u64,
    stripes: Vec<u64>,
}

/// One write as a connection issued it.
struct WriteLog {
    seq: u32,
    offset: u64,
    len: u64,
    fua: bool,
    /// The event number of its acknowledgement.
    acked: Option<u64>,
}

/// What a connection did until the server died.
#[derive(Default)]
struct ConnLog {
    conn: u32,
    vol: u32,
    round: u32,
    writes: Vec<WriteLog>,
    flushes_sent: u64,
    flushes_acked: u64,
    /// The largest send event of an acknowledged FLUSH: writes acknowledged before it are durable.
    cover: u64,
    /// Error replies and protocol violations before the kill.
    errors: Vec<String>,
}

enum Pending {
    Write(usize),
    Flush(u64),
}

/// Write and flush over `c` until the connection dies (the kill).
fn drive(mut c: RawClient, p: &Plan) -> ConnLog {
    let mut rng = StdRng::seed_from_u64(p.rng_seed);
    let mut log = ConnLog {
        conn: p.conn,
        vol: p.vol,
        round: p.round,
        ..ConnLog::default()
    };
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut ev = 0u64;
    let mut cookie = 0u64;
    let hot = (p.stripes.len() / 4).max(1);
    let mut buf = Vec::new();
    loop {
        if pending.len() >= WINDOW {
            if !receive(&mut c, &mut pending, &mut log, &mut ev) {
                break;
            }
            continue;
        }
        cookie += 1;
        buf.clear();
        if rng.random_range(0..16) == 0 {
            ev += 1;
            pending.insert(cookie, Pending::Flush(ev));
            log.flushes_sent += 1;
            buf.extend_from_slice(&request_header(REQUEST_MAGIC, CMD_FLUSH, 0, cookie, 0, 0));
        } else {
            let stripe = if rng.random_bool(0.5) {
                p.stripes[rng.random_range(0..hot)]
            } else {
                p.stripes[rng.random_range(0..p.stripes.len())]
            };
            let (off, len) = match rng.random_range(0..20) {
                0..8 => {
                    let len = rng.random_range(1..=8u64);
                    (rng.random_range(0..=STRIPE_SECTORS - len), len)
                }
                8..15 => {
                    let len = 8 * rng.random_range(1..=16u64);
                    (8 * rng.random_range(0..=(STRIPE_SECTORS - len) / 8), len)
                }
                _ => {
                    let len = rng.random_range(64..=STRIPE_SECTORS);
                    (rng.random_range(0..=STRIPE_SECTORS - len), len)
                }
            };
            let offset = stripe * STRIPE + off * SECTOR;
            let len = len * SECTOR;
            let overlaps = pending.values().any(|q| match q {
                Pending::Write(i) => {
                    let w = &log.writes[*i];
                    w.offset < offset + len && offset < w.offset + w.len
                }
                Pending::Flush(_) => false,
            });
            if overlaps {
                // Wait for a reply rather than reorder writes to one location.
                if !receive(&mut c, &mut pending, &mut log, &mut ev) {
                    break;
                }
                continue;
            }
            let seq = log.writes.len() as u32 + 1;
            let fua = rng.random_range(0..128) == 0;
            let rec = Rec {
                vol: p.vol,
                conn: p.conn,
                seq,
                round: p.round,
            };
            buf.extend_from_slice(&request_header(
                REQUEST_MAGIC,
                CMD_WRITE,
                if fua { 1 } else { 0 },
                cookie,
                offset,
                len as u32,
            ));
            let start = buf.len();
            buf.resize(start + len as usize, 0);
            for (k, s) in buf[start..].chunks_mut(SECTOR as usize).enumerate() {
                encode(s, rec, offset + k as u64 * SECTOR, p.seed);
            }
            ev += 1;
            pending.insert(cookie, Pending::Write(log.writes.len()));
            log.writes.push(WriteLog {
                seq,
                offset,
                len,
                fua,
                acked: None,
            });
        }
        // Counted as issued whether or not the send completes: a write cut short by the kill
        // is a "maybe".
        if c.s.write_all(&buf).is_err() {
            break;
        }
    }
    log
}

/// Read one reply; false once the connection is gone.
fn receive(
    c: &mut RawClient,
    pending: &mut HashMap<u64, Pending>,
    log: &mut ConnLog,
    ev: &mut u64,
) -> bool {
    let mut h = [0u8; 16];
    if c.s.read_exact(&mut h).is_err() {
        return false;
    }
    let (magic, err, cookie) = (u32_at(&h, 0), u32_at(&h, 4), u64_at(&h, 8));
    if magic != SIMPLE_REPLY_MAGIC {
        log.errors.push(format!("reply with magic {magic:#x}"));
        return false;
    }
    *ev += 1;
    match pending.remove(&cookie) {
        None => {
            log.errors
                .push(format!("reply to unknown cookie {cookie} (error {err})"));
            false
        }
        Some(_) if err != 0 => {
            log.errors
                .push(format!("error {err} in the reply to request {cookie}"));
            true
        }
        Some(Pending::Write(i)) => {
            log.writes[i].acked = Some(*ev);
            true
        }
        Some(Pending::Flush(sent)) => {
            log.flushes_acked += 1;
            log.cover = log.cover.max(sent);
            true
        }
    }
}

#[derive(Default)]
struct Stats {
    rounds: usize,
    issued: u64,
    acked: u64,
    in_flight_at_kill: u64,
    fua: u64,
    flushes_sent: u64,
    flushes_acked: u64,
    sectors_read: u64,
    durable_verified: u64,
    maybe_new: u64,
    maybe_old: u64,
    never_written_zero: u64,
    /// Pool-block-sized pieces of volumes that held no record before a round and do after it.
    blocks_new: u64,
    /// Pieces that held records before a round and hold other ones after it (overwritten).
    blocks_rewritten: u64,
    snapshots: u64,
    lost: u64,
}

/// Failures, with the first few in full.
#[derive(Default)]
struct Failures {
    shown: Vec<String>,
    count: u64,
}

impl Failures {
    fn add(&mut self, msg: String) {
        self.count += 1;
        if self.shown.len() < SHOWN {
            eprintln!("FAIL {msg}");
            self.shown.push(msg);
        }
    }
}

/// `thin_check` on the pool's metadata.
fn thin_check(r: &PoolRoot, when: &str, fails: &mut Failures) {
    let out = run(tool("thin_check").arg(r.metadata()));
    if !out.status.success() {
        fails.add(format!(
            "thin_check {when}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        ));
    }
}

/// Fold what the connections did into the model.
fn apply(logs: &[ConnLog], vols: &mut [VolModel], st: &mut Stats, fails: &mut Failures) {
    for l in logs {
        for e in &l.errors {
            fails.add(format!("round {} conn {}: {e}", l.round, l.conn));
        }
        st.flushes_sent += l.flushes_sent;
        st.flushes_acked += l.flushes_acked;
        let v = vols
            .iter_mut()
            .find(|v| v.id == l.vol)
            .expect("a connection writes a known volume");
        for w in &l.writes {
            st.issued += 1;
            st.fua += u64::from(w.fua);
            match w.acked {
                Some(_) => st.acked += 1,
                None => st.in_flight_at_kill += 1,
            }
            let durable = w.acked.is_some_and(|a| w.fua || a < l.cover);
            let rec = Rec {
                vol: l.vol,
                conn: l.conn,
                seq: w.seq,
                round: l.round,
            };
            let first = (w.offset / SECTOR) as usize;
            for loc in &mut v.locs[first..first + (w.len / SECTOR) as usize] {
                if durable {
                    loc.durable = Some(rec);
                    loc.maybe.clear();
                } else {
                    loc.maybe.push(rec);
                }
            }
        }
    }
}

/// Read volume `v` back and judge every sector; the model becomes what was read. With
/// `same_as`, every sector must also read as in that image (a new snapshot and its origin).
/// Returns what was read.
fn verify(
    c: &mut RawClient,
    v: &mut VolModel,
    round: usize,
    seed: u64,
    same_as: Option<&[Found]>,
    st: &mut Stats,
    fails: &mut Failures,
) -> Vec<Found> {
    let mut image = Vec::with_capacity(SECTORS);
    // Of the current pool-block-sized piece: (held a record before, holds one now, changed).
    let mut block = (false, false, false);
    let mut at = 0u64;
    while at < VOL {
        c.request(CMD_READ, 0, at, at, READ_CHUNK as u32, &[]);
        let (err, cookie) = c.simple_reply();
        assert_eq!(
            (err, cookie),
            (0, at),
            "reading {} at {at} after the restart",
            v.name
        );
        let data = c.read_n(READ_CHUNK as usize);
        for (k, b) in data.chunks(SECTOR as usize).enumerate() {
            let offset = at + k as u64 * SECTOR;
            let i = (offset / SECTOR) as usize;
            let loc = &mut v.locs[i];
            let what = format!(
                "round {round}: {} (vol {}) offset {offset} (block {}, sector {})",
                v.name,
                v.id,
                offset / BS,
                (offset % BS) / SECTOR
            );
            st.sectors_read += 1;
            let found = match decode(b, offset, seed) {
                Ok(f) => f,
                Err(why) => {
                    st.lost += 1;
                    fails.add(format!(
                        "{what}: {why}; durable {:?}, maybe {:?}",
                        loc.durable, loc.maybe
                    ));
                    image.push(Found::Zero);
                    continue;
                }
            };
            image.push(found);
            if let Some(other) = same_as
                && other[i] != found
            {
                st.lost += 1;
                fails.add(format!(
                    "{what}: the snapshot reads {found:?}, its origin {:?}",
                    other[i]
                ));
            }
            let now = match found {
                Found::Zero => None,
                Found::Rec(r) => Some(r),
            };
            if now == loc.durable {
                if loc.maybe.is_empty() {
                    if loc.durable.is_some() {
                        st.durable_verified += 1;
                    } else {
                        st.never_written_zero += 1;
                    }
                } else {
                    st.maybe_old += 1;
                    st.durable_verified += u64::from(loc.durable.is_some());
                }
            } else if now.is_some_and(|r| loc.maybe.contains(&r)) {
                st.maybe_new += 1;
                st.durable_verified += u64::from(loc.durable.is_some());
            } else {
                st.lost += 1;
                let desc = match now {
                    None => "zero".to_string(),
                    Some(r) => format!("the record of {r}"),
                };
                fails.add(format!(
                    "{what}: reads {desc}, but durable is {} and maybe {:?}",
                    loc.durable
                        .map_or_else(|| "nothing".to_string(), |r| r.to_string()),
                    loc.maybe
                ));
            }
            block.0 |= v.last[i].is_some();
            block.1 |= now.is_some();
            block.2 |= now != v.last[i];
            v.last[i] = now;
            if (i as u64 + 1).is_multiple_of(BS / SECTOR) {
                match block {
                    (false, true, _) => st.blocks_new += 1,
                    (true, _, true) => st.blocks_rewritten += 1,
                    _ => {}
                }
                block = (false, false, false);
            }
            loc.durable = now;
            loc.maybe.clear();
        }
        at += READ_CHUNK;
    }
    image
}

#[test]
fn kill9_soak() {
    if !require_tools(&["thin_check"]) {
        return;
    }
    let seed = test_seed();
    let rounds = env_count("THINPOOL_SOAK_ROUNDS", 5);
    let mut rng = StdRng::seed_from_u64(seed);
    let r = PoolRoot::new(&[("a", "64M"), ("b", "64M")]);
    // After the pool is made, so the (re)build of the binary is not counted.
    let started = Instant::now();
    let mut vols = vec![
        VolModel {
            name: "a".into(),
            id: 1,
            locs: vec![Loc::default(); SECTORS],
            last: vec![None; SECTORS],
        },
        VolModel {
            name: "b".into(),
            id: 2,
            locs: vec![Loc::default(); SECTORS],
            last: vec![None; SECTORS],
        },
    ];
    let mut st = Stats::default();
    let mut fails = Failures::default();
    let mut srv = r.serve(&[]);
    let mut next_conn = 1u32;
    for round in 0..rounds {
        st.rounds += 1;
        let sock = srv.socket.clone().expect("unix socket");
        // Deal the stripes of each volume to its connections, afresh each round.
        let nv = vols.len();
        let peers_of = |v: usize| CONNS / nv + usize::from(v < CONNS % nv);
        let turns: Vec<usize> = (0..nv).map(|v| rng.random_range(0..peers_of(v))).collect();
        let mut plans = Vec::new();
        for k in 0..CONNS {
            let v = &vols[k % nv];
            let (peers, slot, turn) = (peers_of(k % nv), k / nv, turns[k % nv]);
            let mut stripes: Vec<u64> = (0..STRIPES)
                .filter(|s| (*s as usize + turn) % peers == slot)
                .collect();
            // A random hot quarter: the first stripes after a shuffle.
            for i in (1..stripes.len()).rev() {
                stripes.swap(i, rng.random_range(0..=i));
            }
            plans.push((
                v.name.clone(),
                Plan {
                    conn: next_conn,
                    vol: v.id,
                    round: round as u32,
                    seed,
                    rng_seed: rng.random(),
                    stripes,
                },
            ));
            next_conn += 1;
        }
        let clients: Vec<RawClient> = plans
            .iter()
            .map(|(name, _)| {
                let mut c = RawClient::connect(&sock, 3);
                c.go(name);
                c
            })
            .collect();
        let delay = Duration::from_millis(rng.random_range(150..1200));
        let logs: Vec<ConnLog> = std::thread::scope(|s| {
            let handles: Vec<_> = clients
                .into_iter()
                .zip(&plans)
                .map(|(c, (_, p))| s.spawn(move || drive(c, p)))
                .collect();
            std::thread::sleep(delay);
            srv.crash();
            handles
                .into_iter()
                .map(|h| h.join().expect("a connection thread panicked"))
                .collect()
        });
        let before = (st.issued, st.acked, st.in_flight_at_kill);
        apply(&logs, &mut vols, &mut st, &mut fails);
        thin_check(&r, &format!("after the kill of round {round}"), &mut fails);
        // Every other round: drop the snapshot and take a new one, offline.
        let mut new_snap = None;
        if round % 2 == 0 {
            if vols.len() == 3 {
                let old = vols.pop().expect("a snapshot");
                r.ok(&["vol", "rm", &old.name]);
            }
            let origin = (round / 2) % 2;
            let mut snap = vols[origin].clone();
            st.snapshots += 1;
            snap.id = 2 + st.snapshots as u32;
            snap.name = format!("snap{}", st.snapshots);
            r.ok(&["vol", "snapshot", &vols[origin].name, &snap.name]);
            vols.push(snap);
            new_snap = Some(origin);
        }
        srv = r.serve(&[]);
        let sock = srv.socket.clone().expect("unix socket");
        let mut images: Vec<Vec<Found>> = Vec::new();
        for i in 0..vols.len() {
            let same_as = match new_snap {
                Some(o) if i == vols.len() - 1 => Some(images[o].as_slice()),
                _ => None,
            };
            let mut c = RawClient::connect(&sock, 3);
            c.go(&vols[i].name);
            let image = verify(
                &mut c,
                &mut vols[i],
                round,
                seed,
                same_as,
                &mut st,
                &mut fails,
            );
            c.request(CMD_DISC, 0, 0, 0, 0, &[]);
            images.push(image);
        }
        eprintln!(
            "round {round}: killed after {} ms: {} writes issued, {} acknowledged, {} in flight; \
             volumes {}; {:.1} s so far",
            delay.as_millis(),
            st.issued - before.0,
            st.acked - before.1,
            st.in_flight_at_kill - before.2,
            vols.iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            started.elapsed().as_secs_f64()
        );
        if fails.count > 0 {
            eprintln!("stopping after round {round}: {} failure(s)", fails.count);
            break;
        }
    }
    if fails.count == 0 {
        srv.stop();
        thin_check(&r, "at the end", &mut fails);
    } else {
        drop(srv);
    }
    eprintln!(
        "soak: {} rounds (seed {seed}), {:.1} s: writes issued {}, acknowledged {} (FUA {}), in \
         flight at the kills {}; flushes sent {}, acknowledged {}; snapshots {}; sectors read \
         back {}: flushed-durable verified {}, maybe new {} / old {}, never written (zero) {}; \
         64 KiB pieces newly written {}, overwritten {}; lost {}",
        st.rounds,
        started.elapsed().as_secs_f64(),
        st.issued,
        st.acked,
        st.fua,
        st.in_flight_at_kill,
        st.flushes_sent,
        st.flushes_acked,
        st.snapshots,
        st.sectors_read,
        st.durable_verified,
        st.maybe_new,
        st.maybe_old,
        st.never_written_zero,
        st.blocks_new,
        st.blocks_rewritten,
        st.lost
    );
    assert!(
        fails.count == 0,
        "{} failure(s) (seed {seed}, replay with THINPOOL_TEST_SEED={seed}); the first:\n{}",
        fails.count,
        fails.shown[..fails.shown.len().min(5)].join("\n")
    );
    assert!(
        st.acked > 0 && st.flushes_acked > 0 && st.durable_verified > 0,
        "the soak wrote or flushed nothing: it checked nothing"
    );
}
