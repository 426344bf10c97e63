//! Translating between the recovery engine's state and the DbPool status.
//!
//! Lives here: building the status a user sees from a [`PoolState`] and the last probe
//! ([`desired_status`]), the conditions with `lastTransitionTime` that moves only on a real change,
//! the "is this a visible change?" rule that keeps steady-state writes rare ([`needs_write`]), and
//! rebuilding a [`PoolState`] from a stored status after an operator restart ([`restore_state`]).
//! No I/O and no clock reads here: the caller passes `now`.

use std::time::Duration;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time},
    jiff::{SignedDuration, Timestamp},
};

use crate::{
    api::{
        BreakerMode, BreakerState, BreakerStatus, CONDITION_BREAKER_OPEN, CONDITION_DEGRADED,
        CONDITION_READY, CONDITION_RECONCILING, CONDITION_STALLED, DbPoolStatus, ForceReopenRecord,
        GoDuration, Hold, Phase, ProbeSummary, ReadinessStatus, reason,
    },
    recovery::{self, FailureKind, Policy, PoolState},
};

/// Everything besides the engine state that goes into a status.
pub struct StatusInputs<'a> {
    /// The leader term of this writer (None without leader election).
    pub writer_epoch: Option<i64>,
    /// metadata.generation of the object the status is for.
    pub generation: Option<i64>,
    /// The engine state.
    pub state: &'a PoolState,
    /// The policy derived from the spec.
    pub policy: &'a Policy,
    /// The last probe result, as shown to users.
    pub last_probe: Option<&'a ProbeSummary>,
    /// The last force reopen acted upon.
    pub last_force_reopen: Option<&'a ForceReopenRecord>,
    /// The maintenance hold in force (the policy's mode is then ForcedOpen).
    pub hold: Option<&'a Hold>,
    /// Conditions currently stored, so transition times survive when nothing changed.
    pub previous_conditions: &'a [Condition],
    /// The target's readiness as shown to this pool (see `pings`), if it waited out an outage.
    pub readiness: Option<&'a ReadinessStatus>,
    /// The `Gate` condition, when spec.gate is set (see `gate`).
    pub gate: Option<&'a Condition>,
}

/// The status that should be stored for these inputs at `now`.
pub fn desired_status(inputs: &StatusInputs<'_>, now: Timestamp) -> DbPoolStatus {
    let state = inputs.state;
    let phase = recovery::phase(state);
    let next_probe_at = if state.breaker == BreakerState::Open {
        recovery::next_deadline(state, inputs.policy).map(MicroTime)
    } else {
        None
    };
    let probe_message = inputs
        .last_probe
        .and_then(|p| p.message.clone())
        .unwrap_or_default();
    let (reconciling, stalled) = kstatus_conditions(phase, &probe_message);
    let conditions = [
        ready_condition(inputs, phase, &probe_message),
        degraded_condition(state, &probe_message),
        breaker_condition(inputs),
        reconciling,
        stalled,
    ]
    .into_iter()
    .chain(inputs.gate.cloned())
    .map(|mut c| {
        c.observed_generation = inputs.generation;
        merge_condition(c, inputs.previous_conditions, now)
    })
    .collect();

    DbPoolStatus {
        writer_epoch: inputs.writer_epoch,
        observed_generation: inputs.generation,
        phase: Some(phase),
        breaker: Some(BreakerStatus {
            state: state.breaker,
            since: state.breaker_since.map(MicroTime),
            next_probe_at,
            open_count: i64::try_from(state.open_count).unwrap_or(i64::MAX),
            half_open_successes: clamp_i32(state.half_open_successes),
        }),
        consecutive_failures: clamp_i32(state.consecutive_failures),
        recovery_attempts: clamp_i32(state.attempts),
        current_backoff: state.current_backoff.map(|d| GoDuration(d).to_string()),
        cooldown_until: state.cooldown_until.map(MicroTime),
        last_probe: inputs.last_probe.cloned(),
        last_success_time: state.last_success_at.map(MicroTime),
        last_failure_time: state.last_failure_at.map(MicroTime),
        readiness: inputs.readiness.cloned(),
        last_force_reopen: inputs.last_force_reopen.cloned(),
        conditions,
    }
}

