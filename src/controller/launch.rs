//! Starting the controller: directly, or under leader election.
//!
//! Lives here: [`run`] and [`run_observed`], the operator's entry points. Must not live here:
//! the Lease loop (`leadership`), the watches and the context they build (`watches`).

use std::{future::Future, sync::Arc};

use futures::FutureExt;
use kube::Client;

use super::{
    Error, OperatorConfig,
    fence::Fence,
    leadership,
    observer::{NoObserver, Observer},
    watches,
};
use crate::metrics::Metrics;

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
            let fence = Fence::always_open();
            watches::run_controller(client, config, metrics, observer, fence, shutdown).await;
            Ok(())
        }
        Some(election) => {
            leadership::run_with_election(client, config, election, metrics, observer, shutdown)
                .await
        }
    }
}
