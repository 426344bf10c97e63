//! Example-based tests of the recovery engine: the default schedule, the breaker, the modes,
//! force reopen, stale results, jitter and the spec conversion.

use std::time::Duration;

use super::engine::add;
use super::sim::{SEED, Sim, exact, secs};
use super::*;
use crate::{BreakerMode, BreakerState, Phase};

impl Sim {
    fn start(&mut self) -> Vec<Effect> {
        self.apply(Event::ProbeStarted)
    }

    fn succeed(&mut self) -> Vec<Effect> {
        let seq = self.state.probe_seq;
        self.apply(Event::ProbeSucceeded {
            seq,
            degraded: false,
        })
    }

    fn fail(&mut self, kind: FailureKind) -> Vec<Effect> {
        let seq = self.state.probe_seq;
        self.apply(Event::ProbeFailed { seq, kind })
    }

    /// Start then fail a probe now; return the effects of both.
    fn probe_fail(&mut self, kind: FailureKind) -> Vec<Effect> {
        let mut fx = self.start();
        fx.extend(self.fail(kind));
        fx
    }

    /// Start then succeed a probe now; return the effects of both.
    fn probe_ok(&mut self) -> Vec<Effect> {
        let mut fx = self.start();
        fx.extend(self.succeed());
        fx
    }

    fn phase(&self) -> Phase {
        phase(&self.state)
    }
}

fn opened() -> Effect {
    Effect::BreakerChanged {
        from: BreakerState::Closed,
        to: BreakerState::Open,
    }
}

#[test]
fn defaults_back_off_exponentially_to_the_cap() {
    let policy = exact();
    let delays: Vec<u64> = (0..10)
        .map(|i| backoff_delay(&policy, SEED, i).as_secs())
        .collect();
    assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
}

#[test]
fn huge_indices_stay_at_the_cap() {
    let policy = Policy {
        multiplier: 100.0,
        ..exact()
    };
    for i in [20, 200, 1000, u32::MAX] {
        assert_eq!(backoff_delay(&policy, SEED, i), secs(60));
    }
}

#[test]
fn ten_attempts_then_a_cooldown_then_a_new_cycle() {
    // Config failures never open the breaker, so this is the plain backoff schedule.
    let mut sim = Sim::new(exact());
    assert_eq!(sim.deadline_in(), None, "a new pool is probed at once");
    let mut waits = Vec::new();
    for n in 1..=9 {
        let fx = sim.probe_fail(FailureKind::Config);
        assert!(fx.is_empty(), "failure {n}: {fx:?}");
        assert_eq!(sim.state.attempts, n);
        waits.push(sim.deadline_in().expect("scheduled").as_secs());
        sim.wait();
    }
    assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);

    let fx = sim.probe_fail(FailureKind::Config);
    let until = add(sim.now, secs(300));
    assert_eq!(fx, [Effect::CooldownStarted { until }]);
    assert_eq!(sim.state.attempts, 10);
    assert_eq!(sim.state.current_backoff, None);
    assert_eq!(sim.state.cooldown_until, Some(until));
    assert_eq!(sim.deadline_in(), Some(secs(300)));
    assert_eq!(
        sim.phase(),
        Phase::ConfigError,
        "config error outranks cooldown"
    );

    sim.wait();
    assert_eq!(sim.start(), [Effect::CooldownEnded]);
    assert_eq!(sim.state.attempts, 0);
    assert_eq!(sim.state.cooldown_until, None);
    sim.fail(FailureKind::Config);
    assert_eq!(sim.state.attempts, 1);
    assert_eq!(sim.deadline_in(), Some(secs(1)), "new cycle starts at 1s");
    assert_eq!(sim.state.consecutive_failures, 11);
}

#[test]
fn outage_cooldown_shows_cooling_down_when_the_breaker_is_disabled() {
    let mut sim = Sim::new(Policy {
        mode: BreakerMode::Disabled,
        ..exact()
    });
    for _ in 0..10 {
        sim.probe_fail(FailureKind::Outage);
        assert_ne!(sim.phase(), Phase::BreakerOpen);
        sim.wait();
    }
    assert_eq!(sim.phase(), Phase::CoolingDown);
}

