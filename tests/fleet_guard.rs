//! The fleet guard (issue 14 item 5): when most targets that were healthy fail on the network
//! path at once, the operator's own network is suspect and breakers are held Closed instead of
//! opening; a single target's outage, refusals, and one tenant's failures still open breakers.
//!
//! Real kube-apiserver, real PostgreSQL, the operator in-process with the default guard
//! settings (share 0.5, at least 3 targets, 60s window). Each pool goes through its own
//! [`FaultProxy`] on loopback, so every pool is its own target (`127.0.0.1:<port>`); the proxies
//! start in Pass mode, every pool is Healthy first, then the proxies are switched: BlackHole
//! (accept, never answer: the probes time out, which is path evidence) or Refuse (connection
//! refused, which proves the path works).

use std::time::{Duration, Instant};

use dbpool_operator::{
    api::{
        BreakerState, CONDITION_BREAKER_OPEN, CONDITION_READY, DbPool, DbPoolStatus, Phase, reason,
    },
    controller::{OperatorConfig, RunningOperator},
};
use dbpool_testkit as support;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::{Api, Client, api::ListParams};
use support::{
    kube::{TestNamespace, create_consenting_secret, install_crd},
    pools::{condition, create, pool, status, wait_status},
    postgres::{APP_PASSWORD, PgServer},
    proxy::{FaultProxy, Mode},
    wait::wait_until,
};

const SECRET: &str = "db";
const KEY: &str = "password";
/// Label that keeps a cluster-wide test operator to this test's pools.
const RUN_LABEL: &str = "dbpool.io/test-run";
/// Failures before a breaker opens: enough for every target's first failure to arrive first.
const THRESHOLD: u32 = 4;

/// A pool on `port` with 1s probes (500ms timeout) and the test's breaker threshold.
fn spec(name: &str, port: u16, run: &str) -> DbPool {
    let mut p = pool(
        name,
        port,
        Some((SECRET, KEY)),
        serde_json::json!({
            "healthCheck": { "interval": "1s", "timeout": "500ms" },
            "backoff": { "initialDelay": "300ms", "multiplier": 2.0, "maxDelay": "1s",
                         "maxAttempts": 1000, "jitter": 0.0 },
            "breaker": { "failureThreshold": THRESHOLD, "openTimeout": "1s" },
        }),
    );
    p.metadata
        .labels
        .get_or_insert_default()
        .insert(RUN_LABEL.to_owned(), run.to_owned());
    p
}

fn breaker(s: &DbPoolStatus) -> Option<BreakerState> {
    s.breaker.as_ref().map(|b| b.state)
}

fn healthy(s: &DbPoolStatus) -> bool {
    s.phase == Some(Phase::Healthy)
}

fn held(s: &DbPoolStatus) -> bool {
    breaker(s) == Some(BreakerState::Closed)
        && condition(s, CONDITION_READY).is_some_and(|c| c.1 == reason::FLEET_SUSPECT)
        && condition(s, CONDITION_BREAKER_OPEN).is_some_and(|c| c.1 == reason::FLEET_SUSPECT)
}

/// `dbpool_fleet_suspect` as the operator's /metrics shows it.
fn suspect_metric(op: &RunningOperator) -> Option<f64> {
    op.metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix("dbpool_fleet_suspect ")?.parse().ok())
}

fn held_openings_metric(op: &RunningOperator) -> Option<f64> {
    op.metrics.encode().lines().find_map(|l| {
        l.strip_prefix("dbpool_fleet_held_openings_total ")?
            .parse()
            .ok()
    })
}

