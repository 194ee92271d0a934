#!/bin/sh
# Kernel side of tests/it/kernel_needs_check.rs, in one boot: a pool thinpool flagged
# NEEDS_CHECK, activated as it is (phase 1), then with the flag cleared the documented way,
# `thin_check --clear-needs-check-flag` (phase 2).
#
# Arguments: DATA_BLOCK_SIZE (sectors) VOL_ID VOL_SECTORS MAPPED_BYTES FREE_AT_BYTES
# (MAPPED_BYTES from the volume's start are provisioned; the 64 KiB at FREE_AT_BYTES are not.)
# stdout, one "KEY value" line each:
#   META0 / META1       md5 of the whole metadata device before phase 1 and after its teardown
#   STATUS1 / STATUS2   `dmsetup status pool` in each phase
#   READ1               md5 of the first MAPPED_BYTES of the volume in phase 1
#   FREE1               md5 of the 64 KiB at FREE_AT_BYTES in phase 1 (unprovisioned: zeros)
#   WRITE1 / WRITE2     "ok" or "failed": a 64 KiB O_DIRECT write at FREE_AT_BYTES
#   CLEAR               thin_check --clear-needs-check-flag's exit status
#   META2               md5 of the metadata device after the flag is cleared
#   NEW2                md5 of the 64 KiB at FREE_AT_BYTES read back in phase 2
# Diagnostics (dd and thin_check messages, the kernel log) go to stderr. Teardown commits.
set -u
dbs=$1 vol=$2 sectors=$3 mapped=$4 free_at=$5
len=$((DATA_SECTORS / dbs * dbs))
K=65536

activate() {
  dmsetup create pool --table "0 $len thin-pool $META_DEV $DATA_DEV $dbs 0" || exit 3
  dmsetup create v --table "0 $sectors thin /dev/mapper/pool $vol" || exit 4
}
teardown() {
  dmsetup remove v || exit 5
  dmsetup remove pool || exit 6
}
write_free() {
  if yes "written by the kernel in phase $1" | head -c $K |
    dd of=/dev/mapper/v bs=$K seek=$((free_at / K)) oflag=direct conv=fsync 2>/tmp/dd.err; then
    echo "WRITE$1 ok"
  else
    echo "WRITE$1 failed"
    sed "s/^/dd (phase $1): /" /tmp/dd.err >&2
  fi
}
read_md5() { # BYTES_AT COUNT_OF_64K
  dd if=/dev/mapper/v bs=$K skip=$(($1 / K)) count=$2 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1
}

echo "META0 $(md5sum < "$META_DEV" | cut -d' ' -f1)"
activate
echo "STATUS1 $(dmsetup status pool)"
echo "READ1 $(read_md5 0 $((mapped / K)))"
echo "FREE1 $(read_md5 "$free_at" 1)"
write_free 1
teardown
echo "META1 $(md5sum < "$META_DEV" | cut -d' ' -f1)"

thin_check --clear-needs-check-flag "$META_DEV" >&2
echo "CLEAR $?"
echo "META2 $(md5sum < "$META_DEV" | cut -d' ' -f1)"

activate
echo "STATUS2 $(dmsetup status pool)"
write_free 2
echo "NEW2 $(read_md5 "$free_at" 1)"
teardown
dmesg | grep -i -e thin -e device-mapper | sed 's/^/kernel: /' >&2
exit 0
