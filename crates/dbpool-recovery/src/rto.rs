//! The adaptive timeout of one kind of wait (one probe stage of one target): RFC 6298's
//! retransmission-timeout estimator, clamped.
//!
//! Lives here: [`RtoEstimator`] (SRTT, RTTVAR, the backoff count) and its constants
//! ([`RTO_FLOOR`], [`RTO_GRANULARITY`], [`MAX_BACKOFF_DOUBLINGS`]). Must not live here: which
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
//! - **Timeout**: the base raised to the floor, doubled once per timeout since the last sample
//!   (RFC 6298 5.5, at most [`MAX_BACKOFF_DOUBLINGS`] times), then clamped to `[floor, ceiling]`
//!   where `floor = min(RTO_FLOOR, ceiling)`: never below the floor, never above the spec's
//!   timeout. So a fast server's waits after timeouts in a row get 250 ms, 500 ms, 1 s, 2 s, …
//!
//! The floor, 250 ms, is RFC 6298's 1 s minimum scaled to a probe: it is above any healthy
//! round trip inside a cluster or region by a wide margin (Linux's own minimum RTO is 200 ms),
//! and a black hole costs at most 250 ms on the first attempt instead of the spec's 5 s.

use std::time::Duration;

/// The smallest timeout the estimator ever gives (unless the ceiling is smaller).
pub const RTO_FLOOR: Duration = Duration::from_millis(250);

/// The minimum headroom above the smoothed latency (RFC 6298's `G`).
pub const RTO_GRANULARITY: Duration = Duration::from_millis(50);

/// The most doublings after timeouts in a row (2^16 × the floor is far above any ceiling).
pub const MAX_BACKOFF_DOUBLINGS: u32 = 16;

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
        let Some(srtt) = self.srtt else {
            return ceiling;
        };
        let base = srtt.saturating_add((self.rttvar * 4).max(RTO_GRANULARITY));
        let floor = RTO_FLOOR.min(ceiling);
        let backed_off = base
            .max(floor)
            .saturating_mul(1u32 << self.backoffs.min(MAX_BACKOFF_DOUBLINGS));
        backed_off.clamp(floor, ceiling)
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
        assert_eq!(rto.timeout(ms(5000)), ms(1000));
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

        /// A timeout never shortens the next one, and doubles it until the ceiling.
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
            if rto.srtt().is_some() && rto.backoffs() < MAX_BACKOFF_DOUBLINGS {
                prop_assert!(after >= (before * 2).min(ceiling), "{before:?} -> {after:?}");
            }
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
