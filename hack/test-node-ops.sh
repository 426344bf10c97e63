# shellcheck shell=bash
# Sourced by hack/test-node.sh once the chart is installed and DbPool orders (with its gate) and the
# client service run: failures, failover and the ops kit, in pods. Uses the caller's k, nsx, ok,
# fail, wait_for, log, HELM, BIN and the names NS, APP_NS, RELEASE, DB_NAME, TIMEOUT.
#
#   5. Prometheus (hack/build-prometheus.sh: Debian's has no kubernetes_sd_configs) scrapes the operator pods through kubernetes_sd_configs built
#      from the chart's rendered ServiceMonitor (its namespace, label selector, port, path,
#      honorLabels); the chart's alert rules are loaded with breakerOpen's `for` at 5s.
#   1. The PostgreSQL outside the cluster killed (SIGKILL): DbPool orders goes Open with the
#      reason; the client service answers 503 from its breaker; DbPoolBreakerOpen fires. Restarted:
#      Healthy again and the client serves. `kubectl dbpool reopen`: the token acted on
#      (status.lastForceReopen).
#   4. A maintenance hold (`kubectl dbpool hold`, the database up): a pod reaching the gate's
#      Service IP is refused (kube-proxy's REJECT for a Service without endpoints), the client
#      service fails fast; released: both are served again.
#   2. The leader pod deleted: the other replica holds the Lease within lease duration + renew
#      grace (measured); after its first status write to a pool, no status write from the old pod
#      is accepted (the apiserver's audit log, hack/check-fence.py). The new leader's process
#      SIGSTOPped (found through containerd and /proc): the other replica takes over, the kubelet's
#      liveness probe restarts the stopped container; the process thawed, none of its status writes
#      after the new term's first one is accepted.
#   3. The node cordoned, both operator pods evicted through the Eviction API: the first is
#      allowed, the second refused (429) while the first one's replacement cannot be Ready.
#   Last: the freeze's liveness kill is the run's only one (no healthy operator restarted).
S="$DBPOOL_CLUSTER_DIR"
PLUGIN="$ROOT/target/debug/kubectl-dbpool"
LEASE_SECONDS=15 # the operator's --lease-duration default (src/cli.rs)
RENEW_GRACE_SECONDS=5 # its --lease-renew-grace default
PROM_PORT=19090
OPERATOR_SA="system:serviceaccount:$NS:$RELEASE-dbpool-operator"
API="https://10.244.0.1:6443"

