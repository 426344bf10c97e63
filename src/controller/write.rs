//! Writing what a user sees: the status, the breaker label and events, through one writer per
//! pool and a write budget.
//!
//! Lives here: [`Outbox`] (what one pool has waiting to be written: the latest status, label and
//! events), [`submit`] (a reconcile hands its outbox over and returns at once, so requeues never
//! wait on writes), the per-pool writer task (one write in flight per pool, the latest value
//! wins), the write budget ([`WriteBudget`]: `--min-status-period` per pool, and two global token
//! buckets, one for counter-only writes and one for transitions) and [`fenced`], the leader gate
//! every write passes right before it is sent. Must not live here: deciding the status
//! (`status`), whether a change is visible or a transition (`reconcile`), event wording
//! (`events`).
//!
//! **The write budget.** An outbox is *urgent* when it carries a breaker transition (a new
//! breaker state or label), a force-reopen acknowledgement, a pool's first status or a new
//! `observedGeneration` (`reconcile/outbox.rs`, `is_transition`). Urgent outboxes go at once and spend the transition bucket
//! (`--transition-write-rate` requests/s). Everything else is counter-only: at most one per pool
//! per `--min-status-period`, spending the counter bucket (`--counter-write-rate` requests/s).
//! A counter-only outbox waiting for either is overtaken the moment an urgent change arrives,
//! so a flood of counter updates never delays an Open. Each request (a status patch, a label
//! patch, an event) costs one token, so no spec can make the operator send more than the two
//! rates together per second (plus one second's burst of each).

use super::api_slots::{ApiSlot, Priority};
use std::{
    future::Future,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::reflector::ObjectRef,
};
use tokio::{sync::Notify, time::Instant};
use tracing::{debug, warn};

use super::{
    Error, FIELD_MANAGER,
    context::{Context, lock, pool_labels},
    events::{PendingEvent, fold, publish},
};
use crate::api::{BREAKER_LABEL, DbPool, DbPoolStatus};

/// What one pool has waiting to be written. A newer outbox merges into a waiting one: the latest
/// status and label win, events of the same reason fold together, urgency is kept.
pub(super) struct Outbox {
    /// The object as of the latest reconcile (name, namespace, uid, event reference).
    pub pool: Arc<DbPool>,
    /// The status to write, if it changed visibly.
    pub status: Option<DbPoolStatus>,
    /// The breaker label value to write, if it differs.
    pub label: Option<&'static str>,
    /// Events to publish.
    pub events: Vec<PendingEvent>,
    /// Carries a transition or a force-reopen acknowledgement (see the module comment).
    pub urgent: bool,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.status.is_none() && self.label.is_none() && self.events.is_empty()
    }

    fn merge(&mut self, newer: Outbox) {
        self.pool = newer.pool;
        if newer.status.is_some() {
            self.status = newer.status;
        }
        if newer.label.is_some() {
            self.label = newer.label;
        }
        fold(&mut self.events, newer.events);
        self.urgent |= newer.urgent;
    }

    /// Requests this outbox costs: one per patch and one per event.
    fn cost(&self) -> u32 {
        let n = usize::from(self.status.is_some())
            + usize::from(self.label.is_some())
            + self.events.len();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// The writer side of one pool's slot (kept in [`PoolSlot`](super::context::PoolSlot), so
/// forgetting the pool stops its writer).
#[derive(Default)]
pub(super) struct WriterSlot {
    /// What waits to be written.
    pub outbox: Option<Outbox>,
    /// A writer task is running for this pool.
    pub running: bool,
    /// The next counter-only write may not start before this instant.
    pub next_counter_write: Option<Instant>,
    /// Wakes the writer when an urgent change arrives.
    pub wake: Arc<Notify>,
}

/// The two global token buckets of the write budget.
pub(super) struct WriteBudget {
    counters: TokenBucket,
    transitions: TokenBucket,
}

impl WriteBudget {
    /// Buckets refilling at the given requests per second, each holding one second's worth.
    pub fn new(counter_rate: u32, transition_rate: u32) -> Self {
        Self {
            counters: TokenBucket::new(counter_rate),
            transitions: TokenBucket::new(transition_rate),
        }
    }
}

/// A token bucket: `rate` tokens per second, at most `rate` stored.
struct TokenBucket {
    rate: f64,
    state: Mutex<(f64, std::time::Instant)>,
}

impl TokenBucket {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            state: Mutex::new((rate, std::time::Instant::now())),
        }
    }

    /// Takes `n` tokens (at most one second's worth) if there are enough; otherwise how long
    /// until there will be.
    fn try_take(&self, n: u32) -> Result<(), Duration> {
        let n = f64::from(n).min(self.rate);
        let mut state = lock(&self.state);
        let now = std::time::Instant::now();
        let (tokens, at) = *state;
        let tokens = (tokens + now.duration_since(at).as_secs_f64() * self.rate).min(self.rate);
        if tokens >= n {
            *state = (tokens - n, now);
            Ok(())
        } else {
            *state = (tokens, now);
            Err(Duration::from_secs_f64((n - tokens) / self.rate))
        }
    }
}

