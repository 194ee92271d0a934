//! The Linux kernel as an oracle: `../shared/tools/kernel-dm-thin/run` boots Debian's cloud
//! kernel (dm-thin v1.22.0) under QEMU with a pool's metadata and data files as its disks and
//! runs a guest script (see that tool's README). Each VM costs about 3 s plus the script's own
//! time under TCG, so a test should put many cases into one guest script.
//!
//! - [`kernel_run`]: run any guest script; `None` when the VM cannot run here (skipped, or a
//!   panic under `CI=true`).
//! - [`read_blocks`] / [`assert_kernel_reads`]: activate a pool with its thin devices and let the
//!   kernel return the md5 of given virtual blocks (guest script `tests/kernel/read-blocks.guest.sh`).
//! - [`pattern`], [`md5_hex`]: the position-dependent block contents the examples use.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use md5::Digest as _;

use crate::{describe, kernel_scripts_dir, shared_dir, skip_or_fail, text};

/// `../shared/tools/kernel-dm-thin/run`.
pub fn harness() -> PathBuf {
    shared_dir()
        .join("tools")
        .join("kernel-dm-thin")
        .join("run")
}

/// Options of one VM run.
#[derive(Clone, Debug)]
pub struct KernelOptions {
    /// `--snapshot`: guest writes go to a throw-away overlay, the host files stay unchanged.
    pub snapshot: bool,
    /// `--timeout`: limit for the whole VM, boot included (seconds).
    pub timeout_s: u32,
}

impl Default for KernelOptions {
    fn default() -> Self {
        Self {
            snapshot: false,
            timeout_s: 600,
        }
    }
}

/// Make sure the harness is set up (`run --prepare`), once per test process. False if it cannot
/// be (after a SKIP line, or a panic under `CI=true`).
pub fn require_kernel() -> bool {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        let h = harness();
        if !h.exists() {
            return Err(format!("kernel harness {} not found", h.display()));
        }
        match Command::new(&h).args(["--prepare", "--quiet"]).output() {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "`{} --prepare` failed with {}: {}",
                h.display(),
                o.status,
                text(&o.stderr)
            )),
            Err(e) => Err(format!("cannot run {}: {e}", h.display())),
        }
    });
    match ready {
        Ok(()) => true,
        Err(why) => skip_or_fail(&format!("kernel oracle unavailable: {why}")),
    }
}

/// Boot the kernel with `meta` as `$META_DEV` and `data` as `$DATA_DEV` and run `script` with
/// `args` in the guest (`run --quiet --timeout 600`). Returns the guest script's output and exit
/// status (the guest's stdout/stderr byte for byte).
///
/// `None` means the VM could not run here: the harness is missing or cannot be prepared, or it
/// exited 125 before the guest script started (QEMU cannot boot). That is a SKIP line normally
/// and a panic under `CI=true`, like a missing oracle. Exit 125 after the script started (a
/// kernel panic, say) and 124 (timeout) come back as `Some` for the test to fail on.
pub fn kernel_run(meta: &Path, data: &Path, script: &Path, args: &[String]) -> Option<Output> {
    kernel_run_with(meta, data, script, args, &KernelOptions::default())
}

/// [`kernel_run`] with [`KernelOptions`].
pub fn kernel_run_with(
    meta: &Path,
    data: &Path,
    script: &Path,
    args: &[String],
    opts: &KernelOptions,
) -> Option<Output> {
    if !require_kernel() {
        return None;
    }
    let mut cmd = Command::new(harness());
    cmd.arg("--quiet")
        .arg("--timeout")
        .arg(opts.timeout_s.to_string())
        .arg("--meta")
        .arg(meta)
        .arg("--data")
        .arg(data)
        .arg("--script")
        .arg(script);
    if opts.snapshot {
        cmd.arg("--snapshot");
    }
    cmd.arg("--").args(args);
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(&cmd)));
    let stderr = text(&out.stderr);
    if out.status.code() == Some(125) && !stderr.contains("guest script started: yes") {
        skip_or_fail(&format!(
            "kernel harness could not boot the VM (exit 125):\n{stderr}"
        ));
        return None;
    }
    if !out.status.success() {
        eprintln!(
            "---- kernel run `{}` exited with {}\n---- guest stdout:\n{}---- guest stderr:\n{stderr}----",
            describe(&cmd),
            out.status,
            text(&out.stdout)
        );
    }
    Some(out)
}

