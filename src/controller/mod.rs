//! The controller: reads each DbPool and its Secrets, asks the recovery engine what to do,
//! probes, writes status only when a user would see a change, publishes events on transitions,
//! and requeues at exactly the engine's next deadline.
//!
//! The modules stand in layers, and imports only go down (checked by `hack/check-shape.py` in
//! `make lint`):
//! - **runtime** — `launch` ([`run`], [`run_observed`]), `leadership` (the Lease elector and
//!   the per-term loop), `watches` (the
//!   DbPool and Secret watches, the connection-lost trigger, readiness), `liveness` (watch
//!   errors and the failing streak `/healthz` judges), `running` ([`RunningOperator`]);
//! - **context** — `context` ([`Context`](context::Context): the parts, the one pool registry,
//!   the recovery memory, the per-pool writer task) and `reconcile` (the pipeline of steps that
//!   runs on it);
//! - **subsystems**, which import no context and no other subsystem — `targets` (one shared
//!   connect schedule per target while it is down), `sharing` (probe streams while a target is
//!   healthy), `fleet` (the fleet guard), `probe_permits` (the probe permits, fair across
//!   namespaces and targets), `pings` (readiness ping streams while a target's pools wait out an
//!   outage), `credentials` (reading Secrets), `status` (the status a user sees), `gate` (the
//!   gated Service of `spec.gate`), `write` (outboxes, the writer's decisions, the write budget),
//!   `triggers` (which events a reconcile feeds the engine), `timeouts` (the learned adaptive
//!   probe timeouts, one learner per target);
//! - **door** — `fence` ([`Fence`] and the one door for writes and per-pool metrics);
//! - **vocabulary**, which any layer may use — `config` ([`OperatorConfig`]), `error`
//!   ([`Error`]), `observer`,
//!   `names` (pool and target keys, [`PerPool`](names::PerPool)), `events` (event wording),
//!   `projection` (what the DbPool cache keeps of an object),
//!   `api_permits` (the apiserver request budget), `sync` (the lock policy).
//!
//! Two words with one meaning each: a *permit* is a place in a budget (probe permits in
//! `probe_permits`, API permits in `api_permits`); the *fence* is leadership as every write checks it,
//! and the *gate* is only the gated Service of `spec.gate`.
//!
//! Must not live here: the engine's rules (`dbpool-recovery`), talking to PostgreSQL
//! (`dbpool-probe`), the API types (`dbpool-api`).
//!
//! No finalizer: deleting a DbPool must never be blocked by an operator that is down. Cleanup of
//! in-memory state and probe connections happens on the watch's delete event; if that event is
//! missed (operator down), there is nothing left to clean because the memory is gone with it.

mod api_permits;
mod config;
mod context;
mod credentials;
mod error;
mod events;
mod fence;
mod fleet;
mod gate;
mod launch;
mod leadership;
mod liveness;
mod names;
mod observer;
mod pings;
mod probe_permits;
mod projection;
mod reconcile;
mod running;
mod sharing;
pub mod status;
mod sync;
mod targets;
#[cfg(test)]
mod testing;
mod timeouts;
mod triggers;
mod watches;
mod write;

pub use config::{
    FIELD_MANAGER, FleetGuardSettings, GateAllowlist, LeaderElection, OperatorConfig,
};
pub use error::Error;
pub use fence::{Fence, Leadership};
pub use launch::{run, run_observed};
pub use observer::{Footprint, NoObserver, Observer, ProbeObservation};
pub use running::RunningOperator;
