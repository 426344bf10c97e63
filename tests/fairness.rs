//! Fair probing against the real apiserver and PostgreSQL (issue 13 item 4, "Starvation").
//!
//! 80 DbPools in one namespace, each on its own hanging loopback port (a fault proxy in
//! BlackHole mode: it accepts and never answers) with the largest admitted timeout (60s), fill the probe slots one
//! namespace may take. A pool created afterwards in another namespace still becomes Healthy at
//! once and is probed on its 1s interval. (Without fairness, the 80 hanging probes held all 64
//! slots and the new pool got no status for the whole timeout.)

use std::time::Duration;

use dbpool_operator::{
    api::DbPool,
    controller::{OperatorConfig, RunningOperator},
};
use dbpool_testkit as support;
use support::{
    kube::{TestNamespace, create_consenting_secret, install_crd},
    pools::{create, pool, wait_status},
    postgres::{APP_PASSWORD, PgServer},
    proxy::{FaultProxy, Mode},
    wait::{wait_for, wait_until},
};

/// Hanging pools in the hostile namespace (more than the 64 default probe slots).
const HANGING: usize = 80;

/// The label that puts a pool in this test's run (the operator's pool selector).
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

#[tokio::test]
async fn starvation_hanging_probes_in_one_namespace_do_not_delay_another() {
    let client = support::kube::client().await;
    install_crd(&client).await;
    let hostile = TestNamespace::with_prefix(&client, "hostile").await;
    let tenant = TestNamespace::with_prefix(&client, "tenant").await;
    let pg = PgServer::start().await;
    create_consenting_secret(
        &client,
        tenant.name(),
        "db",
        "password",
        APP_PASSWORD,
        &["127.0.0.1"],
    )
    .await;
    // All namespaces (the point is one namespace against another), but only this test's pools:
    // other tests' leftovers stay out of the way.
    let run = hostile.name().to_owned();
    let config = OperatorConfig {
        namespace: None,
        pool_selector: Some(format!("{RUN_LABEL}={run}")),
        instance: format!("test-{}", tenant.name()),
        ..OperatorConfig::default()
    };
    let slots = config.max_concurrent_probes;
    let op = RunningOperator::start_with(client.clone(), config);

    let mut proxies = Vec::new();
    for i in 0..HANGING {
        let proxy = FaultProxy::start("127.0.0.1:9".parse().expect("address")).await;
        proxy.set_mode(Mode::BlackHole).await;
        let spec = labelled(
            pool(
                &format!("hang-{i}"),
                proxy.port(),
                None,
                serde_json::json!({ "healthCheck": { "interval": "2m", "timeout": "60s" } }),
            ),
            &run,
        );
        create(&client, hostile.name(), &spec).await;
        proxies.push(proxy);
    }
    // Wait until the hostile namespace holds slots with hanging probes. Alone it may take all but
    // an eighth of them; other namespaces active on the same apiserver (other tests' leftovers:
    // the operator watches all namespaces here) shrink its share, and the test prints it.
    let hanging = |proxies: &[FaultProxy]| proxies.iter().map(FaultProxy::live_connections).sum();
    wait_until(
        "hanging probes in the hostile namespace",
        Duration::from_secs(60),
        || async { hanging(&proxies) >= 2 },
    )
    .await;
    let held: usize = hanging(&proxies);

    let start = tokio::time::Instant::now();
    let spec = labelled(
        pool(
            "orders",
            pg.port(),
            Some(("db", "password")),
            serde_json::json!({ "healthCheck": { "interval": "1s", "timeout": "500ms" } }),
        ),
        &run,
    );
    create(&client, tenant.name(), &spec).await;
    wait_status(
        &client,
        tenant.name(),
        "orders",
        "Healthy",
        Duration::from_secs(5),
        |s| s.phase == Some(dbpool_operator::api::Phase::Healthy),
    )
    .await;
    let healthy_after = start.elapsed();

    // Then probed on its interval while the hanging probes go on (they time out after 60s).
    let window = Duration::from_secs(10);
    let before = probes_in(&op, tenant.name());
    let window_start = tokio::time::Instant::now();
    let probed = wait_for(
        "ten probes of the tenant's pool",
        window + Duration::from_secs(2),
        || {
            let n = probes_in(&op, tenant.name()) - before;
            async move { (n >= 9).then_some(n) }
        },
    )
    .await;
    let took = window_start.elapsed();
    println!(
        "starvation: {held} of {slots} slots held by hanging probes when the tenant's pool was created; Healthy after \
         {healthy_after:?}; then {probed} probes in {took:?} (interval 1s); still hanging: {}",
        hanging(&proxies)
    );
    assert!(
        hanging(&proxies) >= held.min(2),
        "the hostile probes must still hang during the window"
    );
    drop(proxies);
    op.kill().await;
    hostile.cleanup().await;
    tenant.cleanup().await;
}
