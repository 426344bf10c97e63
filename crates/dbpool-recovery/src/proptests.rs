//! Property tests of the recovery engine: random valid policies, random event sequences at
//! random instants, and a caller that follows the deadlines.

use std::time::Duration;

use jiff::Timestamp;
use proptest::prelude::*;

use super::engine::add;
use super::*;
use crate::{BreakerMode, BreakerState, Phase};

fn t0() -> Timestamp {
    Timestamp::from_second(1_800_000_000).expect("valid timestamp")
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn mode() -> impl Strategy<Value = BreakerMode> {
    prop_oneof![
        3 => Just(BreakerMode::Auto),
        1 => Just(BreakerMode::ForcedOpen),
        1 => Just(BreakerMode::Disabled),
    ]
}

fn jitter() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(1.0), 0.0..=1.0]
}

/// Policies the API admits (and a few edge values: multiplier 1, jitter 0 and 1).
fn policy_with(mode: impl Strategy<Value = BreakerMode>) -> impl Strategy<Value = Policy> {
    (
        (
            100u64..600_000,
            10u64..10_000,
            prop_oneof![Just(1.0), 1.0..10.0],
        ),
        (0u64..600_000, 1u32..15, 10u64..1_000_000, jitter()),
        (1u32..8, 10u64..300_000, 1u32..4, mode),
    )
        .prop_map(
            |(
                (interval, initial, multiplier),
                (extra, max_attempts, cooldown, jitter),
                (failure_threshold, open_timeout, success_threshold, mode),
            )| Policy {
                interval: ms(interval),
                timeout: ms(interval / 2),
                initial_delay: ms(initial),
                multiplier,
                max_delay: ms(initial + extra),
                max_attempts,
                cooldown: ms(cooldown),
                jitter,
                failure_threshold,
                open_timeout: ms(open_timeout),
                success_threshold,
                mode,
                early_trial: true,
            },
        )
}

fn kind() -> impl Strategy<Value = FailureKind> {
    prop_oneof![3 => Just(FailureKind::Outage), 1 => Just(FailureKind::Config)]
}

/// One step of a random history; results may carry a stale sequence number.
#[derive(Clone, Debug)]
enum Op {
    Start,
    Succeed { stale: bool, degraded: bool },
    Fail { stale: bool, kind: FailureKind },
    ForceReopen,
    Request,
    SpecChanged(Policy),
}

fn op() -> impl Strategy<Value = Op> {
    let stale = prop::bool::weighted(0.1);
    prop_oneof![
        6 => Just(Op::Start),
        4 => (stale, prop::bool::weighted(0.2))
            .prop_map(|(stale, degraded)| Op::Succeed { stale, degraded }),
        8 => (stale, kind()).prop_map(|(stale, kind)| Op::Fail { stale, kind }),
        1 => Just(Op::ForceReopen),
        1 => Just(Op::Request),
        1 => policy_with(mode()).prop_map(Op::SpecChanged),
    ]
}

fn advance() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        (0u64..2_000).prop_map(ms),
        (0u64..700_000).prop_map(ms),
    ]
}

/// `initial_delay × multiplier^index` reaches `max_delay`.
fn capped(policy: &Policy, index: u32) -> bool {
    policy.initial_delay.as_secs_f64() * policy.multiplier.powf(f64::from(index))
        >= policy.max_delay.as_secs_f64()
}

/// The delay's bounds: at most the cap, and at least `cap × (1 − jitter)` once capped.
fn check_delay(policy: &Policy, index: u32, d: Duration) -> Result<(), TestCaseError> {
    prop_assert!(d <= policy.max_delay, "{d:?} > {:?}", policy.max_delay);
    if capped(policy, index) {
        let floor = policy.max_delay.as_nanos() as f64 * (1.0 - policy.jitter);
        prop_assert!(
            d.as_nanos() as f64 >= floor - 1.0,
            "{d:?} below {floor}ns at index {index}"
        );
    }
    Ok(())
}

