//! Fixtures for the controller's unit tests (compiled only for tests).
//!
//! Lives here: a DbPool, a probe summary and fleet-guard settings that several modules' tests
//! share. Must not live here: anything a test asserts.

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp};

use super::FleetGuardSettings;
use crate::api::{DbPool, DbPoolSpec, ProbeOutcome, ProbeStage, ProbeSummary};

/// A DbPool `ns/name` with uid `uid-{name}`, generation 1 and no status.
pub(crate) fn pool(name: &str) -> DbPool {
    let spec: DbPoolSpec = serde_json::from_value(serde_json::json!({
        "database": {"host": "h", "dbname": "d", "user": "u"}
    }))
    .expect("spec");
    let mut pool = DbPool::new(name, spec);
    pool.metadata.namespace = Some("ns".into());
    pool.metadata.uid = Some(format!("uid-{name}"));
    pool.metadata.generation = Some(1);
    pool
}

/// A probe summary with this outcome at `at` (latency 1 ms, the saturation stage for a
/// success).
pub(crate) fn summary(outcome: ProbeOutcome, at: Timestamp) -> ProbeSummary {
    ProbeSummary {
        time: MicroTime(at),
        outcome,
        stage: (outcome == ProbeOutcome::Success).then_some(ProbeStage::Saturation),
        latency_ms: 1,
        message: None,
        sql_state: None,
        server_version: None,
        in_recovery: None,
        connections: None,
        max_connections: None,
    }
}

/// Fleet-guard settings that trip with three targets: enabled, share 0.5, window 30 s, max
/// hold 60 s.
pub(crate) fn fleet_settings() -> FleetGuardSettings {
    FleetGuardSettings {
        enabled: true,
        share: 0.5,
        min_targets: 3,
        window: std::time::Duration::from_secs(30),
        max_hold: std::time::Duration::from_secs(60),
    }
}
