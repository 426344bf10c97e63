#!/usr/bin/env bash
# Proves the chart's alert rules with promtool (Debian's `prometheus` package; hack/install-deps.sh
# installs it): renders the PrometheusRule with helm exactly as it ships (default values plus
# prometheusRule.enabled), extracts spec.groups into a plain Prometheus rules file, checks that
# every metric it names exists in src/metrics.rs, then runs `promtool check rules` and the unit
# tests in tests/alerts/*_test.yaml (`promtool test rules`) against it. It also checks that the
# prometheusRule.for values reach the rules.
#
#   hack/test-alerts.sh            # `make alerts`; part of `make test`
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '[alerts] %s\n' "$*" >&2; }
start=$(date +%s)

command -v promtool >/dev/null || {
  log "error: promtool not found: run hack/install-deps.sh (Debian package prometheus)"
  exit 1
}
# A python3 with PyYAML: the one on PATH, else Debian's (python3-yaml, from hack/install-deps.sh).
PYTHON=""
for candidate in python3 /usr/bin/python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c 'import yaml' 2>/dev/null; then
    PYTHON="$candidate"
    break
  fi
done
[[ -n "$PYTHON" ]] || {
  log "error: no python3 with PyYAML: run hack/install-deps.sh (Debian package python3-yaml)"
  exit 1
}
HELM_BIN_DIR="$(hack/build-helm.sh)"
HELM="$HELM_BIN_DIR/helm"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# render OUT [helm args...]: the PrometheusRule's spec.groups as a Prometheus rules file.
render() {
  local out="$1"
  shift
  "$HELM" template dbpool-operator charts/dbpool-operator --namespace dbpool-system \
    --set prometheusRule.enabled=true "$@" --show-only templates/prometheusrule.yaml >"$work/rule.yaml"
  "$PYTHON" - "$work/rule.yaml" "$out" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
assert len(docs) == 1 and docs[0]["kind"] == "PrometheusRule", docs
with open(sys.argv[2], "w") as f:
    yaml.safe_dump({"groups": docs[0]["spec"]["groups"]}, f, sort_keys=False, width=1 << 16)
PY
}

render "$work/rules.yaml"
log "rendered $(grep -c '^ *- alert:' "$work/rules.yaml") alerts from charts/dbpool-operator (helm $("$HELM" version --short))"
hack/metrics_catalog.py check "$work/rules.yaml"
promtool check rules "$work/rules.yaml" >&2
cp tests/alerts/*_test.yaml "$work/"
promtool test rules "$work"/*_test.yaml

# The for: durations follow the values (the end-to-end test shortens them); "0s" means none.
render "$work/rules-for.yaml" --set prometheusRule.for.breakerOpen=5s \
  --set prometheusRule.for.recoveryAttemptsHigh=1m --set prometheusRule.for.healthCheckFailing=0s
promtool check rules "$work/rules-for.yaml" >/dev/null
"$PYTHON" - "$work/rules.yaml" "$work/rules-for.yaml" <<'PY'
import sys, yaml
def fors(path):
    rules = yaml.safe_load(open(path))["groups"][0]["rules"]
    return {r["alert"]: r.get("for") for r in rules}
default, custom = fors(sys.argv[1]), fors(sys.argv[2])
want_default = {"DbPoolBreakerOpen": "60s", "DbPoolRecoveryAttemptsHigh": None, "DbPoolHealthCheckFailing": None}
want_custom = {"DbPoolBreakerOpen": "5s", "DbPoolRecoveryAttemptsHigh": "1m", "DbPoolHealthCheckFailing": None}
assert default == want_default, f"default for: {default}"
assert custom == want_custom, f"prometheusRule.for values: {custom}"
PY
log "for: durations follow prometheusRule.for"
log "all alert checks passed in $(($(date +%s) - start))s"
