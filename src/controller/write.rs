//! Writing what a user sees: the status, the breaker label and events, through one writer per
//! pool and a write budget.
//!
//! Lives here: [`Outbox`] (what one pool has waiting to be written: the latest status, label and
//! events), [`WriterState`] (one pool's writer: what waits, whether a writer task runs, when
//! its next counter-only write may go) and its decisions ([`WriterState::next_step`]: stop,
//! wait for the pool's period or a bucket, or send), the write budget ([`WriteBudget`]:
//! `--min-status-period` per pool, and two global token buckets, one for counter-only writes
//! and one for transitions) and [`send`] (one outbox through the [`Door`]). Must not live here:
//! the writer task's loop over the pool registry (`context/writer.rs`), deciding the status
//! (`status`), whether a change is visible or a transition (`reconcile/outbox.rs`), event
//! wording (`events`), the leader check (`fence`).
//!
//! **The write budget.** An outbox is *urgent* when it carries a breaker transition (a new
//! breaker state or label), a force-reopen acknowledgement, a pool's first status or a new
//! `observedGeneration` (`reconcile/outbox.rs`, `is_transition`). Urgent outboxes go at once and
//! spend the transition bucket (`--transition-write-rate` requests/s). Everything else is
//! counter-only: at most one per pool per `--min-status-period`, spending the counter bucket
//! (`--counter-write-rate` requests/s). A counter-only outbox waiting for either is overtaken
//! the moment an urgent change arrives, so a flood of counter updates never delays an Open.
//! Each request (a status patch, a label patch, an event) costs one token, so no spec can make
//! the operator send more than the two rates together per second (plus one second's burst of
//! each).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::events::Recorder,
};
use tokio::{sync::Notify, time::Instant};
use tracing::{debug, warn};

use super::{
    Error, FIELD_MANAGER,
    api_permits::{ApiPermit, Priority},
    events::{PendingEvent, fold},
    fence::Door,
    names::{PoolRef, pool_labels},
    observer::Observer,
    sync::lock,
};
use crate::api::{BREAKER_LABEL, DbPool, DbPoolStatus};

