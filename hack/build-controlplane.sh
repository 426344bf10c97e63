#!/usr/bin/env bash
# Builds kube-apiserver, kubectl and etcd from the Go module proxy into a per-version cache,
# the way controller-runtime's envtest ships them, but without downloading release binaries.
#
#   hack/build-controlplane.sh          # prints the bin directory on stdout
#
# A fresh 2-core machine needs roughly 15-20 minutes (module download + compile); later runs
# find the cached binaries and return at once. Progress goes to stderr.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
CACHE_ROOT="${DBPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dbpool-operator}"
BIN_DIR="$CACHE_ROOT/controlplane-$K8S_VERSION-etcd-$ETCD_VERSION"

# The checksum database is not reachable from every machine this runs on; module
# contents still come from the proxy, whose content is pinned by go.sum after the first run.
export GOSUMDB="${GOSUMDB:-off}"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

log() { printf '[controlplane] %s\n' "$*" >&2; }

if [[ -x "$BIN_DIR/kube-apiserver" && -x "$BIN_DIR/kubectl" && -x "$BIN_DIR/etcd" ]]; then
  echo "$BIN_DIR"
  exit 0
fi

mkdir -p "$BIN_DIR"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
patch="${K8S_VERSION##*.}"
staging_version="v0.${minor}.${patch}"

build_kubernetes() {
  local dir="$work/k8s"
  mkdir -p "$dir"
  log "resolving k8s.io/kubernetes $K8S_VERSION (staging modules at $staging_version)"
  (cd "$dir" && go mod init dbpool.local/k8sbuild >/dev/null 2>&1)
  # The release's own go.mod lists the staging modules it replaces with ./staging/src/...;
  # outside the kubernetes repo each must point at its published v0.<minor>.<patch>.
  local modfile
  modfile="$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  {
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo "replace ("
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$modfile" |
      awk -v v="$staging_version" '{print "\t" $1 " => " $1 " " v}'
    echo ")"
  } >>"$dir/go.mod"
  cat >"$dir/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  log "downloading modules (first run only; a few hundred MB)"
  (cd "$dir" && go mod tidy -e >&2)
  local build_date
  build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  local ldflags=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date -X $pkg.gitCommit=module-proxy"
  done
  log "compiling kube-apiserver (about 8 minutes on 2 cores)"
  (cd "$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$BIN_DIR/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver >&2)
  mv "$BIN_DIR/kube-apiserver.tmp" "$BIN_DIR/kube-apiserver"
  log "compiling kubectl (about 3 minutes)"
  (cd "$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$BIN_DIR/kubectl.tmp" k8s.io/kubernetes/cmd/kubectl >&2)
  mv "$BIN_DIR/kubectl.tmp" "$BIN_DIR/kubectl"
}

build_etcd() {
  local dir="$work/etcd"
  mkdir -p "$dir"
  log "resolving etcd $ETCD_VERSION"
  (cd "$dir" && go mod init dbpool.local/etcdbuild >/dev/null 2>&1)
  echo "require go.etcd.io/etcd/server/v3 $ETCD_VERSION" >>"$dir/go.mod"
  cat >"$dir/tools.go" <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  (cd "$dir" && go mod tidy -e >&2)
  log "compiling etcd (about 2 minutes)"
  (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$BIN_DIR/etcd.tmp" go.etcd.io/etcd/server/v3 >&2)
  mv "$BIN_DIR/etcd.tmp" "$BIN_DIR/etcd"
}

[[ -x "$BIN_DIR/etcd" ]] || build_etcd
[[ -x "$BIN_DIR/kube-apiserver" && -x "$BIN_DIR/kubectl" ]] || build_kubernetes
log "control plane binaries ready in $BIN_DIR after $(( $(date +%s) - start ))s"
echo "$BIN_DIR"
