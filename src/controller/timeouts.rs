//! Adaptive probe timeouts in the controller: one learner per target, shared by its pools.
//!
//! Lives here: [`Timeouts`] (per target, `host:port`, the probe's
//! [`AdaptiveTimeouts`]; which pool probes which target, so a deleted pool's target is forgotten
//! with its last pool) and [`Learned`] (the headline value a metric shows). Must not live here:
//! the estimator's arithmetic (`dbpool-recovery`'s `rto`), what a report teaches
//! (`dbpool-probe`'s `adaptive`), running the probe (`reconcile/decide.rs`).
//!
//! The learner keeps learning when a pool's spec turns `healthCheck.adaptiveTimeout` off; the
//! limits are then simply not applied to that pool's probes. A change of the switch or of
//! `healthCheck.timeout` (the ceiling) applies at the next probe.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use super::{
    names::{PerPool, PoolRef},
    sync::lock,
};
use crate::probe::{AdaptiveTimeouts, ProbeReport, StageTimeouts};

/// What a target's learner says in one number, for the metric: the longest stage timeout it
/// would apply (the most one stage may wait), and the smoothed latency of that stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Learned {
    /// The longest learned stage timeout, under the ceiling.
    pub timeout: Duration,
    /// The smoothed latency of that stage.
    pub srtt: Duration,
}

#[derive(Default)]
struct Inner {
    targets: HashMap<String, AdaptiveTimeouts>,
    /// The target each pool probed last.
    owners: HashMap<PoolRef, String>,
}

/// The learned timeouts of every target the controller probes.
#[derive(Default)]
pub(super) struct Timeouts {
    inner: Mutex<Inner>,
}

impl Timeouts {
    /// The stage limits for a probe of `pool` at `target` under `ceiling` (the spec's timeout):
    /// none when `enabled` is false or nothing is learned yet.
    pub fn limits(
        &self,
        pool: &PoolRef,
        target: &str,
        enabled: bool,
        ceiling: Duration,
    ) -> StageTimeouts {
        let mut inner = lock(&self.inner);
        inner.adopt(pool, target);
        match inner.targets.get(target) {
            Some(learned) if enabled => learned.timeouts(ceiling),
            _ => StageTimeouts::none(),
        }
    }

    /// Learns from a probe of `target`; the target's headline value after it.
    pub fn learn(
        &self,
        pool: &PoolRef,
        target: &str,
        report: &ProbeReport,
        ceiling: Duration,
    ) -> Option<Learned> {
        let mut inner = lock(&self.inner);
        inner.adopt(pool, target);
        let learned = inner.targets.entry(target.to_owned()).or_default();
        learned.learn(report);
        headline(learned, ceiling)
    }

    /// How many targets have a learner.
    #[cfg(test)]
    pub fn targets_known(&self) -> usize {
        lock(&self.inner).targets.len()
    }
}

impl Inner {
    /// Records that `pool` probes `target`, dropping its former target's learner when no other
    /// pool uses it.
    fn adopt(&mut self, pool: &PoolRef, target: &str) {
        let former = self.owners.insert(pool.clone(), target.to_owned());
        if let Some(former) = former.filter(|former| former != target) {
            self.release(&former);
        }
    }

    fn release(&mut self, target: &str) {
        if !self.owners.values().any(|t| t == target) {
            self.targets.remove(target);
        }
    }
}

/// The longest learned stage timeout of `learned` and its stage's smoothed latency.
fn headline(learned: &AdaptiveTimeouts, ceiling: Duration) -> Option<Learned> {
    learned
        .measured()
        .filter_map(|(_, estimator)| {
            Some(Learned {
                timeout: estimator.timeout(ceiling),
                srtt: estimator.srtt()?,
            })
        })
        .max_by_key(|l| l.timeout)
}

impl PerPool for Timeouts {
    fn forget(&self, pool: &PoolRef) {
        let mut inner = lock(&self.inner);
        if let Some(target) = inner.owners.remove(pool) {
            inner.release(&target);
        }
    }

    fn pools_known(&self) -> usize {
        lock(&self.inner).owners.len()
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::reflector::ObjectRef;

    use super::*;
    use crate::{
        api::DbPool,
        probe::{ProbeOutcome, ProbeStage},
    };

    fn pool(name: &str) -> PoolRef {
        ObjectRef::<DbPool>::new(name).within("ns")
    }

    fn ok(query_ms: u64) -> ProbeReport {
        ProbeReport {
            outcome: ProbeOutcome::Success,
            stage: ProbeStage::Query,
            latency: Duration::from_millis(query_ms),
            message: "ok".into(),
            sql_state: None,
            server_version: None,
            in_recovery: None,
            connections: None,
            max_connections: None,
            free_slots: None,
            pool_fits: None,
            fresh_connection: false,
            path_evidence: false,
            stage_latencies: vec![(ProbeStage::Query, Duration::from_millis(query_ms))],
            peer: None,
        }
    }

    #[test]
    fn learns_per_target_and_applies_only_when_enabled() {
        let timeouts = Timeouts::default();
        let ceiling = Duration::from_secs(5);
        assert_eq!(
            timeouts.limits(&pool("a"), "db:5432", true, ceiling),
            StageTimeouts::none()
        );
        let learned = timeouts.learn(&pool("a"), "db:5432", &ok(2), ceiling);
        assert_eq!(learned.map(|l| l.timeout), Some(Duration::from_millis(250)));
        let on = timeouts.limits(&pool("b"), "db:5432", true, ceiling);
        assert_eq!(on.get(ProbeStage::Query), Some(Duration::from_millis(250)));
        let off = timeouts.limits(&pool("b"), "db:5432", false, ceiling);
        assert_eq!(off, StageTimeouts::none());
    }

    #[test]
    fn the_last_pool_of_a_target_takes_its_learner_along() {
        let timeouts = Timeouts::default();
        let ceiling = Duration::from_secs(5);
        timeouts.learn(&pool("a"), "db:5432", &ok(2), ceiling);
        timeouts.learn(&pool("b"), "db:5432", &ok(2), ceiling);
        // b moves to another target: db's learner stays for a.
        timeouts.learn(&pool("b"), "other:5432", &ok(2), ceiling);
        assert_eq!(timeouts.targets_known(), 2);
        timeouts.forget(&pool("a"));
        assert_eq!(timeouts.targets_known(), 1);
        timeouts.forget(&pool("b"));
        assert_eq!((timeouts.targets_known(), timeouts.pools_known()), (0, 0));
    }
}
