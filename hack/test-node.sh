#!/usr/bin/env bash
# The in-cluster test: the chart installed with the daemonless image into a one-node cluster
# (hack/cluster.sh, a private state directory and network namespace), as a user would.
#
#   hack/test-node.sh              # build what is missing, run every check, tear down
#   NODE_KEEP=1 hack/test-node.sh  # keep the cluster up afterwards (hack/cluster.sh down to stop)
#
# Checks, each printed as ok/FAIL, then "N passed, N failed":
#   1. helm install, default values (two replicas): both pods Ready through the kubelet's probes,
#      one of them holds the Lease.
#   2. The operator's API calls, from the apiserver's audit log (its ServiceAccount only): every
#      (verb, group, resource) it used is granted by the chart's rules; every granted rule is used
#      or is listed in UNUSED_BY_DESIGN below with its reason.
#   3. From /proc of each operator container's process (not the manifest): uid and gid 65532, no
#      capabilities (effective, permitted, ambient, bounding), no_new_privs, the root read-only.
#   4. A DbPool whose host is a name (an /etc/hosts entry through the chart's hostAliases: this
#      node has no cluster DNS) of the PostgreSQL outside the cluster goes Healthy; the
#      dbpool-client example service (its own image) follows it and is Ready; a DbPool without its
#      Secret is ConfigError with an event.
#   Then hack/test-node-ops.sh (sourced): Prometheus through kubernetes_sd_configs and the
#   breaker-open alert, the database's outage, `kubectl dbpool reopen`, the gate and the client
#   service under a hold, failover (leader pod deleted, leader SIGSTOPped) with the audit log as
#   the fence's witness, the PodDisruptionBudget against two evictions. Its header lists them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CARGO="${CARGO:-cargo}"
RELEASE=dbpool
NS=dbpool-system
APP_NS=shop
DB_NAME=orders-db.dbpool.test
TIMEOUT="${NODE_TEST_TIMEOUT:-240}"

log() { printf '[test-node] %s\n' "$*" >&2; }
passed=0
failed=0
ok() { passed=$((passed + 1)); printf 'ok    %s\n' "$*"; }
fail() { failed=$((failed + 1)); printf 'FAIL  %s\n' "$*"; }

# wait_for WHAT SECONDS COMMAND...: polls COMMAND every 0.5 s until it succeeds or time runs out.
wait_for() {
  local what="$1" secs="$2" deadline
  shift 2
  deadline=$(($(date +%s) + secs))
  until "$@" >/dev/null 2>&1; do
    (($(date +%s) < deadline)) || { log "timed out after ${secs}s: $what"; return 1; }
    sleep 0.5
  done
}

start=$(date +%s)
CARGO="$CARGO" hack/build-image.sh >/dev/null
"$CARGO" build -p kubectl-dbpool >&2
HELM="$(hack/build-helm.sh)/helm"
image_done=$(date +%s)

export DBPOOL_CLUSTER_DIR
DBPOOL_CLUSTER_DIR="$(mktemp -d "${TMPDIR:-/tmp}/dbpool-node.XXXXXX")"
DBPOOL_CLUSTER_NETNS=""
nsx() { nsenter --net="$DBPOOL_CLUSTER_NETNS" -- "$@"; }
k() { nsx "$(cat "$DBPOOL_CLUSTER_DIR/bin")/kubectl" "$@"; }
ctr_() { ctr --address "$DBPOOL_CLUSTER_CONTAINERD" -n k8s.io "$@"; }
PROM_PID=""
cleanup() {
  local rc=$?
  [[ -n "$PROM_PID" ]] && { kill "$PROM_PID" 2>/dev/null; wait "$PROM_PID" 2>/dev/null; }
  if ((rc != 0)) || ((failed > 0)); then
    mkdir -p "$DBPOOL_CLUSTER_DIR/logs"
    cp "$DBPOOL_CLUSTER_DIR/audit.log" "$DBPOOL_CLUSTER_DIR/logs/" 2>/dev/null || true
    { k get pods -A -o wide; k describe pods -n "$NS"; k logs -n "$NS" -l app.kubernetes.io/instance="$RELEASE" --tail=100 --prefix; } \
      >"$DBPOOL_CLUSTER_DIR/logs/pods.txt" 2>&1 || true
    # kubectl logs needs the node's name to resolve (no cluster DNS here): copy the kubelet's
    # container logs (every restart of every pod) straight from its log directory instead.
    cp -r "$DBPOOL_CLUSTER_DIR/pod-logs" "$DBPOOL_CLUSTER_DIR/logs/" 2>/dev/null || true
  fi
  if [[ -n "${NODE_KEEP:-}" ]]; then
    log "cluster kept: source $DBPOOL_CLUSTER_DIR/env.sh"
  else
    if ((rc == 0 && failed == 0)); then
      hack/cluster.sh down >/dev/null 2>&1 || true
    else
      DBPOOL_CLUSTER_KEEP_LOGS=1 hack/cluster.sh down >/dev/null 2>&1 || true
    fi
    ((rc == 0 && failed == 0)) || log "logs kept in $DBPOOL_CLUSTER_DIR/logs"
  fi
  exit "$rc"
}
trap cleanup EXIT
# A signal ends the script through exit, so the EXIT trap tears the cluster down.
trap 'exit 130' INT
trap 'exit 143' TERM

