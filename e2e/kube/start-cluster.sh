#!/usr/bin/env bash
# start-cluster.sh DIR — a throw-away Kubernetes 1.20 cluster from real
# parts on this machine: etcd, kube-apiserver, kube-controller-manager and
# kube-scheduler, and three nodes, each a kubelet with its own containerd
# (Debian's containerd + runc), labelled with its own zone. Waits until all
# three nodes are Ready and exits 0 leaving everything running; stop it with
# stop-cluster.sh DIR.
#
# Isolation. Everything lives in one network namespace made here, reached
# only from inside it (`e2e/kube/kubectl DIR ...`, or nsenter -t $(cat
# DIR/netns.pid) -n): the control plane on 10.99.0.1 (API on port 443) and
# node-N on 10.99.0.1N, addresses of an interface of that namespace (a bridge
# without ports: this kernel has no dummy devices).
# Kubelet refuses loopback node addresses, and several nodes need their own
# addresses and ports, so the host's loopback cannot serve. The `kubernetes`
# Service's ClusterIP (10.96.0.1) is an address of the same interface where
# the API server listens, so pods reach the API without kube-proxy. Pods
# with host networking share the namespace (the storage peers bind their
# node's address); other pods get a bridge per node (CNI bridge plugin,
# 10.100.N.0/24), routed inside the namespace.
#
# Each node also has its own mount namespace, made rshared inside so that
# CSI mounts propagate between kubelet and the plugins' containers, and
# never to the host: /var/lib (kubelet's root /var/lib/kubelet, the storage
# peers' /var/lib/shoal) and /var/log are the node's own directories under
# DIR/node-N. When the namespaces' last process ends, their mounts go with
# them, so even a killed run leaves no mount on the host.
#
# Kubelet sets six global sysctls at start (vm.overcommit_memory,
# vm.panic_on_oom, kernel.panic, kernel.panic_on_oops, kernel.keys.*); in
# each node's mount namespace those files are bind mounts of files of the
# node's own, so the host's values never change.
#
# Every process runs in the cgroup tree /shoal-kube-ID (ID from DIR), pods
# below /shoal-kube-ID/node-N (kubelet's cgroup root): stop-cluster.sh kills
# whatever is left there, container shims included.
#
# Images: every OCI archive in SHOAL_KUBE_IMAGES (default DIR/images; see
# build-images.sh, which this runs when the directory has no pause image) is
# imported into every node. Needs build-kubernetes.sh's binaries; installs
# containerd, runc, the CNI plugins, etcd, iproute2 and openssl when missing.
# SHOAL_KUBE_READY_TIMEOUT (s, default 180) bounds each wait.
set -euo pipefail

NAME=start-cluster
HERE=$(cd "$(dirname "$0")" && pwd -P)
# shellcheck source=e2e/kube/lib.sh
source "$HERE/lib.sh"

