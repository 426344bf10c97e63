//! Unit tests of the parent module.
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
            readiness: None,
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
            readiness: None,
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
            readiness: None,
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
            readiness: None,
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
            readiness: None,
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
                readiness: None,
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
            readiness: None,
            gate: None,
        },
        at(0),
    );
    assert_eq!(status.phase, Some(Phase::BreakerOpen));
    assert_eq!(find(&status, CONDITION_RECONCILING).status, "False");
    assert_eq!(find(&status, CONDITION_STALLED).status, "False");
}

#[test]
fn a_fleet_guard_hold_is_visible_and_survives_a_restart() {
    let policy = policy();
    let mut state = healthy_state(0);
    state.consecutive_failures = 6;
    state.outage_streak = 6;
    state.last_failure = Some(FailureKind::Outage);
    state.last_failure_at = Some(at(20));
    state.last_probe_at = Some(at(20));
    state.held_since = Some(at(15));
    let mut failed = probe(ProbeOutcome::TransientFailure, 20, 1000);
    failed.message = Some("login to 127.0.0.1:1 timed out (probe timeout 1s)".into());
    let inputs = |state: &PoolState, previous: &[Condition]| {
        desired_status(
            &StatusInputs {
                writer_epoch: None,
                generation: Some(1),
                state,
                policy: &policy,
                last_probe: Some(&failed),
                last_force_reopen: None,
                hold: None,
                previous_conditions: previous,
                readiness: None,
                gate: None,
            },
            at(20),
        )
    };
    let held = inputs(&state, &[]);
    assert_eq!(held.phase, Some(Phase::Recovering));
    let reasons: Vec<(&str, &str, &str)> = held
        .conditions
        .iter()
        .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
        .collect();
    assert!(reasons.contains(&(CONDITION_READY, "False", reason::FLEET_SUSPECT)));
    assert!(reasons.contains(&(CONDITION_BREAKER_OPEN, "False", reason::FLEET_SUSPECT)));
    // One more held failure changes counters only: the hold's conditions stay as they were.
    let mut next = state.clone();
    next.consecutive_failures = 7;
    next.outage_streak = 7;
    let again = inputs(&next, &held.conditions);
    let hold_conditions = |s: &DbPoolStatus| -> Vec<Condition> {
        s.conditions
            .iter()
            .filter(|c| c.reason == reason::FLEET_SUSPECT)
            .cloned()
            .collect()
    };
    assert_eq!(hold_conditions(&again), hold_conditions(&held));
    // A restart keeps the hold (from Ready's transition time, no later than the real start).
    let restored = restore_state(&held, 7);
    assert_eq!(restored.held_since, Some(at(20)));
    assert_eq!(restored.breaker, BreakerState::Closed);
    // Without the hold the status says Recovering, as before.
    state.held_since = None;
    let plain = inputs(&state, &held.conditions);
    assert!(
        plain
            .conditions
            .iter()
            .all(|c| c.reason != reason::FLEET_SUSPECT)
    );
    assert_eq!(restore_state(&plain, 7).held_since, None);
}
