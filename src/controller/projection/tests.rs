//! The projection keeps every field the operator reads: a fully populated DbPool goes through
//! it, and everything the reconcile derives from the object (and from its status, through the
//! registry) must come out the same; a scan of the controller's code fails on a read of a field
//! the projection drops.

use std::collections::BTreeMap;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{
        Condition, ManagedFieldsEntry, MicroTime, ObjectMeta, OwnerReference, Time,
    },
    jiff::Timestamp,
};
use kube::{Resource, ResourceExt, runtime::reflector::ObjectRef};

use super::*;
use crate::{
    api::{
        BREAKER_LABEL, BreakerState, BreakerStatus, CONDITION_BREAKER_OPEN, CONDITION_READY,
        FORCE_REOPEN_ANNOTATION, ForceReopenRecord, HELD_BY_ANNOTATION, HOLD_ANNOTATION, Hold,
        Phase, ProbeOutcome, ProbeStage, ProbeSummary, RELEASED_BY_ANNOTATION, Readiness,
        ReadinessStatus, reason,
    },
    controller::{
        context::PoolMemory,
        names::{pool_labels, spec_target_key, stable_seed},
        testing,
    },
};

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).expect("valid")
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(at(-600)),
        observed_generation: Some(3),
    }
}

/// A status with every field set (a struct literal without `..`: a new field does not compile
/// until it is set here).
fn full_status() -> DbPoolStatus {
    DbPoolStatus {
        writer_epoch: Some(7),
        observed_generation: Some(3),
        phase: Some(Phase::BreakerOpen),
        breaker: Some(BreakerStatus {
            state: BreakerState::Open,
            since: Some(MicroTime(at(-60))),
            next_probe_at: Some(MicroTime(at(30))),
            open_count: 4,
            half_open_successes: 1,
        }),
        consecutive_failures: 5,
        recovery_attempts: 2,
        current_backoff: Some("2s".into()),
        cooldown_until: Some(MicroTime(at(20))),
        last_probe: Some(ProbeSummary {
            time: MicroTime(at(-1)),
            outcome: ProbeOutcome::TransientFailure,
            stage: Some(ProbeStage::Connect),
            latency_ms: 3,
            message: Some("connection refused".into()),
            sql_state: Some("08001".into()),
            server_version: Some("15.10".into()),
            in_recovery: Some(false),
            connections: Some(12),
            max_connections: Some(100),
        }),
        last_success_time: Some(MicroTime(at(-120))),
        last_failure_time: Some(MicroTime(at(-1))),
        readiness: Some(ReadinessStatus {
            state: Readiness::Unreachable,
            since: MicroTime(at(-60)),
        }),
        last_force_reopen: Some(ForceReopenRecord {
            token: "t-1".into(),
            time: MicroTime(at(-3600)),
        }),
        conditions: vec![
            condition(CONDITION_READY, "False", reason::BREAKER_OPEN, "open"),
            condition(
                CONDITION_BREAKER_OPEN,
                "True",
                reason::HELD,
                "held by ops: upgrade",
            ),
        ],
    }
}

fn map(entries: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
}

/// A DbPool with every metadata field set (a literal without `..`), our annotations and labels
/// beside foreign ones, a full spec and a full status.
fn full_pool() -> DbPool {
    let mut pool = testing::pool("full");
    pool.spec.database.port = 6543;
    pool.spec.database.application_name = "app".into();
    pool.metadata = ObjectMeta {
        annotations: map(&[
            (FORCE_REOPEN_ANNOTATION, "t-2"),
            (HOLD_ANNOTATION, "upgrade"),
            (HELD_BY_ANNOTATION, "ops"),
            (RELEASED_BY_ANNOTATION, "someone"),
            ("dbpool.io/allowed-hosts", "db"),
            (
                "kubectl.kubernetes.io/last-applied-configuration",
                "{\"spec\":{}}",
            ),
            ("example.com/team", "payments"),
        ]),
        creation_timestamp: Some(Time(at(-86_400))),
        deletion_grace_period_seconds: Some(30),
        deletion_timestamp: Some(Time(at(-5))),
        finalizers: Some(vec!["example.com/cleanup".into()]),
        generate_name: Some("full-".into()),
        generation: Some(4),
        labels: map(&[(BREAKER_LABEL, "open"), ("app", "shop")]),
        managed_fields: Some(vec![ManagedFieldsEntry {
            manager: Some("kubectl".into()),
            ..ManagedFieldsEntry::default()
        }]),
        name: Some("full".into()),
        namespace: Some("ns".into()),
        owner_references: Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: "owner".into(),
            uid: "uid-owner".into(),
            ..OwnerReference::default()
        }]),
        resource_version: Some("12345".into()),
        self_link: Some("/apis/dbpool.io/v1alpha1/namespaces/ns/dbpools/full".into()),
        uid: Some("uid-full".into()),
    };
    pool.status = Some(full_status());
    pool
}

