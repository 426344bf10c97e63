//! What the pool tells people: its status and a health report with a recommendation.
//!
//! Lives here: [`PoolStatus`], [`HealthReport`] and [`Recommendation`] (pure data, and the
//! rule from a status to a recommendation). Must not live here: gathering them (`pool`).

use std::{fmt, time::Duration};

use dbpool_probe::ProbeOutcome;
use dbpool_recovery::{BreakerMode, BreakerState, Phase};
use jiff::Timestamp;

use crate::error::Cause;

/// A snapshot of a pool, taken without I/O.
#[derive(Clone, Debug)]
pub struct PoolStatus {
    /// The engine's phase (Healthy, Recovering, BreakerOpen, CoolingDown, ConfigError ...).
    pub phase: Phase,
    /// The local breaker.
    pub breaker: BreakerState,
    /// When the local breaker entered its state.
    pub breaker_since: Option<Timestamp>,
    /// When the next connect attempt or probe is due (None: now or in flight).
    pub next_attempt: Option<Timestamp>,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Idle connections.
    pub idle: usize,
    /// Connections checked out.
    pub in_use: usize,
    /// Connects in flight.
    pub connecting: usize,
    /// Maximum size.
    pub max_size: usize,
    /// The last failure seen.
    pub last_error: Option<Cause>,
    /// When a probe last succeeded.
    pub last_success: Option<Timestamp>,
    /// Connects started since the pool was created (callers' and the supervisor's).
    pub connects_started: u64,
    /// The DbPool's breaker as last seen (None: no DbPool, or not seen yet).
    pub dbpool_breaker: Option<BreakerState>,
    /// The breaker mode in force (ForcedOpen: held open by the DbPool).
    pub breaker_mode: BreakerMode,
    /// Readiness pings this pool started (standalone; none while a DbPool watch is live).
    pub pings_started: u64,
    /// Whether readiness comes from a live DbPool watch (`status.readiness`) instead of pings.
    pub readiness_followed: bool,
}

/// What to do about a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recommendation {
    /// Nothing: the pool works.
    None,
    /// Fix the configuration (credentials, database name, TLS): retrying will not help.
    FixConfiguration {
        /// SQLSTATE of the failure, if any (e.g. 28P01: wrong password).
        sql_state: Option<String>,
    },
    /// The breaker is open; it tries again at `next_trial`. Call `force_reopen()` (or annotate
    /// the DbPool) if the database is known to be back.
    WaitOrForceReopen {
        /// When the next trial is due.
        next_trial: Option<Timestamp>,
    },
    /// The breaker is held open by `breaker.mode: ForcedOpen` on the DbPool (maintenance).
    HeldOpen,
    /// The database is failing and the pool is retrying on its backoff schedule.
    WaitForRecovery,
    /// Every connection is in use: raise the maximum size or shorten what holds connections.
    RaiseMaxSize,
}

impl Recommendation {
    /// The recommendation for `status`, given whether the end-to-end check just worked.
    pub fn for_status(status: &PoolStatus, healthy: bool) -> Self {
        if healthy {
            return Self::None;
        }
        if status.phase == Phase::ConfigError
            || status
                .last_error
                .as_ref()
                .is_some_and(|c| c.outcome == ProbeOutcome::ConfigFailure)
        {
            return Self::FixConfiguration {
                sql_state: status.last_error.as_ref().and_then(|c| c.sql_state.clone()),
            };
        }
        if status.breaker != BreakerState::Closed && status.breaker_mode == BreakerMode::ForcedOpen
        {
            return Self::HeldOpen;
        }
        if status.breaker != BreakerState::Closed {
            return Self::WaitOrForceReopen {
                next_trial: status.next_attempt,
            };
        }
        if status.in_use >= status.max_size {
            return Self::RaiseMaxSize;
        }
        Self::WaitForRecovery
    }
}

impl fmt::Display for Recommendation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("no action needed"),
            Self::FixConfiguration { sql_state } => write!(
                f,
                "fix the configuration (credentials, database, TLS){}; retrying will not help",
                sql_state
                    .as_ref()
                    .map(|c| format!(", SQLSTATE {c}"))
                    .unwrap_or_default()
            ),
            Self::WaitOrForceReopen { next_trial } => write!(
                f,
                "circuit breaker open: next trial at {}; force_reopen() if the database is back",
                next_trial.map_or_else(|| "now".to_owned(), |t| t.to_string())
            ),
            Self::HeldOpen => f.write_str("held open by breaker.mode ForcedOpen on the DbPool"),
            Self::WaitForRecovery => {
                f.write_str("database failing: retrying on the backoff schedule")
            }
            Self::RaiseMaxSize => f.write_str("all connections in use: raise max_size"),
        }
    }
}

/// The result of [`Pool::health_check`](crate::Pool::health_check).
#[derive(Clone, Debug)]
pub struct HealthReport {
    /// A connection was obtained and `SELECT 1` answered.
    pub healthy: bool,
    /// What failed, when it did.
    pub error: Option<String>,
    /// Time the check took.
    pub latency: Duration,
    /// What to do.
    pub recommendation: Recommendation,
    /// The pool's status after the check.
    pub status: PoolStatus,
}
