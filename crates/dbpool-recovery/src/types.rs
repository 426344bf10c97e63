//! The engine's own state enums: breaker mode, breaker state and phase.
//!
//! Lives here: the three enums the engine decides on, with the serde and JSON-schema derives the
//! DbPool API needs, so `dbpool-api` re-exports them instead of mirroring them. Their doc comments
//! become the CRD's schema descriptions (`kubectl explain`). Must not live here: anything that
//! needs kube or k8s-openapi (this crate cannot see them), and any behaviour beyond naming.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the circuit breaker behaves.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum BreakerMode {
    /// Opens on failures and closes on recovery.
    #[default]
    Auto,
    /// Held open (e.g. during maintenance); probes continue so status stays true.
    ForcedOpen,
    /// Never opens; failures are still counted and reported.
    Disabled,
}

/// Circuit breaker states.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum BreakerState {
    /// Normal operation.
    #[default]
    Closed,
    /// Too many failures: the database is treated as unavailable until openTimeout passes.
    Open,
    /// Trial: the next probes decide between Closed and Open.
    HalfOpen,
}

impl BreakerState {
    /// Value of the `dbpool.io/breaker` label for this state.
    pub fn label_value(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

/// Overall health of a pool.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Not probed yet.
    Pending,
    /// Last probe succeeded and the breaker is closed.
    Healthy,
    /// Reachable but limited: pool.maxSize would not fit into the server's free connection slots.
    Degraded,
    /// Retrying on the backoff schedule after an outage failure.
    Recovering,
    /// The breaker is open (or half-open): the database is treated as unavailable.
    BreakerOpen,
    /// maxAttempts failures in a row: waiting out the cooldown before a new cycle.
    CoolingDown,
    /// The last failure is a configuration problem (credentials, database name, TLS, Secret).
    ConfigError,
}
