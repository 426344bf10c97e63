#!/usr/bin/env bash
# Builds what a node and its control plane need beyond kube-apiserver, kubectl, etcd and
# kube-proxy: kubelet, kube-controller-manager and kube-scheduler, from the Go module proxy, from
# the same k8s.io/kubernetes version as the control plane (hack/build-controlplane.sh), into a
# per-version cache.
#
#   hack/build-node.sh                # prints the bin directory on stdout
#
# The one-node cluster (hack/cluster.sh) needs them. Run after hack/build-controlplane.sh (same Go
# module and build caches) it compiles only the packages kube-apiserver and kubectl do not share.
# Later runs find the cached binary and return at once. Progress goes to stderr.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-$(sed -n 's/^K8S_VERSION="\${K8S_VERSION:-\(v[0-9.]*\)}"$/\1/p' "$(dirname "$0")/build-controlplane.sh")}"
CACHE_ROOT="${DBPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dbpool-operator}"
BIN_DIR="$CACHE_ROOT/node-$K8S_VERSION"
CMDS=(kubelet kube-controller-manager kube-scheduler)

export GOSUMDB="${GOSUMDB:-off}"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

log() { printf '[node] %s\n' "$*" >&2; }

have_all() { local c; for c in "${CMDS[@]}"; do [[ -x "$BIN_DIR/$c" ]] || return 1; done; }
if have_all; then
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

dir="$work/k8s"
mkdir -p "$dir"
log "resolving k8s.io/kubernetes $K8S_VERSION (staging modules at $staging_version)"
(cd "$dir" && go mod init dbpool.local/nodebuild >/dev/null 2>&1)
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
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
log "downloading modules (shared with the control plane's; quick when it was built here)"
(cd "$dir" && go mod tidy -e >&2)
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date -X $pkg.gitCommit=module-proxy"
done
for c in "${CMDS[@]}"; do
  [[ -x "$BIN_DIR/$c" ]] && continue
  log "compiling $c"
  (cd "$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$BIN_DIR/$c.tmp" "k8s.io/kubernetes/cmd/$c" >&2)
  mv "$BIN_DIR/$c.tmp" "$BIN_DIR/$c"
done
log "${CMDS[*]} ready in $BIN_DIR after $(( $(date +%s) - start ))s"
echo "$BIN_DIR"
