#!/usr/bin/env bash
# A one-node Kubernetes cluster without Docker, inside a network namespace of its own: etcd,
# kube-apiserver (audit log on), kube-controller-manager, kube-scheduler, kubelet and kube-proxy
# from the same Kubernetes version (hack/build-controlplane.sh, hack/build-kube-proxy.sh,
# hack/build-node.sh), containerd + runc + the CNI plugins from Debian, and one PostgreSQL 15 server
# outside the cluster on an address of the namespace (as a managed database would be).
#
#   hack/cluster.sh up       # start; prints `export KUBECONFIG=...` and the other addresses
#   hack/cluster.sh down     # stop everything, delete the namespace and the state (idempotent;
#                            # DBPOOL_CLUSTER_KEEP_LOGS=1 keeps logs/)
#   hack/cluster.sh status   # exit 0 when the node is Ready
#   hack/cluster.sh db-kill  # SIGKILL the PostgreSQL server (an outage); db-start starts it again
#
# State lives in DBPOOL_CLUSTER_DIR (default .local/cluster): PKI, etcd, containerd's root and
# state and its private socket, kubelet's root, the CNI configuration and IPAM, the audit log, the
# logs. Nothing touches the host's network, iptables, containerd or any address outside the
# namespace: every process runs in it (`nsenter --net=`, not `ip netns exec`, which remounts /sys
# and hides the cgroup hierarchy), and pods' cgroups live under a cgroup of this cluster's own.
#
# Addresses (inside the namespace only):
#   10.244.0.1/24   the node (bridge cni0): kube-apiserver :6443, kubelet :10250; pods get .2-.254
#   10.96.0.0/24    Services (kube-proxy, iptables mode); 10.96.0.1 is the apiserver
#   10.213.9.10     PostgreSQL on a /32 of lo, reached by pods through the node's routing
# There is no cluster DNS: pods name the database through hostAliases (see docs/cluster.md).
#
# Needs root, containerd, runc, containernetworking-plugins, umoci, iptables, PostgreSQL 15
# (hack/install-deps.sh). Tested on cgroup v1 (kubelet: failCgroupV1: false, cgroupfs driver); the
# cgroup v2 paths are written but have not run yet (no v2 machine here).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
S="${DBPOOL_CLUSTER_DIR:-$ROOT/.local/cluster}"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
NODE_IP=10.244.0.1
POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.96.0.0/24
SERVICE_API_IP=10.96.0.1
DB_IP=10.213.9.10
NODE_NAME=dbpool-node
PAUSE_REF=dbpool.local/pause:1
READY_TIMEOUT="${DBPOOL_CLUSTER_READY_TIMEOUT:-180}"

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# wait_for WHAT SECONDS COMMAND...: polls COMMAND every 0.3 s until it succeeds or time runs out.
wait_for() {
  local what="$1" secs="$2" deadline
  shift 2
  deadline=$(($(date +%s) + secs))
  until "$@" >/dev/null 2>&1; do
    (($(date +%s) < deadline)) || { log "timed out after ${secs}s waiting for $what"; return 1; }
    sleep 0.3
  done
}

ns_name() { cat "$S/netns" 2>/dev/null; }
nsx() { nsenter --net="/run/netns/$(ns_name)" -- "$@"; }

# start NAME COMMAND...: runs COMMAND in the namespace, in a session of its own, logs to logs/NAME.log.
start() {
  local name="$1"
  shift
  setsid nsenter --net="/run/netns/$(ns_name)" -- "$@" </dev/null >>"$S/logs/$name.log" 2>&1 &
  echo $! >"$S/run/$name.pid"
}

alive() { [[ -s "$S/run/$1.pid" ]] && kill -0 "$(cat "$S/run/$1.pid")" 2>/dev/null; }

fail_with_log() {
  log "$1 did not come up; last lines of $S/logs/$1.log:"
  tail -n 40 "$S/logs/$1.log" >&2 || true
  exit 1
}

