//! From a spec to the recovery engine's [`Policy`], and from a probe report to the status's
//! [`ProbeSummary`].
//!
//! Lives here: the two conversions between the API's types and the kube-free crates' types
//! (so those crates never see the API). Must not live here: any rule about what the values mean;
//! [`Policy::clamped`] owns the ranges.

use dbpool_recovery::Policy;
use dbpool_vocab::ProbeReport;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

use crate::{DbPoolSpec, ProbeSummary};

impl DbPoolSpec {
    /// The recovery policy this spec asks for, clamped into the engine's ranges (negative counts
    /// become 1, zero durations the engine's floor, and so on: see [`Policy::clamped`]).
    pub fn policy(&self) -> Policy {
        let hc = &self.health_check;
        let b = &self.backoff;
        let br = &self.breaker;
        let count = |v: i32| u32::try_from(v).unwrap_or(0);
        Policy {
            interval: hc.interval.as_std(),
            timeout: hc.timeout.as_std(),
            initial_delay: b.initial_delay.as_std(),
            multiplier: b.multiplier,
            max_delay: b.max_delay.as_std(),
            max_attempts: count(b.max_attempts),
            cooldown: b.cooldown.as_std(),
            jitter: b.jitter,
            failure_threshold: count(br.failure_threshold),
            open_timeout: br.open_timeout.as_std(),
            success_threshold: count(br.success_threshold),
            mode: br.mode,
            early_trial: br.early_trial,
        }
        .clamped()
    }
}

impl ProbeSummary {
    /// A probe report as written to `status.lastProbe`, stamped with `time`.
    pub fn from_report(report: &ProbeReport, time: MicroTime) -> Self {
        Self {
            time,
            outcome: report.outcome,
            stage: Some(report.stage),
            latency_ms: i64::try_from(report.latency.as_millis()).unwrap_or(i64::MAX),
            message: Some(report.message.clone()),
            sql_state: report.sql_state.clone(),
            server_version: report.server_version.clone(),
            in_recovery: report.in_recovery,
            connections: report.connections,
            max_connections: report.max_connections,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use dbpool_recovery::MIN_DURATION;

    use super::*;
    use crate::GoDuration;

    fn minimal() -> DbPoolSpec {
        serde_json::from_value(serde_json::json!({
            "database": { "host": "db", "dbname": "orders", "user": "app" }
        }))
        .unwrap_or_else(|e| panic!("minimal spec: {e}"))
    }

    #[test]
    fn the_defaults_give_the_engine_defaults() {
        assert_eq!(minimal().policy(), Policy::default());
    }

    #[test]
    fn out_of_range_values_are_clamped() {
        let mut spec = minimal();
        spec.backoff.initial_delay = GoDuration::from_secs(5);
        spec.backoff.max_delay = GoDuration::from_secs(1);
        spec.backoff.max_attempts = -3;
        spec.backoff.multiplier = f64::NAN;
        spec.backoff.jitter = 7.0;
        spec.breaker.failure_threshold = 0;
        spec.breaker.success_threshold = i32::MIN;
        spec.health_check.interval = GoDuration(Duration::ZERO);
        let policy = spec.policy();
        assert_eq!(policy.max_attempts, 1);
        assert_eq!(policy.failure_threshold, 1);
        assert_eq!(policy.success_threshold, 1);
        assert_eq!(policy.multiplier, 1.0);
        assert_eq!(policy.jitter, 1.0);
        assert_eq!(policy.max_delay, Duration::from_secs(5));
        assert_eq!(policy.interval, MIN_DURATION);
    }
}
