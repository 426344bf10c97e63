//! The early trial: when readiness evidence says the database accepts connections again, one
//! credentialed attempt at once instead of waiting for the timers.
//!
//! Lives here: [`grant`] (the rule for [`Event::ReadinessAccepting`](crate::Event)),
//! [`starts_early`] (whether a starting probe is the granted trial rather than a scheduled one)
//! and [`trial_gap`]. Pure functions of the state, the policy and `now`. Must not live here: what a
//! trial's result does to the state (`engine`, which asks [`is_trial`]), and how readiness is
//! learned (`dbpool-probe`'s ping) or when pings run (the operator).

use std::time::Duration;

use jiff::Timestamp;

use super::engine::{add, phase, scheduled_deadline};
use super::policy::Policy;
use super::state::{Effect, PoolState};
use crate::{BreakerMode, BreakerState, Phase};

/// Whether readiness evidence may grant an early trial to a pool in this state: the pool is
/// Recovering, CoolingDown, or BreakerOpen with the breaker Open (not HalfOpen, whose probes are
/// at `initial_delay` anyway), early trials are on and the mode is not ForcedOpen.
fn eligible(s: &PoolState, policy: &Policy) -> bool {
    if !policy.early_trial || policy.mode == BreakerMode::ForcedOpen {
        return false;
    }
    match phase(s) {
        Phase::Recovering | Phase::CoolingDown => true,
        Phase::BreakerOpen => s.breaker == BreakerState::Open,
        Phase::Pending | Phase::Healthy | Phase::Degraded | Phase::ConfigError => false,
    }
}

/// The least time between two early trials: the current backoff delay, at least `initial_delay`.
pub fn trial_gap(s: &PoolState, policy: &Policy) -> Duration {
    s.current_backoff
        .unwrap_or(policy.initial_delay)
        .max(policy.initial_delay)
}

/// Applies [`Event::ReadinessAccepting`](crate::Event) at `now`: grants one early trial (a probe
/// due now, reported as [`Effect::EarlyTrialGranted`]) when the pool is eligible, no probe is
/// requested or due already, no early trial was granted since the last scheduled probe started,
/// and the last one was granted at least [`trial_gap`] ago. Otherwise nothing changes.
pub fn grant(s: &mut PoolState, now: Timestamp, policy: &Policy, fx: &mut Vec<Effect>) {
    if !eligible(s, policy) || s.trial_requested || s.probe_requested || s.trial_since_scheduled {
        return;
    }
    // The schedule's own probe is due: it goes ahead as it is, not as a trial.
    if scheduled_deadline(s, policy).is_none_or(|due| due <= now) {
        return;
    }
    if s.last_trial_at
        .is_some_and(|at| now < add(at, trial_gap(s, policy)))
    {
        return;
    }
    s.trial_requested = true;
    s.trial_since_scheduled = true;
    s.last_trial_at = Some(now);
    fx.push(Effect::EarlyTrialGranted);
}

/// Whether the probe starting at `now` is the granted early trial: one was granted, no other
/// probe was requested, and the schedule's own deadline has not come (else it is the scheduled
/// probe, counted as usual). Call before `ProbeStarted` changes the state.
pub fn starts_early(s: &PoolState, now: Timestamp, policy: &Policy) -> bool {
    s.trial_requested
        && !s.probe_requested
        && policy.early_trial
        && scheduled_deadline(s, policy).is_some_and(|due| due > now)
}

/// Whether the result tagged `seq` is that of an early trial.
pub fn is_trial(s: &PoolState, seq: u64) -> bool {
    s.trial_seq == Some(seq)
}
