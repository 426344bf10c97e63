#!/usr/bin/env bash
# Builds helm v3 from the Go module proxy into a per-version cache, next to the control plane
# binaries of hack/build-controlplane.sh (no release tarball download, which this network lacks).
#
#   hack/build-helm.sh          # prints the bin directory (holding `helm`) on stdout
#   HELM_VERSION=v3.21.4 hack/build-helm.sh
#
# The first build of v3.22.0 took 2m09s on the 2-core development machine from an empty Go module
# and build cache (module download included), 1m50s when the control plane build had already partly
# filled them; later runs find the cached binary and return at once. Progress goes to stderr.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
CACHE_ROOT="${DBPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dbpool-operator}"
BIN_DIR="$CACHE_ROOT/helm-$HELM_VERSION"

# The checksum database is not reachable from every machine this runs on; module contents still
# come from the proxy, whose content is pinned by go.sum after the first run.
export GOSUMDB="${GOSUMDB:-off}"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

log() { printf '[helm] %s\n' "$*" >&2; }

if [[ -x "$BIN_DIR/helm" ]]; then
  echo "$BIN_DIR"
  exit 0
fi

command -v go >/dev/null || {
  log "error: go not found: run hack/install-deps.sh"
  exit 1
}
mkdir -p "$BIN_DIR"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

log "resolving helm.sh/helm/v3 $HELM_VERSION"
(cd "$work" && go mod init dbpool.local/helmbuild >/dev/null 2>&1)
# Replace directives of helm's own go.mod would not apply to a wrapper module; copy any it has
# (v3.22.0 has none).
modfile="$(cd "$work" && go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
{
  echo "require helm.sh/helm/v3 $HELM_VERSION"
  awk '/^replace \($/ {inblock = 1; print; next} inblock {print; if ($0 == ")") inblock = 0; next} /^replace / {print}' "$modfile"
} >>"$work/go.mod"
cat >"$work/tools.go" <<'GO'
//go:build tools

package tools

import _ "helm.sh/helm/v3/cmd/helm"
GO
log "downloading modules (first run only)"
(cd "$work" && go mod tidy -e >&2)

# The same version stamps helm's Makefile sets: the helm version, and the Kubernetes version that
# `helm lint` / `helm template` assume (.Capabilities.KubeVersion), derived from client-go.
client_go="$(cd "$work" && go list -f '{{.Version}}' -m k8s.io/client-go)" # v0.<minor>.<patch>
k8s_minor="$(echo "$client_go" | cut -d. -f2)"
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
ldflags+=" -X helm.sh/helm/v3/internal/version.gitCommit=module-proxy"
ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
done

log "compiling helm (a few minutes on 2 cores)"
(cd "$work" && go build -trimpath -ldflags "$ldflags" -o "$BIN_DIR/helm.tmp.$$" helm.sh/helm/v3/cmd/helm >&2)
mv "$BIN_DIR/helm.tmp.$$" "$BIN_DIR/helm"
log "helm $HELM_VERSION ready in $BIN_DIR after $(($(date +%s) - start))s"
echo "$BIN_DIR"
