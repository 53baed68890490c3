#!/usr/bin/env bash
# An initial sync at full size against rsync, in one run (BENCHMARKS.md, "An initial sync at full size").
#
#   benches/fullsize-sync.sh N        # after benches/fullsize-publish.sh N (it uses $WORK/N/tree and $WORK/N/key)
#   FRESH=K benches/fullsize-sync.sh N   # then K one-package updates, timed until the mirror serves each
#
# Starts an origin daemon on the generated tree (fresh state) and publishes, starts a mirror daemon (empty tree) and
# times it until it serves the snapshot (`mirrormesh wait`), checks both trees with diff -r, then times rsync from an
# rsync daemon on loopback with Alpine's flags into an empty directory. Prints times, files per second, the ratio,
# each daemon's peak RSS and the mirror's longest event-loop turn. Ports 7611-7630 on 127.0.0.1.
# With FRESH=K the origin watches its tree (`watch = true`, `quiet_ms = 200`: it publishes by itself, the first
# snapshot included), and after the initial sync K packages are rebuilt one at a time as builders do (new file,
# index, old file removed; `mirrormesh-lab gen-mirror --update 1`): for each, the time from the end of the write to
# the origin's publish (its log) and to the mirror serving it (its status shows the new snapshot; polled every
# 10 ms). The tree is changed by those updates (generate it again for a clean run).
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
B="${BIN_DIR:-$here/target/release}"
WORK="${WORK:-/tmp/mirrormesh-fullsize}"
D=$WORK/$1; W=$D/sync; rm -rf "$W"; mkdir -p "$W/o" "$W/m/tree" "$W/r"
okey=$D/key
$B/mirrormesh keygen --out "$W/m/node.key" > /dev/null
oid=$($B/mirrormesh key show "$okey" 2>/dev/null | awk '/node id/ {print $NF}')
[ -n "$oid" ] || { $B/mirrormesh key --help; exit 1; }
cat > "$W/o/c.toml" <<EOC
[node]
key = "$okey"
role = "origin"
state_dir = "$W/o/state"
[repo]
name = "alpine"
tree = "$D/tree"
[network]
listen = "/ip4/127.0.0.1/udp/7611/quic-v1"
data_listen = "127.0.0.1:7612"
[admin]
listen = "127.0.0.1:7613"
EOC
if [ -n "${FRESH:-}" ]; then printf '[origin]\nwatch = true\nquiet_ms = 200\n' >> "$W/o/c.toml"; fi
seq_of() { $B/mirrormesh status --admin "$1" --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["repos"][0].get("seq") or 0)' 2>/dev/null || echo 0; }
cat > "$W/m/c.toml" <<EOC
[node]
key = "$W/m/node.key"
role = "mirror"
state_dir = "$W/m/state"
[repo]
name = "alpine"
tree = "$W/m/tree"
staging_dir = "$W/m/staging"
[network]
listen = "/ip4/127.0.0.1/udp/7621/quic-v1"
data_listen = "127.0.0.1:7622"
bootstrap = ["/ip4/127.0.0.1/udp/7611/quic-v1/p2p/$oid"]
[trust]
publishers = ["$oid"]
[admin]
listen = "127.0.0.1:7623"
EOC
$B/mirrormesh daemon --config "$W/o/c.toml" > "$W/o/log" 2>&1 & opid=$!
for i in $(seq 1 100); do $B/mirrormesh status --admin 127.0.0.1:7613 >/dev/null 2>&1 && break; sleep 0.2; done
if [ -n "${FRESH:-}" ]; then
  s=$(date +%s.%N); seq=0
  while [ "$seq" = 0 ]; do sleep 0.1; seq=$(seq_of 127.0.0.1:7613); done; e=$(date +%s.%N)
  echo "origin's first publish by its watcher (fresh state): $(echo "$e - $s" | bc) s after its admin API answered"
