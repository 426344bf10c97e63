//! What the operator keeps of a watched DbPool: the projection of its cache.
//!
//! Lives here: [`project`], which strips a watched DbPool down to what the operator reads and
//! hands its status back, and [`KEPT_PREFIX`]. The operator reads a pool's spec, its identity
//! (name, namespace, uid, resourceVersion for the events' object reference, generation), the
//! `dbpool.io/` annotations (force reopen, hold) and labels (the breaker label), and its status
//! only once: when this process first sees the pool, to rebuild the pool's memory (see
//! `context`); from then on the memory, not the object, is the truth. So the cache keeps no
//! status (the registry holds the watched status until the memory is rebuilt from it, then the
//! memory's last written status is the only copy) and none of the metadata other controllers
//! and tools put on an object (managedFields, the last-applied annotation, other annotations
//! and labels, owner references, finalizers, timestamps).
//! Must not live here: the watch itself (`watches`), what the registry does with the status
//! (`context`).
//!
//! The test below fails if a field the operator reads is dropped: it projects a fully
//! populated DbPool and compares everything the reconcile derives from the object.

use std::collections::BTreeMap;

use crate::api::{DbPool, DbPoolStatus};

/// The prefix of the annotations and labels the operator reads (and writes); the projection
/// keeps these and drops the others.
pub(crate) const KEPT_PREFIX: &str = "dbpool.io/";

/// Strips `pool` to what the operator reads and returns its status (which the cached object
/// no longer holds).
pub(crate) fn project(pool: &mut DbPool) -> Option<DbPoolStatus> {
    let meta = &mut pool.metadata;
    meta.annotations = ours(meta.annotations.take());
    meta.labels = ours(meta.labels.take());
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.creation_timestamp = None;
    meta.deletion_timestamp = None;
    meta.deletion_grace_period_seconds = None;
    meta.generate_name = None;
    meta.self_link = None;
    pool.status.take()
}

/// The `dbpool.io/` entries of an annotation or label map (None when there are none).
fn ours(map: Option<BTreeMap<String, String>>) -> Option<BTreeMap<String, String>> {
    let kept: BTreeMap<String, String> = map?
        .into_iter()
        .filter(|(key, _)| key.starts_with(KEPT_PREFIX))
        .collect();
    (!kept.is_empty()).then_some(kept)
}

#[cfg(test)]
mod tests;
