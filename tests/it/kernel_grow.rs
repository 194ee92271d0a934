//! The kernel changes a thinpool pool the ways dm, LVM and Docker do, and thinpool keeps every
//! byte (issue 11): it grows a volume by activating it with a longer `thin` table and writes
//! past the volume's old end, and it creates a thin device of its own, larger than the pool,
//! written to its last sector. Opening the pool afterwards (a read-only `vol ls`, then
//! `vol resize`, `vol export`) must not trim either: the grown volume's size is raised to cover
//! the kernel's write, the new device is adopted with a size covering its last block, and both
//! read back what the kernel wrote.

use thinpool_tests::kernel::{kernel_run, md5_hex};
use thinpool_tests::{
    kernel_scripts_dir, require_tools, run_ok, scratch, stdout_of, text, thinpool_in, tool,
};

const MIB: u64 = 1 << 20;

#[test]
fn kernel_grown_and_kernel_made_devices_keep_their_data() {
    if !require_tools(&["thin_check", "thin_dump"]) {
        return;
    }
    let dir = scratch();
    let root = dir.path().join("root");
    run_ok(&mut thinpool_in(
        &root,
        &[
            "pool",
            "create",
            "--data-size",
            "256M",
            "--metadata-size",
            "16M",
        ],
    ));
    let image: Vec<u8> = (0..16 * MIB).map(|i| (i % 251) as u8 | 1).collect();
    let img = dir.path().join("image");
    std::fs::write(&img, &image).unwrap();
    run_ok(thinpool_in(&root, &["vol", "import", "v"]).arg(&img));

    let (meta, data) = (root.join("pool/metadata"), root.join("pool/data"));
    let at = 20 * MIB;
    let new_size = 512 * MIB; // larger than the 256 MiB pool
    let args: Vec<String> = [128, 0, 32 * MIB / 512, at, 1, new_size / 512]
        .iter()
        .map(u64::to_string)
        .collect();
    let script = kernel_scripts_dir().join("grow-and-adopt.guest.sh");
    let Some(out) = kernel_run(&meta, &data, &script, &args) else {
        return;
    };
    let said = text(&out.stdout);
    assert!(
        out.status.success(),
        "guest failed:\n{said}\n{}",
        text(&out.stderr)
    );
    let md5 = |what: &str| {
        said.lines()
            .find_map(|l| l.strip_prefix(&format!("MD5 {what} ")))
            .unwrap_or_else(|| panic!("no MD5 {what} line in:\n{said}"))
            .to_string()
    };
    let (grown_md5, new_md5) = (md5("grown"), md5("new"));
    run_ok(tool("thin_check").arg(&meta));

    // A read-only look first: it must not write (the files stay byte-identical) and already
    // shows the sizes that cover the kernel's blocks.
    let before = std::fs::read(&meta).unwrap();
    let ls = stdout_of(&mut thinpool_in(&root, &["vol", "ls", "--json"]));
    assert_eq!(
        std::fs::read(&meta).unwrap(),
        before,
        "vol ls wrote the metadata"
    );
    let vols: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let size_of = |name: &str| {
        vols.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name} in {ls}"))["size"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(size_of("v"), at + MIB, "v covers the kernel's write");
    assert_eq!(size_of("thin-1"), new_size, "thin-1 covers its last block");

    // The user's next step in the reproduction: resize, then read everything back.
    run_ok(&mut thinpool_in(&root, &["vol", "resize", "v", "32M"]));
    let dump = stdout_of(tool("thin_dump").arg(&meta));
    assert!(
        dump.contains("origin_begin=\"320\""),
        "the kernel's block 320 of device 0 is mapped:\n{dump}"
    );
    let out_v = dir.path().join("v.out");
    run_ok(thinpool_in(&root, &["vol", "export", "v"]).arg(&out_v));
    let v = std::fs::read(&out_v).unwrap();
    assert_eq!(v.len() as u64, 32 * MIB);
    assert!(v[..16 * MIB as usize] == image[..], "the imported image");
    assert_eq!(
        md5_hex(&v[at as usize..(at + MIB) as usize]),
        grown_md5,
        "the kernel's write past the old end"
    );
    let out_new = dir.path().join("thin-1.out");
    run_ok(thinpool_in(&root, &["vol", "export", "thin-1"]).arg(&out_new));
    let n = std::fs::read(&out_new).unwrap();
    assert_eq!(n.len() as u64, new_size);
    assert_eq!(
        md5_hex(&n[n.len() - 4096..]),
        new_md5,
        "the kernel device's last 4 KiB"
    );
    run_ok(tool("thin_check").arg(&meta));
}
