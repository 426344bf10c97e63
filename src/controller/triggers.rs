//! Which events a reconcile feeds the recovery engine, decided in one pure function.
//!
//! Lives here: [`Observed`] (what a reconcile saw about a pool before probing) and [`triggers`]
//! (the engine events that follows from it, in order). Must not live here: reading the cluster,
//! the clock or the engine's rules; the caller applies the triggers and the engine decides.
//!
//! A new pool needs no trigger: the engine probes a pool that was never probed at once.

use crate::recovery::Event;

/// What a reconcile observed about a pool, before any probe.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Observed<'a> {
    /// metadata.generation the memory last acted on (for a restored pool: status.observedGeneration).
    pub known_generation: Option<i64>,
    /// metadata.generation now.
    pub generation: Option<i64>,
    /// The maintenance hold the memory last acted on ([`Hold::describe`](crate::api::Hold::describe)).
    pub known_hold: Option<&'a str>,
    /// The maintenance hold the annotations declare now, described the same way.
    pub hold: Option<&'a str>,
    /// The value of the force-reopen annotation, if any.
    pub force_reopen_token: Option<&'a str>,
    /// The last force-reopen token acted upon.
    pub handled_token: Option<&'a str>,
    /// The pool's probe connection was lost since the last reconcile.
    pub connection_lost: bool,
    /// The pool is already failing (consecutive failures > 0): it is probed on its backoff anyway.
    pub failing: bool,
    /// Fingerprint of the credentials and `spec.database` the memory last saw (None: not loaded
    /// yet in this process).
    pub known_fingerprint: Option<&'a str>,
    /// Fingerprint of the credentials now (or of the error reading them).
    pub fingerprint: &'a str,
    /// The pool's target was seen accepting connections again by a readiness ping (see
    /// `pings`) since the last reconcile.
    pub readiness_edge: bool,
}

/// Why the engine is told something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Trigger {
    /// The spec changed: the in-flight probe is stale, the new policy applies.
    SpecChanged,
    /// A maintenance hold was set, changed or released: the policy's breaker mode changed
    /// (a hold is ForcedOpen), so the engine sees it like a spec change.
    HoldChanged,
    /// A new force-reopen token: reset backoff and cooldown, half-open an open breaker, probe now.
    ForceReopen,
    /// A healthy pool's probe connection died: probe soon (not sooner than one initial delay
    /// after the last probe, so a connection that dies after every probe is no probe loop).
    ConnectionLost,
    /// A Secret was created, fixed or rotated, or `spec.database` changed (the fingerprint
    /// covers both): probe the new credentials or target now.
    CredentialsChanged,
    /// A readiness ping saw the target accepting connections again: the engine may grant an
    /// early trial.
    ReadinessAccepting,
}

impl Trigger {
    /// The engine event of this trigger.
    pub fn event(self) -> Event {
        match self {
            Self::SpecChanged | Self::HoldChanged => Event::SpecChanged,
            Self::ForceReopen => Event::ForceReopen,
            Self::ConnectionLost | Self::CredentialsChanged => Event::ProbeRequested,
            Self::ReadinessAccepting => Event::ReadinessAccepting,
        }
    }
}

