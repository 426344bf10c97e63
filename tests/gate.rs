//! spec.gate against the real kube-apiserver, and with a real kube-proxy in iptables mode.
//!
//! EndpointSlices refuse loopback addresses, and a ClusterIP is a private-range address, so these
//! tests only run inside the network namespace that `hack/gate-netns.sh` creates (its own `lo`
//! with extra /32 addresses, its own etcd, apiserver and kube-proxy, deleted afterwards). Run
//! elsewhere (plain `cargo test`) they print why and pass without checking anything:
//!
//! ```sh
//! hack/gate-netns.sh        # what `make test` runs
//! ```
//!
//! The database is reached through a counting proxy listening on `DBPOOL_GATE_DB_ADDR` that counts
//! accepted connections by source address; the test client binds `DBPOOL_GATE_CLIENT_ADDR`, so
//! the operator's own probes (from another source address) are never counted as the client's.

use dbpool_operator::controller::{GateAllowlist, OperatorConfig, RunningOperator};
use dbpool_testkit as support;

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use dbpool_operator::api::{BreakerState, CONDITION_GATE, DbPool, DbPoolStatus, reason};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{Api, Client, api::PostParams};
use support::{
    kube::{TestNamespace, create_consenting_secret, install_crd},
    pools::{condition, create, pool, wait_status},
    postgres::{APP_DB, APP_PASSWORD, APP_USER, PgServer},
    wait::{wait_for, wait_until},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};

const SECRET: &str = "db-credentials";
const KEY: &str = "password";

/// The addresses `hack/gate-netns.sh` put on the namespace's `lo`; None outside it.
fn netns() -> Option<(IpAddr, IpAddr)> {
    let db = std::env::var("DBPOOL_GATE_DB_ADDR").ok()?.parse().ok()?;
    let client = std::env::var("DBPOOL_GATE_CLIENT_ADDR")
        .ok()?
        .parse()
        .ok()?;
    Some((db, client))
}

macro_rules! netns_or_skip {
    () => {
        match netns() {
            Some(addrs) => addrs,
            None => {
                eprintln!("skipped: runs only inside the network namespace of hack/gate-netns.sh");
                return;
            }
        }
    };
}

/// A TCP proxy in front of PostgreSQL that counts accepted connections by source address.
struct CountingProxy {
    addr: SocketAddr,
    counts: Arc<Mutex<HashMap<IpAddr, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    async fn start(listen: IpAddr, upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind((listen, 0))
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let counts: Arc<Mutex<HashMap<IpAddr, u64>>> = Arc::default();
        let seen = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, from)) = listener.accept().await {
                *seen.lock().expect("counts").entry(from.ip()).or_default() += 1;
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { addr, counts, task }
    }

    fn count_from(&self, ip: IpAddr) -> u64 {
        self.counts
            .lock()
            .expect("counts")
            .get(&ip)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Setup {
    client: Client,
    ns: TestNamespace,
    _operator: RunningOperator,
}

async fn setup(gates: impl FnOnce(&str) -> GateAllowlist) -> Setup {
    let client = support::kube::client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client).await;
    // The Secret consents to the database's address in the namespace (and loopback).
    let db_host = netns().map(|(db, _)| db.to_string());
    let mut hosts = vec!["127.0.0.1"];
    hosts.extend(db_host.as_deref());
    create_consenting_secret(&client, ns.name(), SECRET, KEY, APP_PASSWORD, &hosts).await;
    let operator = RunningOperator::start_with(
        client.clone(),
        OperatorConfig {
            namespace: Some(ns.name().to_owned()),
            instance: format!("test-{}", ns.name()),
            gates: gates(ns.name()),
            ..OperatorConfig::default()
        },
    );
    Setup {
        client,
        ns,
        _operator: operator,
    }
}

