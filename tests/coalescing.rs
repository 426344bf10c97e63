//! Coalescing per target (issue 14 item 1): K pools on one dead target make about the connect
//! attempts of a single pool, and each pool's own counters still advance.
//!
//! Two counting fake servers on loopback accept every connection, count it and close it at
//! once (a dead database behind a live port). One pool points at the first, ten at the second,
//! all with the same backoff (200ms, no growth, no jitter, breaker Disabled so only the backoff
//! schedules attempts). Over the same window, the ten may make at most 1.1× the single pool's
//! attempts (plus one for the window's edges).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use dbpool_operator::controller::RunningOperator;
use dbpool_testkit as support;
use support::{
    kube::{TestNamespace, install_crd},
    pools::{create, pool, status},
    wait::wait_until,
};
use tokio::net::TcpListener;

/// Pools on the shared dead target.
const K: usize = 10;

/// A listener on a free loopback port that accepts, counts and closes every connection.
async fn counting_server() -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let count = Arc::new(AtomicU64::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            drop(stream);
        }
    });
    (port, count)
}

fn spec(name: &str, port: u16) -> dbpool_operator::api::DbPool {
    pool(
        name,
        port,
        None,
        serde_json::json!({
            "healthCheck": { "interval": "2s", "timeout": "1s" },
            "backoff": { "initialDelay": "200ms", "maxDelay": "200ms", "multiplier": 1.0,
                         "maxAttempts": 1000, "jitter": 0.0 },
            "breaker": { "mode": "Disabled" },
        }),
    )
}

#[tokio::test]
async fn k_pools_on_one_dead_target_make_the_attempts_of_one() {
    let client = support::kube::client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client).await;
    let op = RunningOperator::start(client.clone(), ns.name());
    let (single_port, single) = counting_server().await;
    let (shared_port, shared) = counting_server().await;
    create(&client, ns.name(), &spec("single", single_port)).await;
    let names: Vec<String> = (0..K).map(|i| format!("shared-{i}")).collect();
    for name in &names {
        create(&client, ns.name(), &spec(name, shared_port)).await;
    }
    let failures = |name: String| {
        let client = client.clone();
        let ns = ns.name().to_owned();
        async move {
            status(&client, &ns, &name)
                .await
                .map_or(0, |s| s.consecutive_failures)
        }
    };
    wait_until(
        "every pool to count a failure",
        Duration::from_secs(30),
        || async {
            for name in names.iter().chain(std::iter::once(&"single".to_owned())) {
                if failures(name.clone()).await < 1 {
                    return false;
                }
            }
            true
        },
    )
    .await;

    // One window, both targets at once.
    let window = Duration::from_secs(8);
    let (single_before, shared_before) = (
        single.load(Ordering::Relaxed),
        shared.load(Ordering::Relaxed),
    );
    let mut counters_before = Vec::new();
    for name in &names {
        counters_before.push(failures(name.clone()).await);
    }
    let end = tokio::time::Instant::now() + window;
    // The window is measured, not waited on: poll the counters until it ends.
    wait_until(
        "the measuring window",
        window + Duration::from_secs(1),
        || async { tokio::time::Instant::now() >= end },
    )
    .await;
    let one = single.load(Ordering::Relaxed) - single_before;
    let k = shared.load(Ordering::Relaxed) - shared_before;
    let mut advanced = Vec::new();
    for (name, before) in names.iter().zip(&counters_before) {
        advanced.push(failures(name.clone()).await - before);
    }
    println!(
        "coalescing over {window:?}: 1 pool made {one} connect attempts, {K} pools on one target \
         made {k} ({:.2}x); each of the {K} pools' consecutiveFailures advanced by {advanced:?}",
        k as f64 / one.max(1) as f64
    );
    assert!(one >= 10, "the single pool keeps trying: {one}");
    assert!(
        k as f64 <= 1.1 * one as f64 + 1.0,
        "{K} pools made {k} attempts where one makes {one}"
    );
    // Every pool's counters advance at its own deadlines (written at most once per second).
    assert!(
        advanced.iter().all(|n| *n >= 3),
        "every pool counts its own failures: {advanced:?}"
    );
    op.kill().await;
    ns.cleanup().await;
}