# shellcheck disable=SC1091
eval "$(hack/cluster.sh up)"
cluster_done=$(date +%s)
BIN="$(cat "$DBPOOL_CLUSTER_DIR/bin")"

for name in dbpool-operator dbpool-client-service; do
  ctr_ images import "target/image/$name.tar" >&2
done
OPERATOR_REF="$(cat target/image/dbpool-operator.ref)"
log "imported $OPERATOR_REF"

# 1. helm install with default values, the image as built (same tag as the chart's appVersion),
# and spec.gate allowed (off by default; the gate is checked in hack/test-node-ops.sh).
nsx "$HELM" install "$RELEASE" charts/dbpool-operator --namespace "$NS" --create-namespace \
  --set gates.enabled=true \
  --set image.repository="${OPERATOR_REF%:*}" --set image.tag="${OPERATOR_REF##*:}" \
  --set "hostAliases[0].ip=$DBPOOL_CLUSTER_DB_IP" --set "hostAliases[0].hostnames[0]=$DB_NAME" >&2
if k -n "$NS" rollout status deployment/"$RELEASE"-dbpool-operator --timeout="${TIMEOUT}s" >&2; then
  ready="$(k -n "$NS" get pods -l app.kubernetes.io/instance="$RELEASE" \
    -o jsonpath='{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}')"
  if [[ "$(grep -c '=True$' <<<"$ready")" == 2 ]]; then ok "two replicas Ready through the kubelet's probes"; else fail "replicas: $ready"; fi
else
  fail "the Deployment did not roll out in ${TIMEOUT}s"
fi
pods="$(k -n "$NS" get pods -l app.kubernetes.io/instance="$RELEASE" -o jsonpath='{.items[*].metadata.name}')"
holder() { k -n "$NS" get lease dbpool-operator -o jsonpath='{.spec.holderIdentity}'; }
if wait_for "a Lease holder" 60 bash -c "[[ -n \"\$(nsenter --net='$DBPOOL_CLUSTER_NETNS' -- '$BIN/kubectl' -n '$NS' get lease dbpool-operator -o jsonpath='{.spec.holderIdentity}')\" ]]" &&
  [[ " $pods " == *" $(holder | sed 's/_[^_]*$//') "* ]]; then
  ok "the Lease is held by $(holder), one of: $pods"
else
  fail "the Lease holder '$(holder 2>/dev/null || true)' is not one of: $pods"
fi

# 4. A DbPool on the PostgreSQL outside the cluster, by name.
k create namespace "$APP_NS" >&2
k -n "$APP_NS" apply -f - >&2 <<EOF
apiVersion: v1
kind: Secret
metadata:
  name: orders-db
  labels: {dbpool.io/credentials: "true"}
  annotations: {dbpool.io/allowed-hosts: $DB_NAME}
stringData:
  password: $(cat "$DBPOOL_CLUSTER_DIR/postgres.pw")
