//! `volumes.json`: what the kernel's metadata does not keep — names, virtual sizes, parents,
//! kinds (design: "The pool on disk").
//!
//! Written atomically (temp file, fsync, rename, fsync of the directory) and tagged with the
//! metadata transaction id it describes. Every operation writes the catalog *before* the
//! metadata commit that makes it real, so that after a crash the pool's `reconcile` can tell an
//! operation half done and roll it forward or back.
//!
//! A large catalog (from [`JOURNAL_FROM`] volumes) is not rewritten whole per change: the
//! change (entries set, names dropped, the new transaction id) is appended as one line to
//! `volumes.journal` and fdatasynced, the same hand-over in one step (issue 16). The journal's
//! first line names the `volumes.json` it continues (a number that file carries as `journal`);
//! loading replays its records over that file, ignores a journal naming another file (one
//! restored from a backup or replaced) and a last line cut short (an append a crash
//! interrupted, so before the commit it preceded), and refuses a bad line with records after
//! it. Once the journal outgrows the whole file, the next save writes the file whole with a
//! new number and starts an empty journal (made after the rename, so a crash in between
//! leaves only an ignored journal); so does the first save after a load, and any save after a
//! failed append. Below the threshold `volumes.json` alone is the catalog, as it always was.
//!
//! **The metadata is the truth for mappings; the catalog is a cache of names and sizes.** It
//! may be older than the metadata (restored from a backup, or the kernel changed the pool), or
//! missing. So nothing the catalog says removes a mapping, except a recorded intent:
//!
//! - an entry marked `removing`: a removal that may or may not have committed → the device is
//!   deleted if still there, the entry dropped;
//! - an entry with `shrinking` (the transaction id the shrink was recorded at): a shrink that
//!   may not have committed → the mappings past the size are removed, the mark cleared.
//!
//! Everything else only adds to the catalog or drops entries that own nothing:
//!
//! - an entry whose thin device is not in the metadata: a create/snapshot that never committed
//!   (the catalog is ahead of the metadata's transaction id), or a device deleted outside
//!   thinpool → dropped;
//! - an entry whose device maps blocks past its size (the kernel grew the device by reloading
//!   a longer table, or the catalog is older than a `vol resize`) → the size grows to cover
//!   them;
//! - a thin device with no entry (a pool made by the kernel or another tool, or a lost
//!   catalog) → adopted as `thin-<id>`, sized to cover its highest mapping.
//!
//! A catalog that names a volume twice, gives two volumes one thin id, or holds an invalid
//! name is refused before anything is written.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Whether a volume was created empty or as a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    /// An empty thin volume.
    Thin,
    /// A snapshot of another volume.
    Snapshot,
}

/// One volume in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub name: String,
    pub thin_id: u32,
    pub size: u64,
    pub kind: VolumeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub created: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removing: bool,
    /// A shrink to `size` recorded at this transaction id and maybe not committed yet: the
    /// mappings past `size` are to be removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shrinking: Option<u64>,
    /// Free-form labels of the volume's owner (the layer store keeps its snapshot records
    /// here, so they change in the same atomic write as the volume itself).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CatalogFile {
    version: u32,
    transaction_id: u64,
    /// The journal that continues this file (`volumes.journal` whose header carries the same
    /// number); 0: none, the file is the whole catalog.
    #[serde(default, skip_serializing_if = "is_zero")]
    journal: u64,
    volumes: Vec<Entry>,
}

/// `a == b` for two entries of one name, the cheap fields first.
fn same_entry(a: &Entry, b: &Entry) -> bool {
    a.thin_id == b.thin_id
        && a.size == b.size
        && a.created == b.created
        && a.removing == b.removing
        && a.shrinking == b.shrinking
        && a.kind == b.kind
        && a.parent == b.parent
        && a.labels == b.labels
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The first line of `volumes.journal`: which `volumes.json` it continues.
#[derive(Debug, Serialize, Deserialize)]
struct JournalHeader {
    journal: u64,
}

/// One line of `volumes.journal`: one save, applied in order over `volumes.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct JournalRecord {
    transaction_id: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    set: Vec<Entry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    drop: Vec<String>,
}

/// From this many volumes on, a save appends the change to the journal instead of rewriting
/// `volumes.json` whole (issue 16: 1.4 MB written and fsynced per operation at 10 000 volumes).
/// Below it the file alone is the catalog, as it always was, easy to read, edit or back up.
pub(crate) const JOURNAL_FROM: usize = 1024;