#[test]
fn five_outage_failures_open_the_breaker() {
    let mut sim = Sim::new(exact());
    for n in 1..=4 {
        assert!(sim.probe_fail(FailureKind::Outage).is_empty());
        assert_eq!(sim.state.breaker, BreakerState::Closed, "after {n}");
        assert_eq!(sim.phase(), Phase::Recovering);
        sim.wait();
    }
    let opened_at = sim.now;
    assert_eq!(sim.probe_fail(FailureKind::Outage), [opened()]);
    assert_eq!(sim.state.breaker, BreakerState::Open);
    assert_eq!(sim.state.breaker_since, Some(opened_at));
    assert_eq!(sim.state.open_count, 1);
    assert_eq!(sim.state.outage_streak, 5);
    assert_eq!(sim.phase(), Phase::BreakerOpen);
    // max(open_timeout 60s, backoff 16s)
    assert_eq!(sim.deadline_in(), Some(secs(60)));
}

#[test]
fn a_cooldown_while_open_waits_for_the_open_timeout_too() {
    let mut sim = Sim::new(Policy {
        max_attempts: 5,
        open_timeout: secs(600),
        ..exact()
    });
    for _ in 0..4 {
        sim.probe_fail(FailureKind::Outage);
        sim.wait();
    }
    let fx = sim.probe_fail(FailureKind::Outage);
    assert_eq!(
        fx,
        [
            Effect::CooldownStarted {
                until: add(sim.now, secs(300))
            },
            opened()
        ]
    );
    assert_eq!(sim.deadline_in(), Some(secs(600)));
    sim.wait();
    assert_eq!(
        sim.start(),
        [
            Effect::CooldownEnded,
            Effect::BreakerChanged {
                from: BreakerState::Open,
                to: BreakerState::HalfOpen
            }
        ]
    );
}

#[test]
fn half_open_after_the_open_timeout_and_one_success_closes() {
    let mut sim = Sim::new(exact());
    for _ in 0..5 {
        sim.probe_fail(FailureKind::Outage);
        sim.wait();
    }
    let opened_at = sim.state.breaker_since.expect("opened");
    assert_eq!(sim.now, add(opened_at, secs(60)));

    // A requested probe before the timeout does not half-open.
    let mut early = Sim {
        now: add(opened_at, secs(59)),
        ..Sim::new(exact())
    };
    early.state = sim.state.clone();
    assert!(early.start().is_empty());
    assert_eq!(early.state.breaker, BreakerState::Open);

    assert_eq!(
        sim.start(),
        [Effect::BreakerChanged {
            from: BreakerState::Open,
            to: BreakerState::HalfOpen
        }]
    );
    assert_eq!(sim.phase(), Phase::BreakerOpen);
    assert_eq!(
        sim.succeed(),
        [
            Effect::BreakerChanged {
                from: BreakerState::HalfOpen,
                to: BreakerState::Closed
            },
            Effect::Recovered
        ]
    );
    assert_eq!(sim.state.consecutive_failures, 0);
    assert_eq!(sim.state.outage_streak, 0);
    assert_eq!(sim.state.attempts, 0);
    assert_eq!(sim.phase(), Phase::Healthy);
    assert_eq!(sim.deadline_in(), Some(secs(30)));
}

#[test]
fn success_threshold_two_needs_two_successes() {
    let mut sim = Sim::new(Policy {
        success_threshold: 2,
        ..exact()
    });
    for _ in 0..5 {
        sim.probe_fail(FailureKind::Outage);
        sim.wait();
    }
    sim.start();
    assert_eq!(sim.state.breaker, BreakerState::HalfOpen);
    assert_eq!(sim.succeed(), [Effect::Recovered]);
    assert_eq!(sim.state.breaker, BreakerState::HalfOpen);
    assert_eq!(sim.state.half_open_successes, 1);
    assert_eq!(
        sim.deadline_in(),
        Some(secs(1)),
        "next trial after initial_delay"
    );
    sim.wait();
    let fx = sim.probe_ok();
    assert_eq!(
        fx,
        [Effect::BreakerChanged {
            from: BreakerState::HalfOpen,
            to: BreakerState::Closed
        }]
    );
}

#[test]
fn an_outage_in_half_open_reopens_but_a_config_failure_does_not() {
    let mut sim = Sim::new(Policy {
        success_threshold: 2,
        ..exact()
    });
    for _ in 0..5 {
        sim.probe_fail(FailureKind::Outage);
        sim.wait();
    }
    sim.start();
    sim.succeed();
    sim.wait();
    sim.probe_fail(FailureKind::Config);
    assert_eq!(sim.state.breaker, BreakerState::HalfOpen);
    assert_eq!(sim.state.half_open_successes, 1);
    assert_eq!(sim.phase(), Phase::ConfigError);
    sim.wait();
    let at = sim.now;
    let fx = sim.probe_fail(FailureKind::Outage);
    assert_eq!(
        fx,
        [Effect::BreakerChanged {
            from: BreakerState::HalfOpen,
            to: BreakerState::Open
        }]
    );
    assert_eq!(sim.state.breaker_since, Some(at));
    assert_eq!(sim.state.open_count, 2);
    assert_eq!(sim.state.half_open_successes, 0);
}

