//! Step 4 of the reconcile: what a user would see changed, handed to the pool's writer.
//!
//! Lives here: `Run::write` (the status diff, the breaker label, the reconcile's events, the
//! inline gate sync before the status that reports it, the hand-over to `write::submit`),
//! `Run::label_to_write`, [`is_transition`] (which outboxes go at once) and [`answers_person`]
//! (which go before every recovery write). Must not live here:
//! the writes themselves and the budget (`write`), the shape of the status (`status`), event
//! wording (`events`).

use std::sync::Arc;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use super::Run;
use crate::{
    api::{
        BREAKER_LABEL, CONDITION_BREAKER_OPEN, CONDITION_READY, DbPool, DbPoolStatus, Phase, reason,
    },
    controller::{
        context::{Context, submit},
        events::{EventFacts, PendingEvent, events_of},
        gate::{self, GateIo, GateOutcome},
        status::{StatusInputs, desired_status, needs_write},
        write::Outbox,
    },
};

impl Run {
    /// Step 4: hand what a user would see changed (status, breaker label, this reconcile's
    /// events) to the pool's writer, marked urgent when it is a transition or a force-reopen
    /// acknowledgement. Returns once handed over: the writer sends it within the write budget.
    /// (Only a declared gate is synced inline, before the status that reports it.)
    pub(super) async fn write(&mut self, pool: &Arc<DbPool>, ctx: &Arc<Context>) {
        // The gate before the status, so the status tells what became of it.
        let gate = self.sync_gate(pool, ctx).await;
        let now = Timestamp::now();
        let last = self.memory.last_written.as_ref();
        let before_phase = last.and_then(|s| s.phase);
        let previous_conditions = last.map_or_else(
            || self.memory.prior_conditions.clone(),
            |s| s.conditions.clone(),
        );
        let gate_condition = gate.condition(pool.spec.gate.as_ref());
        let desired = desired_status(
            &StatusInputs {
                writer_epoch: ctx.door.fence().epoch(),
                generation: pool.metadata.generation,
                state: &self.memory.state,
                policy: &self.policy,
                last_probe: self.memory.last_probe.as_ref(),
                last_force_reopen: self.memory.last_force_reopen.as_ref(),
                hold: self.hold.as_ref(),
                previous_conditions: &previous_conditions,
                readiness: self.memory.readiness.as_ref(),
                gate: gate_condition.as_ref(),
            },
            now,
        );
        let status_changed = needs_write(
            &desired,
            last,
            self.memory.last_written_at,
            ctx.config.status_refresh,
            now,
        );
        let urgent = status_changed && is_transition(last, &desired);
        let answers_person = status_changed && answers_person(last, &desired, urgent, now);
        let label = self.label_to_write(pool, now);
        let events = self.events(before_phase, desired.phase);
        let outbox = Outbox {
            pool: pool.clone(),
            status: status_changed.then(|| desired.clone()),
            label,
            events,
            urgent: urgent || answers_person || label.is_some(),
            answers_person,
        };
        submit(ctx, &self.key, outbox);
        if status_changed {
            self.memory.last_written = Some(desired);
            self.memory.prior_conditions = Vec::new();
            self.memory.last_written_at = Some(now);
        }
        if let Some(label) = label {
            self.memory.label_written = Some(label.to_owned());
            self.memory.label_written_at = Some(now);
        }
    }

    /// Brings a declared gate in line with the breaker. Only a leader touches it (every write
    /// goes through the door anyway).
    async fn sync_gate(&mut self, pool: &DbPool, ctx: &Context) -> GateOutcome {
        if !ctx.door.fence().may_write() {
            return GateOutcome::NotDeclared;
        }
        let io = GateIo {
            client: &ctx.client,
            door: &ctx.door,
            allowlist: &ctx.config.gates,
        };
        let (breaker, peer) = (self.memory.state.breaker, self.memory.gate_peer);
        gate::sync(&io, pool, breaker, peer, &mut self.memory.gate_applied).await
    }

    /// The events of this reconcile: the engine's effects worded, then the notes.
    fn events(&mut self, before: Option<Phase>, after: Option<Phase>) -> Vec<PendingEvent> {
        let facts = EventFacts {
            state: &self.memory.state,
            last_probe: self.memory.last_probe.as_ref(),
            last_force_reopen: self.memory.last_force_reopen.as_ref(),
        };
        let mut events = events_of(&facts, &self.policy, &self.effects, before, after);
        for (type_, reason, note) in self.notes.drain(..) {
            events.push(PendingEvent::new(type_, reason, note));
        }
        events
    }

