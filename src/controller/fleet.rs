//! The fleet guard in the controller: feed it every probe result, ask it whether a failure may
//! open its breaker.
//!
//! Lives here: [`Fleet`] (the process's [`FleetGuard`], which pool feeds which namespace and
//! target, the `dbpool_fleet_suspect` gauge and the log line of each suspect episode) and
//! [`Seen`] (what a result says about the path). Must not live here: the verdict's rule
//! (`dbpool-recovery`'s `fleet`), which errors are path evidence (`dbpool-probe`'s `classify`),
//! what a hold does to a breaker (`recovery::apply_guarded`), or the wording of the status and
//! the event (`status`, `events`).
//!
//! A failure is held (its breaker kept Closed) when the guard is enabled, the failure is path
//! evidence, the fleet is suspect at that instant, and the pool has not been held for
//! `--fleet-guard-max-hold` already. A refused connection therefore opens a breaker even while
//! the guard trips.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::reflector::ObjectRef;
use tracing::{info, warn};

use super::{
    config::FleetGuardSettings,
    names::{PerPool, PoolRef},
    sync::lock,
};
use crate::{
    api::DbPool,
    metrics::Metrics,
    recovery::{FleetGuard, FleetGuardConfig, FleetVerdict, PoolState},
};

/// What one result of a pool's target tells the guard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Seen {
    /// The probe succeeded.
    Healthy,
    /// The probe failed; `path` when the failure is evidence about the network path.
    Failed {
        /// A timeout, an unreachable network or host, a failed lookup.
        path: bool,
    },
}

struct Inner {
    guard: FleetGuard,
    /// Which (namespace, target) each pool last fed.
    owners: HashMap<ObjectRef<DbPool>, (String, String)>,
    last: FleetVerdict,
}

/// The fleet guard of one controller context.
pub(super) struct Fleet {
    settings: FleetGuardSettings,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
}

impl Fleet {
    /// An empty guard (not suspect).
    pub fn new(settings: FleetGuardSettings, metrics: Arc<Metrics>) -> Self {
        let guard = FleetGuard::new(FleetGuardConfig {
            share: settings.share,
            min_targets: settings.min_targets,
            window: settings.window,
        });
        metrics.fleet_suspect(false);
        Self {
            settings,
            metrics,
            inner: Mutex::new(Inner {
                guard,
                owners: HashMap::new(),
                last: FleetVerdict::default(),
            }),
        }
    }

    /// Records `observed` for `pool` (whose spec names `target`) at `now`, and says whether this
    /// result, applied to `state`, must be held from opening the breaker.
    pub fn observe(
        &self,
        pool: &ObjectRef<DbPool>,
        target: &str,
        observed: Seen,
        state: &PoolState,
        now: Timestamp,
    ) -> bool {
        let namespace = pool.namespace.clone().unwrap_or_default();
        let mut inner = lock(&self.inner);
        inner.own(pool, &namespace, target);
        match observed {
            Seen::Healthy => inner.guard.healthy(&namespace, target, now),
            Seen::Failed { path } => inner.guard.failed(&namespace, target, now, path),
        }
        let verdict = inner.guard.evaluate(now);
        if verdict.suspect != inner.last.suspect {
            self.metrics.fleet_suspect(verdict.suspect);
            log_change(&verdict, self.settings.enabled);
        }
        inner.last = verdict;
        let within_max_hold = state.held_since.is_none_or(|since| {
            now.duration_since(since)
                < SignedDuration::try_from(self.settings.max_hold).unwrap_or(SignedDuration::MAX)
        });
        self.settings.enabled
            && verdict.suspect
            && observed == Seen::Failed { path: true }
            && within_max_hold
    }

    /// Seeds the guard with what a restored status says about `pool` (a restarted operator, a
    /// new leader): when it was last healthy, and whether it is failing since then (`held`: the
    /// previous process held its breaker, so that failure was path evidence).
    pub fn restored(&self, pool: &ObjectRef<DbPool>, target: &str, state: &PoolState, held: bool) {
        let Some(healthy_at) = state.last_success_at else {
            return;
        };
        let namespace = pool.namespace.clone().unwrap_or_default();
        let mut inner = lock(&self.inner);
        inner.own(pool, &namespace, target);
        inner.guard.healthy(&namespace, target, healthy_at);
        if let Some(failed_at) = state.last_failure_at.filter(|at| *at > healthy_at) {
            inner.guard.failed(&namespace, target, failed_at, held);
        }
    }
}

impl PerPool for Fleet {
    /// Forgets `pool`; its (namespace, target) entry goes with the last pool feeding it.
    fn forget(&self, pool: &PoolRef) {
        let mut inner = lock(&self.inner);
        if let Some(key) = inner.owners.remove(pool) {
            inner.release(&key);
        }
    }

