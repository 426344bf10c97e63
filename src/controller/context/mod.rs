//! The controller's shared state: its parts, and the one registry of pools.
//!
//! Lives here: [`Context`] (what every reconcile shares), the pool registry ([`PoolEntry`]:
//! everything the process remembers about one pool in the registry itself, keyed by its
//! [`PoolRef`]), [`Parts`] (the parts that keep something per pool on the side: the prober's
//! connection shares, the targets, the fleet guard, the probe streams, the readiness ping
//! streams, the learned timeouts), forgetting a pool in all of them at once ([`Context::forget`]),
//! the recovery memory (`memory`), the scheduling model (`schedule`: when a pool acts next, one
//! value with one reason) and the per-pool writer task (`writer`). Must not live here: the
//! reconcile steps (`reconcile`), the
//! subsystems' own rules (each in its module), watches or event wording.
//!
//! **Forgetting is by construction.** A part that keeps something per pool is a field of
//! [`Parts`] and implements [`PerPool`]; `Parts::each`, through which [`Context::forget`] and
//! the footprint see the parts, destructures `Parts` without `..`, so a new part that is not
//! forgotten does not compile. The
//! per-pool metric series go with them (`Metrics::forget`).

#[cfg(test)]
#[path = "tests/footprint.rs"]
mod footprint;
mod memory;
mod schedule;
mod writer;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::{
    Client,
    core::PartialObjectMeta,
    runtime::{
        events::{Recorder, Reporter},
        reflector::Store,
    },
};
use tracing::debug;

pub(crate) use memory::PoolMemory;
pub(crate) use schedule::{Plan, Reason, Wants};
pub(crate) use writer::submit;

use super::{
    FIELD_MANAGER, OperatorConfig,
    api_permits::ApiPermits,
    credentials::SecretCache,
    fence::{Door, Fence},
    fleet::Fleet,
    names::{PerPool, PoolRef, owner_key, pool_labels},
    observer::{Footprint, Observer},
    pings::Pings,
    probe_permits::ProbePermits,
    sharing::Streams,
    sync::lock,
    targets::Targets,
    timeouts::Timeouts,
    write::{WriteBudget, WriteIo, WriterState},
};
use crate::{
    api::{DbPool, DbPoolStatus},
    metrics::Metrics,
    probe::{ConnectionLost, Prober, ProberConfig},
};

/// Shared state of one running controller. Dropped, with its probe connections and caches, when
/// the controller stops.
pub(crate) struct Context {
    /// The apiserver client (reads; writes go through `door`).
    pub client: Client,
    /// The operator's settings.
    pub config: OperatorConfig,
    /// Reads Secrets.
    pub secrets: SecretCache,
    /// Publishes events (through `door`).
    pub recorder: Recorder,
    /// The one door for writes and per-pool metric series (see `fence`).
    pub door: Door,
    /// The parts that keep something per pool besides the registry.
    pub parts: Parts,
    /// The probe permits, shared fairly across namespaces and targets (see `probe_permits`).
    pub probe_permits: ProbePermits,
    /// The global write budget (two token buckets; see `write`).
    pub write_budget: WriteBudget,
    /// The metrics (per-pool series only through `door`).
    pub metrics: Arc<Metrics>,
    /// Told about probes and acknowledged writes.
    pub observer: Arc<dyn Observer>,
    /// The watch's cache of DbPools: what exists now.
    pub store: Store<DbPool>,
    /// The pool registry (boxed entries: a map's free slots cost a pointer, not an entry).
    pools: Mutex<HashMap<PoolRef, Box<PoolEntry>>>,
}

/// The parts that keep something per pool besides the registry (see the module comment).
pub(crate) struct Parts {
    /// Probes, with one persistent connection per target, shared by its owners.
    pub prober: Prober,
    /// Per-target shared connect schedules while a target is down (see `targets`).
    pub targets: Targets,
    /// The fleet guard (see `fleet`).
    pub fleet: Fleet,
    /// Per-credential probe streams of healthy targets (see `sharing`).
    pub streams: Streams,
    /// Readiness ping streams of targets whose pools wait out an outage (see `pings`).
    pub pings: Pings,
    /// The learned adaptive probe timeouts, per target (see `timeouts`).
    pub timeouts: Timeouts,
}

