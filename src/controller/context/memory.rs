//! The recovery memory of one pool: what a reconcile works on.
//!
//! Lives here: [`PoolMemory`] (the engine state and what the pool's status and probes last said;
//! rebuilt from the status after a restart, with the first probes spread over an interval),
//! and when the next probe is due. Must not live here: the engine's rules (`dbpool-recovery`),
//! the status shape (`status`), the reconcile steps (`reconcile`).

use std::time::Duration;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Condition, jiff::Timestamp};
use kube::ResourceExt;

use super::schedule::{Next, Plan, Reason, Wants};
use crate::{
    api::{
        BREAKER_LABEL, BreakerState, CONDITION_BREAKER_OPEN, DbPool, DbPoolStatus,
        ForceReopenRecord, ProbeSummary, ReadinessStatus, reason,
    },
    controller::{names::stable_seed, status::restore_state},
    recovery::{self, Effect, Event, Policy, PoolState, add},
};

/// The recovery memory of one pool. The durable copy is the status; this is rebuilt from it.
#[derive(Clone)]
pub(crate) struct PoolMemory {
    pub uid: Option<String>,
    pub generation: Option<i64>,
    pub state: PoolState,
    pub last_probe: Option<ProbeSummary>,
    pub last_force_reopen: Option<ForceReopenRecord>,
    /// The maintenance hold acted on, as [`Hold::describe`](crate::api::Hold::describe) puts it.
    pub hold: Option<String>,
    /// The last status handed to the pool's writer (written, or waiting to be: the latest wins),
    /// or restored from the object: the process's only copy of the pool's status (the cache
    /// keeps none, see `projection`).
    pub last_written: Option<DbPoolStatus>,
    /// The conditions of a watched status that had no phase (nothing to restore from, but their
    /// transition times are kept); empty otherwise.
    pub prior_conditions: Vec<Condition>,
    pub last_written_at: Option<Timestamp>,
    /// The last breaker label handed to the writer.
    pub label_written: Option<String>,
    pub label_written_at: Option<Timestamp>,
    pub credentials_fingerprint: Option<String>,
    /// The pool's own word on its next action (see `schedule`).
    pub plan: Plan,
    /// The address of the last probe that logged in: the only address a gate may point at.
    pub gate_peer: Option<std::net::SocketAddr>,
    /// The gate Service this process last wrote for the pool (to remove it when undeclared).
    pub gate_applied: Option<String>,
    /// How fresh someone else's result must be to answer for this pool (see `schedule`).
    pub wants: Wants,
    /// The target's readiness shown in the status: set once the pool waits out an outage (see
    /// `pings`), kept after it.
    pub readiness: Option<ReadinessStatus>,
}

