#!/usr/bin/env bash
# stop-cluster.sh DIR — stops what start-cluster.sh DIR started: kubelets,
# containerds, the control plane, then every process left in the cluster's
# cgroup tree (containers and their shims), then the namespaces' holders,
# so the network and mount namespaces, and every mount in them, go. Safe to
# run twice or on a DIR that never started. State stays in DIR.
set -euo pipefail

NAME=stop-cluster
HERE=$(cd "$(dirname "$0")" && pwd -P)
# shellcheck source=e2e/kube/lib.sh
source "$HERE/lib.sh"

[[ $# -eq 1 ]] || die "usage: $0 DIR"
[[ -d $1 ]] || { log "no directory $1; nothing to stop"; exit 0; }
DIR=$(cd "$1" && pwd -P)
CG=$(cgroup_name "$DIR")

stop_pids

# What is left in the cgroup tree: containers, shims, anything they forked.
tree_pids() {
    local h
    for h in $(cgroup_hierarchies); do
        [[ -d $h/$CG ]] && find "$h/$CG" -name cgroup.procs -exec cat {} + 2>/dev/null
    done | sort -un
}
for _ in $(seq 1 100); do # bounded: 10 s
    mapfile -t left < <(tree_pids)
    ((${#left[@]})) || break
    kill -KILL "${left[@]}" 2>/dev/null || true
    sleep 0.1
done
((${#left[@]} == 0)) || log "WARNING: processes ${left[*]} outlived SIGKILL"

if [[ -s $DIR/netns.pid ]]; then
    pid=$(cat "$DIR/netns.pid")
    ours "$pid" && kill -KILL "$pid" 2>/dev/null || true
    rm -f "$DIR/netns.pid"
fi
for h in $(cgroup_hierarchies); do
    [[ -d $h/$CG ]] && find "$h/$CG" -depth -type d -exec rmdir {} + 2>/dev/null || true
done
log "stopped the cluster in $DIR"
