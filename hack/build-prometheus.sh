#!/usr/bin/env bash
# Builds Prometheus with Kubernetes service discovery from the Go module proxy, into a per-version
# cache: Debian's `prometheus` package (hack/install-deps.sh; promtool for `make alerts`, and
# tests/prometheus.rs) is built without kubernetes_sd_configs ("Disable kubernetes SD, until
# dependencies are more reasonable"), which the in-cluster test (hack/test-node-ops.sh) needs to
# find the operator pods the way the chart's ServiceMonitor does.
#
#   hack/build-prometheus.sh          # prints the path of the prometheus binary on stdout
#
# Only the Kubernetes discovery is compiled in (build tags remove_all_sd,enable_kubernetes_sd: no
# cloud SDKs), with client-go at the control plane's version (hack/build-controlplane.sh), whose
# compiled packages the Go build cache then shares. No web UI assets (the HTTP API is all the test
# uses). Later runs find the cached binary and return at once. Progress goes to stderr.
set -euo pipefail

# Prometheus 3.11.0 (its Go module is versioned v0.311.0): the newest release on client-go v0.35.
PROMETHEUS_MODULE_VERSION="${PROMETHEUS_MODULE_VERSION:-v0.311.0}"
K8S_VERSION="${K8S_VERSION:-$(sed -n 's/^K8S_VERSION="\${K8S_VERSION:-\(v[0-9.]*\)}"$/\1/p' "$(dirname "$0")/build-controlplane.sh")}"
CACHE_ROOT="${DBPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dbpool-operator}"
BIN_DIR="$CACHE_ROOT/prometheus-$PROMETHEUS_MODULE_VERSION-k8s-$K8S_VERSION"

export GOSUMDB="${GOSUMDB:-off}"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

log() { printf '[prometheus] %s\n' "$*" >&2; }

if [[ -x "$BIN_DIR/prometheus" ]]; then
  echo "$BIN_DIR/prometheus"
  exit 0
fi

mkdir -p "$BIN_DIR"
# One build at a time: a second caller waits for the first and takes its binary.
exec 9>"$BIN_DIR.lock"
flock 9
if [[ -x "$BIN_DIR/prometheus" ]]; then
  echo "$BIN_DIR/prometheus"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
patch="${K8S_VERSION##*.}"
staging_version="v0.${minor}.${patch}"

dir="$work/prom"
mkdir -p "$dir"
(cd "$dir" && go mod init dbpool.local/prometheusbuild >/dev/null 2>&1)
cat >>"$dir/go.mod" <<MOD
require (
	github.com/prometheus/prometheus $PROMETHEUS_MODULE_VERSION
	k8s.io/api $staging_version
	k8s.io/apimachinery $staging_version
	k8s.io/client-go $staging_version
)
MOD
cat >"$dir/tools.go" <<'GO'
//go:build tools

package tools

import _ "github.com/prometheus/prometheus/cmd/prometheus"
GO
log "resolving github.com/prometheus/prometheus $PROMETHEUS_MODULE_VERSION (client-go $staging_version)"
(cd "$dir" && go mod tidy -e >&2)
log "compiling prometheus (kubernetes discovery only)"
(cd "$dir" && go build -trimpath -tags remove_all_sd,enable_kubernetes_sd -ldflags "-s -w" \
  -o "$BIN_DIR/prometheus.tmp" github.com/prometheus/prometheus/cmd/prometheus >&2)
mv "$BIN_DIR/prometheus.tmp" "$BIN_DIR/prometheus"
log "prometheus ready in $BIN_DIR after $(($(date +%s) - start))s"
echo "$BIN_DIR/prometheus"
