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
        GoDuration, Hold, Phase, ProbeSummary, reason,
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

    let ready = match phase {
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
            condition(CONDITION_READY, false, reason::CONFIG_ERROR, &probe_message)
        }
        Phase::BreakerOpen => condition(
            CONDITION_READY,
            false,
            reason::BREAKER_OPEN,
            &format!("circuit breaker is {:?}: {probe_message}", state.breaker),
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
        Phase::Recovering => condition(CONDITION_READY, false, reason::RECOVERING, &probe_message),
    };
    let degraded = if state.consecutive_failures > 0 {
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
            &probe_message,
        )
    } else {
        condition(
            CONDITION_DEGRADED,
            false,
            reason::AS_EXPECTED,
            "no failures",
        )
    };
    let breaker = match (state.breaker, inputs.policy.mode) {
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
        (BreakerState::Closed, _) => condition(
            CONDITION_BREAKER_OPEN,
            false,
            reason::CLOSED,
            "breaker is closed",
        ),
    };
    let (reconciling, stalled) = kstatus_conditions(phase, &probe_message);
    let conditions = [ready, degraded, breaker, reconciling, stalled]
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
        last_force_reopen: inputs.last_force_reopen.cloned(),
        conditions,
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
/// Rule: write when anything visible changed (phase, breaker, counters, messages, conditions…);
/// otherwise refresh the per-probe fields (lastProbe time and latency, lastSuccessTime) at most
/// once per `refresh`.
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
/// last failure was an outage, and 0 otherwise.
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
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{DbPoolSpec, ProbeOutcome, ProbeStage};

    fn policy() -> Policy {
        let spec: DbPoolSpec = serde_json::from_value(serde_json::json!({
            "database": {"host": "h", "dbname": "d", "user": "u"}
        }))
        .expect("spec");
        spec.policy()
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("valid")
    }

    fn probe(outcome: ProbeOutcome, secs: i64, latency: i64) -> ProbeSummary {
        ProbeSummary {
            time: MicroTime(at(secs)),
            outcome,
            stage: Some(ProbeStage::Saturation),
            latency_ms: latency,
            message: Some("ok".into()),
            sql_state: None,
            server_version: Some("15.18".into()),
            in_recovery: Some(false),
            connections: Some(3),
            max_connections: Some(97),
        }
    }

    fn healthy_state(secs: i64) -> PoolState {
        let mut s = PoolState::new(7);
        s.last_probe_at = Some(at(secs));
        s.last_success_at = Some(at(secs));
        s
    }

    #[test]
    fn steady_state_probes_are_not_written_until_the_refresh() {
        let policy = policy();
        let first_state = healthy_state(0);
        let first_probe = probe(ProbeOutcome::Success, 0, 2);
        let first = desired_status(
            &StatusInputs {
                writer_epoch: None,
                generation: Some(1),
                state: &first_state,
                policy: &policy,
                last_probe: Some(&first_probe),
                last_force_reopen: None,
                hold: None,
                previous_conditions: &[],
                gate: None,
            },
            at(0),
        );
        assert_eq!(first.phase, Some(Phase::Healthy));
        let refresh = Duration::from_secs(300);
        assert!(needs_write(&first, None, None, refresh, at(0)));

        let later_state = healthy_state(30);
        let later_probe = probe(ProbeOutcome::Success, 30, 5);
        let later = desired_status(
            &StatusInputs {
                writer_epoch: None,
                generation: Some(1),
                state: &later_state,
                policy: &policy,
                last_probe: Some(&later_probe),
                last_force_reopen: None,
                hold: None,
                previous_conditions: &first.conditions,
                gate: None,
            },
            at(30),
        );
        assert_ne!(later, first, "time and latency moved");
        assert!(!needs_write(
            &later,
            Some(&first),
            Some(at(0)),
            refresh,
            at(30)
        ));
        assert!(needs_write(
            &later,
            Some(&first),
            Some(at(0)),
            refresh,
            at(300)
        ));
        // Transition times did not move: nothing changed status.
        assert_eq!(later.conditions, first.conditions);
    }

    #[test]
    fn a_failure_is_a_visible_change_and_moves_transition_times() {
        let policy = policy();
        let ok_state = healthy_state(0);
        let ok_probe = probe(ProbeOutcome::Success, 0, 2);
        let ok = desired_status(
            &StatusInputs {
                writer_epoch: None,
                generation: Some(1),
                state: &ok_state,
                policy: &policy,
                last_probe: Some(&ok_probe),
                last_force_reopen: None,
                hold: None,
                previous_conditions: &[],
                gate: None,
            },
            at(0),
        );
        let mut failed_state = ok_state.clone();
        failed_state.consecutive_failures = 1;
        failed_state.outage_streak = 1;
        failed_state.attempts = 1;
        failed_state.last_failure = Some(FailureKind::Outage);
        failed_state.last_failure_at = Some(at(30));
        failed_state.last_probe_at = Some(at(30));
        failed_state.current_backoff = Some(Duration::from_secs(1));
        let failed_probe = probe(ProbeOutcome::TransientFailure, 30, 1);
        let failed = desired_status(
            &StatusInputs {
                writer_epoch: None,
                generation: Some(1),
                state: &failed_state,
                policy: &policy,
                last_probe: Some(&failed_probe),
                last_force_reopen: None,
                hold: None,
                previous_conditions: &ok.conditions,
                gate: None,
            },
            at(30),
        );
        assert_eq!(failed.phase, Some(Phase::Recovering));
        assert!(needs_write(
            &failed,
            Some(&ok),
            Some(at(0)),
            Duration::from_secs(300),
            at(30)
        ));
        let ready = failed
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_READY)
            .expect("ready");
        assert_eq!(ready.status, "False");
        assert_eq!(ready.last_transition_time, Time(at(30)));
        let breaker = failed
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_BREAKER_OPEN)
            .expect("breaker condition");
        assert_eq!(
            breaker.last_transition_time,
            Time(at(0)),
            "breaker condition did not change"
        );
    }

    #[test]
    fn restore_keeps_an_open_breaker_and_its_since() {
        let policy = policy();
        let mut state = PoolState::new(3);
        state.breaker = BreakerState::Open;
        state.breaker_since = Some(at(100));
        state.open_count = 2;
        state.consecutive_failures = 6;
        state.outage_streak = 6;
        state.attempts = 6;
        state.current_backoff = Some(Duration::from_secs(32));
        state.last_failure = Some(FailureKind::Outage);
        state.last_failure_at = Some(at(100));
        state.last_probe_at = Some(at(100));
        let summary = probe(ProbeOutcome::TransientFailure, 100, 1);
        let status = desired_status(
            &StatusInputs {
                writer_epoch: None,
                generation: Some(4),
                state: &state,
                policy: &policy,
                last_probe: Some(&summary),
                last_force_reopen: None,
                hold: None,
                previous_conditions: &[],
                gate: None,
            },
            at(100),
        );
        let json = serde_json::to_value(&status).expect("json");
        let stored: DbPoolStatus = serde_json::from_value(json).expect("back");
        let restored = restore_state(&stored, 3);
        assert_eq!(restored, state);
        assert_eq!(
            recovery::next_deadline(&restored, &policy),
            recovery::next_deadline(&state, &policy)
        );
    }

    fn find<'a>(status: &'a DbPoolStatus, type_: &str) -> &'a Condition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_} condition in {:?}", status.conditions))
    }

    #[test]
    fn kstatus_conditions_follow_pending_config_error_and_recovery() {
        let policy = policy();
        let status_of = |state: &PoolState, probe: Option<&ProbeSummary>, prev: &[Condition], t| {
            desired_status(
                &StatusInputs {
                    writer_epoch: None,
                    generation: Some(1),
                    state,
                    policy: &policy,
                    last_probe: probe,
                    last_force_reopen: None,
                    hold: None,
                    previous_conditions: prev,
                    gate: None,
                },
                at(t),
            )
        };
        // Pending: Reconciling=True, Stalled=False.
        let fresh = PoolState::new(1);
        let pending = status_of(&fresh, None, &[], 0);
        assert_eq!(pending.phase, Some(Phase::Pending));
        let r = find(&pending, CONDITION_RECONCILING);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("True", reason::PENDING)
        );
        let st = find(&pending, CONDITION_STALLED);
        assert_eq!(
            (st.status.as_str(), st.reason.as_str()),
            ("False", reason::NOT_STALLED)
        );

        // ConfigError: Stalled=True with the reason and the probe's message; Reconciling=False.
        let mut bad = fresh.clone();
        bad.consecutive_failures = 1;
        bad.attempts = 1;
        bad.last_failure = Some(FailureKind::Config);
        bad.last_failure_at = Some(at(10));
        bad.last_probe_at = Some(at(10));
        let mut bad_probe = probe(ProbeOutcome::ConfigFailure, 10, 1);
        bad_probe.message = Some("password authentication failed (28P01)".into());
        let config_error = status_of(&bad, Some(&bad_probe), &pending.conditions, 10);
        assert_eq!(config_error.phase, Some(Phase::ConfigError));
        let st = find(&config_error, CONDITION_STALLED);
        assert_eq!(
            (st.status.as_str(), st.reason.as_str(), st.message.as_str()),
            (
                "True",
                reason::CONFIG_ERROR,
                "password authentication failed (28P01)"
            )
        );
        assert_eq!(st.last_transition_time, Time(at(10)));
        let r = find(&config_error, CONDITION_RECONCILING);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", reason::RECONCILED)
        );
        assert_eq!(r.last_transition_time, Time(at(10)));

        // Still ConfigError later: transition times stay.
        let again = status_of(&bad, Some(&bad_probe), &config_error.conditions, 40);
        assert_eq!(
            find(&again, CONDITION_STALLED).last_transition_time,
            Time(at(10))
        );

        // Fixed: Stalled=False from now, Reconciling stays False since 10.
        let ok = healthy_state(70);
        let ok_probe = probe(ProbeOutcome::Success, 70, 1);
        let healthy = status_of(&ok, Some(&ok_probe), &again.conditions, 70);
        assert_eq!(healthy.phase, Some(Phase::Healthy));
        let st = find(&healthy, CONDITION_STALLED);
        assert_eq!(
            (st.status.as_str(), st.last_transition_time.clone()),
            ("False", Time(at(70)))
        );
        let r = find(&healthy, CONDITION_RECONCILING);
        assert_eq!(
            (r.status.as_str(), r.last_transition_time.clone()),
            ("False", Time(at(10)))
        );
    }

    #[test]
    fn outages_are_neither_reconciling_nor_stalled() {
        let policy = policy();
        let mut state = healthy_state(0);
        state.breaker = BreakerState::Open;
        state.breaker_since = Some(at(0));
        state.consecutive_failures = 5;
        state.outage_streak = 5;
        state.last_failure = Some(FailureKind::Outage);
        state.last_failure_at = Some(at(0));
        let summary = probe(ProbeOutcome::TransientFailure, 0, 1);
        let status = desired_status(
            &StatusInputs {
                writer_epoch: None,
                generation: Some(1),
                state: &state,
                policy: &policy,
                last_probe: Some(&summary),
                last_force_reopen: None,
                hold: None,
                previous_conditions: &[],
                gate: None,
            },
            at(0),
        );
        assert_eq!(status.phase, Some(Phase::BreakerOpen));
        assert_eq!(find(&status, CONDITION_RECONCILING).status, "False");
        assert_eq!(find(&status, CONDITION_STALLED).status, "False");
    }
}
