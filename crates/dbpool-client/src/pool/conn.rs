//! One connection: checked out, given back, checked, purged, or lost.
//!
//! Lives here: `Conn` (a client with its generation and ages) and [`PooledClient`] (a checked-out
//! `Conn` that goes back when dropped), the return to the idle set, the cheap check of an idle
//! connection, purges, opening a session off the worker threads (`connect`), and loss detection:
//! each connection's task reports its end (`Inner::adopt`, `Inner::lost`). Must not live here:
//! deciding when to open connections (`fill`, `supervisor`) or what `get()` hands out
//! (`checkout`).

use std::{
    ops::{Deref, DerefMut},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use dbpool_probe::{
    AdaptiveTimeouts, ProbeOutcome, ProbeStage, ProbeTarget, SessionError, StageTimeouts,
    open_session_within,
};
use dbpool_recovery::Event;
use jiff::Timestamp;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Inner, Shared};
use crate::error::Cause;

pub(super) struct Conn {
    pub(super) client: tokio_postgres::Client,
    pub(super) generation: u64,
    pub(super) created: Instant,
    pub(super) last_used: Instant,
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

impl PooledClient {
    /// `conn`, checked out of `inner` (already counted in use).
    pub(super) fn new(conn: Conn, inner: Arc<Inner>) -> Self {
        Self {
            conn: Some(conn),
            inner,
        }
    }
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

impl Inner {
    /// Spawns the connection task of a new session and wraps its client.
    pub(super) fn adopt(self: &Arc<Self>, session: dbpool_probe::Session, generation: u64) -> Conn {
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
        if !was_suspect {
            // Only the first loss is news: the ends of the other connections of the same restart
            // (57P01, "terminating connection") come later and must not hide what the probe
            // since learned (refused, 57P03), which decides the readiness pings.
            s.last_error = Some(Cause::from_session(&error, Timestamp::now()));
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
        // Only a waiter waits on `changed`, and it registers under this lock: none, no wake-up.
        let wake = s.waiting > 0;
        drop(s);
        if wake {
            self.changed.notify_waiters();
        }
    }

    pub(super) fn discard_in_use(self: &Arc<Self>, conn: Conn) {
        drop(conn);
        let mut s = self.lock();
        s.in_use = s.in_use.saturating_sub(1);
        self.fill(&mut s);
        drop(s);
        self.changed.notify_waiters();
    }

    /// The cheap check of a connection that was idle a while: an empty query.
    pub(super) async fn check(&self, conn: &Conn) -> bool {
        let timeout = self.lock().policy.timeout;
        matches!(
            tokio::time::timeout(timeout, conn.client.simple_query("")).await,
            Ok(Ok(_))
        )
    }

    /// Closes every idle connection and makes those in use close when they come back.
    pub(super) fn purge(&self, s: &mut Shared, why: &str) {
        let n = s.idle.len();
        s.idle.clear();
        s.generation += 1;
        debug!(pool = %self.name, purged = n, why, "purged idle connections");
    }
}

impl Inner {
    /// Opens a session to `target`, each stage within its learned timeout when the pool's
    /// options want adaptive timeouts (not for the policy's timeout after a recovery: the first
    /// logins after a restart are slow), and learns from what the stages took.
    pub(super) async fn connect(
        &self,
        target: ProbeTarget,
    ) -> Result<dbpool_probe::Session, SessionError> {
        let adaptive = {
            let s = self.lock();
            // The first logins after a restart are slower than the learned (healthy) latency:
            // cut at the learned limit (250 ms at the floor), the ramp's connects failed and made
            // the pool suspect, so callers got fast failures after a recovery (the idle-blip
            // burst in bench-client). After a recovery, connects wait the policy's timeout.
            let fresh = s
                .recovered_at
                .is_some_and(|t| t.elapsed() < s.policy.timeout);
            s.options.adaptive_timeout && !fresh
        };
        let limits = if adaptive {
            self.learned().timeouts(target.timeout)
        } else {
            StageTimeouts::none()
        };
        let (result, stages) = connect(target, limits).await;
        let failed = result.as_ref().err();
        let timed_out = failed.is_some_and(|e| e.message.contains("timed out"));
        self.learned()
            .learn_stages(&stages, failed.map(|e| e.stage), timed_out);
        result
    }

    /// The learned connect timeouts.
    pub(super) fn learned(&self) -> std::sync::MutexGuard<'_, AdaptiveTimeouts> {
        self.timeouts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A session and the latency of each stage that ran.
type Attempt = (
    Result<dbpool_probe::Session, SessionError>,
    Vec<(ProbeStage, std::time::Duration)>,
);

/// Opens a session on the blocking pool, driving it there with the runtime's handle: the
/// SCRAM exchange (PBKDF2, thousands of HMAC rounds, synchronous inside tokio-postgres) then
/// never stalls the application's worker threads, which would delay every waiter's deadline.
async fn connect(target: ProbeTarget, limits: StageTimeouts) -> Attempt {
    let handle = tokio::runtime::Handle::current();
    let open = move || handle.block_on(open_session_within(&target, limits));
    match tokio::task::spawn_blocking(open).await {
        Ok(attempt) => attempt,
        Err(e) => (
            Err(SessionError {
                outcome: ProbeOutcome::TransientFailure,
                stage: ProbeStage::Connect,
                message: format!("connect task failed: {e}"),
                sql_state: None,
            }),
            Vec::new(),
        ),
    }
}