/// Hands a reconcile's outbox to the pool's writer and returns at once: merged into what waits,
/// and a writer task started if none runs.
pub(super) fn submit(ctx: &Arc<Context>, key: &ObjectRef<DbPool>, outbox: Outbox) {
    if outbox.is_empty() {
        return;
    }
    let start = {
        let mut pools = lock(&ctx.pools);
        let slot = pools.entry(key.clone()).or_default();
        let writer = &mut slot.writer;
        let urgent = outbox.urgent;
        match writer.outbox.as_mut() {
            Some(waiting) => waiting.merge(outbox),
            None => writer.outbox = Some(outbox),
        }
        if urgent {
            writer.wake.notify_one();
        }
        !std::mem::replace(&mut writer.running, true)
    };
    if start {
        tokio::spawn(drain(Arc::downgrade(ctx), key.clone()));
    }
}

/// What the writer does next for its pool.
enum Step {
    /// Nothing waits (the writer ends), or the pool is gone.
    Stop,
    /// Wait until this instant, or until woken by an urgent change.
    Wait(Instant, Arc<Notify>),
    /// Send this.
    Send(Box<Outbox>),
}

/// The writer task of one pool: sends what waits, one write at a time, within the budget, until
/// nothing waits. Holds only a weak reference to the context between writes, so it never keeps
/// a stopped controller alive.
async fn drain(weak: Weak<Context>, key: ObjectRef<DbPool>) {
    let mut failures: u32 = 0;
    loop {
        let Some(ctx) = weak.upgrade() else { return };
        // Queue for the request slot first and take the outbox only then: while a pool waits
        // for a slot (thousands of pools failing together), what it sends is still the latest
        // value, so a phase change and the Open that follows become one write.
        let Some(priority) = waiting_priority(&ctx, &key) else {
            if let Step::Stop = next_step(&ctx, &key) {
                return;
            }
            continue;
        };
        let slot = ctx.api_slots.acquire(priority).await;
        let step = next_step(&ctx, &key);
        match step {
            Step::Stop => return,
            Step::Wait(until, wake) => {
                drop(slot);
                drop(ctx);
                tokio::select! {
                    () = tokio::time::sleep_until(until) => {}
                    () = wake.notified() => {}
                }
            }
            Step::Send(outbox) => {
                if !ctx.exists(&outbox.pool, &key) {
                    // Deleted: write nothing more for it.
                    finish(&ctx, &key);
                    return;
                }
                let sent = send(&ctx, &key, &outbox, slot).await;
                if !ctx.exists(&outbox.pool, &key) {
                    // Deleted while the write was in flight: whatever it recorded (a write
                    // counted, an error counted) must not outlive the pool.
                    ctx.forget(&key);
                    return;
                }
                match sent {
                    Ok(true) => failures = 0,
                    Ok(false) => {
                        // Not leading any more: a deposed leader writes nothing.
                        finish(&ctx, &key);
                        return;
                    }
                    Err(err) => {
                        failures = failures.saturating_add(1);
                        let delay = Duration::from_millis(500)
                            .saturating_mul(1 << failures.min(7))
                            .min(Duration::from_secs(60));
                        warn!(pool = %key, error = %err, retry_in = ?delay, "write failed");
                        if ctx.gate.may_write() {
                            ctx.metrics.reconcile_failed(&pool_labels(&key));
                        }
                        // Put it back under anything newer (the latest value still wins).
                        if !put_back(&ctx, &key, *outbox) {
                            return;
                        }
                        drop(ctx);
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
    }
}

/// Puts a failed outbox back under anything newer; false when the pool is gone.
fn put_back(ctx: &Context, key: &ObjectRef<DbPool>, mut outbox: Outbox) -> bool {
    let mut pools = lock(&ctx.pools);
    let Some(slot) = pools.get_mut(key) else {
        return false;
    };
    if let Some(newer) = slot.writer.outbox.take() {
        outbox.merge(newer);
    }
    slot.writer.outbox = Some(outbox);
    true
}

/// Marks the pool's writer as stopped and drops what waits.
fn finish(ctx: &Context, key: &ObjectRef<DbPool>) {
    if let Some(slot) = lock(&ctx.pools).get_mut(key) {
        slot.writer.outbox = None;
        slot.writer.running = false;
    }
}

/// The class the pool's waiting outbox queues in: a transition's status first, anything else
/// later; None when nothing waits.
fn waiting_priority(ctx: &Context, key: &ObjectRef<DbPool>) -> Option<Priority> {
    let pools = lock(&ctx.pools);
    let outbox = pools.get(key)?.writer.outbox.as_ref()?;
    Some(if outbox.urgent && outbox.status.is_some() {
        Priority::First
    } else {
        Priority::Later
    })
}

/// Decides the writer's next step under the pool's lock: stop, wait for the pool's period or a
/// bucket, or take the outbox and its tokens.
fn next_step(ctx: &Context, key: &ObjectRef<DbPool>) -> Step {
    let mut pools = lock(&ctx.pools);
    let Some(slot) = pools.get_mut(key) else {
        return Step::Stop;
    };
    let writer = &mut slot.writer;
    let Some(outbox) = writer.outbox.as_ref() else {
        writer.running = false;
        return Step::Stop;
    };
    let now = Instant::now();
    let bucket = if outbox.urgent {
        &ctx.write_budget.transitions
    } else {
        if let Some(at) = writer.next_counter_write
            && at > now
        {
            return Step::Wait(at, writer.wake.clone());
        }
        &ctx.write_budget.counters
    };
    if let Err(wait) = bucket.try_take(outbox.cost()) {
        return Step::Wait(now + wait, writer.wake.clone());
    }
    writer.next_counter_write = Some(now + ctx.config.min_status_period);
    match writer.outbox.take() {
        Some(outbox) => Step::Send(Box::new(outbox)),
        None => Step::Stop,
    }
}

/// Sends one outbox: status, label, then events. Ok(false): not leading.
async fn send(
    ctx: &Context,
    key: &ObjectRef<DbPool>,
    outbox: &Outbox,
    slot: ApiSlot<'_>,
) -> Result<bool, Error> {
    let pool = outbox.pool.as_ref();
    let api: Api<DbPool> =
        Api::namespaced(ctx.client.clone(), &pool.namespace().unwrap_or_default());
    let name = pool.name_any();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    if let Some(status) = &outbox.status {
        let patch = serde_json::json!({
            "apiVersion": "dbpool.io/v1alpha1",
            "kind": "DbPool",
            "status": status,
        });
        // Sent with the slot the writer queued for (a transition's status in the first class).
        if !fenced_in(
            ctx,
            slot,
            api.patch_status(&name, &params, &Patch::Apply(&patch)),
        )
        .await?
        {
            return Ok(false);
        }
        let acknowledged = Timestamp::now();
        debug!(pool = %key, phase = ?status.phase, urgent = outbox.urgent, "status written");
        ctx.observer.status_written(key, acknowledged, status.phase);
        ctx.metrics.status_written(&pool_labels(key));
    } else {
        drop(slot);
    }
    if let Some(label) = outbox.label {
        let patch = serde_json::json!({
            "apiVersion": "dbpool.io/v1alpha1",
            "kind": "DbPool",
            "metadata": { "labels": { BREAKER_LABEL: label } },
        });
        if !fenced(
            ctx,
            Priority::Later,
            api.patch(&name, &params, &Patch::Apply(&patch)),
        )
        .await?
        {
            return Ok(false);
        }
    }
    for event in &outbox.events {
        publish(ctx, pool, event.clone()).await;
    }
    Ok(true)
}

/// Sends one write through the request budget, only if this process still leads right before
/// sending, and bounded by what is left of its term. Ok(false): not sent (not leading). A term
/// that ends while the request is in flight cancels it; one that the apiserver already applied
/// is fenced by `status.writerEpoch` (see `leadership`).
pub(super) async fn fenced<T>(
    ctx: &Context,
    priority: Priority,
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<bool, Error> {
    let slot = ctx.api_slots.acquire(priority).await;
    fenced_in(ctx, slot, request).await
}

/// [`fenced`] with a slot already held.
async fn fenced_in<T>(
    ctx: &Context,
    _slot: ApiSlot<'_>,
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<bool, Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_one_seconds_worth_then_refills_at_its_rate() {
        let bucket = TokenBucket::new(10);
        for _ in 0..10 {
            assert!(bucket.try_take(1).is_ok());
        }
        let wait = bucket.try_take(1).expect_err("empty");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(wait > Duration::from_millis(50), "{wait:?}");
    }

    #[test]
    fn a_cost_above_the_rate_is_clamped_so_it_can_ever_be_paid() {
        let bucket = TokenBucket::new(2);
        assert!(bucket.try_take(50).is_ok());
        assert!(bucket.try_take(1).is_err());
    }
}
