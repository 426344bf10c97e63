//! The pool: connections, waiters, and the supervisor that runs recovery.
//!
//! Lives here: [`Pool`] and [`PooledClient`], the shared state behind one mutex (never held
//! across an await), the supervisor task (the one place that connects while the database
//! fails: one attempt at a time, when the engine's [`next_deadline`] says so), loss detection
//! (each connection's task reports its end), the ramp after a recovery, and the hooks the DbPool
//! follower (`dbpool`) calls. Must not live here: recovery rules (`dbpool-recovery`: this module
//! only feeds it events), connecting and classifying (`dbpool-probe`), reading Kubernetes.
//!
//! Rules:
//! - Callers open connections only while the last connect succeeded and the breaker is Closed
//!   (never against a failing server); otherwise the supervisor alone connects.
//! - `get()` fails at once while the breaker is Open or HalfOpen, or while the last connect
//!   failed with a configuration mistake; while Closed it waits at most `acquire_timeout`, and
//!   at once if the next recovery attempt is due after that.
//! - A connection whose task ends without the pool closing it is a loss: idle connections that
//!   are closed are purged, callers stop connecting, and the supervisor probes at once.

use std::{
    collections::VecDeque,
    ops::{Deref, DerefMut},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use dbpool_probe::{ProbeOutcome, ProbeStage, ProbeTarget, SessionError, open_session};
use dbpool_recovery::{
    BreakerMode, BreakerState, Effect, Event, FailureKind, Policy, PoolState, apply, next_deadline,
    phase,
};
use jiff::Timestamp;
use tokio::{sync::Notify, time::Instant};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    ClientMetrics, PoolConfig, PoolOptions,
    error::{Cause, PoolError},
    report::{HealthReport, PoolStatus, Recommendation},
};

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
    /// The DbPool's breaker as last seen, and its force-reopen token.
    hint_breaker: Option<BreakerState>,
    hint_token: Option<String>,
    closed: bool,
}

struct Conn {
    client: tokio_postgres::Client,
    generation: u64,
    created: Instant,
    last_used: Instant,
    /// Set when the pool closes this connection on purpose, so its task does not report a loss.
    closing: Arc<AtomicBool>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Release);
    }
}

/// A connection checked out of the pool; it goes back when dropped. Derefs to
/// [`tokio_postgres::Client`].
pub struct PooledClient {
    conn: Option<Conn>,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PooledClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledClient")
            .field("pool", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl Deref for PooledClient {
    type Target = tokio_postgres::Client;

    fn deref(&self) -> &Self::Target {
        // Some until drop.
        match &self.conn {
            Some(c) => &c.client,
            None => unreachable!("PooledClient used after drop"),
        }
    }
}

impl DerefMut for PooledClient {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match &mut self.conn {
            Some(c) => &mut c.client,
            None => unreachable!("PooledClient used after drop"),
        }
    }
}

impl Drop for PooledClient {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.inner.give_back(conn);
        }
    }
}

