#!/usr/bin/env bash
# A real, throw-away control plane for development and tests, the way controller-runtime's envtest
# runs one: etcd and kube-apiserver (no kubelet, no controller-manager, no Docker), plus one
# PostgreSQL 15 server. Everything lives under .local/ (git-ignored).
#
#   hack/env.sh up       # start (idempotent); prints only `export ...` lines on stdout
#   hack/env.sh down     # stop everything and delete the data (idempotent); keeps the logs
#   hack/env.sh status   # report each component; exit 1 unless all are up
#   hack/env.sh print    # print the export lines of a running environment
#
# For the demo (hack/demo.sh), on a running environment:
#   hack/env.sh pg-stop                # stop PostgreSQL (fast shutdown); data and port are kept
#   hack/env.sh pg-start               # start it again on the same port (idempotent)
#   hack/env.sh operator-start [BIN]   # (re)start `BIN run` (default target/debug/dbpool-operator)
#                                      # against this environment; prints its metrics URL
#   hack/env.sh operator-stop          # stop it (`down` stops it too)
#
#   eval "$(hack/env.sh up)"       # or: eval "$(make -s env-up)"
#
# The export lines are also written to .local/env.sh. Progress and errors go to stderr, logs to
# .local/logs/. DBPOOL_ENV_DIR moves the state directory (`make test` uses its own, so it never
# touches an environment a person started). Each process runs in its own session and process
# group (setsid); `down` signals the groups and waits for them to be gone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${DBPOOL_ENV_DIR:-$ROOT/.local}"
PKI="$STATE/pki"
RUN="$STATE/run"
LOGS="$STATE/logs"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
READY_TIMEOUT="${DBPOOL_ENV_READY_TIMEOUT:-120}"
STOP_TIMEOUT=30
ATTEMPTS=5

