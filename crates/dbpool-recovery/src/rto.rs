//! The adaptive timeout of one kind of wait (one probe stage of one target): RFC 6298's
//! retransmission-timeout estimator, clamped.
//!
//! Lives here: [`RtoEstimator`] (SRTT, RTTVAR, the backoff count) and its constants
//! ([`RTO_FLOOR`], [`RTO_GRANULARITY`], [`MAX_BACKOFF_DOUBLINGS`], [`BACKOFF_CAP_FACTOR`]).
//! Must not live here: which
//! waits are measured or where the timeout is applied (the probe and its callers), I/O, or
//! reading the clock: the caller measures each round trip and passes the [`Duration`] in, so
//! every rule is testable by replaying samples.
//!
//! # Rules
//!
//! - **Before the first sample** the timeout is the ceiling (the spec's `healthCheck.timeout`):
//!   nothing is known, so nothing is shortened.
//! - **First sample** `R`: `SRTT = R`, `RTTVAR = R / 2` (RFC 6298 2.2).
//! - **Later samples** `R`: `RTTVAR = 3/4 · RTTVAR + 1/4 · |SRTT − R|`, then
//!   `SRTT = 7/8 · SRTT + 1/8 · R` (RFC 6298 2.3). A sample ends the backoff (RFC 6298 5.7).
//! - **Base timeout** `SRTT + max(G, 4 · RTTVAR)` with `G` = [`RTO_GRANULARITY`] (RFC 6298's
//!   clock granularity, here a minimum headroom over the smoothed latency).
//! - **Timeout**: the base raised to the floor (the *un-backed-off* timeout `U`), doubled once
//!   per timeout since the last sample (RFC 6298 5.5), but **at most [`BACKOFF_CAP_FACTOR`]
//!   (3) × `U`**, then clamped to `[floor, ceiling]` where `floor = min(RTO_FLOOR, ceiling)`:
//!   never below the floor, never above the spec's timeout. So a server at the floor gets
//!   250 ms, 500 ms, 750 ms, 750 ms, … after timeouts in a row; one whose `U` is 1 s gets 1 s,
//!   2 s, 3 s, 3 s, …
//!
//! The floor, 250 ms, is RFC 6298's 1 s minimum scaled to a probe: it is above any healthy
//! round trip inside a cluster or region by a wide margin (Linux's own minimum RTO is 200 ms),
//! and a black hole costs at most 250 ms on the first attempt instead of the spec's 5 s.
//!
//! # Why the backoff is capped (issue 28)
//!
//! Two promises pull apart. (a) Every attempt against a black hole at a server whose waits
//! normally take a few milliseconds ends within 1 s; RFC 6298's unbounded doubling gave the
//! fourth and fifth attempts 2 s and 4 s. (b) A sudden step in latency costs at most
//! `failureThreshold − 1` timeouts in a row. The estimator learns only from waits that
//! complete, so a step is absorbed only once the backed-off timeout exceeds the new latency;
//! unbounded doubling absorbs any step under the ceiling, given enough attempts, and a bounded
//! one cannot. The rule above settles it:
//!
//! - **A target at the floor** (`U` = 250 ms: the base `SRTT + max(G, 4 · RTTVAR)` is at most
//!   250 ms, as for any history of waits of up to 30 ms, or a server answering in a few
//!   milliseconds) is never waited on more than 750 ms per wait, so an attempt that meets a
//!   black hole (one unanswered wait after the few milliseconds of the waits before it) ends
//!   within 1 s with room for the timer's lateness and a busy scheduler.
//! - **A sudden step** to a wait that takes less than `3 × U` (under the ceiling) is absorbed
//!   within **two** timeouts in a row (`U`, `2U`, then `3U` covers it), within
//!   `failureThreshold − 1` for any `failureThreshold ≥ 3` (the default is 5). From the floor
//!   that is a step of any wait up to 750 ms; from a `U` of 1 s, up to 3 s. (For the probe
//!   the bound is tighter: a query that times out costs its connection, and the next login is
//!   three round trips under the login's own learned timeout; docs/design.md, "The backoff
//!   cap".)
//! - **A larger sudden step** (from the floor, a wait that now takes more than 750 ms) is
//!   indistinguishable from a black hole within the time a black hole may cost: every attempt
//!   times out, and the breaker opens after `failureThreshold` of them. Latency that grows
//!   gradually (each sample within what the estimator allows) is followed up to the ceiling.
//!   Pools that must ride out such steps set `healthCheck.adaptiveTimeout: false`: the fixed
//!   `healthCheck.timeout` again, for every wait.
//! - **Why 3**: 3 × the floor is the most that keeps a quarter of a second of margin under 1 s;
//!   with 4 a target at the floor would get 1 s waits, and an attempt (those waits, the waits
//!   before them and the timer's lateness) would exceed 1 s. It still leaves two doublings.

