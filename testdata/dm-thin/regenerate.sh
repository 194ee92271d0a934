#!/usr/bin/env bash
# Rebuild the thin_restore vectors from their XML (only when asked: --write) and check every
# vector against the sums in README.md and with thin_check. Needs thin-provisioning-tools.
set -euo pipefail
cd "$(dirname "$0")"
write=false
[ "${1:-}" = "--write" ] && write=true
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
status=0
fail() { echo "$name: $*"; status=1; bad=true; }
while read -r name sum size; do
  bad=false
  if [ "$name" = metadata-snap ] || [ "$name" = shared-root ]; then
    gunzip -c "$name.meta.gz" > "$tmp/$name.meta"          # byte-level vectors: not restorable
  else
    truncate -s "$size" "$tmp/$name.meta"
    thin_restore -q -i "$name.xml" -o "$tmp/$name.meta" >/dev/null
    if ! gunzip -c "$name.meta.gz" | cmp -s - "$tmp/$name.meta"; then
      fail "thin_restore of $name.xml differs from $name.meta.gz"
    fi
    $write && gzip -9n -c "$tmp/$name.meta" > "$name.meta.gz"
  fi
  got=$(sha256sum < "$tmp/$name.meta" | cut -d' ' -f1)
  [ "$got" = "$sum" ] || fail "sha256 $got, README says $sum"
  thin_check -q "$tmp/$name.meta" || fail "thin_check failed"
  thin_dump "$tmp/$name.meta" | cmp -s - "$name.xml" || fail "thin_dump differs from $name.xml"
  $bad || echo "$name: ok"
done < <(sed -n 's/^| \([a-z-]*\) | `\([0-9a-f]\{64\}\)` | \([0-9]*\) |$/\1 \2 \3/p' README.md)
exit $status
