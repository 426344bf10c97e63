//! The probe's vocabulary: TLS mode, acceptable roles, stages and classified outcomes.
//!
//! Lives here: the four enums that the probe reads from a spec or reports in a result, with the
//! serde and JSON-schema derives the DbPool API needs (it re-exports them for the CRD), and the
//! one mapping from an outcome to the recovery engine's failure kind. Must not live here:
//! anything about Kubernetes, any probing logic, and the report of a probe (`report`).

use dbpool_recovery::FailureKind;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// TLS mode for the database connection (libpq's sslmode).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, plain otherwise; the certificate is not verified.
    #[default]
    Prefer,
    /// TLS required; the certificate is not verified.
    Require,
    /// TLS required; the certificate chain must lead to the CA in caSecretRef.
    VerifyCa,
    /// As verify-ca, and the certificate must also name the host.
    VerifyFull,
}

/// Which server roles are acceptable (libpq's target_session_attrs).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TargetSessionAttrs {
    /// Primaries and standbys alike.
    Any,
    /// Only a server that accepts writes; a standby is a WrongRole failure.
    #[default]
    ReadWrite,
}

/// Stages of a probe, in order.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ProbeStage {
    /// Reading the Secret(s) the spec refers to (done by the operator before connecting).
    Credentials,
    /// Resolving the host name.
    Resolve,
    /// Opening the TCP connection.
    Connect,
    /// TLS negotiation and certificate verification.
    Tls,
    /// Startup message and authentication.
    Auth,
    /// `SELECT 1`.
    Query,
    /// `pg_is_in_recovery()` against targetSessionAttrs.
    Role,
    /// Connection slots in use against max_connections.
    Saturation,
}

/// Classified outcome of a probe.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ProbeOutcome {
    /// The database answered and has the wanted role.
    Success,
    /// An outage: refused, reset, timed out, not accepting connections, out of connection slots.
    TransientFailure,
    /// A mistake in configuration: credentials, database name, TLS verification, missing Secret.
    ConfigFailure,
    /// Reachable, but a standby where targetSessionAttrs asks for read-write.
    WrongRole,
}

impl ProbeOutcome {
    /// Every outcome, in declaration order.
    pub const ALL: [Self; 4] = [
        Self::Success,
        Self::TransientFailure,
        Self::ConfigFailure,
        Self::WrongRole,
    ];

    /// The outcome's name as the API and the metrics' `outcome` label spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Success => "Success",
            Self::TransientFailure => "TransientFailure",
            Self::ConfigFailure => "ConfigFailure",
            Self::WrongRole => "WrongRole",
        }
    }

    /// What this outcome means to the recovery engine: `None` for a success, an outage for a
    /// transient failure or a wrong role (the server may be promoted or come back), a
    /// configuration failure otherwise. The one copy of this mapping (operator and client).
    pub fn failure_kind(self) -> Option<FailureKind> {
        match self {
            Self::Success => None,
            Self::ConfigFailure => Some(FailureKind::Config),
            Self::TransientFailure | Self::WrongRole => Some(FailureKind::Outage),
        }
    }
}

impl ProbeStage {
    /// Every stage, in the order a probe runs them.
    pub const ALL: [Self; 8] = [
        Self::Credentials,
        Self::Resolve,
        Self::Connect,
        Self::Tls,
        Self::Auth,
        Self::Query,
        Self::Role,
        Self::Saturation,
    ];

    /// The stage's name as the API and the metrics' `stage` label spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Credentials => "Credentials",
            Self::Resolve => "Resolve",
            Self::Connect => "Connect",
            Self::Tls => "Tls",
            Self::Auth => "Auth",
            Self::Query => "Query",
            Self::Role => "Role",
            Self::Saturation => "Saturation",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names are the wire names: a metric label and a status field never disagree.
    #[test]
    fn names_match_the_serialized_form() {
        for outcome in ProbeOutcome::ALL {
            let wire = serde_json::to_value(outcome).unwrap_or_default();
            assert_eq!(wire, outcome.name());
        }
        for stage in ProbeStage::ALL {
            let wire = serde_json::to_value(stage).unwrap_or_default();
            assert_eq!(wire, stage.name());
        }
    }

    #[test]
    fn outcomes_map_to_failure_kinds() {
        assert_eq!(ProbeOutcome::Success.failure_kind(), None);
        assert_eq!(
            ProbeOutcome::ConfigFailure.failure_kind(),
            Some(FailureKind::Config)
        );
        assert_eq!(
            ProbeOutcome::TransientFailure.failure_kind(),
            Some(FailureKind::Outage)
        );
        assert_eq!(
            ProbeOutcome::WrongRole.failure_kind(),
            Some(FailureKind::Outage)
        );
    }
}
