//! Readiness: what the pool learns, besides its own connects, about whether the server accepts
//! connections again, and the early trial it brings (the engine's `Event::ReadinessAccepting`,
//! the same input as the operator's).
//!
//! Lives here: `ReadyState` (the pool's readiness evidence), what an answer does to the pool
//! (`Inner::on_readiness`), the evidence for the limbo rule (`Inner::evidence`), the standalone
//! pings (`Inner::maybe_ping`: when, and the task that pings) and the process-wide limiter of
//! pings per target (`PingLimiter`, one per `host:port`). Must not live here: the ping itself
//! (`dbpool-probe`'s `ping`: TCP, the probe's TLS rules, a StartupMessage without a password),
//! the early-trial rule (`dbpool-recovery`), the limbo rule (`limbo`), reading the DbPool
//! (`crate::dbpool`; `follow` passes its `status.readiness` here).
//!
//! When the pool pings (standalone, or while its DbPool watch is down):
//! - only while its last evidence is an outage-class failure (refused, reset, closed, timed out
//!   without a SQLSTATE, or 57P03) and it is Recovering, CoolingDown, or Open (not HalfOpen:
//!   that trial is under way); never while healthy, never after a configuration failure, never
//!   when early trials are off or the mode is ForcedOpen; a configuration answer (pg_hba,
//!   certificate, no TLS under require) stops the pings until the next credentialed failure;
//! - only when a caller asks for a connection (`get()`), so an idle process pings nothing and
//!   a returning caller's ping is not held back by pings nobody needed;
//! - at most one ping per `PoolOptions::readiness_ping` (1 s) per target (`host:port`) per
//!   process, each gap stretched by up to 10 % at random (`PING_JITTER`) so a fleet spreads
//!   out. A fleet of N processes sends at most N pings/s to a server that is down. Pools of one
//!   process on one target share the answers that are about the server alone (accepting,
//!   starting up, unreachable).
//!
//! With a DbPool whose watch is live the pool pings nothing: the operator's pings reach it as
//! `status.readiness`, and its move to Accepting is the edge.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use dbpool_probe::{PingTarget, ProbeOutcome, Readiness, ping};
use dbpool_recovery::{BreakerMode, BreakerState, Effect, Event, Phase, phase};
use jiff::Timestamp;
use tokio::time::Instant;
use tracing::debug;

use super::{Inner, Shared, limbo::Evidence};

/// Each gap between two pings of a target is `period × (1 + PING_JITTER × u)`, u in [0, 1).
pub(super) const PING_JITTER: f64 = 0.1;

/// The most targets the process-wide limiter remembers (older entries are dropped).
const MAX_TARGETS: usize = 256;

/// The pool's readiness evidence.
#[derive(Debug, Default)]
pub(super) struct ReadyState {
    /// The DbPool watch is live: readiness comes from the DbPool's status, no pings.
    pub followed: bool,
    /// This pool's ping in flight, started then.
    pub ping_since: Option<Instant>,
    /// Do not ask the limiter again before this.
    pub not_before: Option<Instant>,
    /// When the last evidence (an answer or a credentialed result) came.
    pub evidence_at: Option<Instant>,
    /// The server was seen down (refused, unreachable) since the last success.
    pub seen_down: bool,
    /// After being seen down, the server said it is starting.
    pub starting: bool,
    /// A configuration answer since the last credentialed failure: no pings.
    pub config_answer: bool,
    /// The DbPool's `status.readiness` as last seen (state and since).
    pub dbpool_seen: Option<(Readiness, Timestamp)>,
    /// Pings started by this pool.
    pub pings: u64,
}

/// At most one ping per `period` (stretched by up to [`PING_JITTER`]), clock passed in.
#[derive(Clone, Debug)]
pub(crate) struct PingLimiter {
    next_allowed: Option<Instant>,
    seed: u64,
    count: u64,
}

impl PingLimiter {
    /// A limiter whose jitter is drawn from `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            next_allowed: None,
            seed,
            count: 0,
        }
    }

    /// Whether a ping may start at `now`; if so, the next may start `period` to
    /// `period × (1 + PING_JITTER)` later.
    pub(crate) fn try_start(&mut self, now: Instant, period: Duration) -> bool {
        if self.next_allowed.is_some_and(|t| now < t) {
            return false;
        }
        let u = unit(self.seed, self.count);
        self.count = self.count.wrapping_add(1);
        self.next_allowed = Some(now + period.mul_f64(1.0 + PING_JITTER * u));
        true
    }

    /// When the next ping may start (None: now).
    pub(crate) fn next_allowed(&self) -> Option<Instant> {
        self.next_allowed
    }
}

