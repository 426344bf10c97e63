#!/usr/bin/env bash
# Runs tests/gate.rs inside a network namespace of its own: its own `lo` (with two extra /32
# addresses, since EndpointSlices refuse loopback ones), its own etcd, kube-apiserver and
# PostgreSQL (hack/env.sh with a private state directory), and a real kube-proxy in iptables
# mode. Nothing touches the host's network or iptables: every rule kube-proxy writes lives in the
# namespace, and the namespace is deleted at the end, however the tests end.
#
#   hack/gate-netns.sh                  # build what is missing, run the gate tests
#   GATE_TEST_ARGS="endpoints" hack/gate-netns.sh   # a subset (libtest filter)
#
# Needs root (ip netns), iptables (hack/install-deps.sh) and kube-proxy (hack/build-kube-proxy.sh,
# built from the control plane's Kubernetes version and cached).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CARGO="${CARGO:-cargo}"
NS="dbpool-gate-$$"
# Inside the namespace only: the database's counting proxy, and the test client's source address.
DB_ADDR=10.213.0.2
CLIENT_ADDR=10.213.0.3
# hack/env.sh's --service-cluster-ip-range, made local to lo: a node would route ClusterIPs out
# of its default route; this namespace has no other interface, and with a plain `dev lo` route
# the ICMP error of kube-proxy's REJECT never reaches the socket (the connect times out). With a
# local route kube-proxy's OUTPUT rules DNAT (ready endpoints) or REJECT (none ready) as on a node.
SERVICE_CIDR=10.0.0.0/24

log() { printf '[gate-netns] %s\n' "$*" >&2; }

hack/build-controlplane.sh >/dev/null
KUBE_PROXY="$(hack/build-kube-proxy.sh)"
command -v iptables >/dev/null || { log "iptables is missing: run hack/install-deps.sh"; exit 1; }
"$CARGO" test --test gate --no-run

STATE="$(mktemp -d "${TMPDIR:-/tmp}/dbpool-gate.XXXXXX")"
nsx() { ip netns exec "$NS" "$@"; }
KP_PID=""
cleanup() {
  local rc=$?
  ((rc == 0)) || nsx iptables-save >"$STATE/iptables-save.txt" 2>&1 || true
  if [[ -n "$KP_PID" ]]; then kill "$KP_PID" 2>/dev/null || true; wait "$KP_PID" 2>/dev/null || true; fi
  DBPOOL_ENV_DIR="$STATE/env" hack/env.sh down >/dev/null 2>&1 || true
  ip netns del "$NS" 2>/dev/null || true
  if ((rc != 0)); then
    log "failed (exit $rc); logs kept in $STATE (kube-proxy.log, iptables-save.txt, env/logs)"
  else
    rm -rf "$STATE"
  fi
  exit "$rc"
}
trap cleanup EXIT

ip netns add "$NS"
nsx ip link set lo up
nsx ip addr add "$DB_ADDR/32" dev lo
nsx ip addr add "$CLIENT_ADDR/32" dev lo
nsx ip route add local "$SERVICE_CIDR" dev lo
log "network namespace $NS: lo up with $DB_ADDR and $CLIENT_ADDR, $SERVICE_CIDR local to lo"

eval "$(nsx env DBPOOL_ENV_DIR="$STATE/env" hack/env.sh up)"

# No conntrack sysctls (they are per host, not per namespace), no Node object needed. Started
# with `ip netns exec` directly (not through the nsx function, whose subshell would be the PID we
# kill, leaving kube-proxy running): ip execs kube-proxy, so $! is kube-proxy itself.
ip netns exec "$NS" "$KUBE_PROXY" --kubeconfig="$KUBECONFIG" --proxy-mode=iptables --hostname-override=gate-test \
  --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0s \
  --conntrack-tcp-timeout-close-wait=0s --iptables-min-sync-period=0s --iptables-sync-period=30s \
  --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256 \
  >"$STATE/kube-proxy.log" 2>&1 &
KP_PID=$!
deadline=$(($(date +%s) + 60))
until nsx curl -fsS http://127.0.0.1:10256/livez >/dev/null 2>&1; do
  if ! kill -0 "$KP_PID" 2>/dev/null || (($(date +%s) > deadline)); then
    log "kube-proxy did not come up:"; tail -n 30 "$STATE/kube-proxy.log" >&2; exit 1
  fi
  sleep 0.2
done
log "kube-proxy (iptables mode) is up in $NS"

# The README's Python example (examples/gate/psycopg_gate.py) runs too, with the first Python
# that has psycopg 3: DBPOOL_GATE_PYTHON, python3, or Debian's /usr/bin/python3 (where
# hack/install-deps.sh installs python3-psycopg). In CI a missing psycopg is an error, not a skip.
DBPOOL_GATE_PYTHON_FOUND=""
for candidate in ${DBPOOL_GATE_PYTHON:-} python3 /usr/bin/python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c 'import psycopg' 2>/dev/null; then
    DBPOOL_GATE_PYTHON_FOUND="$(command -v "$candidate")"
    break
  fi
done
if [[ -n "$DBPOOL_GATE_PYTHON_FOUND" ]]; then
  export DBPOOL_GATE_PYTHON="$DBPOOL_GATE_PYTHON_FOUND"
  log "the Python example runs with $DBPOOL_GATE_PYTHON"
elif [[ -n "${CI:-}" ]]; then
  log "no Python with psycopg: run hack/install-deps.sh (python3-psycopg); CI does not skip the example"
  exit 1
else
  log "no Python with psycopg: the Python example is skipped (hack/install-deps.sh installs it)"
  unset DBPOOL_GATE_PYTHON
fi

# shellcheck disable=SC2086 # GATE_TEST_ARGS is a libtest filter
nsx env DBPOOL_GATE_DB_ADDR="$DB_ADDR" DBPOOL_GATE_CLIENT_ADDR="$CLIENT_ADDR" DBPOOL_GATE_KUBE_PROXY=1 \
  "$CARGO" test --test gate -- --test-threads=1 --nocapture ${GATE_TEST_ARGS:-}