/// The `Ready` condition of `phase`.
fn ready_condition(inputs: &StatusInputs<'_>, phase: Phase, probe_message: &str) -> Condition {
    let state = inputs.state;
    match phase {
        Phase::Healthy | Phase::Degraded => condition(
            CONDITION_READY,
            true,
            reason::PROBE_SUCCEEDED,
            "the database answered the last probe",
        ),
        Phase::Pending => {
            let mut c = condition(CONDITION_READY, false, reason::PENDING, "not probed yet");
            c.status = "Unknown".into();
            c
        }
        Phase::ConfigError => {
            condition(CONDITION_READY, false, reason::CONFIG_ERROR, probe_message)
        }
        Phase::BreakerOpen => condition(
            CONDITION_READY,
            false,
            reason::BREAKER_OPEN,
            &format!("circuit breaker is {:?}: {probe_message}", state.breaker),
        ),
        Phase::Recovering | Phase::CoolingDown if let Some(since) = state.held_since => condition(
            CONDITION_READY,
            false,
            reason::FLEET_SUSPECT,
            &format!(
                "failing, and held Closed by the fleet guard since {since}: most targets fail on \
             the network path at once (the operator's own network is suspect): {probe_message}"
            ),
        ),
        Phase::CoolingDown => condition(
            CONDITION_READY,
            false,
            reason::COOLING_DOWN,
            &format!(
                "{} attempts failed; next cycle after the cooldown: {probe_message}",
                inputs.policy.max_attempts
            ),
        ),
        Phase::Recovering => condition(CONDITION_READY, false, reason::RECOVERING, probe_message),
    }
}

/// The `Degraded` condition: failing, or a success that does not fit `pool.maxSize`.
fn degraded_condition(state: &PoolState, probe_message: &str) -> Condition {
    if state.consecutive_failures > 0 {
        condition(
            CONDITION_DEGRADED,
            true,
            reason::PROBE_FAILURES,
            &format!("{} consecutive failed probes", state.consecutive_failures),
        )
    } else if state.degraded {
        condition(
            CONDITION_DEGRADED,
            true,
            reason::POOL_DOES_NOT_FIT,
            probe_message,
        )
    } else {
        condition(
            CONDITION_DEGRADED,
            false,
            reason::AS_EXPECTED,
            "no failures",
        )
    }
}

/// The `BreakerOpen` condition, with the reason the breaker is where it is.
fn breaker_condition(inputs: &StatusInputs<'_>) -> Condition {
    let state = inputs.state;
    match (state.breaker, inputs.policy.mode) {
        (BreakerState::Open, BreakerMode::ForcedOpen) if let Some(hold) = inputs.hold => {
            condition(CONDITION_BREAKER_OPEN, true, reason::HELD, &hold.describe())
        }
        (BreakerState::Open, BreakerMode::ForcedOpen) => condition(
            CONDITION_BREAKER_OPEN,
            true,
            reason::FORCED_OPEN,
            "breaker.mode is ForcedOpen: held open, probes continue",
        ),
        (BreakerState::Open, _) => condition(
            CONDITION_BREAKER_OPEN,
            true,
            reason::FAILURE_THRESHOLD_REACHED,
            &format!(
                "{} consecutive outage failures; trial probe after {}",
                inputs.policy.failure_threshold,
                GoDuration(inputs.policy.open_timeout)
            ),
        ),
        (BreakerState::HalfOpen, _) => condition(
            CONDITION_BREAKER_OPEN,
            true,
            reason::HALF_OPEN,
            "trial probes decide whether the breaker closes",
        ),
        (BreakerState::Closed, _) if state.held_since.is_some() => condition(
            CONDITION_BREAKER_OPEN,
            false,
            reason::FLEET_SUSPECT,
            &format!(
                "{} or more consecutive outage failures, but the fleet guard holds the breaker \
             closed",
                inputs.policy.failure_threshold
            ),
        ),
        (BreakerState::Closed, _) => condition(
            CONDITION_BREAKER_OPEN,
            false,
            reason::CLOSED,
            "breaker is closed",
        ),
    }
}

/// The kstatus conditions (docs/kstatus.md): `Reconciling` is True while the pool was never
/// probed; `Stalled` is True in ConfigError, which only a change of spec, Secret or server fixes.
/// Outages are neither: the operator has applied the spec and keeps retrying on its own.
fn kstatus_conditions(phase: Phase, probe_message: &str) -> (Condition, Condition) {
    let reconciling = if phase == Phase::Pending {
        condition(
            CONDITION_RECONCILING,
            true,
            reason::PENDING,
            "not probed yet",
        )
    } else {
        condition(
            CONDITION_RECONCILING,
            false,
            reason::RECONCILED,
            "the current spec is applied",
        )
    };
    let stalled = if phase == Phase::ConfigError {
        condition(CONDITION_STALLED, true, reason::CONFIG_ERROR, probe_message)
    } else {
        condition(
            CONDITION_STALLED,
            false,
            reason::NOT_STALLED,
            "no configuration error",
        )
    };
    (reconciling, stalled)
}