/// The journal, open for appending, continuing the `volumes.json` on disk.
#[derive(Debug)]
struct Journal {
    file: std::fs::File,
    /// Bytes in the file.
    len: u64,
}

/// The catalog in memory, with its file.
#[derive(Debug)]
pub(crate) struct Catalog {
    path: PathBuf,
    pub transaction_id: u64,
    pub volumes: BTreeMap<String, Entry>,
    /// What is on disk (`volumes.json` plus the journal): a save writes the difference.
    saved: BTreeMap<String, Entry>,
    saved_transaction_id: u64,
    /// `None`: the next save rewrites `volumes.json` whole (and starts a new journal when the
    /// catalog is large).
    journal: Option<Journal>,
    /// Size of the last whole write: the journal is folded back in once it grows past it.
    whole_len: u64,
    /// See [`JOURNAL_FROM`] ([`PoolOptions::catalog_journal_from`](crate::PoolOptions)).
    pub journal_from: usize,
}

impl Catalog {
    /// Path of the catalog in a pool root.
    pub fn path_in(root: &Path) -> PathBuf {
        root.join("volumes.json")
    }

    /// Path of the catalog's journal in a pool root.
    pub fn journal_path_in(root: &Path) -> PathBuf {
        root.join("volumes.journal")
    }

    fn journal_path(&self) -> PathBuf {
        self.path.with_file_name("volumes.journal")
    }

    /// An empty catalog (not yet written).
    pub fn new(root: &Path, transaction_id: u64) -> Self {
        Catalog {
            path: Self::path_in(root),
            transaction_id,
            volumes: BTreeMap::new(),
            saved: BTreeMap::new(),
            saved_transaction_id: transaction_id,
            journal: None,
            whole_len: 0,
            journal_from: JOURNAL_FROM,
        }
    }

