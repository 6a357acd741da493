#!/usr/bin/env bash
# The filesystem benchmark: the shared peer workload (fio sequential and
# random I/O, 10,000 creates, ls -l, untar of 20,000 files) on a Shoal volume
# (3 peers, R=3, mounted by `shoal cluster up`), on native disk and on
# GlusterFS (replica 3), one after the other in the same run. Prints the
# table and Shoal's ratios to GlusterFS; raw JSON lines go to $OUT.
#
# usage: e2e/bench-fs.sh [OUT.jsonl]      (env: PEERS=dir of the peer scripts,
#        FS="shoal native gluster" to choose, and workload.sh's knobs)
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-$HERE/../shared/bench/peers}
OUT=${1:-/tmp/peers/shoal-bench-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
FS=${FS:-shoal native gluster}
SHOAL=${SHOAL:-${CARGO_TARGET_DIR:-$HERE/target}/debug/shoal}
WORK=/tmp/peers/shoal
MNT=/tmp/peers/mnt/shoal

[ -x "$PEERS/workload.sh" ] || { echo "bench-fs: no peer workload at $PEERS (set PEERS)" >&2; exit 2; }
command -v fio >/dev/null || { apt-get install -y -qq fio >/dev/null; }
mkdir -p "$(dirname "$OUT")" /tmp/peers/native

cluster_pid=""
stop_cluster() {
  if [ -n "$cluster_pid" ] && kill -0 "$cluster_pid" 2>/dev/null; then
    kill -INT "$cluster_pid"
    for _ in $(seq 150); do kill -0 "$cluster_pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$cluster_pid" 2>/dev/null || true
  fi
  cluster_pid=""
  mountpoint -q "$MNT" && umount -l "$MNT" || true
}
trap stop_cluster EXIT

for fs in $FS; do
  # Writes still on their way to the disk from before (a build, the last
  # filesystem's files) would slow the next one's sequential phases.
  sync
  case $fs in
    shoal)
      rm -rf "$WORK" && mkdir -p "$WORK" "$MNT"
      (cd "$WORK" && exec "$SHOAL" cluster up --mount "$MNT" >"$WORK/up.log" 2>&1) &
      cluster_pid=$!
      for _ in $(seq 300); do grep -q "is mounted at" "$WORK/up.log" 2>/dev/null && break; sleep 0.2; done
      grep -q "is mounted at" "$WORK/up.log" || { cat "$WORK/up.log" >&2; exit 1; }
      LABEL=shoal "$PEERS/workload.sh" "$MNT" "$OUT" >/dev/null
      stop_cluster
      ;;
    native)
      LABEL=native "$PEERS/workload.sh" /tmp/peers/native "$OUT" >/dev/null
      ;;
    *)
      "$PEERS/setup-$fs.sh" >"/tmp/peers/setup-$fs.log" 2>&1 || { echo "setup-$fs failed: /tmp/peers/setup-$fs.log" >&2; continue; }
      LABEL=$fs "$PEERS/workload.sh" "/tmp/peers/mnt/$fs" "$OUT" >/dev/null || true
      "$PEERS/teardown-$fs.sh" >"/tmp/peers/teardown-$fs.log" 2>&1 || true
      ;;
  esac
done

python3 "$PEERS/table.py" "$OUT"
python3 - "$OUT" <<'PY'
import json, sys
runs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs[r["label"]] = r
s, g = runs.get("shoal"), runs.get("gluster")
if s and g:
    print("\nShoal / GlusterFS (targets: seq write >= 2, random 4 KiB read >= 2, creates and untar >= 10):")
    for key in ["seq_write_MiBps", "seq_read_MiBps", "randread_4k_iops", "randwrite_4k_iops",
                "meta_create_fps", "meta_ls_l_fps", "meta_delete_fps", "untar_fps"]:
        if s.get(key) and g.get(key):
            print(f"  {key:20} {s[key]:>10} / {g[key]:>10} = {s[key] / g[key]:.2f}x")
PY
