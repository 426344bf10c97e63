//! The pool: the public [`Pool`] handle and the shared state every part of it works on.
//!
//! Lives here: [`Pool`] (construction, `get()`, `force_reopen()`, `reset_circuit_breaker()`,
//! `close()`), the shared state behind one mutex (`Inner`, `Shared`; the mutex is never held
//! across an await) and the map of the submodules below. Must not live here: recovery rules
//! (`dbpool-recovery`: the pool only feeds it events), connecting and classifying
//! (`dbpool-probe`), reading Kubernetes (`crate::dbpool`), or the work of any submodule:
//!
//! - `checkout`: what `get()` decides under the lock, waiting, and which error it returns.
//! - `conn`: one connection (`Conn`, [`PooledClient`]): its return to the idle set, the cheap
//!   check, purges, and loss detection (each connection's task reports its end).
//! - `fill`: opening connections for waiters and `min_idle` within the ramp's capacity, and the
//!   upkeep of the idle set.
//! - `supervisor`: the task that probes (the one place that connects while the database fails:
//!   one attempt at a time, when the engine's `next_deadline` says so).
//! - `engine`: feeding the recovery engine and every other write to its state, metrics of it.
//! - `follow`: the hooks the DbPool follower (`crate::dbpool`) calls.
//! - `status`: `status()` and `health_check()`.
//! - `limbo`: the rule for a caller while the database fails and the breaker is Closed (wait,
//!   or the real cause at once).
//! - `readiness`: readiness evidence (the DbPool's `status.readiness`, or the pool's own pings
//!   when standalone) and the early trial it brings.
//!
//! Rules:
//! - Callers open connections only while the last connect succeeded and the breaker is Closed
//!   (never against a failing server); otherwise the supervisor alone connects.
//! - `get()` fails at once while the breaker is Open or HalfOpen, or while the last connect
//!   failed with a configuration mistake; while Closed it waits at most `acquire_timeout`, and
//!   while the database fails only as the limbo rule allows (`limbo`: an attempt in flight, a
//!   server starting, a ping in flight), else it returns the last failure's cause at once.
//! - A connection whose task ends without the pool closing it is a loss: idle connections that
//!   are closed are purged, callers stop connecting, and the supervisor probes at once.

mod checkout;
mod conn;
mod engine;
mod fill;
mod follow;
mod limbo;
mod readiness;
mod status;
mod supervisor;

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard, PoisonError, atomic::AtomicU64},
    time::Duration,
};

use dbpool_probe::{AdaptiveTimeouts, ProbeTarget};
use dbpool_recovery::{BreakerMode, BreakerState, Event, Policy, PoolState};
use jiff::Timestamp;
use tokio::{sync::Notify, time::Instant};
use tracing::{Instrument, debug_span, info_span};

pub use conn::PooledClient;
pub(crate) use follow::WeakPool;

use crate::{ClientMetrics, PoolConfig, PoolOptions, error::Cause, error::PoolError};
use conn::Conn;

/// A self-healing pool of tokio-postgres clients. Cheap to clone; the supervisor stops when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    name: String,
    shared: Mutex<Shared>,
    /// Waiters of `get()`: a connection came back, a connect ended, the state changed.
    changed: Notify,
    /// The supervisor: something is due (a loss, a force reopen, a hint, a failed fill).
    wake: Arc<Notify>,
    metrics: Option<ClientMetrics>,
    next_id: AtomicU64,
    /// Per-process factor in [1, 1.5) stretching the ramp step.
    ramp_factor: f64,
    /// Connects started, by callers and the supervisor alike (for status and tests).
    connects: AtomicU64,
    /// Each connect stage's learned timeout (see `PoolOptions::adaptive_timeout`).
    timeouts: Mutex<AdaptiveTimeouts>,
}

struct Shared {
    target: ProbeTarget,
    policy: Policy,
    options: PoolOptions,
    engine: PoolState,
    idle: VecDeque<Conn>,
    in_use: usize,
    connecting: usize,
    waiting: usize,
    /// The most recent connect attempt (caller's or supervisor's) failed, or a loss was seen;
    /// cleared by a successful connect.
    suspect: bool,
    last_error: Option<Cause>,
    /// Bumped by a purge: connections of an older generation are closed when they come back.
    generation: u64,
    probe_in_flight: bool,
    ramp_started: Option<Instant>,
    /// The last recovery (a recovery attempt's success, the breaker closing): for the policy's
    /// timeout after it, connects wait the whole timeout, not the learned one (`conn::connect`).
    recovered_at: Option<Instant>,
    /// The DbPool's breaker as last seen, and its force-reopen token.
    hint_breaker: Option<BreakerState>,
    hint_token: Option<String>,
    /// Readiness evidence and the standalone pings (`readiness`).
    ready: readiness::ReadyState,
    closed: bool,
}

