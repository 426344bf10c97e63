//! Leader election with fencing: the controller runs, and writes, only while this process
//! provably holds the Lease.
//!
//! Lives here: the [`Elector`] that acquires, renews and releases the coordination.k8s.io Lease
//! with optimistic concurrency, and [`run_with_election`], which runs the controller for each
//! term, publishing [`Leadership`] on the channel the [`Fence`] reads. Must not live here: what
//! the controller does (`watches`, `reconcile`), the fence and the writes themselves (`fence`,
//! `write`).
//!
//! **Validity** is judged on this process's monotonic clock: a renewal whose request was sent at
//! `t` makes the term valid until `t + duration − grace`. A standby takes the Lease only after it
//! has seen the same Lease record unchanged for `duration` on its own monotonic clock, and the
//! holder's last successful renewal was sent before the standby saw that record, so the holder's
//! validity always ends before the standby's term begins (with `grace` to spare for clock-rate
//! differences). A frozen process (SIGSTOP) finds its term expired the moment it thaws, because
//! the monotonic clock kept running.
//!
//! **Epoch.** Each term carries the Lease's `leaseTransitions` after acquisition; status writes
//! carry it as `status.writerEpoch`, and the CRD refuses a status whose epoch goes back. So a
//! write that passed the fence just before its term ended still fails at the apiserver once the new
//! leader has written that pool.

use std::{sync::Arc, time::Duration};

use futures::future::{BoxFuture, Shared};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};
use tokio::{
    sync::watch,
    time::{Instant, timeout},
};
use tracing::{info, warn};

use super::{
    Error, LeaderElection, OperatorConfig,
    fence::{Fence, Leadership},
    observer::Observer,
    watches::run_controller,
};
use crate::metrics::Metrics;

/// Acquires, renews and releases the Lease. Every request has a timeout.
struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    grace: Duration,
    /// The Lease record last seen from another holder, and when it was first seen unchanged.
    observed: Option<(String, Instant)>,
}

/// What one attempt to lead found.
enum Attempt {
    /// This process leads until the instant, under the epoch.
    Leading(i64, Instant),
    /// Another holder's term runs.
    Held,
}

impl Elector {
    fn new(client: Client, election: &LeaderElection, identity: String) -> Self {
        Self {
            api: Api::namespaced(client, &election.lease_namespace),
            name: election.lease_name.clone(),
            identity,
            duration: election.lease_duration,
            grace: election.renew_grace,
            observed: None,
        }
    }

    /// How often the holder renews and a standby retries: a third of the validity window.
    fn period(&self) -> Duration {
        (self.duration.saturating_sub(self.grace) / 3).max(Duration::from_millis(100))
    }

    /// One attempt to acquire or renew, bounded by `budget`.
    async fn attempt(&mut self, budget: Duration) -> Result<Attempt, Error> {
        match timeout(budget, self.attempt_unbounded()).await {
            Ok(result) => result,
            Err(_) => Err(Error::LeaderElection(format!(
                "lease request took longer than {budget:?}"
            ))),
        }
    }