fn is_change_to(fx: &[Effect], to: BreakerState) -> bool {
    fx.iter()
        .any(|e| matches!(e, Effect::BreakerChanged { to: t, .. } if *t == to))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn delays_stay_within_the_cap_and_the_jitter_band(
        policy in policy_with(mode()),
        seed in any::<u64>(),
        index in prop_oneof![0u32..64, any::<u32>()],
    ) {
        let d = backoff_delay(&policy, seed, index);
        check_delay(&policy, index, d)?;
        let exact = backoff_delay(&Policy { jitter: 0.0, ..policy }, seed, index);
        prop_assert!(d <= exact);
        prop_assert!(d.as_nanos() as f64 >= exact.as_nanos() as f64 * (1.0 - policy.jitter) - 1.0);
    }

    #[test]
    fn random_histories_keep_the_invariants(
        first in policy_with(mode()),
        seed in any::<u64>(),
        steps in prop::collection::vec((op(), advance()), 1..120),
    ) {
        let mut policy = first;
        let mut state = PoolState::new(seed);
        let mut now = t0();
        let mut touched = false;
        for (op, dt) in steps {
            now = add(now, dt);
            let before = state.clone();
            let event = match op {
                Op::Start => Event::ProbeStarted,
                Op::Succeed { stale, degraded } => Event::ProbeSucceeded {
                    seq: if stale { state.probe_seq.wrapping_sub(1) } else { state.probe_seq },
                    degraded,
                },
                Op::Fail { stale, kind } => Event::ProbeFailed {
                    seq: if stale { state.probe_seq.wrapping_sub(1) } else { state.probe_seq },
                    kind,
                },
                Op::ForceReopen => Event::ForceReopen,
                Op::Request => Event::ProbeRequested,
                Op::SpecChanged(p) => {
                    policy = p;
                    Event::SpecChanged
                }
            };
            let (after, fx) = apply(&before, event, now, &policy);
            let stale = match event {
                Event::ProbeSucceeded { seq, .. } | Event::ProbeFailed { seq, .. } => {
                    seq != before.probe_seq
                }
                _ => false,
            };
            if stale {
                prop_assert_eq!(&after, &before);
                prop_assert_eq!(&fx, &vec![Effect::Ignored]);
            } else {
                touched = true;
                prop_assert!(!fx.contains(&Effect::Ignored));
            }

            // Delays.
            if let Some(d) = after.current_backoff {
                prop_assert!(after.attempts > 0);
                check_delay(&policy, after.attempts - 1, d)?;
                prop_assert_eq!(after.cooldown_until, None);
            }

            // Breaker and modes.
            match policy.mode {
                BreakerMode::Auto => prop_assert!(
                    !(after.breaker == BreakerState::Closed
                        && after.outage_streak >= policy.failure_threshold),
                    "closed with streak {} >= {}", after.outage_streak, policy.failure_threshold
                ),
                BreakerMode::ForcedOpen => {
                    prop_assert!(!is_change_to(&fx, BreakerState::Closed));
                    prop_assert!(!is_change_to(&fx, BreakerState::HalfOpen));
                    if touched {
                        prop_assert_eq!(after.breaker, BreakerState::Open);
                    }
                }
                BreakerMode::Disabled => {
                    prop_assert!(!is_change_to(&fx, BreakerState::Open));
                    prop_assert!(!is_change_to(&fx, BreakerState::HalfOpen));
                    if touched {
                        prop_assert_eq!(after.breaker, BreakerState::Closed);
                    }
                }
            }
            if after.open_count > before.open_count {
                prop_assert!(is_change_to(&fx, BreakerState::Open));
            }

            // Counters.
            prop_assert!(after.outage_streak <= after.consecutive_failures);
            if matches!(event, Event::ProbeSucceeded { .. }) && !stale {
                prop_assert_eq!(after.consecutive_failures, 0);
                prop_assert_eq!(after.outage_streak, 0);
                prop_assert_eq!(after.attempts, 0);
                prop_assert_eq!(after.current_backoff, None);
                prop_assert_eq!(after.cooldown_until, None);
                prop_assert_eq!(
                    fx.contains(&Effect::Recovered),
                    before.consecutive_failures > 0
                );
                if after.breaker == BreakerState::Closed {
                    prop_assert!(matches!(
                        phase(&after),
                        Phase::Healthy | Phase::Degraded
                    ));
                }
            }

            // Cooldown always ends.
            if event == Event::ProbeStarted
                && before.cooldown_until.is_some_and(|until| now >= until)
            {
                prop_assert_eq!(after.cooldown_until, None);
                prop_assert_eq!(after.attempts, 0);
                prop_assert!(fx.contains(&Effect::CooldownEnded));
            }

            // No hot loop.
            match next_deadline(&after, &policy) {
                Some(d) => {
                    let last = after.last_probe_at;
                    prop_assert!(last.is_some_and(|last| d >= last), "{d} before {last:?}");
                }
                None => prop_assert!(after.probe_requested || after.last_probe_at.is_none()),
            }
            prop_assert_eq!(
                phase(&after) == Phase::Pending,
                after.last_probe_at.is_none()
            );
            state = after;
        }
    }

    /// A caller that probes exactly at each deadline always gets the pool back once the
    /// database answers: there is no terminal state.
    #[test]
    fn following_the_deadlines_recovers(
        policy in policy_with(prop_oneof![Just(BreakerMode::Auto), Just(BreakerMode::Disabled)]),
        seed in any::<u64>(),
        failures in prop::collection::vec(kind(), 0..40),
    ) {
        let mut state = PoolState::new(seed);
        let mut now = t0();
        let probe = |state: &PoolState, now: &mut Timestamp, outcome: Option<FailureKind>| {
            if let Some(d) = next_deadline(state, &policy) {
                *now = (*now).max(d);
            }
            let (started, _) = apply(state, Event::ProbeStarted, *now, &policy);
            let seq = started.probe_seq;
            let result = match outcome {
                Some(kind) => Event::ProbeFailed { seq, kind },
                None => Event::ProbeSucceeded { seq, degraded: false },
            };
            apply(&started, result, *now, &policy).0
        };
        for kind in failures {
            state = probe(&state, &mut now, Some(kind));
            prop_assert!(state.consecutive_failures > 0);
        }
        let mut probes = 0;
        while phase(&state) != Phase::Healthy {
            state = probe(&state, &mut now, None);
            probes += 1;
            prop_assert!(
                probes <= policy.success_threshold,
                "not healthy after {probes} successes: {state:?}"
            );
        }
        prop_assert_eq!(state.breaker, BreakerState::Closed);
    }
}