impl Pool {
    /// Starts a pool (and its supervisor task, which connects at once) on the current tokio
    /// runtime. `metrics`: the families from [`ClientMetrics::register`], if the application
    /// exports metrics.
    pub fn new(config: PoolConfig, metrics: Option<ClientMetrics>) -> Pool {
        let config = config.sanitized();
        let seed = seed_for(&config.name);
        let ramp_factor = 1.0 + 0.5 * process_unit();
        let inner = Arc::new(Inner {
            name: config.name.clone(),
            shared: Mutex::new(Shared {
                target: config.target,
                policy: config.policy,
                options: config.options,
                engine: PoolState::new(seed),
                idle: VecDeque::new(),
                in_use: 0,
                connecting: 0,
                waiting: 0,
                suspect: false,
                last_error: None,
                generation: 0,
                probe_in_flight: false,
                ramp_started: None,
                recovered_at: None,
                hint_breaker: None,
                hint_token: None,
                ready: readiness::ReadyState::default(),
                closed: false,
            }),
            changed: Notify::new(),
            wake: Arc::new(Notify::new()),
            metrics,
            next_id: AtomicU64::new(0),
            ramp_factor,
            connects: AtomicU64::new(0),
            timeouts: Mutex::new(AdaptiveTimeouts::new()),
        });
        if let Some(m) = &inner.metrics {
            m.set_state(&inner.name, BreakerState::Closed, 0);
        }
        {
            // A mode other than Auto applies from the first call (ForcedOpen: held open), not
            // from the first probe's result.
            let mut s = inner.lock();
            if s.policy.mode != BreakerMode::Auto {
                inner.event(&mut s, Event::SpecChanged);
            }
        }
        let span = info_span!("dbpool_client.supervisor", pool = %inner.name);
        tokio::spawn(
            supervisor::supervise(Arc::downgrade(&inner), Arc::clone(&inner.wake)).instrument(span),
        );
        Pool { inner }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// A connection: an idle one, a new one while the database is healthy, or the real error.
    ///
    /// Fails at once while the breaker is Open or HalfOpen ([`PoolError::BreakerOpen`]) or after
    /// a configuration failure ([`PoolError::Config`]). While the database fails and the breaker
    /// is Closed, waits only while an attempt is in flight, the server says it is starting, or a
    /// readiness ping is in flight (the limbo rule), else returns the last failure's cause
    /// ([`PoolError::Unavailable`]) at once. Never waits past `acquire_timeout`
    /// ([`PoolError::Unavailable`] or [`PoolError::Exhausted`]).
    pub async fn get(&self) -> Result<PooledClient, PoolError> {
        // DEBUG, not INFO: an application logging at INFO pays nothing per checkout (a span
        // that is enabled costs an allocation and the formatted pool name on every call).
        let span = debug_span!("dbpool_client.get", pool = %self.inner.name);
        self.checkout().instrument(span).await
    }

    /// Drops the backoff cycle and cooldown and connects now (Open goes HalfOpen: this is the
    /// trial). The engine's `ForceReopen`.
    pub fn force_reopen(&self) {
        let mut s = self.inner.lock();
        self.inner.event(&mut s, Event::ForceReopen);
        drop(s);
        self.inner.wake.notify_one();
    }

    /// Forgets every failure: the breaker closes (unless `breaker.mode` holds it), counters
    /// reset, and the pool connects now.
    pub fn reset_circuit_breaker(&self) {
        let mut s = self.inner.lock();
        self.inner.reset_engine(&mut s);
        drop(s);
        self.inner.changed.notify_waiters();
        self.inner.wake.notify_one();
    }

    /// Closes the pool: `get()` fails with [`PoolError::Closed`], idle connections are closed,
    /// connections in use are closed when they come back.
    pub fn close(&self) {
        let mut s = self.inner.lock();
        s.closed = true;
        s.idle.clear();
        s.generation += 1;
        drop(s);
        self.inner.changed.notify_waiters();
        self.inner.wake.notify_one();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether callers may open connections: the last connect worked, the breaker is Closed.
    fn healthy(s: &Shared) -> bool {
        !s.suspect && s.engine.breaker == BreakerState::Closed && s.engine.last_failure.is_none()
    }
}

/// Time from now until `t`, zero if past.
fn until(t: Timestamp) -> Duration {
    Duration::try_from(t.duration_since(Timestamp::now())).unwrap_or(Duration::ZERO)
}

/// The engine's jitter seed for a pool: its name mixed with this process, so replicas differ.
fn seed_for(name: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(name.as_bytes());
    h.write_u32(std::process::id());
    h.finish()
}

/// A number in [0, 1) that differs between processes.
fn process_unit() -> f64 {
    (seed_for("ramp") >> 11) as f64 / (1u64 << 53) as f64
}
