#!/usr/bin/env bash
# The crate graph's rules, checked from `cargo tree` (part of `make lint`):
# - dbpool-recovery is pure: no kube, k8s-openapi, tokio or tokio-postgres among its dependencies;
# - dbpool-vocab (the probe's vocabulary, shared with the API) is pure too: no kube, k8s-openapi,
#   tokio, tokio-postgres or socket2;
# - dbpool-probe knows no Kubernetes: no kube or k8s-openapi;
# - dbpool-api and kubectl-dbpool link no database client: no dbpool-probe or tokio-postgres (the
#   API takes the probe's vocabulary from dbpool-vocab), and no crate of ours uses socket2 there.
#   socket2 itself cannot go: kube's HTTP client (hyper-util) and tokio's `net` feature use it,
#   so the rule is that only they do.
set -euo pipefail
CARGO="${CARGO:-cargo}"
fail=0
# check CRATE RULE FORBIDDEN...: none of FORBIDDEN is among CRATE's normal dependencies.
check() {
  local crate="$1" rule="$2"; shift 2
  local tree
  tree="$("$CARGO" tree -p "$crate" -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u)"
  for forbidden in "$@"; do
    if grep -qx "$forbidden" <<<"$tree"; then
      echo "crate graph: $crate depends on $forbidden, which it must not ($rule)" >&2
      fail=1
    fi
  done
}
# check_users CRATE DEP RULE: in CRATE's normal graph, no workspace crate (dbpool-*,
# kubectl-dbpool) depends on DEP directly.
check_users() {
  local crate="$1" dep="$2" rule="$3"
  local users
  users="$("$CARGO" tree -p "$crate" -e normal --prefix depth --format '{p}' | awk -v dep="$dep" '
    { match($0, /^[0-9]+/); d = substr($0, 1, RLENGTH) + 0; split(substr($0, RLENGTH + 1), f, " ")
      at[d] = f[1]; if (f[1] == dep && d > 0) print at[d - 1] }' | sort -u)"
  for user in $users; do
    if [[ "$user" == dbpool-* || "$user" == kubectl-dbpool ]]; then
      echo "crate graph: $user uses $dep in $crate's graph, which it must not ($rule)" >&2
      fail=1
    fi
  done
}
check dbpool-recovery "dbpool-recovery is pure" \
  kube kube-client kube-runtime k8s-openapi tokio tokio-postgres
check dbpool-vocab "dbpool-vocab is pure: the probe's enums and report, no Kubernetes, no I/O" \
  kube kube-client kube-runtime k8s-openapi tokio tokio-postgres socket2
check dbpool-probe "dbpool-probe knows no Kubernetes" \
  kube kube-client kube-runtime k8s-openapi
check dbpool-api "dbpool-api links no database client: it takes the probe's types from dbpool-vocab" \
  dbpool-probe tokio-postgres
check kubectl-dbpool "the plugin links no database client: dbpool-api and the plugin take the probe's types from dbpool-vocab" \
  dbpool-probe tokio-postgres
check_users kubectl-dbpool socket2 \
  "the plugin opens no database sockets: socket2 may come only with kube's HTTP client and tokio"
if ((fail)); then exit 1; fi
echo "crate graph: dbpool-recovery and dbpool-vocab are pure; dbpool-probe knows no Kubernetes;" \
  "dbpool-api and kubectl-dbpool link no dbpool-probe or tokio-postgres"
