#!/usr/bin/env bash
# Publishing at full size: a whole mirror's shape (mirrormesh-lab gen-mirror), published whole and with --paths-from,
# in one run, for each file count given (BENCHMARKS.md, "Full size").
#
#   benches/fullsize-publish.sh [FILES...]   # default: 100000 300000 1000000; work in $WORK (/tmp/mirrormesh-fullsize)
#
# For each N: generate N files (1.6 KiB on average), publish offline (hashes everything), publish again (nothing
# changed: the whole tree's stat walk), rebuild one package and publish it with --paths-from, rebuild another and
# publish whole (the baseline). Prints wall time and peak RSS of each publish (/usr/bin/time).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# BIN_DIR: binaries already built (default: build them here).
if [ -z "${BIN_DIR:-}" ]; then cargo build --release --quiet --workspace --manifest-path "$here/Cargo.toml"; fi
B="${BIN_DIR:-$here/target/release}"
WORK="${WORK:-/tmp/mirrormesh-fullsize}"
[ $# -gt 0 ] || set -- 100000 300000 1000000
for n in "$@"; do
  D=$WORK/$n; rm -rf "$D"; mkdir -p "$D"
  mib=$(( n * 16 / 10240 ))
  echo "== $n files, $mib MiB $(date +%T)"
  $B/mirrormesh-lab gen-mirror "$D/tree" --files "$n" --mib "$mib" --seed 1
  $B/mirrormesh keygen --out "$D/key" > /dev/null
  pub() { /usr/bin/time -f "  wall %e s, peak RSS %M KiB" $B/mirrormesh publish --tree "$D/tree" --key "$D/key" --state "$D/state" "$@" 2>&1 | grep -E "files |entries|scan |wall"; }
  echo "-- first publish (whole tree, hashing everything)"; pub
  echo "-- again, nothing changed (whole tree: a stat walk)"; pub
  $B/mirrormesh-lab gen-mirror "$D/tree" --update 1 --seed 5 --changed-out "$D/changed"
  echo "-- one package rebuilt: published with --paths-from ($(wc -l < "$D/changed") paths)"; pub --paths-from "$D/changed"
  $B/mirrormesh-lab gen-mirror "$D/tree" --update 1 --seed 6 --changed-out "$D/changed2"
  echo "-- another package rebuilt: published whole (stat walk)"; pub
  echo "-- after: $(date +%T)"
done
