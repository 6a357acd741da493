#!/usr/bin/env bash
# build-images.sh OUT — container images made from the binaries cargo built,
# as OCI archives in OUT that start-cluster.sh loads into every node's
# containerd. No registry, no container engine, no base image to pull: each
# image is busybox (Debian's busybox-static, for /bin/sh and the tools the
# pod scripts use), the program, and the shared libraries `ldd` says it
# needs, copied from this machine.
#
#   ghcr.io/shoal-storage/shoal:VERSION           the storage peer and CLI
#   ghcr.io/shoal-storage/shoal-csi:VERSION       the CSI driver
#   ghcr.io/shoal-storage/shoal-operator:VERSION  the operator
#   shoal.local/pause:1                           the pod sandbox (kubelet's pause)
#   shoal.local/busybox:1                         test pods
#   shoal.local/test-csi-sidecars:1               stand-ins for the upstream CSI sidecars
#
# Shoal's images carry the names and tags a release would push, so the
# chart's and the operator's defaults find them (imagePullPolicy
# IfNotPresent). The Dockerfiles (node/, csi-driver/, operator/) are what a
# release builds; this script is for machines without a registry.
#
# Env: CARGO_TARGET_DIR (where the binaries are; default ./target), PROFILE
# (debug).
set -euo pipefail

NAME=build-images
DIR=/nonexistent
# shellcheck source=e2e/kube/lib.sh
source "$(dirname "$0")/lib.sh"

[[ $# -eq 1 ]] || die "usage: $0 OUT"
ROOT=$(cd "$(dirname "$0")/../.." && pwd -P)
mkdir -p "$1"
OUT=$(cd "$1" && pwd -P)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/${PROFILE:-debug}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1)
need_commands busybox=busybox-static python3=python3

BUSYBOX=$(command -v busybox)
file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' ||
    ldd "$BUSYBOX" 2>&1 | grep -q 'not a dynamic' || die "$BUSYBOX is not static (install busybox-static)"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# rootfs NAME PROGRAM...: $WORK/NAME, a root filesystem with busybox and
# PROGRAMs (in /usr/local/bin, with their shared libraries at the paths ldd
# names).
rootfs() {
    local root=$WORK/$1 prog lib
    shift
    mkdir -p "$root"/{bin,usr/local/bin,tmp,etc,proc,sys,dev,run,var/tmp}
    chmod 1777 "$root/tmp" "$root/var/tmp"
    cp "$BUSYBOX" "$root/bin/busybox"
    for tool in $("$BUSYBOX" --list); do
        [[ -e $root/bin/$tool ]] || ln -s busybox "$root/bin/$tool"
    done
    echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
    echo "root:x:0:" >"$root/etc/group"
    for prog in "$@"; do
        [[ -x $prog ]] || die "$prog is missing; build it first (cargo build --workspace --bins)"
        cp "$prog" "$root/usr/local/bin/"
        for lib in $(ldd "$prog" | grep -o '/[^ ]*'); do
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    done
}

# image NAME REF [oci-image.py args]: $OUT/NAME.tar from $WORK/NAME.
image() {
    local name=$1 ref=$2
    shift 2
    python3 "$ROOT/e2e/kube/oci-image.py" --rootfs "$WORK/$name" --name "$ref" --out "$OUT/$name.tar" "$@"
    log "$ref: $OUT/$name.tar ($(du -h "$OUT/$name.tar" | cut -f1))"
}

# The pause container holds the pod's namespaces; PID 1 must end on TERM.
rootfs pause
image pause shoal.local/pause:1 \
    --entrypoint '["/bin/sh", "-c", "trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]'
rootfs busybox
image busybox shoal.local/busybox:1 --cmd '["/bin/sh"]'
for prog in shoal shoal-csi shoal-operator; do
    rootfs "$prog" "$TARGET/$prog"
done
image shoal "ghcr.io/shoal-storage/shoal:$VERSION" --entrypoint '["shoal"]'
image shoal-csi "ghcr.io/shoal-storage/shoal-csi:$VERSION" --entrypoint '["shoal-csi"]'
# As operator/Dockerfile's distroless base: the operator runs as nonroot.
image shoal-operator "ghcr.io/shoal-storage/shoal-operator:$VERSION" \
    --entrypoint '["shoal-operator"]' --cmd '["run"]' --user 65532
if [[ -x $TARGET/test-csi-sidecars ]]; then
    rootfs test-csi-sidecars "$TARGET/test-csi-sidecars" "$TARGET/fsync-appender"
    image test-csi-sidecars shoal.local/test-csi-sidecars:1
fi
