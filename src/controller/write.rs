//! Writing what a user sees: the status and the breaker label.
//!
//! Lives here: [`write_visible_changes`], which patches the status when [`needs_write`] says a
//! user would see a change, and the `dbpool.io/breaker` label when it differs. Both go through
//! the apiserver request budget and only while this process leads. Must not live here: deciding
//! the status (`status`), events (`events`).

use std::{future::Future, time::Duration};

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::reflector::ObjectRef,
};
use tracing::debug;

use super::{
    Error, FIELD_MANAGER,
    context::{Context, PoolMemory, pool_labels},
    status::needs_write,
};
use crate::api::{BREAKER_LABEL, DbPool, DbPoolStatus};

/// Patches the status (if a user would see a change) and the breaker label (if it differs),
/// recording what was written in `memory`. Writes nothing unless this process leads (see
/// [`fenced`]).
pub(super) async fn write_visible_changes(
    ctx: &Context,
    pool: &DbPool,
    key: &ObjectRef<DbPool>,
    memory: &mut PoolMemory,
    desired: &DbPoolStatus,
    interval: Duration,
) -> Result<(), Error> {
    let api: Api<DbPool> =
        Api::namespaced(ctx.client.clone(), &pool.namespace().unwrap_or_default());
    let now = Timestamp::now();
    if needs_write(
        desired,
        memory.last_written.as_ref(),
        memory.last_written_at,
        ctx.config.status_refresh,
        now,
    ) {
        let patch = serde_json::json!({
            "apiVersion": "dbpool.io/v1alpha1",
            "kind": "DbPool",
            "status": desired,
        });
        let name = pool.name_any();
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let sent = fenced(ctx, api.patch_status(&name, &params, &Patch::Apply(&patch))).await?;
        if !sent {
            return Ok(());
        }
        let acknowledged = Timestamp::now();
        debug!(pool = %key, phase = ?desired.phase, "status written");
        ctx.observer
            .status_written(key, acknowledged, desired.phase);
        memory.last_written = Some(desired.clone());
        memory.last_written_at = Some(now);
        ctx.metrics.status_written(&pool_labels(key));
    }
    let label = memory.state.breaker.label_value();
    let current_label = pool.labels().get(BREAKER_LABEL).map(String::as_str);
    // The object may lag our own write by a moment; a label changed by hand is put back once the
    // last write is a probe interval old, so drift lasts at most about one interval.
    let settled = memory.label_written_at.is_none_or(|at| {
        now.duration_since(at) >= SignedDuration::try_from(interval).unwrap_or(SignedDuration::MAX)
    });
    if current_label != Some(label) && (memory.label_written.as_deref() != Some(label) || settled) {
        let patch = serde_json::json!({
            "apiVersion": "dbpool.io/v1alpha1",
            "kind": "DbPool",
            "metadata": { "labels": { BREAKER_LABEL: label } },
        });
        let name = pool.name_any();
        let params = PatchParams::apply(FIELD_MANAGER).force();
        if fenced(ctx, api.patch(&name, &params, &Patch::Apply(&patch))).await? {
            memory.label_written = Some(label.to_owned());
            memory.label_written_at = Some(now);
        }
    }
    Ok(())
}

/// Sends one write through the request budget, only if this process still leads right before
/// sending, and bounded by what is left of its term. Ok(false): not sent (not leading). A term
/// that ends while the request is in flight cancels it; one that the apiserver already applied
/// is fenced by `status.writerEpoch` (see `leadership`).
pub(super) async fn fenced<T>(
    ctx: &Context,
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<bool, Error> {
    let _slot = ctx.api_slots.acquire().await;
    let Some(budget) = ctx.gate.remaining() else {
        return Ok(false);
    };
    match tokio::time::timeout(budget.min(WRITE_TIMEOUT), request).await {
        Ok(result) => result.map(|_| true).map_err(Error::Kube),
        Err(_) => Err(Error::WriteTimeout(budget.min(WRITE_TIMEOUT))),
    }
}

/// The longest any single write may take.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