#[test]
fn config_failures_back_off_but_never_open_the_breaker() {
    let mut sim = Sim::new(exact());
    for _ in 0..25 {
        let fx = sim.probe_fail(FailureKind::Config);
        assert!(
            !fx.iter()
                .any(|e| matches!(e, Effect::BreakerChanged { .. }))
        );
        assert_eq!(sim.state.breaker, BreakerState::Closed);
        assert_eq!(sim.state.outage_streak, 0);
        assert_eq!(sim.phase(), Phase::ConfigError);
        sim.wait();
    }
    assert_eq!(sim.state.consecutive_failures, 25);
}

#[test]
fn config_failures_neither_add_to_nor_reset_the_outage_streak() {
    let mut sim = Sim::new(exact());
    for kind in [
        FailureKind::Outage,
        FailureKind::Outage,
        FailureKind::Config,
        FailureKind::Outage,
        FailureKind::Outage,
    ] {
        sim.probe_fail(kind);
        sim.wait();
    }
    assert_eq!(sim.state.outage_streak, 4);
    assert_eq!(sim.state.consecutive_failures, 5);
    assert_eq!(sim.state.breaker, BreakerState::Closed);
    assert_eq!(sim.probe_fail(FailureKind::Outage), [opened()]);
}

#[test]
fn force_reopen_from_open_probes_now_and_success_closes() {
    let mut sim = Sim::new(exact());
    for _ in 0..5 {
        sim.probe_fail(FailureKind::Outage);
        sim.wait();
    }
    sim.start();
    sim.fail(FailureKind::Outage); // half-open trial failed: open again
    assert_eq!(sim.state.breaker, BreakerState::Open);
    // A probe is in flight when the reopen arrives.
    sim.advance(secs(5));
    sim.start();
    let in_flight = sim.state.probe_seq;
    let fx = sim.apply(Event::ForceReopen);
    assert_eq!(
        fx,
        [
            Effect::BreakerChanged {
                from: BreakerState::Open,
                to: BreakerState::HalfOpen
            },
            Effect::ForceReopened
        ]
    );
    assert_eq!(sim.state.attempts, 0);
    assert_eq!(sim.state.current_backoff, None);
    assert!(sim.state.probe_requested);
    assert_eq!(sim.deadline_in(), None, "probe at once");
    assert_eq!(
        sim.apply(Event::ProbeFailed {
            seq: in_flight,
            kind: FailureKind::Outage
        }),
        [Effect::Ignored],
        "the in-flight result is superseded"
    );
    sim.start();
    assert!(!sim.state.probe_requested);
    let fx = sim.succeed();
    assert!(fx.contains(&Effect::BreakerChanged {
        from: BreakerState::HalfOpen,
        to: BreakerState::Closed
    }));
    assert!(fx.contains(&Effect::Recovered));
}

#[test]
fn force_reopen_then_failure_reopens() {
    let mut sim = Sim::new(exact());
    for _ in 0..5 {
        sim.probe_fail(FailureKind::Outage);
        sim.wait();
    }
    sim.apply(Event::ForceReopen);
    assert_eq!(sim.state.breaker, BreakerState::HalfOpen);
    let fx = sim.probe_fail(FailureKind::Outage);
    assert_eq!(
        fx,
        [Effect::BreakerChanged {
            from: BreakerState::HalfOpen,
            to: BreakerState::Open
        }]
    );
    assert_eq!(sim.state.attempts, 1, "a fresh cycle");
    assert_eq!(sim.state.open_count, 2);
}