/// Everything this process remembers about one pool in the registry itself.
#[derive(Default)]
pub(crate) struct PoolEntry {
    /// The recovery memory, once a reconcile has run.
    memory: Option<PoolMemory>,
    /// Probe at the next reconcile (the probe connection was lost): when it was first asked.
    probe_requested: Option<Timestamp>,
    /// Failed reconciles in a row, for the retry delay.
    error_count: u32,
    /// The status the watch delivered while the pool has no memory (for the uid it carries):
    /// what the first reconcile rebuilds the memory from. The cache keeps no status (see
    /// `projection`), and this goes once the memory exists.
    watched_status: Option<(Option<String>, Box<DbPoolStatus>)>,
    /// What waits to be written, and the pool's writer (see `write`).
    writer: WriterState,
}

impl Parts {
    /// Every part, named. The destructuring has no `..`: a new part does not compile until it
    /// is listed here, and then it is forgotten and counted with the others.
    fn each(&self) -> [(&'static str, &dyn PerPool); 6] {
        let Parts {
            prober,
            targets,
            fleet,
            streams,
            pings,
            timeouts,
        } = self;
        [
            ("prober", prober),
            ("targets", targets),
            ("fleet", fleet),
            ("streams", streams),
            ("pings", pings),
            ("timeouts", timeouts),
        ]
    }
}

/// What [`Context::take_memory`] finds for a pool.
pub(crate) struct Recalled {
    /// Its memory in this process.
    pub memory: Option<PoolMemory>,
    /// Without a memory: the status the watch delivered, to rebuild one from.
    pub watched_status: Option<DbPoolStatus>,
    /// When a probe was requested (its probe connection was lost), if it was.
    pub requested: Option<Timestamp>,
}

/// The prober's channel of lost connections.
pub(crate) type LostReceiver = tokio::sync::mpsc::UnboundedReceiver<ConnectionLost>;

/// The ping streams' channel of pools whose target accepts connections again.
pub(crate) type EdgeReceiver = tokio::sync::mpsc::UnboundedReceiver<PoolRef>;

impl PerPool for Prober {
    fn forget(&self, pool: &PoolRef) {
        Prober::forget(self, &owner_key(pool));
    }

    fn pools_known(&self) -> usize {
        self.owner_count()
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        self.metrics.controller_context(-1);
        debug!("controller context dropped");
    }
}

impl Footprint for Context {
    fn pools_known(&self) -> Vec<(&'static str, usize)> {
        let registry = ("registry", lock(&self.pools).len());
        let parts = self
            .parts
            .each()
            .map(|(name, part)| (name, part.pools_known()));
        std::iter::once(registry).chain(parts).collect()
    }
}

impl Context {
    /// The context of one controller run, over the two caches (Secrets' metadata, DbPools),
    /// with an empty registry; the prober's channel of lost connections; and the ping streams'
    /// channel of pools whose target accepts connections again. Tells the observer where its
    /// footprint is.
    pub fn start(
        client: Client,
        config: OperatorConfig,
        metrics: Arc<Metrics>,
        observer: Arc<dyn Observer>,
        fence: Fence,
        (secret_store, store): (Store<PartialObjectMeta<Secret>>, Store<DbPool>),
    ) -> (Arc<Self>, LostReceiver, EdgeReceiver) {
        let (prober, lost_rx) = Prober::new(ProberConfig {
            reconnect_every: config.reconnect_every,
        });
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: Some(config.instance.clone()),
        };
        let permits = Arc::new(ApiPermits::new(config.max_concurrent_api_requests));
        let secrets =
            SecretCache::new(client.clone(), secret_store, store.clone(), permits.clone());
        let (pings, edge_refs) = Pings::new(config.max_pings_per_second, metrics.clone());
        let parts = Parts {
            prober,
            targets: Targets::default(),
            fleet: Fleet::new(config.fleet_guard, metrics.clone()),
            streams: Streams::default(),
            pings,
            timeouts: Timeouts::default(),
        };
        metrics.controller_context(1);
        let ctx = Arc::new(Self {
            probe_permits: ProbePermits::new(config.max_concurrent_probes),
            write_budget: WriteBudget::new(config.counter_write_rate, config.transition_write_rate),
            recorder: Recorder::new(client.clone(), reporter),
            door: Door::new(fence, permits, metrics.clone()),
            client,
            config,
            secrets,
            parts,
            metrics,
            observer: observer.clone(),
            store,
            pools: Mutex::new(HashMap::new()),
        });
        let footprint: Arc<dyn Footprint> = ctx.clone();
        observer.controller_started(Arc::downgrade(&footprint));
        (ctx, lost_rx, edge_refs)
    }

