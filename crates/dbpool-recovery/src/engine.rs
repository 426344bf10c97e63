//! The rules: how an event changes a pool's state, when the next probe is due, and which phase
//! the state shows.
//!
//! Lives here: [`apply`], [`next_deadline`] and [`phase`], pure functions of their arguments
//! (the module docs of `recovery` state the rules in prose). No clock, no I/O, no logging: the
//! caller passes `now` in and acts on the returned effects.

use jiff::Timestamp;
use std::time::Duration;

use super::backoff::backoff_delay;
use super::early;
use super::policy::Policy;
use super::state::{Effect, Event, FailureKind, PoolState};
use crate::{BreakerMode, BreakerState, Phase};

/// The state after `event` happened at `now` under `policy`, and what visibly changed.
///
/// A probe result whose `seq` is not `state.probe_seq` changes nothing and yields
/// `[Effect::Ignored]`. A readiness edge only grants an early trial or changes nothing. Any other
/// event first brings the breaker in line with the mode (see the module docs), then applies the
/// event's own rule.
pub fn apply(
    state: &PoolState,
    event: Event,
    now: Timestamp,
    policy: &Policy,
) -> (PoolState, Vec<Effect>) {
    apply_guarded(state, event, now, policy, false)
}

/// [`apply`], with the fleet guard's word on this event: `hold_opening` keeps a Closed breaker
/// from opening on this outage failure (see the module docs, "Fleet guard"). With `false` it is
/// [`apply`]; a breaker already held stays held until a failure without the hold opens it or a
/// success ends the hold.
pub fn apply_guarded(
    state: &PoolState,
    event: Event,
    now: Timestamp,
    policy: &Policy,
    hold_opening: bool,
) -> (PoolState, Vec<Effect>) {
    if let Event::ProbeSucceeded { seq, .. } | Event::ProbeFailed { seq, .. } = event
        && seq != state.probe_seq
    {
        return (state.clone(), vec![Effect::Ignored]);
    }
    let mut s = state.clone();
    let mut fx = Vec::new();
    if event == Event::ReadinessAccepting {
        // Evidence, not a probe: an edge that grants nothing changes nothing.
        early::grant(&mut s, now, policy, &mut fx);
        return (s, fx);
    }
    enforce_mode(&mut s, now, policy, &mut fx);
    match event {
        Event::ProbeStarted => on_start(&mut s, now, policy, &mut fx),
        Event::ProbeSucceeded { seq, degraded } => {
            let trial = early::is_trial(&s, seq);
            s.trial_seq = None;
            on_success(&mut s, degraded, trial, now, policy, &mut fx)
        }
        Event::ProbeFailed { seq, kind } => {
            let trial = early::is_trial(&s, seq);
            s.trial_seq = None;
            let failure = Failure {
                kind,
                trial,
                hold_opening,
            };
            on_failure(&mut s, failure, now, policy, &mut fx)
        }
        Event::ReadinessAccepting => {}
        Event::ForceReopen => {
            s.trial_requested = false;
            s.trial_seq = None;
            if s.cooldown_until.take().is_some() {
                fx.push(Effect::CooldownEnded);
            }
            s.attempts = 0;
            s.current_backoff = None;
            match (policy.mode, s.breaker) {
                (BreakerMode::Auto, BreakerState::Open) => {
                    transition(&mut s, BreakerState::HalfOpen, now, &mut fx);
                }
                (BreakerMode::Auto, BreakerState::HalfOpen) => {
                    // Restart the trial.
                    s.breaker_since = Some(now);
                    s.half_open_successes = 0;
                }
                _ => {}
            }
            s.probe_seq = s.probe_seq.wrapping_add(1);
            s.probe_requested = true;
            fx.push(Effect::ForceReopened);
        }
        Event::ProbeRequested => s.probe_requested = true,
        Event::SpecChanged => {
            s.probe_seq = s.probe_seq.wrapping_add(1);
            s.trial_seq = None;
            if !policy.early_trial || policy.mode == BreakerMode::ForcedOpen {
                s.trial_requested = false;
            }
            if s.current_backoff.is_some() && s.attempts > 0 {
                s.current_backoff = Some(backoff_delay(policy, s.seed, s.attempts - 1));
            }
            if let Some(until) = s.cooldown_until {
                s.cooldown_until = Some(until.min(add(now, policy.cooldown)));
            }
        }
    }
    (s, fx)
}

/// When the next probe is due; `None` means now.
///
/// See the module docs for the rules. The result is never before `last_probe_at`.
pub fn next_deadline(state: &PoolState, policy: &Policy) -> Option<Timestamp> {
    next_due(state, policy).0
}

