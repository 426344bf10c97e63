//! The pool's side of the recovery engine: feeding it events and acting on its effects.
//!
//! Lives here: `Inner::event` (apply an event now, log the breaker's moves, purge on Open, start
//! the ramp on Closed or a recovery), the metrics of the engine's state, when the next attempt
//! is due, and the writes to the engine's state that are no event (a reset, a probe request
//! after a changed target, the DbPool opening the breaker). Must not live here: recovery rules
//! themselves (`dbpool-recovery`), or deciding which event happened (the callers); nothing
//! outside this module writes the engine's state.

use dbpool_recovery::{BreakerState, Effect, Event, PoolState, apply, next_deadline};
use jiff::Timestamp;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Inner, Shared};

impl Inner {
    /// Applies `event` to the engine now and acts on its effects.
    pub(super) fn event(&self, s: &mut Shared, event: Event) -> Vec<Effect> {
        let (next, effects) = apply(&s.engine, event, Timestamp::now(), &s.policy);
        s.engine = next;
        for effect in &effects {
            match effect {
                Effect::BreakerChanged { from, to } => {
                    info!(pool = %self.name, ?from, ?to, "circuit breaker changed");
                    if *to == BreakerState::Open {
                        self.purge(s, "breaker opened");
                    }
                    if *to == BreakerState::Closed {
                        s.ramp_started = Some(Instant::now());
                        s.recovered_at = s.ramp_started;
                    }
                }
                Effect::Recovered => {
                    info!(pool = %self.name, "recovered");
                    s.ramp_started = Some(Instant::now());
                    s.recovered_at = s.ramp_started;
                }
                Effect::CooldownStarted { until } => {
                    warn!(pool = %self.name, %until, "cooldown started")
                }
                _ => {}
            }
        }
        self.publish(s);
        effects
    }

    /// Sets the breaker and failure metrics from the engine's state.
    pub(super) fn publish(&self, s: &Shared) {
        if let Some(m) = &self.metrics {
            m.set_state(&self.name, s.engine.breaker, s.engine.consecutive_failures);
        }
    }

    /// When the supervisor will next connect (None: now, or in flight).
    pub(super) fn next_attempt(&self, s: &Shared) -> Option<Timestamp> {
        if s.probe_in_flight {
            return None;
        }
        next_deadline(&s.engine, &s.policy)
    }

    /// Forgets every failure: a fresh engine (same seed, next probe sequence, a probe
    /// requested), no suspicion, no last error.
    pub(super) fn reset_engine(&self, s: &mut Shared) {
        let seq = s.engine.probe_seq.wrapping_add(1);
        let mut fresh = PoolState::new(s.engine.seed);
        fresh.probe_seq = seq;
        fresh.probe_requested = true;
        s.engine = fresh;
        s.suspect = false;
        s.last_error = None;
        info!(pool = %self.name, "circuit breaker reset");
        self.publish(s);
    }

    /// Makes the supervisor probe at once, without an event (after the target changed).
    pub(super) fn request_probe(s: &mut Shared) {
        s.engine.probe_requested = true;
    }

    /// Opens a Closed breaker because the DbPool's breaker opened. The one place the client
    /// moves the breaker itself: the engine has no event for "someone else saw the outage".
    /// Same bookkeeping as the engine's Open.
    pub(super) fn open_for_dbpool(&self, s: &mut Shared) {
        if s.engine.breaker != BreakerState::Closed {
            return;
        }
        let now = Timestamp::now();
        s.engine.breaker = BreakerState::Open;
        s.engine.breaker_since = Some(now);
        s.engine.half_open_successes = 0;
        s.engine.open_count += 1;
        warn!(pool = %self.name, "DbPool breaker is Open: local breaker opened, idle connections purged");
    }
}
