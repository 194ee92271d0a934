//! The FUSE export mounted for real over an engine pool in a temporary folder, driven with
//! the system calls a user's tools make (open, pread/pwrite, fstat, lseek SEEK_DATA/SEEK_HOLE,
//! fallocate, ftruncate, fsync) and checked against the engine's own view of the volumes.
//!
//! Needs root and `/dev/fuse`: without them each test skips loudly (fails under `CI=true`).

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{FallocateFlags, SeekFrom};
use thinpool_engine::{Pool, PoolConfig, PoolOptions};
use thinpool_fuse::{FuseConfig, FuseServer};

const BS: u64 = 64 << 10;
const MIB: u64 = 1 << 20;

struct Mounted {
    _dir: tempfile::TempDir,
    files: PathBuf,
    pool: Option<Arc<Pool>>,
    fuse: Option<FuseServer>,
}

impl Mounted {
    fn path(&self, name: &str) -> PathBuf {
        self.files.join(name)
    }

    fn pool(&self) -> &Pool {
        self.pool.as_ref().expect("pool open")
    }

    fn mapped(&self, name: &str) -> u64 {
        self.pool().volume_info(name).unwrap().mapped_blocks
    }

    /// Stop the export, then the pool must close: the export let go of it.
    fn stop(mut self) {
        self.fuse.take().unwrap().stop();
        let pool = Arc::try_unwrap(self.pool.take().unwrap())
            .unwrap_or_else(|_| panic!("the export still holds the pool after stop"));
        pool.close().unwrap();
        assert!(!is_mount_point(&self.files), "still mounted after stop");
        assert_eq!(std::fs::read_dir(&self.files).unwrap().count(), 0);
    }
}

fn is_mount_point(p: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let p = p.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(p))
}

