//! One probe stream per credential key while the target is healthy (issue 14 item 1, second
//! half): K pools with the same Secret, target and interval make about the probes of one, each
//! still Healthy with its lastProbe advancing every interval; pools with other credentials on
//! the same server are not shared; and when the server stops every owner notices.
//!
//! The shared pools are created one after another, so their own schedules start at different
//! phases of the interval: they align on the stream's grid after one round.
//!
//! The count is the server's own: PostgreSQL logs every statement (`log_statement = all`) with
//! the session's application name in front (`log_line_prefix = '%a|'`), and the test counts the
//! role check (`SELECT pg_is_in_recovery()`, once per probe) per application name. The
//! application name is part of the credential key, so the shared pools use the default and each
//! unshared pool a name of its own.

use std::{collections::HashMap, time::Duration};

use dbpool_operator::{
    api::Phase,
    controller::{OperatorConfig, RunningOperator},
};
use dbpool_testkit as support;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use support::{
    kube::namespace_with_secret,
    pools::{create, pool, status},
    postgres::{APP_PASSWORD, PgServer},
    wait::wait_until,
};

/// Pools sharing one credential key.
const K: usize = 6;
/// Pools on the same server with a key of their own (another application name).
const SOLO: usize = 2;
/// The application name the shared pools keep (the default).
const SHARED_APP: &str = "dbpool-operator";
/// What the probe runs once per probe.
const ROLE_CHECK: &str = "statement: SELECT pg_is_in_recovery()";

fn spec(name: &str, port: u16, application_name: &str) -> dbpool_operator::api::DbPool {
    pool(
        name,
        port,
        Some(("db", "password")),
        serde_json::json!({
            "database": { "applicationName": application_name },
            "healthCheck": { "interval": "1s", "timeout": "500ms" },
        }),
    )
}

