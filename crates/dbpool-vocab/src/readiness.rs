//! What a readiness ping says about a server: whether it accepts connections, without logging in.
//!
//! Lives here: [`Readiness`], the classified answer of one ping (`dbpool-probe`'s `ping`), with
//! the serde and JSON-schema derives a status needs, and the two questions callers ask of it.
//! Must not live here: how a ping is made or classified (`dbpool-probe`), when pings run or what
//! an edge means to a pool (the operator and `dbpool-recovery`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What one readiness ping learned about a server, without a password.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Readiness {
    /// The server asked for authentication: it accepts connections.
    Accepting,
    /// The server answered SQLSTATE 57P03: starting up, recovering or shutting down.
    StartingUp,
    /// Nothing accepted the connection: refused, reset, closed or timed out.
    Unreachable,
    /// The server answered the startup with another error before authentication (e.g. 53300,
    /// too many clients): it is up but not accepting this connection.
    Rejected,
    /// The answer was not PostgreSQL's (another protocol, a malformed or oversized message).
    NotPostgres,
    /// An answer about this pool's configuration, not the server's state: a rejected
    /// certificate, no TLS under require or verify-*, or a class-28 error (pg_hba). It belongs to
    /// the credential key that pinged and is never shared with other pools of the target.
    ConfigAnswer,
}

impl Readiness {
    /// Every answer, in declaration order.
    pub const ALL: [Self; 6] = [
        Self::Accepting,
        Self::StartingUp,
        Self::Unreachable,
        Self::Rejected,
        Self::NotPostgres,
        Self::ConfigAnswer,
    ];

    /// The answer's name as the API and the metrics' `result` label spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Accepting => "Accepting",
            Self::StartingUp => "StartingUp",
            Self::Unreachable => "Unreachable",
            Self::Rejected => "Rejected",
            Self::NotPostgres => "NotPostgres",
            Self::ConfigAnswer => "ConfigAnswer",
        }
    }

    /// Whether the server accepts connections.
    pub fn is_accepting(self) -> bool {
        self == Self::Accepting
    }

    /// Whether the answer is about the server alone, so every pool on the target may share it
    /// (refused, timeout, 57P03, accepting). A configuration answer stays with its credential
    /// key, and "rejected" or "not PostgreSQL" are kept by whoever pinged.
    pub fn is_shareable(self) -> bool {
        matches!(self, Self::Accepting | Self::StartingUp | Self::Unreachable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_serialized_form() {
        for readiness in Readiness::ALL {
            let wire = serde_json::to_value(readiness).unwrap_or_default();
            assert_eq!(wire, readiness.name());
        }
    }

    #[test]
    fn only_accepting_accepts_and_config_answers_are_not_shared() {
        assert!(Readiness::Accepting.is_accepting());
        for r in Readiness::ALL.into_iter().skip(1) {
            assert!(!r.is_accepting(), "{r:?}");
        }
        assert!(!Readiness::ConfigAnswer.is_shareable());
        assert!(!Readiness::NotPostgres.is_shareable());
        assert!(Readiness::StartingUp.is_shareable());
    }
}
