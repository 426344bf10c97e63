//! The recovery engine: reconnect backoff, circuit breaker and phase, as pure functions.
//!
//! Lives here: [`Policy`] (the spec's knobs, clamped), [`PoolState`] (one pool's recovery
//! memory), [`apply`] (event → new state + effects), [`next_deadline`] (and [`next_due`], the
//! same with its reason), [`phase`],
//! [`backoff_delay`], the shared connect schedule of a target that is down
//! ([`shared_policy`], [`TargetSchedule`]), the sharing of results among equivalent probes
//! of a healthy target ([`share_decision`]), the fleet guard's verdict ([`FleetGuard`]) and the
//! adaptive timeout of one kind of wait ([`RtoEstimator`], RFC 6298). Must not live here: I/O, async, the Kubernetes client, logging, or reading
//! the clock. Time is a [`Timestamp`](jiff::Timestamp) passed in by the caller, so
//! every rule is testable by replaying events at chosen instants.
//!
//! # Rules
//!
//! **Probe sequence.** `ProbeStarted` bumps `probe_seq`; the caller tags the probe with the new
//! value. A result whose `seq` differs is stale: state unchanged, effect `Ignored`. `ForceReopen`
//! and `SpecChanged` also bump `probe_seq`, so a probe in flight when they happen is dropped.
//!
//! **Backoff.** Delay `n` (from 0) of a cycle is `initial_delay × multiplier^n`, capped at
//! `max_delay`, then shortened by a fraction in `[0, jitter)` drawn from `(seed, n)` with
//! splitmix64 (so the cap is jittered too). After a failure `attempts += 1` and `current_backoff`
//! is delay `attempts − 1`; when `attempts` reaches `max_attempts` a cooldown starts instead
//! (`cooldown_until = now + cooldown`, `current_backoff = None`, effect `CooldownStarted`). The
//! first `ProbeStarted` at or after `cooldown_until` ends it (`attempts = 0`, effect
//! `CooldownEnded`) and the next failure starts a new cycle at `initial_delay`. There is no
//! terminal state. Decisions:
//! - A failure while a cooldown is in force (a requested probe) counts towards
//!   `consecutive_failures`, `outage_streak` and the breaker, but leaves `attempts`,
//!   `current_backoff` and `cooldown_until` alone: the pause is fixed.
//! - A failure arriving after `cooldown_until` (the cooldown elapsed during the probe) first ends
//!   the cooldown, then counts as failure 1 of a new cycle.
//! - A success or a force reopen that clears a cooldown also reports `CooldownEnded`.
//! - `SpecChanged` recomputes `current_backoff` under the new policy and shortens (never
//!   lengthens) a running cooldown to at most `now + cooldown`.
//!
//! **Breaker (mode Auto).** Closed → Open when `outage_streak >= failure_threshold`. Open →
//! HalfOpen at a `ProbeStarted` once `open_timeout` has passed since `breaker_since`. In HalfOpen
//! each success counts; at `success_threshold` the breaker closes. An outage failure in HalfOpen
//! reopens it; a config failure leaves it HalfOpen and keeps the successes counted so far. Every
//! change sets `breaker_since = now`, resets `half_open_successes` and reports `BreakerChanged`;
//! every entry into Open increments `open_count`. Decisions:
//! - A success while Open (a requested probe before `open_timeout`) resets the failure counters
//!   but does not close the breaker: the trial waits for `open_timeout`, as the API promises.
//! - Failures while Open do not restart `breaker_since`.
//! - `ForceReopen` moves Open → HalfOpen and restarts a HalfOpen trial, but leaves a Closed
//!   breaker Closed: there is nothing to reopen, and half-opening a working pool would let one
//!   failure open it.
//!
//! **Modes.** Before every event except a stale result and a readiness edge, the breaker is brought in line with the
//! mode: ForcedOpen holds it Open (probes go on, nothing closes it), Disabled holds it Closed
//! (failures still counted). In Auto, a Closed breaker whose streak already reaches the
//! threshold opens, and a HalfOpen one with enough successes closes (both only after a policy
//! change). So `SpecChanged` applies a mode change at once, with a `BreakerChanged` effect.
//!
//! **Fleet guard** ([`apply_guarded`], [`FleetGuard`]). When the caller says `hold_opening`, an
//! outage failure that would move a Closed breaker to Open leaves it Closed instead: the
//! failure is counted and backed off as usual, `held_since` is set and the first such failure
//! reports `OpeningHeld`. While held, the mode check does not open it either; the next outage
//! failure without the hold opens it, a success ends the hold, and any breaker change clears
//! it. HalfOpen → Open is never held: that breaker was open already.
//!
//! **Early trial** ([`Event::ReadinessAccepting`], `early` module). The caller sends the event
//! when readiness (a ping without credentials) goes from not accepting to accepting. It grants
//! one early trial (`trial_requested`, effect `EarlyTrialGranted`, the deadline becomes now) when
//! all of these hold: `policy.early_trial`; the mode is not ForcedOpen; the phase is Recovering,
//! CoolingDown, or BreakerOpen with the breaker Open; no probe is requested or granted already;
//! the schedule's own deadline has not come (else that probe goes ahead as it is); no early trial
//! was granted since the last scheduled probe started (`trial_since_scheduled`); and the last one
//! was granted at least [`trial_gap`] ago (the current backoff delay, at least `initial_delay`).
//! The next `ProbeStarted` is the trial if the grant still stands, no other probe was requested
//! and the schedule's deadline has still not come; it leaves a due cooldown and the breaker's
//! clock alone (no half-open move), and tags the probe (`trial_seq`). Decisions:
//! - A trial's failure counts towards `consecutive_failures`, `outage_streak` and the breaker
//!   (Closed opens at the threshold, with the fleet guard's hold as usual), but leaves
//!   `attempts`, `current_backoff`, `cooldown_until` and, while Open, `breaker_since` alone. Like
//!   any failure it sets `last_failure_at`, so the scheduled deadline after it is
//!   `last_failure_at + current_backoff` (or later while Open): a trial never brings the
//!   schedule forward.
//! - A trial's success while Open counts as a half-open success: Open → HalfOpen, then the
//!   success is counted (closing at `success_threshold`). Otherwise it is an ordinary success.
//! - With `early_trial` off or no `ReadinessAccepting` events, every rule above is inert: the
//!   schedule is the pure timers' (the property tests check both).
//! - Bound: each trial needs a scheduled probe before it and a trial never advances the
//!   schedule, so credentialed attempts stay at most twice the pure timers' (checked by a
//!   property test with readiness flapping at any rate). The trial fields are not stored in the
//!   status: after an operator restart at most one more trial can be granted.
//!
//! **Success.** `consecutive_failures = outage_streak = attempts = 0`, `current_backoff`,
//! `cooldown_until` and `last_failure` cleared, `degraded` set from the probe; effect `Recovered`
//! if there was at least one failure before it.
//!
//! **Deadline** ([`next_deadline`]; `None` = due now): `None` if never probed (`last_probe_at`
//! unset), a probe is requested or an early trial granted; else `cooldown_until` while cooling
//! down; else, while Open in Auto mode, the later of `breaker_since + open_timeout` and
//! `last_failure_at + current_backoff`; else, if the last probe failed, `last_failure_at +
//! current_backoff`; else, in HalfOpen, `last_probe_at + initial_delay`; else `last_probe_at +
//! interval`. Decisions: a
//! cooldown while Open in Auto mode also waits for `breaker_since + open_timeout`, so the probe
//! that ends the cooldown is the half-open trial; and every deadline is raised to at least
//! `last_probe_at`, so it can never point before the last result. While a probe is in flight the
//! deadline is not meaningful: the caller waits for the result.
//!
//! **Phase** ([`phase`]), first match wins: never probed → Pending; last failure Config (and
//! `consecutive_failures > 0`) → ConfigError; cooldown → CoolingDown; breaker Open or HalfOpen →
//! BreakerOpen; `outage_streak > 0` → Recovering; `degraded` → Degraded; else Healthy.
//!
//! **Policy.** [`Policy::clamped`] (which `dbpool-api` applies to every spec) clamps counts to at
//! least 1, durations to at least [`MIN_DURATION`], `max_delay` to at least `initial_delay`,
//! `multiplier` to `[1, 100]` and `jitter` to `[0, 1]`.
//!
//! **Purity is enforced by the compiler:** this crate's only dependencies are jiff (the same
//! version as k8s-openapi's, for [`Timestamp`](jiff::Timestamp)), serde and schemars (so the API
//! can put [`BreakerMode`], [`BreakerState`] and [`Phase`] into the CRD as they are). It cannot
//! name kube, k8s-openapi, tokio or tokio-postgres.

mod backoff;
mod early;
mod engine;
mod fleet;
mod policy;
mod rto;
mod share;
mod state;
mod target;
mod types;

pub use backoff::backoff_delay;
pub use early::trial_gap;
pub use engine::{Due, add, apply, apply_guarded, next_deadline, next_due, phase};
pub use fleet::{FLEET_ENTRY_TTL, FleetGuard, FleetGuardConfig, FleetVerdict, MAX_FLEET_ENTRIES};
pub use policy::{MAX_MULTIPLIER, MIN_DURATION, Policy};
pub use rto::{
    BACKOFF_CAP_FACTOR, MAX_BACKOFF_DOUBLINGS, RTO_FLOOR, RTO_GRANULARITY, RtoEstimator,
};
pub use share::{
    MAX_FRESHNESS, ShareDecision, StreamView, aligned_deadline, freshness, grid_offset, is_steady,
    share_decision,
};
pub use state::{Effect, Event, FailureKind, PoolState};
pub use target::{TargetSchedule, shared_policy};
pub use types::{BreakerMode, BreakerState, Phase};

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_early;
