//! What became of a pool's gate, and the `Gate` condition that says so.
//!
//! Lives here: [`GateOutcome`] and its condition ([`GateOutcome::condition`]). Pure. Must not
//! live here: bringing the gate in line (`gate`), the rest of the status (`status`).

use std::net::SocketAddr;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use crate::api::{CONDITION_GATE, GateSpec, reason};

/// What became of the gate in one reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GateOutcome {
    /// spec.gate is not set.
    NotDeclared,
    /// The operator does not allow gates in this namespace.
    NotAllowed,
    /// An object of the gate's name exists and is not ours.
    NotOwned {
        /// "Service" or "EndpointSlice".
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The Service and EndpointSlice are as desired.
    Synced {
        /// The address in the EndpointSlice, if any.
        peer: Option<SocketAddr>,
        /// Whether it is ready.
        ready: bool,
    },
    /// A read or write failed.
    Failed(String),
}

impl GateOutcome {
    /// The `Gate` condition (None when no gate is declared). `lastTransitionTime` is filled in by
    /// the status code.
    pub fn condition(&self, gate: Option<&GateSpec>) -> Option<Condition> {
        let name = gate.map_or("", |g| g.service_name.as_str());
        let (status, reason, message) = match self {
            Self::NotDeclared => return None,
            Self::NotAllowed => (
                false,
                reason::GATES_NOT_ALLOWED,
                format!(
                    "the operator does not allow gates in this namespace (--allow-gates-in); no Service {name} is created"
                ),
            ),
            Self::NotOwned { kind, name } => (
                false,
                reason::GATE_SERVICE_NOT_OWNED,
                format!(
                    "{kind} {name} exists and is not owned by this DbPool; it is left untouched"
                ),
            ),
            Self::Synced { peer: None, .. } => (
                true,
                reason::GATE_NO_ADDRESS,
                format!(
                    "Service {name} has no endpoint yet (no probe logged in); connects are refused"
                ),
            ),
            Self::Synced {
                peer: Some(peer),
                ready: true,
            } => (
                true,
                reason::GATE_OPEN,
                format!("Service {name} forwards to {peer}"),
            ),
            Self::Synced {
                peer: Some(peer),
                ready: false,
            } => (
                true,
                reason::GATE_REJECTING,
                format!(
                    "Service {name}: endpoint {peer} not ready while the breaker is not closed; connects are refused"
                ),
            ),
            Self::Failed(message) => (false, reason::GATE_WRITE_FAILED, message.clone()),
        };
        Some(Condition {
            type_: CONDITION_GATE.to_owned(),
            status: if status { "True" } else { "False" }.to_owned(),
            reason: reason.to_owned(),
            message,
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
            observed_generation: None,
        })
    }
}