/// `len` bytes of 16-byte lines `"TAG   <offset>\n"`: `printf "%-6.6s%09d\n", tag, offset` for
/// offset 0, 16, 32, … — the same bytes as the `pat` shell function of the kernel-dm-thin
/// examples (`len` is rounded up to a multiple of 16, as awk does).
pub fn pattern(tag: &str, len: usize) -> Vec<u8> {
    let mut s = String::with_capacity(len + 16);
    let mut o = 0;
    while o < len {
        let _ = writeln!(s, "{tag:<6.6}{o:09}");
        o += 16;
    }
    s.into_bytes()
}

/// Lower-case hex md5 of `bytes` (as `md5sum` prints it).
pub fn md5_hex(bytes: &[u8]) -> String {
    let d = md5::Md5::digest(bytes);
    d.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// md5 of `len` zero bytes.
pub fn zeros_md5(len: usize) -> String {
    md5_hex(&vec![0u8; len])
}

/// The blocks to read, per thin device: dev_id → virtual blocks.
pub type BlockList = BTreeMap<u32, Vec<u64>>;

/// The argument list of `tests/kernel/read-blocks.guest.sh`:
/// `DATA_BLOCK_SIZE DEV:VBLOCK,VBLOCK,... ...`.
pub fn read_blocks_args(data_block_size: u32, blocks: &BlockList) -> Vec<String> {
    let mut args = vec![data_block_size.to_string()];
    for (dev, vblocks) in blocks {
        let list: Vec<String> = vblocks.iter().map(|v| v.to_string()).collect();
        args.push(format!("{dev}:{}", list.join(",")));
    }
    args
}

/// Activate the pool in (`meta`, `data`) in the kernel (table length = the data file's size,
/// block size `data_block_size` sectors), create one thin device per dev id in `blocks` (long
/// enough for its highest block), read each listed virtual block with `O_DIRECT` and return its
/// md5: `(dev, vblock) → md5`. The guest tears everything down cleanly, so the kernel commits
/// (use `snapshot` to keep the host files unchanged).
///
/// `None` when the VM cannot run here (see [`kernel_run`]). Panics if the guest script fails.
pub fn read_blocks(
    meta: &Path,
    data: &Path,
    data_block_size: u32,
    blocks: &BlockList,
    snapshot: bool,
) -> Option<BTreeMap<(u32, u64), String>> {
    let script = kernel_scripts_dir().join("read-blocks.guest.sh");
    let opts = KernelOptions {
        snapshot,
        ..KernelOptions::default()
    };
    let out = kernel_run_with(
        meta,
        data,
        &script,
        &read_blocks_args(data_block_size, blocks),
        &opts,
    )?;
    assert!(
        out.status.success(),
        "read-blocks.guest.sh failed with {}:\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let mut got = BTreeMap::new();
    for line in text(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [dev, vblock, md5] = f[..]
            && let (Ok(dev), Ok(vblock)) = (dev.parse::<u32>(), vblock.parse::<u64>())
        {
            got.insert((dev, vblock), md5.to_string());
        }
    }
    Some(got)
}

/// [`read_blocks`] for `expected` `(dev_id, virtual block, md5 of the whole block)` triples, and
/// assert that the kernel read exactly those contents. Returns false if the VM could not run
/// (skipped).
pub fn assert_kernel_reads(
    meta: &Path,
    data: &Path,
    data_block_size: u32,
    expected: &[(u32, u64, String)],
    snapshot: bool,
) -> bool {
    let mut blocks = BlockList::new();
    for (dev, v, _) in expected {
        blocks.entry(*dev).or_default().push(*v);
    }
    let Some(got) = read_blocks(meta, data, data_block_size, &blocks, snapshot) else {
        return false;
    };
    let mut bad = Vec::new();
    for (dev, v, want) in expected {
        match got.get(&(*dev, *v)) {
            Some(md5) if md5 == want => {}
            Some(md5) => bad.push(format!(
                "dev {dev} block {v}: kernel read md5 {md5}, want {want}"
            )),
            None => bad.push(format!("dev {dev} block {v}: not reported by the guest")),
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} blocks read wrong by the kernel:\n{}",
        bad.len(),
        expected.len(),
        bad.join("\n")
    );
    true
}