else
  s=$(date +%s.%N); $B/mirrormesh publish --admin 127.0.0.1:7613 > "$W/pub.txt" 2>&1; e=$(date +%s.%N)
  echo "origin publish (fresh state): $(echo "$e - $s" | bc) s; $(grep files "$W/pub.txt")"
  seq=$(awk '/published/ {print $NF}' "$W/pub.txt")
fi
$B/mirrormesh daemon --config "$W/m/c.toml" > "$W/m/log" 2>&1 & mpid=$!
s=$(date +%s.%N)
for i in $(seq 1 200); do $B/mirrormesh status --admin 127.0.0.1:7623 >/dev/null 2>&1 && break; sleep 0.05; done
$B/mirrormesh wait --admin 127.0.0.1:7623 --seq "$seq" --timeout 3000 > "$W/wait.txt" 2>&1; rc=$?
e=$(date +%s.%N); mm=$(echo "$e - $s" | bc)
echo "mirror initial sync (daemon start to snapshot served): rc=$rc $mm s, $(echo "$1 / $mm" | bc) files/s"
echo "peak RSS: origin $(grep VmHWM /proc/$opid/status | awk '{print $2}') KiB, mirror $(grep VmHWM /proc/$mpid/status | awk '{print $2}') KiB"
$B/mirrormesh status --admin 127.0.0.1:7623 --json 2>/dev/null | tr ',' '\n' | grep -i "loop_turn\|stall" | head -5
grep -h "slow event-loop turn" "$W/m/log" | sed 's/.*woken_by="\([a-z_]*\)".*turn_ms=\([0-9]*\).*/\1 \2/' \
  | sort -k2 -n | tail -3 | tr '\n' ';' | sed 's/^/mirror: longest slow turns (woken by, ms): /'; echo
diff -rq "$D/tree" "$W/m/tree" > /dev/null && echo "mirror tree identical" || echo "MIRROR TREE DIFFERS"
for i in $(seq 1 "${FRESH:-0}"); do
  before=$(seq_of 127.0.0.1:7623)
  $B/mirrormesh-lab gen-mirror "$D/tree" --update 1 --seed $((100 + i)) > /dev/null; t0=$(date +%s.%N)
  now=$before; n=0
  while [ "$now" = "$before" ] && [ $n -lt 3000 ]; do sleep 0.01; now=$(seq_of 127.0.0.1:7623); n=$((n + 1)); done
  t1=$(date +%s.%N)
  pub=$(grep ': published ' "$W/o/log" | tail -1 | cut -c1-27)
  pubs=$(date -d "$pub" +%s.%N 2>/dev/null || echo "$t1")
  echo "one package rebuilt ($i): published $(echo "$pubs - $t0" | bc) s after the write ended, served by the mirror $(echo "$t1 - $t0" | bc) s after"
done
if [ -n "${FRESH:-}" ]; then
  # (The packages the updates replaced stay on the mirror for its deletion grace period: only those may differ.)
  left=$(diff -rq "$D/tree" "$W/m/tree" | grep -vc "^Only in $W/m/tree")
  [ "$left" = 0 ] && echo "mirror tree identical after the updates (but for files pending deletion)" || echo "MIRROR TREE DIFFERS after the updates: $left"
fi
kill $opid $mpid; wait 2>/dev/null
cat > "$W/r/rsyncd.conf" <<EOC
port = 7630
use chroot = no
[mirror]
path = $D/tree
read only = yes
EOC
rsync --daemon --no-detach --config="$W/r/rsyncd.conf" & rpid=$!
sleep 1
s=$(date +%s.%N)
rsync --archive --update --hard-links --delete --delete-after --delay-updates rsync://127.0.0.1:7630/mirror/ "$W/r/tree/"
e=$(date +%s.%N); rs=$(echo "$e - $s" | bc)
kill $rpid; wait 2>/dev/null
echo "rsync initial copy: $rs s, $(echo "$1 / $rs" | bc) files/s; mirrormesh / rsync time: $(echo "scale=2; $mm / $rs" | bc)"
