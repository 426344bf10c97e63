#!/usr/bin/env bash
# `make bench-client`: builds benches/client (a workspace of its own, so `make test` never
# compiles the peer pools) in release into target/, and runs it inside a network namespace of its
# own, where the kernel's TCP counters (/proc/net/snmp) count this benchmark's connect attempts
# and nothing else's. The benchmark starts its own PostgreSQL 15 (dbpool-testkit) on the
# namespace's loopback. The report is printed and saved as .local/bench-results/client-<time>.md.
#
#   hack/bench-client.sh                                   # everything (~13 minutes)
#   BENCH_CLIENT_SCENARIOS=3s BENCH_CLIENT_POOLS=ours,bb8 hack/bench-client.sh   # a subset
#
# Scenarios: 3s, 30s, idle. Pools: deadpool, deadpool-eq, bb8, bb8-eq, sqlx, sqlx-eq, pgbouncer,
# pgbouncer-retry1, ours, ours-short, ours-dbpool (with a DbPool: needs the control plane below).
# BENCH_CLIENT_STEADY_S (5), BENCH_CLIENT_CAP_S (70) and BENCH_CLIENT_ROUNDS (3 interleaved steady
# rounds per configuration, 0 for none) change the windows.
# Without root (no `ip netns`), it runs in the host's namespace and says so in the report.
#
# PgBouncer (a peer since #30) is Debian's `pgbouncer`, installed here when missing rather than
# in hack/install-deps.sh: `make test` never runs this benchmark, so CI does not pay for it. The
# benchmark starts and stops it itself, as the `postgres` system user (it refuses to run as root).
# The timeline plots (one SVG per scenario) are written next to the report, in
# .local/bench-results/client-<time>/ (BENCH_CLIENT_PLOTS overrides).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CARGO="${CARGO:-cargo}"

if [[ ! -x /usr/sbin/pgbouncer ]]; then
  if [[ $EUID -eq 0 ]]; then
    echo "[bench-client] apt-get install pgbouncer" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    # policy-rc.d exit 101: the package must not start its own pgbouncer service.
    POLICY=/usr/sbin/policy-rc.d
    made_policy=0
    if [[ ! -e $POLICY ]]; then
      printf '#!/bin/sh\nexit 101\n' >"$POLICY" && chmod +x "$POLICY" && made_policy=1
    fi
    apt-get install -y -qq --no-install-recommends pgbouncer >&2 || status=$?
    ((made_policy)) && rm -f "$POLICY"
    ((${status:-0} == 0)) || exit "$status"
  else
    echo "bench-client: pgbouncer missing and not root: the PgBouncer columns will fail" >&2
  fi
fi

"$CARGO" build --release --manifest-path benches/client/Cargo.toml --target-dir "$ROOT/target"
BIN="$ROOT/target/release/bench-client"

# The "with a DbPool" column (pool `ours-dbpool`): the operator's release binary, run by the
# benchmark as a child process, on a control plane of its own (hack/with-env.sh: etcd and
# kube-apiserver, started inside the benchmark's network namespace so the client and the operator
# reach it on that loopback). Skipped when BENCH_CLIENT_POOLS leaves it out.
RUNNER=()
if [[ -z "${BENCH_CLIENT_POOLS:-}" || ",${BENCH_CLIENT_POOLS}," == *",ours-dbpool,"* ]]; then
  "$CARGO" build --release --bin dbpool-operator
  export BENCH_CLIENT_OPERATOR="$ROOT/target/release/dbpool-operator"
  RUNNER=(hack/with-env.sh bench-client-runs --)
fi

mkdir -p .local/bench-results
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
export BENCH_CLIENT_OUT="$ROOT/.local/bench-results/client-$STAMP.md"
export BENCH_CLIENT_PLOTS="${BENCH_CLIENT_PLOTS:-$ROOT/.local/bench-results/client-$STAMP}"

NS="dbpool-bench-client-$$"
if [[ $EUID -eq 0 ]] && command -v ip >/dev/null && ip netns add "$NS" 2>/dev/null; then
  trap 'ip netns del "$NS" 2>/dev/null || true' EXIT
  ip netns exec "$NS" ip link set lo up
  BENCH_CLIENT_NETNS="$NS" ip netns exec "$NS" "${RUNNER[@]}" "$BIN"
else
  echo "bench-client: no network namespace (needs root and ip): connect counts are machine-wide" >&2
  "${RUNNER[@]}" "$BIN"
fi
echo "bench-client: report saved as ${BENCH_CLIENT_OUT#"$ROOT"/}" >&2
