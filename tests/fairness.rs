//! Fair probing against the real apiserver and PostgreSQL (issue 13 item 4, "Starvation", and
//! issue 23, many hostile namespaces).
//!
//! Three cases run side by side on the one control plane, each with its own operator (default
//! 64 probe slots, a pool selector of its own) and its own 80 hanging loopback ports (fault
//! proxies in BlackHole mode: they accept and never answer): 80 DbPools with `timeout: 1m` and
//! `interval: 10m` in 1, 5 and 20 hostile namespaces, created namespace by namespace (the order
//! that lets the first ones grab the most). Once the hanging probes hold their slots, a pool in
//! an innocent namespace, and 30 s later one in a second innocent namespace, must each be Ready
//! within 1 s of creation, while the hanging probes (which time out only after 60 s) still hold
//! their slots; the first innocent pool keeps its 1 s cadence meanwhile. (Before issue 23, five
//! namespaces of 16 hanging pools held all 64 slots and the innocent pool waited 58 s.)

use std::time::Duration;

use dbpool_operator::{
    api::DbPool,
    controller::{OperatorConfig, RunningOperator},
};
use dbpool_testkit as support;
use kube::Client;
use support::{
    kube::{TestNamespace, create_consenting_secret, install_crd},
    pools::{condition, create, pool, wait_status},
    postgres::{APP_PASSWORD, PgServer},
    proxy::{FaultProxy, Mode},
    wait::{wait_for, wait_until},
};
use tokio::time::Instant;

/// Hanging pools in each case (more than the 64 default probe slots).
const HANGING: usize = 80;

/// How many hostile namespaces share the hanging pools, per case.
const CASES: [usize; 3] = [1, 5, 20];

/// The second innocent pool comes this long after the first (issue 23).
const GAP: Duration = Duration::from_secs(30);

/// Each innocent pool must be Ready this soon after its creation.
const READY_WITHIN: Duration = Duration::from_secs(1);

/// The label that puts a pool in one case's run (its operator's pool selector).
const RUN_LABEL: &str = "dbpool.io/test-run";

fn labelled(mut pool: DbPool, run: &str) -> DbPool {
    pool.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(RUN_LABEL.to_owned(), run.to_owned());
    pool
}