/// What `get()` decided under the lock.
enum Step {
    Fail(PoolError),
    Got(Conn, bool),
    Wait,
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
                hint_breaker: None,
                hint_token: None,
                closed: false,
            }),
            changed: Notify::new(),
            wake: Arc::new(Notify::new()),
            metrics,
            next_id: AtomicU64::new(0),
            ramp_factor,
            connects: AtomicU64::new(0),
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
        tokio::spawn(supervise(Arc::downgrade(&inner), Arc::clone(&inner.wake)).instrument(span));
        Pool { inner }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// A connection: an idle one, a new one while the database is healthy, or the real error.
    ///
    /// Fails at once while the breaker is Open or HalfOpen ([`PoolError::BreakerOpen`]) or after
    /// a configuration failure ([`PoolError::Config`]); otherwise waits at most
    /// `acquire_timeout` and returns the last real failure ([`PoolError::Unavailable`]) or
    /// [`PoolError::Exhausted`].
    pub async fn get(&self) -> Result<PooledClient, PoolError> {
        let span = info_span!("dbpool_client.get", pool = %self.inner.name);
        self.get_inner().instrument(span).await
    }

    async fn get_inner(&self) -> Result<PooledClient, PoolError> {
        let inner = &self.inner;
        let started = Instant::now();
        let deadline = started + inner.lock().options.acquire_timeout;
        let mut waiting = WaitingGuard {
            inner,
            registered: false,
        };
        loop {
            let notified = inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let step = {
                let mut s = inner.lock();
                let step = inner.decide(&mut s, deadline, started);
                if matches!(step, Step::Wait) {
                    if !waiting.registered {
                        s.waiting += 1;
                        waiting.registered = true;
                    }
                    inner.fill(&mut s);
                }
                step
            };
            if matches!(step, Step::Wait) && Instant::now() >= deadline {
                let s = inner.lock();
                return Err(inner.timeout_error(&s, started));
            }
            match step {
                Step::Fail(e) => return Err(e),
                Step::Got(conn, check) => {
                    if check && !inner.check(&conn).await {
                        inner.discard_in_use(conn);
                        continue;
                    }
                    return Ok(PooledClient {
                        conn: Some(conn),
                        inner: Arc::clone(inner),
                    });
                }
                Step::Wait => {}
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(deadline) => {
                    let s = inner.lock();
                    return Err(inner.timeout_error(&s, started));
                }
            }
        }
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
        let seq = s.engine.probe_seq.wrapping_add(1);
        let mut fresh = PoolState::new(s.engine.seed);
        fresh.probe_seq = seq;
        fresh.probe_requested = true;
        s.engine = fresh;
        s.suspect = false;
        s.last_error = None;
        info!(pool = %self.inner.name, "circuit breaker reset");
        self.inner.publish(&s);
        drop(s);
        self.inner.changed.notify_waiters();
        self.inner.wake.notify_one();
    }

    /// What the pool knows now, without any I/O.
    pub fn status(&self) -> PoolStatus {
        let s = self.inner.lock();
        PoolStatus {
            phase: phase(&s.engine),
            breaker: s.engine.breaker,
            breaker_since: s.engine.breaker_since,
            next_attempt: self.inner.next_attempt(&s),
            consecutive_failures: s.engine.consecutive_failures,
            idle: s.idle.len(),
            in_use: s.in_use,
            connecting: s.connecting,
            max_size: s.options.max_size,
            last_error: s.last_error.clone(),
            last_success: s.engine.last_success_at,
            connects_started: self.inner.connects.load(Ordering::Relaxed),
            dbpool_breaker: s.hint_breaker,
            breaker_mode: s.policy.mode,
        }
    }

    /// Checks the pool end to end (a connection and `SELECT 1`) and says what to do about it.
    pub async fn health_check(&self) -> HealthReport {
        let started = Instant::now();
        let result = match self.get().await {
            Ok(client) => match client.simple_query("SELECT 1").await {
                Ok(_) => Ok(()),
                Err(e) => Err(format!("SELECT 1 failed: {e}")),
            },
            Err(e) => Err(e.to_string()),
        };
        let latency = started.elapsed();
        if result.is_err()
            && let Some(m) = &self.inner.metrics
        {
            m.health_check_failure(&self.inner.name);
        }
        let status = self.status();
        let recommendation = Recommendation::for_status(&status, result.is_ok());
        HealthReport {
            healthy: result.is_ok(),
            error: result.err(),
            latency,
            recommendation,
            status,
        }
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

    /// Applies a new configuration while running (from a changed DbPool spec): a changed target
    /// purges every connection; the engine sees `SpecChanged`.
    pub(crate) fn reconfigure(
        &self,
        target: ProbeTarget,
        policy: Policy,
        max_size: usize,
        min_idle: usize,
    ) {
        let mut s = self.inner.lock();
        let target_changed = !same_target(&s.target, &target);
        s.target = target;
        s.target.timeout = policy.timeout;
        s.policy = policy;
        s.options.max_size = max_size.max(1);
        s.options.min_idle = min_idle.min(s.options.max_size);
        self.inner.event(&mut s, Event::SpecChanged);
        if target_changed {
            self.inner.purge(&mut s, "DbPool target changed");
            s.engine.probe_requested = true;
        }
        drop(s);
        self.inner.changed.notify_waiters();
        self.inner.wake.notify_one();
    }

    /// The DbPool's breaker state and force-reopen token as just observed. DbPool entering Open
    /// opens the local breaker and purges idle connections (the local trial still runs after
    /// `openTimeout`, and its success serves: local evidence wins); DbPool leaving Open, or a
    /// new token, makes the pool probe now.
    pub(crate) fn observe_dbpool(
        &self,
        breaker: Option<BreakerState>,
        token: Option<String>,
        operator_cause: Option<Cause>,
    ) {
        let inner = &self.inner;
        let mut s = inner.lock();
        let before = s.hint_breaker.replace(breaker.unwrap_or_default());
        let now_state = breaker.unwrap_or_default();
        let mut wake = false;
        if now_state == BreakerState::Open && before != Some(BreakerState::Open) {
            if s.engine.breaker == BreakerState::Closed {
                // The one place the client moves the breaker itself: the engine has no event
                // for "someone else saw the outage". Same bookkeeping as the engine's Open.
                let now = Timestamp::now();
                s.engine.breaker = BreakerState::Open;
                s.engine.breaker_since = Some(now);
                s.engine.half_open_successes = 0;
                s.engine.open_count += 1;
                warn!(pool = %inner.name, "DbPool breaker is Open: local breaker opened, idle connections purged");
            }
            if s.last_error.is_none() {
                s.last_error = operator_cause;
            }
            inner.purge(&mut s, "DbPool breaker opened");
            inner.publish(&s);
        } else if before == Some(BreakerState::Open) && now_state != BreakerState::Open {
            info!(pool = %inner.name, "DbPool breaker left Open: probing now");
            if s.engine.breaker == BreakerState::Closed {
                inner.event(&mut s, Event::ProbeRequested);
            } else {
                inner.event(&mut s, Event::ForceReopen);
            }
            wake = true;
        }
        if token.is_some() && token != s.hint_token {
            let first = s.hint_token.is_none() && before.is_none();
            s.hint_token = token;
            if !first {
                info!(pool = %inner.name, "new force-reopen token on the DbPool: probing now");
                inner.event(&mut s, Event::ForceReopen);
                wake = true;
            }
        }
        drop(s);
        inner.changed.notify_waiters();
        if wake {
            inner.wake.notify_one();
        }
    }
}

