#!/usr/bin/env bash
# start-apiserver.sh DIR — run a throw-away Kubernetes 1.20 control plane
# (etcd + kube-apiserver + kube-controller-manager) on 127.0.0.1 with all
# state in DIR, wait until it is ready, and exit 0 leaving it running.
#
# Needs the binaries cached by build-apiserver.sh (in
# ${SHOAL_KUBE_CACHE:-/var/cache/shoal/kube}/bin); installs etcd-server and
# openssl with apt-get when missing.
#
# Output in DIR:
#   kubeconfig   admin (system:masters) client cert, server https://127.0.0.1:PORT
#   env          shell-sourceable ports/URLs (SHOAL_KUBE_APISERVER_URL, ...)
#   pids         one PID a line: etcd, kube-apiserver, kube-controller-manager
#   *.log        process logs; pki/ certificates and keys; etcd/ data
# Stop with stop-apiserver.sh DIR.
#
# Ports: three consecutive free ports from a random base in 20000-32699 (etcd
# client, etcd peer, apiserver): below Linux's ephemeral range (32768+) so
# outgoing connections cannot take them, and away from a system etcd on 2379,
# so parallel instances do not collide. SHOAL_KUBE_PORT_BASE=N pins them to N, N+1, N+2. The
# controller-manager serves no port at all (--port=0 --secure-port=0).
# SHOAL_KUBE_READY_TIMEOUT (s, default 120) bounds the wait.
set -euo pipefail

log() { echo "[start-apiserver $(date -u +%H:%M:%S)] $*"; }
die() { log "ERROR: $*"; exit 1; }