---
apiVersion: dbpool.io/v1alpha1
kind: DbPool
metadata:
  name: orders
spec:
  database:
    host: $DB_NAME
    dbname: postgres
    user: postgres
    passwordSecretRef: {name: orders-db, key: password}
  # Quick to open and to try again: the outage checks wait on these, not on the defaults.
  healthCheck: {interval: 3s, timeout: 2s}
  backoff: {initialDelay: 500ms, maxDelay: 2s}
  breaker: {failureThreshold: 2, openTimeout: 10s}
  gate: {serviceName: orders-gate, port: 5432}
EOF
phase() { k -n "$APP_NS" get dbpool orders -o jsonpath='{.status.phase}'; }
if wait_for "DbPool orders Healthy" "$TIMEOUT" bash -c "[[ \"\$(nsenter --net='$DBPOOL_CLUSTER_NETNS' -- '$BIN/kubectl' -n '$APP_NS' get dbpool orders -o jsonpath='{.status.phase}')\" == Healthy ]]"; then
  ok "DbPool orders (host $DB_NAME, outside the cluster) is Healthy"
else
  fail "DbPool orders is $(phase 2>/dev/null || echo '?'): $(k -n "$APP_NS" get dbpool orders -o jsonpath='{.status}' 2>/dev/null || true)"
fi

# The dbpool-client example service, from its daemonless image, following DbPool orders with the
# Role of examples/client-service/rbac.yaml: Ready once its pool's /healthz says healthy.
CLIENT_REF="$(cat target/image/dbpool-client-service.ref)"
k -n "$APP_NS" apply -f examples/client-service/rbac.yaml >&2
k -n "$APP_NS" apply -f - >&2 <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: orders-app
spec:
  serviceAccountName: orders-app
  hostAliases: [{ip: "$DBPOOL_CLUSTER_DB_IP", hostnames: ["$DB_NAME"]}]
  securityContext: {runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}
  containers:
    - name: app
      image: $CLIENT_REF
      imagePullPolicy: IfNotPresent
      env:
        - {name: DBPOOL_NAMESPACE, value: $APP_NS}
        - {name: DBPOOL_NAME, value: orders}
      ports: [{name: http, containerPort: 8080}]
      readinessProbe: {httpGet: {path: /healthz, port: http}, periodSeconds: 2}
      securityContext:
        readOnlyRootFilesystem: true
        allowPrivilegeEscalation: false
        capabilities: {drop: [ALL]}
EOF
if k -n "$APP_NS" wait pod/orders-app --for=condition=Ready --timeout="${TIMEOUT}s" >&2; then
  ok "the client service ($CLIENT_REF) follows DbPool orders and is Ready through /healthz"
else
  fail "the client service is not Ready: $(k -n "$APP_NS" logs orders-app --tail=20 2>&1 | tr '\n' ' ')"
fi

# A pool whose Secret does not exist: ConfigError, and an event (events.k8s.io create).
k -n "$APP_NS" apply -f - >&2 <<EOF
apiVersion: dbpool.io/v1alpha1
kind: DbPool
metadata:
  name: broken
spec:
  database:
    host: $DB_NAME
    dbname: postgres
    user: postgres
    passwordSecretRef: {name: no-such-secret, key: password}
EOF
events() {
  k -n "$APP_NS" get events.events.k8s.io -o jsonpath='{range .items[*]}{.regarding.name}/{.reason}{"\n"}{end}'
}
config_error_event() { events | grep -qx broken/ConfigError; }
if wait_for "a ConfigError event for DbPool broken" 120 config_error_event; then
  ok "DbPool broken (no Secret) is $(k -n "$APP_NS" get dbpool broken -o jsonpath='{.status.phase}'), with its ConfigError event"
else
  fail "no ConfigError event for DbPool broken; events: $(events 2>/dev/null | tr '\n' ' ')"
fi