plugin() { nsx "$PLUGIN" -n "$APP_NS" "$@"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }
leader_pod() { k -n "$NS" get lease dbpool-operator -o jsonpath='{.spec.holderIdentity}' | sed 's/_[^_]*$//'; }
operator_pods() { k -n "$NS" get pods -l app.kubernetes.io/instance="$RELEASE" -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' | sort; }
pool_json() { k -n "$APP_NS" get dbpool orders -o json; }
breaker() { k -n "$APP_NS" get dbpool orders -o jsonpath='{.status.breaker.state}'; }
phase_is() { [[ "$(k -n "$APP_NS" get dbpool orders -o jsonpath='{.status.phase}')" == "$1" ]]; }
breaker_is() { [[ "$(breaker)" == "$1" ]]; }
two_ready() {
  [[ "$(k -n "$NS" get pods -l app.kubernetes.io/instance="$RELEASE" \
    -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c '^True$')" == 2 ]]
}
# http_code URL OUT: the status code of GET URL from the node's namespace, the body into OUT.
http_code() { nsx curl -s -o "$2" -w '%{http_code}' --max-time 10 "$1" || true; }
pod_ip() { k -n "$APP_NS" get pod "$1" -o jsonpath='{.status.podIP}'; }
# container_pid POD: the operator container's process, through containerd, checked in /proc.
container_pid() {
  local cid pid
  cid="$(k -n "$NS" get pod "$1" -o jsonpath='{.status.containerStatuses[?(@.name=="operator")].containerID}')"
  pid="$(ctr_ tasks ls | awk -v c="${cid#containerd://}" '$1 == c {print $2}')"
  [[ -n "$pid" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q '^/dbpool-operator run' && echo "$pid"
}
restarts() { k -n "$NS" get pod "$1" -o jsonpath='{.status.containerStatuses[?(@.name=="operator")].restartCount}'; }
# fence OLD NEW SINCE: no accepted status write of OLD after NEW's first one since SINCE (the
# failover's start; NEW may have led an earlier term).
fence() { python3 hack/check-fence.py "$S/audit.log" "$OPERATOR_SA" "$1" "$2" "$3"; }
prom() { nsx curl -fsS --max-time 5 "http://127.0.0.1:$PROM_PORT$1"; }

# ---- 5. Prometheus, configured from the chart's ServiceMonitor --------------------------------
mkdir -p "$S/prometheus"
"$HELM" template "$RELEASE" charts/dbpool-operator --namespace "$NS" \
  --set metrics.serviceMonitor.enabled=true --set prometheusRule.enabled=true \
  --set prometheusRule.for.breakerOpen=5s \
  --show-only templates/servicemonitor.yaml --show-only templates/prometheusrule.yaml >"$S/prometheus/chart.yaml"
python3 - "$S/prometheus" "$S/admin.kubeconfig" <<'PY'
import re, sys, yaml
out, kubeconfig = sys.argv[1], sys.argv[2]
docs = {d["kind"]: d for d in yaml.safe_load_all(open(f"{out}/chart.yaml")) if d}
sm, rule = docs["ServiceMonitor"], docs["PrometheusRule"]
(ep,) = sm["spec"]["endpoints"]
clean = lambda k: re.sub(r"[^a-zA-Z0-9_]", "_", k)
# What the Prometheus Operator generates for a ServiceMonitor: the endpoints role in the
# ServiceMonitor's namespaces, a keep for each label of its selector on the Service, a keep on the
# endpoint's port name, and the target labels it sets.
relabel = [{"source_labels": [f"__meta_kubernetes_service_label_{clean(k)}"], "regex": v, "action": "keep"}
           for k, v in sm["spec"]["selector"]["matchLabels"].items()]
relabel.append({"source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": ep["port"], "action": "keep"})
for meta, label in [("namespace", "namespace"), ("service_name", "service"), ("pod_name", "pod")]:
    relabel.append({"source_labels": [f"__meta_kubernetes_{meta}"], "target_label": label})
config = {
    # The ServiceMonitor's 30s interval shortened: the test waits on the alert, not the clock.
    "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
    "rule_files": [f"{out}/rules.yaml"],
    "scrape_configs": [{
        "job_name": f"serviceMonitor/{sm['metadata']['namespace']}/{sm['metadata']['name']}/0",
        "honor_labels": ep.get("honorLabels", False),
        "metrics_path": ep["path"], "scheme": ep["scheme"],
        "kubernetes_sd_configs": [{"role": "endpoints", "kubeconfig_file": kubeconfig,
                                   "namespaces": {"names": sm["spec"]["namespaceSelector"]["matchNames"]}}],
        "relabel_configs": relabel,
    }],
}
yaml.safe_dump(config, open(f"{out}/prometheus.yml", "w"), sort_keys=False)
yaml.safe_dump({"groups": rule["spec"]["groups"]}, open(f"{out}/rules.yaml", "w"), sort_keys=False, width=1 << 16)
PY
nsenter --net="$DBPOOL_CLUSTER_NETNS" -- "$PROMETHEUS" --config.file="$S/prometheus/prometheus.yml" \
  --storage.tsdb.path="$S/prometheus/data" --web.listen-address="127.0.0.1:$PROM_PORT" \
  >"$S/logs/prometheus.log" 2>&1 &
PROM_PID=$!
scraped_pods() {
  prom /api/v1/targets | python3 -c 'import json, sys
t = json.load(sys.stdin)["data"]["activeTargets"]
print("\n".join(sorted(x["labels"].get("pod", "?") for x in t if x["health"] == "up")))'
}
pods_scraped() { [[ -n "$(operator_pods)" && "$(scraped_pods)" == "$(operator_pods)" ]]; }
if wait_for "Prometheus scraping both operator pods" 90 pods_scraped; then
  ok "Prometheus scrapes both operator pods through kubernetes_sd_configs as the ServiceMonitor selects them: $(scraped_pods | tr '\n' ' ')"
else
  fail "Prometheus targets up: '$(scraped_pods 2>/dev/null | tr '\n' ' ')', operator pods: $(operator_pods | tr '\n' ' ')"
fi

# ---- 1. The outage ------------------------------------------------------------------------------
APP_IP="$(pod_ip orders-app || true)"
t0=$(now)
hack/cluster.sh db-kill >&2
if wait_for "DbPool orders Open" "$TIMEOUT" breaker_is Open; then
  why="$(k -n "$APP_NS" get dbpool orders -o jsonpath='{.status.phase} {.status.conditions[?(@.type=="BreakerOpen")].reason}: {.status.lastProbe.stage} {.status.lastProbe.message}')"
  if grep -qi 'refused\|connect' <<<"$why"; then
    ok "PostgreSQL killed: DbPool orders Open after $(since "$t0")s ($why)"
  else
    fail "DbPool orders Open without the outage's reason: $why"
  fi
else
  fail "DbPool orders is not Open after the kill: $(pool_json | head -c 2000)"
fi
app_fails_fast() {
  [[ "$(http_code "http://$APP_IP:8080/orders/count" "$S/app.out")" == 503 ]] && grep -q 'circuit breaker Open' "$S/app.out"
}
if wait_for "the client service failing fast" 60 app_fails_fast; then
  took="$(nsx curl -s -o /dev/null -w '%{time_total}' --max-time 10 "http://$APP_IP:8080/orders/count")"
  ok "the client service (Role only) fails fast while Open: 503 in ${took}s, '$(head -c 160 "$S/app.out")'"
else
  fail "the client service while Open: $(cat "$S/app.out" 2>/dev/null | head -c 300)"
fi
alert_firing() {
  prom /api/v1/alerts | python3 -c 'import json, sys
a = json.load(sys.stdin)["data"]["alerts"]
sys.exit(0 if any(x["labels"].get("alertname") == "DbPoolBreakerOpen" and x["labels"].get("name") == "orders" and x["state"] == "firing" for x in a) else 1)'
}
if wait_for "DbPoolBreakerOpen firing" 120 alert_firing; then
  ok "the chart's DbPoolBreakerOpen alert (for: 5s) fires for shop/orders, $(since "$t0")s after the kill"
else
  fail "DbPoolBreakerOpen is not firing: $(prom /api/v1/alerts 2>&1 | head -c 600)"
fi

t0=$(now)
hack/cluster.sh db-start >&2
app_serves() { [[ "$(http_code "http://$APP_IP:8080/orders/count" "$S/app.out")" == 200 ]]; }
if wait_for "DbPool orders Healthy again" "$TIMEOUT" phase_is Healthy && wait_for "the client service serving" 90 app_serves; then
  ok "PostgreSQL restarted: DbPool orders Healthy after $(since "$t0")s, the client service serves again ($(tr -d '\n' <"$S/app.out") sessions)"
else
  fail "after the restart: DbPool orders $(breaker)/$(k -n "$APP_NS" get dbpool orders -o jsonpath='{.status.phase}'), client: $(head -c 300 "$S/app.out")"
fi
reopen_out="$(plugin reopen orders --timeout 60s 2>&1)" && reopen_rc=0 || reopen_rc=$?
token="$(sed -n 's/^force-reopen token \([^ ]*\) set on.*/\1/p' <<<"$reopen_out")"
acted="$(k -n "$APP_NS" get dbpool orders -o jsonpath='{.status.lastForceReopen.token}')"
if ((reopen_rc == 0)) && [[ -n "$token" && "$acted" == "$token" ]]; then
  ok "kubectl dbpool reopen: token $token acted on (status.lastForceReopen)"
else
  fail "kubectl dbpool reopen (exit $reopen_rc): $reopen_out; lastForceReopen.token '$acted'"
fi

# ---- 4. The gate, reached from a pod, under a maintenance hold (the database up) ----------------
GATE_IP="$(k -n "$APP_NS" get service orders-gate -o jsonpath='{.spec.clusterIP}' || true)"
GATE_CLIENT_IP="$(pod_ip gate-client || true)"
gate_serves() { [[ "$(http_code "http://$GATE_CLIENT_IP:8080/orders/count" "$S/gate.out")" == 200 ]]; }
gate_refused() {
  [[ "$(http_code "http://$GATE_CLIENT_IP:8080/orders/count" "$S/gate.out")" == 503 ]] && grep -qi 'refused' "$S/gate.out"
}
reject_rule() { nsx iptables-save -t filter | grep -q -- "$APP_NS/orders-gate:postgres has no endpoints.*REJECT"; }
# fresh_gate_client: gate-client-2, a copy of gate-client with a new pool. The gate refuses new
# connects only (kube-proxy's REJECT); gate-client's pooled sessions, opened before, go on.
fresh_gate_client() {
  k -n "$APP_NS" get pod gate-client -o json | python3 -c 'import json, sys
p = json.load(sys.stdin); c = p["spec"]["containers"][0]
c = {k: c[k] for k in ("name", "image", "imagePullPolicy", "env", "ports", "securityContext") if k in c}
spec = {"automountServiceAccountToken": False, "securityContext": p["spec"].get("securityContext", {}), "containers": [c]}
print(json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gate-client-2"}, "spec": spec}))' |
    k -n "$APP_NS" apply -f - >&2
  k -n "$APP_NS" wait pod/gate-client-2 --for=condition=Ready --timeout="${TIMEOUT}s" >&2
  GATE_CLIENT_IP="$(pod_ip gate-client-2)"
}
if wait_for "the gate serving before the hold" 90 gate_serves; then
  plugin hold orders --reason "test-node: the gate under a hold" >&2 || true
  wait_for "DbPool orders held Open" 60 breaker_is Open || true
  fresh_gate_client || true
  # (The client service is not asked here: it follows the DbPool's breaker as a hint and tries
  # the database again after its own openTimeout; a hold is not among its hints.)
  if wait_for "the gate refusing" 90 gate_refused && reject_rule; then
    ok "held Open (the database up): a pod connecting to the gate $GATE_IP:5432 is refused by kube-proxy's REJECT ('$(head -c 160 "$S/gate.out" | tr '\n' ' ')')"
  else
    fail "under the hold: gate client '$(head -c 300 "$S/gate.out")', REJECT rule $(reject_rule && echo present || echo absent)"
  fi
  t0=$(now)
  plugin release orders >&2 || true
  if wait_for "the gate serving after the release" 120 gate_serves && wait_for "the client service serving" 90 app_serves; then
    ok "released: the gate accepts again ($(since "$t0")s: the gate client's own breaker trial) and the client service serves"
  else
    fail "after the release: gate client '$(head -c 300 "$S/gate.out")', app '$(head -c 200 "$S/app.out")', DbPool $(breaker)"
  fi
else
  fail "the gate client never got through $GATE_IP: '$(head -c 300 "$S/gate.out" 2>/dev/null)'; $(k -n "$APP_NS" get dbpool orders -o jsonpath='{.status.conditions}')"
fi

# ---- 2. Failover: the leader pod deleted ---------------------------------------------------------
other_leads() { local l; l="$(leader_pod)"; [[ -n "$l" && "$l" != "$1" ]]; }
old="$(leader_pod)"
t0=$(now)
k -n "$NS" delete pod "$old" --wait=false >&2
if wait_for "a new Lease holder" 60 other_leads "$old"; then
  took="$(since "$t0")"
  new="$(leader_pod)"
  plugin reopen orders --timeout 60s >/dev/null 2>&1 || true # a status write by the new leader
  if awk -v t="$took" -v m="$((LEASE_SECONDS + RENEW_GRACE_SECONDS))" 'BEGIN {exit !(t <= m)}' &&
    verdict="$(fence "$old" "$new" "$t0")"; then
    ok "leader pod $old deleted: $new leads after ${took}s (bound $((LEASE_SECONDS + RENEW_GRACE_SECONDS))s); audit: $(tr '\n' ' ' <<<"$verdict")"
  else
    fail "leader pod $old deleted: $new after ${took}s; audit: ${verdict:-$(fence "$old" "$new" "$t0" 2>&1)}"
  fi
else
  fail "no new Lease holder after deleting $old"
fi
wait_for "two operator pods Ready" "$TIMEOUT" two_ready || fail "the replacement of $old is not Ready"

# ---- 2. Failover: the leader frozen --------------------------------------------------------------
# liveness_kills POD: how many times the kubelet has killed POD's container for its liveness probe
# (an event's count folds repeats). The freeze check waits for this to grow, so a kill before
# the freeze is not taken for the freeze's own.
liveness_kills() {
  k -n "$NS" get events --field-selector "involvedObject.name=$1,reason=Killing" \
    -o jsonpath='{range .items[*]}{.count}{" "}{.message}{"\n"}{end}' |
    awk '/liveness/ { n += ($1 ~ /^[0-9]+$/ ? $1 : 1) } END { print n + 0 }'
}
liveness_killed() { (($(liveness_kills "$1") > $2)); }
restarted() { (($(restarts "$1") > $2)) && [[ "$(k -n "$NS" get pod "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]; }
frozen="$(leader_pod)"
pid="$(container_pid "$frozen" || true)"
if [[ -z "$pid" ]]; then
  fail "no /dbpool-operator process for the leader pod '$frozen'"
else
  before="$(restarts "$frozen")"
  kills_before="$(liveness_kills "$frozen")"
  t0=$(now)
  kill -STOP "$pid"
  wait_for "$frozen's process stopped" 10 grep -q '^State:.*stopped' "/proc/$pid/status" || true
  log "SIGSTOP to $frozen's process $pid ($(awk '/^State:/ {print $2, $3}' "/proc/$pid/status"))"
  if wait_for "the other replica taking over" 60 other_leads "$frozen"; then
    took="$(since "$t0")"
    new="$(leader_pod)"
    plugin reopen orders --timeout 60s >/dev/null 2>&1 || true # the new term's first status write
    if wait_for "the liveness probe's kill" 120 liveness_killed "$frozen" "$kills_before"; then
      killed="$(since "$t0")"
      kill -CONT "$pid" 2>/dev/null || true # thawed: it now sees the kubelet's SIGTERM
      if wait_for "$frozen restarted and Ready" "$TIMEOUT" restarted "$frozen" "$before" &&
        verdict="$(fence "$frozen" "$new" "$t0")" && [[ "$(leader_pod)" == "$new" ]]; then
        ok "leader $frozen frozen: $new leads after ${took}s (bound $((LEASE_SECONDS + RENEW_GRACE_SECONDS))s), liveness kill at ${killed}s, thawed and restarted by $(since "$t0")s; audit: $(tr '\n' ' ' <<<"$verdict")"
      else
        fail "frozen $frozen: restarts $(restarts "$frozen") (before $before), leader $(leader_pod); audit: ${verdict:-$(fence "$frozen" "$new" "$t0" 2>&1)}"
      fi
    else
      kill -CONT "$pid" 2>/dev/null || true
      fail "no liveness kill of $frozen: $(k -n "$NS" get events --field-selector "involvedObject.name=$frozen" -o jsonpath='{range .items[*]}{.reason}: {.message}{"\n"}{end}' | tail -5)"
    fi
  else
    kill -CONT "$pid" 2>/dev/null || true
    fail "nobody took over from the frozen $frozen"
  fi
fi
wait_for "two operator pods Ready" "$TIMEOUT" two_ready || fail "two operator pods are not Ready after the freeze"

# ---- 3. The disruption budget --------------------------------------------------------------------
PDB="$RELEASE-dbpool-operator"
# evict POD: the Eviction API's HTTP status (as kubectl drain sees it), the answer in $S/evict.out.
evict() {
  nsx curl -s -o "$S/evict.out" -w '%{http_code}' --max-time 20 --cacert "$S/pki/ca.crt" \
    --cert "$S/pki/admin.crt" --key "$S/pki/admin.key" -H 'Content-Type: application/json' \
    -X POST "$API/api/v1/namespaces/$NS/pods/$1/eviction" \
    -d "{\"apiVersion\":\"policy/v1\",\"kind\":\"Eviction\",\"metadata\":{\"name\":\"$1\",\"namespace\":\"$NS\"}}" || true
}
pdb_allows_one() { [[ "$(k -n "$NS" get pdb "$PDB" -o jsonpath='{.status.disruptionsAllowed}')" == 1 ]]; }
if ! k -n "$NS" get pdb "$PDB" >/dev/null 2>&1; then
  fail "the chart installed no PodDisruptionBudget $PDB"
elif wait_for "the PDB allowing one disruption" 60 pdb_allows_one; then
  read -r first second <<<"$(operator_pods | tr '\n' ' ')"
  k cordon dbpool-node >&2
  code1="$(evict "$first")"
  code2="$(evict "$second")"
  msg2="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("message", ""))' "$S/evict.out" 2>/dev/null || true)"
  unready="$(k -n "$NS" get pods -l app.kubernetes.io/instance="$RELEASE" -o jsonpath='{range .items[*]}{.metadata.name}={.status.phase}{"\n"}{end}' | grep -v "^$second=" | tr '\n' ' ')"
  if [[ "$code1" == 201 || "$code1" == 200 ]] && [[ "$code2" == 429 ]]; then
    ok "node cordoned: eviction of $first allowed ($code1), of $second refused ($code2: $msg2) while its replacement waits ($unready)"
  else
    fail "evictions: $first $code1, $second $code2 ($(head -c 300 "$S/evict.out")); pods $unready"
  fi
  k uncordon dbpool-node >&2
  wait_for "two operator pods Ready after the uncordon" "$TIMEOUT" two_ready || fail "two operator pods are not Ready after the uncordon"
else
  fail "the PDB never allowed a disruption: $(k -n "$NS" get pdb "$PDB" -o jsonpath='{.status}')"
fi

# ---- No other liveness kill ----------------------------------------------------------------------
# The freeze above causes one liveness kill; any other means a healthy operator's probes failed
# (how the bridge's changing MAC showed itself before hack/cluster.sh fixed it).
all_kills="$(k -n "$NS" get events --field-selector reason=Killing \
  -o jsonpath='{range .items[*]}{.count}{" "}{.involvedObject.name}{" "}{.message}{"\n"}{end}' | grep liveness || true)"
total_kills="$(awk '{ n += ($1 ~ /^[0-9]+$/ ? $1 : 1) } END { print n + 0 }' <<<"$all_kills")"
if [[ "$total_kills" == 1 ]]; then
  ok "one liveness kill in the run, the frozen leader's: $(awk '{print $2}' <<<"$all_kills")"
else
  fail "liveness kills: $total_kills (expected the frozen leader's alone): $(tr '\n' ';' <<<"$all_kills")"
fi

kill "$PROM_PID" 2>/dev/null || true
wait "$PROM_PID" 2>/dev/null || true
PROM_PID=""