    async fn attempt_unbounded(&mut self) -> Result<Attempt, Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            return self.create().await;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.identity;
        if !mine && !holder.is_empty() && !self.expired(&lease) {
            return Ok(Attempt::Held);
        }
        let now = MicroTime(Timestamp::now());
        let transitions = spec.lease_transitions.unwrap_or(0);
        let epoch = if mine {
            transitions
        } else {
            transitions.saturating_add(1)
        };
        let mut next = lease.clone();
        next.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration_seconds()),
            acquire_time: if mine {
                spec.acquire_time
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(epoch),
            ..spec
        });
        let sent = Instant::now();
        // resourceVersion in `next` makes this a compare-and-swap: a racing standby loses.
        self.api
            .replace(&self.name, &PostParams::default(), &next)
            .await?;
        self.observed = None;
        Ok(Attempt::Leading(i64::from(epoch), sent + self.validity()))
    }

    async fn create(&mut self) -> Result<Attempt, Error> {
        let now = MicroTime(Timestamp::now());
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.duration_seconds()),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        let sent = Instant::now();
        self.api.create(&PostParams::default(), &lease).await?;
        Ok(Attempt::Leading(0, sent + self.validity()))
    }

    /// Whether another holder's record has stood unchanged for a whole lease duration, measured
    /// on this process's monotonic clock from when it was first seen.
    fn expired(&mut self, lease: &Lease) -> bool {
        let version = lease.resource_version().unwrap_or_default();
        match &self.observed {
            Some((seen, since)) if *seen == version => since.elapsed() >= self.duration,
            _ => {
                self.observed = Some((version, Instant::now()));
                false
            }
        }
    }

    /// Gives the Lease up (best effort, bounded): a standby takes over at once.
    async fn release(&self) {
        let release = async {
            let mut lease = self.api.get(&self.name).await?;
            let Some(spec) = lease.spec.as_mut() else {
                return Ok(());
            };
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.renew_time = None;
            spec.acquire_time = None;
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        };
        match timeout(self.period(), release).await {
            Ok(Ok(())) => info!(identity = %self.identity, "released the leader lease"),
            Ok(Err(err)) => warn!(error = %err, "releasing the leader lease"),
            Err(_) => warn!("releasing the leader lease timed out"),
        }
    }

    fn validity(&self) -> Duration {
        self.duration.saturating_sub(self.grace)
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }
}

/// This instant on the host's monotonic clock (CLOCK_MONOTONIC), in nanoseconds: comparable
/// across processes on one host, so tests can check that no two terms overlap.
fn monotonic_ns(at: Instant) -> u128 {
    let now = Instant::now();
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let now_ns = u128::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
        + u128::try_from(ts.tv_nsec).unwrap_or(0);
    if at <= now {
        now_ns.saturating_sub(now.duration_since(at).as_nanos())
    } else {
        now_ns + at.duration_since(now).as_nanos()
    }
}

/// Publishes a new leadership state and logs every term's start and end, stamped on the host's
/// monotonic clock. A term ends at the earlier of the moment it is given up and its validity.
fn publish(tx: &watch::Sender<Leadership>, next: Leadership, identity: &str) {
    let previous = tx.send_replace(next);
    match (previous, next) {
        (Leadership::Standby, Leadership::Leading { epoch, .. }) => {
            info!(
                identity,
                epoch,
                mono_ns = monotonic_ns(Instant::now()) as u64,
                "leadership: term started"
            );
        }
        (Leadership::Leading { epoch, valid_until }, Leadership::Standby) => {
            let ended = Instant::now().min(valid_until);
            info!(
                identity,
                epoch,
                mono_ns = monotonic_ns(ended) as u64,
                "leadership: term ended"
            );
        }
        _ => {}
    }
}

/// Keeps the leadership channel true until `shutdown`: acquires, renews every period, steps
/// down (Standby) the moment a term runs out unrenewed, and releases the Lease at the end.
async fn elect(
    mut elector: Elector,
    tx: watch::Sender<Leadership>,
    shutdown: Shared<BoxFuture<'static, ()>>,
) {
    let mut ticker = tokio::time::interval(elector.period());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tokio::select! {
            () = shutdown.clone() => break,
            _ = ticker.tick() => {},
        }
        let current = *tx.borrow();
        let budget = match current {
            Leadership::Leading { valid_until, .. } => valid_until
                .saturating_duration_since(Instant::now())
                .min(elector.period())
                .max(Duration::from_millis(1)),
            Leadership::Standby => elector.period(),
        };
        match elector.attempt(budget).await {
            Ok(Attempt::Leading(epoch, valid_until)) => {
                warned = false;
                let next = Leadership::Leading {
                    epoch: Some(epoch),
                    valid_until,
                };
                publish(&tx, next, &elector.identity);
            }
            Ok(Attempt::Held) => {
                tracing::debug!(identity = %elector.identity, "lease held by another process");
                publish(&tx, Leadership::Standby, &elector.identity);
            }
            Err(err) => {
                tracing::debug!(identity = %elector.identity, error = %err, "lease attempt failed");
                if !warned {
                    warn!(error = %err, "cannot renew or acquire the leader lease");
                    warned = true;
                }
                if let Leadership::Leading { valid_until, .. } = current
                    && Instant::now() >= valid_until
                {
                    warn!(identity = %elector.identity, "leader lease not renewed in time; standing by");
                    publish(&tx, Leadership::Standby, &elector.identity);
                }
            }
        }
    }
    publish(&tx, Leadership::Standby, &elector.identity);
    elector.release().await;
}

