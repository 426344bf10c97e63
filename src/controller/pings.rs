//! Readiness ping streams: while a target's pools wait out an outage, learn without a password
//! when the server accepts connections again, and tell them at once.
//!
//! Lives here: [`Pings`] (one ping stream per target, `host:port`, shared by every pool waiting
//! on it; the pools it must tell; the edges not yet taken), [`awaits_readiness`] (which pools
//! wait: the last result an outage-class failure, credentials loaded, early trials possible) and
//! the global ping budget ([`FairRate`]: at most `--max-pings-per-second`, handed out in turn
//! across namespaces), and what was seen of each target for the pools' status (`pings/seen.rs`:
//! [`Pings::saw`], [`Pings::shown`]). Must not live here: the ping itself (`dbpool-probe`), what an edge means
//! to a pool (`dbpool-recovery`'s early trial), or reading Secrets and the cluster (the reconcile
//! hands in everything as arguments).
//!
//! A stream pings at most [`PING_PERIOD`] apart (4 per second) while any pool waits on its
//! target. The first answer *accepting* is the edge (the pools' last evidence was a failure that
//! says "not accepting": refused, reset, timed out, 57P03): every waiting pool is told, and the
//! stream ends; a pool's next outage-class failure starts it again. A configuration answer
//! (pg_hba, certificate, no TLS) belongs to the credential key that pinged: the pools with that
//! key stop waiting, the others go on. Pings never run for a healthy pool, a pool in
//! ConfigError, a pool whose credentials did not load (no consent, missing Secret), or a policy
//! without early trials (earlyTrial false, or ForcedOpen).
//!
//! An edge carries its instant (when the ping saw the target accepting): a pool that takes it
//! takes any result of its probe stream from that instant on as its early trial's, so one
//! credentialed trial per credential key answers for every pool of the key (`reconcile/stream.rs`).

mod seen;

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use tokio::{
    sync::{Notify, mpsc, oneshot},
    task::JoinHandle,
};
use tracing::debug;

use super::{
    names::{PerPool, PoolRef},
    sync::lock,
};
use crate::{
    api::{BreakerMode, ProbeOutcome, ProbeSummary},
    metrics::Metrics,
    probe::{PingTarget, Readiness, ping},
    recovery::{Phase, Policy, PoolState, phase},
};

use seen::Seen;
pub(crate) use seen::Shown;

/// The least time between two pings of one target.
pub(crate) const PING_PERIOD: Duration = Duration::from_millis(250);

/// Whether a pool should wait for its target's readiness: its last result is an outage-class
/// failure (refused, reset, closed or timed out without a SQLSTATE, or 57P03), it is
/// Recovering, BreakerOpen or CoolingDown, and its policy can use an edge (earlyTrial on, not
/// ForcedOpen).
pub(crate) fn awaits_readiness(last: &ProbeSummary, state: &PoolState, policy: &Policy) -> bool {
    let outage_class = last.outcome == ProbeOutcome::TransientFailure
        && last.sql_state.as_deref().is_none_or(|code| code == "57P03");
    let waiting = matches!(
        phase(state),
        Phase::Recovering | Phase::BreakerOpen | Phase::CoolingDown
    );
    outage_class && waiting && policy.early_trial && policy.mode != BreakerMode::ForcedOpen
}

/// A pool waiting on a target.
#[derive(Clone)]
struct Waiter {
    namespace: String,
    ping: PingTarget,
}

/// One target's stream: who waits on it, and its task.
struct Stream {
    waiters: HashMap<PoolRef, Waiter>,
    task: Option<JoinHandle<()>>,
}

/// What the streams share.
#[derive(Default)]
struct Shared {
    /// Per target key.
    streams: HashMap<String, Stream>,
    /// Which target each waiting pool waits on.
    target_of: HashMap<PoolRef, String>,
    /// Pools told of an edge whose reconcile has not taken it yet, with the edge's instant.
    edges: HashMap<PoolRef, Timestamp>,
    /// What was seen of each target, for the pools' status.
    seen: Seen,
}

/// The ping streams of one controller. Dropping it stops them.
pub(crate) struct Pings {
    shared: Arc<Mutex<Shared>>,
    budget: Arc<FairRate>,
    edges: mpsc::UnboundedSender<PoolRef>,
    metrics: Arc<Metrics>,
}

impl Pings {
    /// Streams under a global budget of `per_second` pings; the receiver yields each pool told
    /// of an edge (to reconcile it now).
    pub fn new(per_second: u32, metrics: Arc<Metrics>) -> (Self, mpsc::UnboundedReceiver<PoolRef>) {
        let (edges, rx) = mpsc::unbounded_channel();
        let pings = Self {
            shared: Arc::default(),
            budget: FairRate::new(per_second),
            edges,
            metrics,
        };
        (pings, rx)
    }

