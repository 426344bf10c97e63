//! Kubernetes Events for what a person should notice: breaker changes, cooldowns, recoveries,
//! force reopens, configuration errors and breaker openings held by the fleet guard.
//!
//! Lives here: the wording of every event ([`events_of`]), [`PendingEvent`] (an event waiting
//! in a pool's outbox, with repeats folded in) and the Kubernetes event it becomes
//! ([`PendingEvent::to_event`]). Pure. Must not live here: deciding what happened (the engine's
//! effects say it), the reasons' spelling (`dbpool_api::reason`), when an event goes out or
//! sending it (the pool's writer in `write`, with the status it belongs to).

use kube::runtime::events::{Event as KubeEvent, EventType};

use crate::{
    api::{BreakerState, ForceReopenRecord, Phase, ProbeSummary, reason},
    recovery::{Effect, Policy, PoolState},
};

/// What the wording of a reconcile's events draws on.
pub(crate) struct EventFacts<'a> {
    /// The pool's engine state after the reconcile.
    pub state: &'a PoolState,
    /// The pool's last probe result (its message ends most warnings).
    pub last_probe: Option<&'a ProbeSummary>,
    /// The force reopen acted on last.
    pub last_force_reopen: Option<&'a ForceReopenRecord>,
}

/// An event waiting to be published, with how many more of the same reason were folded into it
/// while it waited (the latest note wins).
#[derive(Clone, Debug)]
pub(crate) struct PendingEvent {
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

impl PendingEvent {
    /// The Kubernetes event to publish, folded repeats counted in its note (cut to the API's
    /// limit).
    pub fn to_event(&self) -> KubeEvent {
        let note = if self.folded > 0 {
            format!(
                "{} (and {} more like it, folded by the write budget)",
                self.note, self.folded
            )
        } else {
            self.note.clone()
        };
        KubeEvent {
            type_: self.type_,
            reason: self.reason.to_owned(),
            note: Some(cut_note(note)),
            action: "Probe".to_owned(),
            secondary: None,
        }
    }
}

/// Adds `newer` to `events`, folding an event into a pending one of the same reason: at most one
/// event per reason waits per pool, whatever a spec makes the engine do.
pub(crate) fn fold(events: &mut Vec<PendingEvent>, newer: Vec<PendingEvent>) {
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
pub(crate) fn events_of(
    facts: &EventFacts<'_>,
    policy: &Policy,
    effects: &[Effect],
    before: Option<Phase>,
    after: Option<Phase>,
) -> Vec<PendingEvent> {
    let mut events = Vec::new();
    let last_message = facts
        .last_probe
        .and_then(|p| p.message.clone())
        .unwrap_or_default();
    for effect in effects {
        if let Some((type_, reason, note)) = describe(effect, facts, policy, &last_message) {
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
    facts: &EventFacts<'_>,
    policy: &Policy,
    last_message: &str,
) -> Option<(EventType, &'static str, String)> {
    Some(match effect {
        Effect::BreakerChanged { from, to } => describe_breaker(*from, *to, facts, last_message),
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
            let token = facts
                .last_force_reopen
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
                facts.state.consecutive_failures
            ),
        ),
        Effect::Ignored | Effect::EarlyTrialGranted => return None,
    })
}

/// The event of a breaker change: (type, reason, note).
fn describe_breaker(
    from: BreakerState,
    to: BreakerState,
    facts: &EventFacts<'_>,
    last_message: &str,
) -> (EventType, &'static str, String) {
    match to {
        BreakerState::Open => (
            EventType::Warning,
            reason::BREAKER_OPENED,
            format!(
                "circuit breaker opened ({from:?} -> Open) after {} consecutive failures: {last_message}",
                facts.state.consecutive_failures
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
    }
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
