//! The hooks the DbPool follower (`crate::dbpool`) calls on a running pool.
//!
//! Lives here: [`WeakPool`] (a handle that does not keep the pool alive), applying a changed
//! spec (`Pool::reconfigure`), and what the DbPool's breaker and force-reopen token do to the
//! pool (`Pool::observe_dbpool`: hints; local evidence wins), its `status.readiness` (the
//! readiness edge, handed to `readiness`) and whether its watch is live (`Pool::set_followed`:
//! the pool pings only while it is not). Must not live here: reading or
//! watching Kubernetes (`crate::dbpool`), or the engine's bookkeeping (`engine`).

use std::sync::{Arc, Weak};

use dbpool_probe::{AdaptiveTimeouts, ProbeTarget, Readiness};
use dbpool_recovery::{BreakerState, Event, Policy};
use jiff::Timestamp;
use tracing::info;

use super::{Inner, Pool, Shared};
use crate::error::Cause;

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

    /// Applies a new configuration while running (from a changed DbPool spec): a changed target
    /// purges every connection and forgets the learned timeouts; the engine sees `SpecChanged`;
    /// the sizes and the adaptive-timeout switch apply to the next connect.
    pub(crate) fn reconfigure(
        &self,
        target: ProbeTarget,
        policy: Policy,
        (max_size, min_idle): (usize, usize),
        adaptive_timeout: bool,
    ) {
        let mut s = self.inner.lock();
        let target_changed = !same_target(&s.target, &target);
        s.target = target;
        s.target.timeout = policy.timeout;
        s.policy = policy;
        s.options.max_size = max_size.max(1);
        s.options.min_idle = min_idle.min(s.options.max_size);
        s.options.adaptive_timeout = adaptive_timeout;
        self.inner.event(&mut s, Event::SpecChanged);
        if target_changed {
            // What was learned about the old server says nothing about the new one.
            *self.inner.learned() = AdaptiveTimeouts::new();
            self.inner.purge(&mut s, "DbPool target changed");
            Inner::request_probe(&mut s);
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
        readiness: Option<(Readiness, Timestamp)>,
    ) {
        let inner = &self.inner;
        let mut s = inner.lock();
        s.ready.followed = true;
        inner.observe_readiness(&mut s, readiness);
        let before = s.hint_breaker.replace(breaker.unwrap_or_default());
        let now_state = breaker.unwrap_or_default();
        let mut wake = false;
        if now_state == BreakerState::Open && before != Some(BreakerState::Open) {
            inner.open_for_dbpool(&mut s);
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

impl Inner {
    /// The DbPool's `status.readiness` (state, since) as just observed: a new Accepting is the
    /// readiness edge (the engine may grant an early trial); StartingUp after the server was
    /// seen down makes callers wait (`limbo`).
    fn observe_readiness(&self, s: &mut Shared, readiness: Option<(Readiness, Timestamp)>) {
        let Some(now) = readiness else { return };
        if s.ready.dbpool_seen == Some(now) {
            return;
        }
        s.ready.dbpool_seen = Some(now);
        if now.0 == Readiness::Accepting {
            info!(pool = %self.name, since = %now.1, "DbPool readiness: the server accepts connections");
        }
        self.on_readiness(s, now.0);
    }
}

impl Pool {
    /// Whether the DbPool watch is live: while it is, the pool pings nothing itself.
    pub(crate) fn set_followed(&self, live: bool) {
        let mut s = self.inner.lock();
        if s.ready.followed != live {
            info!(pool = %self.inner.name, live, "DbPool watch: readiness from its status, or own pings while it is down");
        }
        s.ready.followed = live;
    }
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
