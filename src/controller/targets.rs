//! Coalescing probes per target while it is down: one connect schedule per `host:port`, its
//! results fanned out to the pools that point there.
//!
//! Lives here: [`Targets`] (per target: its owners' policies, the shared
//! [`TargetSchedule`](crate::recovery::TargetSchedule), the latest failed attempt), [`Claim`]
//! (what a due pool does: probe, take the latest result, or wait for the next shared attempt)
//! and [`is_path_failure`] (which results say the target itself is down). Must not live here:
//! the schedule's arithmetic (`dbpool-recovery`), what a result means for one pool (its own
//! engine and policy).
//!
//! Only failures that no server answer explains are shared — the lookup, the TCP connect, or
//! the transport dying before authentication completed, without a SQLSTATE — because they hold
//! for every credential at that address. While the target is healthy every pool probes on its
//! own schedule, and pools with equivalent probes share one probe stream (`sharing`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;

use super::{
    names::{PerPool, PoolRef},
    sync::lock,
};
use crate::{
    api::{DbPool, ProbeOutcome, ProbeStage, ProbeSummary},
    recovery::{Policy, TargetSchedule, add, shared_policy},
};

/// While another owner's attempt is in flight, a due pool looks again this soon.
const IN_FLIGHT_POLL: Duration = Duration::from_millis(50);

/// A failed attempt against a target, as every owner will see it.
#[derive(Clone)]
pub(super) struct SharedFailure {
    /// When the attempt finished (its summary's time).
    pub finished: Timestamp,
    /// The result, as the pool that made it saw it.
    pub summary: ProbeSummary,
    /// The failure is evidence about the network path (the probe's `path_evidence`).
    pub path_evidence: bool,
}

/// What a pool that is due does about its target.
pub(super) enum Claim {
    /// The target is not known down: probe on the pool's own schedule (or take a result of its
    /// probe stream, see `sharing`).
    Probe,
    /// The target is down and this pool makes the shared attempt: probe for real.
    Attempt,
    /// The target is down and its shared attempt still waits for a probe permit in another
    /// namespace: probe for real, without waiting in that queue.
    Alone,
    /// Take this result: it is at least as fresh as the pool's deadline.
    Use(SharedFailure),
    /// Wait until this instant: the next shared attempt (or the one in flight) will tell.
    Wait(Timestamp),
}

#[derive(Default)]
struct Entry {
    owners: HashMap<ObjectRef<DbPool>, Policy>,
    schedule: TargetSchedule,
    last: Option<SharedFailure>,
    /// The shared attempt in flight, if one is: `Some(namespace)` while it still waits for its
    /// probe permit in that namespace, `None` once it holds one.
    in_flight: Option<Option<String>>,
}

/// Every target some pool probed, keyed by `host:port`.
#[derive(Default)]
pub(super) struct Targets {
    map: Mutex<HashMap<String, Entry>>,
}

/// Whether a probe result says the target itself is down: an outage at the lookup, the
/// connect, TLS or authentication stage without any SQLSTATE (no server answered).
pub(super) fn is_path_failure(summary: &ProbeSummary) -> bool {
    summary.outcome == ProbeOutcome::TransientFailure
        && summary.sql_state.is_none()
        && matches!(
            summary.stage,
            Some(ProbeStage::Resolve | ProbeStage::Connect | ProbeStage::Tls | ProbeStage::Auth)
        )
}

