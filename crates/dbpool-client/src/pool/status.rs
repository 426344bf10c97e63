//! Reporting: what the pool knows now, and an end-to-end check with a recommendation.
//!
//! Lives here: [`Pool::status`] (a snapshot under the lock, no I/O) and [`Pool::health_check`]
//! (a connection and `SELECT 1`, counted in the metrics when it fails). Must not live here: the
//! report types and the rule from a status to a recommendation (`crate::report`), or any change
//! to the pool's state.

use std::sync::atomic::Ordering;

use dbpool_recovery::phase;
use tokio::time::Instant;

use super::Pool;
use crate::report::{HealthReport, PoolStatus, Recommendation};

impl Pool {
    /// What the pool knows now, without any I/O.
    pub fn status(&self) -> PoolStatus {
        let s = self.inner.lock();
        PoolStatus {
            phase: phase(&s.engine),
            breaker: s.engine.breaker,
            breaker_since: s.engine.breaker_since,
            next_attempt: self.inner.next_attempt(&s),
            consecutive_failures: s.engine.consecutive_failures,
            idle: s.idle.len(),
            in_use: s.in_use,
            connecting: s.connecting,
            max_size: s.options.max_size,
            last_error: s.last_error.clone(),
            last_success: s.engine.last_success_at,
            connects_started: self.inner.connects.load(Ordering::Relaxed),
            dbpool_breaker: s.hint_breaker,
            breaker_mode: s.policy.mode,
            pings_started: s.ready.pings,
            readiness_followed: s.ready.followed,
        }
    }

    /// Checks the pool end to end (a connection and `SELECT 1`) and says what to do about it.
    pub async fn health_check(&self) -> HealthReport {
        let started = Instant::now();
        let result = match self.get().await {
            Ok(client) => match client.simple_query("SELECT 1").await {
                Ok(_) => Ok(()),
                Err(e) => Err(format!("SELECT 1 failed: {e}")),
            },
            Err(e) => Err(e.to_string()),
        };
        let latency = started.elapsed();
        if result.is_err()
            && let Some(m) = &self.inner.metrics
        {
            m.health_check_failure(&self.inner.name);
        }
        let status = self.status();
        let recommendation = Recommendation::for_status(&status, result.is_ok());
        HealthReport {
            healthy: result.is_ok(),
            error: result.err(),
            latency,
            recommendation,
            status,
        }
    }
}
