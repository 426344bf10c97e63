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
