#!/usr/bin/env bash
# The crate graph's rules, checked from `cargo tree` (part of `make lint`):
# - dbpool-recovery is pure: no kube, k8s-openapi, tokio or tokio-postgres among its dependencies;
# - dbpool-probe knows no Kubernetes: no kube or k8s-openapi.
set -euo pipefail
CARGO="${CARGO:-cargo}"
fail=0
check() {
  local crate="$1"; shift
  local tree
  tree="$("$CARGO" tree -p "$crate" -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u)"
  for forbidden in "$@"; do
    if grep -qx "$forbidden" <<<"$tree"; then
      echo "crate graph: $crate depends on $forbidden, which it must not" >&2
      fail=1
    fi
  done
}
check dbpool-recovery kube kube-client kube-runtime k8s-openapi tokio tokio-postgres
check dbpool-probe kube kube-client kube-runtime k8s-openapi
if ((fail)); then exit 1; fi
echo "crate graph: dbpool-recovery is pure; dbpool-probe knows no Kubernetes"
