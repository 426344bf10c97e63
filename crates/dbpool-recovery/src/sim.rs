//! The hand-driven pool the engine's example tests share (compiled only for tests).
//!
//! Lives here: [`Sim`] (a pool's state, its policy and a clock the test advances), the policy
//! without jitter ([`exact`]) and small time helpers. Must not live here: any assertion.

use std::time::Duration;

use jiff::Timestamp;

use super::engine::add;
use super::*;

/// The seed of every simulated pool.
pub(crate) const SEED: u64 = 0x5EED;

/// The tests' epoch.
pub(crate) fn t0() -> Timestamp {
    Timestamp::from_second(1_800_000_000).expect("valid timestamp")
}

/// `s` seconds.
pub(crate) fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The default policy without jitter, so the schedule is exact (backoff 1, 2, 4 … 60 s, open
/// after 5, trial after 60 s).
pub(crate) fn exact() -> Policy {
    Policy {
        jitter: 0.0,
        ..Policy::default()
    }
}

/// A pool driven by hand: events at `now`, which tests advance.
pub(crate) struct Sim {
    pub state: PoolState,
    pub policy: Policy,
    pub now: Timestamp,
}

impl Sim {
    pub fn new(policy: Policy) -> Self {
        Self {
            state: PoolState::new(SEED),
            policy,
            now: t0(),
        }
    }

    pub fn apply(&mut self, event: Event) -> Vec<Effect> {
        let (state, fx) = apply(&self.state, event, self.now, &self.policy);
        self.state = state;
        fx
    }

    pub fn advance(&mut self, d: Duration) {
        self.now = add(self.now, d);
    }

    /// Moves `now` to the deadline (if it is later).
    pub fn wait(&mut self) {
        if let Some(d) = next_deadline(&self.state, &self.policy) {
            self.now = self.now.max(d);
        }
    }

    /// How long until the deadline (None: now).
    pub fn deadline_in(&self) -> Option<Duration> {
        next_deadline(&self.state, &self.policy)
            .map(|d| Duration::try_from(d.duration_since(self.now)).expect("deadline not past"))
    }
}
