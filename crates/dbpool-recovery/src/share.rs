//! Sharing probe results among pools with equivalent probes while their target is healthy.
//!
//! Lives here: [`share_decision`] (whether a due pool probes, takes the latest result of its
//! probe stream, or joins the probe in flight), [`freshness`] (how much older than the pool's
//! deadline a result may be) and the view of a stream it decides on ([`StreamView`]). Pure: time
//! is passed in. Must not live here: which pools share a stream (the caller keys streams by
//! target and credentials), or what a result means for one pool (its own [`apply`](crate::apply)).
//!
//! **The rule.** A pool due at its deadline `d` (asking at `now`):
//! 1. when a probe was requested (force reopen, lost connection, new Secret), or an early trial
//!    granted (the target was seen accepting connections again), takes only what the stream saw
//!    since the request or the readiness edge (`d` is then that instant): a result that finished
//!    since, or a probe in flight that started since; otherwise probes itself (so every owner of
//!    a connection that died shares one new attempt, not one each, and the pools of one
//!    credential key share one credentialed trial per edge);
//! 2. takes the stream's latest result if it finished at `r` with `d − tolerance ≤ r ≤ now`,
//!    where the tolerance is [`freshness`] for a steady pool (Closed, no failures, no cooldown)
//!    and zero otherwise: a half-open trial or a retry never takes a result older than its own
//!    deadline;
//! 3. joins the probe in flight if one started at most `in_flight_bound` ago (its result will
//!    finish after `now ≥ d`, so it satisfies the deadline);
//! 4. otherwise probes itself (and becomes the stream's probe in flight).
//!
//! The pool records `r` as its own last probe, so its next deadline is `r + interval`. That
//! alone aligns only owners whose deadlines already lie within the tolerance of each other, so
//! a steady pool also plans its next probe on the stream's **grid** ([`aligned_deadline`]):
//! the last instant `anchor + k × interval` (the anchor is the stream's first result) that is
//! after its last probe and not after its own deadline. That is never later than the pool asked
//! for, at most one interval earlier once, and from then on every owner with the same interval
//! is due at the same grid points: one probe per interval serves them all, the others join it
//! or take its result.

use std::time::Duration;

use jiff::Timestamp;

use crate::{BreakerState, Policy, PoolState, add};

/// The largest freshness tolerance, whatever the interval.
pub const MAX_FRESHNESS: Duration = Duration::from_secs(1);

/// What a due pool does about its probe stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShareDecision {
    /// Probe for real (and be the stream's probe in flight).
    Probe,
    /// Take the stream's latest result.
    Take,
    /// Wait for the probe in flight and decide again with its result.
    Join,
}

/// What a probe stream knows, as far as it fits the asking pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamView {
    /// When its latest result that fits the pool finished.
    pub latest: Option<Timestamp>,
    /// When its probe in flight (if any) started.
    pub in_flight_since: Option<Timestamp>,
}

/// How much older than a steady pool's deadline a shared result may be: a tenth of its interval,
/// at most [`MAX_FRESHNESS`].
pub fn freshness(policy: &Policy) -> Duration {
    (policy.interval / 10).min(MAX_FRESHNESS)
}

/// The stream's grid point a steady pool plans its next probe at: the last `anchor + k ×
/// interval` (k ≥ 0) after `last_probe` and at or before `deadline` (the engine's `last_probe +
/// interval`). `None` when there is none (the anchor lies after the deadline).
pub fn aligned_deadline(
    anchor: Timestamp,
    interval: Duration,
    last_probe: Timestamp,
    deadline: Timestamp,
) -> Option<Timestamp> {
    let step = i128::try_from(interval.as_micros())
        .ok()
        .filter(|s| *s > 0)?;
    let since = i128::from(deadline.as_microsecond()) - i128::from(anchor.as_microsecond());
    if since < 0 {
        return None;
    }
    let back = i64::try_from(since % step).ok()?;
    let point = deadline
        .checked_sub(jiff::SignedDuration::from_micros(back))
        .ok()?;
    (point > last_probe).then_some(point)
}