#[test]
fn force_reopen_clears_a_cooldown_and_leaves_a_closed_breaker_closed() {
    let mut sim = Sim::new(Policy {
        mode: BreakerMode::Disabled,
        ..exact()
    });
    for _ in 0..10 {
        sim.probe_fail(FailureKind::Outage);
        sim.wait();
    }
    sim.now = add(sim.state.last_failure_at.expect("failed"), secs(10));
    assert!(sim.state.cooldown_until.is_some());
    let fx = sim.apply(Event::ForceReopen);
    assert_eq!(fx, [Effect::CooldownEnded, Effect::ForceReopened]);
    assert_eq!(sim.state.cooldown_until, None);
    assert_eq!(sim.state.breaker, BreakerState::Closed);

    let mut auto = Sim::new(exact());
    auto.probe_fail(FailureKind::Outage);
    assert_eq!(auto.apply(Event::ForceReopen), [Effect::ForceReopened]);
    assert_eq!(auto.state.breaker, BreakerState::Closed);
    assert_eq!(auto.state.outage_streak, 1, "facts are kept");
}

#[test]
fn stale_results_are_ignored() {
    let mut sim = Sim::new(exact());
    sim.start();
    let old = sim.state.probe_seq;
    sim.apply(Event::SpecChanged);
    let before = sim.state.clone();
    for event in [
        Event::ProbeSucceeded {
            seq: old,
            degraded: true,
        },
        Event::ProbeFailed {
            seq: old,
            kind: FailureKind::Outage,
        },
    ] {
        assert_eq!(sim.apply(event), [Effect::Ignored]);
        assert_eq!(sim.state, before);
    }
}

#[test]
fn probe_requested_probes_at_once_and_resets_nothing() {
    let mut sim = Sim::new(exact());
    sim.probe_fail(FailureKind::Outage);
    let before = sim.state.clone();
    assert!(sim.apply(Event::ProbeRequested).is_empty());
    assert_eq!(sim.deadline_in(), None);
    assert_eq!(
        PoolState {
            probe_requested: false,
            ..sim.state.clone()
        },
        before
    );
    sim.start();
    assert!(!sim.state.probe_requested);
    assert_eq!(sim.deadline_in(), Some(secs(1)));
}

#[test]
fn a_failure_during_a_cooldown_keeps_the_cooldown() {
    let mut sim = Sim::new(Policy {
        mode: BreakerMode::Disabled,
        ..exact()
    });
    for _ in 0..10 {
        sim.probe_fail(FailureKind::Outage);
        sim.wait();
    }
    let until = sim.state.cooldown_until.expect("cooling down");
    sim.now = add(sim.state.last_failure_at.expect("failed"), secs(10));
    sim.apply(Event::ProbeRequested);
    assert!(sim.probe_fail(FailureKind::Outage).is_empty());
    assert_eq!(sim.state.cooldown_until, Some(until));
    assert_eq!(sim.state.attempts, 10);
    assert_eq!(sim.state.consecutive_failures, 11);
}

#[test]
fn forced_open_holds_the_breaker_open_while_probing() {
    let mut sim = Sim::new(exact());
    sim.probe_ok();
    assert_eq!(sim.phase(), Phase::Healthy);
    sim.policy.mode = BreakerMode::ForcedOpen;
    assert_eq!(sim.apply(Event::SpecChanged), [opened()]);
    assert_eq!(sim.state.breaker_since, Some(sim.now));
    assert_eq!(sim.phase(), Phase::BreakerOpen);
    for _ in 0..5 {
        sim.wait();
        sim.advance(secs(120));
        let fx = sim.probe_ok();
        assert!(fx.is_empty(), "{fx:?}");
        assert_eq!(sim.state.breaker, BreakerState::Open);
        assert_eq!(
            sim.deadline_in(),
            Some(secs(30)),
            "probes go on at the interval"
        );
    }
    sim.apply(Event::ForceReopen);
    assert_eq!(sim.state.breaker, BreakerState::Open);

    // Back to Auto: the open timeout has long passed, so the next probe is the trial.
    sim.policy.mode = BreakerMode::Auto;
    sim.apply(Event::SpecChanged);
    assert_eq!(sim.deadline_in(), None, "the force reopen is still pending");
    sim.start();
    assert_eq!(sim.state.breaker, BreakerState::HalfOpen);
    sim.succeed();
    assert_eq!(sim.state.breaker, BreakerState::Closed);
}

#[test]
fn disabled_never_opens_and_closes_an_open_breaker() {
    let mut sim = Sim::new(exact());
    for _ in 0..5 {
        sim.probe_fail(FailureKind::Outage);
        sim.wait();
    }
    assert_eq!(sim.state.breaker, BreakerState::Open);
    sim.policy.mode = BreakerMode::Disabled;
    assert_eq!(
        sim.apply(Event::SpecChanged),
        [Effect::BreakerChanged {
            from: BreakerState::Open,
            to: BreakerState::Closed
        }]
    );
    for _ in 0..30 {
        sim.probe_fail(FailureKind::Outage);
        assert_eq!(sim.state.breaker, BreakerState::Closed);
        sim.wait();
    }
    assert_eq!(sim.state.outage_streak, 35);

    // Back to Auto with the streak over the threshold: the breaker opens at once.
    sim.policy.mode = BreakerMode::Auto;
    assert_eq!(sim.apply(Event::SpecChanged), [opened()]);
}