# 3. The running containers, from /proc.
for pod in $pods; do
  cid="$(k -n "$NS" get pod "$pod" -o jsonpath='{.status.containerStatuses[?(@.name=="operator")].containerID}')"
  cid="${cid#containerd://}"
  pid="$(ctr_ tasks ls | awk -v c="$cid" '$1 == c {print $2}')"
  if [[ -z "$pid" || ! -r "/proc/$pid/status" ]]; then fail "$pod: no process for container '$cid'"; continue; fi
  st="/proc/$pid/status"
  uids="$(awk '/^Uid:/ {print $2,$3,$4,$5}' "$st")"
  gids="$(awk '/^Gid:/ {print $2,$3,$4,$5}' "$st")"
  caps="$(awk '/^Cap(Inh|Prm|Eff|Bnd|Amb):/ {printf "%s%s ", $1, $2}' "$st")"
  nnp="$(awk '/^NoNewPrivs:/ {print $2}' "$st")"
  rootopts="$(awk '$5 == "/" {print $6}' "/proc/$pid/mountinfo")"
  exe="$(readlink "/proc/$pid/exe" || true)"
  if [[ "$uids" == "65532 65532 65532 65532" && "$gids" == "65532 65532 65532 65532" ]] &&
    ! grep -q '[1-9a-f]' <<<"${caps//Cap???:/}" && [[ "$nnp" == 1 ]] && [[ ",$rootopts," == *,ro,* ]]; then
    ok "$pod (pid $pid, $exe): uid/gid 65532, ${caps% }, no_new_privs, root mounted $rootopts"
  else
    fail "$pod (pid $pid): uid '$uids' gid '$gids' caps '$caps' no_new_privs '$nnp' root '$rootopts'"
  fi
done

# The gate's client: the client service again, without Kubernetes (PGHOST: the gate's Service
# IP, no ServiceAccount token), so its connects go through kube-proxy's rules for orders-gate.
wait_for "the gate's Service" 60 k -n "$APP_NS" get service orders-gate || true
k -n "$APP_NS" apply -f - >&2 <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: gate-client
spec:
  automountServiceAccountToken: false
  securityContext: {runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}
  containers:
    - name: app
      image: $CLIENT_REF
      imagePullPolicy: IfNotPresent
      env:
        - {name: PGHOST, value: "$(k -n "$APP_NS" get service orders-gate -o jsonpath='{.spec.clusterIP}' 2>/dev/null)"}
        - {name: PGPORT, value: "5432"}
        - {name: PGUSER, value: postgres}
        - {name: PGDATABASE, value: postgres}
        - {name: PGPASSWORD, value: "$(cat "$DBPOOL_CLUSTER_DIR/postgres.pw")"}
        - {name: LISTEN_ADDR, value: "0.0.0.0:8080"}
      ports: [{name: http, containerPort: 8080}]
      securityContext:
        readOnlyRootFilesystem: true
        allowPrivilegeEscalation: false
        capabilities: {drop: [ALL]}
EOF
k -n "$APP_NS" wait pod/gate-client --for=condition=Ready --timeout="${TIMEOUT}s" >&2 || true

# Failures, failover and the ops kit (checks 5, 1, 4, 2, 3 of the issue; its header).
PROMETHEUS="$(hack/build-prometheus.sh)"
# shellcheck source=hack/test-node-ops.sh
source hack/test-node-ops.sh

# 2. The audit log against the chart's rules.
SA="system:serviceaccount:$NS:$RELEASE-dbpool-operator"
k get clusterrole "$RELEASE-dbpool-operator" -o json >"$DBPOOL_CLUSTER_DIR/clusterrole.json"
k -n "$NS" get role "$RELEASE-dbpool-operator-leader-election" -o json >"$DBPOOL_CLUSTER_DIR/role.json"
if python3 hack/check-audit.py "$DBPOOL_CLUSTER_DIR/audit.log" "$SA" "$NS" \
  "$DBPOOL_CLUSTER_DIR/clusterrole.json" "$DBPOOL_CLUSTER_DIR/role.json"; then
  ok "the operator's API calls (audit log) are within the chart's RBAC, every rule used or explained"
else
  fail "audit log vs the chart's RBAC (above)"
fi

log "image $((image_done - start))s, cluster up $((cluster_done - image_done))s, tests $(($(date +%s) - cluster_done))s"
echo "test-node: $passed passed, $failed failed"
((failed == 0))
