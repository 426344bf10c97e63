//! The data the engine works on: a pool's recovery state, the events that change it and the
//! effects a change reports.
//!
//! Lives here: plain data types only. Every field of [`PoolState`] is public because the
//! controller rebuilds the state from the resource's status after a restart. The rules that
//! change the state live in `engine`.

use jiff::Timestamp;
use std::time::Duration;

use crate::BreakerState;

/// What kind of failure a probe met. The caller maps `WrongRole` to `Outage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The database is unreachable or unusable: counts towards opening the breaker.
    Outage,
    /// A configuration mistake (credentials, database name, TLS, Secret): backs off, but never
    /// opens the breaker.
    Config,
}

/// Recovery state of one pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolState {
    /// Per-pool jitter seed.
    pub seed: u64,
    /// Circuit breaker state.
    pub breaker: BreakerState,
    /// When the breaker entered its current state (None: never changed).
    pub breaker_since: Option<Timestamp>,
    /// How many times the breaker has entered Open.
    pub open_count: u64,
    /// Successful probes since the breaker went HalfOpen.
    pub half_open_successes: u32,
    /// Failures in a row, outage and config alike; 0 after a success.
    pub consecutive_failures: u32,
    /// Outage failures in a row; config failures neither add to it nor reset it; 0 after a success.
    pub outage_streak: u32,
    /// Failures in the current backoff cycle.
    pub attempts: u32,
    /// Delay after the last failure, while retrying on the backoff schedule.
    pub current_backoff: Option<Duration>,
    /// End of the current cooldown.
    pub cooldown_until: Option<Timestamp>,
    /// When the last probe result (success or failure) arrived.
    pub last_probe_at: Option<Timestamp>,
    /// When a probe last succeeded.
    pub last_success_at: Option<Timestamp>,
    /// When a probe last failed.
    pub last_failure_at: Option<Timestamp>,
    /// Kind of the last failure, while the last probe failed; None after a success.
    pub last_failure: Option<FailureKind>,
    /// The last success reported saturation (the pool would not fit in the free slots).
    pub degraded: bool,
    /// Sequence number of the current probe; results carrying another number are stale.
    pub probe_seq: u64,
    /// A probe is wanted at once (force reopen, lost connection).
    pub probe_requested: bool,
    /// Since when the fleet guard holds the breaker Closed although the outage streak reached
    /// the threshold; None when not held. Ended by a success, by any breaker change, and by the
    /// next outage failure without the hold (which opens the breaker).
    pub held_since: Option<Timestamp>,
    /// An early trial was granted ([`Event::ReadinessAccepting`]) and has not started yet.
    pub trial_requested: bool,
    /// The sequence number of the probe in flight that is an early trial; None when the probe in
    /// flight (if any) is a scheduled one.
    pub trial_seq: Option<u64>,
    /// When the last early trial was granted.
    pub last_trial_at: Option<Timestamp>,
    /// An early trial was granted since the last scheduled probe started: the next one waits for
    /// the next scheduled probe. Not stored in the status; after an operator restart at most one
    /// more early trial can be granted.
    pub trial_since_scheduled: bool,
}

impl PoolState {
    /// A pool that was never probed: breaker closed, nothing counted, a probe due now.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            breaker: BreakerState::Closed,
            breaker_since: None,
            open_count: 0,
            half_open_successes: 0,
            consecutive_failures: 0,
            outage_streak: 0,
            attempts: 0,
            current_backoff: None,
            cooldown_until: None,
            last_probe_at: None,
            last_success_at: None,
            last_failure_at: None,
            last_failure: None,
            degraded: false,
            probe_seq: 0,
            probe_requested: false,
            held_since: None,
            trial_requested: false,
            trial_seq: None,
            last_trial_at: None,
            trial_since_scheduled: false,
        }
    }
}

/// Something that happened to a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The deadline was reached (or a probe was requested) and a probe is about to start; the
    /// caller tags it with `state.probe_seq` as it is after `apply`.
    ProbeStarted,
    /// The probe tagged `seq` succeeded; `degraded` if it reported saturation.
    ProbeSucceeded {
        /// The probe's sequence number.
        seq: u64,
        /// The pool would not fit into the server's free connection slots.
        degraded: bool,
    },
    /// The probe tagged `seq` failed.
    ProbeFailed {
        /// The probe's sequence number.
        seq: u64,
        /// Outage or configuration failure.
        kind: FailureKind,
    },
    /// A person asked for a reopen: drop the backoff cycle and cooldown and try at once.
    ForceReopen,
    /// Probe at once without resetting anything (e.g. the probe connection died).
    ProbeRequested,
    /// The spec changed: the in-flight probe is stale and the new policy applies.
    SpecChanged,
    /// Readiness went from not accepting to accepting: a readiness ping (no credentials) saw the
    /// server ask for authentication after refusals, timeouts or 57P03. May grant one early
    /// trial (see the crate docs, "Early trial").
    ReadinessAccepting,
}

/// A visible consequence of an event, for events, logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// The breaker changed state.
    BreakerChanged {
        /// State before.
        from: BreakerState,
        /// State after.
        to: BreakerState,
    },
    /// `max_attempts` failures in a row: no probes (unless requested) until `until`.
    CooldownStarted {
        /// End of the cooldown.
        until: Timestamp,
    },
    /// A cooldown ended (elapsed, or cleared by a success or a force reopen).
    CooldownEnded,
    /// The first success after at least one failure.
    Recovered,
    /// A force reopen was carried out.
    ForceReopened,
    /// A stale probe result (its sequence number is not the current one) was dropped.
    Ignored,
    /// The fleet guard kept a Closed breaker from opening: the start of a hold.
    OpeningHeld,
    /// Readiness turned to accepting and an early trial is due now (a credentialed attempt).
    EarlyTrialGranted,
}
