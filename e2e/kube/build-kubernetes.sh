#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kube-scheduler and kubelet
# once from Debian's `kubernetes` source package (1.20.2, the bookworm
# upload) and cache them in
# ${SHOAL_KUBE_CACHE:-/var/cache/shoal/kube}/bin. Exits at once when cached.
#
# Why from source: no Kubernetes release binaries can be fetched here; Debian
# ships the full upstream tree (with vendor/) but packages only kubectl.
#
# Go: bookworm's golang-go (1.19). The tree builds with it as-is except for one
# runtime bug: the vendored github.com/modern-go/reflect2 v1.0.1 links to
# reflect.mapiterinit with its pre-Go-1.18 signature and crashes when
# json-iterator iterates a map. We swap in Debian's reflect2 1.0.2
# (golang-github-modern-go-reflect2-dev), the upstream fix, API-compatible.
#
# Env: SHOAL_KUBE_CACHE (cache root), SHOAL_KUBE_BUILD_P (go build -p, default 2).
set -euo pipefail

CACHE=${SHOAL_KUBE_CACHE:-/var/cache/shoal/kube}
BIN=$CACHE/bin
BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet)

log() { echo "[build-kubernetes $(date -u +%H:%M:%S)] $*"; }

cached() {
    local b
    for b in "${BINS[@]}"; do [[ -x $BIN/$b ]] || return 1; done
}

if cached; then
    log "cached: ${BINS[*]} in $BIN"
    exit 0
fi

# Pinned source: bookworm's upload of the kubernetes source package.
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
UPSTREAM=1.20.2
POOL=http://deb.debian.org/debian/pool/main/k/kubernetes
declare -A SHA256=(
    [kubernetes_${DEB_VERSION}.dsc]=19fa1da5aefcef673894ac9511986bd98a14410cf8eea0b626613c30df435257
    [kubernetes_1.20.5+really1.20.2.orig.tar.gz]=b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc
    [kubernetes_${DEB_VERSION}.debian.tar.xz]=9b6e5fd41769d2b5badf2e73b274e3bcd90f85e13d06a1a4a845ccce018127d8
)

mkdir -p "$CACHE"
# Serialise concurrent CI jobs; the second one finds the cache filled.
exec 9>"$CACHE/.build.lock"
log "taking build lock $CACHE/.build.lock (waits while another build runs)"
flock -w 7200 9 || { log "ERROR: lock not acquired within 2h"; exit 1; }
if cached; then
    log "cached by a concurrent run: $BIN"
    exit 0
fi

START=$(date +%s)

# --- toolchain -------------------------------------------------------------
# rsync: `make gen_openapi` copies the tree's API sources with it.
PKGS=(golang-go golang-github-modern-go-reflect2-dev dpkg-dev make curl ca-certificates rsync)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine has no package lists yet.
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
GO=$(command -v go || echo /usr/lib/go/bin/go)
log "using $($GO version)"
REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2
[[ -f $REFLECT2_SRC/go_above_118.go ]] || { log "ERROR: $REFLECT2_SRC lacks the Go>=1.18 fix"; exit 1; }

# --- source ----------------------------------------------------------------
SRC=$CACHE/src
mkdir -p "$SRC/dl"
for f in "${!SHA256[@]}"; do
    out=$SRC/dl/$f
    if [[ -f $out ]] && echo "${SHA256[$f]}  $out" | sha256sum -c --status; then
        continue
    fi
    log "downloading $f"
    # '+' must be escaped in the URL path for some mirrors/proxies.
    curl -fsSL --retry 3 --max-time 900 -o "$out.part" "$POOL/${f//+/%2B}"
    echo "${SHA256[$f]}  $out.part" | sha256sum -c --status || { log "ERROR: sha256 mismatch for $f"; exit 1; }
    mv "$out.part" "$out"
done

