#!/usr/bin/env bash
# in-cgroup.sh CGROUP CMD... — runs CMD in cgroup CGROUP (a path below the
# root, e.g. shoal-kube-1234abcd/node-1) of every cgroup hierarchy, so that
# stop-cluster.sh finds and stops it and everything it starts.
set -euo pipefail
NAME=in-cgroup
# shellcheck source=e2e/kube/lib.sh
source "$(dirname "$0")/lib.sh"
join_cgroup "$1" $$
shift
exec "$@"