    /// `pool` waits on `target` (a `host:port` key) with `ping` (its credential key's ping):
    /// joins the target's stream, starting it if none runs.
    pub fn watch(&self, target: &str, pool: &PoolRef, ping: PingTarget) {
        let namespace = pool.namespace.clone().unwrap_or_default();
        let mut shared = lock(&self.shared);
        if let Some(old) = shared.target_of.insert(pool.clone(), target.to_owned())
            && old != target
        {
            remove_waiter(&mut shared, &old, pool);
        }
        let stream = shared
            .streams
            .entry(target.to_owned())
            .or_insert_with(|| Stream {
                waiters: HashMap::new(),
                task: None,
            });
        stream
            .waiters
            .insert(pool.clone(), Waiter { namespace, ping });
        if stream.task.as_ref().is_none_or(JoinHandle::is_finished) {
            debug!(target, "readiness pings start");
            stream.task = Some(tokio::spawn(run_stream(
                target.to_owned(),
                Arc::downgrade(&self.shared),
                Arc::clone(&self.budget),
                self.edges.clone(),
                Arc::clone(&self.metrics),
            )));
        }
    }

    /// `pool` no longer waits (healthy, misconfigured, or any other answer).
    pub fn unwatch(&self, pool: &PoolRef) {
        let mut shared = lock(&self.shared);
        if let Some(target) = shared.target_of.remove(pool) {
            remove_waiter(&mut shared, &target, pool);
        }
    }

    /// The instant of the edge `pool` was told of since its last reconcile, if any; clears it.
    pub fn take_edge(&self, pool: &PoolRef) -> Option<Timestamp> {
        lock(&self.shared).edges.remove(pool)
    }

    /// A pool's own result on `target` (credential key `ping`) at `at` says `readiness`: its
    /// outage failures are evidence too (the target's readiness shown turns from Accepting to
    /// Unreachable or StartingUp with the failure, not only with the next ping).
    pub fn saw(&self, target: &str, ping: &PingTarget, readiness: Readiness, at: Timestamp) {
        lock(&self.shared).seen.record(target, ping, readiness, at);
    }

    /// The readiness the pools of credential key `ping` on `target` are shown (see `seen`).
    pub fn shown(&self, target: &str, ping: &PingTarget) -> Option<Shown> {
        lock(&self.shared).seen.shown(target, ping)
    }
}

impl Drop for Pings {
    fn drop(&mut self) {
        for stream in lock(&self.shared).streams.values_mut() {
            if let Some(task) = stream.task.take() {
                task.abort();
            }
        }
        self.budget.stop();
    }
}

impl PerPool for Pings {
    fn forget(&self, pool: &PoolRef) {
        self.unwatch(pool);
        lock(&self.shared).edges.remove(pool);
    }

    fn pools_known(&self) -> usize {
        let shared = lock(&self.shared);
        shared.target_of.len() + shared.edges.len()
    }
}

/// Removes `pool` from `target`'s stream; a stream nobody waits on stops.
fn remove_waiter(shared: &mut Shared, target: &str, pool: &PoolRef) {
    if let Some(stream) = shared.streams.get_mut(target) {
        stream.waiters.remove(pool);
        if stream.waiters.is_empty() {
            if let Some(task) = stream.task.take() {
                task.abort();
            }
            shared.streams.remove(target);
        }
    }
}

/// The waiter whose ping the stream makes next: the first by name, so one credential key pings
/// until its answer is a configuration answer.
fn next_waiter(shared: &Shared, target: &str) -> Option<Waiter> {
    let stream = shared.streams.get(target)?;
    stream
        .waiters
        .iter()
        .min_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)))
        .map(|(_, waiter)| waiter.clone())
}

/// One target's stream: ping every [`PING_PERIOD`] under the global budget until the target
/// accepts (then tell every waiter) or nobody waits.
async fn run_stream(
    target: String,
    shared: Weak<Mutex<Shared>>,
    budget: Arc<FairRate>,
    edges: mpsc::UnboundedSender<PoolRef>,
    metrics: Arc<Metrics>,
) {
    let mut tick = tokio::time::interval(PING_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(waiter) = shared
            .upgrade()
            .and_then(|s| next_waiter(&lock(&s), &target))
        else {
            return;
        };
        if !budget.acquire(&waiter.namespace).await {
            return;
        }
        let report = ping(&waiter.ping).await;
        let at = Timestamp::now();
        metrics.readiness_ping(report.readiness);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut shared = lock(&shared);
        shared
            .seen
            .record(&target, &waiter.ping, report.readiness, at);
        if !on_answer(
            &mut shared,
            &target,
            &waiter,
            (report.readiness, at),
            &edges,
        ) {
            return;
        }
    }
}

