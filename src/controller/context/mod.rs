//! The controller's shared state: its parts, and the one registry of pools.
//!
//! Lives here: [`Context`] (what every reconcile shares), the pool registry ([`PoolEntry`]:
//! everything the process remembers about one pool in the registry itself, keyed by its
//! [`PoolRef`]), [`Parts`] (the parts that keep something per pool on the side: the prober's
//! connection shares, the targets, the fleet guard, the probe streams, the readiness ping
//! streams), forgetting a pool in all of them at once ([`Context::forget`]), the recovery memory
//! (`memory`) and the per-pool writer task (`writer`). Must not live here: the reconcile steps (`reconcile`), the
//! subsystems' own rules (each in its module), watches or event wording.
//!
//! **Forgetting is by construction.** A part that keeps something per pool is a field of
//! [`Parts`] and implements [`PerPool`]; [`Context::forget`] and [`Context::pools_known`]
//! destructure `Parts` without `..`, so a new part that is not forgotten does not compile. The
//! per-pool metric series go with them (`Metrics::forget`).

mod memory;
mod writer;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Client,
    runtime::{events::Recorder, reflector::Store},
};
use tracing::debug;

pub(crate) use memory::PoolMemory;
pub(crate) use writer::submit;

use super::{
    OperatorConfig,
    credentials::SecretCache,
    fence::Door,
    fleet::Fleet,
    names::{PerPool, PoolRef, owner_key, pool_labels},
    observer::{Footprint, Observer},
    pings::Pings,
    sharing::Streams,
    slots::ProbeSlots,
    sync::lock,
    targets::Targets,
    write::{WriteBudget, WriteIo, WriterState},
};
use crate::{api::DbPool, metrics::Metrics, probe::Prober};

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
    /// The probe permits, shared fairly across namespaces and targets (see `slots`).
    pub probe_permits: ProbeSlots,
    /// The global write budget (two token buckets; see `write`).
    pub write_budget: WriteBudget,
    /// The metrics (per-pool series only through `door`).
    pub metrics: Arc<Metrics>,
    /// Told about probes and acknowledged writes.
    pub observer: Arc<dyn Observer>,
    /// The watch's cache of DbPools: what exists now.
    pub store: Store<DbPool>,
    /// The pool registry.
    pools: Mutex<HashMap<PoolRef, PoolEntry>>,
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
    /// What waits to be written, and the pool's writer (see `write`).
    writer: WriterState,
}

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
        let Parts {
            prober,
            targets,
            fleet,
            streams,
            pings,
        } = &self.parts;
        vec![
            ("registry", lock(&self.pools).len()),
            ("prober", prober.pools_known()),
            ("targets", targets.pools_known()),
            ("fleet", fleet.pools_known()),
            ("streams", streams.pools_known()),
            ("pings", pings.pools_known()),
        ]
    }
}

impl Context {
    /// A context over its parts, with an empty registry.
    #[allow(clippy::too_many_arguments)] // each is one part; named at the one call site
    pub fn new(
        client: Client,
        config: OperatorConfig,
        secrets: SecretCache,
        recorder: Recorder,
        door: Door,
        parts: Parts,
        metrics: Arc<Metrics>,
        observer: Arc<dyn Observer>,
        store: Store<DbPool>,
    ) -> Self {
        metrics.controller_context(1);
        Self {
            probe_permits: ProbeSlots::new(config.max_concurrent_probes),
            write_budget: WriteBudget::new(config.counter_write_rate, config.transition_write_rate),
            client,
            config,
            secrets,
            recorder,
            door,
            parts,
            metrics,
            observer,
            store,
            pools: Mutex::new(HashMap::new()),
        }
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
        let Parts {
            prober,
            targets,
            fleet,
            streams,
            pings,
        } = &self.parts;
        let parts: [&dyn PerPool; 5] = [prober, targets, fleet, streams, pings];
        for part in parts {
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

    /// The pool's memory (if any, and if it belongs to the same object) and when a probe was
    /// requested, if it was; clears the request. Creates the pool's entry if it has none yet.
    pub fn take_memory(
        &self,
        pool: &DbPool,
        key: &PoolRef,
    ) -> (Option<PoolMemory>, Option<Timestamp>) {
        let mut pools = lock(&self.pools);
        // The entry exists from the first reconcile's start (not only from its end), so a probe
        // connection lost while that reconcile runs is requested, not dropped by request_probe.
        let entry = pools.entry(key.clone()).or_default();
        let requested = std::mem::take(&mut entry.probe_requested);
        let memory = entry.memory.clone().filter(|m| m.uid == pool.metadata.uid);
        (memory, requested)
    }

    /// Stores the memory a reconcile ended with; `succeeded` resets the error count.
    pub fn store_memory(&self, key: &PoolRef, memory: PoolMemory, succeeded: bool) {
        let mut pools = lock(&self.pools);
        let entry = pools.entry(key.clone()).or_default();
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
