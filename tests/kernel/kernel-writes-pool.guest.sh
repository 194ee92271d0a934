#!/bin/sh
# Kernel writes a pool, guest side (host side: tests/it/kernel.rs `kernel_writes_pool_we_read`).
# The kernel formats the zeroed metadata device (64 KiB blocks), then: thins 0 and 5 with writes
# (whole blocks, a partial block, the last block of 1 GiB); snapshot 1 of 0 (copy-on-write on
# both sides, new blocks); snapshot 2 of snapshot 1; discards of whole blocks (unmap), of part of
# a block (no unmap) and of a block shared with a snapshot; thin 9 created, written, deleted;
# snapshot 3 of the active thin 5 then copy-on-write in 5; a held metadata snapshot
# (reserve_metadata_snap) followed by more writes; set_transaction_id 0 7; clean teardown.
# It checks what each device reads, prints "READ DEV VBLOCK MD5" for a fixed list of blocks
# of devices 0, 1, 2, 3, 5, then its own thin_check and thin_dump of the result between
# "DUMP-BEGIN" and "DUMP-END" lines, and "N failure(s)".
set -eu

BS=65536                 # pool data block: 128 sectors
VSECTORS=2097152         # virtual size of the thin devices: 1 GiB = 16384 blocks

pat() { awk -v t="$1" -v n="$2" 'BEGIN { for (o = 0; o < n; o += 16) printf "%-6.6s%09d\n", t, o }'; }
# wr TAG DEV VBLOCK [LEN [OFFSET_IN_BLOCK]]: write pat TAG LEN there (O_DIRECT, fsync)
wr() {
  pat "$1" "${4:-$BS}" |
    dd of="/dev/mapper/$2" bs=4096 seek=$((($3 * BS + ${5:-0}) / 4096)) iflag=fullblock oflag=direct conv=notrunc,fsync 2>/dev/null
}
# rd DEV VBLOCK [LEN [OFFSET_IN_BLOCK]]: md5 of what the device returns there (O_DIRECT)
rd() {
  dd if="/dev/mapper/$1" bs=4096 skip=$((($2 * BS + ${4:-0}) / 4096)) count=$((${3:-$BS} / 4096)) iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1
}
md5p() { pat "$1" "${2:-$BS}" | md5sum | cut -d' ' -f1; }
zeros() { head -c "$1" /dev/zero | md5sum | cut -d' ' -f1; }
fails=0
expect() { # expect WHAT GOT WANT
  if [ "$2" = "$3" ]; then echo "ok   $1"; else echo "FAIL $1: got $2 want $3"; fails=$((fails + 1)); fi
}
thin() { dmsetup create "$1" --table "0 $VSECTORS thin /dev/mapper/pool $2"; }
discard() { blkdiscard -o "$2" -l "$3" "/dev/mapper/$1"; }   # discard DEV OFFSET LENGTH (bytes)

dmsetup create pool --table "0 $DATA_SECTORS thin-pool $META_DEV $DATA_DEV 128 0"

# thin 0: blocks 0..9, 100, a partial block 1000, the last block 16383
dmsetup message pool 0 "create_thin 0"
thin thin0 0
for k in 0 1 2 3 4 5 6 7 8 9; do wr "A$k" thin0 "$k"; done
wr B100 thin0 100
wr P1000 thin0 1000 4096 8192
wr L16383 thin0 16383

# thin 5: blocks 0..3 and 50
dmsetup message pool 0 "create_thin 5"
thin thin5 5
for k in 0 1 2 3; do wr "E$k" thin5 "$k"; done
wr F50 thin5 50

# snapshot 1 of the active thin 0 (time 1), then both diverge
dmsetup suspend thin0
dmsetup message pool 0 "create_snap 1 0"
dmsetup resume thin0
wr G3 thin0 3                   # copy-on-write in the origin
wr H200 thin0 200               # a block the snapshot never had
thin snap1 1
wr I7 snap1 7                   # copy-on-write in the snapshot
wr J2000 snap1 2000

# snapshot 2 of snapshot 1 (time 2)
dmsetup suspend snap1
dmsetup message pool 0 "create_snap 2 1"
dmsetup resume snap1
thin snap2 2

