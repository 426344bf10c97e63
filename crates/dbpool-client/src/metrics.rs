//! The client's Prometheus metrics, on a registry the application passes in.
//!
//! Lives here: the four `dbpool_client_*` families (named after the origin's metrics, with a
//! `dbpool_client_` prefix so the operator's alerts never match application pods) and their
//! `pool` label. Must not live here: deciding what happened (`pool` reports it) or serving HTTP.

use dbpool_recovery::BreakerState;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    pool: String,
    state: String,
}

/// The client's metric families. Register them once per registry with
/// [`ClientMetrics::register`] and hand clones to every pool (each pool is its own `pool` label).
#[derive(Clone, Debug, Default)]
pub struct ClientMetrics {
    recovery_attempts: Family<PoolLabels, Counter>,
    breaker_state: Family<BreakerLabels, Gauge>,
    consecutive_failures: Family<PoolLabels, Gauge>,
    health_check_failures: Family<PoolLabels, Counter>,
}

impl ClientMetrics {
    /// Registers the families on `registry` as `dbpool_client_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("dbpool_client");
        r.register(
            "recovery_attempts",
            "Connect attempts made while the pool was failing (each retry of the schedule)",
            m.recovery_attempts.clone(),
        );
        r.register(
            "circuit_breaker_state",
            "Local circuit breaker state: 1 for the current state, 0 for the others",
            m.breaker_state.clone(),
        );
        r.register(
            "consecutive_failures",
            "Failed connects and checks in a row",
            m.consecutive_failures.clone(),
        );
        r.register(
            "health_check_failures",
            "Failed probes and failed health_check() calls",
            m.health_check_failures.clone(),
        );
        m
    }

    fn labels(pool: &str) -> PoolLabels {
        PoolLabels {
            pool: pool.to_owned(),
        }
    }

    pub(crate) fn recovery_attempt(&self, pool: &str) {
        self.recovery_attempts
            .get_or_create(&Self::labels(pool))
            .inc();
    }

    pub(crate) fn health_check_failure(&self, pool: &str) {
        self.health_check_failures
            .get_or_create(&Self::labels(pool))
            .inc();
    }

    pub(crate) fn set_state(&self, pool: &str, state: BreakerState, failures: u32) {
        for s in [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ] {
            self.breaker_state
                .get_or_create(&BreakerLabels {
                    pool: pool.to_owned(),
                    state: s.label_value().to_owned(),
                })
                .set(i64::from(s == state));
        }
        self.consecutive_failures
            .get_or_create(&Self::labels(pool))
            .set(i64::from(failures));
    }
}
