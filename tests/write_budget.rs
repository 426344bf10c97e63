//! The write budget against the real apiserver (issue 13 item 5, "Flood").
//!
//! A pool with the smallest timings the suite uses (100ms interval, delays, open timeout and
//! cooldown) against a refusing port probes ten times a second and changes its counters on every
//! probe. The writes the apiserver receives for it — status and label patches (each a new
//! resourceVersion, counted on a watch) and event creates and patches (an event's series count)
//! — stay within `--min-status-period`: one status write per period, one event per reason per
//! period, plus the breaker's one transition.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use dbpool_operator::{
    api::{BreakerState, DbPool},
    controller::{OperatorConfig, RunningOperator},
};
use dbpool_testkit as support;
use futures::StreamExt;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::{
    Api, ResourceExt,
    api::ListParams,
    runtime::{WatchStreamExt, watcher},
};
use support::{
    kube::{TestNamespace, install_crd},
    pools::{create, pool, wait_status},
    proxy::{FaultProxy, Mode},
};

/// The event reasons a refused target cycles through (Open → HalfOpen → Open trials, cooldowns).
const REASONS: u64 = 4;

/// Requests the apiserver received for every event in the namespace, by event name: a created
/// event is one request, each later publish of the same event one patch (its series count).
async fn event_writes(api: &Api<K8sEvent>) -> BTreeMap<String, u64> {
    api.list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .map(|e| {
                    let count = e
                        .series
                        .as_ref()
                        .map_or(1, |s| u64::try_from(s.count.max(1)).unwrap_or(1));
                    (e.name_any(), count)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn flood_a_pool_with_the_smallest_timings_stays_within_the_write_budget() {
    let client = support::kube::client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client).await;
    // Any upstream: the proxy refuses every connection.
    let proxy = FaultProxy::start("127.0.0.1:9".parse().expect("address")).await;
    proxy.set_mode(Mode::Refuse).await;
    let config = OperatorConfig {
        namespace: Some(ns.name().to_owned()),
        instance: format!("test-{}", ns.name()),
        ..OperatorConfig::default()
    };
    let period = config.min_status_period;
    let op = RunningOperator::start_with(client.clone(), config);
    let spec = pool(
        "flood",
        proxy.port(),
        None,
        serde_json::json!({
            // The smallest timings admission takes: every duration at its 100ms floor, and the
            // interval just above the timeout it must exceed.
            "healthCheck": { "interval": "101ms", "timeout": "100ms" },
            "backoff": { "initialDelay": "100ms", "maxDelay": "100ms", "multiplier": 1.0,
                         "maxAttempts": 3, "cooldown": "100ms", "jitter": 0.0 },
            "breaker": { "failureThreshold": 1, "openTimeout": "100ms", "successThreshold": 1 },
        }),
    );
    create(&client, ns.name(), &spec).await;
    wait_status(
        &client,
        ns.name(),
        "flood",
        "breaker Open",
        Duration::from_secs(20),
        |s| s.breaker.as_ref().map(|b| b.state) == Some(BreakerState::Open),
    )
    .await;

    // Measure a 10 s window: every resourceVersion of the pool seen on a watch, and the event
    // requests before and after.
    let window = Duration::from_secs(10);
    let pools: Api<DbPool> = Api::namespaced(client.clone(), ns.name());
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), ns.name());
    let mut stream = watcher(
        pools.clone(),
        watcher::Config::default().fields("metadata.name=flood"),
    )
    .applied_objects()
    .boxed();
    // The first object is the current one (the initial list): not a write of the window.
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .ok()
        .flatten()
        .and_then(Result::ok)
        .expect("the pool on the watch");
    let probes_before = probes(&op);
    let events_before = event_writes(&events).await;
    let mut versions = BTreeSet::new();
    let end = tokio::time::Instant::now() + window;
    while let Ok(Some(item)) = tokio::time::timeout_at(end, stream.next()).await {
        if let Ok(obj) = item
            && obj.resource_version() != first.resource_version()
        {
            versions.insert(obj.resource_version());
        }
    }
    let events_after = event_writes(&events).await;
    let probes = probes(&op) - probes_before;
    let event_requests: u64 = events_after
        .iter()
        .map(|(name, n)| n - events_before.get(name).copied().unwrap_or(0))
        .sum();
    let status_and_label = u64::try_from(versions.len()).unwrap_or(u64::MAX);
    let periods = window.as_millis() as u64 / period.as_millis().max(1) as u64 + 1;
    println!(
        "flood over {window:?}: {probes} probes, {status_and_label} status/label writes, \
         {event_requests} event writes (budget: {periods} status writes + {} events)",
        periods * REASONS
    );
    assert!(
        probes >= 30,
        "the pool must be probed fast: {probes} probes"
    );
    // One status write per period, plus one transition at most (the window may catch a trial
    // that half-opens the breaker while a DbPool's label follows).
    assert!(
        status_and_label <= periods + 2,
        "{status_and_label} status and label writes in {window:?}"
    );
    assert!(
        event_requests <= periods * REASONS,
        "{event_requests} event writes in {window:?}"
    );
    drop(proxy);
    op.kill().await;
    ns.cleanup().await;
}

/// Probes the operator ran, from its own metrics.
fn probes(op: &RunningOperator) -> u64 {
    op.metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("dbpool_probes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
