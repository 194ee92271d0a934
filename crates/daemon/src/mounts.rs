//! What the daemon attached and mounted: loop devices over the volumes' files in the FUSE
//! export, the filesystems on them, and the mount table that remembers both across restarts
//! (`ROOT/mounts.json`, beside the pool's catalog).
//!
//! ```text
//! vol attach / mount ──▶ losetup --direct-io=on ROOT/files/NAME ─▶ [mkfs] ─▶ mount DIR
//!                        └─ recorded in mounts.json (written whole: temp file, fsync, rename)
//! vol resize (grow)  ──▶ Pool::resize_volume ─▶ losetup -c ─▶ resize2fs / xfs_growfs
//! vol resize --shrink-fs (unmounted ext*) ─▶ e2fsck -f -p, resize2fs FILE SIZE ─▶ shrink
//! vol snapshot       ──▶ fsfreeze -f DIR ─▶ Pool::snapshot ─▶ fsfreeze -u DIR
//! stop               ──▶ umount DIR, losetup -d (records kept: the next `up` mounts again)
//! start (recover)    ──▶ stale mounts over dead loop devices detached (umount -l), those loop
//!                        devices detached, then every record attached and mounted again
//!                        (the filesystem's journal replays)
//! ```
//!
//! Every step is undone when a later one fails, so a refused or failed request changes
//! nothing. The table's lock serializes these operations (each takes at most seconds: a
//! mkfs, a resize2fs).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use thinpool_control::{Attachment, ErrorKind, FsResized, Request, Resized};
use thinpool_engine::Pool;
use thinpool_fs::{FsType, filesystem, loopdev, mount};

use crate::handler::{chain, kind_of};

/// The mount table's file name inside the pool root.
pub(crate) const TABLE_NAME: &str = "mounts.json";

/// A refused or failed request: the protocol's kind and a message that says what to do.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
}

impl Refusal {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            message: message.into(),
        }
    }
}

impl From<thinpool_engine::Error> for Refusal {
    fn from(e: thinpool_engine::Error) -> Refusal {
        Refusal::new(kind_of(e.kind()), chain(&e))
    }
}

impl From<thinpool_fs::Error> for Refusal {
    fn from(e: thinpool_fs::Error) -> Refusal {
        use thinpool_fs::Error as E;
        let kind = match &e {
            E::Busy { .. } | E::NoFreeLoop => ErrorKind::Busy,
            E::Unsupported(_) => ErrorKind::InvalidArgument,
            _ => ErrorKind::Io,
        };
        Refusal::new(kind, e.to_string())
    }
}

type Result<T> = std::result::Result<T, Refusal>;

/// One volume the daemon attached (and maybe mounted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    /// Attached (and mounted) read-only.
    read_only: bool,
    /// This run's loop device; `None` until attached again after a restart.
    #[serde(default)]
    loop_device: Option<PathBuf>,
    /// The mount, if the volume is mounted.
    #[serde(default)]
    mount: Option<MountRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MountRecord {
    dir: PathBuf,
    fstype: String,
    options: Option<String>,
}

/// The file: volume name → record.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Table {
    volumes: BTreeMap<String, Record>,
}

/// The daemon's attachments and mounts.
pub(crate) struct Mounts {
    path: PathBuf,
    /// The FUSE export's folder, while it is served.
    files: Mutex<Option<PathBuf>>,
    /// Why the export is not served, when it is not (for the refusals).
    unserved: Mutex<String>,
    table: Mutex<Table>,
}