/// Waits for the Lease and runs the controller for each term this process holds it, until
/// `shutdown`. When a term ends the controller is stopped, its context (probe connections,
/// caches, pool map) dropped and its per-pool series removed; the next leader rebuilds every pool
/// from status. Fails only when the Lease cannot be read at all at start-up.
pub(super) async fn run_with_election(
    client: Client,
    config: OperatorConfig,
    election: LeaderElection,
    metrics: Arc<Metrics>,
    observer: Arc<dyn Observer>,
    shutdown: Shared<BoxFuture<'static, ()>>,
) -> Result<(), Error> {
    // A unique identity per process, even when two replicas share a pod name (a restarted
    // container): never two holders that both believe they lead.
    let identity = format!("{}_{:08x}", config.instance, rand_suffix());
    let mut elector = Elector::new(client.clone(), &election, identity.clone());
    let initial = first_attempt(&mut elector, &election).await?;
    let (tx, rx) = watch::channel(Leadership::Standby);
    publish(&tx, initial, &identity);
    let elect_task = tokio::spawn(elect(elector, tx, shutdown.clone()));
    metrics.set_ready(true);
    info!(lease = %election.lease_name, %identity, "waiting for the leader lease");
    let mut fence = Fence::new(rx);
    loop {
        tokio::select! {
            () = shutdown.clone() => break,
            led = fence.leading() => if !led { break },
        }
        metrics.set_leader(true);
        let stop = term_end(fence.clone(), metrics.clone(), shutdown.clone());
        run_controller(
            client.clone(),
            config.clone(),
            metrics.clone(),
            observer.clone(),
            fence.clone(),
            stop,
        )
        .await;
        metrics.set_leader(false);
        metrics.forget_all_pools();
        metrics.set_ready(true);
        if shutdown.peek().is_some() {
            break;
        }
        warn!(%identity, "lost the leader lease; standing by");
    }
    if let Err(err) = elect_task.await {
        warn!(error = %err, "leader election task");
    }
    Ok(())
}

/// The first attempt at the Lease decides whether it can be used at all: a missing namespace or
/// a missing permission is an error, not a standby that can never lead.
async fn first_attempt(
    elector: &mut Elector,
    election: &LeaderElection,
) -> Result<Leadership, Error> {
    let budget = elector.period().max(Duration::from_secs(5));
    match elector.attempt(budget).await {
        Ok(Attempt::Leading(epoch, valid_until)) => Ok(Leadership::Leading {
            epoch: Some(epoch),
            valid_until,
        }),
        Ok(Attempt::Held) => Ok(Leadership::Standby),
        Err(Error::Kube(kube::Error::Api(status))) if matches!(status.code, 401 | 403 | 404) => {
            Err(Error::LeaderElection(format!(
                "lease {}/{}: {}",
                election.lease_namespace, election.lease_name, status.message
            )))
        }
        Err(err) => {
            warn!(error = %err, "first attempt at the leader lease failed; retrying");
            Ok(Leadership::Standby)
        }
    }
}

/// Resolves when the term ends or the process shuts down; the moment the term ends the process
/// reports standby and exports no pool series, even while in-flight reconciles drain.
async fn term_end(
    mut fence: Fence,
    metrics: Arc<Metrics>,
    shutdown: Shared<BoxFuture<'static, ()>>,
) {
    tokio::select! {
        () = shutdown => {},
        () = fence.lost() => {},
    }
    metrics.set_leader(false);
    metrics.forget_all_pools();
}

/// 32 bits that differ between processes started in the same instant.
fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let hash = RandomState::new().hash_one((nanos, std::process::id()));
    (hash & 0xffff_ffff) as u32
}
