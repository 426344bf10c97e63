//! The backoff schedule: exponential growth, a cap, and deterministic per-pool jitter.
//!
//! Lives here: [`backoff_delay`] and the splitmix64 hash it draws jitter from. It is a pure
//! function of the policy, the pool's seed and the failure's index in its cycle: no state, no
//! time, no random number generator.

use std::time::Duration;

use super::policy::{Policy, clamp_jitter, clamp_multiplier};

/// The delay after failure number `failure_index + 1` of a backoff cycle.
///
/// The base is `initial_delay × multiplier^failure_index`, capped at `max_delay` (an overflowing
/// or infinite product is the cap). Jitter then shortens it by a fraction drawn uniformly from
/// `[0, jitter)` by hashing `(seed, failure_index)`, so the result lies in
/// `[base·(1−jitter), base]`; this also applies at the cap, so pools stuck at `max_delay` still
/// spread out. The result never exceeds `max_delay`.
pub fn backoff_delay(policy: &Policy, seed: u64, failure_index: u32) -> Duration {
    let cap = policy.max_delay.as_nanos() as f64;
    let grown = policy.initial_delay.as_nanos() as f64
        * clamp_multiplier(policy.multiplier).powf(f64::from(failure_index));
    // `grown < cap` is false for NaN and infinity too, which then take the cap.
    let base = if grown < cap { grown } else { cap };
    // Float to int casts saturate; the final `min` restores the cap if rounding overshot.
    let base_nanos = base.round() as u64;
    let jitter = clamp_jitter(policy.jitter);
    let max_cut = (base_nanos as f64 * jitter).floor() as u64;
    let cut =
        ((base_nanos as f64 * jitter * unit(seed, failure_index)).floor() as u64).min(max_cut);
    Duration::from_nanos(base_nanos.saturating_sub(cut)).min(policy.max_delay)
}

/// A number in `[0, 1)` determined by `(seed, index)`.
fn unit(seed: u64, index: u32) -> f64 {
    let h = splitmix64(seed ^ splitmix64(u64::from(index)));
    // The top 53 bits fill an f64 mantissa exactly.
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// One step of the splitmix64 generator, used as a 64-bit mixing hash.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
