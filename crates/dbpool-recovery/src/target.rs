//! The shared connect schedule of one target (a `host:port`) while it is down.
//!
//! Lives here: [`shared_policy`] (the tightest schedule among the policies of a target's owners)
//! and [`TargetSchedule`] (the attempts made against the target and when the next one is due).
//! Pure: time is passed in. Must not live here: which pools own a target, or what a result
//! means for one pool (each pool's own [`apply`](crate::apply) decides that).
//!
//! While a target is down, connection attempts against it follow this one schedule instead of
//! one per pool: the first owner due at or after the next attempt makes it, and every owner
//! whose own deadline has passed takes the latest result instead of connecting again. Each
//! pool's counters still advance only at its own deadlines.

use std::time::Duration;

use jiff::Timestamp;

use crate::{Policy, add, backoff_delay};

/// The tightest schedule among `policies`: the shortest initial delay, growth and cap, the most
/// attempts before a cooldown and the shortest cooldown, the largest jitter. `None` without
/// owners. With one policy (or identical ones), the schedule is that policy's own.
pub fn shared_policy<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> Option<Policy> {
    policies.into_iter().copied().reduce(|a, b| Policy {
        interval: a.interval.min(b.interval),
        timeout: a.timeout.max(b.timeout),
        initial_delay: a.initial_delay.min(b.initial_delay),
        multiplier: a.multiplier.min(b.multiplier),
        max_delay: a.max_delay.min(b.max_delay),
        max_attempts: a.max_attempts.max(b.max_attempts),
        cooldown: a.cooldown.min(b.cooldown),
        jitter: a.jitter.max(b.jitter),
        ..a
    })
}

/// Attempts against one target since it was last reachable.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TargetSchedule {
    /// The seed of the target's jitter (from its key, stable across processes).
    pub seed: u64,
    /// Failed attempts in the current cycle.
    pub failures: u32,
    /// When the last failed attempt started.
    pub last_attempt_at: Option<Timestamp>,
    /// No attempt before this instant (a cooldown after `max_attempts` failures).
    pub cooldown_until: Option<Timestamp>,
}

impl TargetSchedule {
    /// A target not known to be down.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            ..Self::default()
        }
    }

    /// Whether the target is known to be down (its last attempt failed).
    pub fn is_down(&self) -> bool {
        self.last_attempt_at.is_some()
    }

    /// An attempt that started at `at` failed (the target is down).
    pub fn failed(&mut self, at: Timestamp, policy: &Policy) {
        if self.cooldown_until.is_some_and(|until| at >= until) {
            self.cooldown_until = None;
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        self.last_attempt_at = Some(at);
        if self.failures >= policy.max_attempts.max(1) {
            self.cooldown_until = Some(add(at, policy.cooldown));
        }
    }

    /// The target answered: no shared schedule until it fails again.
    pub fn reachable(&mut self) {
        *self = Self::new(self.seed);
    }

    /// When the next attempt is due; `None` when the target is not known to be down (owners
    /// probe on their own schedules).
    pub fn next_attempt(&self, policy: &Policy) -> Option<Timestamp> {
        let last = self.last_attempt_at?;
        if let Some(until) = self.cooldown_until {
            return Some(until.max(last));
        }
        let delay: Duration = backoff_delay(policy, self.seed, self.failures.saturating_sub(1));
        Some(add(last, delay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BreakerMode;
    use proptest::prelude::*;

    fn policy(initial_ms: u64, multiplier: f64, max_ms: u64, attempts: u32) -> Policy {
        Policy {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            initial_delay: Duration::from_millis(initial_ms),
            multiplier,
            max_delay: Duration::from_millis(max_ms),
            max_attempts: attempts,
            cooldown: Duration::from_secs(10),
            jitter: 0.0,
            failure_threshold: 5,
            open_timeout: Duration::from_secs(60),
            success_threshold: 1,
            mode: BreakerMode::Auto,
            early_trial: true,
        }
        .clamped()
    }

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_millisecond(1_700_000_000_000 + ms).expect("valid")
    }

    #[test]
    fn one_owner_gets_its_own_backoff_schedule() {
        let p = policy(100, 2.0, 1000, 4);
        let shared = shared_policy([&p]).expect("one owner");
        assert_eq!(shared, p);
        let mut s = TargetSchedule::new(7);
        assert_eq!(s.next_attempt(&shared), None);
        s.failed(t(0), &shared);
        assert_eq!(s.next_attempt(&shared), Some(t(100)));
        s.failed(t(100), &shared);
        assert_eq!(s.next_attempt(&shared), Some(t(300)));
        s.failed(t(300), &shared);
        assert_eq!(s.next_attempt(&shared), Some(t(700)));
        // The fourth failure starts the cooldown; the first attempt after it starts a new cycle.
        s.failed(t(700), &shared);
        assert_eq!(s.next_attempt(&shared), Some(t(10_700)));
        s.failed(t(10_700), &shared);
        assert_eq!(s.failures, 1);
        assert_eq!(s.next_attempt(&shared), Some(t(10_800)));
        s.reachable();
        assert_eq!(s.next_attempt(&shared), None);
        assert_eq!(s.seed, 7);
    }

    proptest! {
        /// Without jitter, every delay of the shared schedule is at most every owner's own delay
        /// after the same number of failures: no owner is probed later than it asked for.
        #[test]
        fn the_shared_schedule_is_never_later_than_any_owner(
            owners in prop::collection::vec((10u64..5_000, 1.0f64..4.0, 10u64..60_000, 1u32..12), 1..6),
            failures in 1u32..10,
        ) {
            let policies: Vec<Policy> = owners
                .iter()
                .map(|&(i, m, x, a)| policy(i, m, x, a))
                .collect();
            let shared = shared_policy(&policies).expect("owners");
            for p in &policies {
                for n in 0..failures.min(p.max_attempts.saturating_sub(1)) {
                    prop_assert!(backoff_delay(&shared, 1, n) <= backoff_delay(p, 1, n));
                }
                prop_assert!(shared.max_attempts >= p.max_attempts);
                prop_assert!(shared.cooldown <= p.cooldown);
            }
        }

        /// The next attempt never lies before the last one.
        #[test]
        fn the_next_attempt_follows_the_last(
            owner in (10u64..5_000, 1.0f64..4.0, 10u64..60_000, 1u32..12),
            gaps in prop::collection::vec(0i64..20_000, 1..20),
        ) {
            let p = policy(owner.0, owner.1, owner.2, owner.3);
            let mut s = TargetSchedule::new(3);
            let mut now = 0;
            for gap in gaps {
                now += gap;
                s.failed(t(now), &p);
                let next = s.next_attempt(&p).expect("down");
                prop_assert!(next >= t(now));
            }
        }
    }
}