    /// Load the catalog: `volumes.json`, then the records of the journal that continues it
    /// (one whose header names another `volumes.json` — a file restored or replaced — is
    /// ignored). A missing file is an empty catalog. A last journal line cut short (a crash
    /// while it was appended, so before the metadata commit it preceded) is ignored; a bad line
    /// before another is refused.
    pub fn load(root: &Path) -> Result<Self> {
        let path = Self::path_in(root);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Catalog::new(root, 0));
            }
            Err(source) => {
                return Err(Error::File {
                    what: "reading",
                    path,
                    source,
                });
            }
        };
        let file: CatalogFile = serde_json::from_slice(&text).map_err(|e| Error::Catalog {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if file.version != 1 {
            return Err(Error::Catalog {
                path,
                message: format!("unknown version {}", file.version),
            });
        }
        let refuse = |message: String| Error::Catalog {
            path: path.clone(),
            message,
        };
        let mut volumes: BTreeMap<String, Entry> = BTreeMap::new();
        for e in file.volumes {
            if volumes.contains_key(&e.name) {
                return Err(refuse(format!("the volume name {} appears twice", e.name)));
            }
            volumes.insert(e.name.clone(), e);
        }
        let mut transaction_id = file.transaction_id;
        if file.journal != 0 {
            let jpath = Self::journal_path_in(root);
            match std::fs::read(&jpath) {
                Ok(j) => {
                    if let Some(tid) = replay(&jpath, &j, file.journal, &mut volumes)? {
                        transaction_id = tid;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::File {
                        what: "reading",
                        path: jpath,
                        source,
                    });
                }
            }
        }
        let mut ids: BTreeMap<u32, &str> = BTreeMap::new();
        for e in volumes.values() {
            check_name(&e.name).map_err(|err| refuse(err.to_string()))?;
            if e.thin_id > thinpool_thin::ThinId::MAX {
                return Err(refuse(format!(
                    "volume {}: thin id {} is not below 2^24",
                    e.name, e.thin_id
                )));
            }
            if let Some(other) = ids.insert(e.thin_id, &e.name) {
                return Err(refuse(format!(
                    "volumes {other} and {} both claim thin device {}: fix or remove the file \
                     (the metadata keeps the mappings; a lost catalog only loses names)",
                    e.name, e.thin_id
                )));
            }
        }
        Ok(Catalog {
            path,
            transaction_id,
            saved: volumes.clone(),
            volumes,
            saved_transaction_id: transaction_id,
            journal: None,
            whole_len: text.len() as u64,
            journal_from: JOURNAL_FROM,
        })
    }

    /// Write what changed since the last save, durably, before returning: appended to the
    /// journal (one fdatasync) for a large catalog, else (or when the journal has grown past
    /// the whole file, or a write to it failed) the whole catalog atomically. Either way the
    /// catalog on disk moves from the old state to the new one in one step.
    pub fn save(&mut self) -> Result<()> {
        let Some(len) = self.journal.as_ref().map(|j| j.len) else {
            return self.save_whole();
        };
        if self.volumes.len() < self.journal_from || len > self.whole_len.max(64 << 10) {
            return self.save_whole();
        }
        let mut rec = JournalRecord {
            transaction_id: self.transaction_id,
            ..Default::default()
        };
        // Both maps are sorted by name: one merge walk, no lookups (O(n) at 10 000 volumes
        // with a small constant; the lookups per entry cost more than the save's write).
        let (mut cur, mut old) = (
            self.volumes.values().peekable(),
            self.saved.values().peekable(),
        );
        loop {
            match (cur.peek(), old.peek()) {
                (None, None) => break,
                (Some(c), Some(o)) if c.name == o.name => {
                    if !same_entry(c, o) {
                        rec.set.push((*c).clone());
                    }
                    cur.next();
                    old.next();
                }
                (Some(c), o) if o.is_none_or(|o| c.name < o.name) => {
                    rec.set.push((*c).clone());
                    cur.next();
                }
                (_, o) => {
                    rec.drop.extend(o.map(|o| o.name.clone()));
                    old.next();
                }
            }
        }
        if rec.set.is_empty()
            && rec.drop.is_empty()
            && rec.transaction_id == self.saved_transaction_id
        {
            return Ok(());
        }
        let mut line = serde_json::to_vec(&rec).expect("journal record serializes");
        line.push(b'\n');
        let jpath = self.journal_path();
        let journal = self.journal.as_mut().expect("journal checked above");
        let r = journal
            .file
            .write_all(&line)
            .map_err(|source| Error::File {
                what: "appending to",
                path: jpath.clone(),
                source,
            })
            .and_then(|()| {
                journal.file.sync_data().map_err(|source| Error::File {
                    what: "syncing",
                    path: jpath.clone(),
                    source,
                })
            });
        if let Err(err) = r {
            // What reached the file is unknown: the next save writes the catalog whole.
            self.journal = None;
            return Err(err);
        }
        journal.len += line.len() as u64;
        for e in rec.set {
            self.saved.insert(e.name.clone(), e);
        }
        for n in rec.drop {
            self.saved.remove(&n);
        }
        self.saved_transaction_id = self.transaction_id;
        Ok(())
    }

    /// Write the catalog whole, atomically and durably; a large one gets a new, empty journal
    /// (made after the file names it, so that a crash in between leaves the old journal, whose
    /// header no longer matches, ignored).
    fn save_whole(&mut self) -> Result<()> {
        self.journal = None;
        let nonce = if self.volumes.len() >= self.journal_from {
            new_nonce()
        } else {
            0
        };
        let file = CatalogFile {
            version: 1,
            transaction_id: self.transaction_id,
            journal: nonce,
            volumes: self.volumes.values().cloned().collect(),
        };
        let mut text = serde_json::to_vec_pretty(&file).expect("catalog serializes");
        text.push(b'\n');
        write_atomic(&self.path, &text)?;
        self.whole_len = text.len() as u64;
        self.saved = self.volumes.clone();
        self.saved_transaction_id = self.transaction_id;
        let jpath = self.journal_path();
        if nonce == 0 {
            // Ignored now (the file names no journal); removed so it does not mislead.
            let _ = std::fs::remove_file(&jpath);
            return Ok(());
        }
        let mut header = serde_json::to_vec(&JournalHeader { journal: nonce })
            .expect("journal header serializes");
        header.push(b'\n');
        // A failure here leaves the catalog saved (whole); the next save tries again.
        if write_atomic(&jpath, &header).is_ok()
            && let Ok(file) = std::fs::OpenOptions::new().append(true).open(&jpath)
        {
            self.journal = Some(Journal {
                file,
                len: header.len() as u64,
            });
        }
        Ok(())
    }

    /// Number of volumes of each kind (thin, snapshot).
    pub fn counts(&self) -> (usize, usize) {
        let snaps = self
            .volumes
            .values()
            .filter(|e| e.kind == VolumeKind::Snapshot)
            .count();
        (self.volumes.len() - snaps, snaps)
    }
}