fn clamp_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn condition(type_: &str, status: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
        observed_generation: None,
    }
}

/// Keeps the stored `lastTransitionTime` unless the condition's status really changed.
fn merge_condition(mut new: Condition, previous: &[Condition], now: Timestamp) -> Condition {
    new.last_transition_time = match previous.iter().find(|c| c.type_ == new.type_) {
        Some(old) if old.status == new.status => old.last_transition_time.clone(),
        _ => Time(now),
    };
    new
}

/// The status with the fields that change on every probe blanked out: what a user would notice.
fn visible(status: &DbPoolStatus) -> DbPoolStatus {
    let mut s = status.clone();
    // The writer's leader term fences stale writes; it alone is no reason to write (a failover
    // would otherwise rewrite every pool's status at once).
    s.writer_epoch = None;
    s.last_success_time = None;
    if let Some(p) = s.last_probe.as_mut() {
        p.time = MicroTime(Timestamp::UNIX_EPOCH);
        p.latency_ms = 0;
        p.connections = None;
    }
    s
}

/// Whether `desired` must be written, given what was last written and when.
///
/// Rule: write when anything visible changed (phase, breaker, counters, messages, conditions,
/// the target's readiness…); otherwise refresh the per-probe fields (lastProbe time and latency,
/// lastSuccessTime) at most once per `refresh`. A readiness change is visible but never urgent
/// on its own (`reconcile/outbox.rs`, `is_transition`): it goes with the pool's next write, or as
/// a counter-only write at most once per `--min-status-period`.
pub fn needs_write(
    desired: &DbPoolStatus,
    last_written: Option<&DbPoolStatus>,
    last_written_at: Option<Timestamp>,
    refresh: Duration,
    now: Timestamp,
) -> bool {
    let Some(last) = last_written else {
        return true;
    };
    if visible(desired) != visible(last) {
        return true;
    }
    if desired == last {
        return false;
    }
    match last_written_at {
        Some(at) => {
            now.duration_since(at)
                >= SignedDuration::try_from(refresh).unwrap_or(SignedDuration::MAX)
        }
        None => true,
    }
}

/// Rebuilds the engine state of a pool from its stored status (after an operator restart).
///
/// The breaker keeps its state and `since`; attempts, backoff and cooldown continue. The status
/// does not store the outage streak separately: it is taken to be `consecutiveFailures` when the
/// last failure was an outage, and 0 otherwise. A fleet-guard hold (Ready reason `FleetSuspect`)
/// is kept, from Ready's `lastTransitionTime`.
pub fn restore_state(status: &DbPoolStatus, seed: u64) -> PoolState {
    let mut state = PoolState::new(seed);
    let last_failure = status
        .last_probe
        .as_ref()
        .and_then(|p| p.outcome.failure_kind());
    let failures = u32::try_from(status.consecutive_failures.max(0)).unwrap_or(0);
    if let Some(b) = &status.breaker {
        state.breaker = b.state;
        state.breaker_since = b.since.as_ref().map(|t| t.0);
        state.open_count = u64::try_from(b.open_count.max(0)).unwrap_or(0);
        state.half_open_successes = u32::try_from(b.half_open_successes.max(0)).unwrap_or(0);
    }
    state.consecutive_failures = failures;
    state.outage_streak = if last_failure == Some(FailureKind::Outage) {
        failures
    } else {
        0
    };
    state.attempts = u32::try_from(status.recovery_attempts.max(0)).unwrap_or(0);
    state.current_backoff = status
        .current_backoff
        .as_deref()
        .and_then(|d| d.parse::<GoDuration>().ok())
        .map(|d| d.as_std());
    state.cooldown_until = status.cooldown_until.as_ref().map(|t| t.0);
    state.last_probe_at = status.last_probe.as_ref().map(|p| p.time.0);
    state.last_success_at = status.last_success_time.as_ref().map(|t| t.0);
    state.last_failure_at = status.last_failure_time.as_ref().map(|t| t.0);
    state.last_failure = if failures > 0 { last_failure } else { None };
    state.degraded = status.phase == Some(Phase::Degraded);
    // A breaker the previous process held stays held until a failure decides (else the first
    // event after a restart would open it unprobed). The hold is taken to have started when
    // Ready last changed, which is no later than the real start: `--fleet-guard-max-hold` can
    // only end it sooner.
    if state.breaker == BreakerState::Closed
        && let Some(ready) = status
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_READY && c.reason == reason::FLEET_SUSPECT)
    {
        state.held_since = Some(ready.last_transition_time.0);
    }
    state
}

#[cfg(test)]
mod tests;