impl Setup {
    fn ns(&self) -> &str {
        self.ns.name()
    }
    async fn gated_pool(&self, name: &str, db: SocketAddr, service: &str, open_timeout: &str) {
        let pool: DbPool = pool(
            name,
            db.port(),
            Some((SECRET, KEY)),
            serde_json::json!({
                "database": { "host": db.ip().to_string() },
                "breaker": { "openTimeout": open_timeout },
                "gate": { "serviceName": service, "port": 5432 },
            }),
        );
        create(&self.client, self.ns(), &pool).await;
    }
    async fn wait(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&DbPoolStatus) -> bool,
    ) -> DbPoolStatus {
        wait_status(
            &self.client,
            self.ns(),
            name,
            what,
            Duration::from_secs(30),
            check,
        )
        .await
    }
    async fn slice(&self, name: &str) -> Option<EndpointSlice> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), self.ns());
        api.get_opt(name).await.ok().flatten()
    }
    /// Waits until the slice holds `addr` with readiness `ready`.
    async fn wait_slice(&self, name: &str, addr: SocketAddr, ready: bool) {
        wait_until(
            &format!("EndpointSlice {name}: {addr} ready={ready}"),
            Duration::from_secs(30),
            || async {
                self.slice(name).await.is_some_and(|s| {
                    s.endpoints.len() == 1
                        && s.endpoints[0].addresses == vec![addr.ip().to_string()]
                        && s.endpoints[0].conditions.as_ref().and_then(|c| c.ready) == Some(ready)
                        && s.ports
                            .as_ref()
                            .and_then(|p| p.first())
                            .and_then(|p| p.port)
                            == Some(i32::from(addr.port()))
                })
            },
        )
        .await;
    }
}

fn gate_reason(status: &DbPoolStatus) -> Option<String> {
    condition(status, CONDITION_GATE).map(|(_, reason, _)| reason)
}

fn breaker(status: &DbPoolStatus) -> Option<BreakerState> {
    status.breaker.as_ref().map(|b| b.state)
}

/// Endpoints are ready while the breaker is Closed and not ready while it is Open; the Service
/// is selector-less and owned by the DbPool.
#[tokio::test]
async fn endpoints_follow_the_breaker() {
    let (db_ip, _) = netns_or_skip!();
    let mut pg = PgServer::start().await;
    let proxy = CountingProxy::start(db_ip, pg.addr()).await;
    let s = setup(|_| GateAllowlist::Everywhere).await;
    s.gated_pool("orders", proxy.addr, "orders-gate", "1s")
        .await;

    s.wait_slice("orders-gate-dbpool", proxy.addr, true).await;
    let status = s
        .wait("orders", "Gate GateOpen", |st| {
            gate_reason(st).as_deref() == Some(reason::GATE_OPEN)
        })
        .await;
    assert_eq!(breaker(&status), Some(BreakerState::Closed));
    let services: Api<Service> = Api::namespaced(s.client.clone(), s.ns());
    let service = services.get("orders-gate").await.expect("the gate Service");
    let spec = service.spec.clone().unwrap_or_default();
    assert!(spec.selector.is_none(), "a selector-less Service");
    assert_eq!(
        service.metadata.owner_references.unwrap_or_default()[0].kind,
        "DbPool"
    );
    let slice = s.slice("orders-gate-dbpool").await.expect("the slice");
    let labels = slice.metadata.labels.unwrap_or_default();
    assert_eq!(labels["kubernetes.io/service-name"], "orders-gate");
    assert_eq!(
        labels["endpointslice.kubernetes.io/managed-by"],
        "dbpool.io"
    );

    pg.stop().await;
    s.wait("orders", "breaker not closed", |st| {
        breaker(st).is_some_and(|b| b != BreakerState::Closed)
    })
    .await;
    s.wait_slice("orders-gate-dbpool", proxy.addr, false).await;
    s.wait("orders", "Gate GateRejecting", |st| {
        gate_reason(st).as_deref() == Some(reason::GATE_REJECTING)
    })
    .await;

    pg.start().await;
    s.wait("orders", "breaker Closed", |st| {
        breaker(st) == Some(BreakerState::Closed)
    })
    .await;
    s.wait_slice("orders-gate-dbpool", proxy.addr, true).await;
    s.ns.cleanup().await;
}