/// A 256 MiB pool with `volumes`, its export mounted on `<tmp>/files`; `None` (after a loud
/// skip) where FUSE cannot be used.
fn mount(volumes: &[(&str, u64)], cfg: impl FnOnce(&mut FuseConfig)) -> Option<Mounted> {
    if !rustix::process::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        thinpool_testkit::skip_or_fail("the FUSE tests need root and /dev/fuse");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let pc = PoolConfig {
        data_size: 256 * MIB,
        metadata_size: 8 * MIB,
        ..Default::default()
    };
    let pool = Arc::new(Pool::create(&root, &pc, PoolOptions::default()).unwrap());
    for (name, size) in volumes {
        pool.create_volume(name, *size).unwrap();
    }
    let files = dir.path().join("files");
    let mut fc = FuseConfig::new(&files);
    cfg(&mut fc);
    let fuse = FuseServer::start(pool.clone(), &fc).unwrap();
    assert!(is_mount_point(&files));
    Some(Mounted {
        _dir: dir,
        files,
        pool: Some(pool),
        fuse: Some(fuse),
    })
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn rw(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

#[test]
fn volumes_are_files_of_their_size_coming_and_going() {
    let Some(m) = mount(&[("web", 64 * MIB), ("db", 3 * MIB + 512)], |_| {}) else {
        return;
    };
    let mut names: Vec<String> = std::fs::read_dir(&m.files)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["db", "web"]);
    let md = std::fs::metadata(m.path("web")).unwrap();
    assert!(md.is_file());
    assert_eq!(md.len(), 64 * MIB);
    assert_eq!(md.permissions().mode() & 0o7777, 0o600);
    assert_eq!(md.uid(), rustix::process::geteuid().as_raw());
    assert_eq!(md.blocks(), 0, "nothing mapped yet");
    assert_eq!(md.blksize(), BS);
    assert_eq!(
        std::fs::metadata(m.path("db")).unwrap().len(),
        3 * MIB + 512
    );

    m.pool().create_volume("new", 8 * MIB).unwrap();
    assert_eq!(std::fs::metadata(m.path("new")).unwrap().len(), 8 * MIB);
    m.pool().resize_volume("new", 16 * MIB).unwrap();
    assert_eq!(std::fs::metadata(m.path("new")).unwrap().len(), 16 * MIB);
    m.pool().remove_volume("new").unwrap();
    let e = std::fs::metadata(m.path("new")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(std::fs::read_dir(&m.files).unwrap().count(), 2);

    // Names are not made or removed through the folder.
    assert!(File::create(m.path("other")).is_err());
    let e = std::fs::remove_file(m.path("web")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_eperm()));
    m.stop();
}

fn libc_eperm() -> i32 {
    rustix::io::Errno::PERM.raw_os_error()
}

#[test]
fn read_write_stat_seek_punch_grow() {
    let Some(m) = mount(&[("v", 32 * MIB)], |_| {}) else {
        return;
    };
    let p = m.path("v");
    let f = rw(&p);
    // Two blocks at 1 MiB, one unaligned write in block 100.
    let a = pattern(1, 2 * BS as usize);
    f.write_all_at(&a, MIB).unwrap();
    let b = pattern(2, 1000);
    f.write_all_at(&b, 100 * BS + 7).unwrap();
    f.sync_all().unwrap();
    assert_eq!(m.mapped("v"), 3);
    let md = f.metadata().unwrap();
    assert_eq!(md.blocks() * 512, 3 * BS, "blocks = mapped bytes / 512");

    // Through the engine, the same bytes.
    let vol = m.pool().open_volume("v").unwrap();
    let mut back = vec![0u8; a.len()];
    vol.read_at(&mut back, MIB).unwrap();
    assert_eq!(back, a);
    drop(vol);
    let mut back = vec![1u8; 3000];
    f.read_exact_at(&mut back, 100 * BS).unwrap();
    assert!(back[..7].iter().all(|&x| x == 0));
    assert_eq!(&back[7..1007], &b[..]);
    assert!(back[1007..].iter().all(|&x| x == 0));

    // SEEK_DATA / SEEK_HOLE from the mapping.
    let seek = |off: u64, w: fn(u64) -> SeekFrom| rustix::fs::seek(&f, w(off));
    assert_eq!(seek(0, SeekFrom::Data).unwrap(), MIB);
    assert_eq!(seek(MIB + 5, SeekFrom::Hole).unwrap(), MIB + 2 * BS);
    assert_eq!(seek(MIB + 2 * BS, SeekFrom::Data).unwrap(), 100 * BS);
    assert_eq!(seek(0, SeekFrom::Hole).unwrap(), 0);
    assert_eq!(
        seek(101 * BS, SeekFrom::Data).unwrap_err(),
        rustix::io::Errno::NXIO
    );
    assert_eq!(
        seek(32 * MIB, SeekFrom::Hole).unwrap_err(),
        rustix::io::Errno::NXIO
    );

    // Punch a hole from the middle of the first block to the middle of the second: the
    // blocks stay mapped (partial) but read zeros there.
    let keep_punch = FallocateFlags::KEEP_SIZE | FallocateFlags::PUNCH_HOLE;
    rustix::fs::fallocate(&f, keep_punch, MIB + 100, BS).unwrap();
    let mut back = vec![1u8; a.len()];
    f.read_exact_at(&mut back, MIB).unwrap();
    assert_eq!(&back[..100], &a[..100]);
    assert!(back[100..100 + BS as usize].iter().all(|&x| x == 0));
    assert_eq!(&back[100 + BS as usize..], &a[100 + BS as usize..]);
    assert_eq!(m.mapped("v"), 3);
    // Punching whole blocks returns them.
    rustix::fs::fallocate(&f, keep_punch, MIB, 2 * BS).unwrap();
    assert_eq!(m.mapped("v"), 1);
    assert_eq!(f.metadata().unwrap().blocks() * 512, BS);
    f.read_exact_at(&mut back, MIB).unwrap();
    assert!(back.iter().all(|&x| x == 0));
    // ZERO_RANGE over block 100.
    rustix::fs::fallocate(&f, FallocateFlags::ZERO_RANGE, 100 * BS, BS).unwrap();
    assert_eq!(m.mapped("v"), 0);
    // Plain allocation cannot reserve thin blocks.
    assert_eq!(
        rustix::fs::fallocate(&f, FallocateFlags::empty(), 0, BS).unwrap_err(),
        rustix::io::Errno::OPNOTSUPP
    );

    // Writes stop at the end; the file does not grow by writing.
    let e = f.write_at(b"x", 32 * MIB).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(rustix::io::Errno::FBIG.raw_os_error())
    );
    assert_eq!(f.write_at(&[9u8; 100], 32 * MIB - 10).unwrap(), 10);

    // truncate: larger grows the volume, smaller is refused, equal is nothing.
    f.set_len(48 * MIB).unwrap();
    assert_eq!(m.pool().volume_info("v").unwrap().size, 48 * MIB);
    assert_eq!(f.metadata().unwrap().len(), 48 * MIB);
    f.write_all_at(b"tail", 48 * MIB - 4).unwrap();
    let e = f.set_len(16 * MIB).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_eperm()));
    assert_eq!(m.pool().volume_info("v").unwrap().size, 48 * MIB);
    f.set_len(48 * MIB).unwrap();

    // An open file keeps the volume: removing it is refused.
    let e = m.pool().remove_volume("v").unwrap_err();
    assert_eq!(e.kind(), thinpool_engine::ErrorKind::Busy);
    drop(f);
    m.stop();
}