/// What one pool has waiting to be written. A newer outbox merges into a waiting one: the latest
/// status and label win, events of the same reason fold together, urgency is kept.
pub(crate) struct Outbox {
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
    /// Its status answers a person's action (a force reopen, a spec edit, a hold; see
    /// `reconcile/outbox.rs`): it queues for its request before every other class.
    pub answers_person: bool,
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
        self.answers_person |= newer.answers_person;
    }

    /// Requests this outbox costs: one per patch and one per event.
    fn cost(&self) -> u32 {
        let n = usize::from(self.status.is_some())
            + usize::from(self.label.is_some())
            + self.events.len();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// One pool's writer (kept in the pool's registry entry, so forgetting the pool stops it).
#[derive(Default)]
pub(crate) struct WriterState {
    /// What waits to be written.
    outbox: Option<Outbox>,
    /// A writer task is running for this pool.
    running: bool,
    /// The next counter-only write may not start before this instant.
    next_counter_write: Option<Instant>,
    /// Wakes the writer when an urgent change arrives.
    wake: Arc<Notify>,
}

/// What the writer does next for its pool.
pub(crate) enum Step {
    /// Nothing waits (the writer ends), or the pool is gone.
    Stop,
    /// Wait until this instant, or until woken by an urgent change.
    Wait(Instant, Arc<Notify>),
    /// Send this.
    Send(Box<Outbox>),
}

impl WriterState {
    /// Merges `outbox` into what waits (waking the writer for an urgent one); true when no
    /// writer task runs yet and one must be started.
    pub fn offer(&mut self, outbox: Outbox) -> bool {
        if outbox.is_empty() {
            return false;
        }
        let urgent = outbox.urgent;
        match self.outbox.as_mut() {
            Some(waiting) => waiting.merge(outbox),
            None => self.outbox = Some(outbox),
        }
        if urgent {
            self.wake.notify_one();
        }
        !std::mem::replace(&mut self.running, true)
    }

    /// The class the waiting outbox queues in: a status answering a person before all, a
    /// transition's status first, anything else later; None when nothing waits.
    pub fn priority(&self) -> Option<Priority> {
        let outbox = self.outbox.as_ref()?;
        Some(if outbox.answers_person && outbox.status.is_some() {
            Priority::User
        } else if outbox.urgent && outbox.status.is_some() {
            Priority::First
        } else {
            Priority::Later
        })
    }

    /// Stop, wait for the pool's period or a bucket, or take the outbox and its tokens.
    pub fn next_step(&mut self, budget: &WriteBudget, min_period: Duration, now: Instant) -> Step {
        let Some(outbox) = self.outbox.as_ref() else {
            self.running = false;
            return Step::Stop;
        };
        let bucket = if outbox.urgent {
            &budget.transitions
        } else {
            if let Some(at) = self.next_counter_write
                && at > now
            {
                return Step::Wait(at, self.wake.clone());
            }
            &budget.counters
        };
        if let Err(wait) = bucket.try_take(outbox.cost()) {
            return Step::Wait(now + wait, self.wake.clone());
        }
        self.next_counter_write = Some(now + min_period);
        match self.outbox.take() {
            Some(outbox) => Step::Send(Box::new(outbox)),
            None => Step::Stop,
        }
    }

    /// Puts a failed outbox back under anything newer (the latest value still wins).
    pub fn put_back(&mut self, mut outbox: Outbox) {
        if let Some(newer) = self.outbox.take() {
            outbox.merge(newer);
        }
        self.outbox = Some(outbox);
    }

    /// The writer stopped: drops what waits.
    pub fn stop(&mut self) {
        self.outbox = None;
        self.running = false;
    }
}

/// The two global token buckets of the write budget.
pub(crate) struct WriteBudget {
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

/// What sending an outbox needs.
pub(crate) struct WriteIo<'a> {
    /// The apiserver client.
    pub client: &'a kube::Client,
    /// The one door every write passes (leader check, request budget).
    pub door: &'a Door,
    /// Publishes events.
    pub recorder: &'a Recorder,
    /// Told about every acknowledged status write.
    pub observer: &'a dyn Observer,
}

/// Sends one outbox: status (with the permit the writer queued for), label, then events.
/// Ok(false): not leading.
pub(crate) async fn send(
    io: &WriteIo<'_>,
    key: &PoolRef,
    outbox: &Outbox,
    permit: ApiPermit<'_>,
) -> Result<bool, Error> {
    let pool = outbox.pool.as_ref();
    let namespace = pool.namespace().unwrap_or_default();
    let api: Api<DbPool> = Api::namespaced(io.client.clone(), &namespace);
    let name = pool.name_any();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    if let Some(status) = &outbox.status {
        // The writerEpoch is stamped by the door from the term that lets the write through,
        // not from the term (or the standby) in which the status was computed.
        let (api, name, params) = (&api, &name, &params);
        let sent = io
            .door
            .send_in_term(permit, |epoch| async move {
                let mut status = status.clone();
                status.writer_epoch = epoch;
                let patch = serde_json::json!({
                    "apiVersion": "dbpool.io/v1alpha1",
                    "kind": "DbPool",
                    "status": status,
                });
                api.patch_status(name, params, &Patch::Apply(&patch)).await
            })
            .await?;
        if !sent {
            return Ok(false);
        }
        let acknowledged = Timestamp::now();
        debug!(pool = %key, phase = ?status.phase, urgent = outbox.urgent, "status written");
        io.observer.status_written(key, acknowledged, status.phase);
        if let Some(metrics) = io.door.metrics() {
            metrics.status_written(&pool_labels(key));
        }
    } else {
        drop(permit);
    }
    if let Some(label) = outbox.label {
        let patch = serde_json::json!({
            "apiVersion": "dbpool.io/v1alpha1",
            "kind": "DbPool",
            "metadata": { "labels": { BREAKER_LABEL: label } },
        });
        let patch = Patch::Apply(&patch);
        let request = api.patch(&name, &params, &patch);
        if !io.door.send(Priority::Later, &namespace, request).await? {
            return Ok(false);
        }
    }
    for event in &outbox.events {
        publish_event(io, pool, event).await;
    }
    Ok(true)
}

/// Sends one event about `pool` through the door. An event carries no precondition: the window
/// in which a deposed leader can still publish one is the time between the fence check and the
/// apiserver receiving the request, bounded by the rest of its term.
async fn publish_event(io: &WriteIo<'_>, pool: &DbPool, pending: &PendingEvent) {
    let event = pending.to_event();
    let reference = pool.object_ref(&());
    let request = io.recorder.publish(&event, &reference);
    let namespace = pool.namespace().unwrap_or_default();
    if let Err(err) = io.door.send(Priority::Later, &namespace, request).await {
        warn!(pool = %pool.name_any(), error = %err, "cannot publish event");
    }
}

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

    fn outbox(urgent: bool, answers_person: bool) -> Outbox {
        Outbox {
            pool: Arc::new(crate::controller::testing::pool("p")),
            status: Some(DbPoolStatus::default()),
            label: None,
            events: Vec::new(),
            urgent,
            answers_person,
        }
    }

    #[test]
    fn a_status_answering_a_person_queues_before_recovery_writes() {
        let mut writer = WriterState::default();
        assert_eq!(writer.priority(), None);
        assert!(writer.offer(outbox(true, false)), "starts a writer");
        assert_eq!(writer.priority(), Some(Priority::First));
        // The force reopen's acknowledgement merges into what waits and lifts its class.
        assert!(!writer.offer(outbox(true, true)), "the writer runs already");
        assert_eq!(writer.priority(), Some(Priority::User));
        let mut counters = WriterState::default();
        counters.offer(outbox(false, false));
        assert_eq!(counters.priority(), Some(Priority::Later));
    }
}