#[test]
fn the_cache_keeps_every_field_the_operator_reads() {
    let full = full_pool();
    let mut cached = full.clone();
    let status = project(&mut cached);
    // The registry gets the whole status; the cache keeps none.
    assert_eq!(status, full.status);
    assert_eq!(cached.status, None);
    // Identity: the registry's key, the events' object reference, the seed, the series labels.
    let (key, cached_key) = (ObjectRef::from_obj(&full), ObjectRef::from_obj(&cached));
    assert_eq!(cached_key, key);
    assert_eq!(
        (&cached_key.extra.uid, &cached_key.extra.resource_version),
        (&key.extra.uid, &key.extra.resource_version)
    );
    assert_eq!(cached.object_ref(&()), full.object_ref(&()));
    assert_eq!(cached.meta().generation, full.meta().generation);
    assert_eq!(stable_seed(&cached), stable_seed(&full));
    assert_eq!(pool_labels(&cached_key), pool_labels(&key));
    // What the reconcile reads: spec (policy, target, credentials), the annotations it acts on,
    // the breaker label.
    assert_eq!(cached.spec, full.spec);
    assert_eq!(spec_target_key(&cached), spec_target_key(&full));
    for annotation in [
        FORCE_REOPEN_ANNOTATION,
        HOLD_ANNOTATION,
        HELD_BY_ANNOTATION,
        RELEASED_BY_ANNOTATION,
    ] {
        assert_eq!(
            cached.annotations().get(annotation),
            full.annotations().get(annotation),
            "{annotation}"
        );
    }
    assert_eq!(
        Hold::from_annotations(cached.annotations()),
        Hold::from_annotations(full.annotations())
    );
    assert_eq!(
        cached.labels().get(BREAKER_LABEL),
        full.labels().get(BREAKER_LABEL)
    );
    // The memory rebuilt from the cached object and the registry's status equals the one
    // rebuilt from the whole object.
    let policy = full.spec.policy();
    let now = at(0);
    let from_full = PoolMemory::restore(&full, full.status.as_ref(), &policy, now);
    let from_cache = PoolMemory::restore(&cached, status.as_ref(), &policy, now);
    assert_same_memory(&from_cache, &from_full);
}

fn assert_same_memory(a: &PoolMemory, b: &PoolMemory) {
    assert_eq!(a.uid, b.uid);
    assert_eq!(a.generation, b.generation);
    assert_eq!(a.state, b.state);
    assert_eq!(a.last_probe, b.last_probe);
    assert_eq!(a.last_force_reopen, b.last_force_reopen);
    assert_eq!(a.hold, b.hold);
    assert_eq!(a.last_written, b.last_written);
    assert_eq!(a.last_written_at, b.last_written_at);
    assert_eq!(a.label_written, b.label_written);
    assert_eq!(a.plan, b.plan);
    assert_eq!(a.prior_conditions, b.prior_conditions);
}