/// How far after its stream's grid point a steady pool plans its next probe: a stable share of
/// half the [`freshness`] tolerance, from the pool's seed. Spread so, the owners of one stream do
/// not all reconcile in the same millisecond (10,000 pools on four streams made the probing pool
/// wait behind 2,500 reconciles); the earliest owner probes and the others, due within the
/// tolerance, take its result or join it.
pub fn grid_offset(seed: u64, policy: &Policy) -> Duration {
    let span = u64::try_from((freshness(policy) / 2).as_micros()).unwrap_or(0);
    if span == 0 {
        return Duration::ZERO;
    }
    // Seeds of neighbouring pools differ in few bits: mix them before taking the share.
    let mixed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
    Duration::from_micros(mixed % span)
}

/// Whether the pool is steady: breaker Closed, no failures counted, no cooldown.
pub fn is_steady(state: &PoolState) -> bool {
    state.breaker == BreakerState::Closed
        && state.consecutive_failures == 0
        && state.cooldown_until.is_none()
}

/// What a pool in `state` under `policy`, due at `due`, does at `now` about a stream that knows
/// `view`; a probe in flight for longer than `in_flight_bound` is not waited for. See the module
/// docs for the rule.
pub fn share_decision(
    state: &PoolState,
    policy: &Policy,
    due: Timestamp,
    view: &StreamView,
    now: Timestamp,
    in_flight_bound: Duration,
) -> ShareDecision {
    if state.probe_requested || state.trial_requested {
        // Only what the stream sees from the request or the edge on (`due` is that instant): a
        // probe in flight that started since, or a result that finished since; never older.
        if view
            .latest
            .is_some_and(|finished| finished >= due && finished <= now)
        {
            return ShareDecision::Take;
        }
        if view
            .in_flight_since
            .is_some_and(|since| since >= due && add(since, in_flight_bound) > now)
        {
            return ShareDecision::Join;
        }
        return ShareDecision::Probe;
    }
    let tolerance = if is_steady(state) {
        freshness(policy)
    } else {
        Duration::ZERO
    };
    let fresh_enough = |finished: Timestamp| {
        add(finished, tolerance) >= due
            && finished <= now
            && state.last_probe_at.is_none_or(|last| finished > last)
    };
    if view.latest.is_some_and(fresh_enough) {
        return ShareDecision::Take;
    }
    if view
        .in_flight_since
        .is_some_and(|since| add(since, in_flight_bound) > now)
    {
        return ShareDecision::Join;
    }
    ShareDecision::Probe
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BreakerMode, Event, FailureKind, apply, next_deadline};

    fn policy() -> Policy {
        Policy {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            initial_delay: Duration::from_millis(200),
            multiplier: 2.0,
            max_delay: Duration::from_secs(5),
            max_attempts: 10,
            cooldown: Duration::from_secs(10),
            jitter: 0.0,
            failure_threshold: 2,
            open_timeout: Duration::from_secs(3),
            success_threshold: 1,
            mode: BreakerMode::Auto,
            early_trial: true,
        }
        .clamped()
    }

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_millisecond(1_700_000_000_000 + ms).expect("valid")
    }

    const BOUND: Duration = Duration::from_secs(2);

    /// A pool of `policy()` failing on schedule until `at`, then granted an early trial there.
    fn granted_a_trial(at: i64) -> PoolState {
        let p = policy();
        let mut s = PoolState::new(1);
        for when in [0, 200] {
            s = apply(&s, Event::ProbeStarted, t(when), &p).0;
            let seq = s.probe_seq;
            let kind = FailureKind::Outage;
            s = apply(&s, Event::ProbeFailed { seq, kind }, t(when), &p).0;
        }
        let (s, fx) = apply(&s, Event::ReadinessAccepting, t(at), &p);
        assert!(fx.contains(&crate::Effect::EarlyTrialGranted), "{fx:?}");
        s
    }

    #[test]
    fn an_early_trial_takes_nothing_from_before_the_edge() {
        let (state, p) = (granted_a_trial(500), policy());
        let decide = |seen| share_decision(&state, &p, t(500), &seen, t(600), BOUND);
        // A probe in flight since before the edge, or a result from before it, is the server
        // before it accepted: the trial probes.
        assert_eq!(decide(view(None, Some(450))), ShareDecision::Probe);
        assert_eq!(decide(view(Some(450), None)), ShareDecision::Probe);
        assert_eq!(decide(view(None, Some(520))), ShareDecision::Join);
        assert_eq!(decide(view(Some(580), None)), ShareDecision::Take);
    }

    proptest::proptest! {
        /// The pools of one credential key (one stream) granted an early trial by one edge, each
        /// asking at its own instant after the edge, the trial lasting up to the timeout: one
        /// probes, the others join its trial or take its result.
        #[test]
        fn one_credentialed_trial_per_credential_key_per_edge(
            asks in proptest::collection::vec(0i64..3_000, 1..40),
            length in 1i64..=1_000,
        ) {
            let edge = 500;
            let state = granted_a_trial(edge);
            let mut asks = asks;
            asks.sort_unstable();
            let (mut in_flight, mut latest, mut probes) = (None::<i64>, None::<i64>, 0);
            for ask in asks {
                let now = edge + ask;
                // The trial in flight ends `length` after it started.
                if let Some(start) = in_flight.filter(|s| s + length <= now) {
                    latest = Some(start + length);
                    in_flight = None;
                }
                let seen = view(latest, in_flight);
                match share_decision(&state, &policy(), t(edge), &seen, t(now), BOUND) {
                    ShareDecision::Probe => {
                        probes += 1;
                        in_flight = Some(now);
                    }
                    ShareDecision::Join | ShareDecision::Take => {
                        proptest::prop_assert!(in_flight.is_some() || latest.is_some());
                    }
                }
            }
            proptest::prop_assert_eq!(probes, 1);
        }
    }

    /// A healthy pool last probed at `at`.
    fn healthy(at: i64) -> PoolState {
        let p = policy();
        let (s, _) = apply(&PoolState::new(1), Event::ProbeStarted, t(at), &p);
        let seq = s.probe_seq;
        apply(
            &s,
            Event::ProbeSucceeded {
                seq,
                degraded: false,
            },
            t(at),
            &p,
        )
        .0
    }

    fn view(latest: Option<i64>, in_flight: Option<i64>) -> StreamView {
        StreamView {
            latest: latest.map(t),
            in_flight_since: in_flight.map(t),
        }
    }

    #[test]
    fn the_tolerance_is_a_tenth_of_the_interval_at_most_a_second() {
        assert_eq!(freshness(&policy()), Duration::from_millis(200));
        let mut long = policy();
        long.interval = Duration::from_secs(30);
        assert_eq!(freshness(&long), MAX_FRESHNESS);
    }

    #[test]
    fn a_steady_pool_takes_a_fresh_result_and_joins_one_in_flight() {
        let p = policy();
        let s = healthy(0);
        let due = next_deadline(&s, &p).expect("probed");
        assert_eq!(due, t(2000));
        // Finished 150 ms before the deadline: within a tenth of the interval.
        let d = share_decision(&s, &p, due, &view(Some(1850), None), t(2000), BOUND);
        assert_eq!(d, ShareDecision::Take);
        // 250 ms before: too old; nothing in flight, so probe.
        let d = share_decision(&s, &p, due, &view(Some(1750), None), t(2000), BOUND);
        assert_eq!(d, ShareDecision::Probe);
        // Too old, but a probe is in flight since 1990: wait for it.
        let d = share_decision(&s, &p, due, &view(Some(1750), Some(1990)), t(2000), BOUND);
        assert_eq!(d, ShareDecision::Join);
        // One in flight for longer than the bound is not waited for.
        let d = share_decision(&s, &p, due, &view(None, Some(-10)), t(2000), BOUND);
        assert_eq!(d, ShareDecision::Probe);
        // A result taken already (the pool's own last probe) is not taken again.
        let d = share_decision(&s, &p, t(0), &view(Some(0), None), t(5), BOUND);
        assert_eq!(d, ShareDecision::Probe);
    }

    #[test]
    fn steady_pools_plan_on_the_streams_grid() {
        let second = Duration::from_secs(1);
        // Anchor 0, interval 1 s; last probe at 10.3 s, own deadline 11.3 s: the grid point 11 s.
        assert_eq!(
            aligned_deadline(t(0), second, t(10_300), t(11_300)),
            Some(t(11_000))
        );
        // On the grid already (last probe 4 ms after a grid point): the next grid point.
        assert_eq!(
            aligned_deadline(t(0), second, t(11_004), t(12_004)),
            Some(t(12_000))
        );
        // Never later than the pool's own deadline, never at or before its last probe.
        assert_eq!(
            aligned_deadline(t(0), second, t(12_000), t(13_000)),
            Some(t(13_000))
        );
        assert_eq!(aligned_deadline(t(5_000), second, t(1_000), t(2_000)), None);
        // Another interval has its own grid from the same anchor.
        assert_eq!(
            aligned_deadline(t(0), Duration::from_secs(3), t(10_000), t(13_000)),
            Some(t(12_000))
        );
    }

    #[test]
    fn grid_offsets_spread_within_half_the_tolerance() {
        let p = policy();
        let half = freshness(&p) / 2;
        let offsets: Vec<Duration> = (0..1000u64).map(|seed| grid_offset(seed, &p)).collect();
        assert!(offsets.iter().all(|o| *o < half));
        let distinct: std::collections::HashSet<_> = offsets.iter().collect();
        assert!(distinct.len() > 900, "{} distinct offsets", distinct.len());
        assert_eq!(grid_offset(7, &p), grid_offset(7, &p));
    }

    #[test]
    fn a_requested_probe_takes_only_what_the_stream_saw_since_the_request() {
        let p = policy();
        let mut s = healthy(0);
        s.probe_requested = true;
        // Requested at 2000 (`due`): a result from before the request is not enough, even
        // within the steady tolerance ...
        let older = share_decision(&s, &p, t(2000), &view(Some(1999), None), t(2002), BOUND);
        assert_eq!(older, ShareDecision::Probe);
        // ... nor a probe in flight since before it ...
        let before = share_decision(&s, &p, t(2000), &view(None, Some(1999)), t(2002), BOUND);
        assert_eq!(before, ShareDecision::Probe);
        // ... but a probe that started since is joined, and a result that finished since taken.
        let since = share_decision(&s, &p, t(2000), &view(None, Some(2001)), t(2002), BOUND);
        assert_eq!(since, ShareDecision::Join);
        let finished = share_decision(&s, &p, t(2000), &view(Some(2001), None), t(2002), BOUND);
        assert_eq!(finished, ShareDecision::Take);
    }

    #[test]
    fn a_failing_or_half_open_pool_takes_nothing_older_than_its_deadline() {
        let p = policy();
        let mut s = healthy(0);
        for at in [2000, 2200] {
            s = apply(&s, Event::ProbeStarted, t(at), &p).0;
            let seq = s.probe_seq;
            let failed = Event::ProbeFailed {
                seq,
                kind: FailureKind::Outage,
            };
            s = apply(&s, failed, t(at), &p).0;
        }
        assert_eq!(s.breaker, BreakerState::Open);
        // The trial is due at 2200 + open timeout 3 s.
        let due = next_deadline(&s, &p).expect("probed");
        assert_eq!(due, t(5200));
        let d = share_decision(&s, &p, due, &view(Some(5190), None), t(5200), BOUND);
        assert_eq!(
            d,
            ShareDecision::Probe,
            "10 ms older than the trial's deadline"
        );
        let d = share_decision(&s, &p, due, &view(Some(5200), None), t(5210), BOUND);
        assert_eq!(d, ShareDecision::Take);
        let d = share_decision(&s, &p, due, &view(Some(5190), Some(5195)), t(5200), BOUND);
        assert_eq!(
            d,
            ShareDecision::Join,
            "the probe in flight ends after the deadline"
        );
    }
}