#[test]
fn spec_change_stales_the_probe_and_rescales_the_backoff() {
    let mut sim = Sim::new(exact());
    for _ in 0..3 {
        sim.probe_fail(FailureKind::Config);
        sim.wait();
    }
    assert_eq!(sim.state.current_backoff, Some(secs(4)));
    sim.start();
    let seq = sim.state.probe_seq;
    sim.policy.initial_delay = secs(10);
    sim.policy.max_delay = secs(15);
    sim.apply(Event::SpecChanged);
    assert_eq!(sim.state.probe_seq, seq + 1);
    assert_eq!(sim.state.current_backoff, Some(secs(15)));
}

#[test]
fn phases() {
    let policy = exact();
    let mut sim = Sim::new(policy);
    assert_eq!(sim.phase(), Phase::Pending);
    sim.start();
    assert_eq!(sim.phase(), Phase::Pending, "still in flight");
    sim.apply(Event::ProbeSucceeded {
        seq: sim.state.probe_seq,
        degraded: true,
    });
    assert_eq!(sim.phase(), Phase::Degraded);
    sim.wait();
    sim.probe_ok();
    assert_eq!(sim.phase(), Phase::Healthy);
    sim.wait();
    sim.probe_fail(FailureKind::Outage);
    assert_eq!(sim.phase(), Phase::Recovering);
    sim.wait();
    sim.probe_fail(FailureKind::Config);
    assert_eq!(sim.phase(), Phase::ConfigError);
    sim.wait();
    sim.probe_ok();
    assert_eq!(sim.phase(), Phase::Healthy);
}

#[test]
fn jitter_stays_within_bounds_and_differs_between_seeds() {
    let policy = Policy::default(); // jitter 0.1
    let exact = exact();
    for i in 0..12 {
        let d = backoff_delay(&exact, SEED, i);
        for seed in 0..200 {
            let j = backoff_delay(&policy, seed, i);
            assert!(j <= d, "index {i} seed {seed}: {j:?} > {d:?}");
            assert!(
                j >= d.mul_f64(0.9),
                "index {i} seed {seed}: {j:?} < 0.9×{d:?}"
            );
        }
        assert_eq!(
            backoff_delay(&policy, SEED, i),
            backoff_delay(&policy, SEED, i),
            "deterministic"
        );
    }
    // At the cap too, seeds spread the delays.
    let capped: std::collections::HashSet<Duration> = (0..50)
        .map(|seed| backoff_delay(&policy, seed, 9))
        .collect();
    assert!(capped.len() > 40, "{capped:?}");
    // Just past the cap (1s × 2^6 = 64s > 60s) the jitter band is below the cap, not clipped.
    for i in [6, 7, 9, 30] {
        let at_cap = (0..200)
            .filter(|&seed| backoff_delay(&policy, seed, i) == secs(60))
            .count();
        assert!(at_cap <= 2, "index {i}: {at_cap} of 200 delays unjittered");
    }
    assert_ne!(backoff_delay(&policy, 1, 9), backoff_delay(&policy, 2, 9));
}

#[test]
fn clamped_brings_out_of_range_values_into_range() {
    let policy = Policy {
        initial_delay: secs(5),
        max_delay: secs(1),
        max_attempts: 0,
        multiplier: f64::NAN,
        jitter: 7.0,
        failure_threshold: 0,
        success_threshold: 0,
        interval: Duration::ZERO,
        ..Policy::default()
    }
    .clamped();
    assert_eq!(policy.max_attempts, 1);
    assert_eq!(policy.failure_threshold, 1);
    assert_eq!(policy.success_threshold, 1);
    assert_eq!(policy.multiplier, 1.0);
    assert_eq!(policy.jitter, 1.0);
    assert_eq!(policy.max_delay, secs(5));
    assert_eq!(policy.interval, MIN_DURATION);
}

#[test]
fn clamped_keeps_the_defaults() {
    assert_eq!(Policy::default().clamped(), Policy::default());
}