/// A Service of the gate's name that is not ours is never touched; the DbPool says so.
#[tokio::test]
async fn a_foreign_service_is_left_alone() {
    let (db_ip, _) = netns_or_skip!();
    let pg = PgServer::start().await;
    let proxy = CountingProxy::start(db_ip, pg.addr()).await;
    let s = setup(|_| GateAllowlist::Everywhere).await;
    let services: Api<Service> = Api::namespaced(s.client.clone(), s.ns());
    let foreign: Service = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "taken" },
        "spec": { "ports": [{ "name": "web", "port": 80 }] }
    }))
    .expect("a Service");
    let before = services
        .create(&PostParams::default(), &foreign)
        .await
        .expect("create the foreign Service");
    s.gated_pool("orders", proxy.addr, "taken", "1s").await;
    let status = s
        .wait("orders", "Gate ServiceNotOwned", |st| {
            gate_reason(st).as_deref() == Some(reason::GATE_SERVICE_NOT_OWNED)
        })
        .await;
    let (gate_status, _, message) = condition(&status, CONDITION_GATE).unwrap_or_default();
    assert_eq!(gate_status, "False");
    println!("Gate condition: {message}");
    let after = services.get("taken").await.expect("still there");
    assert_eq!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );
    assert!(s.slice("taken-dbpool").await.is_none(), "no slice for it");
    s.ns.cleanup().await;
}

/// Without --allow-gates-in covering the namespace, no Service is made; the DbPool says so.
#[tokio::test]
async fn a_disallowed_namespace_gets_no_service() {
    let (db_ip, _) = netns_or_skip!();
    let pg = PgServer::start().await;
    let proxy = CountingProxy::start(db_ip, pg.addr()).await;
    let s = setup(|_| GateAllowlist::In(BTreeSet::from(["elsewhere".to_owned()]))).await;
    s.gated_pool("orders", proxy.addr, "orders-gate", "1s")
        .await;
    s.wait("orders", "Gate GatesNotAllowed", |st| {
        gate_reason(st).as_deref() == Some(reason::GATES_NOT_ALLOWED)
    })
    .await;
    // Healthy and probed, and still nothing was written.
    s.wait("orders", "probed", |st| st.last_probe.is_some())
        .await;
    let services: Api<Service> = Api::namespaced(s.client.clone(), s.ns());
    assert!(
        services
            .get_opt("orders-gate")
            .await
            .ok()
            .flatten()
            .is_none()
    );
    assert!(s.slice("orders-gate-dbpool").await.is_none());
    s.ns.cleanup().await;
}

/// One client of the recovery herd.
#[derive(Default)]
struct HerdClient {
    refused: u32,
    timed_out: u32,
    other: u32,
    /// How long the successful login took.
    login: Option<Duration>,
    /// When it succeeded, counted from the breaker closing (None: before the test saw it close).
    after_close: Option<Duration>,
}

/// One login through `gate` (connect, SCRAM, `SELECT 1`) with a 2 s connect timeout; the client
/// stays open until dropped.
async fn login(gate: SocketAddr) -> Result<tokio_postgres::Client, String> {
    let config = format!(
        "host={} port={} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB} sslmode=disable connect_timeout=2",
        gate.ip(),
        gate.port()
    );
    let (client, connection) = tokio_postgres::connect(&config, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("{e:?}"))?;
    tokio::spawn(connection);
    client
        .simple_query("SELECT 1")
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(client)
}

/// How one connect from the client's own address went.
enum Connect {
    /// Reached PostgreSQL (it answered an SSLRequest).
    Reached,
    /// ECONNREFUSED, after this long.
    Refused(Duration),
    /// Anything else.
    Other(String),
}

/// A plain TCP client from `from` to `to`: connect, then an SSLRequest whose one-byte answer
/// proves PostgreSQL is at the other end.
async fn connect_from(from: IpAddr, to: SocketAddr) -> Connect {
    let attempt = async {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(from, 0))?;
        let started = Instant::now();
        let mut stream = match socket.connect(to).await {
            Ok(stream) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Ok(Connect::Refused(started.elapsed()));
            }
            Err(e) => return Err(e),
        };
        stream.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).await?;
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).await?;
        Ok(if answer[0] == b'N' || answer[0] == b'S' {
            Connect::Reached
        } else {
            Connect::Other(format!("answer {:?}", answer[0] as char))
        })
    };
    match tokio::time::timeout(Duration::from_secs(2), attempt).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Connect::Other(e.to_string()),
        Err(_) => Connect::Other("timed out".into()),
    }
}