fn attachment(volume: &str, r: &Record) -> Attachment {
    Attachment {
        volume: volume.to_string(),
        loop_device: r.loop_device.clone().unwrap_or_default(),
        read_only: r.read_only,
        mount_point: r.mount.as_ref().map(|m| m.dir.clone()),
        fstype: r.mount.as_ref().map(|m| m.fstype.clone()),
        options: r.mount.as_ref().and_then(|m| m.options.clone()),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Mounts {
    /// The table of the pool in `root` (empty when it has none yet). An unreadable table is
    /// logged and set aside (renamed `mounts.json.bad`): it only says what to mount again.
    pub fn load(root: &Path) -> Mounts {
        let path = root.join(TABLE_NAME);
        let table = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Table>(&bytes) {
                Ok(t) => t,
                Err(e) => {
                    let bad = root.join(format!("{TABLE_NAME}.bad"));
                    tracing::error!(
                        "mount table {} is unreadable ({e}): moved to {}; nothing is mounted again",
                        path.display(),
                        bad.display()
                    );
                    let _ = std::fs::rename(&path, &bad);
                    Table::default()
                }
            },
            Err(_) => Table::default(),
        };
        Mounts {
            path,
            files: Mutex::new(None),
            unserved: Mutex::new("started with `--no-fuse`".into()),
            table: Mutex::new(table),
        }
    }

    /// Write the table whole: a temporary file (0600), fsync, rename over, fsync the folder.
    fn save(&self, t: &Table) -> Result<()> {
        let io = |what: &str, e: std::io::Error| {
            Refusal::new(
                ErrorKind::Io,
                format!("{what} the mount table {}: {e}", self.path.display()),
            )
        };
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(t).map_err(|e| io("encoding", e.into()))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("writing", e))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| io("writing", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io("replacing", e))?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("syncing the folder of", e))?;
        }
        Ok(())
    }

    /// The file of volume `name` in the FUSE export, or why there is none.
    fn file_of(&self, name: &str) -> Result<PathBuf> {
        match &*lock(&self.files) {
            Some(dir) => Ok(dir.join(name)),
            None => Err(Refusal::new(
                ErrorKind::InvalidArgument,
                format!(
                    "loop devices and mounts need the volumes' files, and this daemon does not \
                     serve them ({}): start `thinpool up` with FUSE",
                    lock(&self.unserved)
                ),
            )),
        }
    }

    /// Why the FUSE export is not served (its error), for the refusals that need it.
    pub fn set_unserved(&self, why: String) {
        *lock(&self.unserved) = why;
    }

    /// Before the FUSE export mounts: detach what a daemon that died left over the dead
    /// export in `files` — filesystems mounted from its loop devices (lazily: a process may
    /// still be in there) and the loop devices.
    pub fn clear_stale(&self, files: &Path) {
        let loops = loopdev::backed_by_files_in(files);
        if loops.is_empty() {
            return;
        }
        if let Ok(table) = mount::mounts() {
            for m in table.iter().rev() {
                if loops.iter().any(|l| Path::new(&m.source) == l.device) {
                    tracing::warn!(
                        dir = %m.dir.display(),
                        device = m.source,
                        "detaching a filesystem left mounted over the dead FUSE export"
                    );
                    if let Err(e) = mount::detach(&m.dir) {
                        tracing::error!("detaching {}: {e}", m.dir.display());
                    }
                }
            }
        }
        for l in loops {
            tracing::warn!(
                device = %l.device.display(),
                file = %l.backing_file.display(),
                "detaching a loop device left over the dead FUSE export"
            );
            if let Err(e) = loopdev::detach(&l.device) {
                tracing::error!("detaching {}: {e}", l.device.display());
            }
        }
    }

    /// Once the FUSE export serves `files`: attach and mount again what the table records
    /// (after a restart, a crash included). A record that cannot be restored is logged and
    /// dropped.
    pub fn restore(&self, pool: &Pool, files: &Path) {
        *lock(&self.files) = Some(files.to_path_buf());
        let mut t = lock(&self.table);
        let names: Vec<String> = t.volumes.keys().cloned().collect();
        for name in names {
            let rec = t.volumes[&name].clone();
            match self.bring_up(pool, &name, &rec) {
                Ok(dev) => {
                    tracing::info!(
                        volume = name,
                        device = %dev.display(),
                        dir = ?rec.mount.as_ref().map(|m| m.dir.display().to_string()),
                        "attached again"
                    );
                    if let Some(r) = t.volumes.get_mut(&name) {
                        r.loop_device = Some(dev);
                    }
                }
                Err(e) => {
                    tracing::error!(
                        volume = name,
                        "not attached or mounted again: {}; do it by hand (`thinpool mount` or \
                         `thinpool vol attach`)",
                        e.message
                    );
                    t.volumes.remove(&name);
                }
            }
        }
        if let Err(e) = self.save(&t) {
            tracing::error!("{}", e.message);
        }
    }

    /// Attach `name` per `rec` and mount it if recorded; undone on failure.
    fn bring_up(&self, pool: &Pool, name: &str, rec: &Record) -> Result<PathBuf> {
        pool.volume_info(name)?;
        let file = self.file_of(name)?;
        let dev = loopdev::attach(&file, rec.read_only)?;
        if let Some(m) = &rec.mount {
            let r = FsType::parse(&m.fstype)
                .ok_or_else(|| {
                    Refusal::new(
                        ErrorKind::InvalidArgument,
                        format!("unknown filesystem {}", m.fstype),
                    )
                })
                .and_then(|t| {
                    mount::mount(&dev, &m.dir, t, m.options.as_deref(), rec.read_only)
                        .map_err(Refusal::from)
                });
            if let Err(e) = r {
                let _ = loopdev::detach(&dev);
                return Err(e);
            }
        }
        Ok(dev)
    }

    /// `loop_device` and `mount_point` of the volumes attached here, by name.
    pub fn decorate(&self, v: &mut serde_json::Value) {
        let t = lock(&self.table);
        let mut one = |v: &mut serde_json::Value| {
            let Some(name) = v.get("name").and_then(|n| n.as_str()) else {
                return;
            };
            let Some(r) = t.volumes.get(name) else {
                return;
            };
            if let Some(dev) = &r.loop_device {
                v["loop_device"] = dev.display().to_string().into();
            }
            if let Some(m) = &r.mount {
                v["mount_point"] = m.dir.display().to_string().into();
            }
        };
        match v {
            serde_json::Value::Array(a) => a.iter_mut().for_each(&mut one),
            v => one(v),
        }
    }

    /// Why `name` may not be removed now (attached or mounted here), if so.
    pub fn refuse_removal(&self, name: &str) -> Option<Refusal> {
        let t = lock(&self.table);
        let r = t.volumes.get(name)?;
        Some(Refusal::new(
            ErrorKind::Busy,
            match (&r.mount, &r.loop_device) {
                (Some(m), _) => format!(
                    "volume {name} is mounted on {}: run `thinpool umount {}` first",
                    m.dir.display(),
                    m.dir.display()
                ),
                (None, Some(dev)) => format!(
                    "volume {name} is attached as {}: run `thinpool vol detach {name}` first",
                    dev.display()
                ),
                (None, None) => format!(
                    "volume {name} is recorded as attached: run `thinpool vol detach {name}` first"
                ),
            },
        ))
    }

    /// `vol attach`.
    pub fn attach(&self, pool: &Pool, name: &str, read_only: bool) -> Result<Attachment> {
        pool.volume_info(name)?;
        let file = self.file_of(name)?;
        let mut t = lock(&self.table);
        if let Some(r) = t.volumes.get(name) {
            return Err(Refusal::new(
                ErrorKind::Exists,
                format!(
                    "volume {name} is already attached as {}",
                    r.loop_device
                        .as_deref()
                        .map_or("(not yet)".into(), |d| d.display().to_string())
                ),
            ));
        }
        let read_only = read_only || file_is_read_only(&file);
        let dev = loopdev::attach(&file, read_only)?;
        let rec = Record {
            read_only,
            loop_device: Some(dev.clone()),
            mount: None,
        };
        t.volumes.insert(name.to_string(), rec.clone());
        if let Err(e) = self.save(&t) {
            t.volumes.remove(name);
            let _ = loopdev::detach(&dev);
            return Err(e);
        }
        tracing::info!(volume = name, device = %dev.display(), read_only, "attached");
        Ok(attachment(name, &rec))
    }

    /// `vol detach`.
    pub fn detach(&self, name: &str) -> Result<Attachment> {
        let mut t = lock(&self.table);
        let Some(r) = t.volumes.get(name).cloned() else {
            return Err(Refusal::new(
                ErrorKind::NotFound,
                format!("volume {name} is not attached (by this daemon)"),
            ));
        };
        if let Some(m) = &r.mount {
            return Err(Refusal::new(
                ErrorKind::Busy,
                format!(
                    "volume {name} is mounted on {}: `thinpool umount {}` unmounts and detaches it",
                    m.dir.display(),
                    m.dir.display()
                ),
            ));
        }
        if let Some(dev) = &r.loop_device {
            loopdev::detach(dev)?;
        }
        t.volumes.remove(name);
        self.save(&t)?;
        tracing::info!(volume = name, "detached");
        Ok(attachment(name, &r))
    }

    /// `thinpool mount` ([`Request::Mount`]).
    pub fn mount(&self, pool: &Pool, req: Request) -> Result<Attachment> {
        let Request::Mount {
            name,
            dir,
            mkfs,
            force,
            options,
            read_only,
        } = req
        else {
            return Err(Refusal::new(ErrorKind::Protocol, "not a mount request"));
        };
        let bad = |m: String| Refusal::new(ErrorKind::InvalidArgument, m);
        let info = pool.volume_info(&name)?;
        let file = self.file_of(&name)?;
        let dir = mount_point(&dir)?;
        let mkfs = match mkfs.as_deref() {
            None => None,
            Some(s) => match FsType::parse(s) {
                Some(t) => Some(t),
                None => {
                    return Err(bad(format!(
                        "--mkfs {s}: thinpool makes ext4 or xfs (also ext2, ext3)"
                    )));
                }
            },
        };
        if mkfs.is_some() && read_only {
            return Err(bad("--mkfs and --read-only together: make the filesystem first, then mount it read-only".into()));
        }
        let mut t = lock(&self.table);
        if let Some(r) = t.volumes.get(&name) {
            return Err(Refusal::new(
                ErrorKind::Exists,
                match &r.mount {
                    Some(m) => format!("volume {name} is already mounted on {}", m.dir.display()),
                    None => format!(
                        "volume {name} is attached as {}: `thinpool vol detach {name}`, then mount it",
                        r.loop_device
                            .as_deref()
                            .map_or("?".into(), |d| d.display().to_string())
                    ),
                },
            ));
        }
        if let Some((v, r)) = t
            .volumes
            .iter()
            .find(|(_, r)| r.mount.as_ref().is_some_and(|m| m.dir == dir))
        {
            let _ = r;
            return Err(Refusal::new(
                ErrorKind::Busy,
                format!("{} is in use: volume {v} is mounted there", dir.display()),
            ));
        }
        let found = filesystem::probe(&file)?;
        let fstype = match mkfs {
            Some(t) => {
                if info.mapped_blocks > 0 && !force {
                    return Err(Refusal::new(
                        ErrorKind::Exists,
                        format!(
                            "volume {name} holds data ({} mapped blocks{}): --mkfs {t} would destroy it; \
                             add --force to make a new filesystem anyway, or mount it without --mkfs",
                            info.mapped_blocks,
                            found
                                .as_deref()
                                .map_or(String::new(), |f| format!(", a {f} filesystem"))
                        ),
                    ));
                }
                t
            }
            None => match found.as_deref() {
                Some(f) => FsType::parse(f).ok_or_else(|| {
                    bad(format!(
                        "volume {name} holds {f}, which thinpool does not mount (ext2/3/4, xfs)"
                    ))
                })?,
                None => {
                    return Err(bad(format!(
                        "volume {name} holds no filesystem (blkid finds none): add --mkfs ext4 or --mkfs xfs"
                    )));
                }
            },
        };
        let read_only = read_only || file_is_read_only(&file);
        let dev = loopdev::attach(&file, read_only)?;
        let undo = |e: Refusal| {
            let _ = loopdev::detach(&dev);
            e
        };
        if let Some(t) = mkfs {
            filesystem::mkfs(&dev, t).map_err(|e| undo(e.into()))?;
        }
        mount::mount(&dev, &dir, fstype, options.as_deref(), read_only).map_err(|e| {
            let mut r = Refusal::from(e);
            if fstype == FsType::Xfs && read_only {
                r.message += "; an XFS snapshot's log needs recovery even when it was frozen: \
                              mount it read-write, or read-only with `-o norecovery`";
            }
            undo(r)
        })?;
        let rec = Record {
            read_only,
            loop_device: Some(dev.clone()),
            mount: Some(MountRecord {
                dir: dir.clone(),
                fstype: fstype.to_string(),
                options,
            }),
        };
        t.volumes.insert(name.clone(), rec.clone());
        if let Err(e) = self.save(&t) {
            t.volumes.remove(&name);
            let _ = mount::unmount(&dir);
            return Err(undo(e));
        }
        tracing::info!(volume = name, device = %dev.display(), dir = %dir.display(), %fstype, "mounted");
        Ok(attachment(&name, &rec))
    }

    /// `thinpool umount NAME|DIR`: unmount (refused while busy, naming who uses it), detach,
    /// forget.
    pub fn umount(&self, target: &str) -> Result<Attachment> {
        let mut t = lock(&self.table);
        let as_dir = std::fs::canonicalize(target).ok();
        let name = if t.volumes.contains_key(target) {
            target.to_string()
        } else if let Some((n, _)) = t.volumes.iter().find(|(_, r)| {
            r.mount
                .as_ref()
                .is_some_and(|m| Some(&m.dir) == as_dir.as_ref() || m.dir == Path::new(target))
        }) {
            n.clone()
        } else {
            return Err(Refusal::new(
                ErrorKind::NotFound,
                format!(
                    "{target} is neither a volume attached by this daemon nor where it mounted one"
                ),
            ));
        };
        let r = t.volumes[&name].clone();
        if let Some(m) = &r.mount {
            mount::unmount(&m.dir)?;
        }
        if let Some(dev) = &r.loop_device
            && let Err(e) = loopdev::detach(dev)
        {
            tracing::error!(
                "unmounted volume {name} but detaching {}: {e}",
                dev.display()
            );
        }
        t.volumes.remove(&name);
        self.save(&t)?;
        tracing::info!(volume = name, "unmounted and detached");
        Ok(attachment(&name, &r))
    }

    /// `vol snapshot`: a mounted, writable origin's filesystem is frozen around it, so the
    /// snapshot is clean (no journal to replay).
    pub fn snapshot(
        &self,
        pool: &Pool,
        origin: &str,
        name: &str,
    ) -> Result<thinpool_engine::VolumeInfo> {
        let t = lock(&self.table);
        let frozen = t
            .volumes
            .get(origin)
            .filter(|r| !r.read_only)
            .and_then(|r| r.mount.as_ref())
            .map(|m| m.dir.clone());
        if let Some(dir) = &frozen {
            filesystem::freeze(dir)?;
        }
        let r = pool.snapshot(origin, name);
        if let Some(dir) = &frozen
            && let Err(e) = filesystem::thaw(dir)
        {
            tracing::error!("thawing {} after the snapshot: {e}", dir.display());
        }
        Ok(r?)
    }

    /// `vol resize`: grow the volume and, when attached, its loop device and mounted
    /// filesystem; shrink only what no filesystem would be cut by.
    pub fn resize(&self, pool: &Pool, name: &str, size: u64, resize_fs: bool) -> Result<Resized> {
        let old = pool.volume_info(name)?.size;
        let t = lock(&self.table);
        let rec = t.volumes.get(name).cloned();
        let filesystem = match &rec {
            Some(r) => {
                if size < old || resize_fs {
                    return Err(Refusal::new(
                        ErrorKind::Busy,
                        match &r.mount {
                            Some(m) => format!(
                                "volume {name} is mounted on {}: a mounted filesystem only grows (with \
                             the volume, online); to shrink it, `thinpool umount {}`, then \
                             `thinpool vol resize {name} SIZE --resize-fs`",
                                m.dir.display(),
                                m.dir.display()
                            ),
                            None => format!(
                                "volume {name} is attached: `thinpool vol detach {name}` before shrinking \
                             it or resizing its filesystem offline"
                            ),
                        },
                    ));
                }
                if size > old {
                    pool.resize_volume(name, size)?;
                }
                self.grow_online(name, size, r)?
            }
            None => self.resize_offline(pool, name, old, size, resize_fs)?,
        };
        Ok(Resized {
            old_size: old,
            new_size: size,
            filesystem,
        })
    }

    /// After an attached volume grew: the loop device takes the new size, a mounted
    /// filesystem grows to fill it.
    fn grow_online(&self, name: &str, size: u64, r: &Record) -> Result<Option<FsResized>> {
        let Some(dev) = &r.loop_device else {
            return Ok(None);
        };
        let grown = |e: String| {
            Refusal::new(
                ErrorKind::Io,
                format!("volume {name} is now {size} bytes, but {e}"),
            )
        };
        loopdev::refresh(dev).map_err(|e| grown(e.to_string()))?;
        let Some(m) = &r.mount else {
            return Ok(None);
        };
        let fstype = FsType::parse(&m.fstype).unwrap_or(FsType::Ext4);
        let before = filesystem::size(&m.dir)?;
        if let Err(e) = filesystem::grow(fstype, dev, &m.dir) {
            let why = if fstype.is_ext() && e.to_string().contains("Permission denied") {
                format!(
                    "the kernel refused to grow the mounted {fstype} filesystem on {} ({e}): \
                     online ext4 growth needs CAP_SYS_RESOURCE, which this daemon does not have \
                     (a container without it?); `thinpool umount {}` and `thinpool vol resize \
                     {name} {size} --resize-fs` grow it offline",
                    m.dir.display(),
                    m.dir.display()
                )
            } else {
                format!("growing its filesystem on {} failed: {e}", m.dir.display())
            };
            return Err(grown(why));
        }
        Ok(Some(FsResized {
            fstype: m.fstype.clone(),
            mount_point: Some(m.dir.clone()),
            old_size: before,
            new_size: filesystem::size(&m.dir)?,
        }))
    }

    /// Resize a volume nobody attached: its ext2/3/4 filesystem with it when asked
    /// (`resize_fs`); a shrink that would cut a filesystem is refused.
    fn resize_offline(
        &self,
        pool: &Pool,
        name: &str,
        old: u64,
        size: u64,
        resize_fs: bool,
    ) -> Result<Option<FsResized>> {
        let file = match self.file_of(name) {
            Ok(f) => Some(f),
            Err(e) if resize_fs => return Err(e),
            Err(_) => None,
        };
        let found = match &file {
            Some(f) if size < old || resize_fs => filesystem::probe(f)?,
            _ => None,
        };
        let (Some(file), Some(found)) = (file, found) else {
            if resize_fs {
                return Err(Refusal::new(
                    ErrorKind::InvalidArgument,
                    format!("--resize-fs: volume {name} holds no filesystem"),
                ));
            }
            if size != old {
                pool.resize_volume(name, size)?;
            }
            return Ok(None);
        };
        let fstype = match FsType::parse(&found) {
            Some(t) if resize_fs && t.is_ext() => t,
            _ if resize_fs => {
                return Err(Refusal::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "--resize-fs: volume {name} holds a {found} filesystem; thinpool resizes \
                         ext2/3/4 offline (xfs grows only, mounted: `thinpool mount`, then \
                         `thinpool vol resize`)"
                    ),
                ));
            }
            _ => {
                return Err(Refusal::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "volume {name} holds a {found} filesystem: shrinking the volume would cut \
                         it; `--resize-fs` shrinks an ext2/3/4 filesystem first"
                    ),
                ));
            }
        };
        let before = filesystem::ext_size(&file)?;
        if size < old {
            filesystem::resize_offline(fstype, &file, size)?;
            pool.resize_volume(name, size)?;
        } else {
            if size > old {
                pool.resize_volume(name, size)?;
            }
            filesystem::resize_offline(fstype, &file, size)?;
        }
        Ok(Some(FsResized {
            fstype: found,
            mount_point: None,
            old_size: before,
            new_size: filesystem::ext_size(&file)?,
        }))
    }

    /// Unmount and detach everything (records kept, for the next start). With `force`, busy
    /// mounts are detached lazily; without it, the first busy one stops this and is returned
    /// (what was done so far stays done).
    pub fn release(&self, force: bool) -> std::result::Result<(), String> {
        let mut t = lock(&self.table);
        let mut busy = Vec::new();
        for (name, r) in t.volumes.iter_mut() {
            let Some(dev) = r.loop_device.clone() else {
                continue;
            };
            if let Some(m) = &r.mount {
                match mount::unmount(&m.dir) {
                    Ok(()) => {}
                    Err(e @ thinpool_fs::Error::Busy { .. }) if !force => {
                        busy.push(format!("volume {name}: {e}"));
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("unmounting volume {name}: {e}: detaching it lazily");
                        if let Err(e) = mount::detach(&m.dir) {
                            tracing::error!("detaching {}: {e}", m.dir.display());
                        }
                    }
                }
            }
            if let Err(e) = loopdev::detach(&dev) {
                tracing::error!("detaching {} of volume {name}: {e}", dev.display());
            }
            r.loop_device = None;
            tracing::info!(volume = name, "unmounted and detached for the stop");
        }
        if busy.is_empty() {
            // Stopping: nothing more is attached.
            *lock(&self.files) = None;
            *lock(&self.unserved) = "the daemon is stopping".into();
            Ok(())
        } else {
            Err(busy.join("; "))
        }
    }
}

/// A file the FUSE export serves read-only (mode 0400): a loop device over it must be too.
fn file_is_read_only(file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(file).is_ok_and(|m| m.permissions().mode() & 0o200 == 0)
}

/// `dir` checked as a mount point: absolute, an existing folder, nothing mounted on it.
fn mount_point(dir: &Path) -> Result<PathBuf> {
    let bad = |kind, m: String| Refusal::new(kind, format!("mount point {}: {m}", dir.display()));
    let md = std::fs::metadata(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad(
            ErrorKind::NotFound,
            "does not exist: create the folder first (`mkdir -p`)".into(),
        ),
        _ => bad(ErrorKind::Io, e.to_string()),
    })?;
    if !md.is_dir() {
        return Err(bad(ErrorKind::InvalidArgument, "not a folder".into()));
    }
    let dir = std::fs::canonicalize(dir).map_err(|e| bad(ErrorKind::Io, e.to_string()))?;
    if let Some(m) = mount::mounted_at(&dir)? {
        return Err(bad(
            ErrorKind::Busy,
            format!("in use: {} ({}) is mounted there", m.source, m.fstype),
        ));
    }
    Ok(dir)
}