# discards: whole blocks 5..8 of thin 0 (unmapped there, still mapped in the snapshots);
# 8 KiB inside block 0 of snapshot 2 (not a whole block: stays mapped); block 2000 of snapshot 2
# (shared with snapshot 1, which keeps it)
discard thin0 $((5 * BS)) $((4 * BS))
discard snap2 4096 8192
discard snap2 $((2000 * BS)) $BS

# thin 9: created, written, deleted (its blocks go back to the pool)
dmsetup message pool 0 "create_thin 9"
thin thin9 9
wr X0 thin9 0
wr X1 thin9 1
dmsetup remove thin9
dmsetup message pool 0 "delete 9"

# snapshot 3 of the active thin 5 (time 3), then copy-on-write of block 0 in thin 5
dmsetup suspend thin5
dmsetup message pool 0 "create_snap 3 5"
dmsetup resume thin5
wr K0 thin5 0

# a held metadata snapshot, then more writes the held view does not have
dmsetup message pool 0 reserve_metadata_snap
wr M4 thin0 4                   # copy-on-write: block 4 is shared with snapshots 1 and 2
wr N300 thin0 300
dmsetup message pool 0 "set_transaction_id 0 7"
thin snap3 3

# what the devices read
expect "thin0 block 0"           "$(rd thin0 0)"    "$(md5p A0)"
expect "snap1 block 0"           "$(rd snap1 0)"    "$(md5p A0)"
expect "snap2 block 0 (partial discard ignored)" "$(rd snap2 0)" "$(md5p A0)"
expect "thin0 block 3 (cow)"     "$(rd thin0 3)"    "$(md5p G3)"
expect "snap1 block 3"           "$(rd snap1 3)"    "$(md5p A3)"
expect "thin0 block 4 (cow)"     "$(rd thin0 4)"    "$(md5p M4)"
expect "snap2 block 4"           "$(rd snap2 4)"    "$(md5p A4)"
expect "thin0 block 5 (discarded)" "$(rd thin0 5)"  "$(zeros $BS)"
expect "snap1 block 5"           "$(rd snap1 5)"    "$(md5p A5)"
expect "snap1 block 7 (cow)"     "$(rd snap1 7)"    "$(md5p I7)"
expect "snap2 block 7"           "$(rd snap2 7)"    "$(md5p I7)"
expect "thin0 block 1000 head"   "$(rd thin0 1000 8192)" "$(zeros 8192)"
expect "thin0 block 1000 data"   "$(rd thin0 1000 4096 8192)" "$(md5p P1000 4096)"
expect "snap2 block 2000 (discarded)" "$(rd snap2 2000)" "$(zeros $BS)"
expect "snap1 block 2000"        "$(rd snap1 2000)" "$(md5p J2000)"
expect "thin0 block 2000"        "$(rd thin0 2000)" "$(zeros $BS)"
expect "snap3 block 0"           "$(rd snap3 0)"    "$(md5p E0)"
expect "thin5 block 0 (cow)"     "$(rd thin5 0)"    "$(md5p K0)"
expect "snap2 block 16383"       "$(rd snap2 16383)" "$(md5p L16383)"

for d in "0 thin0" "1 snap1" "2 snap2" "3 snap3" "5 thin5"; do
  set -- $d
  for v in 0 1 2 3 4 5 6 7 8 9 10 50 100 200 300 1000 2000 3000 16383; do
    echo "READ $1 $v $(rd "$2" "$v")"
  done
done

echo "status:"
dmsetup status pool thin0 snap1 snap2 snap3 thin5 | sed 's/^/  /'
dmsetup remove snap3
dmsetup remove snap2
dmsetup remove snap1
dmsetup remove thin5
dmsetup remove thin0
dmsetup remove pool
if thin_check "$META_DEV" >/dev/null 2>&1; then echo "ok   thin_check in the guest"; else echo "FAIL thin_check in the guest"; fails=$((fails + 1)); fi
echo "DUMP-BEGIN"
thin_dump "$META_DEV"
echo "DUMP-END"
echo "$fails failure(s)"
[ "$fails" -eq 0 ]
