#!/usr/bin/env bash
# `make bench-client`: builds benches/client (a workspace of its own, so `make test` never
# compiles the peer pools) in release into target/, and runs it inside a network namespace of its
# own, where the kernel's TCP counters (/proc/net/snmp) count this benchmark's connect attempts
# and nothing else's. The benchmark starts its own PostgreSQL 15 (dbpool-testkit) on the
# namespace's loopback. The report is printed and saved as .local/bench-results/client-<time>.md.
#
#   hack/bench-client.sh                                   # everything (~15 minutes)
#   BENCH_CLIENT_SCENARIOS=3s BENCH_CLIENT_POOLS=ours,bb8 hack/bench-client.sh   # a subset
#
# Scenarios: 3s, 30s, idle. Pools: deadpool, deadpool-eq, bb8, bb8-eq, sqlx, sqlx-eq, ours,
# ours-short. BENCH_CLIENT_STEADY_S (5), BENCH_CLIENT_CAP_S (70) and BENCH_CLIENT_ROUNDS (3
# interleaved steady rounds per configuration, 0 for none) change the windows.
# Without root (no `ip netns`), it runs in the host's namespace and says so in the report.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CARGO="${CARGO:-cargo}"

"$CARGO" build --release --manifest-path benches/client/Cargo.toml --target-dir "$ROOT/target"
BIN="$ROOT/target/release/bench-client"

mkdir -p .local/bench-results
export BENCH_CLIENT_OUT="$ROOT/.local/bench-results/client-$(date -u +%Y%m%dT%H%M%SZ).md"

NS="dbpool-bench-client-$$"
if [[ $EUID -eq 0 ]] && command -v ip >/dev/null && ip netns add "$NS" 2>/dev/null; then
  trap 'ip netns del "$NS" 2>/dev/null || true' EXIT
  ip netns exec "$NS" ip link set lo up
  BENCH_CLIENT_NETNS="$NS" ip netns exec "$NS" "$BIN"
else
  echo "bench-client: no network namespace (needs root and ip): connect counts are machine-wide" >&2
  "$BIN"
fi
echo "bench-client: report saved as ${BENCH_CLIENT_OUT#"$ROOT"/}" >&2
