#!/bin/sh
# Engine round trip, guest side (run by tests/it/engine_kernel.rs). The host's pool engine made
# and wrote the pool. The kernel:
#  1. activates it and prints the md5 of every volume (args: ID:SECTORS ...);
#  2. snapshots the first volume as NEW_ID (suspend, create_snap, resume), writes a pattern into
#     the first volume at block 3 (copy-on-write against the new snapshot) and into block 700
#     (a fresh block), discards blocks 8..15 of the second volume, and prints the md5 of every
#     volume again, the new snapshot included;
#  3. tears down cleanly (the kernel commits).
# Args: DATA_BLOCK_SIZE NEW_ID ID:SECTORS [ID:SECTORS ...]. Output lines: "MD5 <phase> <id> <md5>".
set -eu
dbs=$1; new=$2; shift 2
BS=$((dbs * 512))
pat() { awk -v t="$1" -v n="$2" 'BEGIN { for (o = 0; o < n; o += 16) printf "%-6.6s%09d\n", t, o }'; }
len=$((DATA_SECTORS / dbs * dbs))
dmsetup create pool --table "0 $len thin-pool $META_DEV $DATA_DEV $dbs 0"
for a in "$@"; do
  dmsetup create "t${a%%:*}" --table "0 ${a#*:} thin /dev/mapper/pool ${a%%:*}"
done
for a in "$@"; do
  echo "MD5 before ${a%%:*} $(dd if=/dev/mapper/t${a%%:*} bs=1M iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
done
first=${1%%:*}; fsec=${1#*:}
second=${2%%:*}
dmsetup suspend "t$first"
dmsetup message pool 0 "create_snap $new $first"
dmsetup resume "t$first"
dmsetup create "t$new" --table "0 $fsec thin /dev/mapper/pool $new"
pat KCOW $BS | dd of="/dev/mapper/t$first" bs=$BS seek=3 iflag=fullblock oflag=direct conv=notrunc,fsync 2>/dev/null
pat KNEW 4096 | dd of="/dev/mapper/t$first" bs=4096 seek=$((700 * BS / 4096 + 1)) iflag=fullblock oflag=direct conv=notrunc,fsync 2>/dev/null
blkdiscard -o $((8 * BS)) -l $((8 * BS)) "/dev/mapper/t$second"
sync
for a in "$@" "$new:$fsec"; do
  echo "MD5 after ${a%%:*} $(dd if=/dev/mapper/t${a%%:*} bs=1M iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
done
echo "status: $(dmsetup status pool)" >&2
for a in "$@" "$new:$fsec"; do dmsetup remove "t${a%%:*}"; done
dmsetup remove pool
