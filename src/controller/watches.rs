//! The watches that drive reconciles, and the controller's life from start to stop.
//!
//! Lives here: [`run_controller`] (builds the [`Context`], the DbPool and Secret watches, the
//! connection-lost trigger, and runs kube-runtime's controller until `shutdown`), readiness
//! (both caches synced), and which changes trigger a reconcile. Must not live here: the lease
//! (`leadership`), reconcile steps (`reconcile`).

use super::api_slots::ApiSlots;
use std::{
    collections::HashMap,
    future::Future,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::SeqCst},
    },
    time::Duration,
};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, ResourceExt,
    core::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt,
        events::{Recorder, Reporter},
        reflector,
        reflector::ObjectRef,
        watcher,
    },
};
use tracing::{debug, info, warn};

use super::{
    FIELD_MANAGER, OperatorConfig,
    context::Context,
    credentials::SecretCache,
    fleet::Fleet,
    leadership::WriteGate,
    liveness::WatchHealth,
    observer::Observer,
    reconcile::{error_policy, reconcile},
    sharing::Streams,
    slots::ProbeSlots,
    targets::Targets,
    write::WriteBudget,
};
use crate::{
    api::{
        CREDENTIALS_LABEL, DbPool, FORCE_REOPEN_ANNOTATION, HELD_BY_ANNOTATION, HOLD_ANNOTATION,
    },
    metrics::Metrics,
    probe::{Prober, ProberConfig},
};

/// How long a stopping controller may take to finish its in-flight reconciles.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs the controller until `shutdown` resolves; its context (probe connections, caches, pool
/// map) is dropped when this returns.
pub(super) async fn run_controller(
    client: Client,
    config: OperatorConfig,
    metrics: Arc<Metrics>,
    observer: Arc<dyn Observer>,
    gate: WriteGate,
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
    let api_slots = Arc::new(ApiSlots::new(config.max_concurrent_api_requests));
    let ctx = Arc::new(Context {
        client: client.clone(),
        secrets: SecretCache::new(
            client.clone(),
            secret_reader.clone(),
            pool_reader.clone(),
            api_slots.clone(),
        ),
        targets: Targets::default(),
        fleet: Fleet::new(config.fleet_guard, metrics.clone()),
        streams: Streams::default(),
        probe_slots: ProbeSlots::new(config.max_concurrent_probes),
        api_slots,
        write_budget: WriteBudget::new(config.counter_write_rate, config.transition_write_rate),
        config,
        prober,
        recorder,
        pools: Mutex::new(HashMap::new()),
        metrics: metrics.clone(),
        observer,
        gate,
        store: pool_reader.clone(),
    });
    metrics.controller_context(1);

    // Probe connections that die trigger their pools at once. The task holds only a weak
    // reference, so it never keeps a stopped controller's context alive.
    let (lost_tx, lost_refs) = tokio::sync::mpsc::unbounded_channel::<ObjectRef<DbPool>>();
    let lost_ctx = Arc::downgrade(&ctx);
    let lost_task = tokio::spawn(async move {
        while let Some(lost) = lost_rx.recv().await {
            let Some(ctx) = lost_ctx.upgrade() else { break };
            for owner in lost.owners {
                debug!(pool = %owner, reason = %lost.reason, "probe connection lost");
                if let Some((ns, name)) = owner.split_once('/') {
                    let pool = ObjectRef::new(name).within(ns);
                    // The pools that take this pool's results lost their source too: they
                    // join the one new attempt (see `sharing`) instead of waiting an interval.
                    for peer in ctx.streams.peers(&pool) {
                        ctx.request_probe(&peer);
                        let _ = lost_tx.send(peer);
                    }
                    ctx.request_probe(&pool);
                    let _ = lost_tx.send(pool);
                }
            }
        }
    });

    // Only spec changes (generation), force-reopen and hold annotations and new objects trigger a
    // reconcile; our own status and label writes do not.
    // Ready once both caches have completed their initial list. (Noted from the streams:
    // awaiting `Store::wait_until_ready` next to the controller's own wait can miss its wake-up.)
    let synced = Arc::new(Synced::default());
    let forget_ctx = Arc::downgrade(&ctx);
    let pools_synced = synced.clone();
    let pool_metrics = metrics.clone();
    let pool_health = WatchHealth::new("DbPools", metrics.clone());
    let mut pool_watch = watcher::Config::default().any_semantic();
    if let Some(selector) = &ctx.config.pool_selector {
        pool_watch = pool_watch.labels(selector);
    }
    let pool_stream = watcher(pools_api, pool_watch)
        .default_backoff()
        .modify(strip_pool_metadata)
        .reflect(pool_writer)
        .inspect(move |event| pool_health.note(event))
        .inspect(move |event| match event {
            Ok(watcher::Event::Delete(pool)) => {
                if let Some(ctx) = forget_ctx.upgrade() {
                    ctx.forget(&ObjectRef::from_obj(pool));
                }
            }
            Ok(watcher::Event::InitDone) => {
                pools_synced.mark(true, &pool_metrics);
                // A re-list replaced the cache: pools deleted meanwhile sent no Delete event.
                if let Some(ctx) = forget_ctx.upgrade() {
                    ctx.forget_vanished();
                }
            }
            _ => {}
        })
        .applied_objects()
        .predicate_filter(trigger_hash, Default::default());

    // Secrets: metadata only, and only of Secrets that opted in (label selector), so the
    // operator neither lists nor caches any other; the cached metadata drops the
    // last-applied-configuration annotation (a full copy of the object as applied, stringData
    // included) and managedFields. A change re-triggers the pools that refer to the Secret.
    let mapper_pools = pool_reader.clone();
    let secrets_synced = synced.clone();
    let secret_metrics = metrics.clone();
    let secret_health = WatchHealth::new("Secrets", metrics.clone());
    let secret_watch = watcher::Config::default()
        .labels(&format!("{CREDENTIALS_LABEL}=true"))
        .any_semantic();
    let secret_stream = watcher(secrets_api, secret_watch)
        .default_backoff()
        .modify(strip_secret_metadata)
        .reflect(secret_writer)
        .inspect(move |event| secret_health.note(event))
        .inspect(move |event| {
            if let Ok(watcher::Event::InitDone) = event {
                secrets_synced.mark(false, &secret_metrics);
            }
        })
        .touched_objects();

    info!(namespace = ?ctx.config.namespace, "dbpool-operator starting");
    let shutdown = shutdown.boxed().shared();
    let controller = Controller::for_stream(pool_stream, pool_reader)
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
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                debug!(error = %err, "reconcile loop");
            }
        });
    // A graceful stop waits for in-flight reconciles (and, before the first list completes,
    // never starts); after the grace the controller, with whatever it still runs, is dropped.
    let deadline = async {
        shutdown.clone().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        () = controller => {},
        () = deadline => warn!(grace = ?SHUTDOWN_GRACE, "controller did not stop in time; dropped"),
    }
    lost_task.abort();
    metrics.set_ready(false);
    info!("dbpool-operator controller stopped");
}