/// A handle that does not keep the pool alive (for the DbPool follower).
pub(crate) struct WeakPool(Weak<Inner>);

impl WeakPool {
    /// The pool, while someone still holds it.
    pub(crate) fn upgrade(&self) -> Option<Pool> {
        self.0.upgrade().map(|inner| Pool { inner })
    }
}

impl Pool {
    pub(crate) fn downgrade(&self) -> WeakPool {
        WeakPool(Arc::downgrade(&self.inner))
    }

    /// The target now (for the follower's Secret re-read).
    pub(crate) fn target(&self) -> ProbeTarget {
        self.inner.lock().target.clone()
    }
}

struct WaitingGuard<'a> {
    inner: &'a Inner,
    registered: bool,
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        if self.registered {
            let mut s = self.inner.lock();
            s.waiting = s.waiting.saturating_sub(1);
        }
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

    fn decide(&self, s: &mut Shared, deadline: Instant, started: Instant) -> Step {
        if s.closed {
            return Step::Fail(PoolError::Closed);
        }
        if s.engine.breaker != BreakerState::Closed {
            return Step::Fail(PoolError::BreakerOpen {
                state: s.engine.breaker,
                cause: s.last_error.clone(),
                since: s.engine.breaker_since,
                next_trial: self.next_attempt(s),
                forced: s.policy.mode == BreakerMode::ForcedOpen,
            });
        }
        if s.suspect
            && let Some(cause) = &s.last_error
            && cause.outcome == ProbeOutcome::ConfigFailure
        {
            return Step::Fail(PoolError::Config {
                cause: cause.clone(),
            });
        }
        let now = Instant::now();
        while let Some(conn) = s.idle.pop_front() {
            if conn.client.is_closed()
                || conn.generation != s.generation
                || now.duration_since(conn.created) >= s.options.max_lifetime
            {
                continue;
            }
            s.in_use += 1;
            let check = now.duration_since(conn.last_used) >= s.options.idle_check_after;
            return Step::Got(conn, check);
        }
        if !Self::healthy(s) && !s.probe_in_flight {
            // Only the supervisor connects now: give up at once if its next attempt comes
            // after our deadline.
            let due_in = self.next_attempt(s).map(until).unwrap_or(Duration::ZERO);
            if now + due_in > deadline
                && let Some(cause) = &s.last_error
            {
                return Step::Fail(PoolError::Unavailable {
                    cause: cause.clone(),
                    waited: started.elapsed(),
                });
            }
        }
        Step::Wait
    }

    fn timeout_error(&self, s: &Shared, started: Instant) -> PoolError {
        let waited = started.elapsed();
        match &s.last_error {
            Some(cause) if !Self::healthy(s) => PoolError::Unavailable {
                cause: cause.clone(),
                waited,
            },
            _ if s.in_use >= s.options.max_size => PoolError::Exhausted {
                max_size: s.options.max_size,
                waited,
            },
            Some(cause) => PoolError::Unavailable {
                cause: cause.clone(),
                waited,
            },
            None => PoolError::Unavailable {
                cause: Cause {
                    outcome: ProbeOutcome::TransientFailure,
                    stage: ProbeStage::Connect,
                    sql_state: None,
                    message: format!(
                        "no connection within acquire_timeout: {} connects in flight, {} in use of {}",
                        s.connecting, s.in_use, s.options.max_size
                    ),
                    at: Timestamp::now(),
                },
                waited,
            },
        }
    }

    /// Capacity now: `max_size`, or the ramp's 1, 2, 4 ... after a recovery.
    fn capacity(&self, s: &Shared) -> usize {
        let max = s.options.max_size;
        let Some(started) = s.ramp_started else {
            return max;
        };
        let step = s
            .options
            .ramp_step
            .mul_f64(self.ramp_factor)
            .max(Duration::from_millis(1));
        let steps = (started.elapsed().as_nanos() / step.as_nanos()).min(32) as u32;
        (1usize << steps).min(max)
    }

    /// When the ramp's capacity grows next, if it is ramping.
    fn next_ramp_step(&self, s: &Shared) -> Option<Instant> {
        let started = s.ramp_started?;
        if self.capacity(s) >= s.options.max_size {
            return None;
        }
        let step = s
            .options
            .ramp_step
            .mul_f64(self.ramp_factor)
            .max(Duration::from_millis(1));
        let steps = started.elapsed().as_nanos() / step.as_nanos() + 1;
        Some(started + step * u32::try_from(steps).unwrap_or(u32::MAX))
    }

    /// Opens connections for waiters and for `min_idle`, within capacity, while healthy.
    fn fill(self: &Arc<Self>, s: &mut Shared) {
        if s.closed || !Self::healthy(s) {
            return;
        }
        if s.ramp_started.is_some() && self.capacity(s) >= s.options.max_size {
            s.ramp_started = None;
        }
        let cap = self.capacity(s);
        let want_waiters = s.waiting.saturating_sub(s.connecting + s.idle.len());
        let want_idle = s
            .options
            .min_idle
            .saturating_sub(s.idle.len() + s.connecting);
        let mut want = want_waiters.max(want_idle);
        while want > 0 && s.idle.len() + s.in_use + s.connecting < cap {
            want -= 1;
            s.connecting += 1;
            self.connects.fetch_add(1, Ordering::Relaxed);
            let target = s.target.clone();
            let generation = s.generation;
            let me = Arc::clone(self);
            tokio::spawn(
                async move {
                    let result = connect(target).await;
                    me.fill_done(result, generation);
                }
                .instrument(info_span!("dbpool_client.connect", pool = %self.name)),
            );
        }
    }

    fn fill_done(
        self: &Arc<Self>,
        result: Result<dbpool_probe::Session, SessionError>,
        generation: u64,
    ) {
        let mut s = self.lock();
        s.connecting = s.connecting.saturating_sub(1);
        match result {
            Ok(session) => {
                s.suspect = false;
                if !s.closed && generation == s.generation {
                    let conn = self.adopt(session, generation);
                    s.idle.push_back(conn);
                }
            }
            Err(e) => {
                debug!(pool = %self.name, error = %e, "connect failed");
                s.last_error = Some(Cause::from_session(&e, Timestamp::now()));
                s.suspect = true;
                if !s.probe_in_flight && s.engine.last_failure.is_none() {
                    let seq = s.engine.probe_seq;
                    let kind = e.outcome.failure_kind().unwrap_or(FailureKind::Outage);
                    self.event(&mut s, Event::ProbeFailed { seq, kind });
                }
                if let Some(m) = &self.metrics {
                    m.health_check_failure(&self.name);
                }
                self.wake.notify_one();
            }
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// Spawns the connection task of a new session and wraps its client.
    fn adopt(self: &Arc<Self>, session: dbpool_probe::Session, generation: u64) -> Conn {
        let closing = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let weak = Arc::downgrade(self);
        let flag = Arc::clone(&closing);
        let peer = session.peer.clone();
        let connection = session.connection;
        tokio::spawn(async move {
            let ended = connection.await;
            if flag.load(Ordering::Acquire) {
                return;
            }
            let Some(inner) = weak.upgrade() else { return };
            let error = match ended {
                Err(e) => {
                    let password = inner.lock().target.password.clone();
                    dbpool_probe::classify_error(&e, ProbeStage::Query, &peer, password.as_ref())
                }
                Ok(()) => SessionError {
                    outcome: ProbeOutcome::TransientFailure,
                    stage: ProbeStage::Query,
                    message: format!("connection closed by {peer}"),
                    sql_state: None,
                },
            };
            inner.lost(id, error);
        });
        let now = Instant::now();
        Conn {
            client: session.client,
            generation,
            created: now,
            last_used: now,
            closing,
        }
    }

    /// A connection ended on its own: purge the closed ones, stop callers connecting, probe.
    fn lost(&self, id: u64, error: SessionError) {
        let mut s = self.lock();
        let before = s.idle.len();
        s.idle.retain(|c| !c.client.is_closed());
        let was_suspect = s.suspect;
        s.suspect = true;
        s.last_error = Some(Cause::from_session(&error, Timestamp::now()));
        if !was_suspect {
            warn!(pool = %self.name, connection = id, error = %error, purged = before - s.idle.len(),
                "connection lost: purging and probing");
            self.event(&mut s, Event::ProbeRequested);
            drop(s);
            self.wake.notify_one();
        }
        self.changed.notify_waiters();
    }

    fn give_back(self: &Arc<Self>, mut conn: Conn) {
        let mut s = self.lock();
        s.in_use = s.in_use.saturating_sub(1);
        let now = Instant::now();
        let keep = !s.closed
            && !conn.client.is_closed()
            && conn.generation == s.generation
            && now.duration_since(conn.created) < s.options.max_lifetime
            && s.idle.len() + s.in_use + s.connecting < s.options.max_size;
        if keep {
            conn.last_used = now;
            s.idle.push_front(conn);
        } else {
            drop(conn);
            self.fill(&mut s);
        }
        drop(s);
        self.changed.notify_waiters();
    }

    fn discard_in_use(self: &Arc<Self>, conn: Conn) {
        drop(conn);
        let mut s = self.lock();
        s.in_use = s.in_use.saturating_sub(1);
        self.fill(&mut s);
        drop(s);
        self.changed.notify_waiters();
    }

    /// The cheap check of a connection that was idle a while: an empty query.
    async fn check(&self, conn: &Conn) -> bool {
        let timeout = self.lock().policy.timeout;
        matches!(
            tokio::time::timeout(timeout, conn.client.simple_query("")).await,
            Ok(Ok(_))
        )
    }

    /// Closes every idle connection and makes those in use close when they come back.
    fn purge(&self, s: &mut Shared, why: &str) {
        let n = s.idle.len();
        s.idle.clear();
        s.generation += 1;
        debug!(pool = %self.name, purged = n, why, "purged idle connections");
    }

    /// Applies `event` to the engine now and acts on its effects.
    fn event(&self, s: &mut Shared, event: Event) -> Vec<Effect> {
        let (next, effects) = apply(&s.engine, event, Timestamp::now(), &s.policy);
        s.engine = next;
        for effect in &effects {
            match effect {
                Effect::BreakerChanged { from, to } => {
                    info!(pool = %self.name, ?from, ?to, "circuit breaker changed");
                    if *to == BreakerState::Open {
                        self.purge(s, "breaker opened");
                    }
                    if *to == BreakerState::Closed {
                        s.ramp_started = Some(Instant::now());
                    }
                }
                Effect::Recovered => {
                    info!(pool = %self.name, "recovered");
                    s.ramp_started = Some(Instant::now());
                }
                Effect::CooldownStarted { until } => {
                    warn!(pool = %self.name, %until, "cooldown started")
                }
                _ => {}
            }
        }
        self.publish(s);
        effects
    }

    fn publish(&self, s: &Shared) {
        if let Some(m) = &self.metrics {
            m.set_state(&self.name, s.engine.breaker, s.engine.consecutive_failures);
        }
    }

    /// When the supervisor will next connect (None: now, or in flight).
    fn next_attempt(&self, s: &Shared) -> Option<Timestamp> {
        if s.probe_in_flight {
            return None;
        }
        next_deadline(&s.engine, &s.policy)
    }
}

/// The supervisor: probes when the engine says so, maintains idle connections, drives the ramp.
async fn supervise(weak: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let (due, sleep_for) = {
            let mut s = inner.lock();
            if s.closed {
                return;
            }
            let now = Timestamp::now();
            let deadline = next_deadline(&s.engine, &s.policy);
            let due = deadline.is_none_or(|t| t <= now);
            if !due {
                // A due probe fills after it; filling before it too would overshoot min_idle.
                inner.maintain(&mut s);
            }
            let mut sleep_for = deadline
                .map_or(Duration::ZERO, until)
                .min(Duration::from_secs(1));
            if let Some(step) = inner.next_ramp_step(&s) {
                sleep_for = sleep_for.min(step.saturating_duration_since(Instant::now()));
            }
            (due, sleep_for)
        };
        if due {
            inner.probe().await;
            drop(inner);
            continue;
        }
        drop(inner);
        tokio::select! {
            () = tokio::time::sleep(sleep_for) => {}
            () = wake.notified() => {}
        }
    }
}