/// Probes the operator ran for pools in `namespace`, from its own metrics.
fn probes_in(op: &RunningOperator, namespace: &str) -> u64 {
    let label = format!("namespace=\"{namespace}\"");
    op.metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("dbpool_probes_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Connections the hanging ports hold open: the hostile probes in flight.
fn hanging(proxies: &[FaultProxy]) -> usize {
    proxies.iter().map(FaultProxy::live_connections).sum()
}

/// What one case measured.
struct Outcome {
    namespaces: usize,
    slots: usize,
    /// Hostile probes hanging when each innocent pool was created.
    held: [usize; 2],
    /// Creation to Ready of each innocent pool.
    ready: [Duration; 2],
    /// Probes of the first innocent pool during the gap.
    probes_in_gap: u64,
}

/// Creates `name` (1 s interval) in `namespace` and returns how long it took to be Ready.
async fn innocent_ready(client: &Client, namespace: &str, run: &str, pg: &PgServer) -> Duration {
    let spec = labelled(
        pool(
            "orders",
            pg.port(),
            Some(("db", "password")),
            serde_json::json!({ "healthCheck": { "interval": "1s", "timeout": "500ms" } }),
        ),
        run,
    );
    let start = Instant::now();
    create(client, namespace, &spec).await;
    wait_status(
        client,
        namespace,
        "orders",
        "Ready",
        Duration::from_secs(90),
        |s| condition(s, "Ready").is_some_and(|(status, _, _)| status == "True"),
    )
    .await;
    start.elapsed()
}

async fn case(client: &Client, pg: &PgServer, namespaces: usize) -> Outcome {
    let mut hostile = Vec::new();
    for _ in 0..namespaces {
        hostile.push(TestNamespace::with_prefix(client, &format!("hostile{namespaces}")).await);
    }
    let mut innocents = Vec::new();
    for _ in 0..2 {
        let tenant = TestNamespace::with_prefix(client, &format!("tenant{namespaces}")).await;
        create_consenting_secret(
            client,
            tenant.name(),
            "db",
            "password",
            APP_PASSWORD,
            &["127.0.0.1"],
        )
        .await;
        innocents.push(tenant);
    }
    // All namespaces (the point is namespaces against each other), but only this case's pools.
    let run = hostile[0].name().to_owned();
    let config = OperatorConfig {
        namespace: None,
        pool_selector: Some(format!("{RUN_LABEL}={run}")),
        instance: format!("test-{run}"),
        ..OperatorConfig::default()
    };
    let slots = config.max_concurrent_probes;
    let op = RunningOperator::start_with(client.clone(), config);

    let mut proxies = Vec::new();
    for _ in 0..HANGING {
        let proxy = FaultProxy::start("127.0.0.1:9".parse().expect("address")).await;
        proxy.set_mode(Mode::BlackHole).await;
        proxies.push(proxy);
    }
    // Namespace by namespace: the first ones ask for slots before the others are active.
    let per_namespace = HANGING / namespaces;
    for (i, proxy) in proxies.iter().enumerate() {
        let spec = labelled(
            pool(
                &format!("hang-{i}"),
                proxy.port(),
                None,
                serde_json::json!({ "healthCheck": { "interval": "10m", "timeout": "1m" } }),
            ),
            &run,
        );
        create(
            client,
            hostile[(i / per_namespace).min(namespaces - 1)].name(),
            &spec,
        )
        .await;
    }
    // The hostile namespaces take all they may: at least the slots outside the reserve (half).
    wait_until(
        "hanging probes in the hostile namespaces",
        Duration::from_secs(60),
        || async { hanging(&proxies) >= slots / 2 },
    )
    .await;

    let held_first = hanging(&proxies);
    let first = innocent_ready(client, innocents[0].name(), &run, pg).await;
    let gap_start = Instant::now();
    let probes_before = probes_in(&op, innocents[0].name());
    // The gap: wait for its deadline while the hostile probes keep hanging (they time out only
    // after 60 s) and the first innocent pool is probed on its interval.
    wait_for("the gap before the second innocent pool", GAP * 2, || {
        let done = gap_start.elapsed() >= GAP;
        async move { done.then_some(()) }
    })
    .await;
    let probes_in_gap = probes_in(&op, innocents[0].name()) - probes_before;
    let held_second = hanging(&proxies);
    let second = innocent_ready(client, innocents[1].name(), &run, pg).await;

    drop(proxies);
    op.kill().await;
    for ns in hostile.into_iter().chain(innocents) {
        ns.cleanup().await;
    }
    Outcome {
        namespaces,
        slots,
        held: [held_first, held_second],
        ready: [first, second],
        probes_in_gap,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starvation_hanging_probes_in_many_namespaces_never_delay_a_newcomer() {
    let client = support::kube::client().await;
    install_crd(&client).await;
    let pg = PgServer::start().await;
    let start = Instant::now();
    let outcomes = futures::future::join_all(CASES.map(|n| case(&client, &pg, n))).await;
    for o in &outcomes {
        println!(
            "starvation: {} hostile namespaces, {HANGING} hanging pools: {} then {} of {} slots \
             hanging when the innocent pools were created ({GAP:?} apart); Ready after {:?} and \
             {:?}; the first probed {} times in the gap (interval 1s)",
            o.namespaces, o.held[0], o.held[1], o.slots, o.ready[0], o.ready[1], o.probes_in_gap
        );
    }
    println!("starvation: all cases in {:?}", start.elapsed());
    for o in &outcomes {
        for (i, ready) in o.ready.iter().enumerate() {
            assert!(
                *ready <= READY_WITHIN,
                "{} hostile namespaces: innocent pool {} Ready after {ready:?}",
                o.namespaces,
                i + 1
            );
        }
        assert!(
            o.held[1] >= o.slots / 2,
            "{} hostile namespaces: the hostile probes must still hang when the second innocent \
             pool is created",
            o.namespaces
        );
        assert!(
            o.probes_in_gap >= GAP.as_secs() * 8 / 10,
            "{} hostile namespaces: the first innocent pool keeps its 1s cadence",
            o.namespaces
        );
    }
}
