//! Kubernetes Events for what a person should notice: breaker changes, cooldowns, recoveries,
//! force reopens, configuration errors and breaker openings held by the fleet guard.
//!
//! Lives here: the wording of every event ([`events_of`]), [`PendingEvent`] (an event waiting
//! in a pool's outbox, with repeats folded in) and sending one through the request budget
//! ([`publish`]), only while this process leads. Must not live here: deciding what happened (the
//! engine's effects say it), the reasons' spelling (`dbpool_api::reason`) or when an event goes
//! out (the pool's writer in `write` decides, with the status it belongs to).

use super::api_slots::Priority;
use kube::{
    Resource, ResourceExt,
    runtime::events::{Event as KubeEvent, EventType},
};
use tracing::warn;

use super::{
    context::{Context, PoolMemory},
    write::fenced,
};
use crate::{
    api::{BreakerState, DbPool, Phase, reason},
    recovery::{Effect, Policy},
};

/// An event waiting to be published, with how many more of the same reason were folded into it
/// while it waited (the latest note wins).
#[derive(Clone, Debug)]
pub(super) struct PendingEvent {
    pub type_: EventType,
    pub reason: &'static str,
    pub note: String,
    /// Events of the same reason folded into this one.
    pub folded: u32,
}

impl PendingEvent {
    /// A new pending event.
    pub fn new(type_: EventType, reason: &'static str, note: String) -> Self {
        Self {
            type_,
            reason,
            note,
            folded: 0,
        }
    }
}

/// Adds `newer` to `events`, folding an event into a pending one of the same reason: at most one
/// event per reason waits per pool, whatever a spec makes the engine do.
pub(super) fn fold(events: &mut Vec<PendingEvent>, newer: Vec<PendingEvent>) {
    for event in newer {
        match events.iter_mut().find(|e| e.reason == event.reason) {
            Some(pending) => {
                pending.folded = pending.folded.saturating_add(event.folded + 1);
                pending.type_ = event.type_;
                pending.note = event.note;
            }
            None => events.push(event),
        }
    }
}

/// The events of one reconcile: one per effect, plus ConfigError on entering that phase.
pub(super) fn events_of(
    memory: &PoolMemory,
    policy: &Policy,
    effects: &[Effect],
    before: Option<Phase>,
    after: Option<Phase>,
) -> Vec<PendingEvent> {
    let mut events = Vec::new();
    let last_message = memory
        .last_probe
        .as_ref()
        .and_then(|p| p.message.clone())
        .unwrap_or_default();
    for effect in effects {
        if let Some((type_, reason, note)) = describe(effect, memory, policy, &last_message) {
            events.push(PendingEvent::new(type_, reason, note));
        }
    }
    if after == Some(Phase::ConfigError) && before != Some(Phase::ConfigError) {
        events.push(PendingEvent::new(
            EventType::Warning,
            reason::CONFIG_ERROR,
            last_message,
        ));
    }
    events
}

/// The event an effect deserves, if any: (type, reason, note).
fn describe(
    effect: &Effect,
    memory: &PoolMemory,
    policy: &Policy,
    last_message: &str,
) -> Option<(EventType, &'static str, String)> {
    Some(match effect {
        Effect::BreakerChanged { from, to } => match to {
            BreakerState::Open => (
                EventType::Warning,
                reason::BREAKER_OPENED,
                format!(
                    "circuit breaker opened ({from:?} -> Open) after {} consecutive failures: {last_message}",
                    memory.state.consecutive_failures
                ),
            ),
            BreakerState::HalfOpen => (
                EventType::Normal,
                reason::BREAKER_HALF_OPEN,
                "circuit breaker half-open: trial probe".to_owned(),
            ),
            BreakerState::Closed => (
                EventType::Normal,
                reason::BREAKER_CLOSED,
                format!("circuit breaker closed ({from:?} -> Closed): database answered"),
            ),
        },
        Effect::CooldownStarted { until } => (
            EventType::Warning,
            reason::COOLDOWN_STARTED,
            format!(
                "{} attempts failed in a row; cooling down until {until}: {last_message}",
                policy.max_attempts
            ),
        ),
        Effect::CooldownEnded => (
            EventType::Normal,
            reason::COOLDOWN_ENDED,
            "new cycle of attempts".to_owned(),
        ),
        Effect::Recovered => (
            EventType::Normal,
            reason::RECOVERED,
            "the database answers again".to_owned(),
        ),
        Effect::ForceReopened => {
            let token = memory
                .last_force_reopen
                .as_ref()
                .map(|r| r.token.clone())
                .unwrap_or_default();
            (
                EventType::Normal,
                reason::FORCE_REOPEN,
                format!("force-reopen {token:?}: backoff and cooldown reset, probing now"),
            )
        }
        Effect::OpeningHeld => (
            EventType::Warning,
            reason::FLEET_SUSPECT,
            format!(
                "circuit breaker held Closed after {} consecutive failures: most targets that were \
                 healthy fail on the network path at once, so the fleet guard suspects the \
                 operator's own network (dbpool_fleet_suspect); failures are still counted, and \
                 the breaker opens at the first failure once the guard clears or the hold reaches \
                 --fleet-guard-max-hold: {last_message}",
                memory.state.consecutive_failures
            ),
        ),
        Effect::Ignored => return None,
    })
}

/// The most bytes the apiserver accepts in an events.k8s.io `note`.
const MAX_NOTE_BYTES: usize = 1024;

/// `note` cut to [`MAX_NOTE_BYTES`] on a character boundary, ending in `…` when cut, so that a
/// long message or force-reopen token still gives an event instead of a rejected one.
fn cut_note(mut note: String) -> String {
    if note.len() <= MAX_NOTE_BYTES {
        return note;
    }
    const ELLIPSIS: &str = "…";
    let mut end = MAX_NOTE_BYTES - ELLIPSIS.len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    note.truncate(end);
    note.push_str(ELLIPSIS);
    note
}

/// Sends one event about `pool`, unless this process has stopped leading. An event carries no
/// precondition: the window in which a deposed leader can still publish one is the time between
/// the gate check and the apiserver receiving the request, bounded by the rest of its term.
/// Folded repeats are counted in the note.
pub(super) async fn publish(ctx: &Context, pool: &DbPool, pending: PendingEvent) {
    let note = if pending.folded > 0 {
        format!(
            "{} (and {} more like it, folded by the write budget)",
            pending.note, pending.folded
        )
    } else {
        pending.note
    };
    let event = KubeEvent {
        type_: pending.type_,
        reason: pending.reason.to_owned(),
        note: Some(cut_note(note)),
        action: "Probe".to_owned(),
        secondary: None,
    };
    let reference = pool.object_ref(&());
    if let Err(err) = fenced(
        ctx,
        Priority::Later,
        ctx.recorder.publish(&event, &reference),
    )
    .await
    {
        warn!(pool = %pool.name_any(), error = %err, "cannot publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_cut_to_the_api_limit_on_a_char_boundary() {
        assert_eq!(cut_note("short".to_owned()), "short");
        let exact = "x".repeat(MAX_NOTE_BYTES);
        assert_eq!(cut_note(exact.clone()), exact);
        for long in [
            "t".repeat(5000),
            "é".repeat(3000),
            format!("a{}", "€".repeat(2000)),
        ] {
            let cut = cut_note(long);
            assert!(cut.len() <= MAX_NOTE_BYTES, "{}", cut.len());
            assert!(cut.ends_with('…'));
        }
    }
}