proptest! {
    /// Under any policy, a pool whose failures are all held never leaves Closed in mode Auto
    /// (unless it was never Closed), and the first failure without the hold that reaches the
    /// threshold opens it.
    #[test]
    fn held_failures_never_open_and_the_first_unheld_one_does(
        policy in policy_with(Just(BreakerMode::Auto)),
        held in 1u32..30,
    ) {
        let mut state = PoolState::new(7);
        let mut now = t0();
        let mut reports = 0;
        for _ in 0..held {
            let (s, _) = apply(&state, Event::ProbeStarted, now, &policy);
            let seq = s.probe_seq;
            let (s, fx) = apply_guarded(&s, Event::ProbeFailed { seq, kind: FailureKind::Outage }, now, &policy, true);
            reports += fx.iter().filter(|e| **e == Effect::OpeningHeld).count();
            prop_assert_eq!(s.breaker, BreakerState::Closed);
            state = s;
            now = next_deadline(&state, &policy).unwrap_or(now).max(add(now, ms(1)));
        }
        prop_assert_eq!(reports, usize::from(held >= policy.failure_threshold));
        let (s, _) = apply(&state, Event::ProbeStarted, now, &policy);
        prop_assert_eq!(s.breaker, BreakerState::Closed);
        let seq = s.probe_seq;
        let (s, _) = apply(&s, Event::ProbeFailed { seq, kind: FailureKind::Outage }, now, &policy);
        let expect = if held + 1 >= policy.failure_threshold { BreakerState::Open } else { BreakerState::Closed };
        prop_assert_eq!(s.breaker, expect);
        prop_assert_eq!(s.held_since, None);
    }
}

/// One step of a history with readiness edges.
#[derive(Clone, Debug)]
enum EdgeOp {
    Op(Op),
    Edge,
}

fn edge_op() -> impl Strategy<Value = EdgeOp> {
    prop_oneof![
        5 => op().prop_map(EdgeOp::Op),
        2 => Just(EdgeOp::Edge),
    ]
}

/// `policy` with early trials on or off.
fn with_trials(policy: Policy, on: bool) -> Policy {
    Policy {
        early_trial: on,
        ..policy
    }
}

/// The event of `op` in `state` (results carry the current or a stale sequence number).
fn event_of(op: &Op, state: &PoolState) -> Event {
    match op {
        Op::Start => Event::ProbeStarted,
        Op::Succeed { stale, degraded } => Event::ProbeSucceeded {
            seq: if *stale {
                state.probe_seq.wrapping_sub(1)
            } else {
                state.probe_seq
            },
            degraded: *degraded,
        },
        Op::Fail { stale, kind } => Event::ProbeFailed {
            seq: if *stale {
                state.probe_seq.wrapping_sub(1)
            } else {
                state.probe_seq
            },
            kind: *kind,
        },
        Op::ForceReopen => Event::ForceReopen,
        Op::Request => Event::ProbeRequested,
        Op::SpecChanged(_) => Event::SpecChanged,
    }
}