    fn pools_known(&self) -> usize {
        lock(&self.inner).owners.len()
    }
}

impl Inner {
    /// Records that `pool` feeds (namespace, target), releasing what it fed before.
    fn own(&mut self, pool: &ObjectRef<DbPool>, namespace: &str, target: &str) {
        let key = (namespace.to_owned(), target.to_owned());
        if let Some(old) = self.owners.insert(pool.clone(), key.clone())
            && old != key
        {
            self.release(&old);
        }
    }

    fn release(&mut self, key: &(String, String)) {
        if !self.owners.values().any(|k| k == key) {
            self.guard.forget(&key.0, &key.1);
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // The context ends with the term: a standby suspects nothing.
        self.metrics.fleet_suspect(false);
    }
}

fn log_change(v: &FleetVerdict, enabled: bool) {
    if v.suspect {
        warn!(
            eligible_targets = v.eligible,
            path_failing = v.path_failing,
            namespaces = v.namespaces,
            agreeing = v.agreeing,
            holding = enabled,
            "fleet guard: most targets fail on the network path at once; suspecting the \
             operator's own network and holding breakers from opening"
        );
    } else {
        info!(
            eligible_targets = v.eligible,
            path_failing = v.path_failing,
            namespaces = v.namespaces,
            agreeing = v.agreeing,
            "fleet guard: no longer suspect; breakers open on failures again"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::controller::testing::fleet_settings as settings;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("valid")
    }

    fn pool(name: &str) -> ObjectRef<DbPool> {
        ObjectRef::<DbPool>::new(name).within("shop")
    }

    #[test]
    fn path_failures_are_held_while_suspect_refusals_and_long_holds_are_not() {
        let metrics = Arc::new(Metrics::new());
        let fleet = Fleet::new(settings(), metrics.clone());
        let state = PoolState::new(1);
        let path = Seen::Failed { path: true };
        for i in 0..3 {
            let target = format!("db-{i}:5432");
            assert!(!fleet.observe(&pool(&target), &target, Seen::Healthy, &state, at(0)));
        }
        assert!(!fleet.observe(&pool("db-0:5432"), "db-0:5432", path, &state, at(5)));
        assert!(fleet.observe(&pool("db-1:5432"), "db-1:5432", path, &state, at(6)));
        assert!(metrics.is_fleet_suspect());
        let refused = Seen::Failed { path: false };
        assert!(!fleet.observe(&pool("db-0:5432"), "db-0:5432", refused, &state, at(7)));
        // db-0 refusing: one of three on the path, the episode ends.
        assert!(!metrics.is_fleet_suspect());
        assert!(fleet.observe(&pool("db-2:5432"), "db-2:5432", path, &state, at(8)));
        let mut held = PoolState::new(1);
        held.held_since = Some(at(8));
        assert!(fleet.observe(&pool("db-2:5432"), "db-2:5432", path, &held, at(67)));
        assert!(!fleet.observe(&pool("db-2:5432"), "db-2:5432", path, &held, at(68)));
        drop(fleet);
        assert!(
            !metrics.is_fleet_suspect(),
            "a dropped context suspects nothing"
        );
    }

    #[test]
    fn a_disabled_guard_reports_but_never_holds() {
        let metrics = Arc::new(Metrics::new());
        let fleet = Fleet::new(
            FleetGuardSettings {
                enabled: false,
                ..settings()
            },
            metrics.clone(),
        );
        let state = PoolState::new(1);
        for i in 0..3 {
            let target = format!("db-{i}:5432");
            fleet.observe(&pool(&target), &target, Seen::Healthy, &state, at(0));
        }
        for i in 0..3 {
            let target = format!("db-{i}:5432");
            let path = Seen::Failed { path: true };
            assert!(!fleet.observe(&pool(&target), &target, path, &state, at(5)));
        }
        assert!(metrics.is_fleet_suspect());
    }

    #[test]
    fn a_target_is_forgotten_with_its_last_pool() {
        let fleet = Fleet::new(settings(), Arc::new(Metrics::new()));
        let state = PoolState::new(1);
        fleet.observe(&pool("a"), "db:1", Seen::Healthy, &state, at(0));
        fleet.observe(&pool("b"), "db:1", Seen::Healthy, &state, at(0));
        fleet.forget(&pool("a"));
        assert_eq!(lock(&fleet.inner).guard.evaluate(at(1)).eligible, 1);
        fleet.forget(&pool("b"));
        assert_eq!(lock(&fleet.inner).guard.evaluate(at(1)).eligible, 0);
    }
}