/// Events of `reason` about pool `name`.
async fn events(client: &Client, ns: &str, name: &str, reason: &str) -> Vec<K8sEvent> {
    let api: Api<K8sEvent> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One tenant: a namespace with a consenting Secret and `n` pools, each behind its own proxy.
struct Tenant {
    ns: TestNamespace,
    proxies: Vec<FaultProxy>,
    names: Vec<String>,
}

impl Tenant {
    async fn new(client: &Client, prefix: &str, pg: &PgServer, n: usize, run: &str) -> Self {
        let ns = TestNamespace::with_prefix(client, prefix).await;
        create_consenting_secret(client, ns.name(), SECRET, KEY, APP_PASSWORD, &["127.0.0.1"])
            .await;
        let mut proxies = Vec::new();
        let mut names = Vec::new();
        for i in 0..n {
            let proxy = FaultProxy::start(pg.addr()).await;
            let name = format!("db-{i}");
            create(client, ns.name(), &spec(&name, proxy.port(), run)).await;
            proxies.push(proxy);
            names.push(name);
        }
        Self { ns, proxies, names }
    }

    fn name(&self) -> &str {
        self.ns.name()
    }

    async fn wait_all(
        &self,
        client: &Client,
        what: &str,
        deadline: Duration,
        check: impl Fn(&DbPoolStatus) -> bool + Copy,
    ) {
        for name in &self.names {
            wait_status(client, self.name(), name, what, deadline, check).await;
        }
    }

    /// Switches the first `n` proxies to `mode`; with Refuse, live connections are cut too (a
    /// stopped server does not keep its sessions).
    async fn set(&self, n: usize, mode: Mode) {
        for proxy in self.proxies.iter().take(n) {
            proxy.set_mode(mode).await;
            if mode == Mode::Refuse {
                proxy.cut_all().await;
            }
        }
    }
}

/// A cluster-wide operator (several tenants) that reconciles only this test's pools.
fn operator(client: &Client, run: &str) -> RunningOperator {
    RunningOperator::start_with(
        client.clone(),
        OperatorConfig {
            namespace: None,
            pool_selector: Some(format!("{RUN_LABEL}={run}")),
            instance: format!("test-{run}"),
            ..OperatorConfig::default()
        },
    )
}

async fn start() -> (Client, PgServer) {
    let client = support::kube::client().await;
    install_crd(&client).await;
    (client, PgServer::start().await)
}

/// 1. Black-holing every target holds every breaker: Closed, Ready and BreakerOpen with reason
/// FleetSuspect, one FleetSuspect event per pool, `dbpool_fleet_suspect 1`; failures go on being
/// counted, the breakers stay held; once the targets answer again the pools recover and the
/// metric returns to 0.
#[tokio::test]
async fn black_holing_every_target_holds_the_breakers() {
    let (client, pg) = start().await;
    let run = support::kube::unique_name("fleet-all");
    let op = operator(&client, &run);
    let t = Tenant::new(&client, "fleet-all", &pg, 3, &run).await;
    t.wait_all(&client, "Healthy", Duration::from_secs(30), healthy)
        .await;
    assert_eq!(suspect_metric(&op), Some(0.0));

    let cut = Instant::now();
    t.set(3, Mode::BlackHole).await;
    t.wait_all(
        &client,
        "held by the fleet guard",
        Duration::from_secs(30),
        held,
    )
    .await;
    let all_held = cut.elapsed();
    assert_eq!(suspect_metric(&op), Some(1.0));
    // Held, not idle: the failures keep being counted and backed off while the breaker stays
    // Closed, well past the threshold.
    t.wait_all(
        &client,
        "held failures past the threshold",
        Duration::from_secs(30),
        |s| s.consecutive_failures >= (THRESHOLD as i32) + 3,
    )
    .await;
    let mut failures = Vec::new();
    for name in &t.names {
        let s = status(&client, t.name(), name).await.expect("status");
        assert!(held(&s), "{name} still held: {s:?}");
        assert_eq!(s.breaker.as_ref().map(|b| b.open_count), Some(0));
        failures.push(s.consecutive_failures);
        let warned = events(&client, t.name(), name, reason::FLEET_SUSPECT).await;
        assert_eq!(warned.len(), 1, "one FleetSuspect event per pool per hold");
        assert_eq!(warned[0].type_.as_deref(), Some("Warning"));
        assert!(
            events(&client, t.name(), name, reason::BREAKER_OPENED)
                .await
                .is_empty()
        );
    }
    assert_eq!(held_openings_metric(&op), Some(3.0));
    let held_for = cut.elapsed();

    t.set(3, Mode::Pass).await;
    t.wait_all(&client, "Healthy again", Duration::from_secs(30), healthy)
        .await;
    let recovered = cut.elapsed() - held_for;
    wait_until(
        "dbpool_fleet_suspect back to 0",
        Duration::from_secs(10),
        || async { suspect_metric(&op) == Some(0.0) },
    )
    .await;
    println!(
        "fleet guard, all 3 targets black-holed: every breaker held after {all_held:.2?} \
         (threshold {THRESHOLD}, 1s interval, 500ms timeout); still Closed after {held_for:.2?} \
         with consecutiveFailures {failures:?}; Healthy again {recovered:.2?} after Pass"
    );
    op.kill().await;
    t.ns.cleanup().await;
}

/// 2. Black-holing one target of three opens its breaker as before; the guard stays quiet.
#[tokio::test]
async fn black_holing_one_target_opens_its_breaker() {
    let (client, pg) = start().await;
    let run = support::kube::unique_name("fleet-one");
    let op = operator(&client, &run);
    let t = Tenant::new(&client, "fleet-one", &pg, 3, &run).await;
    t.wait_all(&client, "Healthy", Duration::from_secs(30), healthy)
        .await;
    let cut = Instant::now();
    t.set(1, Mode::BlackHole).await;
    let s = wait_status(
        &client,
        t.name(),
        &t.names[0],
        "breaker Open",
        Duration::from_secs(30),
        |s| breaker(s) == Some(BreakerState::Open),
    )
    .await;
    let opened = cut.elapsed();
    assert_eq!(
        s.last_probe.as_ref().map(|p| p.outcome),
        Some(dbpool_operator::api::ProbeOutcome::TransientFailure)
    );
    for name in &t.names[1..] {
        let s = status(&client, t.name(), name).await.expect("status");
        assert!(healthy(&s), "{name} unaffected: {s:?}");
    }
    assert_eq!(suspect_metric(&op), Some(0.0));
    assert!(
        events(&client, t.name(), &t.names[0], reason::FLEET_SUSPECT)
            .await
            .is_empty()
    );
    println!("fleet guard, 1 of 3 targets black-holed: its breaker opened after {opened:.2?}");
    op.kill().await;
    t.ns.cleanup().await;
}

/// 3. Every server refusing (stopped, sessions gone) opens every breaker as before: a refused
/// connection proves the path works, so it is never evidence for the guard.
#[tokio::test]
async fn every_server_refusing_opens_every_breaker() {
    let (client, pg) = start().await;
    let run = support::kube::unique_name("fleet-refuse");
    let op = operator(&client, &run);
    let t = Tenant::new(&client, "fleet-refuse", &pg, 3, &run).await;
    t.wait_all(&client, "Healthy", Duration::from_secs(30), healthy)
        .await;
    let cut = Instant::now();
    t.set(3, Mode::Refuse).await;
    t.wait_all(&client, "breaker Open", Duration::from_secs(30), |s| {
        breaker(s) == Some(BreakerState::Open)
    })
    .await;
    let opened = cut.elapsed();
    for name in &t.names {
        assert!(
            events(&client, t.name(), name, reason::FLEET_SUSPECT)
                .await
                .is_empty(),
            "{name} was never held"
        );
    }
    assert_eq!(suspect_metric(&op), Some(0.0));
    assert_eq!(held_openings_metric(&op), Some(0.0));
    println!("fleet guard, all 3 targets refusing: every breaker opened after {opened:.2?}");
    op.kill().await;
    t.ns.cleanup().await;
}

/// 4. One tenant's targets all black-holed, and one of another tenant's three: counted per
/// target that is 4 of 6 (67%), over the 50% share, but only one namespace of two agrees, so
/// the guard does not trip and every failing breaker opens, in both namespaces. The other
/// tenant's healthy pools are untouched.
#[tokio::test]
async fn one_tenants_dead_targets_do_not_trip_the_guard_for_another() {
    let (client, pg) = start().await;
    let run = support::kube::unique_name("fleet-ns");
    let op = operator(&client, &run);
    let noisy = Tenant::new(&client, "fleet-noisy", &pg, 3, &run).await;
    let quiet = Tenant::new(&client, "fleet-quiet", &pg, 3, &run).await;
    noisy
        .wait_all(&client, "Healthy", Duration::from_secs(30), healthy)
        .await;
    quiet
        .wait_all(&client, "Healthy", Duration::from_secs(30), healthy)
        .await;
    let cut = Instant::now();
    noisy.set(3, Mode::BlackHole).await;
    quiet.set(1, Mode::BlackHole).await;
    let open = |s: &DbPoolStatus| breaker(s) == Some(BreakerState::Open);
    noisy
        .wait_all(&client, "breaker Open", Duration::from_secs(30), open)
        .await;
    wait_status(
        &client,
        quiet.name(),
        &quiet.names[0],
        "breaker Open",
        Duration::from_secs(30),
        open,
    )
    .await;
    let opened = cut.elapsed();
    for name in &quiet.names[1..] {
        let s = status(&client, quiet.name(), name).await.expect("status");
        assert!(healthy(&s), "{name} unaffected: {s:?}");
    }
    for (tenant, name) in noisy
        .names
        .iter()
        .map(|n| (&noisy, n))
        .chain(std::iter::once((&quiet, &quiet.names[0])))
    {
        assert!(
            events(&client, tenant.name(), name, reason::FLEET_SUSPECT)
                .await
                .is_empty(),
            "{}/{name} was never held",
            tenant.name()
        );
    }
    assert_eq!(suspect_metric(&op), Some(0.0));
    assert_eq!(held_openings_metric(&op), Some(0.0));
    println!(
        "fleet guard, 3 of 3 targets in one namespace and 1 of 3 in another black-holed (4 of 6 \
         targets): not suspect, all 4 breakers opened after {opened:.2?}"
    );
    op.kill().await;
    noisy.ns.cleanup().await;
    quiet.ns.cleanup().await;
}
