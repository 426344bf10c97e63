//! The operator as a real process: `dbpool-operator run` against the real apiserver and
//! PostgreSQL, scraped over HTTP, stopped with SIGTERM, killed with SIGKILL, and run twice with
//! leader election.

use dbpool_testkit as support;

use std::time::{Duration, Instant};

use dbpool_operator::api::{BreakerState, DbPool, DbPoolStatus, Phase};
use kube::{Api, Client};
use support::{
    kube::{TestNamespace, namespace_with_secret},
    pools::{create, pool, status, wait_status},
    postgres::{APP_PASSWORD, PgServer},
    process::{OperatorProcess, sample},
    wait::{wait_for, wait_until},
};

const SECRET: &str = "db-credentials";
const KEY: &str = "password";

const BINARY: &str = env!("CARGO_BIN_EXE_dbpool-operator");

fn breaker(s: &DbPoolStatus) -> Option<BreakerState> {
    s.breaker.as_ref().map(|b| b.state)
}

fn healthy(s: &DbPoolStatus) -> bool {
    s.phase == Some(Phase::Healthy)
}

async fn setup() -> (Client, TestNamespace) {
    namespace_with_secret(SECRET, KEY, APP_PASSWORD).await
}

/// /healthz, /readyz and /metrics answer; after a forced outage the breaker gauge flips to open
/// and the failure and recovery counters move; SIGTERM stops the process cleanly.
#[tokio::test]
async fn metrics_show_an_outage_and_sigterm_stops_the_process() {
    let (client, ns) = setup().await;
    let mut pg = PgServer::start().await;
    let mut op = OperatorProcess::start(BINARY, ns.name(), "solo", &[]);
    let spec = pool(
        "orders",
        pg.port(),
        Some((SECRET, KEY)),
        serde_json::json!({"backoff": {"initialDelay": "100ms", "maxDelay": "200ms"}, "breaker": {"failureThreshold": 3, "openTimeout": "1m"}}),
    );
    create(&client, ns.name(), &spec).await;
    wait_status(
        &client,
        ns.name(),
        "orders",
        "Healthy",
        Duration::from_secs(30),
        healthy,
    )
    .await;
    let ready = wait_for("/readyz 200", Duration::from_secs(10), || async {
        op.get("/readyz").await.filter(|(code, _)| *code == 200)
    })
    .await;
    assert_eq!(ready.1.trim(), "ready: leader");
    assert_eq!(op.get("/healthz").await.map(|r| r.0), Some(200));

    let pool_labels = [("namespace", ns.name()), ("name", "orders")];
    let before = op.metrics().await;
    let state = |text: &str, s: &str| {
        let mut labels = pool_labels.to_vec();
        labels.push(("state", s));
        sample(text, "dbpool_circuit_breaker_state", &labels)
    };
    assert_eq!(state(&before, "closed"), Some(1.0), "{before}");
    assert_eq!(state(&before, "open"), Some(0.0));
    let failures_before =
        sample(&before, "dbpool_health_check_failures_total", &pool_labels).unwrap_or(0.0);

    pg.stop().await;
    wait_status(
        &client,
        ns.name(),
        "orders",
        "breaker Open",
        Duration::from_secs(30),
        |s| breaker(s) == Some(BreakerState::Open),
    )
    .await;
    let after = wait_for("the open gauge", Duration::from_secs(5), || async {
        let text = op.metrics().await;
        (state(&text, "open") == Some(1.0)).then_some(text)
    })
    .await;
    assert_eq!(state(&after, "closed"), Some(0.0));
    let failures =
        sample(&after, "dbpool_health_check_failures_total", &pool_labels).unwrap_or(0.0);
    assert!(
        failures >= failures_before + 3.0,
        "failures {failures_before} -> {failures}"
    );
    let attempts = sample(&after, "dbpool_recovery_attempts_total", &pool_labels).unwrap_or(0.0);
    assert!(attempts >= 2.0, "recovery attempts: {attempts}");
    assert!(sample(&after, "dbpool_consecutive_failures", &pool_labels).unwrap_or(0.0) >= 3.0);
    assert!(sample(&after, "dbpool_status_writes_total", &pool_labels).unwrap_or(0.0) >= 2.0);
    assert!(
        after.contains("dbpool_probe_duration_seconds_bucket{"),
        "latency histogram"
    );

    // SIGTERM: a clean, prompt exit.
    op.signal("TERM");
    let start = Instant::now();
    let code = wait_for("exit after SIGTERM", Duration::from_secs(10), || {
        let exited = op.child.try_wait().ok().flatten();
        async move { exited }
    })
    .await;
    assert!(code.success(), "exit status {code:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// Two processes with leader election: exactly one probes; SIGKILL the leader while the pool is
/// Open; the other takes over within lease duration + renew period and the pool recovers with
/// no status regression.
#[tokio::test]
async fn a_standby_takes_over_from_a_killed_leader() {
    let (client, ns) = setup().await;
    let mut pg = PgServer::start().await;
    let lease = [
        "--leader-elect",
        "--lease-name",
        "dbpool-operator",
        "--lease-namespace",
        ns.name(),
        "--lease-duration",
        "3s",
        "--lease-renew-grace",
        "1s",
    ];
    let a = OperatorProcess::start(BINARY, ns.name(), "replica-a", &lease);
    let b = OperatorProcess::start(BINARY, ns.name(), "replica-b", &lease);
    let spec = pool(
        "orders",
        pg.port(),
        Some((SECRET, KEY)),
        serde_json::json!({
            "healthCheck": {"interval": "500ms", "timeout": "300ms"},
            "backoff": {"initialDelay": "100ms", "maxDelay": "200ms"},
            "breaker": {"failureThreshold": 2, "openTimeout": "2s"},
        }),
    );
    create(&client, ns.name(), &spec).await;
    wait_status(
        &client,
        ns.name(),
        "orders",
        "Healthy",
        Duration::from_secs(30),
        healthy,
    )
    .await;

    // Exactly one leader, and only it probes.
    let (leader, standby) = wait_for("one leader", Duration::from_secs(15), || async {
        let la = sample(&a.metrics().await, "dbpool_leader", &[]);
        let lb = sample(&b.metrics().await, "dbpool_leader", &[]);
        match (la, lb) {
            (Some(1.0), Some(0.0)) => Some((0usize, 1usize)),
            (Some(0.0), Some(1.0)) => Some((1, 0)),
            _ => None,
        }
    })
    .await;
    let mut procs = [a, b];
    let probes = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("dbpool_probes_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let leader_probes = probes(&procs[leader].metrics().await);
    wait_until(
        "the leader keeps probing",
        Duration::from_secs(10),
        || async { probes(&procs[leader].metrics().await) >= leader_probes + 2.0 },
    )
    .await;
    assert_eq!(
        probes(&procs[standby].metrics().await),
        0.0,
        "the standby never probes"
    );
    assert_eq!(
        procs[standby]
            .get("/readyz")
            .await
            .map(|(c, b)| (c, b.trim().to_owned())),
        Some((200, "ready: standby".to_owned()))
    );

    // Open the breaker, then SIGKILL the leader.
    pg.stop().await;
    let open = wait_status(
        &client,
        ns.name(),
        "orders",
        "breaker Open",
        Duration::from_secs(20),
        |s| breaker(s) == Some(BreakerState::Open),
    )
    .await;
    procs[leader].kill();
    let killed_at = Instant::now();
    let name = procs[standby].name.clone();
    wait_until("the standby leads", Duration::from_secs(10), || async {
        sample(&procs[standby].metrics().await, "dbpool_leader", &[]) == Some(1.0)
    })
    .await;
    let took_over = killed_at.elapsed();
    assert!(
        took_over <= Duration::from_secs(3 + 1 + 1),
        "{name} took over after {took_over:?}; lease 3s + renew 1s"
    );

    // No regression: the new leader continues from status (breaker not reset, counts kept).
    let api: Api<DbPool> = Api::namespaced(client.clone(), ns.name());
    let s = wait_status(
        &client,
        ns.name(),
        "orders",
        "a probe by the new leader",
        Duration::from_secs(20),
        |s| s.consecutive_failures > open.consecutive_failures,
    )
    .await;
    assert_ne!(breaker(&s), Some(BreakerState::Closed));
    assert!(
        s.breaker.as_ref().map(|b| b.open_count) >= open.breaker.as_ref().map(|b| b.open_count)
    );
    pg.start().await;
    let s = wait_status(
        &client,
        ns.name(),
        "orders",
        "recovered under the new leader",
        Duration::from_secs(30),
        healthy,
    )
    .await;
    assert_eq!(breaker(&s), Some(BreakerState::Closed));
    assert!(status(&client, ns.name(), "orders").await.is_some());
    drop(api);
}

/// A process that cannot set up leader election (its Lease namespace does not exist) exits with
/// a non-zero code instead of idling as a process that will never lead.
#[tokio::test]
async fn a_lease_setup_failure_exits_non_zero() {
    let (_client, ns) = setup().await;
    let mut op = OperatorProcess::start(
        BINARY,
        ns.name(),
        "no-lease",
        &[
            "--leader-elect",
            "--lease-namespace",
            "dbpool-no-such-namespace",
        ],
    );
    let status = wait_for("the operator to exit", Duration::from_secs(30), || {
        let exited = op.child.try_wait().ok().flatten();
        async move { exited }
    })
    .await;
    assert!(!status.success(), "exit status {status:?}");
}
