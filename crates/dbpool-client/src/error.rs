//! The errors `get()` returns, each carrying the real cause.
//!
//! Lives here: [`Cause`] (a classified failure: stage, SQLSTATE, message, when) and
//! [`PoolError`]. Must not live here: classification itself (`dbpool-probe` owns it) or deciding
//! which error to return (`pool`).

use std::{fmt, time::Duration};

use dbpool_probe::{ProbeOutcome, ProbeStage, SessionError};
use jiff::Timestamp;

/// A classified failure of the database, as the pool last saw it. Never contains a password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    /// Outage (TransientFailure, WrongRole) or configuration mistake (ConfigFailure).
    pub outcome: ProbeOutcome,
    /// The stage that failed (Connect, Tls, Auth, Role, Query ...).
    pub stage: ProbeStage,
    /// SQLSTATE of the server's error, when there was one (e.g. 28P01, 53300, 57P01).
    pub sql_state: Option<String>,
    /// What happened, for people.
    pub message: String,
    /// When it happened.
    pub at: Timestamp,
}

impl Cause {
    /// A cause from a session error seen at `at`.
    pub(crate) fn from_session(e: &SessionError, at: Timestamp) -> Self {
        Self {
            outcome: e.outcome,
            stage: e.stage,
            sql_state: e.sql_state.clone(),
            message: e.message.clone(),
            at,
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} failed at {}: {}",
            self.stage.name(),
            self.at,
            self.message
        )
    }
}

/// Why `get()` returned no connection.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PoolError {
    /// The circuit breaker is Open (or HalfOpen, trial running): returned at once.
    #[error("circuit breaker {state:?} since {}, next trial {}{}: {}",
        at(.since), next(.next_trial),
        if *.forced { " (held open: breaker.mode ForcedOpen)" } else { "" },
        .cause.as_ref().map_or_else(|| "no failure recorded".to_owned(), ToString::to_string))]
    BreakerOpen {
        /// Open or HalfOpen.
        state: dbpool_recovery::BreakerState,
        /// The last failure, if any was seen locally.
        cause: Option<Cause>,
        /// When the breaker entered its state.
        since: Option<Timestamp>,
        /// When the next trial connect is due (None: now or in flight).
        next_trial: Option<Timestamp>,
        /// The DbPool holds the breaker open (`breaker.mode: ForcedOpen`).
        forced: bool,
    },
    /// The last connect failed with a configuration mistake (wrong password, unknown
    /// database, TLS): returned at once, and the breaker stays closed.
    #[error("configuration error: {cause}")]
    Config {
        /// The failure.
        cause: Cause,
    },
    /// The database is failing and no connection came within `acquire_timeout` (or the next
    /// recovery attempt is due after it): the real last error.
    #[error("database unavailable (waited {waited:?}): {cause}")]
    Unavailable {
        /// The last failure.
        cause: Cause,
        /// How long `get()` waited.
        waited: Duration,
    },
    /// Every connection was in use for `acquire_timeout`.
    #[error("all {max_size} connections in use for {waited:?}")]
    Exhausted {
        /// The pool's maximum size.
        max_size: usize,
        /// How long `get()` waited.
        waited: Duration,
    },
    /// The pool was closed.
    #[error("pool closed")]
    Closed,
}

impl PoolError {
    /// The underlying failure, when there is one.
    pub fn cause(&self) -> Option<&Cause> {
        match self {
            Self::BreakerOpen { cause, .. } => cause.as_ref(),
            Self::Config { cause } | Self::Unavailable { cause, .. } => Some(cause),
            Self::Exhausted { .. } | Self::Closed => None,
        }
    }

    /// SQLSTATE of the underlying failure, when the server sent one.
    pub fn sql_state(&self) -> Option<&str> {
        self.cause().and_then(|c| c.sql_state.as_deref())
    }

    /// Whether this is the breaker answering.
    pub fn is_breaker_open(&self) -> bool {
        matches!(self, Self::BreakerOpen { .. })
    }
}

fn at(t: &Option<Timestamp>) -> String {
    t.map_or_else(|| "start".to_owned(), |t| t.to_string())
}

fn next(t: &Option<Timestamp>) -> String {
    t.map_or_else(|| "now".to_owned(), |t| format!("at {t}"))
}
