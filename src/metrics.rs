//! Prometheus metrics of one operator process, and its readiness/leadership flags.
//!
//! Lives here: the metric families (names follow the incident report's `pool_*` metrics with a
//! `dbpool_` prefix), the per-pool label set, and text encoding for `/metrics`. Must not live
//! here: deciding what happened (the controller reports it) or serving HTTP (`main.rs`).
//!
//! Per-pool series are labelled `namespace` and `name` and are removed when the pool is deleted.
//! The probe latency histogram is labelled by `stage` only: per-pool histograms would cost a dozen
//! series per pool and stage, which does not scale to thousands of pools.

use std::{
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::api::{BreakerState, ProbeOutcome, ProbeStage};

/// Labels of every per-pool series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// Namespace of the DbPool.
    pub namespace: String,
    /// Name of the DbPool.
    pub name: String,
}

/// Breaker state as a label value.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum StateLabel {
    /// Closed.
    closed,
    /// Open.
    open,
    /// HalfOpen.
    half_open,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    namespace: String,
    name: String,
    state: StateLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    namespace: String,
    name: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: String,
}

/// The operator's metrics, readiness and leadership.
pub struct Metrics {
    registry: Registry,
    recovery_attempts: Family<PoolLabels, Counter>,
    breaker_state: Family<BreakerLabels, Gauge>,
    consecutive_failures: Family<PoolLabels, Gauge>,
    health_check_failures: Family<PoolLabels, Counter>,
    probes: Family<ProbeLabels, Counter>,
    results_shared: Family<PoolLabels, Counter>,
    probe_duration: Family<StageLabels, Histogram>,
    status_writes: Family<PoolLabels, Counter>,
    reconcile_errors: Family<PoolLabels, Counter>,
    probe_timeout: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    probe_srtt: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    leader: Gauge,
    controller_contexts: Gauge,
    fleet_suspect: Gauge,
    fleet_held_openings: Counter,
    readiness_pings: Family<ResultLabels, Counter>,
    early_trials: Counter,
    ready: AtomicBool,
    is_leader: AtomicBool,
    /// Since when the watches have failed without a success in between.
    watch_failing_since: Mutex<Option<Instant>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every family registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dbpool");
        let recovery_attempts = Family::<PoolLabels, Counter>::default();
        registry.register(
            "recovery_attempts",
            "Probes made while the pool was failing (each retry of the recovery schedule)",
            recovery_attempts.clone(),
        );
        let breaker_state = Family::<BreakerLabels, Gauge>::default();
        registry.register(
            "circuit_breaker_state",
            "Circuit breaker state: 1 for the current state, 0 for the others",
            breaker_state.clone(),
        );
        let consecutive_failures = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "consecutive_failures",
            "Failed probes in a row",
            consecutive_failures.clone(),
        );
        let health_check_failures = Family::<PoolLabels, Counter>::default();
        registry.register(
            "health_check_failures",
            "Failed probes (any kind of failure)",
            health_check_failures.clone(),
        );
        let probes = Family::<ProbeLabels, Counter>::default();
        registry.register("probes", "Probes run, by outcome", probes.clone());
        let results_shared = Family::<PoolLabels, Counter>::default();
        registry.register(
            "probe_results_shared",
            "Results of another pool's equivalent probe taken instead of probing",
            results_shared.clone(),
        );
        let probe_duration = Family::<StageLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ])
        });
        registry.register(
            "probe_duration_seconds",
            "Duration of each probe stage that ran",
            probe_duration.clone(),
        );
        let status_writes = Family::<PoolLabels, Counter>::default();
        registry.register(
            "status_writes",
            "Status writes to the apiserver",
            status_writes.clone(),
        );
        let reconcile_errors = Family::<PoolLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that ended in an error (apiserver or Secret access)",
            reconcile_errors.clone(),
        );
        let probe_timeout = Family::<PoolLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "probe_stage_timeout_seconds",
            "The longest timeout one probe stage gets (learned when healthCheck.adaptiveTimeout, else healthCheck.timeout)",
            probe_timeout.clone(),
        );
        let probe_srtt = Family::<PoolLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "probe_stage_srtt_seconds",
            "Smoothed latency of the stage whose learned timeout is the longest (the latency it came from)",
            probe_srtt.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this process holds the leader lease",
            leader.clone(),
        );
        let controller_contexts = Gauge::default();
        registry.register(
            "controller_contexts",
            "Live controller contexts (probe connections, caches, pool map): 1 while leading, else 0",
            controller_contexts.clone(),
        );
        let fleet_suspect = Gauge::default();
        registry.register(
            "fleet_suspect",
            "1 while the fleet guard suspects the operator's own network (most targets that were healthy fail on the network path at once); breakers are then held from opening",
            fleet_suspect.clone(),
        );
        let fleet_held_openings = Counter::default();
        registry.register(
            "fleet_held_openings",
            "Breaker openings the fleet guard held (one per pool per hold)",
            fleet_held_openings.clone(),
        );
        let readiness_pings = Family::<ResultLabels, Counter>::default();
        registry.register(
            "readiness_pings",
            "Readiness pings (no password) of targets whose pools wait out an outage, by result",
            readiness_pings.clone(),
        );
        let early_trials = Counter::default();
        registry.register(
            "early_trials",
            "Early trials granted: credentialed attempts made at once because a readiness ping saw the database accepting again (each also counts in recovery_attempts)",
            early_trials.clone(),
        );
        Self {
            registry,
            readiness_pings,
            early_trials,
            fleet_suspect,
            fleet_held_openings,
            recovery_attempts,
            breaker_state,
            consecutive_failures,
            health_check_failures,
            probes,
            results_shared,
            probe_duration,
            status_writes,
            reconcile_errors,
            probe_timeout,
            probe_srtt,
            leader,
            controller_contexts,
            ready: AtomicBool::new(false),
            is_leader: AtomicBool::new(false),
            watch_failing_since: Mutex::new(None),
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Creates every per-pool series of `pool` at 0 (the breaker gauges say Closed), so
    /// Prometheus sees a new pool's counters before their first increase: `increase()` over a
    /// series that appears at 1 misses that first attempt. Called when a process first
    /// reconciles a pool; series that already exist keep their values.
    pub fn pool_seen(&self, pool: &PoolLabels) {
        // get_or_create returns a read guard; it is dropped at once.
        drop(self.recovery_attempts.get_or_create(pool));
        drop(self.consecutive_failures.get_or_create(pool));
        drop(self.health_check_failures.get_or_create(pool));
        drop(self.results_shared.get_or_create(pool));
        drop(self.status_writes.get_or_create(pool));
        drop(self.reconcile_errors.get_or_create(pool));
        for outcome in ProbeOutcome::ALL {
            drop(self.probes.get_or_create(&ProbeLabels {
                namespace: pool.namespace.clone(),
                name: pool.name.clone(),
                outcome: outcome.name().to_owned(),
            }));
        }
        for state in [StateLabel::closed, StateLabel::open, StateLabel::half_open] {
            let labels = BreakerLabels {
                namespace: pool.namespace.clone(),
                name: pool.name.clone(),
                state,
            };
            if self.breaker_state.get(&labels).is_none() {
                self.breaker_state
                    .get_or_create(&labels)
                    .set(i64::from(state == StateLabel::closed));
            }
        }
    }

    /// Records a finished probe of `pool`.
    pub fn probe_finished(
        &self,
        pool: &PoolLabels,
        outcome: ProbeOutcome,
        recovering: bool,
        stages: &[(ProbeStage, std::time::Duration)],
    ) {
        self.probes
            .get_or_create(&ProbeLabels {
                namespace: pool.namespace.clone(),
                name: pool.name.clone(),
                outcome: outcome.name().to_owned(),
            })
            .inc();
        if outcome != ProbeOutcome::Success {
            self.health_check_failures.get_or_create(pool).inc();
        }
        if recovering {
            self.recovery_attempts.get_or_create(pool).inc();
        }
        for (stage, took) in stages {
            self.probe_duration
                .get_or_create(&StageLabels {
                    stage: stage.name().to_owned(),
                })
                .observe(took.as_secs_f64());
        }
    }

    /// Sets the stage timeout `pool`'s probes get, and the smoothed latency it was learned from.
    pub fn probe_timeout(&self, pool: &PoolLabels, timeout: Duration, srtt: Duration) {
        self.probe_timeout
            .get_or_create(pool)
            .set(timeout.as_secs_f64());
        self.probe_srtt.get_or_create(pool).set(srtt.as_secs_f64());
    }

    /// Counts a result of another pool's equivalent probe that `pool` took instead of probing.
    pub fn result_shared(&self, pool: &PoolLabels) {
        self.results_shared.get_or_create(pool).inc();
    }

    /// Sets the breaker and failure gauges of `pool`.
    pub fn pool_state(&self, pool: &PoolLabels, breaker: BreakerState, consecutive_failures: u32) {
        for (state, label) in [
            (BreakerState::Closed, StateLabel::closed),
            (BreakerState::Open, StateLabel::open),
            (BreakerState::HalfOpen, StateLabel::half_open),
        ] {
            self.breaker_state
                .get_or_create(&BreakerLabels {
                    namespace: pool.namespace.clone(),
                    name: pool.name.clone(),
                    state: label,
                })
                .set(i64::from(state == breaker));
        }
        self.consecutive_failures
            .get_or_create(pool)
            .set(i64::from(consecutive_failures));
    }

    /// Counts a status write of `pool`.
    pub fn status_written(&self, pool: &PoolLabels) {
        self.status_writes.get_or_create(pool).inc();
    }

    /// Counts a failed reconcile of `pool`.
    pub fn reconcile_failed(&self, pool: &PoolLabels) {
        self.reconcile_errors.get_or_create(pool).inc();
    }

    /// Removes every per-pool series (this process stopped leading: a standby exports none, so a
    /// stale breaker state can neither fire nor hide an alert).
    pub fn forget_all_pools(&self) {
        self.fleet_suspect.set(0);
        self.recovery_attempts.clear();
        self.breaker_state.clear();
        self.consecutive_failures.clear();
        self.health_check_failures.clear();
        self.probes.clear();
        self.results_shared.clear();
        self.status_writes.clear();
        self.reconcile_errors.clear();
        self.probe_timeout.clear();
        self.probe_srtt.clear();
    }

    /// Removes every series of a deleted pool.
    pub fn forget(&self, pool: &PoolLabels) {
        self.recovery_attempts.remove(pool);
        self.consecutive_failures.remove(pool);
        self.health_check_failures.remove(pool);
        self.results_shared.remove(pool);
        self.status_writes.remove(pool);
        self.reconcile_errors.remove(pool);
        self.probe_timeout.remove(pool);
        self.probe_srtt.remove(pool);
        for state in [StateLabel::closed, StateLabel::open, StateLabel::half_open] {
            self.breaker_state.remove(&BreakerLabels {
                namespace: pool.namespace.clone(),
                name: pool.name.clone(),
                state,
            });
        }
        for outcome in ProbeOutcome::ALL {
            self.probes.remove(&ProbeLabels {
                namespace: pool.namespace.clone(),
                name: pool.name.clone(),
                outcome: outcome.name().to_owned(),
            });
        }
    }

    /// Sets `dbpool_fleet_suspect` (the fleet guard's verdict).
    pub fn fleet_suspect(&self, suspect: bool) {
        self.fleet_suspect.set(i64::from(suspect));
    }

    /// The current `dbpool_fleet_suspect`.
    pub fn is_fleet_suspect(&self) -> bool {
        self.fleet_suspect.get() == 1
    }

    /// Counts a readiness ping by its result.
    pub fn readiness_ping(&self, result: crate::probe::Readiness) {
        self.readiness_pings
            .get_or_create(&ResultLabels {
                result: result.name().to_owned(),
            })
            .inc();
    }

    /// Counts an early trial granted to a pool.
    pub fn early_trial_granted(&self) {
        self.early_trials.inc();
    }

    /// Counts a breaker opening the fleet guard held (the start of one pool's hold).
    pub fn fleet_opening_held(&self) {
        self.fleet_held_openings.inc();
    }

    /// Counts a controller context created (+1) or dropped (-1).
    pub fn controller_context(&self, delta: i64) {
        self.controller_contexts.inc_by(delta);
    }

    /// Live controller contexts in this process.
    pub fn controller_contexts(&self) -> i64 {
        self.controller_contexts.get()
    }

    /// A watch request failed; the failing streak starts now unless it already runs.
    pub fn watch_failed(&self) {
        let mut since = self
            .watch_failing_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        since.get_or_insert_with(Instant::now);
    }

    /// A watch delivered an event: the failing streak (if any) is over.
    pub fn watch_succeeded(&self) {
        *self
            .watch_failing_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// How long the watches have been failing without a success, if they are.
    pub fn watches_failing_for(&self) -> Option<Duration> {
        self.watch_failing_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|since| since.elapsed())
    }

    /// Marks the process ready (or not): caches synced, or a standby able to take over.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether `/readyz` should answer 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Records whether this process holds the leader lease.
    pub fn set_leader(&self, leader: bool) {
        self.is_leader.store(leader, Ordering::Relaxed);
        self.leader.set(i64::from(leader));
    }

    /// Whether this process holds the leader lease (always true without leader election).
    pub fn is_leader(&self) -> bool {
        self.is_leader.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Label values come from explicit names and keep the strings dashboards and alerts use.
    #[test]
    fn label_values_keep_their_spelling() {
        let metrics = Metrics::new();
        let pool = PoolLabels {
            namespace: "shop".into(),
            name: "orders".into(),
        };
        metrics.probe_finished(
            &pool,
            ProbeOutcome::TransientFailure,
            true,
            &[(ProbeStage::Connect, Duration::from_millis(3))],
        );
        metrics.pool_state(&pool, BreakerState::HalfOpen, 2);
        let text = metrics.encode();
        for expected in [
            r#"dbpool_probes_total{namespace="shop",name="orders",outcome="TransientFailure"} 1"#,
            r#"stage="Connect""#,
            r#"dbpool_circuit_breaker_state{namespace="shop",name="orders",state="half_open"} 1"#,
        ] {
            assert!(text.contains(expected), "{expected} not in:\n{text}");
        }
    }

    fn pool(name: &str) -> PoolLabels {
        PoolLabels {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    /// The value of the sample `series` (exact text before the value), if exported.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_per_pool_series_exists_at_zero_once_a_pool_is_seen() {
        let metrics = Metrics::new();
        let orders = pool("orders");
        assert_eq!(
            sample(
                &metrics.encode(),
                r#"dbpool_recovery_attempts_total{namespace="shop",name="orders"}"#
            ),
            None
        );
        metrics.pool_seen(&orders);
        let text = metrics.encode();
        let labels = r#"{namespace="shop",name="orders"}"#;
        for family in [
            "dbpool_recovery_attempts_total",
            "dbpool_consecutive_failures",
            "dbpool_health_check_failures_total",
            "dbpool_probe_results_shared_total",
            "dbpool_status_writes_total",
            "dbpool_reconcile_errors_total",
        ] {
            assert_eq!(
                sample(&text, &format!("{family}{labels}")),
                Some(0.0),
                "{family}\n{text}"
            );
        }
        for outcome in ProbeOutcome::ALL {
            let series = format!(
                r#"dbpool_probes_total{{namespace="shop",name="orders",outcome="{}"}}"#,
                outcome.name()
            );
            assert_eq!(sample(&text, &series), Some(0.0), "{series}\n{text}");
        }
        for (state, value) in [("closed", 1.0), ("open", 0.0), ("half_open", 0.0)] {
            let series = format!(
                r#"dbpool_circuit_breaker_state{{namespace="shop",name="orders",state="{state}"}}"#
            );
            assert_eq!(sample(&text, &series), Some(value), "{series}\n{text}");
        }
    }

    #[test]
    fn seeing_a_pool_again_keeps_its_values() {
        let metrics = Metrics::new();
        let orders = pool("orders");
        metrics.pool_seen(&orders);
        metrics.probe_finished(&orders, ProbeOutcome::TransientFailure, true, &[]);
        metrics.pool_state(&orders, BreakerState::Open, 5);
        metrics.pool_seen(&orders);
        let text = metrics.encode();
        let labels = r#"{namespace="shop",name="orders"}"#;
        assert_eq!(
            sample(&text, &format!("dbpool_recovery_attempts_total{labels}")),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, &format!("dbpool_consecutive_failures{labels}")),
            Some(5.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"dbpool_circuit_breaker_state{namespace="shop",name="orders",state="open"}"#
            ),
            Some(1.0)
        );
        // Forgetting removes what pool_seen created.
        metrics.forget(&orders);
        assert!(!metrics.encode().contains(r#"name="orders""#));
    }
}