    /// The breaker label to write, if the object's differs. The object may lag our own write by
    /// a moment; a label changed by hand is put back once the last write is a probe interval
    /// old, so drift lasts at most about one interval.
    fn label_to_write(&self, pool: &DbPool, now: Timestamp) -> Option<&'static str> {
        let label = self.memory.state.breaker.label_value();
        let current = pool.labels().get(BREAKER_LABEL).map(String::as_str);
        let settled = self.memory.label_written_at.is_none_or(|at| {
            now.duration_since(at)
                >= SignedDuration::try_from(self.policy.interval).unwrap_or(SignedDuration::MAX)
        });
        (current != Some(label) && (self.memory.label_written.as_deref() != Some(label) || settled))
            .then_some(label)
    }
}

/// Whether writing `desired` over `last` goes at once, past the pool's `--min-status-period`:
/// a first status, a new breaker state, a new `Ready` verdict (the first failure of a healthy
/// pool, a recovery), a fleet-guard hold starting or ending, a force-reopen acknowledgement, or a new observed generation (a person's
/// spec change, acknowledged). Everything else — counters, times, messages, phase changes
/// among the failing phases, and the target's `readiness` — is coalesced: the latest value is
/// written at most once per period. Readiness is deliberately not a transition: one flip of a
/// target with 2,500 pools would otherwise be 2,500 urgent writes at once. What a flip to
/// accepting means for a pool (its early trial's result: a recovery, a new breaker state) is
/// urgent on its own; the readiness rides along with that write, or with the next counter-only
/// one. It is read at reconciles only, so a ping never causes a write. A spec alone cannot make these fast: the breaker's state and the Ready verdict change
/// only when the database's answers change (a trial that fails goes Open → HalfOpen → Open
/// within one reconcile, and a refusing server keeps Ready False).
pub(super) fn is_transition(last: Option<&DbPoolStatus>, desired: &DbPoolStatus) -> bool {
    let Some(last) = last else { return true };
    let ready = |s: &DbPoolStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == CONDITION_READY)
            .map(|c| c.status.clone())
    };
    let held = |s: &DbPoolStatus| {
        s.conditions
            .iter()
            .any(|c| c.type_ == CONDITION_READY && c.reason == reason::FLEET_SUSPECT)
    };
    ready(last) != ready(desired)
        || held(last) != held(desired)
        || last.breaker.as_ref().map(|b| b.state) != desired.breaker.as_ref().map(|b| b.state)
        || last.observed_generation != desired.observed_generation
        || last.last_force_reopen.as_ref().map(|r| &r.token)
            != desired.last_force_reopen.as_ref().map(|r| &r.token)
}

/// How long after acting on a force reopen the pool's transitions still answer the person who
/// asked: the reopen's probe can end in a later reconcile than its acknowledgement, and the
/// person waits for the Ready that follows.
const ANSWER_WINDOW: SignedDuration = SignedDuration::from_secs(60);

