#!/usr/bin/env bash
# Installs what `make test` needs and a fresh machine may lack: PostgreSQL 15 server binaries,
# openssl, curl, procps, promtool (package prometheus), iptables, PyYAML, umoci, containerd, runc,
# the CNI plugins, psycopg 3 (Debian's python3-psycopg, for the gate's Python example), and the
# rustfmt/clippy components.
# Idempotent and quick when all is present.
set -euo pipefail
need_apt=()
[[ -x /usr/lib/postgresql/15/bin/initdb && -x /usr/lib/postgresql/15/bin/pg_ctl ]] || need_apt+=(postgresql-15)
command -v openssl >/dev/null || need_apt+=(openssl)
# hack/env.sh: curl for readiness checks, ps (procps) to watch process groups.
command -v curl >/dev/null || need_apt+=(curl)
command -v ps >/dev/null || need_apt+=(procps)
# hack/test-alerts.sh: promtool (Debian's prometheus package ships it, with the server that an
# end-to-end test can run), and PyYAML for a python3 that lacks it.
command -v promtool >/dev/null || need_apt+=(prometheus)
# hack/gate-netns.sh: kube-proxy's iptables mode needs iptables (Debian's is the nft backend).
command -v iptables >/dev/null || need_apt+=(iptables)
# hack/gate-netns.sh: network namespaces and addresses.
command -v ip >/dev/null || need_apt+=(iproute2)
# hack/build-image.sh: umoci writes the OCI images without a container engine.
command -v umoci >/dev/null || need_apt+=(umoci)
# hack/cluster.sh: the node's container runtime and network plugins.
command -v containerd >/dev/null || need_apt+=(containerd)
command -v runc >/dev/null || need_apt+=(runc)
[[ -x /usr/lib/cni/bridge ]] || need_apt+=(containernetworking-plugins)
command -v nsenter >/dev/null || need_apt+=(util-linux)
python3 -c 'import yaml' 2>/dev/null || /usr/bin/python3 -c 'import yaml' 2>/dev/null || need_apt+=(python3-yaml)
# hack/gate-netns.sh: examples/gate/psycopg_gate.py runs in the gate's end-to-end test (psycopg 3).
python3 -c 'import psycopg' 2>/dev/null || /usr/bin/python3 -c 'import psycopg' 2>/dev/null || need_apt+=(python3-psycopg)
if ((${#need_apt[@]})); then
  echo "[deps] apt-get install ${need_apt[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >&2
fi
if command -v rustup >/dev/null; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt >&2
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy >&2
fi
