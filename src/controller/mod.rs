//! The controller: reads each DbPool and its Secrets, asks the recovery engine what to do,
//! probes, writes status only when a user would see a change, publishes events on transitions,
//! and requeues at exactly the engine's next deadline.
//!
//! Lives here, one concern per module:
//! - `config`: [`OperatorConfig`], [`LeaderElection`] (defaults live in `crate::cli`);
//! - `leadership`: the Lease elector, the write gate (fencing) and the per-term controller loop;
//! - `watches`: the DbPool and Secret watches, the connection-lost trigger, readiness;
//! - `liveness`: watch errors (rate-limited logs) and the failing streak `/healthz` judges;
//! - `context`: the shared state and the one per-pool map entry;
//! - `triggers`: which events a reconcile feeds the engine (pure, unit-tested);
//! - `reconcile`: the reconcile pipeline and the error policy;
//! - `targets`: one shared connect schedule per target while it is down, results fanned out;
//! - `fleet`: the fleet guard's evidence and whether a failure's breaker opening is held;
//! - `slots`: the probe slots, round-robin across namespaces with per-namespace and per-target
//!   shares;
//! - `status`: the status a user sees, conditions, the visible-change rule, restart restore;
//! - `write`: the per-pool writer, the write budget, and `fenced`, the one way to send a write;
//! - `gate`: the gate Service and EndpointSlice of `spec.gate`; `events`: Kubernetes Events;
//! - `credentials`: reading Secrets; `observer`: the typed window for benchmarks and tests;
//! - `running`: [`RunningOperator`], an operator on a tokio task.
//!
//! Must not live here: the engine's rules (`dbpool-recovery`), talking to PostgreSQL
//! (`dbpool-probe`), the API types (`dbpool-api`).
//!
//! No finalizer: deleting a DbPool must never be blocked by an operator that is down. Cleanup of
//! in-memory state and probe connections happens on the watch's delete event; if that event is
//! missed (operator down), there is nothing left to clean because the memory is gone with it.

mod api_slots;
mod config;
mod context;
mod credentials;
mod events;
mod fleet;
mod gate;
mod leadership;
mod liveness;
mod observer;
mod reconcile;
mod running;
mod sharing;
mod slots;
pub mod status;
mod targets;
mod triggers;
mod watches;
mod write;

use std::{future::Future, sync::Arc};

use futures::FutureExt;
use kube::Client;

pub use config::{
    FIELD_MANAGER, FleetGuardSettings, GateAllowlist, LeaderElection, OperatorConfig,
};
pub use leadership::{Leadership, WriteGate};
pub use observer::{NoObserver, Observer, ProbeObservation};
pub use running::RunningOperator;

use crate::metrics::Metrics;
use credentials::CredentialError;

/// Errors a reconcile or the operator as a whole can end with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An apiserver call failed.
    #[error("apiserver request failed: {0}")]
    Kube(#[from] kube::Error),
    /// A Secret could not be read for a reason other than the user's configuration.
    #[error("{0}")]
    Credentials(#[from] CredentialError),
    /// A write did not complete within its deadline (the rest of the term, at most 10s).
    #[error("apiserver write took longer than {0:?}")]
    WriteTimeout(std::time::Duration),
    /// The pool was deleted while its reconcile ran (never surfaces: the reconcile forgets it).
    #[error("the DbPool was deleted")]
    Deleted,
    /// Leader election could not be set up (the process cannot safely run).
    #[error("cannot set up leader election: {0}")]
    LeaderElection(String),
}

/// Runs the operator until `shutdown` resolves: directly, or (with leader election) whenever
/// this process holds the Lease. Fails when leader election cannot be set up.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    run_observed(client, config, metrics, Arc::new(NoObserver), shutdown).await
}

/// [`run`], telling `observer` about every probe and acknowledged status write.
pub async fn run_observed(
    client: Client,
    config: OperatorConfig,
    metrics: Arc<Metrics>,
    observer: Arc<dyn Observer>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    let shutdown = shutdown.boxed().shared();
    match config.leader_election.clone() {
        None => {
            metrics.set_leader(true);
            let gate = leadership::WriteGate::always_open();
            watches::run_controller(client, config, metrics, observer, gate, shutdown).await;
            Ok(())
        }
        Some(election) => {
            leadership::run_with_election(client, config, election, metrics, observer, shutdown)
                .await
        }
    }
}
