//! The controller's shared state: clients, budgets, and one map entry per pool.
//!
//! Lives here: [`Context`] (what every reconcile shares), [`PoolSlot`] (everything the process
//! remembers about one pool, keyed by its `ObjectRef`, so forgetting a pool forgets all of it),
//! [`PoolMemory`] (the recovery memory a reconcile works on), the stable jitter seed, and the
//! lock policy. Must not live here: the reconcile steps, watches or event wording.
//!
//! **Lock policy.** Every mutex here guards plain data whose updates cannot panic half-way, so a
//! poisoned lock is recovered ([`lock`]) rather than turned into an error or a panic.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Client, ResourceExt,
    runtime::{
        events::Recorder,
        reflector::{ObjectRef, Store},
    },
};
use tracing::debug;

use super::{
    OperatorConfig,
    api_slots::ApiSlots,
    credentials::SecretCache,
    fleet::Fleet,
    leadership::WriteGate,
    observer::Observer,
    sharing::Streams,
    slots::ProbeSlots,
    status::restore_state,
    targets::Targets,
    write::{WriteBudget, WriterSlot},
};
use crate::{
    api::{
        BREAKER_LABEL, BreakerState, CONDITION_BREAKER_OPEN, DbPool, DbPoolStatus,
        ForceReopenRecord, ProbeSummary, reason,
    },
    metrics::{Metrics, PoolLabels},
    probe::Prober,
    recovery::{self, Effect, Event, Policy, PoolState, add},
};

/// Locks `mutex`, recovering the guard if a panic poisoned it (see the module's lock policy).
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Shared state of one running controller. Dropped, with its probe connections and caches, when
/// the controller stops.
pub(super) struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    pub prober: Prober,
    pub secrets: SecretCache,
    pub recorder: Recorder,
    pub pools: Mutex<HashMap<ObjectRef<DbPool>, PoolSlot>>,
    /// Per-target shared connect schedules and results (see `targets`).
    pub targets: Targets,
    /// The fleet guard (see `fleet`).
    pub fleet: Fleet,
    /// Per-credential probe streams of healthy targets (see `sharing`).
    pub streams: Streams,
    /// The probe slots, shared fairly across namespaces and targets (see `slots`).
    pub probe_slots: ProbeSlots,
    pub api_slots: Arc<ApiSlots>,
    /// The global write budget (two token buckets; see `write`).
    pub write_budget: WriteBudget,
    pub metrics: Arc<Metrics>,
    pub observer: Arc<dyn Observer>,
    /// Leadership as of now: every write checks it right before sending.
    pub gate: WriteGate,
    /// The watch's cache of DbPools: what exists now.
    pub store: Store<DbPool>,
}

/// Everything this process remembers about one pool.
#[derive(Default)]
pub(super) struct PoolSlot {
    /// The recovery memory, once a reconcile has run.
    pub memory: Option<PoolMemory>,
    /// Probe at the next reconcile (the probe connection was lost): when it was first asked.
    pub probe_requested: Option<Timestamp>,
    /// Failed reconciles in a row, for the retry delay.
    pub error_count: u32,
    /// What waits to be written, and the pool's writer (see `write`).
    pub writer: WriterSlot,
}

/// The recovery memory of one pool. The durable copy is the status; this is rebuilt from it.
#[derive(Clone)]
pub(super) struct PoolMemory {
    pub uid: Option<String>,
    pub generation: Option<i64>,
    pub state: PoolState,
    pub last_probe: Option<ProbeSummary>,
    pub last_force_reopen: Option<ForceReopenRecord>,
    /// The maintenance hold acted on, as [`Hold::describe`](crate::api::Hold::describe) puts it.
    pub hold: Option<String>,
    /// The last status handed to the pool's writer (written, or waiting to be: the latest wins),
    /// or restored from the object.
    pub last_written: Option<DbPoolStatus>,
    pub last_written_at: Option<Timestamp>,
    /// The last breaker label handed to the writer.
    pub label_written: Option<String>,
    pub label_written_at: Option<Timestamp>,
    pub credentials_fingerprint: Option<String>,
    /// No probe before this instant (restart spreading, rate limit of loss-triggered probes,
    /// the next shared attempt of a target that is down).
    pub not_before: Option<Timestamp>,
    /// The address of the last probe that logged in: the only address a gate may point at.
    pub gate_peer: Option<std::net::SocketAddr>,
    /// The gate Service this process last wrote for the pool (to remove it when undeclared).
    pub gate_applied: Option<String>,
    /// Since when a pool that is due "now" (never probed) has waited for its target's shared
    /// attempt, or the deadline a pool first found due for a probe stream to answer (see
    /// `sharing`): the deadline a shared result must satisfy. Cleared by a probe.
    pub due_since: Option<Timestamp>,
    /// When the probe connection's loss asked for a probe that has not run yet: a probe of the
    /// pool's stream that started since then answers the request as well as its own would.
    pub requested_at: Option<Timestamp>,
    /// The grid point of the pool's probe stream it plans its next probe at, when that is
    /// before the engine's deadline (a steady pool only; see `sharing`). Recomputed after every
    /// result, cleared by every trigger.
    pub aligned: Option<Timestamp>,
}

