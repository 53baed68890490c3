#!/usr/bin/env bash
# Publisher scan speed against b3sum, on the same files, in one run.
#
#   benches/publish-vs-b3sum.sh [WORKDIR] [APKINDEX] [FRACTION]
#   COLD=1 benches/publish-vs-b3sum.sh ...   # drop the page cache before each full read instead (needs root)
#
# Generates (once) a tree from the real v3.17 aarch64 index (3.6 GiB), warms the page cache so both tools hash from
# memory, then times: b3sum over every file (all cores), `mirrormesh publish` with an empty state dir (first scan:
# hashes everything), and `mirrormesh publish` again (unchanged rescan: stats only). Prints times and ratios.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/mirrormesh-publish-bench}"
index="${2:-$here/../shared/data/alpine-v3.17-main-aarch64.APKINDEX.tar.gz}"
fraction="${3:-1}"
command -v b3sum >/dev/null || { echo "b3sum is needed (apt-get install b3sum)" >&2; exit 1; }

cargo build --release --quiet --manifest-path "$here/Cargo.toml"
bin="$here/target/release/mirrormesh"
mkdir -p "$work"
if [ ! -d "$work/tree/alpine" ]; then
  "$bin" gen-tree "$work/tree" --apkindex "$index" --fraction "$fraction" >/dev/null
fi
rm -rf "$work/state" "$work/key"
"$bin" keygen --out "$work/key" >/dev/null

files=$(find "$work/tree" -type f | wc -l)
bytes=$(find "$work/tree" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%.0f", s}')
cache() {
  if [ "${COLD:-0}" = 1 ]; then sync; echo 3 >/proc/sys/vm/drop_caches; else
    find "$work/tree" -type f -print0 | xargs -0 cat >/dev/null; fi
}
mode=warm; [ "${COLD:-0}" = 1 ] && mode=cold

now() { date +%s.%N; }
cache; t0=$(now); find "$work/tree" -type f -print0 | xargs -0 b3sum >/dev/null; t1=$(now)
cache; t1=$(now); "$bin" publish --tree "$work/tree" --key "$work/key" --state "$work/state" >"$work/first.txt"; t2=$(now)
"$bin" publish --tree "$work/tree" --key "$work/key" --state "$work/state" >"$work/second.txt"; t3=$(now)

python3 - "$t0" "$t1" "$t2" "$t3" "$files" "$bytes" "$mode" <<'PY'
import sys
t0, t1, t2, t3 = map(float, sys.argv[1:5]); files, size, mode = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
b3, first, rescan = t1 - t0, t2 - t1, t3 - t2
gib = size / 2**30
print(f"tree: {files} files, {gib:.2f} GiB (page cache {mode} before each full read)")
print(f"{'run':<40} {'seconds':>8} {'GiB/s':>7} {'ratio':>14}")
print(f"{'b3sum, every file (baseline)':<40} {b3:>8.2f} {gib / b3:>7.2f} {'1.00':>14}")
print(f"{'mirrormesh publish, first scan':<40} {first:>8.2f} {gib / first:>7.2f} {first / b3:>8.2f} x b3sum")
print(f"{'mirrormesh publish, unchanged rescan':<40} {rescan:>8.3f} {'':>7} {rescan / first:>8.4f} x first")
PY
echo; echo "first publish:"; cat "$work/first.txt"; echo; echo "rescan:"; cat "$work/second.txt"
