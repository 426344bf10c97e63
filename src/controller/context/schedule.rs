//! A pool's scheduling model: when it acts next, as one value with one reason.
//!
//! Lives here: [`Plan`] (the pool's own word on its next action, on top of the engine's),
//! [`Next`] (the instant and [`Reason`] of the next action) and [`Wants`] (how fresh a result
//! someone else's probe made must be to answer for this pool). Pure: the caller passes `now`.
//! Must not live here: the engine's deadline rule (`dbpool-recovery`'s `next_due`), the shared
//! schedules themselves (`targets`, `sharing`).
//!
//! **The rules.**
//! 1. The engine's deadline and its reason are the base ([`recovery::next_due`]: the first
//!    probe, a requested probe, the interval, the backoff delay, the breaker's trial, the end of
//!    a cooldown, the next half-open trial); `None` there means now.
//! 2. One plan at a time adjusts it, with its own reason:
//!    - [`Plan::Engine`]: follow the engine;
//!    - [`Plan::At`]: act at exactly this instant — a steady pool's grid point on its probe
//!      stream, never after the engine's deadline ([`Reason::StreamGrid`], set after each
//!      result), or the next shared attempt of a target that is down, which will answer for
//!      this pool ([`Reason::TargetAttempt`], set when a due pool finds its target down);
//!    - [`Plan::NotBefore`]: the engine's deadline, but not before this instant — the first
//!      probe after a restart, spread over one interval ([`Reason::RestartSpread`]), or a probe
//!      asked for by a lost connection, not sooner than one initial delay after the last probe
//!      ([`Reason::LostConnection`]).
//! 3. Every trigger replaces the plan (a lost connection with its floor, any other with
//!    `Engine`); every result replaces it (`Engine`, then a grid point if one applies).
//!
//! Separately from when it acts, a pool that takes someone else's result ([`Wants`]) takes only
//! one that finished at or after the instant it first found itself due, or, for a probe its lost
//! connection asked for, after that request. Both are cleared by every result.

use k8s_openapi::jiff::Timestamp;

use crate::recovery::{self, Due, Policy, PoolState};

/// Why a pool acts when it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The engine's deadline, with the engine's reason.
    Engine(Due),
    /// A steady pool's grid point on its probe stream.
    StreamGrid,
    /// The next shared attempt of its target, which is down.
    TargetAttempt,
    /// The first probe after a restart, spread over one interval.
    RestartSpread,
    /// A probe its lost connection asked for, rate-limited.
    LostConnection,
}

/// The pool's own word on its next action (see the module's rules).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Follow the engine's deadline.
    #[default]
    Engine,
    /// Act at exactly this instant.
    At(Timestamp, Reason),
    /// The engine's deadline, but not before this instant.
    NotBefore(Timestamp, Reason),
}

/// When a pool acts next, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Next {
    /// The instant (at most `now` when due).
    pub at: Timestamp,
    /// Why then.
    pub why: Reason,
}

impl Plan {
    /// The next action of a pool in `state` under `policy` at `now`.
    pub fn next(&self, state: &PoolState, policy: &Policy, now: Timestamp) -> Next {
        let (deadline, due) = recovery::next_due(state, policy);
        let engine = Next {
            at: deadline.unwrap_or(now),
            why: Reason::Engine(due),
        };
        match *self {
            Plan::Engine => engine,
            Plan::At(at, why) => Next { at, why },
            Plan::NotBefore(at, why) if at > engine.at => Next { at, why },
            Plan::NotBefore(..) => engine,
        }
    }
}

/// How fresh someone else's result must be to answer for this pool (see the module comment).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Wants {
    /// The instant the pool first found itself due, while no result has come since.
    due_since: Option<Timestamp>,
    /// When its lost connection asked for a probe that has not run yet.
    requested_at: Option<Timestamp>,
    /// When the readiness edge that granted its early trial was seen (see `pings`).
    edge_at: Option<Timestamp>,
}

impl Wants {
    /// Notes a probe its lost connection asked for at `at` (the first request counts).
    pub fn requested(&mut self, at: Timestamp) {
        self.requested_at.get_or_insert(at);
    }

    /// Notes the instant of the readiness edge that granted the pool an early trial.
    pub fn edge(&mut self, at: Timestamp) {
        self.edge_at = Some(at);
    }