/// Role checks per application name in the server's log so far.
fn role_checks(pg: &PgServer) -> HashMap<String, u64> {
    let text = std::fs::read_to_string(pg.log_path()).unwrap_or_default();
    let mut counts = HashMap::new();
    for line in text.lines().filter(|l| l.contains(ROLE_CHECK)) {
        if let Some((app, _)) = line.split_once('|') {
            *counts.entry(app.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

/// The sum of the operator's samples of `family` for pool `name` in `ns`.
fn metric(op: &RunningOperator, family: &str, ns: &str, name: &str) -> u64 {
    let labels = format!("namespace=\"{ns}\",name=\"{name}\"");
    op.metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(&labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn k_healthy_pools_with_one_secret_share_one_probe_stream() {
    let mut pg = PgServer::options()
        .conf("log_statement = 'all'")
        .conf("log_line_prefix = '%a|'")
        .start()
        .await;
    let (client, ns) = namespace_with_secret("db", "password", APP_PASSWORD).await;
    // lastProbe refreshed every second, so the status shows each pool's results advancing.
    let op = RunningOperator::start_with(
        client.clone(),
        OperatorConfig {
            namespace: Some(ns.name().to_owned()),
            instance: format!("test-{}", ns.name()),
            status_refresh: Duration::from_secs(1),
            ..OperatorConfig::default()
        },
    );
    let shared: Vec<String> = (0..K).map(|i| format!("shared-{i}")).collect();
    let solo: Vec<String> = (0..SOLO).map(|i| format!("solo-{i}")).collect();
    let phase = |name: String| {
        let client = client.clone();
        let ns = ns.name().to_owned();
        async move { status(&client, &ns, &name).await.and_then(|s| s.phase) }
    };
    // One after another, each once the previous one is Healthy: their first probes (and so
    // their own schedules) lie at different phases of the interval, further apart than the
    // freshness tolerance, so only the stream's grid can align them.
    for name in &shared {
        create(&client, ns.name(), &spec(name, pg.port(), SHARED_APP)).await;
        wait_until(
            &format!("{name} Healthy"),
            Duration::from_secs(15),
            || async { phase(name.clone()).await == Some(Phase::Healthy) },
        )
        .await;
    }
    for name in &solo {
        create(&client, ns.name(), &spec(name, pg.port(), name)).await;
    }
    let all: Vec<String> = shared.iter().chain(&solo).cloned().collect();
    wait_until("every pool Healthy", Duration::from_secs(30), || async {
        for name in &all {
            if phase(name.clone()).await != Some(Phase::Healthy) {
                return false;
            }
        }
        true
    })
    .await;
    // After one round the owners align on the stream: every shared pool takes results.
    wait_until(
        "every shared pool to take a shared result",
        Duration::from_secs(20),
        || async {
            shared
                .iter()
                .all(|n| metric(&op, "dbpool_probe_results_shared_total", ns.name(), n) > 0)
        },
    )
    .await;

    let window = Duration::from_secs(8);
    let intervals = window.as_secs();
    let checks_before = role_checks(&pg);
    let results = |name: &String| {
        metric(&op, "dbpool_probes_total", ns.name(), name)
            + metric(&op, "dbpool_probe_results_shared_total", ns.name(), name)
    };
    let results_before: Vec<u64> = all.iter().map(results).collect();
    let real_before: u64 = shared
        .iter()
        .map(|n| metric(&op, "dbpool_probes_total", ns.name(), n))
        .sum();
    let end = tokio::time::Instant::now() + window;
    // The window is measured, not waited on: poll the clock until it ends.
    wait_until(
        "the measuring window",
        window + Duration::from_secs(1),
        || async { tokio::time::Instant::now() >= end },
    )
    .await;
    let checks_after = role_checks(&pg);
    let delta = |app: &str| {
        checks_after.get(app).copied().unwrap_or(0) - checks_before.get(app).copied().unwrap_or(0)
    };
    let stream = delta(SHARED_APP);
    let solos: Vec<u64> = solo.iter().map(|name| delta(name)).collect();
    let per_pool: Vec<u64> = all
        .iter()
        .zip(&results_before)
        .map(|(name, before)| results(name) - before)
        .collect();
    let real: u64 = shared
        .iter()
        .map(|n| metric(&op, "dbpool_probes_total", ns.name(), n))
        .sum::<u64>()
        - real_before;
    println!(
        "sharing over {window:?} (1s interval): the server saw {stream} probes from {K} pools \
         with one Secret ({real} real probes by the operator; unshared would be about {}), \
         {solos:?} from {SOLO} pools with keys of their own; results applied per pool \
         (shared pools first): {per_pool:?}",
        K as u64 * intervals
    );
    // One stream: about one probe per interval, far from K per interval.
    assert!(
        stream <= intervals * 3 / 2 + 2,
        "{stream} probes for {K} pools sharing one key in {intervals} intervals"
    );
    assert!(stream >= intervals / 2, "the stream probed {stream} times");
    // Different credentials are not shared: each solo pool probes on its own.
    for (name, count) in solo.iter().zip(&solos) {
        assert!(
            *count >= intervals / 2,
            "{name} probed {count} times in {intervals} intervals"
        );
    }
    // Every pool's results still advance about once per interval.
    for (name, count) in all.iter().zip(&per_pool) {
        assert!(
            *count >= intervals / 2,
            "{name} applied {count} results in {intervals} intervals"
        );
    }
    // ... and its status says Healthy with a recent lastProbe.
    let now = Timestamp::now();
    for name in &all {
        let s = status(&client, ns.name(), name).await.expect("status");
        assert_eq!(s.phase, Some(Phase::Healthy), "{name}");
        let last = s.last_probe.expect("lastProbe").time.0;
        assert!(
            now.duration_since(last) <= SignedDuration::from_secs(4),
            "{name}: lastProbe {last} is old at {now}"
        );
    }

    // The failure path: the server stops, every owner notices on its own schedule.
    let stopped = tokio::time::Instant::now();
    pg.stop().await;
    wait_until(
        "every pool to count a failure",
        Duration::from_secs(15),
        || async {
            for name in &all {
                let failures = status(&client, ns.name(), name)
                    .await
                    .map_or(0, |s| s.consecutive_failures);
                if failures < 1 {
                    return false;
                }
            }
            true
        },
    )
    .await;
    println!(
        "server stopped: every pool counted a failure within {:.1?}",
        stopped.elapsed()
    );
    ns.cleanup().await;
}