[[ $# -eq 1 ]] || die "usage: $0 DIR"
mkdir -p "$1"
DIR=$(cd "$1" && pwd -P)
CACHE=${SHOAL_KUBE_CACHE:-/var/cache/shoal/kube}
KUBELET=$CACHE/bin/kubelet
TIMEOUT=${SHOAL_KUBE_READY_TIMEOUT:-180}
IMAGES=${SHOAL_KUBE_IMAGES:-$DIR/images}
NODES=(1 2 3)
CONTROL_IP=10.99.0.1
SERVICE_CIDR=10.96.0.0/24
SERVICE_IP=10.96.0.1
CG=$(cgroup_name "$DIR")
[[ -x $KUBELET ]] || die "no cached kubelet in $CACHE/bin; run $HERE/build-kubernetes.sh first"
[[ -e /dev/fuse ]] || die "/dev/fuse is missing (modprobe fuse)"
if [[ -s $DIR/netns.pid ]] && kill -0 "$(cat "$DIR/netns.pid")" 2>/dev/null; then
    die "$DIR already has a running cluster; stop-cluster.sh it first"
fi

need_commands containerd=containerd runc=runc ip=iproute2 openssl=openssl \
    etcd=etcd-server curl=curl python3=python3 nsenter=util-linux
[[ -x /usr/lib/cni/bridge ]] || need_commands /usr/lib/cni/bridge=containernetworking-plugins

START=$SECONDS
: >"$DIR/pids"
cleanup_on_failure() {
    local rc=$?
    if ((rc != 0)); then
        log "start failed; stopping what started"
        for f in "$DIR"/*.log "$DIR"/node-*/*.log; do
            [[ -f $f ]] && { echo "--- tail $f"; tail -n 15 "$f"; }
        done
        "$HERE/stop-cluster.sh" "$DIR" || true
    fi
}
trap cleanup_on_failure EXIT

# --- cgroups ---------------------------------------------------------------
# One tree per cluster in every v1 hierarchy (and the unified one, which runc
# joins on hybrid machines).
make_cgroup "$CG/control"
for n in "${NODES[@]}"; do make_cgroup "$CG/node-$n/runtime"; done

# CMD in cgroup $CG/SUB of every hierarchy: "${IN_CGROUP[@]}" $CG/SUB CMD...
IN_CGROUP=("$HERE/in-cgroup.sh")

# --- network namespace -----------------------------------------------------
# The holder's argv[0] names DIR, so stop-cluster.sh knows it is ours.
setsid unshare --net -- bash -c 'exec -a "shoal-kube-netns $0/" sleep 2147483647' "$DIR" \
    </dev/null >/dev/null 2>&1 &
NETNS=$!
echo "$NETNS" >"$DIR/netns.pid"
in_new_netns() { [[ $(readlink "/proc/$NETNS/ns/net") != $(readlink /proc/self/ns/net) ]]; }
wait_until "the network namespace" 10 in_new_netns
join_cgroup "$CG/control" "$NETNS"
IN_NET=(nsenter -t "$NETNS" -n --)
"${IN_NET[@]}" sh -e -c "
    ip link set lo up
    ip link add kube0 type bridge
    ip addr add $CONTROL_IP/24 dev kube0
    ip addr add $SERVICE_IP/32 dev kube0
    $(for n in "${NODES[@]}"; do echo "ip addr add 10.99.0.1$n/24 dev kube0"; done)
    ip link set kube0 up
    ip route add default dev kube0
    sysctl -qw net.ipv4.ip_forward=1
"
log "network namespace (pid $NETNS): control plane $CONTROL_IP, nodes $(printf '10.99.0.1%s ' "${NODES[@]}")"

# --- control plane -----------------------------------------------------------
SHOAL_KUBE_ADDRESS=$CONTROL_IP SHOAL_KUBE_SERVICE_CIDR=$SERVICE_CIDR SHOAL_KUBE_API_PORT=443 \
    SHOAL_KUBE_PORT_BASE=2379 SHOAL_KUBE_SCHEDULER=1 SHOAL_KUBE_READY_TIMEOUT=$TIMEOUT \
    "${IN_CGROUP[@]}" "$CG/control" "${IN_NET[@]}" "$HERE/start-apiserver.sh" "$DIR" >"$DIR/start-apiserver.log" 2>&1 ||
    { cat "$DIR/start-apiserver.log"; die "the control plane did not start"; }
mapfile -t PIDS <"$DIR/pids"
PKI=$DIR/pki
KC=("${IN_NET[@]}" kubectl --kubeconfig "$DIR/kubeconfig" --request-timeout 10s)
log "control plane ready: https://$CONTROL_IP:443"

# --- images ------------------------------------------------------------------
[[ -f $IMAGES/pause.tar ]] || "$HERE/build-images.sh" "$IMAGES"

# --- nodes -------------------------------------------------------------------
# Values kubelet wants for the global sysctls it would set.
declare -A SYSCTLS=(
    [vm/overcommit_memory]=1 [vm/panic_on_oom]=0 [kernel/panic]=10
    [kernel/panic_on_oops]=1 [kernel/keys/root_maxkeys]=1000000
    [kernel/keys/root_maxbytes]=25000000
)
start_node() {
    local n=$1 node=node-$1 ip=10.99.0.1$1
    local nd=$DIR/node-$1
    mkdir -p "$nd"/{lib/kubelet,lib/shoal,log,containerd,cni/net.d,cni/ipam,sysctl,pki}

    # The node's mount namespace; its holder's argv[0] names it.
    local binds="" key
    for key in "${!SYSCTLS[@]}"; do
        echo "${SYSCTLS[$key]}" >"$nd/sysctl/${key//\//.}"
        binds+="mount --bind '$nd/sysctl/${key//\//.}' '/proc/sys/$key'; "
    done
    setsid "${IN_NET[@]}" unshare --mount -- bash -e -c "
        mount -t tmpfs -o mode=755 node-lib /var/lib
        mkdir /var/lib/kubelet /var/lib/shoal
        mount --bind '$nd/lib/kubelet' /var/lib/kubelet
        mount --bind '$nd/lib/shoal' /var/lib/shoal
        mount --bind '$nd/log' /var/log
        $binds
        mount --make-rshared /
        exec -a 'shoal-kube-node $nd/' sleep 2147483647" </dev/null >"$nd/mountns.log" 2>&1 &
    local holder=$!
    echo "$holder" >"$nd/mountns.pid"
    echo "$holder" >>"$DIR/pids"
    wait_until "$node's mount namespace" 10 grep -q "shoal-kube-node" "/proc/$holder/cmdline"
    join_cgroup "$CG/$node/runtime" "$holder"
    local IN_NODE=(nsenter -t "$holder" -n -m --)

    # containerd: its own root, state and socket; CRI as kubelet 1.20 needs.
    cat >"$nd/containerd/config.toml" <<EOF
version = 2
root = "$nd/containerd/root"
state = "$nd/containerd/state"
[grpc]
  address = "$nd/containerd/containerd.sock"
[ttrpc]
  address = "$nd/containerd/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$nd/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "shoal.local/pause:1"
  # Lowering oom_score_adj needs CAP_SYS_RESOURCE, which this machine lacks.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  # Pods' network namespaces are pinned in the state dir, not in /run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$nd/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$nd/cni/net.d"
EOF
    cat >"$nd/cni/net.d/10-$node.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "$node",
  "plugins": [{
    "type": "bridge", "bridge": "cni-n$n", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": {"type": "host-local", "dataDir": "$nd/cni/ipam",
             "ranges": [[{"subnet": "10.100.$n.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}
  }]
}
EOF
    spawn "node-$n/containerd" "${IN_CGROUP[@]}" "$CG/$node/runtime" "${IN_NODE[@]}" \
        containerd --config "$nd/containerd/config.toml"
    local CTR=("${IN_NODE[@]}" ctr --address "$nd/containerd/containerd.sock" -n k8s.io)
    wait_until "$node's containerd" "$TIMEOUT" "${CTR[@]}" version
    local tar
    for tar in "$IMAGES"/*.tar; do
        "${CTR[@]}" images import --no-unpack "$tar" >/dev/null || die "importing $tar into $node"
    done

    # kubelet: a system:node client certificate, its own ports on its own
    # address, pods' cgroups below the node's tree.
    client_cert "$PKI" "$node" "/O=system:nodes/CN=system:node:$node"
    write_kubeconfig "$nd/kubeconfig" "https://$CONTROL_IP:443" "$PKI" "$node"
    cat >"$nd/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: $ip
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: /$CG/$node
failSwapOn: false
makeIPTablesUtilChains: false
volumePluginDir: $nd/flexvolume
serializeImagePulls: false
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}
imageGCHighThresholdPercent: 100
clusterDomain: cluster.local
EOF
    spawn "node-$n/kubelet" "${IN_CGROUP[@]}" "$CG/$node" "${IN_NODE[@]}" "$KUBELET" \
        --config "$nd/kubelet.yaml" --kubeconfig "$nd/kubeconfig" \
        --root-dir /var/lib/kubelet --cert-dir "$nd/pki" \
        --container-runtime remote --container-runtime-endpoint "unix://$nd/containerd/containerd.sock" \
        --runtime-request-timeout 5m \
        --node-ip "$ip" --hostname-override "$node" \
        --node-labels "topology.kubernetes.io/zone=zone-$n,shoal.io/storage=true" \
        --v 1
}
for n in "${NODES[@]}"; do start_node "$n"; done
for n in "${NODES[@]}"; do
    wait_until "node-$n Ready" "$TIMEOUT" sh -c \
        "${KC[*]} get node node-$n -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
done
log "3 nodes Ready in $((SECONDS - START))s; kubectl: $HERE/kubectl $DIR get nodes"
