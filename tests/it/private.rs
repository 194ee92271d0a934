//! What a command may touch (issue 11): the pool's files are private to their owner whatever
//! the umask (and an existing pool's modes are fixed when it is opened), and commands that only
//! look — or any command on a pool flagged NEEDS_CHECK — leave every file byte for byte as it
//! was.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;

use thinpool_io::{BlockDevice, FileDevice};
use thinpool_tests::{run, run_ok, scratch, small_pool, text, thinpool_bin, thinpool_in};

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

const PRIVATE: [(&str, u32); 6] = [
    ("", 0o700),
    ("pool", 0o700),
    ("pool/data", 0o600),
    ("pool/metadata", 0o600),
    ("volumes.json", 0o600),
    ("lock", 0o600),
];

fn assert_private(root: &Path, what: &str) {
    for (name, want) in PRIVATE {
        let got = mode(&root.join(name));
        assert_eq!(
            got,
            want,
            "{what}: {}/{name} has mode {got:o}",
            root.display()
        );
    }
}

#[test]
fn pool_files_are_private_whatever_the_umask() {
    let dir = scratch();
    let root = dir.path().join("root");
    // umask 000 would make every file 0666 and every folder 0777.
    let sh = |cmd: &str| {
        let out = run(std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("umask 000; exec \"$0\" --root \"$1\" {cmd}"))
            .arg(thinpool_bin())
            .arg(&root));
        assert!(out.status.success(), "{cmd}: {}", text(&out.stderr));
    };
    sh("pool create --data-size 64M --metadata-size 8M");
    sh("vol create v --size 1M");
    assert_private(&root, "after pool create under umask 000");
    let export = dir.path().join("v.img");
    sh(&format!("vol export v {}", export.display()));
    assert_eq!(mode(&export), 0o600, "vol export's new file");

    // An existing pool made readable by everyone is fixed on the next open.
    for (name, _) in PRIVATE {
        let m = if name.is_empty() || name == "pool" {
            0o755
        } else {
            0o644
        };
        std::fs::set_permissions(root.join(name), std::fs::Permissions::from_mode(m)).unwrap();
    }
    run_ok(&mut thinpool_in(&root, &["vol", "ls"]));
    assert_private(&root, "after vol ls on a pool with open modes");
}

#[test]
fn looking_commands_and_needs_check_pools_write_nothing() {
    let dir = scratch();
    let root = dir.path().join("root");
    small_pool(&root, &[("v", "4M")]);
    let img = dir.path().join("img");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    run_ok(thinpool_in(&root, &["vol", "import", "v"]).arg(&img));
    let files = || -> Vec<Vec<u8>> {
        ["pool/data", "pool/metadata", "volumes.json"]
            .iter()
            .map(|f| std::fs::read(root.join(f)).unwrap())
            .collect()
    };
    let looks: [&[&str]; 5] = [
        &["vol", "ls"],
        &["vol", "info", "v"],
        &["pool", "status"],
        &["info"],
        &["vol", "export", "v"],
    ];
    for flagged in [false, true] {
        if flagged {
            let dev: Arc<dyn BlockDevice> =
                Arc::new(FileDevice::open(&root.join("pool/metadata")).unwrap());
            thinpool_thin::ThinMetadata::open(dev)
                .unwrap()
                .set_needs_check()
                .unwrap();
        }
        let before = files();
        for args in looks {
            let mut cmd = thinpool_in(&root, args);
            if args.get(1) == Some(&"export") {
                cmd.arg(dir.path().join("out"));
            }
            run_ok(&mut cmd);
            assert!(
                files() == before,
                "`thinpool {}` changed the pool's files (NEEDS_CHECK: {flagged})",
                args.join(" ")
            );
        }
        if flagged {
            let out = run(&mut thinpool_in(
                &root,
                &["vol", "create", "w", "--size", "1M"],
            ));
            assert!(!out.status.success());
            let err = text(&out.stderr);
            assert!(
                err.contains("read-only (NEEDS_CHECK is set: check the metadata offline;")
                    && err.contains("`thinpool pool check --clear-needs-check-flag`"),
                "{err}"
            );
            assert!(files() == before, "a refused vol create changed the files");
        }
    }
}
