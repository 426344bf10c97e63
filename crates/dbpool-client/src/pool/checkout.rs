//! Checkout: what `get()` decides under the lock, how it waits, and which error it returns.
//!
//! Lives here: the loop behind [`Pool::get`] (`Pool::checkout`), its decision under the lock
//! (`Inner::decide`: fail at once, an idle connection, or wait), the count of waiters, and the
//! error after `acquire_timeout`. Must not live here: opening connections (`fill`), the
//! connection's return (`conn`), or any change to the engine.

use std::{sync::Arc, time::Duration};

use dbpool_probe::{ProbeOutcome, ProbeStage};
use dbpool_recovery::{BreakerMode, BreakerState};
use jiff::Timestamp;
use tokio::time::Instant;

use super::{Inner, Pool, PooledClient, Shared, conn::Conn, until};
use crate::error::{Cause, PoolError};

/// What `get()` decided under the lock.
enum Step {
    Fail(PoolError),
    Got(Conn, bool),
    Wait,
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
        }
    }
}

impl Pool {
    /// The body of [`Pool::get`], inside its span.
    pub(super) async fn checkout(&self) -> Result<PooledClient, PoolError> {
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
                    return Ok(PooledClient::new(conn, Arc::clone(inner)));
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
}

impl Inner {
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
}