/// Which of the two caches have completed their initial list.
#[derive(Default)]
struct Synced {
    pools: AtomicBool,
    secrets: AtomicBool,
}

impl Synced {
    fn mark(&self, pools: bool, metrics: &Metrics) {
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

/// Drops from a watched Secret's metadata what the operator has no use for and must not keep:
/// `kubectl.kubernetes.io/last-applied-configuration` (which holds the applied object, data
/// included) and managedFields.
fn strip_secret_metadata(secret: &mut PartialObjectMeta<Secret>) {
    if let Some(annotations) = secret.metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
    secret.metadata.managed_fields = None;
}

/// Drops from a cached DbPool what the operator never reads: managedFields and the
/// last-applied annotation (each a copy of much of the object; at 10,000 pools they were most
/// of the operator's memory).
fn strip_pool_metadata(pool: &mut DbPool) {
    if let Some(annotations) = pool.metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
    pool.metadata.managed_fields = None;
}

/// The annotation `kubectl apply` writes with the whole applied object.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Whether `pool` reads Secret `secret` (same namespace assumed).
fn refers_to(pool: &DbPool, secret: &str) -> bool {
    let db = &pool.spec.database;
    db.password_secret_ref
        .as_ref()
        .is_some_and(|r| r.name == secret)
        || db.ca_secret_ref.as_ref().is_some_and(|r| r.name == secret)
}

/// What makes a DbPool change worth a reconcile: generation, force-reopen token, maintenance hold
/// (who and why), identity.
/// (A process-local hash: it is only compared within this process.)
fn trigger_hash(pool: &DbPool) -> Option<u64> {
    let mut h = DefaultHasher::new();
    pool.metadata.generation.hash(&mut h);
    for annotation in [FORCE_REOPEN_ANNOTATION, HOLD_ANNOTATION, HELD_BY_ANNOTATION] {
        pool.annotations().get(annotation).hash(&mut h);
    }
    pool.metadata.uid.hash(&mut h);
    Some(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn watched_secret_metadata_drops_last_applied_and_managed_fields() {
        let mut secret: PartialObjectMeta<Secret> = PartialObjectMeta::default();
        secret.metadata.annotations = Some(BTreeMap::from([
            (
                LAST_APPLIED.to_owned(),
                "{\"stringData\":{\"password\":\"x\"}}".to_owned(),
            ),
            ("dbpool.io/allowed-hosts".to_owned(), "db".to_owned()),
        ]));
        secret.metadata.managed_fields = Some(vec![Default::default()]);
        strip_secret_metadata(&mut secret);
        let annotations = secret.metadata.annotations.unwrap_or_default();
        assert!(!annotations.contains_key(LAST_APPLIED));
        assert!(annotations.contains_key("dbpool.io/allowed-hosts"));
        assert!(secret.metadata.managed_fields.is_none());
    }
}