    /// What sending a pool's outbox needs.
    pub fn write_io(&self) -> WriteIo<'_> {
        WriteIo {
            client: &self.client,
            door: &self.door,
            recorder: &self.recorder,
            observer: self.observer.as_ref(),
        }
    }

    /// Whether the pool (this very object, by uid) still exists in the watch's cache.
    pub fn exists(&self, pool: &DbPool, key: &PoolRef) -> bool {
        self.store
            .get(key)
            .is_some_and(|cached| cached.metadata.uid == pool.metadata.uid)
    }

    /// Forgets every pool the watch's cache no longer has (deleted while the watch re-listed,
    /// so no Delete event came).
    pub fn forget_vanished(&self) {
        let vanished: Vec<PoolRef> = lock(&self.pools)
            .keys()
            .filter(|key| self.store.get(key).is_none())
            .cloned()
            .collect();
        for key in vanished {
            self.forget(&key);
        }
    }

    /// Forgets everything about a pool: its registry entry (memory, writer), its share of every
    /// part, its metric series.
    pub fn forget(&self, pool: &PoolRef) {
        lock(&self.pools).remove(pool);
        for (_, part) in self.parts.each() {
            part.forget(pool);
        }
        self.metrics.forget(&pool_labels(pool));
        debug!(pool = %pool, "forgot deleted pool");
    }

    /// Marks a pool for a probe at its next reconcile (only pools this process already knows).
    pub fn request_probe(&self, pool: &PoolRef) {
        if let Some(entry) = lock(&self.pools).get_mut(pool) {
            entry.probe_requested.get_or_insert_with(Timestamp::now);
        }
    }

    /// Keeps the status the watch delivered with `pool` (which the projection took off the
    /// cached object) while the pool has no memory of that object to restore it from; drops it
    /// otherwise (the memory is the truth, and its last written status the one copy).
    pub fn note_watched_status(&self, pool: &DbPool, status: Option<DbPoolStatus>) {
        let key = PoolRef::from_obj(pool);
        let mut pools = lock(&self.pools);
        let known = pools
            .get(&key)
            .and_then(|entry| entry.memory.as_ref())
            .is_some_and(|memory| memory.uid == pool.metadata.uid);
        if known {
            return;
        }
        let Some(status) = status else {
            if let Some(entry) = pools.get_mut(&key) {
                entry.watched_status = None;
            }
            return;
        };
        pools.entry(key).or_default().watched_status =
            Some((pool.metadata.uid.clone(), Box::new(status)));
    }

    /// The pool's memory (if any, and if it belongs to the same object), or else the status the
    /// watch delivered for it (to restore the memory from); and when a probe was requested, if
    /// it was; clears the request. Creates the pool's entry if it has none yet.
    pub fn take_memory(&self, pool: &DbPool, key: &PoolRef) -> Recalled {
        let mut pools = lock(&self.pools);
        // The entry exists from the first reconcile's start (not only from its end), so a probe
        // connection lost while that reconcile runs is requested, not dropped by request_probe.
        let entry = pools.entry(key.clone()).or_default();
        let requested = std::mem::take(&mut entry.probe_requested);
        let memory = entry.memory.clone().filter(|m| m.uid == pool.metadata.uid);
        let watched_status = match (&memory, &entry.watched_status) {
            (None, Some((uid, status))) if *uid == pool.metadata.uid => Some((**status).clone()),
            _ => None,
        };
        Recalled {
            memory,
            watched_status,
            requested,
        }
    }

    /// Stores the memory a reconcile ended with (the watched status it was rebuilt from goes);
    /// `succeeded` resets the error count.
    pub fn store_memory(&self, key: &PoolRef, memory: PoolMemory, succeeded: bool) {
        let mut pools = lock(&self.pools);
        let entry = pools.entry(key.clone()).or_default();
        entry.watched_status = None;
        entry.memory = Some(memory);
        if succeeded {
            entry.error_count = 0;
        }
    }

    /// Counts a failed reconcile and returns how many failed in a row.
    pub fn count_error(&self, key: &PoolRef) -> u32 {
        let mut pools = lock(&self.pools);
        let entry = pools.entry(key.clone()).or_default();
        entry.error_count = entry.error_count.saturating_add(1);
        entry.error_count
    }

    /// Runs `f` on the pool's writer, if the pool is registered.
    fn with_writer<T>(&self, key: &PoolRef, f: impl FnOnce(&mut WriterState) -> T) -> Option<T> {
        lock(&self.pools)
            .get_mut(key)
            .map(|entry| f(&mut entry.writer))
    }

    /// Runs `f` on the pool's writer, registering the pool if needed.
    fn with_writer_or_new<T>(&self, key: &PoolRef, f: impl FnOnce(&mut WriterState) -> T) -> T {
        f(&mut lock(&self.pools).entry(key.clone()).or_default().writer)
    }
}