[[ $# -eq 1 ]] || die "usage: $0 DIR"
mkdir -p "$1"
DIR=$(cd "$1" && pwd -P) # absolute: the stop script matches it in /proc/PID/cmdline
CACHE=${SHOAL_KUBE_CACHE:-/var/cache/shoal/kube}
APISERVER=$CACHE/bin/kube-apiserver
KCM=$CACHE/bin/kube-controller-manager
TIMEOUT=${SHOAL_KUBE_READY_TIMEOUT:-120}
[[ -x $APISERVER && -x $KCM ]] ||
    die "no cached binaries in $CACHE/bin; run $(dirname "$0")/build-apiserver.sh first"
command -v kubectl >/dev/null || die "kubectl not found"

if [[ -s $DIR/pids ]]; then
    while read -r pid; do
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            die "$DIR already has a running instance (pid $pid); stop-apiserver.sh it first"
        fi
    done <"$DIR/pids"
    rm -f "$DIR/pids"
fi

# --- packages ------------------------------------------------------------
missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # Installing etcd-server may start a system etcd on 2379; we never use 2379.
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- ports ---------------------------------------------------------------
port_busy() { (: </dev/tcp/127.0.0.1/"$1") 2>/dev/null; }
if [[ -n ${SHOAL_KUBE_PORT_BASE:-} ]]; then
    BASE=$SHOAL_KUBE_PORT_BASE
else
    BASE=
    for _ in $(seq 1 50); do # bounded: 50 random tries
        b=$((20000 + RANDOM % 12700))
        if ! port_busy "$b" && ! port_busy $((b + 1)) && ! port_busy $((b + 2)); then
            BASE=$b
            break
        fi
    done
    [[ -n $BASE ]] || die "no free port triple found"
fi
ETCD_PORT=$BASE
ETCD_PEER_PORT=$((BASE + 1))
API_PORT=$((BASE + 2))
for p in $ETCD_PORT $ETCD_PEER_PORT $API_PORT; do
    port_busy "$p" && die "port $p on 127.0.0.1 is in use"
done
log "ports: etcd $ETCD_PORT (peer $ETCD_PEER_PORT), kube-apiserver $API_PORT"

# --- PKI -----------------------------------------------------------------
# Generated once per DIR. Certificates are X.509 v3 with SANs, CA:TRUE only on
# the CA and EKUs set, because rustls/webpki (kube-rs) rejects anything less.
PKI=$DIR/pki
mkdir -p "$PKI"
if [[ ! -s $PKI/admin.crt ]]; then
    log "generating CA, serving cert, admin client cert, service-account key"
    (
        cd "$PKI"
        umask 077
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -sha256 \
            -keyout ca.key -out ca.crt -subj "/CN=shoal-e2e-ca" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
        # sign NAME SUBJ EXTENSIONS...
        sign() {
            local name=$1 subj=$2
            shift 2
            printf '%s\n' "$@" >"$name.ext"
            openssl req -new -newkey rsa:2048 -nodes -keyout "$name.key" \
                -out "$name.csr" -subj "$subj" 2>/dev/null
            openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key \
                -CAcreateserial -days 3650 -sha256 -extfile "$name.ext" \
                -out "$name.crt" 2>/dev/null
            rm -f "$name.csr" "$name.ext"
        }
        sign apiserver "/CN=kube-apiserver" \
            "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature,keyEncipherment" \
            "extendedKeyUsage=serverAuth" \
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
        # O=system:masters is bound to cluster-admin by RBAC's bootstrap policy.
        sign admin "/O=system:masters/CN=shoal-admin" \
            "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature,keyEncipherment" \
            "extendedKeyUsage=clientAuth"
        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
        chmod 644 ./*.crt sa.pub
    )
fi

# Self-contained kubeconfig (certs embedded) so it can be copied or read by
# any client library. The controller-manager uses it too.
b64() { base64 -w0 <"$1"; }
cat >"$DIR/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: shoal-e2e
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: shoal-admin
  user:
    client-certificate-data: $(b64 "$PKI/admin.crt")
    client-key-data: $(b64 "$PKI/admin.key")
contexts:
- name: shoal-e2e
  context:
    cluster: shoal-e2e
    user: shoal-admin
    namespace: default
current-context: shoal-e2e
EOF
chmod 600 "$DIR/kubeconfig"
cat >"$DIR/env" <<EOF
SHOAL_KUBE_APISERVER_URL=https://127.0.0.1:$API_PORT
SHOAL_KUBE_APISERVER_PORT=$API_PORT
SHOAL_KUBE_ETCD_URL=http://127.0.0.1:$ETCD_PORT
KUBECONFIG=$DIR/kubeconfig
EOF

# --- processes -----------------------------------------------------------
PIDS=()
cleanup_on_failure() {
    local rc=$?
    if ((rc != 0)) && ((${#PIDS[@]})); then
        log "start failed; stopping ${PIDS[*]}"
        kill "${PIDS[@]}" 2>/dev/null || true
        for f in etcd kube-apiserver kube-controller-manager; do
            if [[ -f $DIR/$f.log ]]; then echo "--- tail $DIR/$f.log"; tail -n 25 "$DIR/$f.log"; fi
        done
        rm -f "$DIR/pids"
    fi
}
trap cleanup_on_failure EXIT

# setsid + all three std streams redirected: the daemons must not keep the
# caller's pipes open (a test harness would otherwise wait for them forever)
# nor die with the caller's process group.
spawn() {
    local name=$1
    shift
    setsid "$@" </dev/null >"$DIR/$name.log" 2>&1 &
    PIDS+=($!)
    echo $! >>"$DIR/pids"
    log "started $name pid $!"
}

DEADLINE=$((SECONDS + TIMEOUT))
alive() { local p; for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || return 1; done; }

: >"$DIR/pids"
mkdir -p "$DIR/etcd"
chmod 700 "$DIR/etcd"
spawn etcd etcd --name shoal-e2e --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "shoal-e2e=http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster-state new --logger zap --log-level warn

# apiserver would retry etcd itself, but failing here gives a clearer error.
until curl -fsS -m 2 "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1; do
    alive || die "etcd exited"
    ((SECONDS < DEADLINE)) || die "etcd not healthy after ${TIMEOUT}s"
    sleep 0.5
done
log "etcd healthy"

# Flags: only loopback is served (--insecure-port=0 closes 1.20's old
# plain-HTTP port). --endpoint-reconciler-type=none: the apiserver would
# otherwise try to publish 127.0.0.1 as the `kubernetes` Service endpoint,
# which validation rejects (loopback). The service CIDR is loopback too, so a
# ClusterIP that something did try to reach stays on this host (no kube-proxy
# here anyway). RBAC + the system:masters client cert = cluster-admin.
spawn kube-apiserver "$APISERVER" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 \
    --secure-port "$API_PORT" --insecure-port 0 \
    --cert-dir "$PKI" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" \
    --service-account-signing-key-file "$PKI/sa.key" \
    --service-cluster-ip-range 127.240.0.0/16 \
    --endpoint-reconciler-type none \
    --allow-privileged=true \
    --profiling=false \
    --v 1

# One client identity for every controller (admin cert) keeps RBAC setup
# trivial. No leader election: a single instance, and it starts faster.
# --flex-volume-plugin-dir: it would otherwise create /usr/libexec/kubernetes.
spawn kube-controller-manager "$KCM" \
    --kubeconfig "$DIR/kubeconfig" \
    --bind-address 127.0.0.1 --port 0 --secure-port 0 \
    --leader-elect=false \
    --use-service-account-credentials=false \
    --service-account-private-key-file "$PKI/sa.key" \
    --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --flex-volume-plugin-dir "$DIR/flexvolume" \
    --profiling=false \
    --v 1

KC=(kubectl --kubeconfig "$DIR/kubeconfig" --request-timeout 5s)
until "${KC[@]}" get --raw /readyz >/dev/null 2>&1; do
    alive || die "a control-plane process exited"
    ((SECONDS < DEADLINE)) || die "kube-apiserver not ready after ${TIMEOUT}s"
    sleep 1
done
log "kube-apiserver ready (/readyz) at https://127.0.0.1:$API_PORT"

# The controller-manager creates each namespace's `default` ServiceAccount;
# Pods are refused until it exists, so wait for it as proof the KCM works.
until "${KC[@]}" -n default get serviceaccount default >/dev/null 2>&1; do
    alive || die "a control-plane process exited"
    ((SECONDS < DEADLINE)) || die "controller-manager did not create default/default SA in ${TIMEOUT}s"
    sleep 1
done
log "kube-controller-manager working; kubeconfig: $DIR/kubeconfig (pids in $DIR/pids)"