cgroup_dirs() {
  if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
    echo "/sys/fs/cgroup/dbpool-node-$(cat "$S/id")"
  else
    local c
    for c in /sys/fs/cgroup/*/; do
      [[ -L "${c%/}" ]] && continue
      echo "${c}dbpool-node-$(cat "$S/id")"
    done
  fi
}

# ---------------------------------------------------------------------------------------------

pki() {
  local d="$S/pki"
  mkdir -p "$d"
  (
    cd "$d"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null
    openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=dbpool-node-ca" -out ca.crt 2>/dev/null
    sign() { # NAME SUBJECT EXTENSIONS
      openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null
      openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
      printf '%s\n' "$3" >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 3650 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    }
    sign apiserver "/CN=kube-apiserver" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:$NODE_IP,IP:$SERVICE_API_IP,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost"
    local client="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
    sign admin "/O=system:masters/CN=dbpool-admin" "$client"
    sign kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "$client"
    sign kube-proxy "/CN=system:kube-proxy" "$client"
    sign controller-manager "/CN=system:kube-controller-manager" "$client"
    sign scheduler "/CN=system:kube-scheduler" "$client"
    sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
    openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
  ) || die "openssl failed"
  local who
  for who in admin kubelet kube-proxy controller-manager scheduler; do
    cat >"$S/$who.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: dbpool-node
    cluster:
      server: https://$NODE_IP:6443
      certificate-authority: $d/ca.crt
users:
  - name: $who
    user:
      client-certificate: $d/$who.crt
      client-key: $d/$who.key
contexts:
  - name: dbpool-node
    context: {cluster: dbpool-node, user: $who}
current-context: dbpool-node
EOF
  done
}

network() {
  local ns
  ns="dbpool-node-$(cat "$S/id")"
  ip netns add "$ns"
  echo "$ns" >"$S/netns"
  nsx ip link set lo up
  # The node's address, on the bridge the CNI plugin then reuses as the pods' gateway.
  # Its MAC is set, not inherited: a bridge without one takes the lowest MAC of its ports, so a
  # pod's veth joining or leaving changes the gateway's MAC under every other pod, whose ARP entry
  # for it goes stale: their replies to the kubelet's probes (and to Prometheus) vanish for
  # 30-60 s until they re-ARP, and the kubelet restarts healthy operators for failed liveness
  # probes. A locally administered address, the same in every cluster (one bridge per namespace).
  nsx ip link add cni0 address 02:db:00:00:00:01 type bridge
  nsx ip addr add "$NODE_IP/24" dev cni0
  nsx ip link set cni0 up
  # The database's address: outside the cluster, routed to by the node (a /32 on lo, as in
  # hack/gate-netns.sh: no dummy interfaces where the kernel module cannot be loaded).
  nsx ip addr add "$DB_IP/32" dev lo
  # Services are local to the node: with no default route, the DNAT of kube-proxy needs a route.
  nsx ip route add local "$SERVICE_CIDR" dev lo
  nsx sysctl -qw net.ipv4.ip_forward=1
  log "network namespace $ns: node $NODE_IP (cni0), database $DB_IP (lo), Services $SERVICE_CIDR"
}

cgroups() {
  local dir parent
  while read -r dir; do
    mkdir -p "$dir"
    parent="$(dirname "$dir")"
    if [[ -f "$parent/cpuset.cpus" && ! -f "$parent/cgroup.controllers" ]]; then
      cat "$parent/cpuset.cpus" >"$dir/cpuset.cpus"
      cat "$parent/cpuset.mems" >"$dir/cpuset.mems"
    fi
  done < <(cgroup_dirs)
}

control_plane() {
  local bin="$1" node_bin="$2"
  cat >"$S/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
EOF
  start etcd "$bin/etcd" --name=dbpool-node --data-dir="$S/etcd" --unsafe-no-fsync \
    --listen-client-urls=http://127.0.0.1:2379 --advertise-client-urls=http://127.0.0.1:2379 \
    --listen-peer-urls=http://127.0.0.1:2380 --initial-advertise-peer-urls=http://127.0.0.1:2380 \
    --initial-cluster=dbpool-node=http://127.0.0.1:2380 --log-level=warn
  wait_for etcd 60 nsx curl -sf http://127.0.0.1:2379/health || fail_with_log etcd
  start apiserver "$bin/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --advertise-address="$NODE_IP" --secure-port=6443 \
    --cert-dir="$S/apiserver-certs" --tls-cert-file="$S/pki/apiserver.crt" \
    --tls-private-key-file="$S/pki/apiserver.key" --client-ca-file="$S/pki/ca.crt" \
    --kubelet-client-certificate="$S/pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$S/pki/apiserver-kubelet-client.key" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --service-account-key-file="$S/pki/sa.pub" --service-account-signing-key-file="$S/pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range="$SERVICE_CIDR" --allow-privileged=true \
    --audit-policy-file="$S/audit-policy.yaml" --audit-log-path="$S/audit.log" \
    --audit-log-format=json --audit-log-mode=blocking
  wait_for kube-apiserver 120 nsx curl -sf --cacert "$S/pki/ca.crt" --cert "$S/pki/admin.crt" \
    --key "$S/pki/admin.key" "https://$NODE_IP:6443/readyz" || fail_with_log apiserver
  start controller-manager "$node_bin/kube-controller-manager" \
    --kubeconfig="$S/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$S/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$S/controller-manager.kubeconfig" \
    --service-account-private-key-file="$S/pki/sa.key" --root-ca-file="$S/pki/ca.crt" \
    --use-service-account-credentials=true --leader-elect=false --bind-address=127.0.0.1 \
    --controllers='*,-nodeipam,-cloud-node-lifecycle,-service,-route' \
    --service-cluster-ip-range="$SERVICE_CIDR"
  start scheduler "$node_bin/kube-scheduler" --kubeconfig="$S/scheduler.kubeconfig" \
    --authentication-kubeconfig="$S/scheduler.kubeconfig" \
    --authorization-kubeconfig="$S/scheduler.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1
  log "etcd, kube-apiserver (audit log $S/audit.log), kube-controller-manager, kube-scheduler started"
}

pause_image() {
  # Any tiny static program that waits for a signal will do as the sandbox's process.
  local dir="$S/pause-build" layout="$S/pause.oci" bundle="$S/pause-bundle"
  mkdir -p "$dir"
  cat >"$dir/main.go" <<'GO'
// pause: the pod sandbox's process, waits for SIGTERM or SIGINT.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}
GO
  (cd "$dir" && printf 'module dbpool.local/pause\n\ngo 1.21\n' >go.mod &&
    CGO_ENABLED=0 GOFLAGS=-buildvcs=false go build -trimpath -ldflags "-s -w" -o pause .) ||
    die "go build of the pause program failed"
  umoci init --layout "$layout"
  umoci new --image "$layout:1"
  umoci unpack --image "$layout:1" "$bundle" >/dev/null
  install -m 0755 "$dir/pause" "$bundle/rootfs/pause"
  umoci repack --image "$layout:1" "$bundle"
  umoci config --image "$layout:1" --config.entrypoint /pause --config.user 65535:65535
  umoci gc --layout "$layout"
  python3 - "$layout/index.json" "$PAUSE_REF" <<'PY'
import json, sys
path, ref = sys.argv[1], sys.argv[2]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = ref
json.dump(index, open(path, "w"))
PY
  tar -C "$layout" -cf "$S/pause.tar" .
  rm -rf "$bundle"
}

ctr_() { ctr --address "$S/containerd/containerd.sock" "$@"; }

runtime() {
  mkdir -p "$S/containerd" "$S/cni/net.d" "$S/cni/ipam"
  cat >"$S/containerd/config.toml" <<EOF
version = 2
root = "$S/containerd/root"
state = "$S/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$S/containerd/containerd.sock"
[ttrpc]
  address = "$S/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$S/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  # kubelet asks for oom_score_adj -998 for sandboxes; where containerd itself runs at 0 without
  # CAP_SYS_RESOURCE (a container, CI) runc then fails ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  sandbox_image = "$PAUSE_REF"
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$S/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$S/cni/net.d"
EOF
  cat >"$S/cni/net.d/10-dbpool-node.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "dbpool-node",
  "plugins": [
    {
      "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$S/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  start containerd containerd --config "$S/containerd/config.toml"
  wait_for containerd 60 ctr_ version || fail_with_log containerd
  ctr_ -n k8s.io images import "$S/pause.tar" >&2
  log "containerd (socket $S/containerd/containerd.sock) with $PAUSE_REF"
}

node() {
  local node_bin="$1" kube_proxy="$2" cgroup_root
  cgroup_root="/dbpool-node-$(cat "$S/id")"
  printf 'nameserver 127.0.0.1\n' >"$S/resolv.conf"
  mkdir -p "$S/kubelet"
  cat >"$S/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: $cgroup_root
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
protectKernelDefaults: true
containerRuntimeEndpoint: unix://$S/containerd/containerd.sock
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $S/pki/ca.crt}
authorization: {mode: Webhook}
resolvConf: $S/resolv.conf
podLogsDir: $S/pod-logs
clusterDomain: cluster.local
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
serializeImagePulls: false
registerNode: true
rotateCertificates: false
podPidsLimit: 4096
EOF
  # Pods' volumes (kubelet mounts them) must be seen by containerd, in the host's mount namespace.
  mount --bind "$S/kubelet" "$S/kubelet"
  mount --make-shared "$S/kubelet"
  # kubelet sets six host-wide sysctls (vm.overcommit_memory, kernel.panic_on_oops, ...) to its
  # values, or with protectKernelDefaults fails when they differ. It runs in a mount namespace of
  # its own where files holding its values cover them: the host's values stay as they are.
  local kv f fakes=""
  mkdir -p "$S/sysctl"
  for kv in vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1 \
    kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000; do
    f="${kv%%=*}"
    echo "${kv#*=}" >"$S/sysctl/${f//\//.}"
    fakes+="mount --bind $S/sysctl/${f//\//.} /proc/sys/$f && "
  done
  start kubelet unshare --mount --propagation unchanged -- sh -c "${fakes}exec \"\$0\" \"\$@\"" \
    "$node_bin/kubelet" --config="$S/kubelet-config.yaml" \
    --kubeconfig="$S/kubelet.kubeconfig" --root-dir="$S/kubelet" --cert-dir="$S/kubelet/pki" \
    --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --v=1
  start kube-proxy "$kube_proxy" --kubeconfig="$S/kube-proxy.kubeconfig" --proxy-mode=iptables \
    --hostname-override="$NODE_NAME" --cluster-cidr="$POD_CIDR" \
    --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0s \
    --conntrack-tcp-timeout-close-wait=0s --iptables-min-sync-period=0s \
    --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256
  wait_for kube-proxy 60 nsx curl -fsS http://127.0.0.1:10256/livez || fail_with_log kube-proxy
  wait_for "node $NODE_NAME Ready" "$READY_TIMEOUT" node_ready || fail_with_log kubelet
  log "node $NODE_NAME is Ready"
}

kubectl_() { nsx "$(cat "$S/bin")/kubectl" --kubeconfig="$S/admin.kubeconfig" "$@"; }
no_tasks() { [[ -z "$(ctr_ -n k8s.io tasks ls -q 2>/dev/null)" ]]; }
node_ready() {
  [[ "$(kubectl_ get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

postgres() {
  local data="$S/postgres" pw
  pw="$(openssl rand -hex 16)"
  mkdir -p "$data" "$S/pg-run"
  chown postgres:postgres "$S/pg-run" 2>/dev/null || true
  printf '%s\n' "$pw" >"$S/postgres.pw"
  chmod 0644 "$S/postgres.pw"
  local as_pg=()
  ((EUID == 0)) && { chown postgres:postgres "$data"; as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups --reset-env --); }
  "${as_pg[@]}" "$PG_BIN/initdb" -D "$data" -U postgres --pwfile="$S/postgres.pw" \
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --no-locale --no-sync >"$S/logs/initdb.log" 2>&1 ||
    fail_with_log initdb
  echo "host all all $POD_CIDR scram-sha-256" >>"$data/pg_hba.conf"
  postgres_start
  log "PostgreSQL at $DB_IP:5432 (user postgres, password in $S/postgres.pw)"
}

# postgres_start: the server on its data directory (made by postgres), until it accepts connections.
postgres_start() {
  local as_pg=()
  ((EUID == 0)) && as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups --reset-env --)
  start postgres "${as_pg[@]}" "$PG_BIN/postgres" -D "$S/postgres" -c listen_addresses="$DB_IP" -c port=5432 \
    -c unix_socket_directories="$S/pg-run" -c fsync=off
  wait_for postgres 60 nsx "$PG_BIN/pg_isready" -q -h "$DB_IP" -p 5432 -t 2 || fail_with_log postgres
}

# db_kill, db_start: an outage of the database outside the cluster. SIGKILL to every server
# process (as a crash or a lost machine would do: no goodbye to the clients); the start after it
# runs the server's crash recovery on the same data.
db_kill() {
  [[ -s "$S/netns" ]] || die "no cluster in $S"
  alive postgres || die "PostgreSQL is not running"
  stop_pid postgres KILL
  log "PostgreSQL killed"
}
db_start() {
  [[ -s "$S/netns" ]] || die "no cluster in $S"
  alive postgres && die "PostgreSQL is already running"
  postgres_start
  log "PostgreSQL at $DB_IP:5432 again"
}

print_env() {
  cat <<EOF
export KUBECONFIG=$S/admin.kubeconfig
export PATH=$(cat "$S/bin"):\$PATH
export DBPOOL_CLUSTER_DIR=$S
export DBPOOL_CLUSTER_NETNS=/run/netns/$(ns_name)
export DBPOOL_CLUSTER_DB_IP=$DB_IP
export DBPOOL_CLUSTER_CONTAINERD=$S/containerd/containerd.sock
EOF
}

up() {
  [[ -s "$S/netns" ]] && die "a cluster is already set up in $S: run '$0 down' first"
  ((EUID == 0)) || die "needs root (network namespace, containerd, kubelet)"
  local c
  for c in containerd runc umoci iptables ctr nsenter; do
    command -v "$c" >/dev/null || die "$c is missing: run hack/install-deps.sh"
  done
  [[ -x /usr/lib/cni/bridge ]] || die "the CNI plugins are missing: run hack/install-deps.sh"
  local bin node_bin kube_proxy
  bin="$(hack/build-controlplane.sh)"
  node_bin="$(hack/build-node.sh)"
  kube_proxy="$(hack/build-kube-proxy.sh)"
  mkdir -p "$S/logs" "$S/run"
  # PostgreSQL runs as postgres: it must reach its data directory (mktemp -d makes 0700).
  chmod 0755 "$S"
  echo "$bin" >"$S/bin"
  printf '%s-%s\n' "$$" "$(date +%s)" | sha256sum | cut -c1-8 >"$S/id"
  trap 'rc=$?; if ((rc != 0)); then log "up failed (exit $rc): tearing down; logs kept in $S/logs"; down_keep_logs; fi' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  pki
  network
  cgroups
  postgres
  control_plane "$bin" "$node_bin"
  pause_image
  runtime
  node "$node_bin" "$kube_proxy"
  trap - EXIT INT TERM
  print_env | tee "$S/env.sh"
  log "ready: source $S/env.sh; to enter the namespace: nsenter --net=/run/netns/$(ns_name) bash"
  log "images: make image, then ctr --address $S/containerd/containerd.sock -n k8s.io images import target/image/dbpool-operator.tar"
  log "install: nsenter --net=/run/netns/$(ns_name) helm --kubeconfig $S/admin.kubeconfig install dbpool charts/dbpool-operator -n dbpool-system --create-namespace --set 'hostAliases[0].ip=$DB_IP' --set 'hostAliases[0].hostnames[0]=orders-db.dbpool.test'"
  log "the database: $DB_IP:5432, user postgres, password in $S/postgres.pw; README 'Try it on a one-node cluster'"
}

# ---------------------------------------------------------------------------------------------

stop_pid() { # NAME SIGNAL: signals NAME's session, waits up to 20 s, then kills it
  local name="$1" pid deadline
  [[ -s "$S/run/$name.pid" ]] || return 0
  pid="$(cat "$S/run/$name.pid")"
  kill -"$2" -- "-$pid" 2>/dev/null || kill -"$2" "$pid" 2>/dev/null || true
  deadline=$(($(date +%s) + 20))
  while kill -0 "$pid" 2>/dev/null && (($(date +%s) < deadline)); do sleep 0.2; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$S/run/$name.pid"
}

down_keep_logs() {
  [[ -d "$S" ]] || return 0
  local ns task
  ns="$(ns_name || true)"
  # The gentle way first: with no controller to recreate them, the pods are deleted and kubelet
  # stops their sandboxes (the CNI plugins release their addresses and caches).
  local ids
  ids="$(alive containerd && ctr_ -n k8s.io containers ls -q 2>/dev/null || true)"
  stop_pid controller-manager TERM
  if alive kubelet && alive apiserver; then
    kubectl_ delete pods --all -A --grace-period=0 --force --wait=false >/dev/null 2>&1 || true
    wait_for "kubelet to stop every pod" 60 no_tasks || true
  fi
  stop_pid kubelet TERM
  stop_pid kube-proxy TERM
  # Every container (and its shim) goes with its task. The pods' network namespaces
  # (/run/netns/cni-*, made by containerd's CRI) are found through the tasks' processes first.
  local -A pod_netns=()
  local pid ino f
  if alive containerd; then
    for pid in $(ctr_ -n k8s.io tasks ls 2>/dev/null | awk 'NR > 1 {print $2}'); do
      ino="$(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null)" && pod_netns[$ino]=1
    done
  fi
  if alive containerd; then
    for task in $(ctr_ -n k8s.io tasks ls -q 2>/dev/null); do
      ctr_ -n k8s.io tasks kill -s KILL "$task" >/dev/null 2>&1 || true
    done
    for task in $(ctr_ -n k8s.io tasks ls -q 2>/dev/null); do
      wait_for "task $task to stop" 20 bash -c "! ctr --address '$S/containerd/containerd.sock' -n k8s.io tasks ls -q | grep -qx '$task' || ctr --address '$S/containerd/containerd.sock' -n k8s.io tasks delete -f '$task'" || true
    done
  fi
  stop_pid containerd TERM
  stop_pid scheduler TERM
  stop_pid apiserver TERM
  stop_pid etcd TERM
  stop_pid postgres INT
  # What is left in the namespace (shims of tasks containerd could not delete): gone too.
  if [[ -n "$ns" && -e "/run/netns/$ns" ]]; then
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  # Mounts under the state directory (pods' volumes, container root filesystems, sandbox netns).
  local m
  while read -r m; do umount -l "$m" 2>/dev/null || true; done < <(awk -v s="$S/" 'index($2, s) == 1 {print $2}' /proc/mounts | sort -r)
  [[ -n "$ns" ]] && ip netns del "$ns" 2>/dev/null || true
  for f in /run/netns/cni-*; do
    [[ -e "$f" ]] || continue
    ino="$(stat -L -c %i "$f" 2>/dev/null)" || continue
    [[ -n "${pod_netns[$ino]:-}" ]] && ip netns del "${f##*/}" 2>/dev/null || true
  done
  # What kubelet and the CNI library keep outside the state directory, for these containers only.
  local id
  for id in $ids; do
    rm -f /var/lib/cni/results/*-"$id"-* 2>/dev/null || true
  done
  find /var/log/containers -maxdepth 1 -lname "$S/*" -delete 2>/dev/null || true
  # The cluster's cgroups, deepest first (empty once every process is gone).
  if [[ -s "$S/id" ]]; then
    local dir
    while read -r dir; do
      [[ -d "$dir" ]] && find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done < <(cgroup_dirs)
  fi
  find "$S" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} + 2>/dev/null || true
  # containerd 1.6 puts its shims' sockets in /run/containerd/s whatever its config: left empty.
  rmdir /run/containerd/s /run/containerd 2>/dev/null || true
}

down() {
  down_keep_logs
  if [[ -n "${DBPOOL_CLUSTER_KEEP_LOGS:-}" ]]; then
    log "down; logs kept in $S/logs"
  else
    rm -rf "$S"
    log "down"
  fi
}

status() {
  [[ -s "$S/netns" ]] || { log "no cluster in $S"; return 1; }
  node_ready && log "node $NODE_NAME is Ready" || { log "node $NODE_NAME is not Ready"; return 1; }
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  db-kill) db_kill ;;
  db-start) db_start ;;
  print) print_env ;;
  *) echo "usage: $0 up|down|status|print|db-kill|db-start" >&2; exit 2 ;;
esac
