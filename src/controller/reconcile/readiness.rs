//! The reconcile's step after a result that concerns the target's readiness: wait for it (join
//! the target's ping stream) or not, and what readiness the pool's status shows.
//!
//! Lives here: `Run::await_readiness` and the rule for the status's `readiness`
//! ([`next_shown`], pure). Must not live here: the pings and what they saw (`pings`), when the
//! status is written (`reconcile/outbox.rs`: a readiness change alone is coalesced, never
//! urgent), the shape of the status (`status`).
//!
//! **What the status shows.** A pool that never waited out an outage shows no readiness. While
//! it waits (its last result an outage-class failure), its own failure is evidence for the
//! target too (Unreachable, or StartingUp for 57P03), and it shows what the pings saw of its
//! target: the shareable readiness and the edge it changed at, or its own credential key's
//! configuration answer. Afterwards it keeps the last shown, updated by anything newer that was
//! seen of the target for its key; a login that succeeded shows Accepting (since that probe,
//! when the target was not already shown accepting). The status is only ever refreshed at a
//! reconcile, so a ping alone never causes a write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

use super::{Run, decide::probe_target};
use crate::{
    api::{DbPool, ProbeOutcome, ProbeSummary, ReadinessStatus},
    controller::{
        context::Context,
        credentials::Credentials,
        error::CredentialError,
        names::spec_target_key,
        pings::{Shown, awaits_readiness},
    },
    probe::{PingTarget, Readiness},
};

impl Run {
    /// A reconcile without a result (no probe was due): the pool still waits for its target's
    /// readiness when its last result says so. A new leader restores a pool in CoolingDown or
    /// Open from its status and reconciles it long before its next probe (the cooldown's end,
    /// minutes away): without this its ping stream started only at that probe, and no early
    /// trial came while the server was back (found by the in-cluster test's leader changes).
    pub(super) fn await_readiness_without_result(
        &mut self,
        pool: &DbPool,
        ctx: &Context,
        credentials: &Result<Credentials, CredentialError>,
    ) {
        let ping = credentials
            .as_ref()
            .ok()
            .map(|creds| PingTarget::from(&probe_target(pool, creds)));
        self.await_readiness(pool, ctx, ping);
    }

    /// After a result: the pool waits for its target's readiness (see `pings`) while its last
    /// result is an outage-class failure and its credentials loaded (`ping`); else it does not.
    /// Either way, the readiness its status shows is brought up to date.
    pub(super) fn await_readiness(
        &mut self,
        pool: &DbPool,
        ctx: &Context,
        ping: Option<PingTarget>,
    ) {
        let last = self.memory.last_probe.as_ref();
        let waits =
            last.is_some_and(|last| awaits_readiness(last, &self.memory.state, &self.policy));
        let target = spec_target_key(pool);
        let pings = &ctx.parts.pings;
        let Some(ping) = ping else {
            pings.unwatch(&self.key);
            return;
        };
        if let Some(last) = last.filter(|_| waits || self.memory.readiness.is_some())
            && let Some(seen) = evidence(last)
        {
            pings.saw(&target, &ping, seen, last.time.0);
        }
        let shown = pings.shown(&target, &ping);
        self.memory.readiness = next_shown(self.memory.readiness.take(), shown, waits, last);
        if waits {
            pings.watch(&target, &self.key, ping);
        } else {
            pings.unwatch(&self.key);
        }
    }
}

/// What a pool's own result says of its target's readiness: a success that it accepts, an
/// outage-class failure (no SQLSTATE, or 57P03) that it does not; anything else nothing.
fn evidence(last: &ProbeSummary) -> Option<Readiness> {
    match (last.outcome, last.sql_state.as_deref()) {
        (ProbeOutcome::Success, _) => Some(Readiness::Accepting),
        (ProbeOutcome::TransientFailure, Some("57P03")) => Some(Readiness::StartingUp),
        (ProbeOutcome::TransientFailure, None) => Some(Readiness::Unreachable),
        _ => None,
    }
}