/// Check a volume name: 1..=128 bytes of letters, digits, `-`, `_`, `.`, not starting with `.`.
pub(crate) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid volume name {name:?}: use 1 to 128 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

/// Seconds since the epoch.
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Apply the journal's records to the volumes of the `volumes.json` numbered `nonce`; the last
/// record's transaction id, if any record applies.
fn replay(
    path: &Path,
    text: &[u8],
    nonce: u64,
    volumes: &mut BTreeMap<String, Entry>,
) -> Result<Option<u64>> {
    let mut lines = text.split_inclusive(|&b| b == b'\n').enumerate();
    let header = lines
        .next()
        .and_then(|(_, l)| serde_json::from_slice::<JournalHeader>(l).ok());
    if header.is_none_or(|h| h.journal != nonce) {
        return Ok(None); // another file's journal, or its header cut short: nothing of ours
    }
    let mut tid = None;
    for (i, line) in lines {
        let rec = match serde_json::from_slice::<JournalRecord>(line) {
            Ok(r) if line.ends_with(b"\n") => r,
            // The last line, without its newline: its append was cut, never confirmed.
            Ok(_) => break,
            // The last line cut short (or the zeros of a file extended but not written).
            Err(_) if text_is_blank(&text[line_end(text, line)..]) => break,
            Err(e) => {
                return Err(Error::Catalog {
                    path: path.to_path_buf(),
                    message: format!(
                        "line {}: {e} (and records follow it): move it away to open the pool \
                         with volumes.json alone (names and sizes changed since are rebuilt \
                         from the metadata as thin-<id>; no mapping is lost)",
                        i + 1
                    ),
                });
            }
        };
        for e in rec.set {
            volumes.insert(e.name.clone(), e);
        }
        for n in rec.drop {
            volumes.remove(&n);
        }
        tid = Some(rec.transaction_id);
    }
    Ok(tid)
}

/// Offset just past `line`, a slice of `text`.
fn line_end(text: &[u8], line: &[u8]) -> usize {
    line.as_ptr() as usize - text.as_ptr() as usize + line.len()
}

fn text_is_blank(rest: &[u8]) -> bool {
    rest.iter().all(|&b| b == 0 || b.is_ascii_whitespace())
}

/// A number naming one whole write of `volumes.json` and its journal (never 0).
fn new_nonce() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = t ^ (u64::from(std::process::id()) << 32) ^ COUNT.fetch_add(1, Ordering::Relaxed);
    n.max(1)
}

