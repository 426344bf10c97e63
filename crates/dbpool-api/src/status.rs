//! `DbPoolStatus`: everything a person (or another replica) needs to know about a pool's health.
//!
//! Lives here: the status types and their wire format. The status is also the operator's durable
//! memory: a restarted operator rebuilds each pool's recovery state from it, so every field the
//! recovery engine needs to resume (breaker state and `since`, attempts, cooldown) is here.
//! Deciding what to write, and when, is the controller's job. Instants the operator records are
//! `MicroTime` (RFC 3339 with microseconds), so schedules can be read off the status exactly and
//! survive a restart unrounded; only the standard conditions use second-precision `Time`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{BreakerState, Phase, ProbeOutcome, ProbeStage, Readiness};

/// Condition type: the database is reachable and usable with this spec.
pub const CONDITION_READY: &str = "Ready";
/// Condition type: the pool is failing or limited (failures counted, or saturation).
pub const CONDITION_DEGRADED: &str = "Degraded";
/// Condition type: the circuit breaker is open (or half-open, trying to close).
pub const CONDITION_BREAKER_OPEN: &str = "BreakerOpen";
/// Condition type: the state of the gate Service (present only when spec.gate is set).
pub const CONDITION_GATE: &str = "Gate";
/// Condition type (kstatus): the operator has seen the pool but not probed it yet (phase Pending).
pub const CONDITION_RECONCILING: &str = "Reconciling";
/// Condition type (kstatus): the operator cannot make progress until someone fixes the spec, its
/// Secret or the server's configuration (phase ConfigError).
pub const CONDITION_STALLED: &str = "Stalled";

/// The fencing rule on the status: a write may drop writerEpoch (an operator without leader
/// election) but never lower it.
pub const WRITER_EPOCH_RULE: &str = "!has(oldSelf.writerEpoch) || !has(self.writerEpoch) || self.writerEpoch >= oldSelf.writerEpoch";
/// What the apiserver answers a fenced-off (stale) status write.
pub const WRITER_EPOCH_MESSAGE: &str = "status.writerEpoch must not decrease: the write comes from an operator that lost its leader lease";

/// Observed state of a DbPool, written only by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(WRITER_EPOCH_RULE).message(WRITER_EPOCH_MESSAGE))]
pub struct DbPoolStatus {
    /// The leader term (the Lease's leaseTransitions when its holder acquired it) of the operator
    /// that wrote this status. The apiserver refuses a status whose writerEpoch goes back, so a
    /// replica that lost the Lease cannot overwrite what the new leader wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer_epoch: Option<i64>,
    /// The metadata.generation this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Overall health at a glance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Circuit breaker state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerStatus>,
    /// Failed probes in a row (outage and configuration failures alike); 0 after a success.
    #[serde(default)]
    pub consecutive_failures: i32,
    /// Failed attempts in the current backoff cycle; reset by a success, a cooldown or a force reopen.
    #[serde(default)]
    pub recovery_attempts: i32,
    /// Delay until the next attempt, while retrying after failures (Go duration syntax, e.g.
    /// "4s"). Plain text: unlike spec durations it may legitimately be "0s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_backoff: Option<String>,
    /// End of the current cooldown, when maxAttempts failures in a row started one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_until: Option<MicroTime>,
    /// What the last probe found. Refreshed on every visible change, and at least every few
    /// minutes in a steady state (not on every probe, to spare the apiserver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe: Option<ProbeSummary>,
    /// When a probe last succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<MicroTime>,
    /// When a probe last failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<MicroTime>,
    /// Whether the server accepts connections, as the operator's credential-free readiness pings
    /// last saw it, and since when. Present while the pool's target is being pinged (after an
    /// outage-class failure) and kept after the edge to accepting; written through the write
    /// budget, so a flip costs at most one write per pool and never a write per ping. Clients
    /// following the DbPool take the readiness edge from here instead of pinging themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<ReadinessStatus>,
    /// The last force-reopen request acted upon (the annotation's value), so each is done once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_force_reopen: Option<ForceReopenRecord>,
    /// Standard conditions: Ready, Degraded and BreakerOpen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::cel::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Circuit breaker state as stored in status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BreakerStatus {
    /// Closed (traffic flows), Open (database treated as down) or HalfOpen (trial probe).
    pub state: BreakerState,
    /// When the breaker entered this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<MicroTime>,
    /// When the next trial probe is due (while Open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_probe_at: Option<MicroTime>,
    /// How many times the breaker has opened since the resource was created.
    #[serde(default)]
    pub open_count: i64,
    /// Successful trial probes so far in HalfOpen.
    #[serde(default)]
    pub half_open_successes: i32,
}

/// Result of one probe, as shown to users.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeSummary {
    /// When the probe finished.
    pub time: MicroTime,
    /// Success, or which kind of failure.
    pub outcome: ProbeOutcome,
    /// The stage that failed (or the last stage run, on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<ProbeStage>,
    /// Wall time of the probe in milliseconds.
    #[serde(default)]
    pub latency_ms: i64,
    /// What happened, for people. Never contains a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// SQLSTATE of the server's error, when there was one (e.g. 28P01 for a wrong password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql_state: Option<String>,
    /// server_version reported by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_version: Option<String>,
    /// Whether the server is a standby (pg_is_in_recovery()).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_recovery: Option<bool>,
    /// Client connections open on the server (pg_stat_activity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<i64>,
    /// Connections ordinary roles may open: max_connections minus the reserved slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<i64>,
}

/// A force-reopen request that was carried out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForceReopenRecord {
    /// The value of the dbpool.io/force-reopen annotation.
    pub token: String,
    /// When the operator acted on it.
    pub time: MicroTime,
}

/// The target's readiness as the operator's pings saw it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadinessStatus {
    /// The last shareable answer (Accepting, StartingUp or Unreachable), or this pool's own
    /// ConfigAnswer; never another pool's server text.
    pub state: Readiness,
    /// When the target's readiness last changed to `state` (the edge, not the last ping).
    pub since: MicroTime,
}
