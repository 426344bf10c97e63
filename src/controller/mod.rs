//! The reconcile loop: reads each DbPool and its Secrets, asks the recovery engine what to do,
//! probes, writes status only when a user would see a change, publishes events on transitions,
//! and requeues at exactly the engine's next deadline.
//!
//! Lives here: wiring (watches, triggers, the per-pool in-memory state) and the reconcile
//! function. Decisions (when to probe, what a result means) belong to `recovery`; talking to
//! PostgreSQL belongs to `probe`; the shape of the status belongs to `status` below.
//!
//! No finalizer: deleting a DbPool must never be blocked by an operator that is down. Cleanup of
//! in-memory state and probe connections happens on the watch's delete event; if that event is
//! missed (operator down), there is nothing left to clean because the memory is gone with it.

mod credentials;
pub mod status;

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{FutureExt, StreamExt};
use k8s_openapi::{
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    core::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        reflector,
        reflector::ObjectRef,
        watcher,
    },
};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::{
    api::{
        BREAKER_LABEL, BreakerState, DbPool, DbPoolStatus, FORCE_REOPEN_ANNOTATION,
        ForceReopenRecord, Phase, ProbeOutcome, ProbeStage, ProbeSummary,
    },
    metrics::{Metrics, PoolLabels},
    probe::{ProbeReport, ProbeTarget, Prober, ProberConfig},
    recovery::{self, Effect, Event, FailureKind, Policy, PoolState},
};
use credentials::{CredentialError, SecretCache};
use status::{StatusInputs, desired_status, needs_write, restore_state};

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "dbpool-operator";

/// Settings of one operator process.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Watch only this namespace (None: all namespaces).
    pub namespace: Option<String>,
    /// Probes running at once, across all pools.
    pub max_concurrent_probes: usize,
    /// Requests (status, label and event writes, Secret reads) in flight to the apiserver at once,
    /// across all pools. Each concurrent request holds its own connection (and TLS session) to the
    /// apiserver, so an unbounded burst (a restart, or a shared database failing under a thousand
    /// pools) would open hundreds.
    pub max_concurrent_api_requests: usize,
    /// In a steady state, refresh lastProbe in status at most this often.
    pub status_refresh: Duration,
    /// Reopen each persistent probe connection this often, to test the full connect path.
    pub reconnect_every: Duration,
    /// Name of this operator instance in events and in the leader lease (e.g. the pod name).
    pub instance: String,
    /// Lease-based leader election; None runs as the only instance.
    pub leader_election: Option<LeaderElection>,
}

/// Lease-based leader election settings: only the holder of the Lease probes and writes.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    /// Name of the coordination.k8s.io Lease.
    pub lease_name: String,
    /// Namespace of the Lease (the operator's own namespace).
    pub lease_namespace: String,
    /// How long a lease is valid after its last renewal; a standby takes over after it expires.
    pub lease_duration: Duration,
    /// The holder renews this long before expiry (the tolerated clock skew, too).
    pub renew_grace: Duration,
}

impl Default for LeaderElection {
    fn default() -> Self {
        Self {
            lease_name: FIELD_MANAGER.to_owned(),
            lease_namespace: "default".to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_grace: Duration::from_secs(5),
        }
    }
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            max_concurrent_probes: 64,
            max_concurrent_api_requests: 16,
            status_refresh: Duration::from_secs(300),
            reconnect_every: Duration::from_secs(300),
            instance: "dbpool-operator".to_owned(),
            leader_election: None,
        }
    }
}