/// Runs `examples/gate/psycopg_gate.py` against `gate` when `DBPOOL_GATE_PYTHON` names a
/// Python with psycopg (hack/gate-netns.sh sets it when one is found); prints what it printed.
/// Returns its exit status, or None when skipped.
async fn python_example(gate: SocketAddr, when: &str) -> Option<i32> {
    let Some(python) = std::env::var_os("DBPOOL_GATE_PYTHON") else {
        // hack/gate-netns.sh finds a Python with psycopg (hack/install-deps.sh installs it);
        // in CI the example must run, not be skipped.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI: no DBPOOL_GATE_PYTHON, the Python example would be skipped"
        );
        return None;
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gate/psycopg_gate.py");
    let dsn = format!(
        "host={} port={} dbname={APP_DB} user={APP_USER} password={APP_PASSWORD} sslmode=disable",
        gate.ip(),
        gate.port()
    );
    let out = tokio::process::Command::new(python)
        .arg(script)
        .env("DATABASE_URL", dsn)
        .output()
        .await
        .ok()?;
    println!(
        "python example ({when}): {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    out.status.code()
}

/// The whole story with a real kube-proxy: connects through the ClusterIP work while healthy,
/// are refused at once (and reach nothing) while the breaker is open, work again once the server
/// is back (the operator's readiness pings and early trial close the breaker; the time from ready
/// to a connect through the gate is printed); and 50 clients waiting at the gate reconnect when
/// it reopens (the recovery herd).
// Multi-threaded: the herd's 50 clients must not starve the test's own checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_proxy_refuses_connects_while_the_breaker_is_open() {
    let (db_ip, client_ip) = netns_or_skip!();
    if std::env::var_os("DBPOOL_GATE_KUBE_PROXY").is_none() {
        eprintln!("skipped: hack/gate-netns.sh runs no kube-proxy here");
        return;
    }
    let mut pg = PgServer::start().await;
    let proxy = CountingProxy::start(db_ip, pg.addr()).await;
    let s = setup(|_| GateAllowlist::Everywhere).await;
    // A long open timeout: the breaker stays Open until the force reopen below.
    s.gated_pool("orders", proxy.addr, "orders-gate", "10m")
        .await;
    s.wait_slice("orders-gate-dbpool", proxy.addr, true).await;
    let services: Api<Service> = Api::namespaced(s.client.clone(), s.ns());
    let cluster_ip: IpAddr = services
        .get("orders-gate")
        .await
        .expect("the gate Service")
        .spec
        .and_then(|spec| spec.cluster_ip)
        .and_then(|ip| ip.parse().ok())
        .expect("a ClusterIP");
    let gate = SocketAddr::new(cluster_ip, 5432);
    println!(
        "gate {gate} -> {} (PostgreSQL at {})",
        proxy.addr,
        pg.addr()
    );

    // Healthy: once kube-proxy has synced, the client reaches PostgreSQL through the ClusterIP.
    let synced = Instant::now();
    wait_until(
        "a connect through the gate",
        Duration::from_secs(30),
        || async { matches!(connect_from(client_ip, gate).await, Connect::Reached) },
    )
    .await;
    println!(
        "healthy: connect through the gate works ({:?} after the slice was ready)",
        synced.elapsed()
    );
    assert!(
        proxy.count_from(client_ip) >= 1,
        "the client's connects reach the proxy"
    );
    if let Some(code) = python_example(gate, "healthy").await {
        assert_eq!(code, 0, "psycopg connects through the gate while healthy");
    }
    // One warm-up login, then one timed alone: the baseline for the herd below.
    login(gate).await.expect("a login through the gate");
    let started = Instant::now();
    login(gate).await.expect("a login through the gate");
    let solo = started.elapsed();
    println!("healthy: one login (connect, SCRAM, SELECT 1) through the gate takes {solo:?}");

    // Outage: the breaker opens, then kube-proxy turns the not-ready endpoint into a REJECT.
    pg.stop().await;
    s.wait("orders", "breaker Open", |st| {
        breaker(st) == Some(BreakerState::Open)
    })
    .await;
    let opened = Instant::now();
    let first_refusal = wait_for("a refused connect", Duration::from_secs(30), || async {
        match connect_from(client_ip, gate).await {
            Connect::Refused(latency) => Some(latency),
            Connect::Reached => None,
            Connect::Other(e) => {
                eprintln!("waiting for a refusal: {e}");
                None
            }
        }
    })
    .await;
    println!(
        "open: kube-proxy refused within {:?} of the breaker opening; refusal latency {:?}",
        opened.elapsed(),
        first_refusal
    );
    let reached_before = proxy.count_from(client_ip);
    let mut latencies = Vec::new();
    for _ in 0..50 {
        match connect_from(client_ip, gate).await {
            Connect::Refused(latency) => latencies.push(latency),
            Connect::Reached => panic!("a connect reached PostgreSQL while the breaker is Open"),
            Connect::Other(e) => panic!("a connect neither refused nor reached: {e}"),
        }
    }
    latencies.sort();
    println!(
        "open: 50 connects refused; latency min {:?} median {:?} max {:?}",
        latencies[0], latencies[25], latencies[49]
    );
    assert_eq!(
        proxy.count_from(client_ip),
        reached_before,
        "no connection attempt from the client reached the database port while Open"
    );
    if let Some(code) = python_example(gate, "breaker open").await {
        assert_eq!(code, 1, "psycopg fails fast while the breaker is open");
    }

    // The recovery herd: 50 clients retrying every 100 ms at the closed gate, each recording how
    // its failed attempts failed and how long its successful login took.
    let reopened_at = Arc::new(Mutex::new(None::<Instant>));
    let refusals = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..50 {
        let reopened_at = reopened_at.clone();
        let refusals = refusals.clone();
        clients.push(tokio::spawn(async move {
            let mut herd = HerdClient::default();
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                let started = Instant::now();
                match login(gate).await {
                    Ok(_) => {
                        herd.login = Some(started.elapsed());
                        herd.after_close = reopened_at.lock().expect("lock").map(|t| t.elapsed());
                        return herd;
                    }
                    Err(e) if e.contains("refused") => {
                        herd.refused += 1;
                        refusals.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.contains("timed out") || e.contains("timeout") => {
                        herd.timed_out += 1
                    }
                    Err(_) => herd.other += 1,
                }
                // A client's own retry pace (the workload, not a wait in the test).
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            herd
        }));
    }
    // The herd waits at the closed gate: every client refused a few times over.
    wait_until(
        "the herd refused at the closed gate",
        Duration::from_secs(30),
        || async { refusals.load(Ordering::Relaxed) >= 50 * 3 },
    )
    .await;

    // Recovery: the database is back. Nothing else is done: the open timeout is 10 min, so only
    // the operator's readiness pings (the server accepts again) and its early trial can close the
    // breaker; the gate follows. Measured: how soon the gated Service accepts after the server
    // is ready (goal ≤ 1 s).
    pg.start().await;
    let ready = Instant::now();
    let attempts_before = proxy.count_from(client_ip);
    s.wait("orders", "breaker Closed", |st| {
        breaker(st) == Some(BreakerState::Closed)
    })
    .await;
    *reopened_at.lock().expect("lock") = Some(Instant::now());
    let closed = Instant::now();
    wait_until(
        "a connect through the reopened gate",
        Duration::from_secs(30),
        || async { matches!(connect_from(client_ip, gate).await, Connect::Reached) },
    )
    .await;
    println!(
        "closed: connects work again {:?} after the breaker closed",
        closed.elapsed()
    );
    println!(
        "ready → the gate accepts: {:?} (the breaker closed {:?} after ready, by the early trial; goal ≤ 1 s; load average {})",
        ready.elapsed(),
        closed.duration_since(ready),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    assert!(proxy.count_from(client_ip) > attempts_before);

    let mut herd = Vec::new();
    for client in clients {
        herd.push(client.await.expect("a herd client"));
    }
    let refused: u32 = herd.iter().map(|h| h.refused).sum();
    let timed_out: u32 = herd.iter().map(|h| h.timed_out).sum();
    let other: u32 = herd.iter().map(|h| h.other).sum();
    let mut after: Vec<Duration> = herd.iter().filter_map(|h| h.after_close).collect();
    let mut logins: Vec<Duration> = herd.iter().filter_map(|h| h.login).collect();
    after.sort();
    logins.sort();
    let pick = |v: &[Duration], q: usize| {
        v.get(v.len().saturating_sub(1) * q / 100)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "herd: while closed, {refused} attempts refused, {timed_out} timed out (no ICMP: the kernel rate-limits ICMP errors), {other} other"
    );
    println!(
        "herd: {}/50 logged in; after the breaker closed: first {:?}, median {:?}, last {:?}; \
         login time in the herd: median {:?}, max {:?} (one login alone: {solo:?})",
        logins.len(),
        pick(&after, 0),
        pick(&after, 50),
        pick(&after, 100),
        pick(&logins, 50),
        pick(&logins, 100),
    );
    assert_eq!(logins.len(), 50, "every waiting client got in");
    s.ns.cleanup().await;
}
