//! Leader election: run the controller only while this process holds the Lease.
//!
//! Lives here: [`run_with_election`], the loop that waits for the Lease, runs the controller
//! while it is held, stops it when the Lease is lost, and releases the Lease on shutdown. Must
//! not live here: what the controller does (`watches`, `reconcile`).

use std::sync::Arc;

use futures::future::{BoxFuture, Shared};
use kube::Client;
use tracing::{info, warn};

use super::{
    Error, FIELD_MANAGER, LeaderElection, OperatorConfig, observer::Observer,
    watches::run_controller,
};
use crate::metrics::Metrics;

/// Waits for the Lease and runs the controller whenever this process holds it, until
/// `shutdown`. A process that loses the Lease stops its controller and drops its in-memory
/// state; the next leader rebuilds every pool from status. Fails only when the lease manager
/// cannot be set up at all.
pub(super) async fn run_with_election(
    client: Client,
    config: OperatorConfig,
    election: LeaderElection,
    metrics: Arc<Metrics>,
    observer: Arc<dyn Observer>,
    shutdown: Shared<BoxFuture<'static, ()>>,
) -> Result<(), Error> {
    let manager =
        kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &election.lease_name)
            .with_namespace(&election.lease_namespace)
            .with_identity(&config.instance)
            .with_duration(election.lease_duration.as_secs().max(1))
            .with_grace(election.renew_grace.as_secs().max(1))
            .with_field_manager(format!("{FIELD_MANAGER}-lease"))
            .build()
            .await
            .map_err(|err| Error::LeaderElection(err.to_string()))?;
    let (mut leader, lease_task) = manager.watch().await;
    // A standby is ready: it is able to take over.
    metrics.set_ready(true);
    info!(lease = %election.lease_name, identity = %config.instance, "waiting for the leader lease");
    loop {
        tokio::select! {
            _ = shutdown.clone() => break,
            changed = leader.wait_for(|is_leader| *is_leader) => if changed.is_err() { break },
        }
        info!(identity = %config.instance, "acquired the leader lease");
        metrics.set_leader(true);
        // Stop the controller when the lease is lost or the process shuts down.
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut watch_loss = leader.clone();
        let process_shutdown = shutdown.clone();
        let stopper = tokio::spawn(async move {
            tokio::select! {
                _ = process_shutdown => {},
                _ = watch_loss.wait_for(|is_leader| !*is_leader) => {},
            }
            let _ = stop_tx.send(());
        });
        let stop = async move {
            let _ = stop_rx.await;
        };
        run_controller(
            client.clone(),
            config.clone(),
            metrics.clone(),
            observer.clone(),
            stop,
        )
        .await;
        stopper.abort();
        metrics.set_leader(false);
        metrics.set_ready(true);
        if shutdown.peek().is_some() {
            break;
        }
        warn!(identity = %config.instance, "lost the leader lease; standing by");
    }
    // Closing the channel makes the lease task release the Lease, so a standby takes over at once.
    drop(leader);
    if let Ok(Err(err)) = lease_task.await {
        warn!(error = %err, "releasing the leader lease");
    }
    Ok(())
}
