#!/bin/sh
# Kernel side of tests/it/kernel_grow.rs: the kernel grows a thinpool volume the way dm, LVM
# and Docker grow thin devices (a longer `thin` table than the volume's size), writes past the
# volume's old end, and makes a thin device of its own, larger than the pool, written to its
# last sector. Teardown commits.
#
# Arguments: DATA_BLOCK_SIZE (sectors) VOL_ID GROWN_SECTORS WRITE_AT_BYTES NEW_ID NEW_SECTORS
# stdout: "MD5 grown <md5 of 1 MiB at WRITE_AT_BYTES>" and "MD5 new <md5 of the last 4 KiB>".
set -eu
dbs=$1 vol=$2 grown=$3 at=$4 new=$5 new_sectors=$6
len=$((DATA_SECTORS / dbs * dbs))
dmsetup create pool --table "0 $len thin-pool $META_DEV $DATA_DEV $dbs 0"
dmsetup create grown --table "0 $grown thin /dev/mapper/pool $vol"
yes "thinpool: written by the kernel past the volume's old end" | head -c 1048576 > /tmp/grow
dd if=/tmp/grow of=/dev/mapper/grown bs=65536 seek=$((at / 65536)) oflag=direct conv=fsync 2>/dev/null
echo "MD5 grown $(dd if=/dev/mapper/grown bs=65536 skip=$((at / 65536)) count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
dmsetup message pool 0 "create_thin $new"
dmsetup create new --table "0 $new_sectors thin /dev/mapper/pool $new"
yes "thinpool: the kernel's own device, last sectors" | head -c 4096 > /tmp/last
dd if=/tmp/last of=/dev/mapper/new bs=4096 seek=$((new_sectors / 8 - 1)) oflag=direct conv=fsync 2>/dev/null
echo "MD5 new $(dd if=/dev/mapper/new bs=4096 skip=$((new_sectors / 8 - 1)) count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "pool: $(dmsetup status pool)" >&2
dmsetup remove new
dmsetup remove grown
dmsetup remove pool
