//! thinpool's end-to-end tests: one test binary (`cargo test -p thinpool-tests`), one module per
//! kind of oracle. Helpers live in the `thinpool_tests` library (`tests/src/`).
//!
//! - `oracle`: the `thinpool meta` toolbox against thin-provisioning-tools 0.9.0, on the committed
//!   vectors and on random pools (seed printed; `THINPOOL_TEST_SEED`, `THINPOOL_TEST_CASES`).
//! - `image_store`: `thinpool image|container|import` as a user runs them, with and without a
//!   daemon: trees equal to umoci's, save accepted by skopeo and containerd, commit, export →
//!   import of a grown container into another pool, 100 containers' blocks.
//! - `image_bad`: bad archives and layers (truncated, wrong digests, path traversal, full pool):
//!   refused, nothing written outside, nothing left half-loaded.
//! - `kernel`: pools exchanged with the Linux kernel's dm-thin, booted in a VM.
//! - `kernel_api`: the kernel reads a pool written through thinpool-thin's writable API.
//! - `kernel_grow`: the kernel grows a volume and makes a device of its own; nothing is trimmed.
//! - `kernel_needs_check`: a pool thinpool flagged NEEDS_CHECK: thin_check, the kernel
//!   (read-only, `needs_check` in its status) and thinpool agree; after
//!   `thin_check --clear-needs-check-flag` both open it read-write.
//! - `needs_check`: `meta check`/`pool check --clear-needs-check-flag` clear NEEDS_CHECK after a
//!   clean check (the bytes `thin_check`'s option gives), keep it on damage, refuse with a daemon.
//! - `autogrow`: the pool fills (issue 15): low-water events and autogrow under fio with
//!   verification on a small host ext4 (grown in steps, never past the host's free space), a
//!   block-device pool (the event, no grow), metadata autogrow, bad policy values.
//! - `cli_pool`: `thinpool pool …` and `thinpool vol …` as a user runs them; raw images in and
//!   out compared byte for byte; `thin_check` on what they leave.
//! - `cli_info`: `thinpool info`, `vol info`, `pool check`, `completions` and `man`, with and
//!   without a daemon; numbers checked against what was written and the pool's files.
//! - `daemon`: the same commands while a daemon holds the pool (through its control socket),
//!   printing exactly what they print without one.
//! - `nbd`: `thinpool nbd serve` against real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy,
//!   nbdsh, fio, TLS) and a raw protocol client.
//! - `nbd_access`: TCP without TLS refused unless `--insecure-tcp`; PSK identities restricted
//!   to volumes with `--psk-exports` (issue 15).
//! - `nbd_limits`: NBD connection limit (unix and TCP), handshake deadline, 1 000 connections
//!   served on, 10 000 pipelined requests and 32 MiB reads with replies unread in bounded memory,
//!   1 500-connection floods on unix and TCP with a client served throughout (issue 15).
//! - `fuse`: volumes as files: `thinpool up`'s FUSE mount driven with dd, cp, du, fallocate,
//!   truncate, qemu-img and lseek; kill -9 and restart; a loop device carrying ext4.
//! - `filesystems`: `thinpool mount --mkfs ext4|xfs`, trees compared, frozen snapshots mounted
//!   elsewhere, growth while a writer runs, `--resize-fs`, fstrim, kill -9 while fsyncing and
//!   `up` mounting again, a busy graceful stop, bad inputs; e2fsck/xfs_repair and thin_check.
//! - `hostfull`: the host file system under the pool fills up: ENOSPC, no wedge, recovery.
//! - `host_shutdown`: the host file system under the pool is shut down (`xfs_io shutdown`):
//!   flushed writes survive, as they do in a raw file served by nbdkit beside it.
//! - `meta_repair`: `thinpool meta repair` of a superblock with an absurd `nr_data_blocks`: derived
//!   from the mappings and the data file; thin_check and thin_dump on the result.
//! - `move_data`: `thinpool pool move-data` online under fio (through the daemon) and offline.
//! - `snapshotter`: the layer store as real containerd's proxy snapshotter: images imported
//!   (docker save and OCI archives), mounted trees equal to the reference apply, `ctr run`,
//!   commit and build on it, removal and garbage collection returning the blocks, a kill -9 in
//!   the middle of an import, bad requests answered with containerd's codes.
//! - `soak`: kill -9 soak: self-checking NBD writes over many connections, SIGKILL at a random
//!   moment, restart, every flushed write read back, `thin_check` (`THINPOOL_SOAK_ROUNDS`).
//! - `private`: pool files private whatever the umask; looking commands and NEEDS_CHECK pools
//!   write nothing.
//! - `up`: `thinpool up` as a user drives it (NBD writes, snapshots, growing under fio, JSON
//!   numbers, SIGTERM, thin_check) and its bad inputs.
//! - `vectors`: the committed dm-thin test vectors are what `testdata/dm-thin/README.md` says.

mod autogrow;
mod cli_info;
mod cli_pool;
mod daemon;
mod engine_kernel;
mod filesystems;
mod fuse;
mod host_shutdown;
mod hostfull;
mod image_bad;
mod image_store;
mod images;
mod kernel;
mod kernel_api;
mod kernel_grow;
mod kernel_needs_check;
mod meta_repair;
mod move_data;
mod nbd;
mod nbd_access;
mod nbd_limits;
mod needs_check;
mod oracle;
mod private;
mod snapshotter;
mod soak;
mod up;
mod vectors;
