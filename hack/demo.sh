#!/usr/bin/env bash
# `make demo`: a guided tour of dbpool-operator on this machine, for a newcomer.
#
# Builds the operator, starts the local control plane and PostgreSQL (hack/env.sh up; the first
# run builds kube-apiserver, kubectl and etcd from the Go module proxy, about 7.5 minutes on 2
# cores), installs the CRD, runs the operator binary in the background and creates a DbPool for
# the local PostgreSQL (examples/demo/dbpool.yaml.tmpl). Then the story: the database goes down,
# failures climb, the breaker opens; the database returns, the breaker half-opens and closes; a
# second outage is cut short with the force-reopen annotation. Every kubectl command is printed
# (`$ ...`) so it can be repeated, every wait has a deadline, and the environment and the operator
# stay up at the end (`make env-down` stops them). Running it again starts the story afresh.
#
#   make demo                                   # or: hack/demo.sh
#   DEMO_FAST=1 hack/demo.sh                    # shorter timings (CI, tests/demo.rs)
#   DBPOOL_ENV_DIR=/tmp/env hack/demo.sh        # another state directory than .local/
#   DEMO_OPERATOR_BIN=path hack/demo.sh         # use this binary, skip `cargo build`
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CARGO="${CARGO:-cargo}"
STATE="${DBPOOL_ENV_DIR:-$ROOT/.local}"
LOGS="$STATE/logs"
POOL=demo
SECRET=demo-db
TEMPLATE=examples/demo/dbpool.yaml.tmpl
BIN="${DEMO_OPERATOR_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/dbpool-operator}"

if [[ "${DEMO_FAST:-0}" == 1 ]]; then
  INTERVAL=2s TIMEOUT=1s INITIAL_DELAY=200ms MAX_DELAY=1s OPEN_TIMEOUT_S=4
else
  INTERVAL=5s TIMEOUT=2s INITIAL_DELAY=500ms MAX_DELAY=5s OPEN_TIMEOUT_S=10
fi
OPEN_TIMEOUT="${OPEN_TIMEOUT_S}s"
# Deadlines (seconds) of the waits; generous, since a slow machine must not fail the demo.
READY_DEADLINE=60
OPEN_DEADLINE=60
CLOSE_DEADLINE=$((3 * OPEN_TIMEOUT_S + 30))

# How the reader runs hack/env.sh: with the state directory when it is not the default.
ENVSH="hack/env.sh"
[[ -n "${DBPOOL_ENV_DIR:-}" ]] && ENVSH="DBPOOL_ENV_DIR=$(printf '%q' "$STATE") hack/env.sh"

# ---------------------------------------------------------------------------------------------
# Output

if [[ -t 1 ]]; then
  BOLD=$'\e[1m' CYAN=$'\e[36m' RED=$'\e[31m' RESET=$'\e[0m'
else
  BOLD='' CYAN='' RED='' RESET=''
fi
STEPS=9
STEP=0
STEP_TITLE="starting"

step() {
  STEP=$((STEP + 1))
  STEP_TITLE="$*"
  printf '\n%s==> [%d/%d] %s%s\n' "$BOLD" "$STEP" "$STEPS" "$*" "$RESET"
}
say() { printf '    %s\n' "$*"; }
show() { printf '%s$ %s%s\n' "$CYAN" "$1" "$RESET"; }
# run COMMAND: shows COMMAND and runs it (through eval, so it is exactly what a reader types).
run() {
  show "$1"
  eval "$1"
}
die() {
  printf '\n%s[demo] FAILED at step %d (%s): %s%s\n' "$RED" "$STEP" "$STEP_TITLE" "$*" "$RESET" >&2
  exit 1
}
# must WHAT COMMAND: runs COMMAND like `run`; if it fails, the demo stops saying WHAT went wrong.
must() {
  show "$2"
  eval "$2" || die "$1"
}
elapsed() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
rel() { [[ "$1" == "$ROOT/"* ]] && echo "${1#"$ROOT/"}" || echo "$1"; }

# ---------------------------------------------------------------------------------------------
# Cleanup: background helpers end with the script; on failure PostgreSQL is started again, so the
# environment is whole for the next try.

