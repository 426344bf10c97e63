//! Checkout: what `get()` decides under the lock, how it waits, and which error it returns.
//!
//! Lives here: the loop behind [`Pool::get`] (`Pool::checkout`), its decision under the lock
//! (`Inner::decide`: fail at once, an idle connection, or wait), the count of waiters, and the
//! error after `acquire_timeout`. Must not live here: opening connections (`fill`), the
//! connection's return (`conn`), or any change to the engine.

use std::sync::Arc;

use dbpool_probe::{ProbeOutcome, ProbeStage};
use dbpool_recovery::{BreakerMode, BreakerState};
use jiff::Timestamp;
use tokio::time::Instant;

use super::{
    Inner, Pool, PooledClient, Shared,
    conn::Conn,
    limbo::{self, Verdict},
};
use crate::error::{Cause, PoolError};

/// What `get()` decided under the lock.
enum Step {
    Fail(PoolError),
    Got(Conn, bool),
    /// Wait for a change; decide again at this instant at the latest (a ping's answer is due).
    Wait(Option<Instant>),
}

/// Counts one `get()` among the waiters (from its first wait until it returns).
struct WaitingGuard<'a> {
    inner: &'a Inner,
    registered: bool,
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        if self.registered {
            let mut s = self.inner.lock();
            s.waiting = s.waiting.saturating_sub(1);
            // Leaving without a connection (deadline, error) while one is idle: the waiters that
            // were told of it may have stood back for this one (see `decide`'s queue rule).
            let wake = s.waiting > 0 && !s.idle.is_empty();
            drop(s);
            if wake {
                self.inner.changed.notify_waiters();
            }
        }
    }
}

impl Pool {
    /// The body of [`Pool::get`], inside its span.
    ///
    /// The common case (an idle connection, or an error at once) takes the lock once and does
    /// not register with `changed`; only a caller that has to wait registers, then decides
    /// again under the lock, so no wake-up between the two is lost.
    pub(super) async fn checkout(&self) -> Result<PooledClient, PoolError> {
        let inner = &self.inner;
        let started = Instant::now();
        let (mut step, deadline) = {
            let mut s = inner.lock();
            let deadline = started + s.options.acquire_timeout;
            (inner.decide(&mut s, deadline, started, false), deadline)
        };
        let mut waiting = WaitingGuard {
            inner,
            registered: false,
        };
        loop {
            match step {
                Step::Fail(e) => {
                    // A caller looping on get() while it fails at once (breaker Open) never
                    // awaits anything else: let the runtime run its other tasks (the pool's own
                    // supervisor among them) once the task's budget is spent.
                    tokio::task::consume_budget().await;
                    return Err(e);
                }
                Step::Got(conn, check) => {
                    if !check || inner.check(&conn).await {
                        return Ok(PooledClient::new(conn, Arc::clone(inner)));
                    }
                    inner.discard_in_use(conn);
                }
                Step::Wait(_) => {
                    let notified = inner.changed.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    step = {
                        let mut s = inner.lock();
                        let step = inner.decide(&mut s, deadline, started, waiting.registered);
                        if matches!(step, Step::Wait(_)) {
                            if !waiting.registered {
                                s.waiting += 1;
                                waiting.registered = true;
                            }
                            inner.fill(&mut s);
                        }
                        step
                    };
                    let Step::Wait(recheck) = step else {
                        continue;
                    };
                    if Instant::now() >= deadline {
                        let s = inner.lock();
                        return Err(inner.timeout_error(&s, started));
                    }
                    let wake_at = recheck.map_or(deadline, |t| t.min(deadline));
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(wake_at) => {
                            if Instant::now() >= deadline {
                                let s = inner.lock();
                                return Err(inner.timeout_error(&s, started));
                            }
                        }
                    }
                }
            }
            // Woken, or the idle connection failed its check: decide again.
            step = {
                let mut s = inner.lock();
                inner.decide(&mut s, deadline, started, waiting.registered)
            };
        }
    }
}

impl Inner {
    /// What `get()` does now. `queued`: this caller already waits among `s.waiting`; a caller
    /// that does not takes an idle connection only when there are more idle connections than
    /// waiters, so a task that gives a connection back and asks again at once does not take it
    /// from the callers that were waiting for it (the ramp after a recovery hands out one
    /// connection at first).
    fn decide(
        self: &Arc<Self>,
        s: &mut Shared,
        deadline: Instant,
        started: Instant,
        queued: bool,
    ) -> Step {
        if s.closed {
            return Step::Fail(PoolError::Closed);
        }
        if s.engine.breaker != BreakerState::Closed {
            // A caller of an Open pool is the demand that lets it ping (readiness module).
            self.maybe_ping(s);
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
        if !queued && !s.idle.is_empty() && s.waiting >= s.idle.len() {
            return Step::Wait(None);
        }
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
        if !Self::healthy(s) {
            // The limbo rule (module `limbo`): wait only for something that can bring a
            // connection soon, else the last failure's cause now.
            self.maybe_ping(s);
            match limbo::verdict(&self.evidence(s), now) {
                Verdict::Wait => {}
                Verdict::WaitUntil(at) => return Step::Wait(Some(at.min(deadline))),
                Verdict::Fail => {
                    if let Some(cause) = &s.last_error {
                        return Step::Fail(PoolError::Unavailable {
                            cause: cause.clone(),
                            waited: started.elapsed(),
                        });
                    }
                }
            }
        }
        Step::Wait(None)
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
}