/// A number in [0, 1) from `(seed, n)` (splitmix64).
fn unit(seed: u64, n: u64) -> f64 {
    let mut z = seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// One target's pings in this process.
struct TargetPings {
    limiter: PingLimiter,
    /// The last answer about the server alone, and when it came.
    last: Option<(Readiness, Instant)>,
    used: Instant,
}

/// Per `host:port`: the process-wide limiter and the last shareable answer.
static TARGETS: Mutex<BTreeMap<String, TargetPings>> = Mutex::new(BTreeMap::new());

/// What a pool that wants to ping may do.
#[derive(Debug, PartialEq)]
enum Slot {
    /// Ping now.
    Start,
    /// Another pool of this process pinged the target since `since`: take its answer.
    Shared(Readiness),
    /// Ask again then.
    Later(Instant),
}

fn slot(key: &str, now: Instant, period: Duration, since: Option<Instant>, seed: u64) -> Slot {
    let mut targets = TARGETS.lock().unwrap_or_else(PoisonError::into_inner);
    if !targets.contains_key(key) && targets.len() >= MAX_TARGETS {
        // Bounded: forget the least recently used target.
        if let Some(oldest) = targets
            .iter()
            .min_by_key(|(_, t)| t.used)
            .map(|(k, _)| k.clone())
        {
            targets.remove(&oldest);
        }
    }
    let entry = targets
        .entry(key.to_owned())
        .or_insert_with(|| TargetPings {
            limiter: PingLimiter::new(seed),
            last: None,
            used: now,
        });
    entry.used = now;
    if let Some((answer, at)) = entry.last
        && since.is_some_and(|since| at > since)
    {
        return Slot::Shared(answer);
    }
    if entry.limiter.try_start(now, period) {
        Slot::Start
    } else {
        Slot::Later(entry.limiter.next_allowed().unwrap_or(now))
    }
}

/// Records `answer` for every pool of this process on `key`, when it is about the server alone.
fn share(key: &str, answer: Readiness, at: Instant) {
    if !answer.is_shareable() {
        return;
    }
    let mut targets = TARGETS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(entry) = targets.get_mut(key) {
        entry.last = Some((answer, at));
    }
}

fn key_of(s: &Shared) -> String {
    format!("{}:{}", s.target.host, s.target.port)
}

impl Inner {
    /// Whether this pool pings now (module docs).
    fn awaits_readiness(s: &Shared) -> bool {
        let outage_class = s.suspect
            && s.last_error.as_ref().is_some_and(|c| {
                c.outcome == ProbeOutcome::TransientFailure
                    && c.sql_state.as_deref().is_none_or(|code| code == "57P03")
            });
        let waiting = matches!(
            phase(&s.engine),
            Phase::Recovering | Phase::BreakerOpen | Phase::CoolingDown
        ) && s.engine.breaker != BreakerState::HalfOpen;
        outage_class
            && waiting
            && !s.ready.followed
            && !s.ready.config_answer
            && s.options.readiness_ping.is_some()
            && s.policy.early_trial
            && s.policy.mode != BreakerMode::ForcedOpen
    }

    /// A caller wants a connection the pool cannot give: ping if the rules allow (module docs).
    pub(super) fn maybe_ping(self: &Arc<Self>, s: &mut Shared) {
        if s.ready.ping_since.is_some() || !Self::awaits_readiness(s) {
            return;
        }
        let now = Instant::now();
        if s.ready.not_before.is_some_and(|t| now < t) {
            return;
        }
        let Some(period) = s.options.readiness_ping else {
            return;
        };
        let key = key_of(s);
        match slot(&key, now, period, s.ready.evidence_at, s.engine.seed) {
            Slot::Later(t) => s.ready.not_before = Some(t),
            Slot::Shared(answer) => self.on_readiness(s, answer),
            Slot::Start => {
                s.ready.ping_since = Some(now);
                s.ready.pings += 1;
                let target = PingTarget::from(&s.target);
                let weak = Arc::downgrade(self);
                tokio::spawn(async move {
                    let report = ping(&target).await;
                    share(&key, report.readiness, Instant::now());
                    if let Some(inner) = weak.upgrade() {
                        inner.ping_done(report.readiness, &report.message);
                    }
                });
            }
        }
    }

    fn ping_done(&self, answer: Readiness, message: &str) {
        let mut s = self.lock();
        s.ready.ping_since = None;
        debug!(pool = %self.name, ?answer, message, "readiness ping");
        if Self::healthy(&s) || s.closed {
            // Answered after a success: old news.
            return;
        }
        self.on_readiness(&mut s, answer);
        drop(s);
        self.changed.notify_waiters();
    }

    /// What a readiness answer (a ping's, another pool's, or the DbPool's) does: Accepting is the
    /// edge (an early trial, when the engine grants one); starting up after being down makes
    /// callers wait; a configuration answer stops the pings.
    pub(super) fn on_readiness(&self, s: &mut Shared, answer: Readiness) {
        s.ready.evidence_at = Some(Instant::now());
        match answer {
            Readiness::Accepting => {
                s.ready.starting = false;
                let effects = self.event(s, Event::ReadinessAccepting);
                if effects.contains(&Effect::EarlyTrialGranted) {
                    debug!(pool = %self.name, "the server accepts connections: early trial");
                    self.wake.notify_one();
                }
            }
            Readiness::StartingUp => s.ready.starting = s.ready.seen_down,
            Readiness::Unreachable => {
                s.ready.seen_down = true;
                s.ready.starting = false;
            }
            Readiness::ConfigAnswer => {
                s.ready.config_answer = true;
                s.ready.starting = false;
            }
            Readiness::Rejected | Readiness::NotPostgres => s.ready.starting = false,
        }
    }

    /// A credentialed attempt's result: a success forgets the readiness evidence; a failure is
    /// new evidence (57P03 after being down is "starting"; an outage without SQLSTATE is "down";
    /// pings may resume after a configuration answer).
    pub(super) fn note_attempt(s: &mut Shared, failure: Option<(ProbeOutcome, Option<&str>)>) {
        let now = Instant::now();
        match failure {
            None => {
                let followed = s.ready.followed;
                let dbpool_seen = s.ready.dbpool_seen;
                let pings = s.ready.pings;
                s.ready = ReadyState {
                    followed,
                    dbpool_seen,
                    pings,
                    ..ReadyState::default()
                };
            }
            Some((outcome, sql_state)) => {
                s.ready.evidence_at = Some(now);
                s.ready.config_answer = false;
                if outcome == ProbeOutcome::TransientFailure {
                    if sql_state == Some("57P03") {
                        s.ready.starting = s.ready.seen_down;
                    } else if sql_state.is_none() {
                        s.ready.seen_down = true;
                        s.ready.starting = false;
                    }
                }
            }
        }
    }

    /// The evidence for the limbo rule: an attempt in flight or due, a starting server, a ping.
    pub(super) fn evidence(&self, s: &Shared) -> Evidence {
        let attempt = s.probe_in_flight
            || s.connecting > 0
            || self
                .next_attempt(s)
                .is_none_or(|due| due <= Timestamp::now());
        Evidence {
            attempt,
            starting: s.ready.starting,
            ping_since: s.ready.ping_since,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_allows_one_ping_per_period_with_up_to_ten_percent_jitter() {
        let period = Duration::from_secs(1);
        let start = Instant::now();
        let mut limiter = PingLimiter::new(42);
        let mut started = Vec::new();
        // A caller every millisecond for 60 s.
        for ms in 0..60_000u64 {
            let now = start + Duration::from_millis(ms);
            if limiter.try_start(now, period) {
                started.push(now);
            }
        }
        assert!(started.len() <= 60, "{} pings in 60 s", started.len());
        assert!(started.len() >= 54, "{} pings in 60 s", started.len());
        let gaps: Vec<Duration> = started.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|g| *g >= period), "{gaps:?}");
        assert!(
            gaps.iter()
                .all(|g| *g <= period.mul_f64(1.0 + PING_JITTER) + Duration::from_millis(1)),
            "{gaps:?}"
        );
        // Jitter: the gaps differ.
        assert!(gaps.iter().any(|g| *g != gaps[0]), "{gaps:?}");
    }

    #[test]
    fn a_refused_limiter_says_when_to_ask_again() {
        let period = Duration::from_secs(1);
        let start = Instant::now();
        let mut limiter = PingLimiter::new(7);
        assert_eq!(limiter.next_allowed(), None);
        assert!(limiter.try_start(start, period));
        let next = limiter.next_allowed().unwrap_or(start);
        assert!(next >= start + period);
        assert!(!limiter.try_start(next - Duration::from_millis(1), period));
        assert!(limiter.try_start(next, period));
    }

    #[test]
    fn pools_of_one_process_share_a_target_limiter_and_its_answers() {
        let period = Duration::from_secs(1);
        let key = "shared.test.invalid:5432";
        let t0 = Instant::now();
        assert_eq!(slot(key, t0, period, None, 1), Slot::Start);
        // A second pool on the same target is held back.
        assert!(matches!(slot(key, t0, period, None, 2), Slot::Later(_)));
        // The answer about the server is shared with pools whose evidence is older (a pool
        // without evidence does not ping at all).
        share(key, Readiness::Accepting, t0 + Duration::from_millis(5));
        assert_eq!(
            slot(key, t0 + Duration::from_millis(6), period, Some(t0), 2),
            Slot::Shared(Readiness::Accepting)
        );
        // Not with one that knows better since.
        assert!(matches!(
            slot(
                key,
                t0 + Duration::from_millis(7),
                period,
                Some(t0 + Duration::from_millis(6)),
                2
            ),
            Slot::Later(_)
        ));
        // A configuration answer is never shared.
        share(key, Readiness::ConfigAnswer, t0 + Duration::from_millis(8));
        assert!(matches!(
            slot(
                key,
                t0 + Duration::from_millis(9),
                period,
                Some(t0 + Duration::from_millis(6)),
                2
            ),
            Slot::Later(_)
        ));
    }
}