BG_PIDS=()
PG_STOPPED=0
OPERATOR_STARTED=0
on_exit() {
  local rc=$? pid
  for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  if ((rc != 0)); then
    if ((PG_STOPPED)); then
      hack/env.sh pg-start >/dev/null 2>&1 || true
    fi
    if ((OPERATOR_STARTED)) && [[ -s "$LOGS/operator.log" ]]; then
      printf '\n[demo] last lines of %s:\n' "$LOGS/operator.log" >&2
      tail -n 15 "$LOGS/operator.log" >&2 || true
    fi
    printf '\n[demo] logs: %s (operator, apiserver, etcd, postgres). Run the demo again with %s;\n' \
      "$LOGS" "'make demo'" >&2
    printf '[demo] stop the environment with %s.\n' \
      "$([[ -n "${DBPOOL_ENV_DIR:-}" ]] && echo "'$ENVSH down'" || echo "'make env-down'")" >&2
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# watch_pool SECONDS PHASE BREAKER [COMMAND]: shows `kubectl get dbpool demo --watch` (a row per
# change) until a row shows PHASE and BREAKER (the columns are NAME PHASE BREAKER FAILURES LATENCY
# LAST-PROBE AGE), and stops the demo if none does within SECONDS. COMMAND, if given, runs (shown)
# once the watch has listed the current state, so the watch sees every change COMMAND causes, as
# it would in a second terminal. The rows shown are in SEEN.
SEEN=""
watch_pool() {
  local secs="$1" phase="$2" breaker="$3" command="${4:-}" line last="" fd pid n=0 matched=0
  show "kubectl get dbpool $POOL --watch      # until PHASE is $phase and BREAKER $breaker (at most ${secs}s)"
  SEEN=""
  exec {fd}< <(exec timeout "$secs" kubectl get dbpool "$POOL" --watch 2>&1)
  pid=$!
  while IFS= read -r -u "$fd" line; do
    n=$((n + 1))
    # A label update repeats the row: show each state once.
    if [[ "$line" != "$last" ]]; then
      last="$line"
      printf '%s\n' "$line"
      SEEN+="$line"$'\n'
      if awk -v p="$phase" -v b="$breaker" '$2 == p && $3 == b { f = 1 } END { exit !f }' <<<"$line"; then
        matched=1
        break
      fi
    fi
    # Header and current row listed: the watch is established.
    if ((n == 2)) && [[ -n "$command" ]]; then
      run "$command"
    fi
  done
  kill "$pid" 2>/dev/null || true
  exec {fd}<&-
  ((matched)) || die "PHASE $phase and BREAKER $breaker not reached within ${secs}s"
}

# field JSONPATH: one field of the demo pool.
field() { kubectl get dbpool "$POOL" -o "jsonpath=$1"; }

# ---------------------------------------------------------------------------------------------

printf '%sdbpool-operator demo%s: a DbPool for a local PostgreSQL, an outage, the circuit breaker,\n' "$BOLD" "$RESET"
printf 'its recovery and a force reopen. State directory: %s%s\n' "$(rel "$STATE")" \
  "$([[ "${DEMO_FAST:-0}" == 1 ]] && echo ' (DEMO_FAST=1: short timings)')"

step "Build the operator"
if [[ -n "${DEMO_OPERATOR_BIN:-}" ]]; then
  say "DEMO_OPERATOR_BIN is set: using $(rel "$BIN") as it is"
else
  command -v "$CARGO" >/dev/null || die "cargo not found: install Rust (https://rustup.rs), then run 'make demo' again"
  [[ -x "$BIN" ]] || say "First build: compiling the operator and its dependencies takes about 2.5 minutes on 2 cores."
  must "cargo build failed" "$CARGO build"
fi
[[ -x "$BIN" ]] || die "$(rel "$BIN") does not exist"

step "Start the local control plane (etcd + kube-apiserver) and PostgreSQL 15"
mkdir -p "$LOGS"
build_log="$LOGS/controlplane-build.log"
hack/build-controlplane.sh >/dev/null 2>"$build_log" &
build_pid=$!
BG_PIDS+=("$build_pid")
# A cached build answers at once; anything slower is the first run.
for _ in 1 2 3 4 5 6 7 8 9 10; do
  kill -0 "$build_pid" 2>/dev/null || break
  sleep 0.2
done
if kill -0 "$build_pid" 2>/dev/null; then
  say "First run: building kube-apiserver, kubectl and etcd from the Go module proxy."
  say "This takes about 7.5 minutes on 2 cores (module download + compile) and happens once: the"
  say "binaries are cached (in ~/.cache/dbpool-operator, or \$DBPOOL_CACHE_DIR). Log: $(rel "$build_log")"
  tail -n +1 --pid="$build_pid" -f "$build_log" 2>/dev/null | grep --line-buffered '^\[controlplane\]' | sed -u 's/^/    /' &
  BG_PIDS+=("$!")
  started=$SECONDS
  next=30
  while kill -0 "$build_pid" 2>/dev/null; do
    sleep 1
    kill -0 "$build_pid" 2>/dev/null || break
    if ((SECONDS - started >= next)); then
      modules="$(grep -c '^go: downloading' "$build_log" || true)"
      say "... still building: $(elapsed $((SECONDS - started))) so far$( ((modules > 0)) && echo ", $modules Go modules downloaded")"
      next=$((next + 30))
    fi
  done
fi
if ! wait "$build_pid"; then
  command -v go >/dev/null ||
    die "go not found: the control plane is built from the Go module proxy; install Go (https://go.dev/dl/)"
  tail -n 20 "$build_log" >&2 || true
  die "building the control plane failed; full log: $build_log"
fi
run "eval \"\$($ENVSH up)\"      # what eval \"\$(make -s env-up)\" does"
[[ -n "${KUBECONFIG:-}" ]] || die "hack/env.sh up did not print the environment"
say "kubectl $(command -v kubectl), KUBECONFIG=$KUBECONFIG, PostgreSQL on 127.0.0.1:$PGPORT"

step "Install the DbPool CustomResourceDefinition"
must "the CRD could not be applied" "kubectl apply -f crds/dbpool.yaml"
must "the CRD was not Established within 60s" \
  "kubectl wait --for=condition=Established crd/dbpools.dbpool.io --timeout=60s"

step "Start the operator in the background"
show "$ENVSH operator-start $(rel "$BIN")"
metrics_url="$(hack/env.sh operator-start "$BIN")" || die "the operator did not start"
OPERATOR_STARTED=1
metrics_port="${metrics_url##*:}"
say "runs: $(rel "$BIN") run --kubeconfig $KUBECONFIG --metrics-addr 127.0.0.1:$metrics_port"
say "log: $LOGS/operator.log; pid file: $STATE/run/operator.pid ('make env-down' stops it)"
say "metrics: $metrics_url/metrics (also /healthz and /readyz)"

step "Create the password Secret and a DbPool for the local PostgreSQL"
if kubectl get dbpool "$POOL" >/dev/null 2>&1; then
  say "An earlier run's pool is still there: delete it and its events, so the story starts afresh."
  run "kubectl delete dbpool $POOL"
  run "kubectl delete events --field-selector involvedObject.name=$POOL"
fi
# The Secret consents to being used (label) for this host only (annotation): without both, the
# operator neither reads it nor tells it apart from a missing one.
must "the Secret could not be created" \
  "kubectl create secret generic $SECRET --from-literal=password=\"\$PGPASSWORD\" --dry-run=client -o yaml | kubectl apply -f -"
must "the Secret could not be labelled" \
  "kubectl label secret $SECRET dbpool.io/credentials=true --overwrite"
must "the Secret could not be annotated" \
  "kubectl annotate secret $SECRET dbpool.io/allowed-hosts=127.0.0.1 --overwrite"
mkdir -p "$STATE/demo"
manifest="$STATE/demo/dbpool.yaml"
sed -e "s/\${PGPORT}/$PGPORT/" -e "s/\${INTERVAL}/$INTERVAL/" -e "s/\${TIMEOUT}/$TIMEOUT/" \
  -e "s/\${INITIAL_DELAY}/$INITIAL_DELAY/" -e "s/\${MAX_DELAY}/$MAX_DELAY/" \
  -e "s/\${OPEN_TIMEOUT}/$OPEN_TIMEOUT/" "$TEMPLATE" >"$manifest"
! grep -v '^#' "$manifest" | grep -q '[$][{]' || die "$TEMPLATE has a placeholder hack/demo.sh does not fill"
say "The DbPool ($(rel "$manifest"), rendered from $TEMPLATE):"
grep -v '^#' "$manifest" | sed 's/^/      /'
must "the DbPool could not be applied" "kubectl apply -f $(rel "$manifest")"
say "The operator probes the database (connect, authenticate, SELECT 1, role, free connection slots)"
say "and writes what it found into the status."
must "the pool did not become Ready within ${READY_DEADLINE}s (see status.lastProbe.message)" \
  "kubectl wait dbpool/$POOL --for=condition=Ready --timeout=${READY_DEADLINE}s"
run "kubectl get dbpools"
say "lastProbe.message: $(field '{.status.lastProbe.message}')"

step "The database goes down: failures climb and the circuit breaker opens"
say "Watch the pool while PostgreSQL stops. The operator's probe connection dies, which triggers a"
say "probe at once; it retries after $INITIAL_DELAY, twice as long each time, and opens the breaker after"
say "3 failures in a row."
PG_STOPPED=1
watch_pool "$OPEN_DEADLINE" BreakerOpen Open "$ENVSH pg-stop"
say "The breaker is Open. The pool's label follows the breaker, so label selectors find open breakers:"
must "the dbpool.io/breaker label did not become open within 10s" \
  "kubectl wait dbpool/$POOL --for=jsonpath='{.metadata.labels.dbpool\\.io/breaker}'=open --timeout=10s"
run "kubectl get dbpools -l dbpool.io/breaker=open"
run "kubectl get dbpool $POOL -o jsonpath='{.status.conditions[?(@.type==\"BreakerOpen\")].message}{\"\\n\"}'"
say "status.breaker: $(field '{.status.breaker}')"
say "Prometheus sees it too:"
run "curl -s $metrics_url/metrics | grep -E '^dbpool_(circuit_breaker_state|consecutive_failures)\\{'"

step "The database returns: the breaker half-opens and closes"
run "$ENVSH pg-start"
PG_STOPPED=0
say "The operator does not hammer an open breaker with logins: while it is open it only pings the"
say "database without a password (at most 4 times a second). The moment PostgreSQL accepts connections"
say "again, one trial login runs at once (breaker.earlyTrial) instead of waiting for openTimeout"
say "($OPEN_TIMEOUT after opening, status.breaker.nextProbeAt): HalfOpen; 2 successful trials close it."
watch_pool "$CLOSE_DEADLINE" Healthy Closed
if grep -q ' HalfOpen ' <<<"$SEEN"; then
  say "The breaker went Open -> HalfOpen -> Closed, and the pool is Ready again."
else
  say "The pool is Ready again (the HalfOpen moment passed between two rows; the events show it)."
fi
run "kubectl get events --field-selector involvedObject.name=$POOL --sort-by=.eventTime"

step "Don't wait for the trial probe: force a reopen"
say "Without early trials (breaker.earlyTrial: false, the pure timers) a returning database waits for"
say "openTimeout. Turn them off for this pool, so that a person has to ask for the probe."
must "the DbPool could not be patched" \
  "kubectl patch dbpool $POOL --type=merge -p '{\"spec\":{\"breaker\":{\"earlyTrial\":false}}}'"
say "A second outage opens the breaker again; this time the database is back at once and a person"
say "asks for a probe now with the dbpool.io/force-reopen annotation, instead of waiting openTimeout."
PG_STOPPED=1
watch_pool "$OPEN_DEADLINE" BreakerOpen Open "$ENVSH pg-stop"
run "$ENVSH pg-start"
PG_STOPPED=0
next_probe_at="$(field '{.status.breaker.nextProbeAt}')"
say "Left alone, the breaker would try again at status.breaker.nextProbeAt = $next_probe_at."
say "Any new value of the annotation asks for one reopen: Open -> HalfOpen and a probe at once."
token="demo-$(date +%s)"
watch_pool 30 Healthy Closed "kubectl annotate dbpool $POOL dbpool.io/force-reopen=$token --overwrite"
must "the operator did not record the force reopen in status.lastForceReopen" \
  "kubectl wait dbpool/$POOL --for=jsonpath='{.status.lastForceReopen.token}'=$token --timeout=10s"
closed_at="$(field '{.status.breaker.since}')"
early="$(($(date -d "$next_probe_at" +%s%3N) - $(date -d "$closed_at" +%s%3N)))"
if ((early > 0)); then
  say "The breaker closed at $closed_at, $((early / 1000)).$(printf '%03d' $((early % 1000)))s before its own trial was due."
fi
say "Each new annotation value is acted on once; status.lastForceReopen records the last one:"
run "kubectl get dbpool $POOL -o jsonpath='{.status.lastForceReopen}{\"\\n\"}'"
run "kubectl get events --field-selector involvedObject.name=$POOL,reason=ForceReopen"

step "The whole story, in the pool's status and events"
say "Status and conditions as they are now; events that repeat are counted (x2), not repeated."
run "kubectl describe dbpool $POOL | sed -n '/^Status:/,\$p'"

printf '\n%sDemo complete.%s The environment and the operator are still running. In your shell:\n\n' "$BOLD" "$RESET"
printf '    export KUBECONFIG=%q\n' "$KUBECONFIG"
# shellcheck disable=SC2016 # $PATH is for the reader's shell
printf '    export PATH=%q:"$PATH"\n' "$(dirname "$(command -v kubectl)")"
# shellcheck disable=SC2016 # a command for the reader to run
printf '\n  (or: eval "$(%s print)", which also sets PGHOST, PGPORT, PGUSER, PGPASSWORD for psql)\n' "$ENVSH"
printf '\n  then, for example:\n'
printf '    kubectl get dbpools -w                    # and, in another shell: %s pg-stop / pg-start\n' "$ENVSH"
printf '    kubectl describe dbpool %s\n' "$POOL"
printf '    curl -s %s/metrics | grep ^dbpool_\n' "$metrics_url"
printf '    less %s/operator.log\n' "$LOGS"
printf '\n  What the phases, conditions and alerts mean: docs/operations.md; how it works: docs/design.md.\n'
if [[ -n "${DBPOOL_ENV_DIR:-}" ]]; then
  printf '  Stop everything (operator, kube-apiserver, etcd, PostgreSQL): %s down\n' "$ENVSH"
else
  printf '  Stop everything (operator, kube-apiserver, etcd, PostgreSQL): make env-down\n'
fi