/// Write `path` atomically and durably: temp file, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, text: &[u8]) -> Result<()> {
    let tmp = path.with_extension(match path.extension() {
        Some(e) => format!("{}.tmp", e.to_string_lossy()),
        None => "tmp".to_string(),
    });
    let io = |what, source| Error::File {
        what,
        path: tmp.clone(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(crate::private::FILE_MODE)
        .open(&tmp)
        .map_err(|e| io("creating", e))?;
    f.write_all(text).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|source| Error::File {
        what: "renaming into place",
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, thin_id: u32) -> Entry {
        Entry {
            name: name.to_string(),
            thin_id,
            size: 1 << 30,
            kind: VolumeKind::Thin,
            parent: None,
            created: 1,
            removing: false,
            shrinking: None,
            labels: BTreeMap::new(),
        }
    }

    /// A catalog of `n` volumes journaled from 4 volumes on, saved whole once.
    fn journaled(root: &Path, n: u32) -> Catalog {
        let mut c = Catalog::new(root, 1);
        c.journal_from = 4;
        for i in 0..n {
            c.volumes
                .insert(format!("v{i}"), entry(&format!("v{i}"), i));
        }
        c.save().unwrap();
        c
    }

    fn load(root: &Path) -> Catalog {
        Catalog::load(root).unwrap()
    }

    #[test]
    fn changes_go_to_the_journal_and_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut c = journaled(root, 8);
        let whole = std::fs::read(Catalog::path_in(root)).unwrap();
        assert!(c.journal.is_some(), "8 volumes ≥ 4: journaled");
        c.volumes.insert("new".into(), entry("new", 100));
        c.transaction_id = 2;
        c.save().unwrap();
        c.volumes.get_mut("v1").unwrap().removing = true;
        c.transaction_id = 3;
        c.save().unwrap();
        c.volumes.remove("v1");
        c.volumes.get_mut("new").unwrap().size = 5 << 30;
        c.save().unwrap();
        assert_eq!(
            std::fs::read(Catalog::path_in(root)).unwrap(),
            whole,
            "volumes.json is not rewritten"
        );
        let j = std::fs::read_to_string(Catalog::journal_path_in(root)).unwrap();
        assert_eq!(j.lines().count(), 4, "header and three records:\n{j}");
        let l = load(root);
        assert_eq!(l.volumes, c.volumes);
        assert_eq!(l.transaction_id, 3);
        // No change: nothing written.
        let mut l = l;
        l.journal_from = 4;
        l.save().unwrap(); // first save after a load: whole
        let len = std::fs::metadata(Catalog::journal_path_in(root))
            .unwrap()
            .len();
        l.save().unwrap();
        assert_eq!(
            std::fs::metadata(Catalog::journal_path_in(root))
                .unwrap()
                .len(),
            len
        );
    }

    #[test]
    fn a_torn_last_record_is_ignored_a_bad_middle_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut c = journaled(root, 6);
        c.volumes.insert("a".into(), entry("a", 50));
        c.transaction_id = 2;
        c.save().unwrap();
        let before = c.volumes.clone();
        c.volumes.insert("b".into(), entry("b", 51));
        c.transaction_id = 3;
        c.save().unwrap();
        let jp = Catalog::journal_path_in(root);
        let full = std::fs::read(&jp).unwrap();
        // Cut inside the last record, then the same followed by zeros (an extended file).
        for tail in [&b""[..], &[0u8; 300][..]] {
            let mut t = full[..full.len() - 20].to_vec();
            t.extend_from_slice(tail);
            std::fs::write(&jp, &t).unwrap();
            let l = load(root);
            assert_eq!(l.volumes, before, "the torn record is not applied");
            assert_eq!(l.transaction_id, 2);
        }
        // The complete record without its newline: not confirmed, not applied.
        std::fs::write(&jp, &full[..full.len() - 1]).unwrap();
        assert_eq!(load(root).volumes, before);
        // Damage in the middle, with a record after it.
        let mut t = full.clone();
        let second = t.iter().position(|&b| b == b'\n').unwrap() + 5;
        t[second] = b'#';
        std::fs::write(&jp, &t).unwrap();
        let err = Catalog::load(root).unwrap_err().to_string();
        assert!(
            err.contains("volumes.journal") && err.contains("line 2"),
            "{err}"
        );
    }

    #[test]
    fn a_journal_of_another_catalog_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut c = journaled(root, 5);
        let old = std::fs::read(Catalog::path_in(root)).unwrap();
        let old_volumes = c.volumes.clone();
        c.volumes.insert("x".into(), entry("x", 60));
        c.save().unwrap();
        // A whole write (below the threshold) names no journal: it is removed.
        c.volumes.clear();
        c.save().unwrap();
        assert!(!Catalog::journal_path_in(root).exists());
        // An older volumes.json restored over a newer journal.
        let mut c = journaled(root, 5);
        c.volumes.insert("y".into(), entry("y", 61));
        c.save().unwrap();
        std::fs::write(Catalog::path_in(root), &old).unwrap();
        assert_eq!(load(root).volumes, old_volumes);
        // A lost volumes.json: an empty catalog, whatever the journal says.
        std::fs::remove_file(Catalog::path_in(root)).unwrap();
        assert!(load(root).volumes.is_empty());
    }

    #[test]
    fn the_journal_is_folded_into_a_whole_write_past_the_file_size() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut c = journaled(root, 4);
        let mut wholes = 0;
        for i in 0..2000u32 {
            let name = format!("n{}", i % 7);
            if c.volumes.remove(&name).is_none() {
                c.volumes.insert(name.clone(), entry(&name, 1000 + i));
            }
            let before = std::fs::read(Catalog::path_in(root)).unwrap();
            c.save().unwrap();
            wholes += usize::from(std::fs::read(Catalog::path_in(root)).unwrap() != before);
            assert!(
                std::fs::metadata(Catalog::journal_path_in(root))
                    .unwrap()
                    .len()
                    <= (64 << 10) + 4096
            );
        }
        assert!((1..2000 / 10).contains(&wholes), "{wholes} whole writes");
        assert_eq!(load(root).volumes, c.volumes);
    }
}
