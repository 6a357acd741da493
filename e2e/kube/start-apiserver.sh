#!/usr/bin/env bash
# start-apiserver.sh DIR — run a throw-away Kubernetes 1.20 control plane
# (etcd + kube-apiserver + kube-controller-manager, and kube-scheduler when
# asked) with all state in DIR, wait until it is ready, and exit 0 leaving
# it running.
#
# Needs the binaries cached by build-kubernetes.sh (in
# ${SHOAL_KUBE_CACHE:-/var/cache/shoal/kube}/bin); installs etcd-server and
# openssl with apt-get when missing.
#
# Output in DIR:
#   kubeconfig   admin (system:masters) client cert, server https://ADDRESS:PORT
#   env          shell-sourceable ports/URLs (SHOAL_KUBE_APISERVER_URL, ...)
#   pids         one PID a line: etcd, kube-apiserver, kube-controller-manager[, kube-scheduler]
#   *.log        process logs; pki/ certificates and keys; etcd/ data
# Stop with stop-apiserver.sh DIR.
#
# By default everything listens on 127.0.0.1 only. Ports: three consecutive
# free ports from a random base in 20000-32699 (etcd client, etcd peer,
# apiserver): below Linux's ephemeral range (32768+) so outgoing connections
# cannot take them, and away from a system etcd on 2379, so parallel
# instances do not collide. SHOAL_KUBE_PORT_BASE=N pins them to N, N+1, N+2.
# The controller-manager and scheduler serve no port at all.
#
# For a cluster with kubelets (start-cluster.sh runs this inside the network
# namespace it made), SHOAL_KUBE_ADDRESS=IP serves the API on that address
# as well as loopback, advertises it as the `kubernetes` Service's endpoint,
# and authorises kubelets (Node authorizer, NodeRestriction);
# SHOAL_KUBE_SERVICE_CIDR sets the Service range (its first address is the
# `kubernetes` Service's ClusterIP, in the serving certificate);
# SHOAL_KUBE_API_PORT pins the API port; SHOAL_KUBE_SCHEDULER=1 starts
# kube-scheduler. SHOAL_KUBE_READY_TIMEOUT (s, default 120) bounds the wait.
set -euo pipefail

NAME=start-apiserver
# shellcheck source=e2e/kube/lib.sh
source "$(dirname "$0")/lib.sh"