TREE=$SRC/kubernetes-$UPSTREAM
# Always unpack afresh so a half-finished earlier run cannot leave a bad tree.
rm -rf "$TREE"
log "unpacking and applying Debian patches (dpkg-source -x)"
(cd "$SRC" && dpkg-source --no-check --no-copy -x "dl/kubernetes_${DEB_VERSION}.dsc" "$TREE" >/dev/null)

log "replacing vendored reflect2 v1.0.1 with Debian's $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)"
V=$TREE/vendor/github.com/modern-go/reflect2
rm -rf "$V"
mkdir -p "$V"
cp "$REFLECT2_SRC"/*.go "$REFLECT2_SRC"/*.s "$V"/
rm -f "$V"/*_test.go

# The tarball lacks pkg/generated/openapi/zz_generated.openapi.go, which
# upstream's `make` generates before compiling (without it kube-apiserver
# fails with "undefined: openapi.GetOpenAPIDefinitions"). Every other
# generated file is in the tarball. Takes ~30 s.
log "generating OpenAPI definitions (make gen_openapi)"
(cd "$TREE" && env -u GOFLAGS GOMAXPROCS=2 GOPROXY=off GO111MODULE=off CGO_ENABLED=0 \
    GOTOOLCHAIN=local KUBE_GIT_VERSION=v$UPSTREAM nice -n 19 make gen_openapi)
[[ -s $TREE/pkg/generated/openapi/zz_generated.openapi.go ]] || { log "ERROR: openapi generation produced nothing"; exit 1; }

# --- build -----------------------------------------------------------------
# 1.20's own build (hack/lib/init.sh) uses GOPATH mode (GO111MODULE=off); in
# module mode Go 1.19 rejects the tree ("updates to go.mod needed, disabled by
# -mod=vendor"). So: a GOPATH whose k8s.io/kubernetes links to the tree.
# Go caches live under the cache dir so a re-build is incremental and CI's
# $HOME is not polluted. GOPROXY=off: everything comes from vendor/.
GOPATH_DIR=$CACHE/gopath
mkdir -p "$GOPATH_DIR/src/k8s.io"
ln -sfn "$TREE" "$GOPATH_DIR/src/k8s.io/kubernetes"
export GOCACHE=$CACHE/go-build GOPATH=$GOPATH_DIR GOFLAGS='' GO111MODULE=off \
    GOPROXY=off GOTOOLCHAIN=local CGO_ENABLED=0 GOMAXPROCS=${GOMAXPROCS:-2}
P=${SHOAL_KUBE_BUILD_P:-2}
LDFLAGS="-s -w"
for pkg in k8s.io/kubernetes/vendor/k8s.io/{component-base,client-go/pkg}/version; do
    LDFLAGS+=" -X $pkg.gitVersion=v$UPSTREAM -X $pkg.gitMajor=1 -X $pkg.gitMinor=20"
    LDFLAGS+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
done

mkdir -p "$BIN"
for b in "${BINS[@]}"; do
    [[ -x $BIN/$b ]] && { log "$b already cached"; continue; }
    log "go build $b (nice 19, -p $P, GOMAXPROCS=$GOMAXPROCS); this takes long"
    t0=$(date +%s)
    (cd "$GOPATH_DIR/src/k8s.io/kubernetes" && nice -n 19 "$GO" build -p "$P" -trimpath -ldflags "$LDFLAGS" \
        -o "$BIN/.$b.tmp" "k8s.io/kubernetes/cmd/$b")
    mv "$BIN/.$b.tmp" "$BIN/$b" # atomic: a cached binary is always complete
    log "built $b in $(( $(date +%s) - t0 ))s, $(du -h "$BIN/$b" | cut -f1)"
done

"$BIN/kube-apiserver" --version
echo "debian-source=kubernetes $DEB_VERSION; $($GO version); reflect2 from Debian" >"$BIN/BUILD-INFO"
# The unpacked tree (~450 MB) is not needed any more; tarballs and GOCACHE stay.
rm -rf "$TREE" "$GOPATH_DIR/src/k8s.io/kubernetes"
log "done in $(( $(date +%s) - START ))s: $BIN"