#[test]
fn the_cache_drops_what_the_operator_never_reads() {
    let mut cached = full_pool();
    project(&mut cached);
    let meta = &cached.metadata;
    assert!(meta.managed_fields.is_none());
    assert!(meta.owner_references.is_none() && meta.finalizers.is_none());
    assert!(meta.creation_timestamp.is_none() && meta.deletion_timestamp.is_none());
    assert!(meta.generate_name.is_none() && meta.self_link.is_none());
    assert!(
        cached
            .annotations()
            .keys()
            .chain(cached.labels().keys())
            .all(|k| k.starts_with(KEPT_PREFIX)),
        "{meta:?}"
    );
    // A pool without annotations of ours keeps none (no empty map).
    let mut plain = testing::pool("plain");
    plain.metadata.annotations = map(&[("example.com/team", "payments")]);
    project(&mut plain);
    assert_eq!(plain.metadata.annotations, None);
}

/// The metadata fields (of `ObjectMeta`) the projection keeps.
const KEPT_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resource_version",
    "generation",
    "annotations",
    "labels",
];

/// `ResourceExt`/`Resource` accessors of dropped metadata.
const DROPPED_ACCESSORS: &[&str] = &[
    "creation_timestamp()",
    "finalizers()",
    "owner_references()",
    "managed_fields()",
];

/// The controller's code, test code left out (tests.rs files, tests/ folders, testing.rs, and
/// everything from a file's first `#[cfg(test)]`).
fn controller_sources() -> Vec<(String, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<(String, String)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == "tests") {
                    continue;
                }
                walk(&path, out);
                continue;
            }
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if !name.ends_with(".rs") || name == "tests.rs" || name == "testing.rs" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            out.push((path.display().to_string(), code.to_owned()));
        }
    }
    let mut out = Vec::new();
    walk(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/controller"),
        &mut out,
    );
    out
}

/// The reads in `code` of a DbPool field the projection drops. The code names a DbPool `pool`
/// (and a cached one `cached`); a read of its status, of a dropped metadata field, or through a
/// dropped accessor is a read the cache cannot answer.
fn dropped_reads(code: &str) -> Vec<String> {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut reads = Vec::new();
    for var in ["pool", "cached"] {
        let status = format!("{var}.status");
        for (i, _) in code.match_indices(&status) {
            let before = code[..i].chars().next_back().unwrap_or(' ');
            let after = code[i + status.len()..].chars().next().unwrap_or(' ');
            if !word(before) && !word(after) {
                reads.push(status.clone());
            }
        }
        let meta = format!("{var}.metadata.");
        for (i, _) in code.match_indices(&meta) {
            let field: String = code[i + meta.len()..]
                .chars()
                .take_while(|c| word(*c))
                .collect();
            let before = code[..i].chars().next_back().unwrap_or(' ');
            if !word(before) && !KEPT_METADATA.contains(&field.as_str()) {
                reads.push(format!("{meta}{field}"));
            }
        }
        for accessor in DROPPED_ACCESSORS {
            if code.contains(&format!("{var}.{accessor}")) {
                reads.push(format!("{var}.{accessor}"));
            }
        }
    }
    reads
}

#[test]
fn no_code_reads_a_dbpool_field_the_projection_drops() {
    let sources = controller_sources();
    assert!(sources.len() > 20, "found the controller's sources");
    let reads: Vec<String> = sources
        .iter()
        .filter(|(path, _)| !path.ends_with("projection.rs"))
        .flat_map(|(path, code)| {
            dropped_reads(code)
                .into_iter()
                .map(move |r| format!("{path}: {r}"))
        })
        .collect();
    assert!(
        reads.is_empty(),
        "the DbPool cache (see projection.rs) does not keep what these read; keep the field \
         there (and in this test's lists) or read it elsewhere: {reads:#?}"
    );
}

#[test]
fn the_scan_finds_reads_of_dropped_fields_and_only_those() {
    let dropped = "let t = pool.metadata.creation_timestamp; let s = pool.status.as_ref(); \
                   let o = cached.owner_references();";
    assert_eq!(
        dropped_reads(dropped),
        [
            "pool.status",
            "pool.metadata.creation_timestamp",
            "cached.owner_references()"
        ]
    );
    let kept = "pool.metadata.uid; pool.metadata.generation; pool.labels(); \
                pool.status_written(); spool.status; self.memory.last_written";
    assert_eq!(dropped_reads(kept), Vec::<String>::new());
}