/// What an answer (given at `at`) does to `target`'s stream; false when the stream ends.
/// Accepting tells every waiter (the edge, at `at`) and ends it; a configuration answer drops
/// the waiters with the pinging credential key; anything else changes nothing.
fn on_answer(
    shared: &mut Shared,
    target: &str,
    waiter: &Waiter,
    (readiness, at): (Readiness, Timestamp),
    edges: &mpsc::UnboundedSender<PoolRef>,
) -> bool {
    match readiness {
        Readiness::Accepting => {
            let Some(stream) = shared.streams.remove(target) else {
                return false;
            };
            debug!(%target, pools = stream.waiters.len(), "target accepts connections again");
            for pool in stream.waiters.into_keys() {
                shared.target_of.remove(&pool);
                shared.edges.insert(pool.clone(), at);
                let _ = edges.send(pool);
            }
            false
        }
        Readiness::ConfigAnswer => {
            let Some(stream) = shared.streams.get_mut(target) else {
                return false;
            };
            let same_key: Vec<PoolRef> = stream
                .waiters
                .iter()
                .filter(|(_, w)| w.ping == waiter.ping)
                .map(|(pool, _)| pool.clone())
                .collect();
            for pool in &same_key {
                stream.waiters.remove(pool);
            }
            let empty = stream.waiters.is_empty();
            for pool in &same_key {
                shared.target_of.remove(pool);
            }
            if empty {
                shared.streams.remove(target);
            }
            !empty
        }
        Readiness::StartingUp
        | Readiness::Unreachable
        | Readiness::Rejected
        | Readiness::NotPostgres => true,
    }
}

/// A global rate of `per_second` grants, handed out in turn across namespaces: each namespace
/// waiting gets the next grant before any namespace gets a second one.
pub(crate) struct FairRate {
    period: Duration,
    state: Mutex<FairState>,
    wake: Arc<Notify>,
    dispatcher: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct FairState {
    /// Waiters per namespace, in arrival order.
    queues: HashMap<String, VecDeque<oneshot::Sender<()>>>,
    /// Namespaces with waiters, in turn order.
    turn: VecDeque<String>,
}

impl FairRate {
    /// A budget of `per_second` grants (at least 1).
    pub fn new(per_second: u32) -> Arc<Self> {
        let rate = Arc::new(Self {
            period: Duration::from_secs(1) / per_second.max(1),
            state: Mutex::default(),
            wake: Arc::new(Notify::new()),
            dispatcher: Mutex::new(None),
        });
        let weak = Arc::downgrade(&rate);
        let wake = Arc::clone(&rate.wake);
        *lock(&rate.dispatcher) = Some(tokio::spawn(dispatch(weak, wake)));
        rate
    }

    /// Waits for a grant for `namespace`; false when the budget is stopped.
    pub async fn acquire(&self, namespace: &str) -> bool {
        let (tx, rx) = oneshot::channel();
        {
            let mut state = lock(&self.state);
            let queue = state.queues.entry(namespace.to_owned()).or_default();
            queue.push_back(tx);
            if queue.len() == 1 {
                state.turn.push_back(namespace.to_owned());
            }
        }
        self.wake.notify_one();
        rx.await.is_ok()
    }

    /// Stops handing out grants; waiters get false.
    fn stop(&self) {
        if let Some(task) = lock(&self.dispatcher).take() {
            task.abort();
        }
        let mut state = lock(&self.state);
        state.queues.clear();
        state.turn.clear();
    }

    /// Hands out the next grant, in turn; false when nobody waits.
    fn grant_next(&self) -> bool {
        let mut state = lock(&self.state);
        while let Some(namespace) = state.turn.pop_front() {
            let Some(queue) = state.queues.get_mut(&namespace) else {
                continue;
            };
            let Some(waiter) = queue.pop_front() else {
                state.queues.remove(&namespace);
                continue;
            };
            let more = !queue.is_empty();
            if more {
                state.turn.push_back(namespace);
            } else {
                state.queues.remove(&namespace);
            }
            // A waiter that gave up (its stream stopped) does not use up the grant.
            if waiter.send(()).is_ok() {
                return true;
            }
        }
        false
    }
}

/// The budget's dispatcher: one grant per period, while anyone waits.
async fn dispatch(rate: Weak<FairRate>, wake: Arc<Notify>) {
    loop {
        let Some(strong) = rate.upgrade() else { return };
        let period = strong.period;
        let granted = strong.grant_next();
        drop(strong);
        if granted {
            tokio::time::sleep(period).await;
        } else {
            wake.notified().await;
        }
    }
}

#[cfg(test)]
mod tests;