/// A stable seed for a target's jitter (FNV-1a of its key).
fn seed(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Targets {
    /// What `pool` (due since `due`, with `policy`, its last result applied at `seen`) does
    /// about `target` at `now`. Records the pool as an owner; an `Attempt` while the target is
    /// down makes this pool the shared attempt.
    ///
    /// While the target is down, a due pool takes the newest failed attempt when it is at least
    /// as fresh as its deadline, or newer than anything the pool has applied: its counters
    /// advance at its own deadlines, while the attempts follow the shared schedule. It waits
    /// for the next shared attempt only when it has applied the newest one already.
    pub fn claim(
        &self,
        target: &str,
        pool: &ObjectRef<DbPool>,
        policy: &Policy,
        (due, seen): (Timestamp, Option<Timestamp>),
        now: Timestamp,
    ) -> Claim {
        let mut map = lock(&self.map);
        let entry = map.entry(target.to_owned()).or_insert_with(|| Entry {
            schedule: TargetSchedule::new(seed(target)),
            ..Entry::default()
        });
        entry.owners.insert(pool.clone(), *policy);
        if !entry.schedule.is_down() {
            return Claim::Probe;
        }
        if let Some(last) = entry
            .last
            .as_ref()
            .filter(|l| l.finished >= due || seen.is_some_and(|seen| l.finished > seen))
        {
            return Claim::Use(last.clone());
        }
        let namespace = pool.namespace.as_deref().unwrap_or_default();
        match &entry.in_flight {
            // The attempt waits in another namespace's permit queue: no pool waits there
            // (issue 23); this one probes for itself, and its result counts for the target.
            Some(Some(queued_in)) if queued_in != namespace => return Claim::Alone,
            Some(_) => return Claim::Wait(add(now, IN_FLIGHT_POLL)),
            None => {}
        }
        let shared = shared_policy(entry.owners.values()).unwrap_or(*policy);
        match entry.schedule.next_attempt(&shared) {
            Some(at) if at > now => Claim::Wait(at),
            _ => {
                entry.in_flight = Some(Some(namespace.to_owned()));
                Claim::Attempt
            }
        }
    }

    /// Records the result of a probe of `target` that started at `started`; `path_evidence` as
    /// the probe reported it.
    pub fn record(
        &self,
        target: &str,
        started: Timestamp,
        summary: &ProbeSummary,
        path_evidence: bool,
    ) {
        let mut map = lock(&self.map);
        let Some(entry) = map.get_mut(target) else {
            return;
        };
        entry.in_flight = None;
        if is_path_failure(summary) {
            // Attempts that ran side by side (several owners probing at the moment the target
            // went down) are one attempt for the schedule: counting each would run through
            // maxAttempts at once and send every owner into the cooldown.
            let concurrent = entry
                .last
                .as_ref()
                .is_some_and(|last| started <= last.finished);
            let shared = shared_policy(entry.owners.values());
            if let Some(shared) = shared.filter(|_| !concurrent) {
                entry.schedule.failed(started, &shared);
            }
            entry.last = Some(SharedFailure {
                finished: summary.time.0,
                summary: summary.clone(),
                path_evidence,
            });
        } else {
            entry.schedule.reachable();
            entry.last = None;
        }
    }

    /// The shared attempt of `target` got its probe permit: from now on every owner waits for it.
    pub fn permitted(&self, target: &str) {
        if let Some(entry) = lock(&self.map).get_mut(target)
            && let Some(queued) = entry.in_flight.as_mut()
        {
            *queued = None;
        }
    }

    /// A probe that was to be the shared attempt did not run (the reconcile ended first).
    pub fn abandon(&self, target: &str) {
        if let Some(entry) = lock(&self.map).get_mut(target) {
            entry.in_flight = None;
        }
    }
}

impl PerPool for Targets {
    /// Forgets `pool` as an owner everywhere; a target without owners is dropped.
    fn forget(&self, pool: &PoolRef) {
        lock(&self.map).retain(|_, entry| {
            entry.owners.remove(pool);
            !entry.owners.is_empty()
        });
    }

    fn pools_known(&self) -> usize {
        let map = lock(&self.map);
        let owners: std::collections::HashSet<&PoolRef> =
            map.values().flat_map(|entry| entry.owners.keys()).collect();
        owners.len()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{apimachinery::pkg::apis::meta::v1::MicroTime, jiff::SignedDuration};

    use super::*;
    use crate::api::DbPoolSpec;

    fn policy() -> Policy {
        let spec: DbPoolSpec = serde_json::from_value(serde_json::json!({
            "database": {"host": "h", "dbname": "d", "user": "u"},
            "backoff": {"initialDelay": "200ms", "maxDelay": "200ms", "multiplier": 1.0, "jitter": 0.0},
        }))
        .expect("spec");
        spec.policy()
    }

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000)
            .expect("valid")
            .checked_add(SignedDuration::from_millis(ms))
            .expect("valid")
    }

    fn refused(finished: Timestamp) -> ProbeSummary {
        ProbeSummary {
            time: MicroTime(finished),
            outcome: ProbeOutcome::TransientFailure,
            stage: Some(ProbeStage::Connect),
            latency_ms: 1,
            message: Some("connection refused".into()),
            sql_state: None,
            server_version: None,
            in_recovery: None,
            connections: None,
            max_connections: None,
        }
    }

    #[test]
    fn a_down_target_is_attempted_once_per_shared_delay_and_fans_out() {
        let targets = Targets::default();
        let (a, b) = (
            ObjectRef::<DbPool>::new("a").within("ns"),
            ObjectRef::<DbPool>::new("b").within("ns"),
        );
        let p = policy();
        // Not known down: both probe.
        assert!(matches!(
            targets.claim("h:1", &a, &p, (at(0), None), at(0)),
            Claim::Probe
        ));
        targets.record("h:1", at(0), &refused(at(1)), false);
        // b was due at 0: the attempt that finished at 1 answers for it.
        assert!(matches!(
            targets.claim("h:1", &b, &p, (at(0), None), at(5)),
            Claim::Use(_)
        ));
        // a is due again at 201: the next shared attempt is at 200, so a makes it ...
        assert!(matches!(
            targets.claim("h:1", &a, &p, (at(201), None), at(201)),
            Claim::Attempt
        ));
        // ... and b, due at 205 while it is in flight, looks again shortly.
        assert!(matches!(
            targets.claim("h:1", &b, &p, (at(205), None), at(205)),
            Claim::Wait(_)
        ));
        targets.record("h:1", at(201), &refused(at(210)), false);
        assert!(matches!(
            targets.claim("h:1", &b, &p, (at(205), None), at(211)),
            Claim::Use(_)
        ));
        // Due at 215 with the next attempt at 401: wait for it.
        match targets.claim("h:1", &b, &p, (at(215), None), at(215)) {
            Claim::Wait(until) => assert_eq!(until, at(401)),
            _ => panic!("expected a wait for the next shared attempt"),
        }
    }

    #[test]
    fn nobody_waits_for_an_attempt_queued_in_another_namespace() {
        let targets = Targets::default();
        let hostile = ObjectRef::<DbPool>::new("a").within("hostile");
        let neighbour = ObjectRef::<DbPool>::new("b").within("hostile");
        let innocent = ObjectRef::<DbPool>::new("c").within("innocent");
        let p = policy();
        targets.claim("h:1", &hostile, &p, (at(0), None), at(0));
        targets.record("h:1", at(0), &refused(at(1)), false);
        assert!(matches!(
            targets.claim("h:1", &hostile, &p, (at(201), Some(at(1))), at(201)),
            Claim::Attempt
        ));
        // The attempt waits for a permit in "hostile": its own namespace waits for it, another
        // probes alone.
        assert!(matches!(
            targets.claim("h:1", &neighbour, &p, (at(202), Some(at(1))), at(202)),
            Claim::Wait(_)
        ));
        assert!(matches!(
            targets.claim("h:1", &innocent, &p, (at(202), Some(at(1))), at(202)),
            Claim::Alone
        ));
        // Holding its permit, it is worth waiting for everywhere.
        targets.permitted("h:1");
        assert!(matches!(
            targets.claim("h:1", &innocent, &p, (at(203), Some(at(1))), at(203)),
            Claim::Wait(_)
        ));
    }

    #[test]
    fn a_due_pool_takes_a_failure_newer_than_its_last_result() {
        let targets = Targets::default();
        let (a, b) = (
            ObjectRef::<DbPool>::new("a").within("ns"),
            ObjectRef::<DbPool>::new("b").within("ns"),
        );
        let p = policy();
        let _ = targets.claim("h:1", &a, &p, (at(0), None), at(0));
        targets.record("h:1", at(0), &refused(at(10)), false);
        // b last applied a result at 5 and is due at 150, before the next shared attempt (200):
        // the failure at 10 is newer than what it has, so its counters advance at its deadline.
        assert!(matches!(
            targets.claim("h:1", &b, &p, (at(150), Some(at(5))), at(150)),
            Claim::Use(_)
        ));
        // Having applied it (at 150), b waits for the next shared attempt instead.
        match targets.claim("h:1", &b, &p, (at(180), Some(at(150))), at(180)) {
            Claim::Wait(until) => assert_eq!(until, at(200)),
            _ => panic!("expected a wait for the next shared attempt"),
        }
    }

    #[test]
    fn attempts_side_by_side_count_once_for_the_schedule() {
        let targets = Targets::default();
        let p = policy();
        let owners: Vec<ObjectRef<DbPool>> = (0..25)
            .map(|i| ObjectRef::<DbPool>::new(&format!("p{i}")).within("ns"))
            .collect();
        // The target goes down under 25 owners probing at the same moment.
        for owner in &owners {
            assert!(matches!(
                targets.claim("h:1", owner, &p, (at(0), None), at(0)),
                Claim::Probe
            ));
        }
        for (i, _) in owners.iter().enumerate() {
            targets.record("h:1", at(i as i64), &refused(at(30 + i as i64)), false);
        }
        // One failure for the schedule: the next attempt one initial delay (200ms) after the
        // first, not a cooldown after maxAttempts.
        let map = lock(&targets.map);
        let entry = map.get("h:1").expect("entry");
        assert_eq!(entry.schedule.failures, 1);
        assert_eq!(entry.schedule.next_attempt(&p), Some(at(200)));
    }

    #[test]
    fn an_answer_from_a_server_is_not_shared() {
        let mut auth = refused(at(1));
        auth.stage = Some(ProbeStage::Auth);
        auth.sql_state = Some("28P01".into());
        assert!(!is_path_failure(&auth));
        assert!(is_path_failure(&refused(at(1))));
        let targets = Targets::default();
        let a = ObjectRef::<DbPool>::new("a").within("ns");
        let _ = targets.claim("h:1", &a, &policy(), (at(0), None), at(0));
        targets.record("h:1", at(0), &auth, false);
        assert!(matches!(
            targets.claim("h:1", &a, &policy(), (at(5), None), at(5)),
            Claim::Probe
        ));
        targets.forget(&a);
        assert!(lock(&targets.map).is_empty());
    }
}
