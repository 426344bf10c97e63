//! The fleet guard: is a burst of path failures across many targets more likely the operator's
//! own network than many databases failing at once?
//!
//! Lives here: [`FleetGuard`] (per namespace and target: when it was last healthy, since when it
//! fails and whether its latest failure is path evidence; the verdict at an instant),
//! [`FleetGuardConfig`] and [`FleetVerdict`]. Pure: time is passed in. Must not live here: which
//! probe failures are path evidence (`dbpool-probe` classifies them), what a verdict does to a
//! breaker ([`apply_guarded`](crate::apply_guarded)), or how long a pool may be held (the
//! controller decides, with `--fleet-guard-max-hold`).
//!
//! # Rule
//!
//! An entry is one `(namespace, target)`. At `now`, with the window `W` and the anchor `a` (the
//! start of the current suspect episode, or `now` outside one):
//!
//! - **eligible**: the entry was healthy at some point, and either its latest result is a
//!   success, or its current failure streak began at or after `a − W` (it was healthy in the
//!   interval before). Targets that never answered, or that have been failing since before the
//!   window, are neither evidence for nor against.
//! - **path-failing**: eligible, failing, and its latest failure is path evidence (a timeout,
//!   an unreachable network, a DNS failure). A refused connection is a failure that proves the
//!   path works: the entry stays eligible and counts against suspicion.
//! - A namespace **agrees** when at least `share` of its eligible entries are path-failing.
//! - The fleet is **suspect** when at least `min_targets` entries are eligible, at least `share`
//!   of the namespaces with eligible entries agree, and at least two namespaces agree (or the one
//!   namespace, when only one has eligible entries).
//!
//! Namespaces vote, each with one voice whatever its number of pools, and one namespace alone
//! never decides for the others: a tenant whose pools all fail (or who points many pools at
//! addresses it then firewalls) can hold only its own breakers, and only when it is the only
//! tenant. Once suspect, the anchor stays at the episode's start, so a partition that lasts
//! longer than `W` stays suspect while its targets keep failing; the episode ends at the first
//! verdict that is not suspect (enough targets answer again, or refuse).

use std::collections::HashMap;
use std::time::Duration;

use jiff::Timestamp;

/// Entries the guard keeps at most; records of new entries beyond it are dropped (the guard
/// then sees fewer targets, which only makes it more reluctant to trip).
pub const MAX_FLEET_ENTRIES: usize = 65_536;

/// An entry not recorded for this long (a deleted pool's target) is forgotten.
pub const FLEET_ENTRY_TTL: Duration = Duration::from_secs(24 * 3600);

/// Tuning of the fleet guard.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FleetGuardConfig {
    /// Share (0..=1] of eligible targets per namespace, and of namespaces, that must agree.
    pub share: f64,
    /// Eligible targets (namespace and `host:port`) needed before the guard may trip.
    pub min_targets: u32,
    /// How recent a failure streak's start must be to count (and how long before the
    /// failure a target must have been healthy).
    pub window: Duration,
}

/// The guard's verdict at one instant, with the figures that led to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetVerdict {
    /// Breakers should not open on path evidence now.
    pub suspect: bool,
    /// Eligible entries (namespace, target).
    pub eligible: u32,
    /// Of those, path-failing.
    pub path_failing: u32,
    /// Namespaces with eligible entries.
    pub namespaces: u32,
    /// Namespaces that agree.
    pub agreeing: u32,
}

#[derive(Clone, Debug)]
struct Entry {
    healthy_at: Option<Timestamp>,
    failing_since: Option<Timestamp>,
    path: bool,
    seen_at: Timestamp,
}

/// What the fleet guard knows: one entry per namespace and target.
#[derive(Clone, Debug)]
pub struct FleetGuard {
    config: FleetGuardConfig,
    entries: HashMap<(String, String), Entry>,
    episode: Option<Timestamp>,
}

