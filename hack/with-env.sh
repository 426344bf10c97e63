#!/usr/bin/env bash
# Runs a command against a private environment of its own: builds the control plane and helm
# (cached), starts etcd + kube-apiserver + PostgreSQL (hack/env.sh) in a state directory that
# belongs to this run, exports KUBECONFIG and DBPOOL_TEST_KUBECONFIG, runs the command, and tears
# the environment down however the command ends. The one home of this lifecycle: `make test`
# (hack/test.sh) and `make bench` both use it.
#
#   hack/with-env.sh RUNS -- COMMAND [ARGS...]
#
# RUNS names the directory under .local/ that holds the runs' state (test-runs, bench-runs). An
# environment a person started with `make env-up`, or a concurrent run in the same checkout, is
# never touched. Runs whose owner is gone (killed before its trap ran) are stopped and removed; a
# failed run's directory stays for its logs until then.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
runs_name="${1:?usage: hack/with-env.sh RUNS -- COMMAND...}"
shift
[[ "${1:-}" == "--" ]] && shift
(($#)) || { echo "usage: hack/with-env.sh RUNS -- COMMAND..." >&2; exit 2; }
RUNS="$ROOT/.local/$runs_name"

hack/build-controlplane.sh >/dev/null
# helm for the chart tests (built once from the Go module proxy, cached).
HELM_BIN_DIR="$(hack/build-helm.sh)"
export PATH="$HELM_BIN_DIR:$PATH"

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
    echo "[$runs_name] failed (exit $rc); control plane and PostgreSQL logs: $DBPOOL_ENV_DIR/logs" >&2
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
echo "[$runs_name] kube-apiserver $(kubectl version -o json | sed -n 's/.*"gitVersion": "\(v[^"]*\)".*/\1/p' | tail -1) at $(kubectl config view -o jsonpath='{.clusters[0].cluster.server}'); kubectl $(command -v kubectl)" >&2
"$@"
