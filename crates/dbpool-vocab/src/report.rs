//! What one probe saw.
//!
//! Lives here: [`ProbeReport`], the result the probe hands to its callers (the operator's
//! controller, the DbPool status through `ProbeSummary::from_report`), made of std types and the
//! vocabulary's enums only. Must not live here: how a report is produced (`dbpool-probe`) or
//! written to a status (`dbpool-api`), and anything that needs a socket or database library.

use std::{net::SocketAddr, time::Duration};

use crate::{ProbeOutcome, ProbeStage};

/// What one probe saw. Never contains a password.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    /// Success, or which kind of failure.
    pub outcome: ProbeOutcome,
    /// The stage that failed, or the last stage run on success.
    pub stage: ProbeStage,
    /// Wall time of the whole probe.
    pub latency: Duration,
    /// What happened, short and for people.
    pub message: String,
    /// SQLSTATE of the server's error, when there was one.
    pub sql_state: Option<String>,
    /// `server_version` of the server.
    pub server_version: Option<String>,
    /// `pg_is_in_recovery()`: true on a standby.
    pub in_recovery: Option<bool>,
    /// Client backends open on the server.
    pub connections: Option<i64>,
    /// Connections ordinary roles may open: max_connections minus the reserved slots.
    pub max_connections: Option<i64>,
    /// `max_connections - connections`, never below zero.
    pub free_slots: Option<i64>,
    /// Whether `pool_max_size` more connections would fit into the free slots.
    pub pool_fits: Option<bool>,
    /// Whether this probe opened a new connection (false: it reused the persistent one).
    pub fresh_connection: bool,
    /// The failure is evidence about the network path, not the server (the fleet guard's
    /// evidence): a timeout of any stage, an unreachable network or host, or a failed host
    /// lookup. A refused connection, a reset or close, a SQLSTATE or a configuration failure
    /// never is: each proves something at the address answered (or that the spec is wrong).
    /// Always false on success. The one copy of this rule is `dbpool-probe`'s `classify`.
    pub path_evidence: bool,
    /// Wall time of each stage that ran, in order.
    pub stage_latencies: Vec<(ProbeStage, Duration)>,
    /// The resolved address (IP and port) of the session the checks ran on: one at which the
    /// probe authenticated to the declared database, found by resolving `host` when the session
    /// was opened (so a name that moves is followed at the next reconnect). `None` when no
    /// authenticated session was reached.
    pub peer: Option<SocketAddr>,
}

impl ProbeReport {
    /// Whether the probe succeeded.
    pub fn is_success(&self) -> bool {
        self.outcome == ProbeOutcome::Success
    }
}