/// Why the engine wants the next probe when it does (see [`next_due`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Never probed: now.
    First,
    /// A probe was requested (force reopen, lost connection, new Secret, spec change): now.
    Requested,
    /// An early trial was granted (the target accepts connections again): now.
    EarlyTrial,
    /// The health-check interval of a healthy pool.
    Interval,
    /// The backoff delay after a failure.
    Backoff,
    /// The breaker's trial after `openTimeout` (or the later backoff delay).
    Trial,
    /// The end of a cooldown.
    Cooldown,
    /// The next trial of a half-open breaker, one initial delay after the last.
    HalfOpenTrial,
}

/// When the next probe is due (`None`: now) and why: the one rule of [`next_deadline`], with
/// its reason. The deadline is never before `last_probe_at`.
pub fn next_due(state: &PoolState, policy: &Policy) -> (Option<Timestamp>, Due) {
    if state.probe_requested {
        return (None, Due::Requested);
    }
    if state.trial_requested {
        return (None, Due::EarlyTrial);
    }
    scheduled_due(state, policy)
}

/// The schedule's own deadline, ignoring requested probes and granted early trials; `None` if
/// never probed.
pub(crate) fn scheduled_deadline(state: &PoolState, policy: &Policy) -> Option<Timestamp> {
    scheduled_due(state, policy).0
}

/// [`scheduled_deadline`] with its reason.
fn scheduled_due(state: &PoolState, policy: &Policy) -> (Option<Timestamp>, Due) {
    let Some(last_probe) = state.last_probe_at else {
        return (None, Due::First);
    };
    let open_auto = state.breaker == BreakerState::Open && policy.mode == BreakerMode::Auto;
    let trial_at = state
        .breaker_since
        .map_or(last_probe, |since| add(since, policy.open_timeout));
    let (deadline, due) = if let Some(until) = state.cooldown_until {
        if open_auto {
            (until.max(trial_at), Due::Cooldown)
        } else {
            (until, Due::Cooldown)
        }
    } else if open_auto {
        match (state.last_failure_at, state.current_backoff) {
            (Some(at), Some(backoff)) => (trial_at.max(add(at, backoff)), Due::Trial),
            _ => (trial_at, Due::Trial),
        }
    } else if state.last_failure.is_some() {
        let backoff = state.current_backoff.unwrap_or(policy.initial_delay);
        let at = state
            .last_failure_at
            .map_or(last_probe, |at| add(at, backoff));
        (at, Due::Backoff)
    } else if state.breaker == BreakerState::HalfOpen {
        (add(last_probe, policy.initial_delay), Due::HalfOpenTrial)
    } else {
        (add(last_probe, policy.interval), Due::Interval)
    };
    (Some(deadline.max(last_probe)), due)
}

/// The phase the state shows, by the first rule that matches: Pending, ConfigError, CoolingDown,
/// BreakerOpen, Recovering, Degraded, Healthy (see the module docs).
pub fn phase(state: &PoolState) -> Phase {
    if state.last_probe_at.is_none() {
        Phase::Pending
    } else if state.last_failure == Some(FailureKind::Config) && state.consecutive_failures > 0 {
        Phase::ConfigError
    } else if state.cooldown_until.is_some() {
        Phase::CoolingDown
    } else if state.breaker != BreakerState::Closed {
        Phase::BreakerOpen
    } else if state.outage_streak > 0 {
        Phase::Recovering
    } else if state.degraded {
        Phase::Degraded
    } else {
        Phase::Healthy
    }
}

/// A probe starts: a new sequence number, the requests are served. A scheduled probe (anything
/// but the granted early trial) ends a cooldown that is due and half-opens a breaker whose
/// `open_timeout` has passed; an early trial leaves both alone.
fn on_start(s: &mut PoolState, now: Timestamp, policy: &Policy, fx: &mut Vec<Effect>) {
    let trial = early::starts_early(s, now, policy);
    s.probe_seq = s.probe_seq.wrapping_add(1);
    s.probe_requested = false;
    s.trial_requested = false;
    if trial {
        s.trial_seq = Some(s.probe_seq);
        return;
    }
    s.trial_seq = None;
    s.trial_since_scheduled = false;
    end_cooldown_if_due(s, now, fx);
    if policy.mode == BreakerMode::Auto
        && s.breaker == BreakerState::Open
        && s.breaker_since
            .is_none_or(|since| now >= add(since, policy.open_timeout))
    {
        transition(s, BreakerState::HalfOpen, now, fx);
    }
}

fn on_success(
    s: &mut PoolState,
    degraded: bool,
    trial: bool,
    now: Timestamp,
    policy: &Policy,
    fx: &mut Vec<Effect>,
) {
    // An early trial's success while Open counts as a half-open success.
    if trial && policy.mode == BreakerMode::Auto && s.breaker == BreakerState::Open {
        transition(s, BreakerState::HalfOpen, now, fx);
    }
    let had_failures = s.consecutive_failures > 0;
    if s.cooldown_until.take().is_some() {
        fx.push(Effect::CooldownEnded);
    }
    s.consecutive_failures = 0;
    s.outage_streak = 0;
    s.attempts = 0;
    s.current_backoff = None;
    s.last_failure = None;
    s.last_probe_at = Some(now);
    s.last_success_at = Some(now);
    s.degraded = degraded;
    s.held_since = None;
    if policy.mode == BreakerMode::Auto && s.breaker == BreakerState::HalfOpen {
        s.half_open_successes = s.half_open_successes.saturating_add(1);
        if s.half_open_successes >= policy.success_threshold {
            transition(s, BreakerState::Closed, now, fx);
        }
    }
    if had_failures {
        fx.push(Effect::Recovered);
    }
}

