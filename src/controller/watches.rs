//! The watches that drive reconciles, and the controller's life from start to stop.
//!
//! Lives here: [`run_controller`] (builds the [`Context`], the DbPool and Secret watches, the
//! connection-lost trigger, and runs kube-runtime's controller until `shutdown`), readiness
//! (both caches synced), and which changes trigger a reconcile. Must not live here: the lease
//! (`leadership`), reconcile steps (`reconcile`).

use std::{
    future::Future,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{
        Arc,
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
        Controller, WatchStreamExt, reflector,
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use tracing::{debug, info, warn};

use super::{
    OperatorConfig,
    context::{Context, LostReceiver},
    fence::Fence,
    liveness::WatchHealth,
    names::from_owner_key,
    observer::Observer,
    projection::project,
    reconcile::{error_policy, reconcile},
};
use crate::{
    api::{
        CREDENTIALS_LABEL, DbPool, FORCE_REOPEN_ANNOTATION, HELD_BY_ANNOTATION, HOLD_ANNOTATION,
    },
    metrics::Metrics,
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
    fence: Fence,
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
    let (secret_reader, secret_writer) = reflector::store();
    let (pool_reader, pool_writer) = reflector::store();
    let stores = (secret_reader, pool_reader.clone());
    let (ctx, lost_rx, edge_refs) =
        Context::start(client, config, metrics.clone(), observer, fence, stores);
    let (lost_task, lost_refs) = trigger_lost_connections(&ctx, lost_rx);
    // Pools told that their target accepts connections again (see `pings`) reconcile at once.
    let triggered = futures::stream::select(
        tokio_stream::wrappers::UnboundedReceiverStream::new(lost_refs),
        tokio_stream::wrappers::UnboundedReceiverStream::new(edge_refs),
    );
    // Ready once both caches have completed their initial list. (Noted from the streams:
    // awaiting `Store::wait_until_ready` next to the controller's own wait can miss its wake-up.)
    let synced = Arc::new(Synced::default());
    let pools = pool_stream(pools_api, pool_writer, &ctx, synced.clone());
    let secrets = secret_stream(secrets_api, secret_writer, &metrics, synced);
    info!(namespace = ?ctx.config.namespace, "dbpool-operator starting");
    let shutdown = shutdown.boxed().shared();
    let mapper_pools = pool_reader.clone();
    let controller = Controller::for_stream(pools, pool_reader)
        .watches_stream(secrets, move |secret| pools_reading(&mapper_pools, &secret))
        .reconcile_on(triggered)
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

/// Probe connections that die trigger their pools at once, and the other owners of their probe
/// streams (they lost their source too: they join the one new attempt, see `sharing`, instead
/// of waiting an interval). The task holds only a weak reference, so it never keeps a stopped
/// controller's context alive.
fn trigger_lost_connections(
    ctx: &Arc<Context>,
    mut lost_rx: LostReceiver,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<ObjectRef<DbPool>>,
) {
    let (lost_tx, lost_refs) = tokio::sync::mpsc::unbounded_channel::<ObjectRef<DbPool>>();
    let weak = Arc::downgrade(ctx);
    let task = tokio::spawn(async move {
        while let Some(lost) = lost_rx.recv().await {
            let Some(ctx) = weak.upgrade() else { break };
            for owner in lost.owners {
                debug!(pool = %owner, reason = %lost.reason, "probe connection lost");
                let Some(pool) = from_owner_key(&owner) else {
                    continue;
                };
                for peer in ctx.parts.streams.peers(&pool).into_iter().chain([pool]) {
                    ctx.request_probe(&peer);
                    let _ = lost_tx.send(peer);
                }
            }
        }
    });
    (task, lost_refs)
}

/// The DbPool watch: cached as `projection` keeps it (what the operator reads; the status goes
/// to the registry until the pool's memory is rebuilt from it), a Delete (or a re-list that
/// lost pools) forgets them, and only spec changes (generation), force-reopen and hold
/// annotations and new objects trigger a reconcile; our own status and label writes do not.
fn pool_stream(
    api: Api<DbPool>,
    writer: reflector::store::Writer<DbPool>,
    ctx: &Arc<Context>,
    synced: Arc<Synced>,
) -> impl futures::Stream<Item = Result<DbPool, watcher::Error>> + Send + 'static {
    let forget_ctx = Arc::downgrade(ctx);
    let project_ctx = Arc::downgrade(ctx);
    let metrics = ctx.metrics.clone();
    let health = WatchHealth::new("DbPools", metrics.clone());
    // Listed in pages (not `any_semantic`: a list at resourceVersion 0 comes whole from the
    // apiserver's cache, and 10,000 pools with their managedFields were parsed at once before
    // any was projected: the restart's memory peak). Each page is projected as it is emitted.
    let mut config = watcher::Config::default().page_size(LIST_PAGE);
    if let Some(selector) = &ctx.config.pool_selector {
        config = config.labels(selector);
    }
    watcher(api, config)
        .default_backoff()
        .modify(move |pool| {
            let status = project(pool);
            if let Some(ctx) = project_ctx.upgrade() {
                ctx.note_watched_status(pool, status);
            }
        })
        .reflect(writer)
        .inspect(move |event| health.note(event))
        .inspect(move |event| match event {
            Ok(watcher::Event::Delete(pool)) => {
                if let Some(ctx) = forget_ctx.upgrade() {
                    ctx.forget(&ObjectRef::from_obj(pool));
                }
            }
            Ok(watcher::Event::InitDone) => {
                synced.mark(true, &metrics);
                // A re-list replaced the cache: pools deleted meanwhile sent no Delete event.
                if let Some(ctx) = forget_ctx.upgrade() {
                    ctx.forget_vanished();
                }
            }
            _ => {}
        })
        .applied_objects()
        .predicate_filter(trigger_hash, Default::default())
}

/// The Secret watch: metadata only, and only of Secrets that opted in (label selector), so the
/// operator neither lists nor caches any other; the cached metadata drops the
/// last-applied-configuration annotation (a full copy of the object as applied, stringData
/// included) and managedFields. A change re-triggers the pools that refer to the Secret.
fn secret_stream(
    api: Api<PartialObjectMeta<Secret>>,
    writer: reflector::store::Writer<PartialObjectMeta<Secret>>,
    metrics: &Arc<Metrics>,
    synced: Arc<Synced>,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + 'static
{
    let metrics = metrics.clone();
    let health = WatchHealth::new("Secrets", metrics.clone());
    let config = watcher::Config::default()
        .labels(&format!("{CREDENTIALS_LABEL}=true"))
        .any_semantic();
    watcher(api, config)
        .default_backoff()
        .modify(strip_secret_metadata)
        .reflect(writer)
        .inspect(move |event| health.note(event))
        .inspect(move |event| {
            if let Ok(watcher::Event::InitDone) = event {
                synced.mark(false, &metrics);
            }
        })
        .touched_objects()
}

/// The pools in the Secret's namespace that read it.
fn pools_reading(
    pools: &Store<DbPool>,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<DbPool>> {
    let ns = secret.namespace().unwrap_or_default();
    let name = secret.name_any();
    pools
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()) && refers_to(p, &name))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
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

/// DbPools per list page: the most objects the watch holds unprojected at once.
const LIST_PAGE: u32 = 250;

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
