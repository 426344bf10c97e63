#!/usr/bin/env bash
# What `make test` runs after lint and crd-check: builds the control plane (cached), starts a
# private environment (hack/env.sh with a state directory of this run's own, so neither an
# environment a person started with `make env-up` nor a concurrent `make test` in the same
# checkout is touched), runs every cargo test target against it, and tears the environment down
# however the tests end.
#
#   CARGO_TEST_ARGS="--test admission"  hack/test.sh     # a subset (default: --workspace --lib --bins --tests;
#                                                        # the benchmark is `make bench`)
#   TEST_THREADS=4                      hack/test.sh     # threads per test binary
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CARGO="${CARGO:-cargo}"
RUNS="$ROOT/.local/test-runs"

hack/build-controlplane.sh >/dev/null
# helm for tests/packaging.rs and tests/rbac.rs (built once from the Go module proxy, cached).
HELM_BIN_DIR="$(hack/build-helm.sh)"
export PATH="$HELM_BIN_DIR:$PATH"
# Compile first, so the environment does not idle through the build.
# shellcheck disable=SC2086 # CARGO_TEST_ARGS is a list of words on purpose
"$CARGO" test ${CARGO_TEST_ARGS:---workspace --lib --bins --tests} --no-run

# Environments of earlier runs whose test.sh is gone (killed before its trap ran) are stopped and
# removed; a failed run's directory stays for its logs until then.
mkdir -p "$RUNS"
for dir in "$RUNS"/*/; do
  [[ -d "$dir" ]] || continue
  owner="$(cat "$dir/owner" 2>/dev/null || true)"
  if [[ -z "$owner" ]] || ! kill -0 "$owner" 2>/dev/null; then
    DBPOOL_ENV_DIR="${dir%/}" hack/env.sh down 2>/dev/null || true
    rm -rf "$dir"
  fi
done
export DBPOOL_ENV_DIR="$RUNS/$$"
mkdir -p "$DBPOOL_ENV_DIR"
echo $$ >"$DBPOOL_ENV_DIR/owner"

cleanup() {
  local rc=$?
  hack/env.sh down || true
  if ((rc != 0)); then
    echo "[test] failed (exit $rc); control plane and PostgreSQL logs: $DBPOOL_ENV_DIR/logs" >&2
  else
    rm -rf "$DBPOOL_ENV_DIR"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

env_lines="$(hack/env.sh up)"
eval "$env_lines"
export DBPOOL_TEST_KUBECONFIG="$KUBECONFIG"
echo "[test] kube-apiserver $(kubectl version -o json | sed -n 's/.*"gitVersion": "\(v[^"]*\)".*/\1/p' | tail -1) at $(kubectl config view -o jsonpath='{.clusters[0].cluster.server}'); kubectl $(command -v kubectl)" >&2

# Every test binary runs even when an earlier one failed (--no-fail-fast), so one run reports all
# failures. Two cores: cargo's default of one test thread per core keeps the timing-sensitive
# integration tests honest; TEST_THREADS overrides it.
threads=()
[[ -n "${TEST_THREADS:-}" ]] && threads=(--test-threads "$TEST_THREADS")
# shellcheck disable=SC2086 # CARGO_TEST_ARGS is a list of words on purpose
"$CARGO" test --no-fail-fast ${CARGO_TEST_ARGS:---workspace --lib --bins --tests} -- "${threads[@]}"