#[test]
fn snapshots_read_only_when_asked() {
    let Some(m) = mount(&[("o", 4 * MIB)], |c| c.snapshots_read_only = true) else {
        return;
    };
    rw(&m.path("o")).write_all_at(b"origin", 0).unwrap();
    m.pool().snapshot("o", "s").unwrap();
    let md = std::fs::metadata(m.path("s")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o400);
    // Root passes mode bits; the export refuses anyway.
    let e = OpenOptions::new()
        .write(true)
        .open(m.path("s"))
        .unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(rustix::io::Errno::ROFS.raw_os_error())
    );
    // The origin stays writable; the snapshot keeps its bytes (copy-on-write).
    rw(&m.path("o")).write_all_at(b"ORIGIN", 0).unwrap();
    let mut buf = [0u8; 6];
    File::open(m.path("s"))
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    assert_eq!(&buf, b"origin");
    m.stop();
}

#[test]
fn stop_with_a_file_open_detaches_and_lets_go_of_the_pool() {
    let Some(m) = mount(&[("v", 4 * MIB)], |_| {}) else {
        return;
    };
    let f = rw(&m.path("v"));
    f.write_all_at(b"kept", 0).unwrap();
    f.sync_all().unwrap();
    let Mounted {
        _dir,
        files,
        mut pool,
        mut fuse,
    } = m;
    fuse.take().unwrap().stop();
    assert!(!is_mount_point(&files), "detached");
    // The open file now fails; the pool is free to close.
    let mut buf = [0u8; 4];
    assert!(f.read_exact_at(&mut buf, 0).is_err());
    let pool = Arc::try_unwrap(pool.take().unwrap())
        .unwrap_or_else(|_| panic!("the export still holds the pool"));
    let v = pool.open_volume("v").unwrap();
    v.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"kept");
    drop(v);
    pool.close().unwrap();
    drop(f);
}

#[test]
fn unusable_mount_folders_are_refused() {
    if !rustix::process::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        thinpool_testkit::skip_or_fail("the FUSE tests need root and /dev/fuse");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pc = PoolConfig {
        data_size: 64 * MIB,
        metadata_size: 4 * MIB,
        ..Default::default()
    };
    let pool =
        Arc::new(Pool::create(&dir.path().join("root"), &pc, PoolOptions::default()).unwrap());
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), b"x").unwrap();
    let e = FuseServer::start(pool.clone(), &FuseConfig::new(&full))
        .err()
        .unwrap();
    assert!(e.to_string().contains("not empty"), "{e}");
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let e = FuseServer::start(pool.clone(), &FuseConfig::new(&file))
        .err()
        .unwrap();
    assert!(e.to_string().contains("not a folder"), "{e}");
    assert!(!e.is_unavailable());
    // A missing folder is made, private.
    let made = dir.path().join("a/b");
    let fuse = FuseServer::start(pool.clone(), &FuseConfig::new(&made)).unwrap();
    fuse.stop();
    let mode = std::fs::metadata(&made).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    Arc::try_unwrap(pool).ok().unwrap().close().unwrap();
}

#[test]
fn reads_show_no_bytes_of_an_earlier_read() {
    // One serving thread: every read is answered from the same reused buffer.
    let Some(m) = mount(&[("a", 4 * MIB), ("b", 4 * MIB), ("c", MIB + 100)], |c| {
        c.threads = Some(1)
    }) else {
        return;
    };
    let data = pattern(7, MIB as usize);
    rw(&m.path("a")).write_all_at(&data, 0).unwrap();
    rw(&m.path("c")).write_all_at(b"c", MIB).unwrap();
    let mut back = vec![0u8; MIB as usize];
    File::open(m.path("a"))
        .unwrap()
        .read_exact_at(&mut back, 0)
        .unwrap();
    assert_eq!(back, data);
    // Never written: zeros, although the buffer last held a's bytes.
    back.fill(0xff);
    File::open(m.path("b"))
        .unwrap()
        .read_exact_at(&mut back, MIB)
        .unwrap();
    assert!(back.iter().all(|&b| b == 0), "b reads a's bytes");
    // Partly mapped (one 64 KiB block of c at 1 MiB) and cut at the end of the file.
    let f = File::open(m.path("c")).unwrap();
    let mut back = vec![0xffu8; MIB as usize];
    assert_eq!(f.read_at(&mut back, MIB - 100).unwrap(), 200);
    assert!(back[..100].iter().all(|&b| b == 0));
    assert_eq!(back[100], b'c');
    assert!(back[101..200].iter().all(|&b| b == 0));
    m.stop();
}