/// The triggers `observed` calls for, in the order the engine must see them.
pub(super) fn triggers(observed: &Observed<'_>) -> Vec<Trigger> {
    let mut out = Vec::new();
    if observed.known_generation != observed.generation {
        out.push(Trigger::SpecChanged);
    }
    if observed.known_hold != observed.hold {
        out.push(Trigger::HoldChanged);
    }
    if let Some(token) = observed.force_reopen_token
        && observed.handled_token != Some(token)
    {
        out.push(Trigger::ForceReopen);
    }
    if observed.connection_lost && !observed.failing {
        out.push(Trigger::ConnectionLost);
    }
    if observed
        .known_fingerprint
        .is_some_and(|known| known != observed.fingerprint)
    {
        out.push(Trigger::CredentialsChanged);
    }
    if observed.readiness_edge {
        out.push(Trigger::ReadinessAccepting);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steady() -> Observed<'static> {
        Observed {
            known_generation: Some(1),
            generation: Some(1),
            known_hold: None,
            hold: None,
            force_reopen_token: Some("t1"),
            handled_token: Some("t1"),
            connection_lost: false,
            failing: false,
            known_fingerprint: Some("rv-1"),
            fingerprint: "rv-1",
            readiness_edge: false,
        }
    }

    #[test]
    fn a_readiness_edge_is_fed_to_the_engine_last() {
        let edge = Observed {
            readiness_edge: true,
            generation: Some(2),
            ..steady()
        };
        assert_eq!(
            triggers(&edge),
            [Trigger::SpecChanged, Trigger::ReadinessAccepting]
        );
        assert_eq!(
            Trigger::ReadinessAccepting.event(),
            Event::ReadinessAccepting
        );
    }

    #[test]
    fn a_steady_pool_triggers_nothing() {
        assert!(triggers(&steady()).is_empty());
    }

    #[test]
    fn a_new_pool_triggers_nothing() {
        let new = Observed {
            known_fingerprint: None,
            force_reopen_token: None,
            handled_token: None,
            ..steady()
        };
        assert!(triggers(&new).is_empty());
    }

    #[test]
    fn a_new_generation_is_a_spec_change() {
        let o = Observed {
            generation: Some(2),
            ..steady()
        };
        assert_eq!(triggers(&o), [Trigger::SpecChanged]);
    }

    #[test]
    fn a_token_acts_once() {
        let fresh = Observed {
            force_reopen_token: Some("t2"),
            ..steady()
        };
        assert_eq!(triggers(&fresh), [Trigger::ForceReopen]);
        let first = Observed {
            handled_token: None,
            ..steady()
        };
        assert_eq!(triggers(&first), [Trigger::ForceReopen]);
    }

    #[test]
    fn a_lost_connection_probes_only_a_healthy_pool() {
        let lost = Observed {
            connection_lost: true,
            ..steady()
        };
        assert_eq!(triggers(&lost), [Trigger::ConnectionLost]);
        let failing = Observed {
            failing: true,
            ..lost
        };
        assert!(triggers(&failing).is_empty());
    }

    #[test]
    fn changed_credentials_probe_but_first_sight_does_not() {
        let rotated = Observed {
            fingerprint: "rv-2",
            ..steady()
        };
        assert_eq!(triggers(&rotated), [Trigger::CredentialsChanged]);
        assert_eq!(Trigger::CredentialsChanged.event(), Event::ProbeRequested);
    }

    #[test]
    fn a_hold_set_changed_or_released_is_a_trigger() {
        let held = Observed {
            hold: Some("held by alice: drill"),
            ..steady()
        };
        assert_eq!(triggers(&held), [Trigger::HoldChanged]);
        assert_eq!(Trigger::HoldChanged.event(), Event::SpecChanged);
        let still = Observed {
            known_hold: Some("held by alice: drill"),
            ..held
        };
        assert!(triggers(&still).is_empty());
        let changed = Observed {
            hold: Some("held by bob: drill"),
            ..still
        };
        assert_eq!(triggers(&changed), [Trigger::HoldChanged]);
        let released = Observed {
            hold: None,
            ..still
        };
        assert_eq!(triggers(&released), [Trigger::HoldChanged]);
    }

    #[test]
    fn everything_at_once_comes_in_engine_order() {
        let all = Observed {
            generation: Some(3),
            hold: Some("held by alice: drill"),
            force_reopen_token: Some("t9"),
            connection_lost: true,
            fingerprint: "rv-3",
            ..steady()
        };
        assert_eq!(
            triggers(&all),
            [
                Trigger::SpecChanged,
                Trigger::HoldChanged,
                Trigger::ForceReopen,
                Trigger::ConnectionLost,
                Trigger::CredentialsChanged
            ]
        );
    }
}
