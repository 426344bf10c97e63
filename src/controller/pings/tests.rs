//! Tests of the ping streams' rules: who waits for readiness, and the fair global budget.

use super::*;
use crate::{
    api::ProbeStage,
    recovery::{Event, FailureKind, apply},
};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp};

fn summary(outcome: ProbeOutcome, sql_state: Option<&str>) -> ProbeSummary {
    ProbeSummary {
        time: MicroTime(Timestamp::UNIX_EPOCH),
        outcome,
        stage: Some(ProbeStage::Connect),
        latency_ms: 1,
        message: None,
        sql_state: sql_state.map(str::to_owned),
        server_version: None,
        in_recovery: None,
        connections: None,
        max_connections: None,
    }
}

fn failed(kind: FailureKind) -> PoolState {
    let policy = Policy::default();
    let now = Timestamp::UNIX_EPOCH;
    let (s, _) = apply(&PoolState::new(1), Event::ProbeStarted, now, &policy);
    let seq = s.probe_seq;
    apply(&s, Event::ProbeFailed { seq, kind }, now, &policy).0
}

#[test]
fn only_outage_class_failures_wait_for_readiness() {
    let policy = Policy::default();
    let outage = failed(FailureKind::Outage);
    let transient = ProbeOutcome::TransientFailure;
    assert!(awaits_readiness(
        &summary(transient, None),
        &outage,
        &policy
    ));
    assert!(awaits_readiness(
        &summary(transient, Some("57P03")),
        &outage,
        &policy
    ));
    // Too many clients: the server accepts connections, the pool's trial would fail too.
    assert!(!awaits_readiness(
        &summary(transient, Some("53300")),
        &outage,
        &policy
    ));
    // A standby: not a readiness question.
    assert!(!awaits_readiness(
        &summary(ProbeOutcome::WrongRole, None),
        &outage,
        &policy
    ));
    let config = failed(FailureKind::Config);
    let config_summary = summary(ProbeOutcome::ConfigFailure, Some("28P01"));
    assert!(!awaits_readiness(&config_summary, &config, &policy));
    // Healthy pools, policies without early trials, ForcedOpen: never.
    let healthy = PoolState::new(1);
    assert!(!awaits_readiness(
        &summary(transient, None),
        &healthy,
        &policy
    ));
    for policy in [
        Policy {
            early_trial: false,
            ..Policy::default()
        },
        Policy {
            mode: BreakerMode::ForcedOpen,
            ..Policy::default()
        },
    ] {
        assert!(!awaits_readiness(
            &summary(transient, None),
            &outage,
            &policy
        ));
    }
}

#[tokio::test]
async fn the_budget_is_handed_out_in_turn_across_namespaces() {
    let rate = FairRate::new(50);
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    // Namespace "a" asks 6 times at once, "b" twice: b's grants come second and fourth.
    for (i, ns) in ["a", "a", "a", "a", "a", "a", "b", "b"]
        .into_iter()
        .enumerate()
    {
        let rate = Arc::clone(&rate);
        let order = Arc::clone(&order);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(i as u64)).await;
            assert!(rate.acquire(ns).await);
            lock(&order).push(ns);
        }));
    }
    let started = tokio::time::Instant::now();
    for task in tasks {
        task.await.expect("task");
    }
    let took = started.elapsed();
    let order = lock(&order).clone();
    let b_at: Vec<usize> = order
        .iter()
        .enumerate()
        .filter(|(_, ns)| **ns == "b")
        .map(|(i, _)| i)
        .collect();
    assert!(b_at.iter().all(|i| *i <= 4), "{order:?}");
    // 8 grants at 50/s: at least 7 periods of 20 ms.
    assert!(took >= Duration::from_millis(139), "{took:?}");
}

fn ping_to(port: u16) -> PingTarget {
    PingTarget {
        host: "127.0.0.1".into(),
        port,
        dbname: "app".into(),
        user: "app".into(),
        ssl_mode: crate::probe::SslMode::Disable,
        ca_pem: None,
        timeout: Duration::from_secs(1),
    }
}

fn pool_ref(namespace: &str, name: &str) -> PoolRef {
    kube::runtime::reflector::ObjectRef::new(name).within(namespace)
}

/// The sum of the `dbpool_readiness_pings_total` samples with `result`.
fn pings_with(metrics: &Metrics, result: &str) -> f64 {
    let prefix = format!("dbpool_readiness_pings_total{{result=\"{result}\"}}");
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn one_stream_per_target_pings_at_most_four_times_a_second() {
    let metrics = Arc::new(Metrics::new());
    let (pings, _edges) = Pings::new(200, Arc::clone(&metrics));
    // Nothing listens: every ping is refused at once, so only the period limits the rate.
    let port = dbpool_testkit::ports::free_port();
    let target = format!("127.0.0.1:{port}");
    for name in ["a", "b", "c"] {
        pings.watch(&target, &pool_ref("ns", name), ping_to(port));
    }
    let started = tokio::time::Instant::now();
    dbpool_testkit::wait::wait_until("5 pings", Duration::from_secs(5), || {
        let n = pings_with(&metrics, "Unreachable");
        async move { n >= 5.0 }
    })
    .await;
    // Three pools, one stream: 5 pings need at least 4 periods of 250 ms.
    assert!(
        started.elapsed() >= PING_PERIOD * 4,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(pings.pools_known(), 3);
    for name in ["a", "b", "c"] {
        pings.unwatch(&pool_ref("ns", name));
    }
    assert_eq!(pings.pools_known(), 0);
    assert!(lock(&pings.shared).streams.is_empty());
}

#[tokio::test]
async fn accepting_tells_every_waiting_pool_once_and_ends_the_stream() {
    use dbpool_testkit::hostile::{Behaviour, FakeServer};
    let metrics = Arc::new(Metrics::new());
    let (pings, mut edges) = Pings::new(200, Arc::clone(&metrics));
    // A server that asks for a password: it accepts connections (and receives none).
    let server = FakeServer::start(Behaviour::Cleartext).await;
    let target = format!("127.0.0.1:{}", server.port());
    let (a, b) = (pool_ref("ns1", "a"), pool_ref("ns2", "b"));
    pings.watch(&target, &a, ping_to(server.port()));
    pings.watch(&target, &b, ping_to(server.port()));
    let mut told = Vec::new();
    for _ in 0..2 {
        let pool = tokio::time::timeout(Duration::from_secs(5), edges.recv())
            .await
            .expect("an edge within 5s")
            .expect("channel open");
        told.push(pool);
    }
    told.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(told, [a.clone(), b.clone()]);
    let (edge_a, edge_b) = (pings.take_edge(&a), pings.take_edge(&b));
    assert!(
        edge_a.is_some() && edge_a == edge_b,
        "one edge, one instant"
    );
    assert_eq!(pings.take_edge(&a), None, "taken once");
    // Both pools are shown the target accepting, since the edge.
    let shown = pings.shown(&target, &ping_to(server.port()));
    assert_eq!(
        shown.map(|s| (s.state, Some(s.since))),
        Some((Readiness::Accepting, edge_a))
    );
    assert!(lock(&pings.shared).streams.is_empty());
    assert_eq!(pings_with(&metrics, "Accepting"), 1.0);
    let received = server.received_after(1).await;
    assert!(received.iter().all(|m| m.tag != b'p'), "{received:?}");
}
