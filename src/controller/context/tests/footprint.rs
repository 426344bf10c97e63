//! Where the bytes of a pool go: the heap each per-pool structure keeps, counted by the test
//! binary's allocator (`testing::heap`), for pools shaped like the benchmark's (a healthy status
//! as the operator writes it, the apiserver's metadata). `cargo test -p dbpool-operator --lib
//! footprint -- --nocapture` prints the table docs/benchmarks.md quotes.

use std::{collections::HashMap, mem::size_of};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, Time},
    jiff::Timestamp,
};
use kube::runtime::{reflector, watcher};

use super::{PoolEntry, PoolMemory};
use crate::{
    api::{BREAKER_LABEL, DbPool, DbPoolStatus, ProbeOutcome},
    controller::{
        names::{PoolRef, pool_labels},
        projection::project,
        status::{StatusInputs, desired_status},
        testing::{self, heap},
    },
    metrics::Metrics,
    recovery::Event,
};

const N: usize = 2_000;

/// A pool as the benchmark creates it and the watch delivers it once the operator wrote its
/// first status (managedFields of the creator and of the operator included).
fn watched_json(i: usize, now: Timestamp) -> String {
    let mut pool = testing::pool(&format!("pool-{i:05}"));
    pool.metadata.namespace = Some("dbpool-bench-1764686400".into());
    pool.metadata.uid = Some(format!("8c3f0e2a-5b7d-4e8f-9a1b-{i:012}"));
    pool.metadata.resource_version = Some(format!("{}", 1_200_000 + i));
    pool.metadata.creation_timestamp = Some(Time(now));
    pool.metadata.labels = Some([(BREAKER_LABEL.to_owned(), "closed".to_owned())].into());
    pool.metadata.managed_fields = Some(vec![
        ManagedFieldsEntry {
            manager: Some("scale".into()),
            operation: Some("Update".into()),
            ..ManagedFieldsEntry::default()
        },
        ManagedFieldsEntry {
            manager: Some("dbpool-operator".into()),
            operation: Some("Apply".into()),
            subresource: Some("status".into()),
            ..ManagedFieldsEntry::default()
        },
    ]);
    pool.spec.database.host = "127.0.0.1".into();
    pool.spec.database.port = 40_001;
    pool.spec.database.dbname = "postgres".into();
    pool.spec.database.user = "postgres".into();
    pool.status = Some(healthy_status(&pool, now));
    serde_json::to_string(&pool).unwrap_or_default()
}

/// The status the operator writes for a healthy pool after its first probe.
fn healthy_status(pool: &DbPool, now: Timestamp) -> DbPoolStatus {
    let policy = pool.spec.policy();
    let mut memory = PoolMemory::restore(pool, None, &policy, now);
    let mut effects = Vec::new();
    memory.apply(Event::ProbeStarted, now, &policy, &mut effects);
    let seq = memory.state.probe_seq;
    let success = Event::ProbeSucceeded {
        seq,
        degraded: false,
    };
    memory.apply(success, now, &policy, &mut effects);
    let mut probe = testing::summary(ProbeOutcome::Success, now);
    probe.server_version = Some("15.10".into());
    probe.in_recovery = Some(false);
    probe.connections = Some(12);
    probe.max_connections = Some(100);
    desired_status(
        &StatusInputs {
            writer_epoch: Some(1),
            generation: Some(1),
            state: &memory.state,
            policy: &policy,
            last_probe: Some(&probe),
            last_force_reopen: None,
            hold: None,
            previous_conditions: &[],
            readiness: None,
            gate: None,
        },
        now,
    )
}

/// Per pool, what `f` keeps (it runs once for all N pools).
fn per_pool<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (value, held) = heap::kept_by(f);
    #[allow(clippy::cast_precision_loss)]
    let per = |x: isize| x as f64 / N as f64;
    (value, per(held.bytes), per(held.blocks))
}

/// The reflector's store filled as the watch fills it, each object through `modify` first.
fn cache(jsons: &[String], modify: impl Fn(&mut DbPool)) -> reflector::Store<DbPool> {
    let (store, mut writer) = reflector::store::<DbPool>();
    for json in jsons {
        let Ok(mut pool) = serde_json::from_str::<DbPool>(json) else {
            continue;
        };
        modify(&mut pool);
        writer.apply_watcher_event(&watcher::Event::Apply(pool));
    }
    store
}

