//! Writing what a user sees: the status and the breaker label.
//!
//! Lives here: [`write_visible_changes`], which patches the status when [`needs_write`] says a
//! user would see a change, and the `dbpool.io/breaker` label when it differs. Both go through
//! the apiserver request budget and only while this process leads. Must not live here: deciding
//! the status (`status`), events (`events`).

use k8s_openapi::jiff::Timestamp;
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
/// recording what was written in `memory`. Writes nothing unless this process leads.
pub(super) async fn write_visible_changes(
    ctx: &Context,
    pool: &DbPool,
    key: &ObjectRef<DbPool>,
    memory: &mut PoolMemory,
    desired: &DbPoolStatus,
) -> Result<(), Error> {
    // Only the leader writes: a process that just lost the Lease must not race the new leader.
    if !ctx.metrics.is_leader() {
        return Ok(());
    }
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
        {
            let _slot = ctx.api_slots.acquire().await;
            api.patch_status(
                &pool.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
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
    if current_label != Some(label) && memory.label_written.as_deref() != Some(label) {
        let patch = serde_json::json!({
            "apiVersion": "dbpool.io/v1alpha1",
            "kind": "DbPool",
            "metadata": { "labels": { BREAKER_LABEL: label } },
        });
        let _slot = ctx.api_slots.acquire().await;
        api.patch(
            &pool.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        memory.label_written = Some(label.to_owned());
    }
    Ok(())
}