/// The readiness the status shows next (see the module comment): `current` (shown so far),
/// `seen` (what was seen of the target for the pool's key), whether the pool `waits`, and its
/// last result.
fn next_shown(
    current: Option<ReadinessStatus>,
    seen: Option<Shown>,
    waits: bool,
    last: Option<&ProbeSummary>,
) -> Option<ReadinessStatus> {
    let seen = seen.map(|s| ReadinessStatus {
        state: s.state,
        since: MicroTime(s.since),
    });
    let mut next = if waits {
        seen.or(current)?
    } else {
        let current = current?;
        seen.filter(|s| s.since.0 >= current.since.0)
            .unwrap_or(current)
    };
    if let Some(probe) = last.filter(|p| p.outcome == ProbeOutcome::Success)
        && next.state != Readiness::Accepting
    {
        next = ReadinessStatus {
            state: Readiness::Accepting,
            since: MicroTime(probe.time.0.max(next.since.0)),
        };
    }
    Some(next)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::controller::testing;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn shown(state: Readiness, at: i64) -> Shown {
        Shown {
            state,
            since: t(at),
        }
    }

    fn status(state: Readiness, at: i64) -> ReadinessStatus {
        ReadinessStatus {
            state,
            since: MicroTime(t(at)),
        }
    }

    fn probe(outcome: ProbeOutcome, sql_state: Option<&str>, at: i64) -> ProbeSummary {
        let mut p = testing::summary(outcome, t(at));
        p.sql_state = sql_state.map(str::to_owned);
        p
    }

    #[test]
    fn a_pool_that_never_waited_shows_nothing() {
        let ok = probe(ProbeOutcome::Success, None, 5);
        let seen = Some(shown(Readiness::Accepting, 1));
        assert_eq!(next_shown(None, seen, false, Some(&ok)), None);
    }

    #[test]
    fn a_waiting_pool_shows_what_was_seen_and_keeps_it_afterwards() {
        let down = probe(ProbeOutcome::TransientFailure, None, 2);
        let waiting = next_shown(
            None,
            Some(shown(Readiness::Unreachable, 1)),
            true,
            Some(&down),
        );
        assert_eq!(waiting, Some(status(Readiness::Unreachable, 1)));
        // The edge: accepting since the ping saw it, whatever the trial then said.
        let wrong = probe(ProbeOutcome::ConfigFailure, Some("28P01"), 9);
        let after = next_shown(
            waiting,
            Some(shown(Readiness::Accepting, 8)),
            false,
            Some(&wrong),
        );
        assert_eq!(after, Some(status(Readiness::Accepting, 8)));
        // Nothing newer seen: kept.
        let older = Some(shown(Readiness::Unreachable, 3));
        assert_eq!(next_shown(after.clone(), older, false, Some(&wrong)), after);
    }

    #[test]
    fn a_successful_login_shows_accepting_from_then_on() {
        let ok = probe(ProbeOutcome::Success, None, 7);
        let starting = Some(status(Readiness::StartingUp, 4));
        let seen = Some(shown(Readiness::StartingUp, 4));
        assert_eq!(
            next_shown(starting, seen, false, Some(&ok)),
            Some(status(Readiness::Accepting, 7))
        );
        // Already accepting: the edge stays the since.
        let accepting = Some(status(Readiness::Accepting, 6));
        assert_eq!(
            next_shown(accepting.clone(), None, false, Some(&ok)),
            accepting
        );
    }

    #[test]
    fn only_outage_failures_and_successes_are_evidence() {
        let e = |outcome, code| evidence(&probe(outcome, code, 0));
        assert_eq!(e(ProbeOutcome::Success, None), Some(Readiness::Accepting));
        assert_eq!(
            e(ProbeOutcome::TransientFailure, Some("57P03")),
            Some(Readiness::StartingUp)
        );
        assert_eq!(
            e(ProbeOutcome::TransientFailure, None),
            Some(Readiness::Unreachable)
        );
        assert_eq!(e(ProbeOutcome::TransientFailure, Some("53300")), None);
        assert_eq!(e(ProbeOutcome::ConfigFailure, Some("28P01")), None);
    }
}
