#!/usr/bin/env bash
# Builds kube-proxy from the Go module proxy, from the same k8s.io/kubernetes version as the
# control plane (hack/build-controlplane.sh), into a per-version cache.
#
#   hack/build-kube-proxy.sh          # prints the path of the kube-proxy binary on stdout
#
# Only the gate's end-to-end test (tests/gate.rs, through hack/gate-netns.sh) needs it. Run after
# hack/build-controlplane.sh (same Go module and build caches) it compiles only the ~60 of its
# 1,405 packages that kube-apiserver and kubectl do not share, and links: 21 s measured on 2 cores.
# Later runs find the cached binary and return at once. Progress goes to stderr.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-$(sed -n 's/^K8S_VERSION="\${K8S_VERSION:-\(v[0-9.]*\)}"$/\1/p' "$(dirname "$0")/build-controlplane.sh")}"
CACHE_ROOT="${DBPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dbpool-operator}"
BIN_DIR="$CACHE_ROOT/kube-proxy-$K8S_VERSION"

export GOSUMDB="${GOSUMDB:-off}"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

log() { printf '[kube-proxy] %s\n' "$*" >&2; }

if [[ -x "$BIN_DIR/kube-proxy" ]]; then
  echo "$BIN_DIR/kube-proxy"
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
(cd "$dir" && go mod init dbpool.local/kubeproxybuild >/dev/null 2>&1)
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

import _ "k8s.io/kubernetes/cmd/kube-proxy"
GO
log "downloading modules (shared with the control plane's; quick when it was built here)"
(cd "$dir" && go mod tidy -e >&2)
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date -X $pkg.gitCommit=module-proxy"
done
log "compiling kube-proxy"
(cd "$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$BIN_DIR/kube-proxy.tmp" k8s.io/kubernetes/cmd/kube-proxy >&2)
mv "$BIN_DIR/kube-proxy.tmp" "$BIN_DIR/kube-proxy"
log "kube-proxy ready in $BIN_DIR after $(( $(date +%s) - start ))s"
echo "$BIN_DIR/kube-proxy"
