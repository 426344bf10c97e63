//! Adaptive timeouts: what the probe and `open_session` take as each stage's timeout, and the
//! learning of those timeouts from the reports of one target.
//!
//! Lives here: [`StageTimeouts`] (the input: at most this long for each stage's wait, on top of
//! the whole probe's budget `ProbeTarget::timeout`), [`AdaptiveTimeouts`] (one
//! [`RtoEstimator`] per stage of one target, fed with [`ProbeReport`]s) and the rule for which
//! waits a report measures. Must not live here: the estimator's arithmetic
//! (`dbpool_recovery::RtoEstimator`), keeping one learner per target (the operator's
//! `controller/timeouts.rs`, the client's pool), or running the stages (`connect`, `checks`).
//!
//! Each stage is one wait (resolve, TCP connect, the SSLRequest answer, startup and
//! authentication, each query), so it is one round trip or a few, stable for a given server:
//! the estimator's "round trip". With TLS, the handshake and the login run in one wait, whose
//! timeout is the sum of the two stages' timeouts. A stage that completed is a sample; a stage
//! that timed out backs off every stage's estimator (RFC 6298 keeps one timer per connection:
//! a step in latency then costs a few timeouts in all, not a few per stage, which matters
//! because a probe meets the stages one after the other); any other failure (a refusal, an
//! error) says nothing about latency and is ignored.

use std::time::Duration;

use dbpool_recovery::RtoEstimator;

use crate::{ProbeReport, ProbeStage};

/// Every stage, in the order a fresh probe runs them.
pub const STAGES: [ProbeStage; 8] = ProbeStage::ALL;

fn index(stage: ProbeStage) -> usize {
    match stage {
        ProbeStage::Credentials => 0,
        ProbeStage::Resolve => 1,
        ProbeStage::Connect => 2,
        ProbeStage::Tls => 3,
        ProbeStage::Auth => 4,
        ProbeStage::Query => 5,
        ProbeStage::Role => 6,
        ProbeStage::Saturation => 7,
    }
}

/// The most each stage's wait may take (`None`: what is left of the probe's budget).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageTimeouts {
    limits: [Option<Duration>; 8],
}

impl StageTimeouts {
    /// No stage limits: every stage gets what is left of the budget (adaptive timeouts off).
    pub fn none() -> Self {
        Self::default()
    }

    /// The same, with `stage` limited to `limit`.
    pub fn with(mut self, stage: ProbeStage, limit: Duration) -> Self {
        self.limits[index(stage)] = Some(limit);
        self
    }

    /// The limit of `stage`, if any.
    pub fn get(&self, stage: ProbeStage) -> Option<Duration> {
        self.limits[index(stage)]
    }

    /// The limit of the startup wait: authentication, plus the TLS handshake when `tls` (they
    /// run in one wait).
    pub(crate) fn login(&self, tls: bool) -> Option<Duration> {
        let auth = self.get(ProbeStage::Auth)?;
        if !tls {
            return Some(auth);
        }
        Some(auth.saturating_add(self.get(ProbeStage::Tls)?))
    }
}

/// The learned timeouts of one target: one estimator per stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdaptiveTimeouts {
    stages: [RtoEstimator; 8],
}

impl AdaptiveTimeouts {
    /// Nothing learned yet: every stage's timeout is the ceiling.
    pub fn new() -> Self {
        Self::default()
    }

    /// Each stage's timeout under `ceiling` (the spec's `healthCheck.timeout`). Stages never
    /// measured get no limit (the whole budget, as without adaptive timeouts).
    pub fn timeouts(&self, ceiling: Duration) -> StageTimeouts {
        let mut out = StageTimeouts::none();
        for stage in STAGES {
            let estimator = &self.stages[index(stage)];
            if estimator.srtt().is_some() {
                out = out.with(stage, estimator.timeout(ceiling));
            }
        }
        out
    }

    /// Learns from one report: every stage that completed is a sample, a stage that timed out
    /// backs off. Returns whether a stage timed out.
    pub fn learn(&mut self, report: &ProbeReport) -> bool {
        let failed = (!report.is_success()).then_some(report.stage);
        let timed_out = report.path_evidence && report.message.contains("timed out");
        self.learn_stages(&report.stage_latencies, failed, timed_out)
    }

