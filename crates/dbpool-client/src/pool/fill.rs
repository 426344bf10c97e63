//! Filling the pool: opening connections while healthy, within the ramp's capacity.
//!
//! Lives here: `Inner::fill` (connections for waiters and `min_idle`, opened only while the
//! database is healthy), the end of such a connect (`fill_done`), the ramp's capacity (1, 2,
//! 4 ... connections after a recovery) and the upkeep of the idle set (`maintain`: expired and
//! surplus idle connections go). Must not live here: connecting while the
//! database fails (only the `supervisor` does), or what `get()` hands out (`checkout`).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use dbpool_probe::SessionError;
use dbpool_recovery::{Event, FailureKind};
use jiff::Timestamp;
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span};

use super::{Inner, Shared};
use crate::error::Cause;

impl Inner {
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
    pub(super) fn next_ramp_step(&self, s: &Shared) -> Option<Instant> {
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
    pub(super) fn fill(self: &Arc<Self>, s: &mut Shared) {
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
                    let result = me.connect(target).await;
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
                Self::note_attempt(&mut s, None);
                if !s.closed && generation == s.generation {
                    let conn = self.adopt(session, generation);
                    s.idle.push_back(conn);
                }
            }
            Err(e) => {
                debug!(pool = %self.name, error = %e, "connect failed");
                s.last_error = Some(Cause::from_session(&e, Timestamp::now()));
                s.suspect = true;
                Self::note_attempt(&mut s, Some((e.outcome, e.sql_state.as_deref())));
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

    /// Closes expired and surplus idle connections, fills `min_idle`, wakes waiters on a ramp
    /// step.
    pub(super) fn maintain(self: &Arc<Self>, s: &mut Shared) {
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
}
