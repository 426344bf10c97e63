//! `Policy`: the recovery knobs of a pool, made safe to compute with.
//!
//! Lives here: the knobs as plain `Duration`s and unsigned counts, and [`Policy::clamped`], which
//! brings every value into the range the API promises, so the engine never divides by zero, loops hot or overflows even if admission was
//! bypassed. Nothing here looks at state or time.

use std::time::Duration;

use crate::BreakerMode;

/// Smallest duration the engine accepts for any knob. Admission already refuses zero durations;
/// this floor is defence in depth so a bypassed admission cannot make the engine retry in a
/// tight loop.
pub const MIN_DURATION: Duration = Duration::from_millis(10);

/// Largest backoff multiplier (the API's upper bound).
pub const MAX_MULTIPLIER: f64 = 100.0;

/// Recovery policy of one pool: health-check timing, backoff and circuit-breaker thresholds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// Time between probes while healthy.
    pub interval: Duration,
    /// Budget of one probe (used by the caller, not by the engine).
    pub timeout: Duration,
    /// Delay after the first failure of a cycle.
    pub initial_delay: Duration,
    /// Growth factor between delays, in `[1, 100]`.
    pub multiplier: f64,
    /// Upper bound of a single delay; at least `initial_delay`.
    pub max_delay: Duration,
    /// Failures in a cycle before a cooldown; at least 1.
    pub max_attempts: u32,
    /// Pause after `max_attempts` failures, before a new cycle.
    pub cooldown: Duration,
    /// Fraction in `[0, 1]` by which a delay is randomly shortened.
    pub jitter: f64,
    /// Consecutive outage failures that open the breaker; at least 1.
    pub failure_threshold: u32,
    /// Time the breaker stays open before a half-open trial.
    pub open_timeout: Duration,
    /// Successes in half-open needed to close the breaker; at least 1.
    pub success_threshold: u32,
    /// Auto, ForcedOpen or Disabled.
    pub mode: BreakerMode,
    /// Whether readiness evidence may grant an early trial ([`Event::ReadinessAccepting`]);
    /// `false` keeps the pure timers of the backoff and the breaker.
    ///
    /// [`Event::ReadinessAccepting`]: crate::Event::ReadinessAccepting
    pub early_trial: bool,
}

impl Policy {
    /// This policy with every value clamped into its documented range: counts below 1 become 1,
    /// durations below [`MIN_DURATION`] become it, `max_delay` is raised to `initial_delay`,
    /// `multiplier` is clamped to `[1, 100]` and `jitter` to `[0, 1]` (NaN gives 1 and 0
    /// respectively). `dbpool-api` builds a policy from a spec through this.
    pub fn clamped(self) -> Self {
        let initial_delay = floor(self.initial_delay);
        Self {
            interval: floor(self.interval),
            timeout: floor(self.timeout),
            initial_delay,
            multiplier: clamp_multiplier(self.multiplier),
            max_delay: floor(self.max_delay).max(initial_delay),
            max_attempts: self.max_attempts.max(1),
            cooldown: floor(self.cooldown),
            jitter: clamp_jitter(self.jitter),
            failure_threshold: self.failure_threshold.max(1),
            open_timeout: floor(self.open_timeout),
            success_threshold: self.success_threshold.max(1),
            mode: self.mode,
            early_trial: self.early_trial,
        }
    }
}

/// The API defaults: probe every 30s (5s timeout); back off 1s ×2 up to 60s with 10% jitter, 10
/// attempts then a 5 minute cooldown; open after 5 outage failures for 60s, close after 1 success;
/// early trials on.
impl Default for Policy {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(60),
            max_attempts: 10,
            cooldown: Duration::from_secs(300),
            jitter: 0.1,
            failure_threshold: 5,
            open_timeout: Duration::from_secs(60),
            success_threshold: 1,
            mode: BreakerMode::Auto,
            early_trial: true,
        }
    }
}

fn floor(d: Duration) -> Duration {
    d.max(MIN_DURATION)
}

/// `multiplier` clamped to `[1, 100]`; NaN gives 1.
pub(crate) fn clamp_multiplier(m: f64) -> f64 {
    if m.is_nan() {
        1.0
    } else {
        m.clamp(1.0, MAX_MULTIPLIER)
    }
}

/// `jitter` clamped to `[0, 1]`; NaN gives 0.
pub(crate) fn clamp_jitter(j: f64) -> f64 {
    if j.is_nan() { 0.0 } else { j.clamp(0.0, 1.0) }
}