/// Errors a reconcile can end with; the pool is retried with a growing delay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An apiserver call failed.
    #[error("apiserver request failed: {0}")]
    Kube(#[from] kube::Error),
    /// A Secret could not be read for a reason other than the user's configuration.
    #[error("{0}")]
    Credentials(#[from] CredentialError),
}

/// In-memory state of one pool. The durable copy is the status; this is rebuilt from it.
#[derive(Clone)]
struct PoolEntry {
    uid: Option<String>,
    generation: Option<i64>,
    state: PoolState,
    last_probe: Option<ProbeSummary>,
    last_force_reopen: Option<ForceReopenRecord>,
    last_written: Option<DbPoolStatus>,
    last_written_at: Option<Timestamp>,
    label_written: Option<String>,
    credentials_fingerprint: Option<String>,
    /// No probe before this instant (restart spreading, rate limit of loss-triggered probes).
    not_before: Option<Timestamp>,
}

/// Shared state of the controller.
struct Context {
    client: Client,
    config: OperatorConfig,
    prober: Prober,
    secrets: SecretCache,
    recorder: Recorder,
    pools: Mutex<HashMap<String, PoolEntry>>,
    probe_requested: Mutex<HashSet<String>>,
    probe_slots: Semaphore,
    api_slots: Arc<Semaphore>,
    error_counts: Mutex<HashMap<String, u32>>,
    metrics: Arc<Metrics>,
}

fn pool_key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

fn seed_of(pool: &DbPool) -> u64 {
    let mut h = DefaultHasher::new();
    pool.metadata.uid.hash(&mut h);
    pool.namespace().hash(&mut h);
    pool.name_any().hash(&mut h);
    h.finish()
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// Runs the operator until `shutdown` resolves: directly, or (with leader election) whenever
/// this process holds the Lease. A process that loses the Lease stops its controller and drops
/// its in-memory state; the next leader rebuilds every pool from status.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = shutdown.boxed().shared();
    let Some(election) = config.leader_election.clone() else {
        metrics.set_leader(true);
        run_controller(client, config, metrics, shutdown).await;
        return;
    };
    let manager =
        kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &election.lease_name)
            .with_namespace(&election.lease_namespace)
            .with_identity(&config.instance)
            .with_duration(election.lease_duration.as_secs().max(1))
            .with_grace(election.renew_grace.as_secs().max(1))
            .with_field_manager(format!("{FIELD_MANAGER}-lease"))
            .build()
            .await;
    let manager = match manager {
        Ok(m) => m,
        Err(err) => {
            warn!(error = %err, "cannot set up leader election");
            return;
        }
    };
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
        run_controller(client.clone(), config.clone(), metrics.clone(), stop).await;
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
}