#[test]
fn where_the_bytes_of_a_pool_go() {
    let now = Timestamp::now();
    let jsons: Vec<String> = (0..N).map(|i| watched_json(i, now)).collect();
    let pools: Vec<DbPool> = jsons
        .iter()
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect();
    assert_eq!(pools.len(), N);
    let mut rows = Vec::new();
    let json_len = jsons.iter().map(String::len).sum::<usize>() / N;
    // The cache before the projection: managedFields and the last-applied annotation stripped.
    let (before, bytes, blocks) = per_pool(|| {
        cache(&jsons, |pool| {
            pool.metadata.managed_fields = None;
        })
    });
    rows.push((
        "DbPool cache, managedFields stripped (before)",
        bytes,
        blocks,
    ));
    drop(before);
    let (projected, bytes_projected, blocks) = per_pool(|| {
        cache(&jsons, |pool| {
            project(pool);
        })
    });
    rows.push(("DbPool cache, projected (after)", bytes_projected, blocks));
    let (statuses, status_bytes, blocks) = per_pool(|| {
        pools
            .iter()
            .map(|p| p.status.clone())
            .collect::<Vec<Option<DbPoolStatus>>>()
    });
    rows.push(("… of which the status (one copy)", status_bytes, blocks));
    drop(statuses);
    let (registry, bytes, blocks) = per_pool(|| registry(&pools, now));
    rows.push((
        "registry: PoolEntry with its PoolMemory (last written status included)",
        bytes,
        blocks,
    ));
    let (metrics, bytes, blocks) = per_pool(|| series(&pools));
    rows.push((
        "metric series (a leader's: seen, breaker ×3, failures, shared results)",
        bytes,
        blocks,
    ));
    let (keys, bytes, blocks) = per_pool(|| {
        pools
            .iter()
            .map(|p| (PoolRef::from_obj(p), 0u64))
            .collect::<HashMap<PoolRef, u64>>()
    });
    rows.push((
        "one more map keyed by the pool (an ObjectRef key)",
        bytes,
        blocks,
    ));
    eprintln!(
        "\n{N} pools; watched JSON {json_len} bytes per pool; size_of: PoolEntry {}, PoolMemory {}, \
         DbPoolStatus {}, PoolRef {}, DbPool {}",
        size_of::<PoolEntry>(),
        size_of::<PoolMemory>(),
        size_of::<DbPoolStatus>(),
        size_of::<PoolRef>(),
        size_of::<DbPool>()
    );
    eprintln!("| structure | bytes per pool | allocations per pool |");
    eprintln!("| --- | ---: | ---: |");
    for (what, bytes, blocks) in &rows {
        eprintln!("| {what} | {bytes:.0} | {blocks:.1} |");
    }
    // The projection is worth its complexity only if it keeps the status out of the cache.
    let saved = rows[0].1 - bytes_projected;
    assert!(
        saved >= 0.6 * status_bytes,
        "projection saves {saved:.0} bytes per pool, the status is {status_bytes:.0}"
    );
    drop((projected, registry, metrics, keys));
}

/// The size of what `f` returns (a future here: tokio allocates a spawned task with its future
/// inline, so a task holds this much for as long as it lives, whatever it awaits).
fn output_size<A, B, R>(_f: impl FnOnce(A, B) -> R) -> usize {
    size_of::<R>()
}

/// What one waiting task costs. Each pool with a status to write has a writer task, and while
/// thousands wait for a request permit (the setup of 10,000 pools, an outage, a restart) each
/// holds its whole future; a reconcile is spawned by kube-runtime's controller for every run.
#[test]
fn what_a_waiting_task_costs() {
    let writer = output_size(super::writer::drain);
    let reconcile = output_size(crate::controller::reconcile::reconcile);
    eprintln!("\nfuture sizes: a pool's writer task {writer} bytes, a reconcile {reconcile} bytes");
    // The writer waits for its permit most of its life: the write itself is boxed, so the
    // waiting task does not carry the request's state (it did: 14,928 bytes in a debug build,
    // against 568 boxed; 10,000 pools' refresh writes waiting made it 140 MiB).
    assert!(writer <= 1024, "a waiting writer task holds {writer} bytes");
}

/// The registry as a steady operator keeps it: every pool's memory rebuilt from its status,
/// with a credentials fingerprint as a reconcile records it.
fn registry(pools: &[DbPool], now: Timestamp) -> HashMap<PoolRef, Box<PoolEntry>> {
    pools
        .iter()
        .map(|pool| {
            let policy = pool.spec.policy();
            let mut memory = PoolMemory::restore(pool, pool.status.as_ref(), &policy, now);
            let database = serde_json::to_string(&pool.spec.database).unwrap_or_default();
            memory.credentials_fingerprint = Some(format!("1234567/ {database}"));
            let entry = Box::new(PoolEntry {
                memory: Some(memory),
                ..PoolEntry::default()
            });
            (PoolRef::from_obj(pool), entry)
        })
        .collect()
}

/// A leader's per-pool series for healthy pools that take shared results.
fn series(pools: &[DbPool]) -> Metrics {
    let metrics = Metrics::new();
    for pool in pools {
        let labels = pool_labels(&PoolRef::from_obj(pool));
        metrics.pool_seen(&labels);
        metrics.pool_state(&labels, crate::api::BreakerState::Closed, 0);
        metrics.result_shared(&labels);
    }
    metrics
}