    /// The deadline a target's shared attempt must satisfy: the engine's, or for a pool due
    /// "now" (never probed) the instant it first became due, so a result finished after it
    /// satisfies it (else it would chase every new attempt).
    pub fn target_due(&mut self, engine: Option<Timestamp>, now: Timestamp) -> Timestamp {
        engine.unwrap_or_else(|| *self.due_since.get_or_insert(now))
    }

    /// The deadline a probe stream's result must satisfy: the instant the pool first found
    /// itself due (`deadline` the first time); for a requested probe, the request; for an
    /// early trial, the readiness edge (any result of the credential key from the edge on
    /// answers the trial: one credentialed trial per key per edge).
    pub fn stream_due(
        &mut self,
        deadline: Timestamp,
        (probe_requested, trial_requested): (bool, bool),
    ) -> Timestamp {
        let due = *self.due_since.get_or_insert(deadline);
        match (self.requested_at, self.edge_at) {
            (Some(at), _) if probe_requested => at,
            (_, Some(at)) if trial_requested && !probe_requested => at,
            _ => due,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::{Event, add, apply};

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("valid")
    }

    /// A pool probed successfully at t(0): the engine wants it again at t(30).
    fn steady() -> (PoolState, Policy) {
        let policy = Policy::default();
        let (state, _) = apply(&PoolState::new(1), Event::ProbeStarted, t(0), &policy);
        let seq = state.probe_seq;
        let event = Event::ProbeSucceeded {
            seq,
            degraded: false,
        };
        let (state, _) = apply(&state, event, t(0), &policy);
        (state, policy)
    }

    #[test]
    fn one_value_one_reason_for_every_plan() {
        let (state, policy) = steady();
        let engine = Next {
            at: add(t(0), policy.interval),
            why: Reason::Engine(Due::Interval),
        };
        let cases = [
            (Plan::Engine, engine),
            (
                Plan::At(t(12), Reason::StreamGrid),
                Next {
                    at: t(12),
                    why: Reason::StreamGrid,
                },
            ),
            (
                Plan::At(t(45), Reason::TargetAttempt),
                Next {
                    at: t(45),
                    why: Reason::TargetAttempt,
                },
            ),
            (
                Plan::NotBefore(t(40), Reason::RestartSpread),
                Next {
                    at: t(40),
                    why: Reason::RestartSpread,
                },
            ),
            // A floor before the engine's deadline changes nothing.
            (Plan::NotBefore(t(1), Reason::LostConnection), engine),
        ];
        for (plan, expected) in cases {
            assert_eq!(plan.next(&state, &policy, t(5)), expected, "{plan:?}");
        }
    }

    #[test]
    fn a_pool_never_probed_is_due_now_unless_its_floor_says_later() {
        let policy = Policy::default();
        let state = PoolState::new(1);
        let now = t(3);
        assert_eq!(
            Plan::Engine.next(&state, &policy, now),
            Next {
                at: now,
                why: Reason::Engine(Due::First)
            }
        );
        let spread = Plan::NotBefore(t(9), Reason::RestartSpread);
        assert_eq!(spread.next(&state, &policy, now).at, t(9));
    }

    #[test]
    fn a_shared_result_must_be_as_fresh_as_the_first_due_instant_or_the_request() {
        let mut wants = Wants::default();
        // Never probed: the first instant it found itself due sticks.
        assert_eq!(wants.target_due(None, t(1)), t(1));
        assert_eq!(wants.target_due(None, t(2)), t(1));
        assert_eq!(wants.target_due(Some(t(30)), t(2)), t(30));
        let mut wants = Wants::default();
        assert_eq!(wants.stream_due(t(30), (false, false)), t(30));
        assert_eq!(wants.stream_due(t(60), (false, false)), t(30));
        wants.requested(t(20));
        wants.requested(t(25));
        assert_eq!(wants.stream_due(t(60), (true, false)), t(20));
        assert_eq!(wants.stream_due(t(60), (false, false)), t(30));
        // An early trial: from the edge on.
        wants.edge(t(40));
        assert_eq!(wants.stream_due(t(60), (false, true)), t(40));
        assert_eq!(
            wants.stream_due(t(60), (true, true)),
            t(20),
            "a request wins"
        );
    }
}
