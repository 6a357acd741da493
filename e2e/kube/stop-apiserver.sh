#!/usr/bin/env bash
# stop-apiserver.sh DIR — stop what start-apiserver.sh DIR started (PIDs in
# DIR/pids), newest first, so the apiserver does not spin on a missing etcd
# while it shuts down. Safe to run twice or on a DIR that never started.
# State stays in DIR; delete the directory yourself.
set -euo pipefail

NAME=stop-apiserver
# shellcheck source=e2e/kube/lib.sh
source "$(dirname "$0")/lib.sh"

[[ $# -eq 1 ]] || die "usage: $0 DIR"
[[ -d $1 ]] || { log "no directory $1; nothing to stop"; exit 0; }
DIR=$(cd "$1" && pwd -P)
stop_pids