impl Inner {
    /// Closes expired and surplus idle connections, fills `min_idle`, wakes waiters on a ramp
    /// step.
    fn maintain(self: &Arc<Self>, s: &mut Shared) {
        let now = Instant::now();
        let (max_lifetime, idle_timeout, min_idle) = (
            s.options.max_lifetime,
            s.options.idle_timeout,
            s.options.min_idle,
        );
        let generation = s.generation;
        s.idle.retain(|c| {
            !c.client.is_closed()
                && c.generation == generation
                && now.duration_since(c.created) < max_lifetime
        });
        while s.idle.len() > min_idle
            && s.idle
                .back()
                .is_some_and(|c| now.duration_since(c.last_used) >= idle_timeout)
        {
            s.idle.pop_back();
        }
        self.fill(s);
        if s.ramp_started.is_some() {
            self.changed.notify_waiters();
        }
    }

    /// One probe: a check of an idle connection while healthy, else a fresh connect (the only
    /// connect while the database fails). Feeds the engine.
    async fn probe(self: &Arc<Self>) {
        let (seq, target, failing, idle, generation) = {
            let mut s = self.lock();
            let failing = !Self::healthy(&s);
            self.event(&mut s, Event::ProbeStarted);
            s.probe_in_flight = true;
            let idle = if failing { None } else { s.idle.pop_front() };
            if idle.is_some() {
                s.in_use += 1;
            } else {
                s.connecting += 1;
                self.connects.fetch_add(1, Ordering::Relaxed);
            }
            if failing && let Some(m) = &self.metrics {
                m.recovery_attempt(&self.name);
            }
            (
                s.engine.probe_seq,
                s.target.clone(),
                failing,
                idle,
                s.generation,
            )
        };
        let span = info_span!("dbpool_client.probe", pool = %self.name, seq, failing);
        let outcome = async {
            if let Some(conn) = idle {
                let ok = self.check(&conn).await;
                if ok {
                    return ProbeResult::Checked(conn);
                }
                self.discard_in_use(conn);
                // Fall through to a fresh connect.
                let mut s = self.lock();
                s.connecting += 1;
                self.connects.fetch_add(1, Ordering::Relaxed);
            }
            ProbeResult::Opened(connect(target).await)
        }
        .instrument(span)
        .await;
        let mut s = self.lock();
        s.probe_in_flight = false;
        let now = Timestamp::now();
        match outcome {
            ProbeResult::Checked(conn) => {
                s.in_use = s.in_use.saturating_sub(1);
                self.event(
                    &mut s,
                    Event::ProbeSucceeded {
                        seq,
                        degraded: false,
                    },
                );
                s.idle.push_front(conn);
            }
            ProbeResult::Opened(Ok(session)) => {
                s.connecting = s.connecting.saturating_sub(1);
                s.suspect = false;
                let effects = self.event(
                    &mut s,
                    Event::ProbeSucceeded {
                        seq,
                        degraded: false,
                    },
                );
                if failing {
                    // Capacity comes back as a ramp, after a loss as after an outage.
                    s.ramp_started = Some(Instant::now());
                }
                debug!(pool = %self.name, ?effects, "probe connected");
                let conn = self.adopt(session, s.generation);
                // Still Open (held by ForcedOpen, or more trials to go): the probe's connection
                // is closed, not kept where no caller may use it.
                if !s.closed
                    && s.engine.breaker == BreakerState::Closed
                    && conn.generation == generation.max(s.generation)
                    && s.idle.len() + s.in_use + s.connecting < s.options.max_size
                {
                    s.idle.push_front(conn);
                }
            }
            ProbeResult::Opened(Err(e)) => {
                s.connecting = s.connecting.saturating_sub(1);
                s.suspect = true;
                s.last_error = Some(Cause::from_session(&e, now));
                let kind = e.outcome.failure_kind().unwrap_or(FailureKind::Outage);
                self.event(&mut s, Event::ProbeFailed { seq, kind });
                if let Some(m) = &self.metrics {
                    m.health_check_failure(&self.name);
                }
                debug!(pool = %self.name, error = %e, failures = s.engine.consecutive_failures, "probe failed");
            }
        }
        self.fill(&mut s);
        drop(s);
        self.changed.notify_waiters();
    }
}