[[ $# -eq 1 ]] || die "usage: $0 DIR"
mkdir -p "$1"
DIR=$(cd "$1" && pwd -P) # absolute: the stop script matches it in /proc/PID/cmdline
CACHE=${SHOAL_KUBE_CACHE:-/var/cache/shoal/kube}
BIN=$CACHE/bin
TIMEOUT=${SHOAL_KUBE_READY_TIMEOUT:-120}
ADDRESS=${SHOAL_KUBE_ADDRESS:-}
SERVICE_CIDR=${SHOAL_KUBE_SERVICE_CIDR:-127.240.0.0/16}
SCHEDULER=${SHOAL_KUBE_SCHEDULER:-0}
for b in kube-apiserver kube-controller-manager kube-scheduler; do
    [[ -x $BIN/$b ]] || die "no cached $b in $BIN; run $(dirname "$0")/build-kubernetes.sh first"
done
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
# Installing etcd-server may start a system etcd on 2379; we never use 2379.
need_commands etcd=etcd-server openssl=openssl curl=curl

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
API_PORT=${SHOAL_KUBE_API_PORT:-$((BASE + 2))}
for p in $ETCD_PORT $ETCD_PEER_PORT $API_PORT; do
    port_busy "$p" && die "port $p on 127.0.0.1 is in use"
done
log "ports: etcd $ETCD_PORT (peer $ETCD_PEER_PORT), kube-apiserver $API_PORT"

# --- PKI -----------------------------------------------------------------
# Generated once per DIR.
PKI=$DIR/pki
make_ca "$PKI"
# The `kubernetes` Service's ClusterIP: the first address of the range.
SERVICE_IP=$(python3 -c "import ipaddress,sys; print(ipaddress.ip_network(sys.argv[1])[1])" "$SERVICE_CIDR")
SANS="IP:127.0.0.1,IP:$SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
[[ -n $ADDRESS ]] && SANS+=",IP:$ADDRESS"
server_cert "$PKI" apiserver "/CN=kube-apiserver" "$SANS"
# O=system:masters is bound to cluster-admin by RBAC's bootstrap policy.
client_cert "$PKI" admin "/O=system:masters/CN=shoal-admin"
HOST=${ADDRESS:-127.0.0.1}
# Self-contained kubeconfig so it can be copied or read by any client
# library. The controller-manager and scheduler use it too.
write_kubeconfig "$DIR/kubeconfig" "https://$HOST:$API_PORT" "$PKI" admin
cat >"$DIR/env" <<EOF
SHOAL_KUBE_APISERVER_URL=https://$HOST:$API_PORT
SHOAL_KUBE_APISERVER_PORT=$API_PORT
SHOAL_KUBE_ETCD_URL=http://127.0.0.1:$ETCD_PORT
KUBECONFIG=$DIR/kubeconfig
EOF

# --- processes -----------------------------------------------------------
cleanup_on_failure() {
    local rc=$?
    if ((rc != 0)) && ((${#PIDS[@]})); then
        log "start failed; stopping ${PIDS[*]}"
        kill "${PIDS[@]}" 2>/dev/null || true
        for f in etcd kube-apiserver kube-controller-manager kube-scheduler; do
            if [[ -f $DIR/$f.log ]]; then echo "--- tail $DIR/$f.log"; tail -n 25 "$DIR/$f.log"; fi
        done
        rm -f "$DIR/pids"
    fi
}
trap cleanup_on_failure EXIT

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
wait_until "etcd health" "$TIMEOUT" curl -fsS -m 2 "http://127.0.0.1:$ETCD_PORT/health"
log "etcd healthy"

# --insecure-port=0 closes 1.20's old plain-HTTP port. RBAC + the
# system:masters client cert = cluster-admin.
API_FLAGS=(
    --etcd-servers "http://127.0.0.1:$ETCD_PORT"
    --secure-port "$API_PORT" --insecure-port 0
    --cert-dir "$PKI"
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key"
    --client-ca-file "$PKI/ca.crt"
    --service-account-issuer https://kubernetes.default.svc.cluster.local
    --service-account-key-file "$PKI/sa.pub"
    --service-account-signing-key-file "$PKI/sa.key"
    --service-cluster-ip-range "$SERVICE_CIDR"
    --allow-privileged=true
    --profiling=false
    --v 1
)
if [[ -z $ADDRESS ]]; then
    # Only loopback is served. --endpoint-reconciler-type=none: the
    # apiserver would otherwise try to publish 127.0.0.1 as the `kubernetes`
    # Service endpoint, which validation rejects (loopback).
    API_FLAGS+=(--bind-address 127.0.0.1 --advertise-address 127.0.0.1
        --endpoint-reconciler-type none --authorization-mode RBAC)
else
    # All addresses of the caller's network namespace (ADDRESS, the Service
    # IP and loopback). Kubelets authenticate with system:node client
    # certificates; exec and logs reach them with the admin certificate.
    API_FLAGS+=(--bind-address 0.0.0.0 --advertise-address "$ADDRESS"
        --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction
        --kubelet-client-certificate "$PKI/admin.crt" --kubelet-client-key "$PKI/admin.key"
        --kubelet-preferred-address-types InternalIP)
fi
spawn kube-apiserver "$BIN/kube-apiserver" "${API_FLAGS[@]}"

# One client identity for every controller (admin cert) keeps RBAC setup
# trivial. No leader election: a single instance, and it starts faster.
# --flex-volume-plugin-dir: it would otherwise create /usr/libexec/kubernetes.
spawn kube-controller-manager "$BIN/kube-controller-manager" \
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
if [[ $SCHEDULER == 1 ]]; then
    spawn kube-scheduler "$BIN/kube-scheduler" \
        --kubeconfig "$DIR/kubeconfig" \
        --authentication-kubeconfig "$DIR/kubeconfig" --authorization-kubeconfig "$DIR/kubeconfig" \
        --bind-address 127.0.0.1 --port 0 --secure-port 0 \
        --leader-elect=false \
        --profiling=false \
        --v 1
fi

KC=(kubectl --kubeconfig "$DIR/kubeconfig" --request-timeout 5s)
wait_until "kube-apiserver /readyz" "$TIMEOUT" "${KC[@]}" get --raw /readyz
log "kube-apiserver ready (/readyz) at https://$HOST:$API_PORT"

# The controller-manager creates each namespace's `default` ServiceAccount;
# Pods are refused until it exists, so wait for it as proof the KCM works.
wait_until "the default ServiceAccount (kube-controller-manager)" "$TIMEOUT" \
    "${KC[@]}" -n default get serviceaccount default
log "kube-controller-manager working; kubeconfig: $DIR/kubeconfig (pids in $DIR/pids)"