#[test]
fn max_attempts_one_cools_down_after_every_failure() {
    let mut sim = Sim::new(Policy {
        max_attempts: 1,
        mode: BreakerMode::Disabled,
        ..exact()
    });
    for _ in 0..3 {
        let fx = sim.probe_fail(FailureKind::Outage);
        assert!(
            matches!(fx.last(), Some(Effect::CooldownStarted { .. })),
            "{fx:?}"
        );
        assert_eq!(sim.deadline_in(), Some(secs(300)));
        sim.wait();
    }
}

impl Sim {
    /// Start then fail a probe now, with the fleet guard's hold as given.
    fn probe_fail_guarded(&mut self, hold: bool) -> Vec<Effect> {
        let mut fx = self.start();
        let seq = self.state.probe_seq;
        let (state, more) = apply_guarded(
            &self.state,
            Event::ProbeFailed {
                seq,
                kind: FailureKind::Outage,
            },
            self.now,
            &self.policy,
            hold,
        );
        self.state = state;
        fx.extend(more);
        fx
    }
}

#[test]
fn a_held_breaker_stays_closed_and_counts_until_a_failure_without_the_hold() {
    let mut sim = Sim::new(exact());
    for _ in 0..4 {
        assert!(sim.probe_fail_guarded(true).is_empty());
        sim.wait();
    }
    // The fifth failure would open it: held instead, reported once.
    let held_at = sim.now;
    assert_eq!(sim.probe_fail_guarded(true), vec![Effect::OpeningHeld]);
    assert_eq!(sim.state.breaker, BreakerState::Closed);
    assert_eq!(sim.state.held_since, Some(held_at));
    assert_eq!(sim.phase(), Phase::Recovering);
    sim.wait();
    // Still held: counted and backed off, no second report, and starting a probe does not open
    // it (the mode check waits for a failure to decide).
    assert!(sim.probe_fail_guarded(true).is_empty());
    assert_eq!((sim.state.consecutive_failures, sim.state.attempts), (6, 6));
    assert_eq!(sim.state.current_backoff, Some(secs(32)));
    sim.wait();
    assert!(sim.start().is_empty());
    assert_eq!(sim.state.breaker, BreakerState::Closed);
    // The guard clears: the next failure opens it.
    let seq = sim.state.probe_seq;
    assert_eq!(
        sim.apply(Event::ProbeFailed {
            seq,
            kind: FailureKind::Outage
        }),
        vec![opened()]
    );
    assert_eq!(sim.state.held_since, None);
    assert_eq!(sim.state.open_count, 1);
}

#[test]
fn a_success_ends_a_hold_and_half_open_is_never_held() {
    let mut sim = Sim::new(exact());
    for _ in 0..5 {
        sim.probe_fail_guarded(true);
        sim.wait();
    }
    assert!(sim.state.held_since.is_some());
    let fx = sim.probe_ok();
    assert_eq!(fx, vec![Effect::Recovered]);
    assert_eq!(sim.state.held_since, None);
    assert_eq!(sim.phase(), Phase::Healthy);
    // Open it for real, then fail the trial with the hold: it reopens.
    for _ in 0..5 {
        sim.probe_fail(FailureKind::Outage);
        sim.wait();
    }
    assert_eq!(sim.state.breaker, BreakerState::Open);
    sim.wait();
    let fx = sim.probe_fail_guarded(true);
    assert!(fx.contains(&Effect::BreakerChanged {
        from: BreakerState::HalfOpen,
        to: BreakerState::Open
    }));
    assert_eq!(sim.state.held_since, None);
}

#[test]
fn the_deadline_says_why() {
    let mut sim = Sim::new(exact());
    let due = |sim: &Sim| next_due(&sim.state, &sim.policy);
    assert_eq!(due(&sim), (None, Due::First));
    sim.probe_ok();
    assert_eq!(due(&sim), (Some(add(sim.now, secs(30))), Due::Interval));
    sim.wait();
    sim.probe_fail(FailureKind::Outage);
    assert_eq!(due(&sim), (Some(add(sim.now, secs(1))), Due::Backoff));
    for _ in 0..4 {
        sim.wait();
        sim.probe_fail(FailureKind::Outage);
    }
    assert_eq!(sim.state.breaker, BreakerState::Open);
    assert_eq!(due(&sim).1, Due::Trial);
    sim.apply(Event::ProbeRequested);
    assert_eq!(due(&sim), (None, Due::Requested));
    // next_deadline is next_due's instant, whatever the reason.
    assert_eq!(next_deadline(&sim.state, &sim.policy), due(&sim).0);
}
