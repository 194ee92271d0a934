//! Who holds a pool's lock: the process that has an `flock` on `ROOT/lock`, named from
//! `/proc/locks` and its command line, for the message of a daemon that waits for it.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

/// "thinpool vol ls (pid 123)" for the process holding an flock on `lock`, when `/proc`
/// says; `None` when nobody does or it cannot tell (another pid namespace, no `/proc`).
pub(crate) fn describe(lock: &Path) -> Option<String> {
    let meta = lock.metadata().ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid = holder_pid(&locks, meta.dev(), meta.ino())?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let words: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    Some(match words.split_first() {
        Some((prog, args)) => {
            let prog = Path::new(prog)
                .file_name()
                .map_or_else(|| prog.clone(), |n| n.to_string_lossy().into_owned());
            // The command's words, without its options' values being guessed at: enough to
            // tell a `vol ls` from a `meta check`.
            let shown: Vec<&str> = std::iter::once(prog.as_str())
                .chain(args.iter().map(String::as_str))
                .take(8)
                .collect();
            format!("{} (pid {pid})", shown.join(" "))
        }
        None => format!("process {pid}"),
    })
}

/// The pid of an FLOCK entry on device `dev`, inode `ino` in `/proc/locks`'s text
/// (`1: FLOCK  ADVISORY  WRITE 1234 08:02:5678 0 EOF`; blocked waiters, `->`, are skipped).
fn holder_pid(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let major = (dev >> 8) & 0xfff | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(1) != Some(&"FLOCK") {
            return None;
        }
        let id: Vec<&str> = f.get(5)?.split(':').collect();
        let [ma, mi, i] = id[..] else { return None };
        let same = u64::from_str_radix(ma, 16).ok()? == major
            && u64::from_str_radix(mi, 16).ok()? == minor
            && i.parse::<u64>().ok()? == ino;
        if same { f.get(4)?.parse().ok() } else { None }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_this_process_holding_a_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let f = std::fs::File::create(&p).unwrap();
        assert_eq!(describe(&p), None);
        f.try_lock().unwrap();
        let d = describe(&p).expect("the holder is found");
        assert!(d.ends_with(&format!("(pid {})", std::process::id())), "{d}");
    }

    #[test]
    fn parses_proc_locks() {
        let text = "1: POSIX  ADVISORY  WRITE 10 08:02:77 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4321 00:2a:77 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 99 00:2a:77 0 EOF\n";
        assert_eq!(holder_pid(text, 0x2a, 77), Some(4321));
        assert_eq!(holder_pid(text, 0x2a, 78), None);
    }
}