/// How far after a restart a restored pool's first probe waits: spread over one interval (or
/// the pool's own shorter pending delay) by its seed, so a fleet of pools does not hit the
/// databases at once.
fn restart_spread(state: &PoolState, policy: &Policy, seed: u64) -> Duration {
    let window = [
        Some(policy.interval),
        state.current_backoff,
        (state.breaker == BreakerState::Open).then_some(policy.open_timeout),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(policy.interval);
    let fraction = (seed % 10_000) as f64 / 10_000.0;
    window.mul_f64(fraction)
}

impl PoolMemory {
    /// A new memory: fresh for a new pool, rebuilt from `status` (the pool's status as the watch
    /// delivered it, see `projection`) after a restart.
    pub fn restore(
        pool: &DbPool,
        status: Option<&DbPoolStatus>,
        policy: &Policy,
        now: Timestamp,
    ) -> Self {
        let seed = stable_seed(pool);
        let fresh = Self {
            uid: pool.metadata.uid.clone(),
            generation: pool.metadata.generation,
            state: PoolState::new(seed),
            last_probe: None,
            last_force_reopen: status.and_then(|s| s.last_force_reopen.clone()),
            hold: None,
            last_written: None,
            prior_conditions: status.map(|s| s.conditions.clone()).unwrap_or_default(),
            last_written_at: None,
            label_written: None,
            label_written_at: None,
            credentials_fingerprint: None,
            plan: Plan::Engine,
            gate_peer: None,
            gate_applied: None,
            wants: Wants::default(),
            readiness: None,
        };
        let Some(status) = status.filter(|s| s.phase.is_some()) else {
            return fresh;
        };
        let mut state = restore_state(status, seed);
        // The status keeps consecutiveFailures, not the outage streak: configuration failures
        // followed by an outage restore a streak that can reach the threshold although the
        // previous leader's breaker stayed Closed. A Closed breaker that nobody held was below
        // its threshold, so the restored streak is too; else the new leader's first event opens
        // the breaker with no new failure (found by the chaos soak, issue #27, seed 907153).
        if state.breaker == BreakerState::Closed
            && state.held_since.is_none()
            && policy.mode == recovery::BreakerMode::Auto
        {
            let below = policy.failure_threshold.saturating_sub(1);
            state.outage_streak = state.outage_streak.min(below);
        }
        let spread = restart_spread(&state, policy, seed);
        Self {
            generation: status.observed_generation,
            state,
            last_probe: status.last_probe.clone(),
            last_force_reopen: status.last_force_reopen.clone(),
            // The hold a previous process acted on is in the BreakerOpen condition.
            hold: status
                .conditions
                .iter()
                .find(|c| c.type_ == CONDITION_BREAKER_OPEN && c.reason == reason::HELD)
                .map(|c| c.message.clone()),
            last_written: Some(status.clone()),
            prior_conditions: Vec::new(),
            // The stored lastProbe was written when that probe finished: a restart alone must not
            // make every pool refresh its status at once.
            last_written_at: status.last_probe.as_ref().map(|p| p.time.0),
            label_written: pool.labels().get(BREAKER_LABEL).cloned(),
            readiness: status.readiness.clone(),
            plan: Plan::NotBefore(add(now, spread), Reason::RestartSpread),
            ..fresh
        }
    }

    /// When the pool acts next, and why (see `schedule`).
    pub fn next(&self, policy: &Policy, now: Timestamp) -> Next {
        self.plan.next(&self.state, policy, now)
    }

    /// Feeds one event to the engine, collecting its effects.
    pub fn apply(
        &mut self,
        event: Event,
        now: Timestamp,
        policy: &Policy,
        effects: &mut Vec<Effect>,
    ) {
        self.apply_guarded(event, now, policy, false, effects);
    }

    /// [`PoolMemory::apply`] with the fleet guard's word on this event (see `fleet`).
    pub fn apply_guarded(
        &mut self,
        event: Event,
        now: Timestamp,
        policy: &Policy,
        hold_opening: bool,
        effects: &mut Vec<Effect>,
    ) {
        let (state, mut new_effects) =
            recovery::apply_guarded(&self.state, event, now, policy, hold_opening);
        self.state = state;
        effects.append(&mut new_effects);
    }

    /// The time until the next probe, as a requeue delay (at least 1 ms).
    pub fn requeue_after(&self, policy: &Policy) -> Duration {
        let now = Timestamp::now();
        let wait = now.duration_until(self.next(policy, now).at);
        Duration::try_from(wait)
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{apimachinery::pkg::apis::meta::v1::MicroTime, jiff::SignedDuration};

    use crate::{
        api::{BreakerStatus, Phase, ProbeOutcome},
        controller::testing,
    };

    fn pool_with_status(name: &str, status: Option<DbPoolStatus>) -> DbPool {
        let mut pool = testing::pool(name);
        pool.status = status;
        pool
    }

    fn healthy_status(at: Timestamp) -> DbPoolStatus {
        DbPoolStatus {
            observed_generation: Some(1),
            phase: Some(Phase::Healthy),
            breaker: Some(BreakerStatus {
                state: BreakerState::Closed,
                since: None,
                next_probe_at: None,
                open_count: 0,
                half_open_successes: 0,
            }),
            last_probe: Some(testing::summary(ProbeOutcome::Success, at)),
            last_success_time: Some(MicroTime(at)),
            ..DbPoolStatus::default()
        }
    }

    #[test]
    fn a_grid_point_before_the_engines_deadline_comes_first() {
        let now = Timestamp::now();
        let pool = pool_with_status("steady", Some(healthy_status(now)));
        let policy = pool.spec.policy();
        let mut memory = PoolMemory::restore(&pool, pool.status.as_ref(), &policy, now);
        assert!(matches!(
            memory.plan,
            Plan::NotBefore(_, Reason::RestartSpread)
        ));
        memory.plan = Plan::Engine;
        let engine = memory.next(&policy, now).at;
        assert_eq!(engine, add(now, policy.interval));
        let earlier = add(now, policy.interval / 2);
        memory.plan = Plan::At(earlier, Reason::StreamGrid);
        assert_eq!(memory.next(&policy, now).at, earlier);
    }

    /// Three authentication failures, then one outage: the status says Closed with 4 failures in
    /// a row. A new leader must not open the breaker before a failure of its own (the soak's
    /// false Open after a leader change); the next outage failure does open it.
    #[test]
    fn a_restored_closed_breaker_opens_only_on_a_new_failure() {
        let now = Timestamp::now();
        let mut status = healthy_status(now);
        status.phase = Some(Phase::Recovering);
        status.consecutive_failures = 6;
        status.last_probe = Some(testing::summary(ProbeOutcome::TransientFailure, now));
        let pool = pool_with_status("mixed", Some(status));
        let policy = pool.spec.policy();
        assert!(policy.failure_threshold < 6);
        let memory = PoolMemory::restore(&pool, pool.status.as_ref(), &policy, now);
        let (state, _) = recovery::apply(&memory.state, Event::ProbeStarted, now, &policy);
        assert_eq!(state.breaker, BreakerState::Closed);
        let failed = Event::ProbeFailed {
            seq: state.probe_seq,
            kind: recovery::FailureKind::Outage,
        };
        let (state, _) = recovery::apply(&state, failed, now, &policy);
        assert_eq!(state.breaker, BreakerState::Open);
    }

    #[test]
    fn a_new_pool_is_probed_at_once() {
        let now = Timestamp::now();
        let pool = pool_with_status("fresh", None);
        let policy = pool.spec.policy();
        let entry = PoolMemory::restore(&pool, pool.status.as_ref(), &policy, now);
        assert_eq!(entry.next(&policy, now).at, now);
    }

    #[test]
    fn first_probes_after_a_restart_spread_over_one_interval() {
        let now = Timestamp::now();
        // Every pool was last probed long ago: all are overdue at the restart.
        let long_ago = now
            .checked_sub(SignedDuration::from_hours(1))
            .expect("valid");
        let deadlines: Vec<Timestamp> = (0..200)
            .map(|i| {
                let pool = pool_with_status(&format!("pool-{i}"), Some(healthy_status(long_ago)));
                let policy = pool.spec.policy();
                PoolMemory::restore(&pool, pool.status.as_ref(), &policy, now)
                    .next(&policy, now)
                    .at
            })
            .collect();
        let interval = SignedDuration::from_secs(30);
        let offsets: Vec<f64> = deadlines
            .iter()
            .map(|d| d.duration_since(now).as_secs_f64())
            .collect();
        assert!(
            offsets
                .iter()
                .all(|o| *o >= 0.0 && *o <= interval.as_secs_f64()),
            "{offsets:?}"
        );
        // Spread, not clumped: every tenth of the interval gets some pools.
        for slot in 0..10 {
            let lo = f64::from(slot) * 3.0;
            let hits = offsets
                .iter()
                .filter(|o| **o >= lo && **o < lo + 3.0)
                .count();
            assert!(hits > 0, "no first probe in [{lo}s, {}s)", lo + 3.0);
        }
    }
}
