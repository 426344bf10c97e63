//! The writer task of one pool: the loop that sends what the pool's [`WriterState`] holds.
//!
//! Lives here: [`submit`] (a reconcile hands its outbox over and returns at once, so requeues
//! never wait on writes) and the task that drains a pool's outbox, one write in flight, the
//! latest value winning, within the write budget, retried after apiserver failures. Must not
//! live here: what an outbox holds or the budget's rules (`write`), the leader check (`fence`).

use std::sync::{Arc, Weak};

use tokio::time::Instant;
use tracing::warn;

use super::Context;
use crate::controller::{
    api_permits::apiserver_retry_delay,
    names::{PoolRef, pool_labels},
    write::{Outbox, Step, send},
};

/// Hands a reconcile's outbox to the pool's writer and returns at once: merged into what waits,
/// and a writer task started if none runs.
pub(crate) fn submit(ctx: &Arc<Context>, key: &PoolRef, outbox: Outbox) {
    if ctx.with_writer_or_new(key, |writer| writer.offer(outbox)) {
        tokio::spawn(drain(Arc::downgrade(ctx), key.clone()));
    }
}

/// The writer task of one pool: sends what waits, one write at a time, within the budget, until
/// nothing waits. Holds only a weak reference to the context between writes, so it never keeps
/// a stopped controller alive.
pub(super) async fn drain(weak: Weak<Context>, key: PoolRef) {
    let mut failures: u32 = 0;
    loop {
        let Some(ctx) = weak.upgrade() else { return };
        // Queue for the request permit first and take the outbox only then: while a pool waits
        // for a permit (thousands of pools failing together), what it sends is still the latest
        // value, so a phase change and the Open that follows become one write.
        let Some(priority) = ctx.with_writer(&key, |w| w.priority()).flatten() else {
            if let Step::Stop = next_step(&ctx, &key) {
                return;
            }
            continue;
        };
        let namespace = key.namespace.as_deref().unwrap_or_default();
        let permit = ctx.door.permits().acquire(priority, namespace).await;
        let outbox = match next_step(&ctx, &key) {
            Step::Stop => return,
            Step::Wait(until, wake) => {
                drop(permit);
                drop(ctx);
                tokio::select! {
                    () = tokio::time::sleep_until(until) => {}
                    () = wake.notified() => {}
                }
                continue;
            }
            Step::Send(outbox) => outbox,
        };
        if !ctx.exists(&outbox.pool, &key) {
            // Deleted: write nothing more for it.
            ctx.with_writer(&key, |w| w.stop());
            return;
        }
        // Boxed: the request's state lives only while it is sent, not inline in every writer
        // task waiting for its permit (thousands wait at once in a backlog; see the footprint
        // test `what_a_waiting_task_costs`).
        let sent = Box::pin(send(&ctx.write_io(), &key, &outbox, permit)).await;
        if !ctx.exists(&outbox.pool, &key) {
            // Deleted while the write was in flight: whatever it recorded (a write counted, an
            // error counted) must not outlive the pool.
            ctx.forget(&key);
            return;
        }
        match sent {
            Ok(true) => failures = 0,
            Ok(false) => {
                // Not leading any more: a deposed leader writes nothing.
                ctx.with_writer(&key, |w| w.stop());
                return;
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                let delay = apiserver_retry_delay(failures);
                warn!(pool = %key, error = %err, retry_in = ?delay, "write failed");
                if let Some(metrics) = ctx.door.metrics() {
                    metrics.reconcile_failed(&pool_labels(&key));
                }
                if ctx.with_writer(&key, |w| w.put_back(*outbox)).is_none() {
                    return;
                }
                drop(ctx);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The writer's next step, decided under the registry's lock; Stop when the pool is gone.
fn next_step(ctx: &Context, key: &PoolRef) -> Step {
    let min_period = ctx.config.min_status_period;
    ctx.with_writer(key, |w| {
        w.next_step(&ctx.write_budget, min_period, Instant::now())
    })
    .unwrap_or(Step::Stop)
}
