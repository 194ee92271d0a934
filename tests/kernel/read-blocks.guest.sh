#!/bin/sh
# Generic reader, guest side (run by tests/src/kernel.rs `read_blocks`): activate the pool on
# $META_DEV/$DATA_DEV, create one thin device per listed dev id, and print the md5 of each listed
# virtual block as read by the kernel with O_DIRECT. Tears everything down cleanly at the end (so
# the kernel commits; the host passes --snapshot when the files must stay untouched).
#
# Arguments: DATA_BLOCK_SIZE (sectors, as in the metadata) then DEV:VBLOCK[,VBLOCK...] per device.
# stdout: one line "DEV VBLOCK MD5" per block, in argument order ("no-such-device" instead of the
# md5 when the thin device cannot be activated). Diagnostics go to stderr.
# The pool's table length is $DATA_SECTORS rounded down to whole blocks: give a data file of
# exactly nr_data_blocks * block size, or the kernel grows the pool (and commits that).
set -eu

dbs=$1
shift
BS=$((dbs * 512))
CHUNK=65536                         # dd unit: every valid pool block size is a multiple of 64 KiB
PER=$((BS / CHUNK))

len=$((DATA_SECTORS / dbs * dbs))
dmsetup create pool --table "0 $len thin-pool $META_DEV $DATA_DEV $dbs 0"
echo "pool: $(dmsetup status pool)" >&2
active=

for a in "$@"; do
  dev=${a%%:*}
  max=0
  old_ifs=$IFS; IFS=,
  for v in ${a#*:}; do if [ "$v" -gt "$max" ]; then max=$v; fi; done
  IFS=$old_ifs
  if dmsetup create "thin$dev" --table "0 $(((max + 1) * dbs)) thin /dev/mapper/pool $dev"; then
    echo "thin$dev: $(dmsetup status "thin$dev")" >&2
    active="$active $dev"
  else
    echo "thin$dev: cannot be activated (no such device in the pool?)" >&2
  fi
done

for a in "$@"; do
  dev=${a%%:*}
  old_ifs=$IFS; IFS=,
  set -f
  blocks=${a#*:}
  for v in $blocks; do
    IFS=$old_ifs
    case " $active " in
      *" $dev "*)
        sum=$(dd if="/dev/mapper/thin$dev" bs=$CHUNK skip=$((v * PER)) count=$PER iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1) ;;
      *) sum=no-such-device ;;
    esac
    echo "$dev $v $sum"
    IFS=,
  done
  IFS=$old_ifs
  set +f
done

for dev in $active; do dmsetup remove "thin$dev"; done
dmsetup remove pool