/// A failed probe's result, as the failure rule needs it.
struct Failure {
    /// Outage or configuration.
    kind: FailureKind,
    /// The probe was an early trial: the backoff cycle and the cooldown are left alone.
    trial: bool,
    /// The fleet guard's word: keep a Closed breaker from opening.
    hold_opening: bool,
}

fn on_failure(
    s: &mut PoolState,
    failure: Failure,
    now: Timestamp,
    policy: &Policy,
    fx: &mut Vec<Effect>,
) {
    let Failure {
        kind,
        trial,
        hold_opening,
    } = failure;
    // A cooldown that elapsed while the probe ran ends before this failure is counted, so the
    // failure opens a new cycle (an early trial leaves the cooldown to the next scheduled probe).
    if !trial {
        end_cooldown_if_due(s, now, fx);
    }
    s.consecutive_failures = s.consecutive_failures.saturating_add(1);
    if kind == FailureKind::Outage {
        s.outage_streak = s.outage_streak.saturating_add(1);
    }
    s.last_probe_at = Some(now);
    s.last_failure_at = Some(now);
    s.last_failure = Some(kind);
    // A failure during a cooldown (a requested probe) leaves the cycle alone: the pause is fixed.
    // So does an early trial's, whenever it happens.
    if s.cooldown_until.is_none() && !trial {
        s.attempts = s.attempts.saturating_add(1);
        if s.attempts >= policy.max_attempts {
            let until = add(now, policy.cooldown);
            s.cooldown_until = Some(until);
            s.current_backoff = None;
            fx.push(Effect::CooldownStarted { until });
        } else {
            s.current_backoff = Some(backoff_delay(policy, s.seed, s.attempts - 1));
        }
    }
    if policy.mode == BreakerMode::Auto && kind == FailureKind::Outage {
        let open = match s.breaker {
            BreakerState::Closed => s.outage_streak >= policy.failure_threshold,
            BreakerState::HalfOpen => true,
            BreakerState::Open => false,
        };
        if open && hold_opening && s.breaker == BreakerState::Closed {
            if s.held_since.is_none() {
                s.held_since = Some(now);
                fx.push(Effect::OpeningHeld);
            }
        } else if open {
            transition(s, BreakerState::Open, now, fx);
        }
    }
}

/// Brings the breaker in line with the policy: ForcedOpen holds it Open, Disabled holds it
/// Closed, and in Auto a Closed breaker whose outage streak already reaches the threshold (or a
/// HalfOpen one with enough successes) moves on. A no-op when state and policy agree.
fn enforce_mode(s: &mut PoolState, now: Timestamp, policy: &Policy, fx: &mut Vec<Effect>) {
    let target = match (policy.mode, s.breaker) {
        (BreakerMode::ForcedOpen, _) => BreakerState::Open,
        (BreakerMode::Disabled, _) => BreakerState::Closed,
        // A breaker the fleet guard holds waits for a failure to decide (or a success).
        (BreakerMode::Auto, BreakerState::Closed)
            if s.outage_streak >= policy.failure_threshold && s.held_since.is_none() =>
        {
            BreakerState::Open
        }
        (BreakerMode::Auto, BreakerState::HalfOpen)
            if s.half_open_successes >= policy.success_threshold =>
        {
            BreakerState::Closed
        }
        (BreakerMode::Auto, current) => current,
    };
    transition(s, target, now, fx);
}

fn end_cooldown_if_due(s: &mut PoolState, now: Timestamp, fx: &mut Vec<Effect>) {
    if s.cooldown_until.is_some_and(|until| now >= until) {
        s.cooldown_until = None;
        s.attempts = 0;
        s.current_backoff = None;
        fx.push(Effect::CooldownEnded);
    }
}

/// Moves the breaker to `to` (a no-op if it is there already), restarting its clock and trial
/// count; entering Open counts an opening.
fn transition(s: &mut PoolState, to: BreakerState, now: Timestamp, fx: &mut Vec<Effect>) {
    if s.breaker == to {
        return;
    }
    fx.push(Effect::BreakerChanged {
        from: s.breaker,
        to,
    });
    s.breaker = to;
    s.held_since = None;
    s.breaker_since = Some(now);
    s.half_open_successes = 0;
    if to == BreakerState::Open {
        s.open_count = s.open_count.saturating_add(1);
    }
}

/// `t + d`, saturating at the end of representable time.
pub fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.saturating_add(d).unwrap_or(Timestamp::MAX)
}