    /// Learns from the stages of one attempt (`open_session_within`'s): `failed` is the stage
    /// that failed, if any, and `timed_out` whether it failed by running out of time.
    pub fn learn_stages(
        &mut self,
        stages: &[(ProbeStage, Duration)],
        failed: Option<ProbeStage>,
        timed_out: bool,
    ) -> bool {
        let mut backed_off = false;
        for (i, (stage, took)) in stages.iter().enumerate() {
            let last = i + 1 == stages.len();
            if last && failed == Some(*stage) {
                backed_off = timed_out;
            } else {
                self.stages[index(*stage)].sample(*took);
            }
        }
        if backed_off {
            // A timeout says the path or the server got slower: every stage backs off, so a
            // step in latency costs a few timeouts in all, not a few per stage.
            for estimator in &mut self.stages {
                estimator.timed_out();
            }
        }
        backed_off
    }

    /// The estimator of `stage`.
    pub fn stage(&self, stage: ProbeStage) -> &RtoEstimator {
        &self.stages[index(stage)]
    }

    /// The stages measured so far, with their estimators.
    pub fn measured(&self) -> impl Iterator<Item = (ProbeStage, &RtoEstimator)> {
        STAGES
            .into_iter()
            .map(|stage| (stage, self.stage(stage)))
            .filter(|(_, e)| e.srtt().is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ProbeOutcome;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn report(outcome: ProbeOutcome, stages: &[(ProbeStage, u64)], message: &str) -> ProbeReport {
        ProbeReport {
            outcome,
            stage: stages.last().map_or(ProbeStage::Query, |(s, _)| *s),
            message: message.to_owned(),
            path_evidence: message.contains("timed out"),
            stage_latencies: stages.iter().map(|(s, v)| (*s, ms(*v))).collect(),
            latency: Duration::ZERO,
            sql_state: None,
            server_version: None,
            in_recovery: None,
            connections: None,
            max_connections: None,
            free_slots: None,
            pool_fits: None,
            fresh_connection: false,
            peer: None,
        }
    }

    #[test]
    fn learns_completed_stages_and_backs_off_the_one_that_timed_out() {
        let mut learned = AdaptiveTimeouts::new();
        assert_eq!(learned.timeouts(ms(5000)), StageTimeouts::none());
        let ok = report(
            ProbeOutcome::Success,
            &[
                (ProbeStage::Connect, 1),
                (ProbeStage::Auth, 4),
                (ProbeStage::Query, 1),
            ],
            "ok",
        );
        assert!(!learned.learn(&ok));
        let t = learned.timeouts(ms(5000));
        assert_eq!(t.get(ProbeStage::Query), Some(ms(250)));
        assert_eq!(t.get(ProbeStage::Role), None);
        let hung = report(
            ProbeOutcome::TransientFailure,
            &[(ProbeStage::Query, 250)],
            "SELECT 1 timed out (probe timeout 250ms)",
        );
        assert!(learned.learn(&hung));
        assert_eq!(
            learned.timeouts(ms(5000)).get(ProbeStage::Query),
            Some(ms(500))
        );
        // Every stage backed off with it.
        let t = learned.timeouts(ms(5000));
        assert_eq!(t.get(ProbeStage::Auth), Some(ms(500)));
        assert_eq!(t.get(ProbeStage::Connect), Some(ms(500)));
        // A refusal says nothing about latency.
        let refused = report(
            ProbeOutcome::TransientFailure,
            &[(ProbeStage::Connect, 0)],
            "connection refused",
        );
        assert!(!learned.learn(&refused));
        assert_eq!(learned.stage(ProbeStage::Connect).srtt(), Some(ms(1)));
    }

    #[test]
    fn the_login_wait_with_tls_gets_both_stages() {
        let t = StageTimeouts::none()
            .with(ProbeStage::Tls, ms(300))
            .with(ProbeStage::Auth, ms(400));
        assert_eq!(t.login(false), Some(ms(400)));
        assert_eq!(t.login(true), Some(ms(700)));
        assert_eq!(StageTimeouts::none().login(true), None);
    }
}