/// A caller that probes at each deadline, every probe failing with an outage, and sends a
/// readiness edge at each of `edges` (offsets from the start, any order, any density). Returns
/// the instants at which probes started up to `horizon`, how many of them were early trials, and
/// how many trials were granted.
fn outage(
    policy: &Policy,
    seed: u64,
    edges: &[Duration],
    horizon: Duration,
) -> Result<(Vec<Timestamp>, usize, usize), TestCaseError> {
    let end = add(t0(), horizon);
    let mut edges: Vec<Timestamp> = edges.iter().map(|d| add(t0(), *d)).collect();
    edges.sort();
    edges.reverse();
    let mut state = PoolState::new(seed);
    let mut now = t0();
    let (mut starts, mut trials, mut granted) = (Vec::new(), 0, 0);
    loop {
        let due = next_deadline(&state, policy).unwrap_or(now).max(now);
        if let Some(&edge) = edges.last()
            && edge < due
        {
            edges.pop();
            now = now.max(edge);
            let before = state.clone();
            let (after, fx) = apply(&state, Event::ReadinessAccepting, now, policy);
            let grants = fx
                .iter()
                .filter(|e| **e == Effect::EarlyTrialGranted)
                .count();
            prop_assert!(grants <= 1);
            if grants == 1 {
                // At most one per current backoff delay (at least initialDelay).
                if let Some(last) = before.last_trial_at {
                    prop_assert!(now >= add(last, trial_gap(&before, policy)));
                }
            }
            granted += grants;
            state = after;
            continue;
        }
        now = due;
        if now > end {
            break;
        }
        let (started, _) = apply(&state, Event::ProbeStarted, now, policy);
        starts.push(now);
        if started.trial_seq.is_some() {
            trials += 1;
        }
        let seq = started.probe_seq;
        let failed = Event::ProbeFailed {
            seq,
            kind: FailureKind::Outage,
        };
        state = apply(&started, failed, now, policy).0;
    }
    Ok((starts, trials, granted))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Without readiness edges the schedule is exactly the pure timers' (the engine with early
    /// trials off), and with early trials off edges change nothing at all: both engines go
    /// through the same states, step by step.
    #[test]
    fn without_edges_or_with_trials_off_the_schedule_is_the_timers(
        first in policy_with(mode()),
        seed in any::<u64>(),
        steps in prop::collection::vec((edge_op(), advance()), 1..120),
    ) {
        let (mut on, mut off) = (with_trials(first, true), with_trials(first, false));
        let (mut quiet, mut flapping) = (PoolState::new(seed), PoolState::new(seed));
        let mut now = t0();
        for (step, dt) in steps {
            now = add(now, dt);
            match step {
                EdgeOp::Edge => {
                    let (after, fx) = apply(&flapping, Event::ReadinessAccepting, now, &off);
                    prop_assert!(fx.is_empty(), "{fx:?}");
                    prop_assert_eq!(&after, &flapping);
                }
                EdgeOp::Op(op) => {
                    if let Op::SpecChanged(p) = &op {
                        on = with_trials(*p, true);
                        off = with_trials(*p, false);
                    }
                    let (q, qfx) = apply(&quiet, event_of(&op, &quiet), now, &on);
                    let (f, ffx) = apply(&flapping, event_of(&op, &flapping), now, &off);
                    prop_assert_eq!(&q, &f);
                    prop_assert_eq!(&qfx, &ffx);
                    prop_assert_eq!(next_deadline(&q, &on), next_deadline(&f, &off));
                    prop_assert_eq!(q.trial_seq, None);
                    quiet = q;
                    flapping = f;
                }
            }
        }
    }

    /// With readiness flapping at any rate during an outage that never ends, credentialed
    /// attempts stay within twice the pure timers' over every horizon, and each early trial
    /// answers one edge.
    #[test]
    fn flapping_readiness_at_most_doubles_the_attempts(
        policy in policy_with(mode()),
        seed in any::<u64>(),
        edges in prop_oneof![
            prop::collection::vec((0u64..3_600_000).prop_map(ms), 0..400),
            prop::collection::vec((0u64..60_000).prop_map(ms), 0..400),
            (1u64..2_000).prop_map(|every| (0..400).map(|i| ms(i * every)).collect::<Vec<_>>()),
        ],
        horizon in (1u64..3_600_000).prop_map(ms),
    ) {
        let (timers, trials, _) = outage(&with_trials(policy, false), seed, &[], horizon)?;
        prop_assert_eq!(trials, 0);
        let (with_edges, trials, granted) = outage(&policy, seed, &edges, horizon)?;
        prop_assert!(
            with_edges.len() <= 2 * timers.len(),
            "{} attempts with edges, {} on the timers", with_edges.len(), timers.len()
        );
        prop_assert!(trials <= granted && granted <= edges.len());
        if policy.mode == BreakerMode::ForcedOpen {
            prop_assert_eq!(granted, 0);
        }
        // The same holds at every shorter horizon (every prefix of the run).
        for (n, at) in with_edges.iter().enumerate() {
            let on_timers = timers.iter().filter(|t| *t <= at).count();
            let attempts = n + 1;
            prop_assert!(
                attempts <= 2 * on_timers,
                "{attempts} attempts by {at}, {on_timers} on the timers"
            );
        }
    }
}