/// Whether writing `desired` over `last` answers a person's action, so its status write goes
/// before every recovery write (`Priority::User`, issue 29): a force reopen acknowledged (and,
/// within [`ANSWER_WINDOW`] after it, the transitions that follow), a spec edit acknowledged (a
/// new observedGeneration), a maintenance hold set or released. A pool's first status is not
/// one (a restart or a bulk create writes thousands of them).
pub(super) fn answers_person(
    last: Option<&DbPoolStatus>,
    desired: &DbPoolStatus,
    transition: bool,
    now: Timestamp,
) -> bool {
    let Some(last) = last else { return false };
    let token = |s: &DbPoolStatus| s.last_force_reopen.as_ref().map(|r| r.token.clone());
    let held = |s: &DbPoolStatus| {
        s.conditions
            .iter()
            .any(|c| c.type_ == CONDITION_BREAKER_OPEN && c.reason == reason::HELD)
    };
    let reopened_lately = desired
        .last_force_reopen
        .as_ref()
        .is_some_and(|r| now.duration_since(r.time.0) <= ANSWER_WINDOW);
    last.observed_generation != desired.observed_generation
        || token(last) != token(desired)
        || held(last) != held(desired)
        || (transition && reopened_lately)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    use crate::api::{BreakerState, BreakerStatus, ForceReopenRecord, Phase};

    fn status(phase: Phase, breaker: BreakerState, failures: i32) -> DbPoolStatus {
        DbPoolStatus {
            phase: Some(phase),
            breaker: Some(BreakerStatus {
                state: breaker,
                since: None,
                next_probe_at: None,
                open_count: 1,
                half_open_successes: 0,
            }),
            consecutive_failures: failures,
            observed_generation: Some(1),
            ..DbPoolStatus::default()
        }
    }

    #[test]
    fn counters_and_failing_phases_wait_but_breaker_changes_go_at_once() {
        let open = status(Phase::BreakerOpen, BreakerState::Open, 5);
        assert!(is_transition(None, &open), "a first status goes at once");
        assert!(!is_transition(
            Some(&open),
            &status(Phase::BreakerOpen, BreakerState::Open, 6)
        ));
        assert!(!is_transition(
            Some(&open),
            &status(Phase::CoolingDown, BreakerState::Open, 7)
        ));
        assert!(is_transition(
            Some(&status(Phase::Recovering, BreakerState::Closed, 4)),
            &open
        ));
        let mut spec_changed = open.clone();
        spec_changed.observed_generation = Some(2);
        assert!(is_transition(Some(&open), &spec_changed));
        let mut acknowledged = open.clone();
        acknowledged.last_force_reopen = Some(ForceReopenRecord {
            token: "t".into(),
            time: MicroTime(Timestamp::UNIX_EPOCH),
        });
        assert!(is_transition(Some(&open), &acknowledged));
    }

    #[test]
    fn a_readiness_change_alone_is_written_but_never_urgent() {
        use crate::{
            api::{Readiness, ReadinessStatus},
            controller::status::needs_write,
        };
        let down = |state| {
            let mut s = status(Phase::BreakerOpen, BreakerState::Open, 5);
            s.readiness = Some(ReadinessStatus {
                state,
                since: MicroTime(Timestamp::UNIX_EPOCH),
            });
            s
        };
        let (before, after) = (down(Readiness::Unreachable), down(Readiness::StartingUp));
        // Visible: written (as a counter-only write, at most once per --min-status-period)...
        let now = Timestamp::UNIX_EPOCH;
        let refresh = std::time::Duration::from_secs(300);
        assert!(needs_write(&after, Some(&before), Some(now), refresh, now));
        // ...but not a transition: a flip of a target's 2,500 pools is no urgent write.
        assert!(!is_transition(Some(&before), &after));
        assert!(!is_transition(
            Some(&status(Phase::BreakerOpen, BreakerState::Open, 5)),
            &after
        ));
    }

    #[test]
    fn a_force_reopen_and_the_ready_after_it_answer_a_person_recovery_does_not() {
        let now = Timestamp::now();
        let open = status(Phase::BreakerOpen, BreakerState::Open, 5);
        let closed = status(Phase::Healthy, BreakerState::Closed, 0);
        // An outage's recovery: a transition, but nobody asked.
        assert!(!answers_person(Some(&open), &closed, true, now));
        // The acknowledgement of a force reopen.
        let mut acknowledged = open.clone();
        acknowledged.last_force_reopen = Some(ForceReopenRecord {
            token: "t-1".into(),
            time: MicroTime(now),
        });
        assert!(answers_person(Some(&open), &acknowledged, true, now));
        // The Ready that follows it in a later reconcile, within the window; not long after.
        let mut ready = closed.clone();
        ready.last_force_reopen = acknowledged.last_force_reopen.clone();
        assert!(answers_person(Some(&acknowledged), &ready, true, now));
        let later = now
            .checked_add(ANSWER_WINDOW + SignedDuration::from_secs(1))
            .expect("valid");
        assert!(!answers_person(Some(&acknowledged), &ready, true, later));
        // A counter update after it is not a transition: it waits as before.
        assert!(!answers_person(Some(&ready), &ready, false, now));
        // A spec edit's acknowledgement; a pool's first status is none.
        let mut edited = closed.clone();
        edited.observed_generation = Some(2);
        assert!(answers_person(Some(&closed), &edited, true, now));
        assert!(!answers_person(None, &closed, true, now));
    }
}
