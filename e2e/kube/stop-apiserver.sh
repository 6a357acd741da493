#!/usr/bin/env bash
# stop-apiserver.sh DIR — stop what start-apiserver.sh DIR started (PIDs in
# DIR/pids). Safe to run twice or on a DIR that never started. State stays in
# DIR; delete the directory yourself.
set -euo pipefail

log() { echo "[stop-apiserver $(date -u +%H:%M:%S)] $*"; }

[[ $# -eq 1 ]] || { log "usage: $0 DIR"; exit 1; }
[[ -d $1 ]] || { log "no directory $1; nothing to stop"; exit 0; }
DIR=$(cd "$1" && pwd -P)
[[ -s $DIR/pids ]] || { log "no $DIR/pids; nothing to stop"; exit 0; }

# Only signal a PID whose command line still names DIR: a PID from a stale
# file may have been reused by an unrelated process.
ours() { [[ -r /proc/$1/cmdline ]] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "$DIR/"; }

# Reverse start order: controller-manager, apiserver, then etcd last so the
# apiserver does not spin on a missing etcd while it shuts down.
mapfile -t PIDS < <(tac "$DIR/pids")
for pid in "${PIDS[@]}"; do
    [[ $pid =~ ^[0-9]+$ ]] || continue
    if ! ours "$pid"; then
        continue
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do # bounded: 10 s for a graceful exit
        ours "$pid" || break
        sleep 0.1
    done
    if ours "$pid"; then
        log "pid $pid ignored SIGTERM for 10s; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    log "stopped pid $pid"
done
rm -f "$DIR/pids"