log() { printf '[env] %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
now() { date +%s; }
# timed WHAT COMMAND...: runs COMMAND and logs how long it took.
timed() {
  local what="$1" start
  shift
  start=$(date +%s%N)
  "$@"
  log "$what ready in $((($(date +%s%N) - start) / 1000000))ms"
}

# ---------------------------------------------------------------------------------------------
# Ports and processes

# A TCP port on 127.0.0.1 that nothing listens on right now (and that this run has not handed out
# yet), from 20000-31999: the one port policy, whose home is crates/dbpool-testkit/src/ports.rs
# (below the kernel's ephemeral range 32768-60999). A process may still take it before we bind:
# the callers retry with new ports on a collision.
declare -a TAKEN_PORTS=()
free_port() {
  local port i
  for ((i = 0; i < 200; i++)); do
    port=$((20000 + (RANDOM * 32768 + RANDOM) % 12000))
    [[ " ${TAKEN_PORTS[*]-} " == *" $port "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      TAKEN_PORTS+=("$port")
      echo "$port"
      return 0
    fi
  done
  die "no free TCP port found on 127.0.0.1"
}

# start NAME COMMAND...: runs COMMAND in a new session and process group (setsid execs it, so its
# pid is the group id), stdin from /dev/null, output appended to logs/NAME.log, the lock fd closed.
start() {
  local name="$1"
  shift
  printf '\n===== %s: %s\n' "$(date -u +%FT%TZ)" "$*" >>"$LOGS/$name.log"
  stat -c %s "$LOGS/$name.log" >"$RUN/$name.logstart"
  setsid "$@" </dev/null >>"$LOGS/$name.log" 2>&1 9>&- &
  echo $! >"$RUN/$name.pid"
  ps -o lstart= -p $! >"$RUN/$name.started" || true
}

pid_of() { [[ -s "$RUN/$1.pid" ]] && cat "$RUN/$1.pid"; }

# group_alive PGID: the process group has a member that is not a zombie (an exited process can
# stay a zombie for a while when the parent it was handed to reaps lazily).
group_alive() { ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'; }

# ours NAME: the leader NAME started is gone (its group may live on) or is still the process we
# started (same start time); guards against a stale pid file whose pid went to another program.
ours() {
  local pid stat
  pid="$(pid_of "$1")" || return 0
  stat="$(ps -o stat= -p "$pid")" || return 0
  [[ "$stat" == Z* ]] && return 0
  [[ "$(ps -o lstart= -p "$pid")" == "$(cat "$RUN/$1.started" 2>/dev/null)" ]]
}

# alive NAME: the process group of NAME still has a live member.
alive() {
  local pid
  pid="$(pid_of "$1")" || return 1
  ours "$1" && group_alive "$pid"
}

# leader_alive NAME: the process NAME started (the group leader) still runs.
leader_alive() {
  local pid stat
  pid="$(pid_of "$1")" || return 1
  stat="$(ps -o stat= -p "$pid")" || return 1
  [[ "$stat" != Z* ]]
}

# stop NAME [SIGNAL] [leader]: signals the group (or only its leader), waits up to STOP_TIMEOUT for
# the whole group to exit, then kills what is left.
stop() {
  local name="$1" sig="${2:-TERM}" target pid deadline
  pid="$(pid_of "$name")" || return 0
  target="-$pid"
  [[ "${3:-}" == leader ]] && target="$pid"
  if ! ours "$name"; then
    log "$name: pid $pid now belongs to another program; not stopping it"
  elif group_alive "$pid"; then
    log "stopping $name (process group $pid)"
    kill "-$sig" -- "$target" 2>/dev/null || true
    deadline=$(($(now) + STOP_TIMEOUT))
    while group_alive "$pid"; do
      if (($(now) > deadline)); then
        log "$name did not exit within ${STOP_TIMEOUT}s: killing its process group"
        kill -KILL -- "-$pid" 2>/dev/null || true
        deadline=$(($(now) + STOP_TIMEOUT))
        while group_alive "$pid" && (($(now) <= deadline)); do sleep 0.1; done
        break
      fi
      sleep 0.1
    done
  fi
  rm -f "$RUN/$name.pid" "$RUN/$name.started"
}

# new_log NAME: what NAME logged since its last start.
new_log() { tail -c "+$(($(cat "$RUN/$1.logstart" 2>/dev/null || echo 0) + 1))" "$LOGS/$1.log" 2>/dev/null; }

log_tail() {
  log "last lines of $LOGS/$1.log:"
  new_log "$1" | tail -n "${2:-40}" >&2 || true
}

# wait_ready NAME WHAT CHECK...: polls CHECK until it succeeds. Returns 1 when the process died
# (the caller decides whether to retry), exits when the deadline passes.
wait_ready() {
  local name="$1" what="$2" deadline
  shift 2
  deadline=$(($(now) + READY_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    if ! leader_alive "$name"; then
      return 1
    fi
    if (($(now) > deadline)); then
      log_tail "$name"
      stop "$name"
      die "$what was not ready within ${READY_TIMEOUT}s"
    fi
    sleep 0.1
  done
}

port_collision() { new_log "$1" | grep -qi 'address already in use'; }

# ---------------------------------------------------------------------------------------------
# Certificates

gen_pki() {
  [[ -s "$PKI/admin.key" && -s "$PKI/sa.pub" ]] && return 0
  log "generating CA, serving, admin client and service-account keys"
  rm -rf "$PKI"
  mkdir -p "$PKI"
  chmod 700 "$PKI"
  (
    cd "$PKI"
    ec_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
    ec_key ca.key
    openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=dbpool-operator-env-ca" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
      -addext "subjectKeyIdentifier=hash" -out ca.crt 2>/dev/null
    sign() { # sign NAME SUBJECT EXTFILE-CONTENT
      ec_key "$1.key"
      openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
      printf '%s\n' "$3" >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 3650 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    sign apiserver "/CN=kube-apiserver" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost"
    sign admin "/O=system:masters/CN=admin" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
    openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
    chmod 600 ./*.key
  ) || die "openssl failed to generate the certificates"
}

b64() { base64 -w0 <"$1"; }

write_kubeconfig() {
  local port="$1"
  cat >"$STATE/kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: dbpool-env
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(b64 "$PKI/admin.crt")
    client-key-data: $(b64 "$PKI/admin.key")
contexts:
- name: dbpool-env
  context:
    cluster: dbpool-env
    user: admin
    namespace: default
current-context: dbpool-env
EOF
  chmod 600 "$STATE/kubeconfig.tmp"
  mv "$STATE/kubeconfig.tmp" "$STATE/kubeconfig"
}

# ---------------------------------------------------------------------------------------------
# etcd and kube-apiserver

etcd_healthy() { curl -sf --max-time 2 "http://127.0.0.1:$(cat "$RUN/etcd.port")/health" | grep -q '"health":"true"'; }

start_etcd() {
  local attempt client peer
  for ((attempt = 1; attempt <= ATTEMPTS; attempt++)); do
    client="$(free_port)"
    peer="$(free_port)"
    rm -rf "$STATE/etcd"
    mkdir -p "$STATE/etcd"
    chmod 700 "$STATE/etcd"
    echo "$client" >"$RUN/etcd.port"
    start etcd "$BIN_DIR/etcd" --name=dbpool-env --data-dir="$STATE/etcd" --unsafe-no-fsync \
      --listen-client-urls="http://127.0.0.1:$client" --advertise-client-urls="http://127.0.0.1:$client" \
      --listen-peer-urls="http://127.0.0.1:$peer" --initial-advertise-peer-urls="http://127.0.0.1:$peer" \
      --initial-cluster="dbpool-env=http://127.0.0.1:$peer" --log-level=warn
    if wait_ready etcd "etcd" etcd_healthy; then
      return 0
    fi
    stop etcd
    if port_collision etcd; then
      log "etcd: port collision on $client/$peer, retrying with other ports"
      continue
    fi
    log_tail etcd
    die "etcd exited during startup"
  done
  die "etcd: no free ports after $ATTEMPTS attempts"
}

apiserver_ready() {
  curl -sf --max-time 2 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://127.0.0.1:$(cat "$RUN/apiserver.port")/readyz" | grep -q '^ok$'
}

start_apiserver() {
  local attempt port
  for ((attempt = 1; attempt <= ATTEMPTS; attempt++)); do
    port="$(free_port)"
    echo "$port" >"$RUN/apiserver.port"
    mkdir -p "$STATE/apiserver-certs"
    start apiserver "$BIN_DIR/kube-apiserver" \
      --etcd-servers="http://127.0.0.1:$(cat "$RUN/etcd.port")" \
      --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$port" \
      --cert-dir="$STATE/apiserver-certs" \
      --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
      --client-ca-file="$PKI/ca.crt" \
      --authorization-mode=RBAC \
      --service-account-key-file="$PKI/sa.pub" \
      --service-account-signing-key-file="$PKI/sa.key" \
      --service-account-issuer="https://127.0.0.1:$port/" \
      --disable-admission-plugins=ServiceAccount \
      --service-cluster-ip-range=10.0.0.0/24 \
      --allow-privileged=true
    if wait_ready apiserver "kube-apiserver" apiserver_ready; then
      write_kubeconfig "$port"
      return 0
    fi
    stop apiserver
    if port_collision apiserver; then
      log "kube-apiserver: port $port collided, retrying with another"
      continue
    fi
    log_tail apiserver
    die "kube-apiserver exited during startup"
  done
  die "kube-apiserver: no free port after $ATTEMPTS attempts"
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL

# as_pg COMMAND...: runs COMMAND as the postgres system user when we are root (postgres refuses to
# run as root). setpriv execs, so a process started this way keeps its pid.
AS_PG=()
((EUID == 0)) && AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --reset-env --)
as_pg() { "${AS_PG[@]}" "$@"; }

pg_dir() { echo "$STATE/pg"; }

prepare_pg_dir() {
  local dir
  dir="$(pg_dir)"
  rm -rf "$dir"
  mkdir -p "$dir"
  if ((EUID == 0)); then
    chown postgres:postgres "$dir"
    # The postgres user must be able to reach the directory; a checkout under a private home
    # directory is not. Then the data goes to a private temporary directory, linked from .local/pg.
    if ! as_pg test -w "$dir"; then
      local tmp
      tmp="$(mktemp -d /tmp/dbpool-env-pg.XXXXXX)"
      chown postgres:postgres "$tmp"
      rmdir "$dir"
      ln -s "$tmp" "$dir"
      log "postgres cannot reach $STATE; its data lives in $tmp (linked from $dir)"
    fi
  fi
  chmod 700 "$dir/"
}

# launch_postgres DATA PORT: starts the postmaster on DATA, listening on 127.0.0.1:PORT only.
launch_postgres() {
  start postgres "${AS_PG[@]}" "$PG_BIN/postgres" -D "$1" -c listen_addresses=127.0.0.1 -c port="$2" \
    -c unix_socket_directories= -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
    -c logging_collector=off -c password_encryption=scram-sha-256
}

pg_ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$(cat "$RUN/postgres.port")" -t 2; }

start_postgres() {
  local dir data attempt port super_pw app_pw
  prepare_pg_dir
  dir="$(readlink -f "$(pg_dir)")" # the postgres user may not be able to follow the link's path
  data="$dir/data"
  super_pw="$(openssl rand -hex 16)"
  app_pw="$(openssl rand -hex 16)"
  printf '%s\n' "$super_pw" >"$dir/superuser.pw"
  ((EUID == 0)) && chown postgres:postgres "$dir/superuser.pw"
  chmod 600 "$dir/superuser.pw"
  log "initdb (PostgreSQL 15) in $data"
  if ! as_pg "$PG_BIN/initdb" -D "$data" -U postgres --pwfile="$dir/superuser.pw" \
    --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 --no-locale --no-sync \
    >>"$LOGS/postgres.log" 2>&1; then
    log_tail postgres
    die "initdb failed"
  fi
  rm -f "$dir/superuser.pw"
  for ((attempt = 1; attempt <= ATTEMPTS; attempt++)); do
    port="$(free_port)"
    echo "$port" >"$RUN/postgres.port"
    launch_postgres "$data" "$port"
    if wait_ready postgres "PostgreSQL" pg_ready; then
      break
    fi
    stop postgres
    if port_collision postgres; then
      log "PostgreSQL: port $port collided, retrying with another"
      continue
    fi
    log_tail postgres
    die "PostgreSQL exited during startup"
  done
  ((attempt <= ATTEMPTS)) || die "PostgreSQL: no free port after $ATTEMPTS attempts"
  if ! PGPASSWORD="$super_pw" "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" \
    -U postgres -d postgres \
    -c "CREATE ROLE app LOGIN PASSWORD '$app_pw'" \
    -c "CREATE DATABASE app OWNER app" >>"$LOGS/postgres.log" 2>&1; then
    log_tail postgres
    die "could not create role and database app"
  fi
  echo "$app_pw" >"$RUN/postgres.app-password"
  chmod 600 "$RUN/postgres.app-password"
}

# ---------------------------------------------------------------------------------------------
# Commands

env_lines() {
  printf 'export KUBECONFIG=%q\n' "$STATE/kubeconfig"
  # shellcheck disable=SC2016 # $PATH is for the shell that evaluates the line
  printf 'export PATH=%q:"$PATH"\n' "$BIN_DIR"
  printf 'export PGHOST=127.0.0.1 PGPORT=%s PGUSER=app PGPASSWORD=%s PGDATABASE=app\n' \
    "$(cat "$RUN/postgres.port")" "$(cat "$RUN/postgres.app-password")"
}

all_up() {
  [[ -s "$STATE/env.sh" && -s "$STATE/kubeconfig" ]] || return 1
  alive etcd && alive apiserver && alive postgres || return 1
  etcd_healthy >/dev/null 2>&1 && apiserver_ready >/dev/null 2>&1 && pg_ready >/dev/null 2>&1
}

do_down() {
  # An operator the demo started first (it talks to the API server), then the API server (it
  # talks to etcd), PostgreSQL with a fast shutdown (SIGINT to the postmaster only: it stops its
  # own children).
  stop operator TERM
  stop apiserver TERM
  stop etcd TERM
  stop postgres INT leader
  local pgdata
  pgdata="$(pg_dir)"
  if [[ -L "$pgdata" ]]; then
    rm -rf "$(readlink "$pgdata")"
  fi
  rm -rf "$STATE/etcd" "$pgdata" "$STATE/apiserver-certs" "$STATE/kubeconfig" "$STATE/env.sh" \
    "$RUN"
}

cmd_up() {
  if all_up; then
    log "already up (state in $STATE)"
    cat "$STATE/env.sh"
    return 0
  fi
  if [[ -d "$RUN" ]]; then
    log "found a partial environment in $STATE: stopping it first"
    do_down
  fi
  for tool in openssl curl setsid; do
    command -v "$tool" >/dev/null || die "$tool not found: run hack/install-deps.sh"
  done
  [[ -x "$PG_BIN/initdb" ]] || die "PostgreSQL 15 not found in $PG_BIN: run hack/install-deps.sh"
  mkdir -p "$RUN" "$LOGS"
  local t0 t1 pg_job
  t0=$(now)
  timed "certificates" gen_pki
  # PostgreSQL starts alongside etcd and kube-apiserver (the ports it takes are probed as free;
  # a collision with the others would be retried like any other).
  timed "PostgreSQL" start_postgres &
  pg_job=$!
  timed "etcd" start_etcd
  timed "kube-apiserver" start_apiserver
  wait "$pg_job" || die "PostgreSQL did not start"
  t1=$(now)
  env_lines >"$STATE/env.sh.tmp"
  mv "$STATE/env.sh.tmp" "$STATE/env.sh"
  log "up in $((t1 - t0))s: kube-apiserver https://127.0.0.1:$(cat "$RUN/apiserver.port"), etcd :$(cat "$RUN/etcd.port"), PostgreSQL :$(cat "$RUN/postgres.port")"
  if [[ -n "${DBPOOL_ENV_DIR:-}" ]]; then
    log "logs in $LOGS; stop with 'DBPOOL_ENV_DIR=$STATE hack/env.sh down'"
  else
    log "logs in $LOGS; stop with 'make env-down'"
  fi
  cat "$STATE/env.sh"
}

cmd_status() {
  local rc=0 name
  for name in etcd apiserver postgres; do
    if alive "$name"; then
      log "$name: running (pid $(pid_of "$name"), port $(cat "$RUN/$name.port" 2>/dev/null || echo '?'))"
    else
      log "$name: not running"
      rc=1
    fi
  done
  if ((rc == 0)) && all_up; then
    log "healthy; export lines in $STATE/env.sh"
  else
    rc=1
  fi
  return "$rc"
}

# ---------------------------------------------------------------------------------------------
# Demo helpers: stop and start PostgreSQL on its port, run the operator binary in the background.

cmd_pg_stop() {
  [[ -s "$RUN/postgres.port" ]] || die "the environment is not up: run 'make env-up'"
  if ! alive postgres; then
    log "PostgreSQL is already stopped"
    return 0
  fi
  stop postgres INT leader
  log "PostgreSQL stopped; port $(cat "$RUN/postgres.port") refuses connections until 'pg-start'"
}

cmd_pg_start() {
  local port data
  [[ -s "$RUN/postgres.port" && -d "$(pg_dir)/data" ]] || die "the environment is not up: run 'make env-up'"
  port="$(cat "$RUN/postgres.port")"
  if ! alive postgres; then
    data="$(readlink -f "$(pg_dir)")/data"
    launch_postgres "$data" "$port"
  fi
  if ! wait_ready postgres "PostgreSQL" pg_ready; then
    log_tail postgres
    die "PostgreSQL did not start again on port $port"
  fi
  log "PostgreSQL accepts connections on port $port"
}

operator_ready() { curl -sf --max-time 2 "http://127.0.0.1:$(cat "$RUN/operator.port")/readyz" >/dev/null; }

cmd_operator_start() {
  local bin="${1:-$ROOT/target/debug/dbpool-operator}" attempt port
  if [[ ! -s "$STATE/kubeconfig" ]] || ! alive apiserver; then
    die "the environment is not up: run 'make env-up'"
  fi
  [[ -x "$bin" ]] || die "$bin not found: run 'cargo build'"
  stop operator TERM
  for ((attempt = 1; attempt <= ATTEMPTS; attempt++)); do
    port="$(free_port)"
    echo "$port" >"$RUN/operator.port"
    start operator env NO_COLOR=1 "$bin" run --kubeconfig "$STATE/kubeconfig" \
      --metrics-addr "127.0.0.1:$port"
    if wait_ready operator "dbpool-operator" operator_ready; then
      log "dbpool-operator ready (pid $(pid_of operator)); log $LOGS/operator.log"
      echo "http://127.0.0.1:$port"
      return 0
    fi
    stop operator
    if port_collision operator; then
      log "dbpool-operator: port $port collided, retrying with another"
      continue
    fi
    log_tail operator
    die "dbpool-operator exited during startup"
  done
  die "dbpool-operator: no free port after $ATTEMPTS attempts"
}

main() {
  local cmd="${1:-}"
  case "$cmd" in
    up | down | status | print | pg-stop | pg-start | operator-start | operator-stop) ;;
    *)
      echo "usage: $0 up|down|status|print|pg-stop|pg-start|operator-start [BIN]|operator-stop" >&2
      exit 2
      ;;
  esac
  mkdir -p "$STATE"
  # One command at a time per state directory. The daemons do not inherit the lock (fd 9).
  exec 9>"$STATE/.lock"
  flock 9
  case "$cmd" in
    up)
      BIN_DIR="$("$ROOT/hack/build-controlplane.sh")"
      cmd_up
      ;;
    down)
      do_down
      log "down"
      ;;
    status) cmd_status ;;
    print)
      all_up || die "the environment is not up: run 'make env-up'"
      cat "$STATE/env.sh"
      ;;
    pg-stop) cmd_pg_stop ;;
    pg-start) cmd_pg_start ;;
    operator-start) cmd_operator_start "${2:-}" ;;
    operator-stop) stop operator TERM ;;
  esac
}

main "$@"