impl FleetGuard {
    /// An empty guard (not suspect) with `config`; `share` is clamped to `[0.01, 1]`.
    pub fn new(mut config: FleetGuardConfig) -> Self {
        config.share = if config.share.is_nan() {
            1.0
        } else {
            config.share.clamp(0.01, 1.0)
        };
        Self {
            config,
            entries: HashMap::new(),
            episode: None,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> FleetGuardConfig {
        self.config
    }

    /// A probe of `target` for a pool in `namespace` succeeded at `at`.
    pub fn healthy(&mut self, namespace: &str, target: &str, at: Timestamp) {
        if let Some(e) = self.entry(namespace, target, at) {
            e.healthy_at = Some(e.healthy_at.map_or(at, |h| h.max(at)));
            e.failing_since = None;
            e.path = false;
        }
    }

    /// A probe of `target` for a pool in `namespace` failed at `at`; `path` when the failure is
    /// evidence about the network path (timeout, unreachable, DNS), false when a server answered
    /// or refused.
    pub fn failed(&mut self, namespace: &str, target: &str, at: Timestamp, path: bool) {
        if let Some(e) = self.entry(namespace, target, at) {
            if e.failing_since.is_none() {
                e.failing_since = Some(at);
            }
            e.path = path;
        }
    }

    /// Forgets every entry of `namespace` and `target`.
    pub fn forget(&mut self, namespace: &str, target: &str) {
        self.entries
            .remove(&(namespace.to_owned(), target.to_owned()));
    }

    fn entry(&mut self, namespace: &str, target: &str, at: Timestamp) -> Option<&mut Entry> {
        let key = (namespace.to_owned(), target.to_owned());
        if !self.entries.contains_key(&key) && self.entries.len() >= MAX_FLEET_ENTRIES {
            return None;
        }
        let e = self.entries.entry(key).or_insert(Entry {
            healthy_at: None,
            failing_since: None,
            path: false,
            seen_at: at,
        });
        e.seen_at = e.seen_at.max(at);
        Some(e)
    }

    /// The verdict at `now` (see the module docs); starts or ends the suspect episode.
    pub fn evaluate(&mut self, now: Timestamp) -> FleetVerdict {
        let ttl_start = now
            .saturating_sub(FLEET_ENTRY_TTL)
            .unwrap_or(Timestamp::MIN);
        self.entries.retain(|_, e| e.seen_at >= ttl_start);
        let verdict = self.verdict_at(now, self.episode.unwrap_or(now));
        self.episode = match (verdict.suspect, self.episode) {
            (true, Some(start)) => Some(start),
            (true, None) => Some(now),
            (false, _) => None,
        };
        verdict
    }

    /// The verdict at `now` against the anchor `anchor`, changing nothing.
    fn verdict_at(&self, now: Timestamp, anchor: Timestamp) -> FleetVerdict {
        let from = anchor
            .saturating_sub(self.config.window)
            .unwrap_or(Timestamp::MIN);
        // namespace → (eligible, path-failing)
        let mut per_ns: HashMap<&str, (u32, u32)> = HashMap::new();
        for ((ns, _), e) in &self.entries {
            if e.healthy_at.is_none() {
                continue;
            }
            let (eligible, failing) = match e.failing_since {
                None => (true, false),
                Some(since) if since >= from && since <= now => (true, e.path),
                Some(_) => (false, false),
            };
            if eligible {
                let counts = per_ns.entry(ns.as_str()).or_default();
                counts.0 += 1;
                counts.1 += u32::from(failing);
            }
        }
        let share = self.config.share;
        let mut v = FleetVerdict::default();
        for (eligible, failing) in per_ns.values() {
            v.namespaces += 1;
            v.eligible += eligible;
            v.path_failing += failing;
            if *failing > 0 && f64::from(*failing) >= share * f64::from(*eligible) {
                v.agreeing += 1;
            }
        }
        v.suspect = v.eligible >= self.config.min_targets.max(1)
            && v.agreeing >= v.namespaces.min(2)
            && v.agreeing > 0
            && f64::from(v.agreeing) >= share * f64::from(v.namespaces);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("valid")
    }

    fn guard() -> FleetGuard {
        FleetGuard::new(FleetGuardConfig {
            share: 0.5,
            min_targets: 3,
            window: Duration::from_secs(30),
        })
    }

    fn healthy_fleet(g: &mut FleetGuard, ns: &str, n: usize, t: i64) {
        for i in 0..n {
            g.healthy(ns, &format!("db-{i}:5432"), at(t));
        }
    }

    #[test]
    fn most_healthy_targets_timing_out_together_is_suspect() {
        let mut g = guard();
        healthy_fleet(&mut g, "shop", 3, 0);
        g.failed("shop", "db-0:5432", at(10), true);
        assert!(!g.evaluate(at(10)).suspect, "one of three is not a fleet");
        g.failed("shop", "db-1:5432", at(12), true);
        let v = g.evaluate(at(12));
        assert!(v.suspect, "{v:?}");
        assert_eq!((v.eligible, v.path_failing, v.agreeing), (3, 2, 1));
    }

    #[test]
    fn refusals_and_server_answers_are_never_evidence() {
        let mut g = guard();
        healthy_fleet(&mut g, "shop", 3, 0);
        for i in 0..3 {
            g.failed("shop", &format!("db-{i}:5432"), at(10), false);
        }
        let v = g.evaluate(at(10));
        assert!(!v.suspect);
        assert_eq!((v.eligible, v.path_failing), (3, 0));
    }

    #[test]
    fn targets_never_healthy_or_failing_before_the_window_do_not_count() {
        let mut g = guard();
        // Dead since before the window, and never healthy at all.
        for i in 0..5 {
            g.healthy("shop", &format!("old-{i}:1"), at(0));
            g.failed("shop", &format!("old-{i}:1"), at(1), true);
            g.failed("shop", &format!("never-{i}:1"), at(100), true);
        }
        healthy_fleet(&mut g, "shop", 3, 90);
        g.failed("shop", "db-0:5432", at(100), true);
        let v = g.evaluate(at(100));
        assert!(!v.suspect, "{v:?}");
        assert_eq!((v.eligible, v.path_failing), (3, 1));
    }

    #[test]
    fn fewer_than_min_targets_never_trip() {
        let mut g = guard();
        healthy_fleet(&mut g, "shop", 2, 0);
        g.failed("shop", "db-0:5432", at(5), true);
        g.failed("shop", "db-1:5432", at(5), true);
        assert!(!g.evaluate(at(5)).suspect);
    }

    #[test]
    fn one_namespace_cannot_decide_for_another() {
        let mut g = guard();
        healthy_fleet(&mut g, "tenant-a", 6, 0);
        healthy_fleet(&mut g, "tenant-b", 3, 0);
        for i in 0..6 {
            g.failed("tenant-a", &format!("db-{i}:5432"), at(5), true);
        }
        g.failed("tenant-b", "db-0:5432", at(6), true);
        let v = g.evaluate(at(6));
        // Counted per target, 7 of 9 fail; per namespace only tenant-a agrees.
        assert_eq!((v.eligible, v.path_failing), (9, 7));
        assert_eq!((v.namespaces, v.agreeing), (2, 1));
        assert!(!v.suspect);
        // When tenant-b's targets go too, the fleet is suspect.
        g.failed("tenant-b", "db-1:5432", at(7), true);
        assert!(g.evaluate(at(7)).suspect);
    }

    #[test]
    fn an_episode_outlasts_the_window_until_targets_answer() {
        let mut g = guard();
        healthy_fleet(&mut g, "shop", 4, 0);
        for i in 0..4 {
            g.failed("shop", &format!("db-{i}:5432"), at(10), true);
        }
        assert!(g.evaluate(at(10)).suspect);
        // Long after the window, still the same partition.
        assert!(g.evaluate(at(300)).suspect);
        // Three of four answer again: over.
        for i in 0..3 {
            g.healthy("shop", &format!("db-{i}:5432"), at(301));
        }
        assert!(!g.evaluate(at(301)).suspect);
        // The one still failing since t=10 is no longer eligible for a new episode.
        let v = g.evaluate(at(302));
        assert_eq!((v.eligible, v.path_failing), (3, 0));
    }

    #[test]
    fn stale_entries_are_forgotten() {
        let mut g = guard();
        healthy_fleet(&mut g, "shop", 3, 0);
        g.forget("shop", "db-0:5432");
        assert_eq!(g.evaluate(at(1)).eligible, 2);
        let later = at(0)
            .checked_add(FLEET_ENTRY_TTL + Duration::from_secs(1))
            .expect("valid");
        assert_eq!(g.evaluate(later).eligible, 0);
    }

    proptest! {
        /// Whatever one namespace's pools do, with another namespace whose targets all answer
        /// the guard never trips.
        #[test]
        fn a_single_failing_namespace_never_trips_the_guard_for_a_healthy_one(
            results in proptest::collection::vec((0usize..20, 0i64..120, any::<bool>(), any::<bool>()), 0..200),
            share in 0.01f64..=1.0,
            min_targets in 1u32..6,
            healthy_targets in 1usize..5,
        ) {
            let mut g = FleetGuard::new(FleetGuardConfig {
                share, min_targets, window: Duration::from_secs(30),
            });
            healthy_fleet(&mut g, "quiet", healthy_targets, 0);
            for (target, t, ok, path) in results {
                let key = format!("t-{target}:1");
                if ok { g.healthy("noisy", &key, at(t)) } else { g.failed("noisy", &key, at(t), path) }
                // At share ≤ 0.5 one agreeing namespace of two passes the share test: the
                // two-namespace quorum must still stop it.
                prop_assert!(!g.evaluate(at(t)).suspect);
            }
        }

        /// Refusals (non-path failures) never make the fleet suspect.
        #[test]
        fn refusals_alone_never_trip(
            results in proptest::collection::vec((0usize..3, 0usize..20, 0i64..120, any::<bool>()), 0..200),
        ) {
            let mut g = guard();
            for (ns, target, t, ok) in results {
                let (ns, key) = (format!("ns-{ns}"), format!("t-{target}:1"));
                if ok { g.healthy(&ns, &key, at(t)) } else { g.failed(&ns, &key, at(t), false) }
                prop_assert!(!g.evaluate(at(t)).suspect);
            }
        }

        /// The verdict's figures are consistent, and a suspect verdict meets every threshold.
        #[test]
        fn verdicts_meet_their_thresholds(
            results in proptest::collection::vec((0usize..3, 0usize..6, 0i64..200, any::<bool>(), any::<bool>()), 0..200),
        ) {
            let mut g = guard();
            let mut t_max = 0;
            for (ns, target, t, ok, path) in results {
                t_max = t_max.max(t);
                let (ns, key) = (format!("ns-{ns}"), format!("t-{target}:1"));
                if ok { g.healthy(&ns, &key, at(t_max)) } else { g.failed(&ns, &key, at(t_max), path) }
                let v = g.evaluate(at(t_max));
                prop_assert!(v.path_failing <= v.eligible && v.agreeing <= v.namespaces);
                if v.suspect {
                    prop_assert!(v.eligible >= 3 && v.path_failing >= 1);
                    prop_assert!(f64::from(v.agreeing) >= 0.5 * f64::from(v.namespaces));
                    prop_assert!(v.agreeing >= v.namespaces.min(2));
                }
            }
        }
    }
}