enum ProbeResult {
    Checked(Conn),
    Opened(Result<dbpool_probe::Session, SessionError>),
}

/// Opens a session on the blocking pool, driving it there with the runtime's handle: the
/// SCRAM exchange (PBKDF2, thousands of HMAC rounds, synchronous inside tokio-postgres) then
/// never stalls the application's worker threads, which would delay every waiter's deadline.
async fn connect(target: ProbeTarget) -> Result<dbpool_probe::Session, SessionError> {
    let handle = tokio::runtime::Handle::current();
    match tokio::task::spawn_blocking(move || handle.block_on(open_session(&target))).await {
        Ok(result) => result,
        Err(e) => Err(SessionError {
            outcome: ProbeOutcome::TransientFailure,
            stage: ProbeStage::Connect,
            message: format!("connect task failed: {e}"),
            sql_state: None,
        }),
    }
}

/// Time from now until `t`, zero if past.
fn until(t: Timestamp) -> Duration {
    Duration::try_from(t.duration_since(Timestamp::now())).unwrap_or(Duration::ZERO)
}

fn same_target(a: &ProbeTarget, b: &ProbeTarget) -> bool {
    a.host == b.host
        && a.port == b.port
        && a.dbname == b.dbname
        && a.user == b.user
        && a.password == b.password
        && a.ssl_mode == b.ssl_mode
        && a.ca_pem == b.ca_pem
        && a.target_session_attrs == b.target_session_attrs
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