use std::time::Duration;

/// The smallest timeout the estimator ever gives (unless the ceiling is smaller).
pub const RTO_FLOOR: Duration = Duration::from_millis(250);

/// The minimum headroom above the smoothed latency (RFC 6298's `G`).
pub const RTO_GRANULARITY: Duration = Duration::from_millis(50);

/// The most doublings counted after timeouts in a row (the cap binds long before).
pub const MAX_BACKOFF_DOUBLINGS: u32 = 16;

/// The backed-off timeout is at most this many times the un-backed-off one (see "Why the
/// backoff is capped" above).
pub const BACKOFF_CAP_FACTOR: u32 = 3;

/// RFC 6298 state for one kind of wait.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RtoEstimator {
    /// Smoothed round trip, once a sample was taken.
    srtt: Option<Duration>,
    /// Mean deviation of the round trip.
    rttvar: Duration,
    /// Timeouts since the last sample (each doubles the timeout).
    backoffs: u32,
}

impl RtoEstimator {
    /// An estimator with no sample yet (its timeout is the ceiling).
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one measured round trip of a wait that completed; ends any backoff.
    pub fn sample(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let deviation = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + deviation) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
        self.backoffs = 0;
    }

    /// A wait ran out of its timeout: the next one gets twice as long (up to the ceiling).
    pub fn timed_out(&mut self) {
        if self.srtt.is_some() {
            self.backoffs = (self.backoffs + 1).min(MAX_BACKOFF_DOUBLINGS);
        }
    }

    /// The smoothed round trip, once known.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The round trip's mean deviation (zero before the first sample).
    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// Timeouts since the last sample.
    pub fn backoffs(&self) -> u32 {
        self.backoffs
    }

    /// The timeout for the next wait, within `[min(RTO_FLOOR, ceiling), ceiling]`.
    pub fn timeout(&self, ceiling: Duration) -> Duration {
        let Some(unbacked) = self.unbacked(ceiling) else {
            return ceiling;
        };
        let floor = RTO_FLOOR.min(ceiling);
        let backed_off = unbacked
            .saturating_mul(1u32 << self.backoffs.min(MAX_BACKOFF_DOUBLINGS))
            .min(unbacked.saturating_mul(BACKOFF_CAP_FACTOR));
        backed_off.clamp(floor, ceiling)
    }

    /// `SRTT + max(G, 4 · RTTVAR)`; `None` before the first sample.
    pub fn base(&self) -> Option<Duration> {
        let srtt = self.srtt?;
        Some(srtt.saturating_add((self.rttvar * 4).max(RTO_GRANULARITY)))
    }

    /// The timeout without the backoff: the base raised to `min(RTO_FLOOR, ceiling)` (before
    /// the ceiling itself); `None` before the first sample.
    pub fn unbacked(&self, ceiling: Duration) -> Option<Duration> {
        Some(self.base()?.max(RTO_FLOOR.min(ceiling)))
    }

    /// The most the backoff may raise the timeout to: 3 × the un-backed-off timeout (before
    /// the ceiling); `None` before the first sample.
    pub fn backoff_cap(&self, ceiling: Duration) -> Option<Duration> {
        Some(self.unbacked(ceiling)?.saturating_mul(BACKOFF_CAP_FACTOR))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// A sample or a timeout.
    #[derive(Clone, Debug)]
    enum Step {
        Sample(Duration),
        TimedOut,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0u64..120_000).prop_map(|v| Step::Sample(ms(v))),
            1 => Just(Step::TimedOut),
        ]
    }

    fn replay(steps: &[Step]) -> RtoEstimator {
        let mut rto = RtoEstimator::new();
        for s in steps {
            match s {
                Step::Sample(d) => rto.sample(*d),
                Step::TimedOut => rto.timed_out(),
            }
        }
        rto
    }

    #[test]
    fn no_sample_means_the_ceiling() {
        let mut rto = RtoEstimator::new();
        assert_eq!(rto.timeout(ms(5000)), ms(5000));
        rto.timed_out();
        assert_eq!(rto.timeout(ms(5000)), ms(5000));
    }

    #[test]
    fn rfc_6298_arithmetic() {
        let mut rto = RtoEstimator::new();
        rto.sample(ms(400));
        // SRTT 400, RTTVAR 200: 400 + 800.
        assert_eq!(rto.timeout(ms(60_000)), ms(1200));
        rto.sample(ms(800));
        // RTTVAR = 3/4·200 + 1/4·400 = 250; SRTT = 7/8·400 + 1/8·800 = 450.
        assert_eq!(rto.rttvar(), ms(250));
        assert_eq!(rto.srtt(), Some(ms(450)));
        assert_eq!(rto.timeout(ms(60_000)), ms(1450));
        rto.timed_out();
        assert_eq!(rto.timeout(ms(60_000)), ms(2900));
        rto.sample(ms(450));
        assert_eq!(rto.backoffs(), 0);
    }

    #[test]
    fn a_fast_server_gets_the_floor() {
        let mut rto = RtoEstimator::new();
        for _ in 0..20 {
            rto.sample(ms(3));
        }
        assert_eq!(rto.timeout(ms(5000)), RTO_FLOOR);
        rto.timed_out();
        assert_eq!(rto.timeout(ms(5000)), ms(500));
        rto.timed_out();
        // Capped at 750 ms, however many timeouts follow.
        assert_eq!(rto.timeout(ms(5000)), ms(750));
        for _ in 0..20 {
            rto.timed_out();
        }
        assert_eq!(rto.timeout(ms(5000)), ms(750));
        // A sample ends the backoff.
        rto.sample(ms(3));
        assert_eq!(rto.timeout(ms(5000)), RTO_FLOOR);
    }

    #[test]
    fn a_slow_server_backs_off_to_three_times_its_timeout() {
        let mut rto = RtoEstimator::new();
        for _ in 0..200 {
            rto.sample(ms(950));
        }
        // SRTT 950 ms, RTTVAR ~0: base 1 s.
        assert_eq!(rto.timeout(ms(60_000)), ms(1000));
        let mut seen = Vec::new();
        for _ in 0..4 {
            rto.timed_out();
            seen.push(rto.timeout(ms(60_000)));
        }
        assert_eq!(seen, [ms(2000), ms(3000), ms(3000), ms(3000)]);
        // The ceiling still wins.
        assert_eq!(rto.timeout(ms(3000)), ms(3000));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Never below the floor (or the ceiling, when it is lower), never above the ceiling.
        #[test]
        fn within_floor_and_ceiling(
            steps in prop::collection::vec(step(), 0..60),
            ceiling in 1u64..120_000,
        ) {
            let ceiling = ms(ceiling);
            let t = replay(&steps).timeout(ceiling);
            prop_assert!(t <= ceiling);
            prop_assert!(t >= RTO_FLOOR.min(ceiling));
        }

        /// A timeout never shortens the next one, and doubles it until the cap or the ceiling.
        #[test]
        fn backs_off_on_timeouts(
            steps in prop::collection::vec(step(), 1..40),
            ceiling in 1u64..120_000,
        ) {
            let ceiling = ms(ceiling);
            let mut rto = replay(&steps);
            let before = rto.timeout(ceiling);
            rto.timed_out();
            let after = rto.timeout(ceiling);
            prop_assert!(after >= before);
            if let Some(cap) = rto.backoff_cap(ceiling) {
                let doubled = (before * 2).min(cap).min(ceiling);
                prop_assert!(after >= doubled, "{before:?} -> {after:?}");
            }
        }

        /// However many timeouts in a row, the timeout stays within 3 × the un-backed-off
        /// timeout (and the ceiling).
        #[test]
        fn the_backoff_is_capped(
            steps in prop::collection::vec(step(), 1..40),
            timeouts in 0usize..40,
            ceiling in 1u64..120_000,
        ) {
            let ceiling = ms(ceiling);
            let mut rto = replay(&steps);
            let (Some(base), Some(cap)) = (rto.base(), rto.backoff_cap(ceiling)) else {
                return Ok(());
            };
            let floor = RTO_FLOOR.min(ceiling);
            prop_assert_eq!(cap, base.max(floor) * BACKOFF_CAP_FACTOR);
            let unbacked = RtoEstimator { backoffs: 0, ..rto }.timeout(ceiling);
            prop_assert_eq!(unbacked, base.max(floor).min(ceiling));
            for _ in 0..timeouts {
                rto.timed_out();
            }
            let t = rto.timeout(ceiling);
            prop_assert!(t <= cap.min(ceiling), "{t:?} > {cap:?}");
        }

        /// A target whose timeout is at the floor (whatever history brought it there, any
        /// number of timeouts since) is never waited on more than 750 ms, whatever the
        /// ceiling: every attempt against a black hole ends within 1 s, with room for the waits
        /// before the unanswered one and the timer's lateness.
        #[test]
        fn a_target_at_the_floor_is_never_waited_on_more_than_750ms(
            steps in prop::collection::vec(step(), 0..40),
            samples in prop::collection::vec(0u64..=30, 1..40),
            timeouts in 0usize..40,
            ceiling in 1u64..120_000,
        ) {
            let ceiling = ms(ceiling);
            // Any history, then waits of up to 30 ms: at the floor, or not yet.
            let mut rto = replay(&steps);
            for v in samples {
                rto.sample(ms(v));
            }
            let at_the_floor = rto.unbacked(ceiling) <= Some(RTO_FLOOR);
            for _ in 0..timeouts {
                rto.timed_out();
            }
            if at_the_floor {
                prop_assert!(rto.timeout(ceiling) <= ms(750));
            }
        }

        /// Waits of up to 30 ms, from the start, always put the target at the floor.
        #[test]
        fn waits_of_up_to_30ms_are_at_the_floor(
            samples in prop::collection::vec(0u64..=30, 1..40),
            ceiling in 250u64..120_000,
        ) {
            let mut rto = RtoEstimator::new();
            for v in samples {
                rto.sample(ms(v));
            }
            prop_assert_eq!(rto.unbacked(ms(ceiling)), Some(RTO_FLOOR));
        }

        /// A sudden step to any latency below the cap (and the ceiling) is absorbed within two
        /// timeouts in a row, whatever came before: within `failureThreshold − 1` for any
        /// threshold of 3 or more (the default is 5). The first wait that completes is a
        /// sample, which ends the backoff.
        #[test]
        fn a_step_below_the_cap_costs_at_most_two_timeouts(
            steps in prop::collection::vec(step(), 0..40),
            baseline in 0u64..3_000,
            fraction in 0u64..1000,
            ceiling in 1u64..120_000,
        ) {
            let ceiling = ms(ceiling);
            let mut rto = replay(&steps);
            rto.sample(ms(baseline));
            let reach = rto.backoff_cap(ceiling).unwrap_or(ceiling).min(ceiling);
            // The new latency: anything below what the backoff reaches.
            let latency = reach.mul_f64(fraction as f64 / 1000.0);
            let mut in_a_row = 0;
            while rto.timeout(ceiling) <= latency {
                rto.timed_out();
                in_a_row += 1;
                prop_assert!(in_a_row <= 2, "{latency:?}: {in_a_row} timeouts, {rto:?}");
            }
            rto.sample(latency);
            prop_assert_eq!(rto.backoffs(), 0);
        }

        /// Whatever came before, a stable latency brings the timeout close to it: within the
        /// headroom G (and the floor), after enough samples.
        #[test]
        fn converges_on_a_stable_latency(
            steps in prop::collection::vec(step(), 0..40),
            latency in 0u64..30_000,
        ) {
            let ceiling = ms(60_000);
            let latency = ms(latency);
            let mut rto = replay(&steps);
            for _ in 0..200 {
                rto.sample(latency);
            }
            let t = rto.timeout(ceiling);
            let expected = (latency + RTO_GRANULARITY).max(RTO_FLOOR);
            prop_assert!(t + ms(1) >= expected, "{t:?} < {expected:?}");
            prop_assert!(t <= expected + ms(5), "{t:?} far above {expected:?}");
            // And it always covers the latency itself.
            prop_assert!(t > latency || t == RTO_FLOOR.max(latency));
        }
    }
}