async fn run_controller(
    client: Client,
    config: OperatorConfig,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (pools_api, secrets_api): (Api<DbPool>, Api<PartialObjectMeta<Secret>>) =
        match &config.namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
    let (prober, mut lost_rx) = Prober::new(ProberConfig {
        reconnect_every: config.reconnect_every,
    });
    let (secret_reader, secret_writer) = reflector::store();
    let (pool_reader, pool_writer) = reflector::store();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: Some(config.instance.clone()),
        },
    );
    let api_slots = Arc::new(Semaphore::new(config.max_concurrent_api_requests.max(1)));
    let ctx = Arc::new(Context {
        client: client.clone(),
        secrets: SecretCache::new(client.clone(), secret_reader.clone(), api_slots.clone()),
        probe_slots: Semaphore::new(config.max_concurrent_probes.max(1)),
        api_slots: api_slots.clone(),
        config,
        prober,
        recorder,
        pools: Mutex::new(HashMap::new()),
        probe_requested: Mutex::new(HashSet::new()),
        error_counts: Mutex::new(HashMap::new()),
        metrics: metrics.clone(),
    });

    // Probe connections that die trigger their pools at once.
    let (lost_tx, lost_refs) = tokio::sync::mpsc::unbounded_channel::<ObjectRef<DbPool>>();
    let lost_ctx = ctx.clone();
    tokio::spawn(async move {
        while let Some(lost) = lost_rx.recv().await {
            for owner in lost.owners {
                debug!(pool = %owner, reason = %lost.reason, "probe connection lost");
                if let Some((ns, name)) = owner.split_once('/') {
                    if let Ok(mut set) = lost_ctx.probe_requested.lock() {
                        set.insert(owner.clone());
                    }
                    let _ = lost_tx.send(ObjectRef::new(name).within(ns));
                }
            }
        }
    });

    // Only spec changes (generation), force-reopen annotations and new objects trigger a
    // reconcile; our own status and label writes do not.
    // Ready once both caches have completed their initial list. (Noted from the streams:
    // awaiting `Store::wait_until_ready` next to the controller's own wait can miss its wake-up.)
    let synced = Arc::new(Synced::default());
    let forget_ctx = ctx.clone();
    let pools_synced = synced.clone();
    let pool_metrics = metrics.clone();
    let pool_stream = watcher(pools_api, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(pool_writer)
        .inspect(move |event| match event {
            Ok(watcher::Event::Delete(pool)) => {
                forget_ctx.forget(&pool_key(
                    &pool.namespace().unwrap_or_default(),
                    &pool.name_any(),
                ));
            }
            Ok(watcher::Event::InitDone) => pools_synced.mark(true, &pool_metrics),
            _ => {}
        })
        .applied_objects()
        .predicate_filter(trigger_hash, Default::default());

    // Secrets: metadata only (no data cached for Secrets we don't use); a change re-triggers the
    // pools that refer to the Secret.
    let mapper_pools = pool_reader.clone();
    let secrets_synced = synced.clone();
    let secret_metrics = metrics.clone();
    let secret_stream = watcher(secrets_api, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(secret_writer)
        .inspect(move |event| {
            if let Ok(watcher::Event::InitDone) = event {
                secrets_synced.mark(false, &secret_metrics);
            }
        })
        .touched_objects();

    info!(namespace = ?ctx.config.namespace, "dbpool-operator starting");
    Controller::for_stream(pool_stream, pool_reader)
        .watches_stream(secret_stream, move |secret| {
            let ns = secret.namespace().unwrap_or_default();
            let name = secret.name_any();
            mapper_pools
                .state()
                .into_iter()
                .filter(|p| p.namespace().as_deref() == Some(ns.as_str()) && refers_to(p, &name))
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        .reconcile_on(tokio_stream::wrappers::UnboundedReceiverStream::new(
            lost_refs,
        ))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(err) = result {
                debug!(error = %err, "reconcile loop");
            }
        })
        .await;
    metrics.set_ready(false);
    info!("dbpool-operator controller stopped");
}

/// Which of the two caches have completed their initial list.
#[derive(Default)]
struct Synced {
    pools: std::sync::atomic::AtomicBool,
    secrets: std::sync::atomic::AtomicBool,
}

impl Synced {
    fn mark(&self, pools: bool, metrics: &Metrics) {
        use std::sync::atomic::Ordering::SeqCst;
        if pools {
            self.pools.store(true, SeqCst);
        } else {
            self.secrets.store(true, SeqCst);
        }
        if self.pools.load(SeqCst) && self.secrets.load(SeqCst) {
            metrics.set_ready(true);
        }
    }
}

fn refers_to(pool: &DbPool, secret: &str) -> bool {
    let db = &pool.spec.database;
    db.password_secret_ref
        .as_ref()
        .is_some_and(|r| r.name == secret)
        || db.ca_secret_ref.as_ref().is_some_and(|r| r.name == secret)
}

fn trigger_hash(pool: &DbPool) -> Option<u64> {
    let mut h = DefaultHasher::new();
    pool.metadata.generation.hash(&mut h);
    pool.annotations().get(FORCE_REOPEN_ANNOTATION).hash(&mut h);
    pool.metadata.uid.hash(&mut h);
    Some(h.finish())
}

impl Context {
    fn forget(&self, key: &str) {
        if let Ok(mut pools) = self.pools.lock() {
            pools.remove(key);
        }
        if let Ok(mut set) = self.probe_requested.lock() {
            set.remove(key);
        }
        self.prober.forget(key);
        if let Some((namespace, name)) = key.split_once('/') {
            self.metrics.forget(&PoolLabels {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            });
        }
        debug!(pool = %key, "forgot deleted pool");
    }

    fn take_requested(&self, key: &str) -> bool {
        self.probe_requested
            .lock()
            .map(|mut s| s.remove(key))
            .unwrap_or(false)
    }

    async fn publish(&self, pool: &DbPool, type_: EventType, reason: &str, note: String) {
        let event = KubeEvent {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Probe".to_owned(),
            secondary: None,
        };
        let _slot = self.api_slots.acquire().await;
        if let Err(err) = self.recorder.publish(&event, &pool.object_ref(&())).await {
            warn!(pool = %pool.name_any(), error = %err, "cannot publish event");
        }
    }
}

impl PoolEntry {
    /// A new entry: fresh for a new pool, rebuilt from status after a restart.
    fn restore(pool: &DbPool, policy: &Policy, now: Timestamp) -> Self {
        let seed = seed_of(pool);
        let status = pool.status.as_ref().filter(|s| s.phase.is_some());
        let Some(status) = status else {
            return Self {
                uid: pool.metadata.uid.clone(),
                generation: pool.metadata.generation,
                state: PoolState::new(seed),
                last_probe: None,
                last_force_reopen: pool
                    .status
                    .as_ref()
                    .and_then(|s| s.last_force_reopen.clone()),
                last_written: None,
                last_written_at: None,
                label_written: None,
                credentials_fingerprint: None,
                not_before: None,
            };
        };
        let state = restore_state(status, seed);
        // Spread the first probes after a restart over one interval (or the pool's own shorter
        // pending delay), so a fleet of pools does not hit the databases at once.
        let window = [
            Some(policy.interval),
            state.current_backoff,
            (state.breaker == BreakerState::Open).then_some(policy.open_timeout),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(policy.interval);
        let fraction = (seed % 10_000) as f64 / 10_000.0;
        let spread = window.mul_f64(fraction);
        Self {
            uid: pool.metadata.uid.clone(),
            generation: status.observed_generation,
            state,
            last_probe: status.last_probe.clone(),
            last_force_reopen: status.last_force_reopen.clone(),
            last_written: Some(status.clone()),
            // The stored lastProbe was written when that probe finished: a restart alone must not
            // make every pool refresh its status at once.
            last_written_at: status.last_probe.as_ref().map(|p| p.time.0),
            label_written: pool.labels().get(BREAKER_LABEL).cloned(),
            credentials_fingerprint: None,
            not_before: Some(add(now, spread)),
        }
    }

    fn deadline(&self, policy: &Policy, now: Timestamp) -> Timestamp {
        let engine = recovery::next_deadline(&self.state, policy).unwrap_or(now);
        match self.not_before {
            Some(nb) if nb > engine => nb,
            _ => engine,
        }
    }

    fn apply(&mut self, event: Event, now: Timestamp, policy: &Policy, effects: &mut Vec<Effect>) {
        let (state, mut new_effects) = recovery::apply(&self.state, event, now, policy);
        self.state = state;
        effects.append(&mut new_effects);
    }
}

async fn reconcile(pool: Arc<DbPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = pool.namespace().unwrap_or_default();
    let name = pool.name_any();
    let key = pool_key(&ns, &name);
    let policy = Policy::from_spec(&pool.spec);
    let now = Timestamp::now();

    let existing = ctx.pools.lock().ok().and_then(|p| p.get(&key).cloned());
    let mut entry = match existing {
        Some(e) if e.uid == pool.metadata.uid => e,
        _ => PoolEntry::restore(&pool, &policy, now),
    };
    let mut effects = Vec::new();
    let before_phase = entry.last_written.as_ref().and_then(|s| s.phase);

    if entry.generation != pool.metadata.generation {
        entry.apply(Event::SpecChanged, now, &policy, &mut effects);
        entry.generation = pool.metadata.generation;
        entry.not_before = None;
    }

    if let Some(token) = pool.annotations().get(FORCE_REOPEN_ANNOTATION) {
        let handled = entry
            .last_force_reopen
            .as_ref()
            .is_some_and(|r| &r.token == token);
        if !handled {
            entry.apply(Event::ForceReopen, now, &policy, &mut effects);
            entry.last_force_reopen = Some(ForceReopenRecord {
                token: token.clone(),
                time: MicroTime(now),
            });
            entry.not_before = None;
        }
    }

    if ctx.take_requested(&key) && entry.state.consecutive_failures == 0 {
        entry.apply(Event::ProbeRequested, now, &policy, &mut effects);
        // A connection that dies right after every probe must not turn into a probe loop.
        entry.not_before = entry
            .state
            .last_probe_at
            .map(|t| add(t, policy.initial_delay));
    }

    let db = &pool.spec.database;
    let credentials = ctx
        .secrets
        .load(
            &ns,
            db.password_secret_ref.as_ref(),
            db.ca_secret_ref.as_ref(),
        )
        .await;
    let fingerprint = match &credentials {
        Ok(c) => c.fingerprint.clone(),
        Err(e) => format!("error: {e}"),
    };
    if entry
        .credentials_fingerprint
        .as_ref()
        .is_some_and(|old| old != &fingerprint)
    {
        // A Secret was created, fixed or rotated: check the new credentials now.
        entry.apply(Event::ProbeRequested, now, &policy, &mut effects);
        entry.not_before = None;
    }
    entry.credentials_fingerprint = Some(fingerprint);

    let labels = PoolLabels {
        namespace: ns.clone(),
        name: name.clone(),
    };
    if entry.deadline(&policy, now) <= now {
        let recovering =
            entry.state.consecutive_failures > 0 || entry.state.breaker != BreakerState::Closed;
        entry.apply(Event::ProbeStarted, now, &policy, &mut effects);
        let seq = entry.state.probe_seq;
        let (summary, kind, degraded) = match credentials {
            Ok(creds) => {
                let target = ProbeTarget {
                    host: db.host.clone(),
                    port: u16::try_from(db.port).unwrap_or(5432),
                    dbname: db.dbname.clone(),
                    user: db.user.clone(),
                    password: creds.password,
                    ssl_mode: db.ssl_mode,
                    ca_pem: creds.ca_pem,
                    target_session_attrs: db.target_session_attrs,
                    application_name: db.application_name.clone(),
                    pool_max_size: u32::try_from(pool.spec.pool.max_size).unwrap_or(0),
                    timeout: pool.spec.health_check.timeout.as_std(),
                };
                let report = {
                    let _slot = ctx.probe_slots.acquire().await;
                    ctx.prober.probe(&key, &target).await
                };
                let kind = match report.outcome {
                    ProbeOutcome::Success => None,
                    ProbeOutcome::ConfigFailure => Some(FailureKind::Config),
                    ProbeOutcome::TransientFailure | ProbeOutcome::WrongRole => {
                        Some(FailureKind::Outage)
                    }
                };
                let degraded = report.pool_fits == Some(false);
                ctx.metrics.probe_finished(
                    &labels,
                    report.outcome,
                    recovering,
                    &report.stage_latencies,
                );
                (summarize(&report, Timestamp::now()), kind, degraded)
            }
            Err(err) if err.is_config() => {
                ctx.metrics
                    .probe_finished(&labels, ProbeOutcome::ConfigFailure, recovering, &[]);
                (
                    credential_failure(&err, Timestamp::now()),
                    Some(FailureKind::Config),
                    false,
                )
            }
            Err(err) => {
                store(&ctx, &key, entry);
                return Err(err.into());
            }
        };
        let finished = Timestamp::now();
        let event = match kind {
            None => Event::ProbeSucceeded { seq, degraded },
            Some(kind) => Event::ProbeFailed { seq, kind },
        };
        entry.apply(event, finished, &policy, &mut effects);
        entry.last_probe = Some(summary);
        entry.not_before = None;
    }
    ctx.metrics.pool_state(
        &labels,
        entry.state.breaker,
        entry.state.consecutive_failures,
    );

    let now = Timestamp::now();
    let previous_conditions = entry
        .last_written
        .as_ref()
        .or(pool.status.as_ref())
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let desired = desired_status(
        &StatusInputs {
            generation: pool.metadata.generation,
            state: &entry.state,
            policy: &policy,
            last_probe: entry.last_probe.as_ref(),
            last_force_reopen: entry.last_force_reopen.as_ref(),
            previous_conditions: &previous_conditions,
        },
        now,
    );
    let api: Api<DbPool> = Api::namespaced(ctx.client.clone(), &ns);
    let mut write_result = Ok(());
    // Only the leader writes: a process that just lost the Lease must not race the new leader.
    let may_write = ctx.metrics.is_leader();
    if may_write
        && needs_write(
            &desired,
            entry.last_written.as_ref(),
            entry.last_written_at,
            ctx.config.status_refresh,
            now,
        )
    {
        let patch = serde_json::json!({
            "apiVersion": "dbpool.io/v1alpha1",
            "kind": "DbPool",
            "status": desired,
        });
        let written = {
            let _slot = ctx.api_slots.acquire().await;
            api.patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        };
        match written {
            Ok(_) => {
                debug!(pool = %key, phase = ?desired.phase, "status written");
                entry.last_written = Some(desired.clone());
                entry.last_written_at = Some(now);
                ctx.metrics.status_written(&labels);
            }
            Err(err) => write_result = Err(Error::Kube(err)),
        }
    }
    let label = entry.state.breaker.label_value();
    let current_label = pool.labels().get(BREAKER_LABEL).cloned();
    if may_write
        && write_result.is_ok()
        && current_label.as_deref() != Some(label)
        && entry.label_written.as_deref() != Some(label)
    {
        let patch = serde_json::json!({
            "apiVersion": "dbpool.io/v1alpha1",
            "kind": "DbPool",
            "metadata": { "labels": { BREAKER_LABEL: label } },
        });
        let labelled = {
            let _slot = ctx.api_slots.acquire().await;
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        };
        match labelled {
            Ok(_) => entry.label_written = Some(label.to_owned()),
            Err(err) => write_result = Err(Error::Kube(err)),
        }
    }

    publish_events(
        &ctx,
        &pool,
        &entry,
        &policy,
        &effects,
        before_phase,
        desired.phase,
    )
    .await;

    let next = entry.deadline(&policy, Timestamp::now());
    store(&ctx, &key, entry);
    write_result?;
    if let Ok(mut errors) = ctx.error_counts.lock() {
        errors.remove(&key);
    }
    let wait = Timestamp::now().duration_until(next);
    let wait = Duration::try_from(wait)
        .unwrap_or(Duration::ZERO)
        .max(Duration::from_millis(1));
    Ok(Action::requeue(wait))
}

fn store(ctx: &Context, key: &str, entry: PoolEntry) {
    if let Ok(mut pools) = ctx.pools.lock() {
        pools.insert(key.to_owned(), entry);
    }
}

/// The user-facing summary of a probe report.
fn summarize(report: &ProbeReport, now: Timestamp) -> ProbeSummary {
    report.to_summary(MicroTime(now))
}

fn credential_failure(err: &CredentialError, now: Timestamp) -> ProbeSummary {
    ProbeSummary {
        time: MicroTime(now),
        outcome: ProbeOutcome::ConfigFailure,
        stage: Some(ProbeStage::Credentials),
        latency_ms: 0,
        message: Some(err.to_string()),
        sql_state: None,
        server_version: None,
        in_recovery: None,
        connections: None,
        max_connections: None,
    }
}

async fn publish_events(
    ctx: &Context,
    pool: &DbPool,
    entry: &PoolEntry,
    policy: &Policy,
    effects: &[Effect],
    before: Option<Phase>,
    after: Option<Phase>,
) {
    let last_message = entry
        .last_probe
        .as_ref()
        .and_then(|p| p.message.clone())
        .unwrap_or_default();
    for effect in effects {
        match effect {
            Effect::BreakerChanged { from, to } => {
                let (type_, reason, note) = match to {
                    BreakerState::Open => (
                        EventType::Warning,
                        "BreakerOpened",
                        format!(
                            "circuit breaker opened ({from:?} -> Open) after {} consecutive failures: {last_message}",
                            entry.state.consecutive_failures
                        ),
                    ),
                    BreakerState::HalfOpen => (
                        EventType::Normal,
                        "BreakerHalfOpen",
                        "circuit breaker half-open: trial probe".to_owned(),
                    ),
                    BreakerState::Closed => (
                        EventType::Normal,
                        "BreakerClosed",
                        format!("circuit breaker closed ({from:?} -> Closed): database answered"),
                    ),
                };
                ctx.publish(pool, type_, reason, note).await;
            }
            Effect::CooldownStarted { until } => {
                let note = format!(
                    "{} attempts failed in a row; cooling down until {until}: {last_message}",
                    policy.max_attempts
                );
                ctx.publish(pool, EventType::Warning, "CooldownStarted", note)
                    .await;
            }
            Effect::CooldownEnded => {
                ctx.publish(
                    pool,
                    EventType::Normal,
                    "CooldownEnded",
                    "new cycle of attempts".to_owned(),
                )
                .await;
            }
            Effect::Recovered => {
                ctx.publish(
                    pool,
                    EventType::Normal,
                    "Recovered",
                    "the database answers again".to_owned(),
                )
                .await;
            }
            Effect::ForceReopened => {
                let token = entry
                    .last_force_reopen
                    .as_ref()
                    .map(|r| r.token.clone())
                    .unwrap_or_default();
                let note =
                    format!("force-reopen {token:?}: backoff and cooldown reset, probing now");
                ctx.publish(pool, EventType::Normal, "ForceReopen", note)
                    .await;
            }
            Effect::Ignored => {}
        }
    }
    if after == Some(Phase::ConfigError) && before != Some(Phase::ConfigError) {
        ctx.publish(pool, EventType::Warning, "ConfigError", last_message)
            .await;
    }
}

fn error_policy(pool: Arc<DbPool>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = pool_key(&pool.namespace().unwrap_or_default(), &pool.name_any());
    let failures = ctx
        .error_counts
        .lock()
        .map(|mut e| {
            let n = e.entry(key.clone()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let delay = Duration::from_millis(500)
        .saturating_mul(1 << failures.min(7))
        .min(Duration::from_secs(60));
    ctx.metrics.reconcile_failed(&PoolLabels {
        namespace: pool.namespace().unwrap_or_default(),
        name: pool.name_any(),
    });
    warn!(pool = %key, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BreakerStatus, DbPoolSpec};

    fn pool_with_status(name: &str, status: Option<DbPoolStatus>) -> DbPool {
        let spec: DbPoolSpec = serde_json::from_value(serde_json::json!({
            "database": {"host": "h", "dbname": "d", "user": "u"}
        }))
        .expect("spec");
        let mut pool = DbPool::new(name, spec);
        pool.metadata.namespace = Some("ns".into());
        pool.metadata.uid = Some(format!("uid-{name}"));
        pool.metadata.generation = Some(1);
        pool.status = status;
        pool
    }

    fn healthy_status(at: Timestamp) -> DbPoolStatus {
        DbPoolStatus {
            observed_generation: Some(1),
            phase: Some(Phase::Healthy),
            breaker: Some(BreakerStatus {
                state: BreakerState::Closed,
                since: None,
                next_probe_at: None,
                open_count: 0,
                half_open_successes: 0,
            }),
            last_probe: Some(ProbeSummary {
                time: MicroTime(at),
                outcome: ProbeOutcome::Success,
                stage: Some(ProbeStage::Saturation),
                latency_ms: 1,
                message: None,
                sql_state: None,
                server_version: None,
                in_recovery: None,
                connections: None,
                max_connections: None,
            }),
            last_success_time: Some(MicroTime(at)),
            ..DbPoolStatus::default()
        }
    }

    #[test]
    fn a_new_pool_is_probed_at_once() {
        let now = Timestamp::now();
        let pool = pool_with_status("fresh", None);
        let policy = Policy::from_spec(&pool.spec);
        let entry = PoolEntry::restore(&pool, &policy, now);
        assert_eq!(entry.deadline(&policy, now), now);
    }

    #[test]
    fn first_probes_after_a_restart_spread_over_one_interval() {
        let now = Timestamp::now();
        // Every pool was last probed long ago: all are overdue at the restart.
        let long_ago = now
            .checked_sub(SignedDuration::from_hours(1))
            .expect("valid");
        let deadlines: Vec<Timestamp> = (0..200)
            .map(|i| {
                let pool = pool_with_status(&format!("pool-{i}"), Some(healthy_status(long_ago)));
                let policy = Policy::from_spec(&pool.spec);
                PoolEntry::restore(&pool, &policy, now).deadline(&policy, now)
            })
            .collect();
        let interval = SignedDuration::from_secs(30);
        let offsets: Vec<f64> = deadlines
            .iter()
            .map(|d| d.duration_since(now).as_secs_f64())
            .collect();
        assert!(
            offsets
                .iter()
                .all(|o| *o >= 0.0 && *o <= interval.as_secs_f64()),
            "{offsets:?}"
        );
        // Spread, not clumped: every tenth of the interval gets some pools.
        for slot in 0..10 {
            let lo = f64::from(slot) * 3.0;
            let hits = offsets
                .iter()
                .filter(|o| **o >= lo && **o < lo + 3.0)
                .count();
            assert!(hits > 0, "no first probe in [{lo}s, {}s)", lo + 3.0);
        }
    }
}
