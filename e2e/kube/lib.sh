# Shared by the scripts that start Kubernetes for Shoal's tests: logging,
# package installs, the PKI, kubeconfigs and daemon bookkeeping. Sourced,
# not run. Callers set NAME (the log prefix) and DIR (the state directory).

log() { echo "[$NAME $(date -u +%H:%M:%S)] $*"; }
die() { log "ERROR: $*"; exit 1; }

# need_commands CMD=PACKAGE... installs (apt-get) the packages whose
# command is missing.
need_commands() {
    local pair missing=()
    for pair in "$@"; do
        command -v "${pair%%=*}" >/dev/null || missing+=("${pair#*=}")
    done
    ((${#missing[@]})) || return 0
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# make_ca DIR: a CA (ca.crt, ca.key) and a service-account key pair in DIR,
# once. Certificates are X.509 v3 with SANs, CA:TRUE only on the CA and EKUs
# set, because rustls/webpki (kube-rs) rejects anything less.
make_ca() {
    local pki=$1
    mkdir -p "$pki"
    [[ -s $pki/ca.crt ]] && return 0
    (
        cd "$pki"
        umask 077
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -sha256 \
            -keyout ca.key -out ca.crt -subj "/CN=shoal-e2e-ca" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
        chmod 644 ca.crt sa.pub
    )
}

# sign_cert DIR NAME SUBJECT EXTENSION...: NAME.crt and NAME.key signed by
# the CA in DIR, once.
sign_cert() {
    local pki=$1 name=$2 subj=$3
    shift 3
    [[ -s $pki/$name.crt ]] && return 0
    (
        cd "$pki"
        umask 077
        printf '%s\n' "$@" >"$name.ext"
        openssl req -new -newkey rsa:2048 -nodes -keyout "$name.key" \
            -out "$name.csr" -subj "$subj" 2>/dev/null
        openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key \
            -CAcreateserial -days 3650 -sha256 -extfile "$name.ext" \
            -out "$name.crt" 2>/dev/null
        rm -f "$name.csr" "$name.ext"
        chmod 644 "$name.crt"
    )
}

# client_cert DIR NAME SUBJECT: a client certificate.
client_cert() {
    sign_cert "$1" "$2" "$3" \
        "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=clientAuth"
}

# server_cert DIR NAME SUBJECT SANS: a serving certificate.
server_cert() {
    sign_cert "$1" "$2" "$3" \
        "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" \
        "subjectAltName=$4"
}

# write_kubeconfig FILE SERVER PKI USER: a self-contained kubeconfig (certs
# embedded) for client certificate PKI/USER.{crt,key}, so any client
# library can read it.
write_kubeconfig() {
    local file=$1 server=$2 pki=$3 user=$4
    b64() { base64 -w0 <"$1"; }
    cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: shoal-e2e
  cluster:
    server: $server
    certificate-authority-data: $(b64 "$pki/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(b64 "$pki/$user.crt")
    client-key-data: $(b64 "$pki/$user.key")
contexts:
- name: shoal-e2e
  context:
    cluster: shoal-e2e
    user: $user
    namespace: default
current-context: shoal-e2e
EOF
    chmod 600 "$file"
}

# spawn LOGNAME CMD...: runs CMD as a daemon with its log in DIR/LOGNAME.log
# and its PID appended to DIR/pids. setsid + all three std streams
# redirected: a daemon must not keep the caller's pipes open (a test harness
# would otherwise wait for it forever) nor die with its process group.
PIDS=()
spawn() {
    local name=$1
    shift
    setsid "$@" </dev/null >"$DIR/$name.log" 2>&1 &
    PIDS+=($!)
    echo $! >>"$DIR/pids"
    log "started $name pid $!"
}

# alive: whether every spawned daemon still runs.
alive() {
    local p
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || return 1; done
}

# ours PID: whether PID's command line still names DIR (a PID from a stale
# file may have been reused by an unrelated process).
ours() { [[ -r /proc/$1/cmdline ]] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "$DIR/"; }

# stop_pids: stops what DIR/pids lists, newest first, SIGTERM then (after
# 10 s) SIGKILL. Safe to run twice.
stop_pids() {
    [[ -s $DIR/pids ]] || return 0
    local pid
    mapfile -t pids < <(tac "$DIR/pids")
    for pid in "${pids[@]}"; do
        [[ $pid =~ ^[0-9]+$ ]] || continue
        ours "$pid" || continue
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
}

# wait_until WHAT TIMEOUT CMD...: polls CMD every half second until it
# succeeds, failing after TIMEOUT seconds or when a daemon exits.
wait_until() {
    local what=$1 timeout=$2
    shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        alive || die "a daemon exited while waiting for $what"
        ((SECONDS < deadline)) || die "$what not within ${timeout}s"
        sleep 0.5
    done
}

# cgroup_name DIR: the cgroup tree of the cluster kept in DIR.
cgroup_name() { echo "shoal-kube-$(printf %s "$1" | sha256sum | cut -c1-8)"; }

# cgroup_hierarchies: the mount points of every cgroup hierarchy.
cgroup_hierarchies() { awk '$3 == "cgroup" || $3 == "cgroup2" { print $2 }' /proc/self/mounts; }

# make_cgroup PATH: cgroup PATH (below the root, e.g. shoal-kube-1234abcd/
# node-1) in every hierarchy. A new cpuset cgroup has no CPUs and no memory
# nodes, and refuses processes until it is given its parent's.
make_cgroup() {
    local h part path
    for h in $(cgroup_hierarchies); do
        path=$h
        for part in ${1//\// }; do
            path=$path/$part
            [[ -d $path ]] && continue
            mkdir "$path"
            if [[ -f $path/cpuset.cpus ]]; then
                cat "$(dirname "$path")/cpuset.cpus" >"$path/cpuset.cpus"
                cat "$(dirname "$path")/cpuset.mems" >"$path/cpuset.mems"
            fi
        done
    done
}

# join_cgroup PATH PID: moves PID into cgroup PATH of every hierarchy.
join_cgroup() {
    local h
    make_cgroup "$1"
    for h in $(cgroup_hierarchies); do echo "$2" >"$h/$1/cgroup.procs"; done
}
