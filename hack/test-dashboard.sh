#!/usr/bin/env bash
# Static checks of the Grafana dashboard (`make dashboard`, part of `make test`; no Grafana, no
# Prometheus): hack/dashboard-queries.py check (JSON, panels, metric names against src/metrics.rs,
# PromQL syntax through `promtool check rules`), then the chart: `helm lint` and `helm template`
# with grafanaDashboard.enabled true and false, and the ConfigMap carries the JSON unchanged with
# the sidecar label, the values' labels, annotations and namespace.
#
# Against a running Prometheus (end-to-end): hack/dashboard-queries.py query http://HOST:9090
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '[dashboard] %s\n' "$*" >&2; }
start=$(date +%s)
command -v promtool >/dev/null || {
  log "error: promtool not found: run hack/install-deps.sh (Debian package prometheus)"
  exit 1
}
hack/dashboard-queries.py check

HELM="$(hack/build-helm.sh)/helm"
chart=charts/dbpool-operator
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$HELM" lint --strict "$chart" --set grafanaDashboard.enabled=true >"$work/lint" 2>&1 || {
  cat "$work/lint" >&2
  exit 1
}
"$HELM" template dbpool-operator "$chart" -n dbpool-system >"$work/off.yaml"
if grep -q '^kind: ConfigMap' "$work/off.yaml"; then
  log "error: grafanaDashboard.enabled=false renders a ConfigMap"
  exit 1
fi
"$HELM" template dbpool-operator "$chart" -n dbpool-system --set grafanaDashboard.enabled=true \
  --show-only templates/grafana-dashboard.yaml >"$work/default.yaml"
"$HELM" template dbpool-operator "$chart" -n dbpool-system --set grafanaDashboard.enabled=true \
  --set grafanaDashboard.namespace=monitoring --set grafanaDashboard.labels.release=kube-prometheus-stack \
  --set grafanaDashboard.annotations.grafana_folder=Databases \
  --show-only templates/grafana-dashboard.yaml >"$work/custom.yaml"
python3 - "$work/default.yaml" "$work/custom.yaml" "$chart/dashboards/dbpool.json" <<'PY'
import json, re, sys

def configmap(path):
    # A tiny reader for the one ConfigMap (no PyYAML needed): metadata lines and the literal block.
    text = open(path).read()
    meta = dict(re.findall(r"^    ([\w./-]+): (.*)$", text.split("\ndata:\n")[0], re.M))
    ns = re.search(r"^  namespace: (.*)$", text, re.M).group(1)
    block = text.split("  dbpool-operator.json: |-\n", 1)[1]
    body = "\n".join(line[4:] for line in block.splitlines())
    return ns, meta, json.loads(body)

shipped = json.load(open(sys.argv[3]))
ns, meta, dash = configmap(sys.argv[1])
assert ns == "dbpool-system", ns
assert meta.get("grafana_dashboard") == '"1"', meta
assert dash == shipped, "the ConfigMap's JSON differs from dashboards/dbpool.json"
ns, meta, dash = configmap(sys.argv[2])
assert ns == "monitoring", ns
assert meta.get("grafana_dashboard") == '"1"' and meta.get("release") == "kube-prometheus-stack", meta
assert meta.get("grafana_folder") == "Databases", meta
assert dash == shipped
PY
if "$HELM" template dbpool-operator "$chart" --set grafanaDashboard.namespace=Not_A_Namespace >/dev/null 2>&1; then
  log "error: values.schema.json accepts grafanaDashboard.namespace=Not_A_Namespace"
  exit 1
fi
log "chart: lint, enabled/disabled render, labels, annotations, namespace and JSON checked"
log "all dashboard checks passed in $(($(date +%s) - start))s"