/// The labels of a pool's metric series.
pub(super) fn pool_labels(pool: &ObjectRef<DbPool>) -> PoolLabels {
    PoolLabels {
        namespace: pool.namespace.clone().unwrap_or_default(),
        name: pool.name.clone(),
    }
}

/// The `namespace/name` key the prober knows a pool by.
pub(super) fn owner_key(pool: &ObjectRef<DbPool>) -> String {
    format!(
        "{}/{}",
        pool.namespace.as_deref().unwrap_or_default(),
        pool.name
    )
}

/// The jitter seed of a pool: FNV-1a over its uid, namespace and name. Stable across processes,
/// restarts and Rust releases, so the schedule the docs promise is reproducible.
pub(super) fn stable_seed(pool: &DbPool) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let uid = pool.metadata.uid.as_deref().unwrap_or_default();
    let namespace = pool.namespace().unwrap_or_default();
    let name = pool.name_any();
    let mut hash = OFFSET;
    for part in [uid, namespace.as_str(), name.as_str()] {
        // A separator that cannot occur in any of the parts keeps ("ab","c") apart from ("a","bc").
        for byte in part.bytes().chain(std::iter::once(0xff)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    hash
}

impl Drop for Context {
    fn drop(&mut self) {
        self.metrics.controller_context(-1);
        debug!("controller context dropped");
    }
}

impl Context {
    /// Whether the pool (this very object, by uid) still exists in the watch's cache.
    pub fn exists(&self, pool: &DbPool, key: &ObjectRef<DbPool>) -> bool {
        self.store
            .get(key)
            .is_some_and(|cached| cached.metadata.uid == pool.metadata.uid)
    }

    /// Forgets every pool the watch's cache no longer has (deleted while the watch re-listed,
    /// so no Delete event came).
    pub fn forget_vanished(&self) {
        let vanished: Vec<ObjectRef<DbPool>> = lock(&self.pools)
            .keys()
            .filter(|key| self.store.get(key).is_none())
            .cloned()
            .collect();
        for key in vanished {
            self.forget(&key);
        }
    }

    /// Forgets everything about a pool: its slot, its probe connection share, its series.
    pub fn forget(&self, pool: &ObjectRef<DbPool>) {
        lock(&self.pools).remove(pool);
        self.prober.forget(&owner_key(pool));
        self.targets.forget(pool);
        self.fleet.forget(pool);
        self.streams.forget(pool);
        self.metrics.forget(&pool_labels(pool));
        debug!(pool = %pool, "forgot deleted pool");
    }

    /// Marks a pool for a probe at its next reconcile (only pools this process already knows).
    pub fn request_probe(&self, pool: &ObjectRef<DbPool>) {
        if let Some(slot) = lock(&self.pools).get_mut(pool) {
            slot.probe_requested.get_or_insert_with(Timestamp::now);
        }
    }

    /// The pool's memory (if any, and if it belongs to the same object) and when a probe was
    /// requested, if it was; clears the request. Creates the pool's slot if it has none yet.
    pub fn take_memory(
        &self,
        pool: &DbPool,
        key: &ObjectRef<DbPool>,
    ) -> (Option<PoolMemory>, Option<Timestamp>) {
        let mut pools = lock(&self.pools);
        // The slot exists from the first reconcile's start (not only from its end), so a probe
        // connection lost while that reconcile runs is requested, not dropped by request_probe.
        let slot = pools.entry(key.clone()).or_default();
        let requested = std::mem::take(&mut slot.probe_requested);
        let memory = slot.memory.clone().filter(|m| m.uid == pool.metadata.uid);
        (memory, requested)
    }

    /// Stores the memory a reconcile ended with; `succeeded` resets the error count.
    pub fn store_memory(&self, key: &ObjectRef<DbPool>, memory: PoolMemory, succeeded: bool) {
        let mut pools = lock(&self.pools);
        let slot = pools.entry(key.clone()).or_default();
        slot.memory = Some(memory);
        if succeeded {
            slot.error_count = 0;
        }
    }

    /// Counts a failed reconcile and returns how many failed in a row.
    pub fn count_error(&self, key: &ObjectRef<DbPool>) -> u32 {
        let mut pools = lock(&self.pools);
        let slot = pools.entry(key.clone()).or_default();
        slot.error_count = slot.error_count.saturating_add(1);
        slot.error_count
    }
}

impl PoolMemory {
    /// A new memory: fresh for a new pool, rebuilt from status after a restart.
    pub fn restore(pool: &DbPool, policy: &Policy, now: Timestamp) -> Self {
        let seed = stable_seed(pool);
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
                hold: None,
                last_written: None,
                last_written_at: None,
                label_written: None,
                label_written_at: None,
                credentials_fingerprint: None,
                not_before: None,
                gate_peer: None,
                gate_applied: None,
                due_since: None,
                requested_at: None,
                aligned: None,
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
            // The hold a previous process acted on is in the BreakerOpen condition.
            hold: status
                .conditions
                .iter()
                .find(|c| c.type_ == CONDITION_BREAKER_OPEN && c.reason == reason::HELD)
                .map(|c| c.message.clone()),
            last_written: Some(status.clone()),
            // The stored lastProbe was written when that probe finished: a restart alone must not
            // make every pool refresh its status at once.
            last_written_at: status.last_probe.as_ref().map(|p| p.time.0),
            label_written: pool.labels().get(BREAKER_LABEL).cloned(),
            label_written_at: None,
            credentials_fingerprint: None,
            not_before: Some(add(now, spread)),
            gate_peer: None,
            gate_applied: None,
            due_since: None,
            requested_at: None,
            aligned: None,
        }
    }

    /// When the next probe is due: the engine's deadline (or the earlier grid point of the
    /// pool's probe stream), or `not_before` if later.
    pub fn deadline(&self, policy: &Policy, now: Timestamp) -> Timestamp {
        let engine = recovery::next_deadline(&self.state, policy).unwrap_or(now);
        let engine = match self.aligned {
            Some(aligned) if aligned < engine => aligned,
            _ => engine,
        };
        match self.not_before {
            Some(nb) if nb > engine => nb,
            _ => engine,
        }
    }

    /// Feeds one event to the engine, collecting its effects.
    pub fn apply(
        &mut self,
        event: Event,
        now: Timestamp,
        policy: &Policy,
        effects: &mut Vec<Effect>,
    ) {
        self.apply_guarded(event, now, policy, false, effects);
    }

    /// [`PoolMemory::apply`] with the fleet guard's word on this event (see `fleet`).
    pub fn apply_guarded(
        &mut self,
        event: Event,
        now: Timestamp,
        policy: &Policy,
        hold_opening: bool,
        effects: &mut Vec<Effect>,
    ) {
        let (state, mut new_effects) =
            recovery::apply_guarded(&self.state, event, now, policy, hold_opening);
        self.state = state;
        effects.append(&mut new_effects);
    }

    /// The time until the next probe, as a requeue delay (at least 1 ms).
    pub fn requeue_after(&self, policy: &Policy) -> Duration {
        let now = Timestamp::now();
        let wait = now.duration_until(self.deadline(policy, now));
        Duration::try_from(wait)
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{apimachinery::pkg::apis::meta::v1::MicroTime, jiff::SignedDuration};

    use crate::api::{BreakerStatus, DbPoolSpec, Phase, ProbeOutcome, ProbeStage};

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
    fn a_grid_point_before_the_engines_deadline_comes_first() {
        let now = Timestamp::now();
        let pool = pool_with_status("steady", Some(healthy_status(now)));
        let policy = pool.spec.policy();
        let mut memory = PoolMemory::restore(&pool, &policy, now);
        memory.not_before = None;
        let engine = memory.deadline(&policy, now);
        assert_eq!(engine, add(now, policy.interval));
        let earlier = add(now, policy.interval / 2);
        memory.aligned = Some(earlier);
        assert_eq!(memory.deadline(&policy, now), earlier);
        // Never later than the engine asks for.
        memory.aligned = Some(add(engine, policy.interval));
        assert_eq!(memory.deadline(&policy, now), engine);
    }

    #[test]
    fn a_new_pool_is_probed_at_once() {
        let now = Timestamp::now();
        let pool = pool_with_status("fresh", None);
        let policy = pool.spec.policy();
        let entry = PoolMemory::restore(&pool, &policy, now);
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
                let policy = pool.spec.policy();
                PoolMemory::restore(&pool, &policy, now).deadline(&policy, now)
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

    #[test]
    fn the_jitter_seed_is_stable_across_processes_and_releases() {
        let pool = pool_with_status("orders", None);
        // FNV-1a of "uid-orders\xffns\xfforders\xff": pinned, so a toolchain upgrade cannot move
        // every pool's published schedule.
        assert_eq!(stable_seed(&pool), stable_seed(&pool.clone()));
        assert_eq!(
            stable_seed(&pool),
            0xe703_0d88_07ac_86c8_u64,
            "{:#x}",
            stable_seed(&pool)
        );
        let other = pool_with_status("order", None);
        assert_ne!(stable_seed(&pool), stable_seed(&other));
    }
}
