//! The supervisor task: probes when the engine says so, keeps the idle set, drives the ramp.
//!
//! Lives here: `supervise` (the task's loop: sleep until the engine's `next_deadline`, a ramp
//! step or a wake) and `Inner::probe` in its steps (start under the lock, check an idle
//! connection or connect, feed the result to the engine). It is the one place that connects
//! while the database fails: one attempt at a time. Must not live here: recovery rules
//! (`dbpool-recovery`), connecting for callers while healthy (`fill`), what wakes it (`conn`,
//! `follow`, `Pool`'s methods).

use std::{
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use dbpool_probe::{ProbeTarget, SessionError};
use dbpool_recovery::{BreakerState, Event, FailureKind, next_deadline};
use jiff::Timestamp;
use tokio::{sync::Notify, time::Instant};
use tracing::{Instrument, debug, info_span};

use super::{Inner, Shared, conn::Conn, until};
use crate::error::Cause;

/// The supervisor: probes when the engine says so, maintains idle connections, drives the ramp.
pub(super) async fn supervise(weak: Weak<Inner>, wake: Arc<Notify>) {
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

/// What a probe took under the lock when it started.
struct ProbeStart {
    seq: u64,
    target: ProbeTarget,
    /// The database was failing: the probe connects (a recovery attempt).
    failing: bool,
    /// While healthy: the idle connection the probe checks instead of connecting.
    idle: Option<Conn>,
    generation: u64,
}

enum ProbeResult {
    Checked(Conn),
    Opened(Result<dbpool_probe::Session, SessionError>),
}

impl Inner {
    /// One probe: a check of an idle connection while healthy, else a fresh connect (the only
    /// connect while the database fails). Feeds the engine.
    async fn probe(self: &Arc<Self>) {
        let ProbeStart {
            seq,
            target,
            failing,
            idle,
            generation,
        } = self.start_probe();
        let span = info_span!("dbpool_client.probe", pool = %self.name, seq, failing);
        let outcome = self.run_probe(idle, target).instrument(span).await;
        let mut s = self.lock();
        s.probe_in_flight = false;
        match outcome {
            ProbeResult::Checked(conn) => self.probe_checked(&mut s, conn, seq),
            ProbeResult::Opened(Ok(session)) => {
                self.probe_connected(&mut s, session, seq, failing, generation);
            }
            ProbeResult::Opened(Err(e)) => self.probe_failed(&mut s, &e, seq),
        }
        self.fill(&mut s);
        drop(s);
        self.changed.notify_waiters();
    }

    /// The probe's start, under the lock: tells the engine, and takes an idle connection to
    /// check (while healthy) or counts a connect.
    fn start_probe(&self) -> ProbeStart {
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
        ProbeStart {
            seq: s.engine.probe_seq,
            target: s.target.clone(),
            failing,
            idle,
            generation: s.generation,
        }
    }

    /// The probe's I/O, without the lock: checks `idle`, or (when there is none or the check
    /// fails) connects to `target`.
    async fn run_probe(self: &Arc<Self>, idle: Option<Conn>, target: ProbeTarget) -> ProbeResult {
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
        ProbeResult::Opened(self.connect(target).await)
    }

    /// An idle connection passed the probe's check: it goes back to the idle set.
    fn probe_checked(&self, s: &mut Shared, conn: Conn, seq: u64) {
        s.in_use = s.in_use.saturating_sub(1);
        self.event(
            s,
            Event::ProbeSucceeded {
                seq,
                degraded: false,
            },
        );
        s.idle.push_front(conn);
    }

    /// The probe connected: the engine hears of it, a recovery starts the ramp, and the
    /// connection is kept where callers may use it.
    fn probe_connected(
        self: &Arc<Self>,
        s: &mut Shared,
        session: dbpool_probe::Session,
        seq: u64,
        failing: bool,
        generation: u64,
    ) {
        s.connecting = s.connecting.saturating_sub(1);
        s.suspect = false;
        Self::note_attempt(s, None);
        let effects = self.event(
            s,
            Event::ProbeSucceeded {
                seq,
                degraded: false,
            },
        );
        if failing {
            // Capacity comes back as a ramp, after a loss as after an outage.
            s.ramp_started = Some(Instant::now());
            s.recovered_at = s.ramp_started;
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

    /// The probe's connect failed: the cause is kept and the engine hears of the failure.
    fn probe_failed(&self, s: &mut Shared, e: &SessionError, seq: u64) {
        s.connecting = s.connecting.saturating_sub(1);
        s.suspect = true;
        s.last_error = Some(Cause::from_session(e, Timestamp::now()));
        Self::note_attempt(s, Some((e.outcome, e.sql_state.as_deref())));
        let kind = e.outcome.failure_kind().unwrap_or(FailureKind::Outage);
        self.event(s, Event::ProbeFailed { seq, kind });
        if let Some(m) = &self.metrics {
            m.health_check_failure(&self.name);
        }
        debug!(pool = %self.name, error = %e, failures = s.engine.consecutive_failures, "probe failed");
    }
}
