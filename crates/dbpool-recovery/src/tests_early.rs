//! Example-based tests of the early trial: who gets one, what its result changes, and how often.

use std::time::Duration;

use super::sim::{Sim, exact, secs};
use super::*;
use crate::{BreakerMode, BreakerState, Phase};

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Sim {
    fn probe(&mut self, outcome: Option<FailureKind>) -> Vec<Effect> {
        let mut fx = self.apply(Event::ProbeStarted);
        let seq = self.state.probe_seq;
        fx.extend(self.apply(match outcome {
            Some(kind) => Event::ProbeFailed { seq, kind },
            None => Event::ProbeSucceeded {
                seq,
                degraded: false,
            },
        }));
        fx
    }

    /// `n` outage failures, each at its deadline.
    fn fail_on_schedule(&mut self, n: usize) {
        for _ in 0..n {
            self.wait();
            self.probe(Some(FailureKind::Outage));
        }
    }

    fn edge(&mut self) -> bool {
        let fx = self.apply(Event::ReadinessAccepting);
        fx.contains(&Effect::EarlyTrialGranted)
    }
}

#[test]
fn a_recovering_pool_tries_at_once_and_a_failed_trial_keeps_the_schedule() {
    let mut sim = Sim::new(exact());
    sim.fail_on_schedule(3); // at 0, 1, 3 s; the next at 7 s
    assert_eq!(phase(&sim.state), Phase::Recovering);
    assert_eq!(sim.state.current_backoff, Some(secs(4)));
    sim.advance(ms(500));
    assert!(sim.edge());
    assert_eq!(next_deadline(&sim.state, &sim.policy), None);
    sim.apply(Event::ProbeStarted);
    assert_eq!(sim.state.trial_seq, Some(sim.state.probe_seq));
    let seq = sim.state.probe_seq;
    let fx = sim.apply(Event::ProbeFailed {
        seq,
        kind: FailureKind::Outage,
    });
    assert!(fx.is_empty(), "{fx:?}");
    // Counted towards the breaker, not towards the cycle.
    assert_eq!(sim.state.consecutive_failures, 4);
    assert_eq!(sim.state.outage_streak, 4);
    assert_eq!(sim.state.attempts, 3);
    assert_eq!(sim.state.current_backoff, Some(secs(4)));
    assert_eq!(sim.state.trial_seq, None);
    // The next scheduled probe waits the current delay from the trial's failure.
    assert_eq!(sim.deadline_in(), Some(secs(4)));
    // One trial per scheduled probe: another edge now grants nothing.
    assert!(!sim.edge());
    sim.advance(secs(3));
    assert!(!sim.edge());
}

#[test]
fn a_successful_trial_recovers_at_once() {
    let mut sim = Sim::new(exact());
    sim.fail_on_schedule(2);
    sim.advance(ms(300));
    assert!(sim.edge());
    let fx = sim.probe(None);
    assert!(fx.contains(&Effect::Recovered), "{fx:?}");
    assert_eq!(phase(&sim.state), Phase::Healthy);
    assert_eq!(sim.deadline_in(), Some(sim.policy.interval));
    // Healthy pools get no trial.
    assert!(!sim.edge());
}

#[test]
fn a_trial_while_open_counts_as_a_half_open_success() {
    for (threshold, closed) in [(1, true), (2, false)] {
        let mut sim = Sim::new(Policy {
            success_threshold: threshold,
            ..exact()
        });
        sim.fail_on_schedule(5);
        assert_eq!(sim.state.breaker, BreakerState::Open);
        let since = sim.state.breaker_since;
        sim.advance(secs(10));
        // A failed trial leaves the breaker's clock alone.
        assert!(sim.edge());
        sim.probe(Some(FailureKind::Outage));
        assert_eq!(sim.state.breaker, BreakerState::Open);
        assert_eq!(sim.state.breaker_since, since);
        assert_eq!(sim.state.attempts, 5);
        // The next scheduled probe (the half-open trial at openTimeout), then a trial that works.
        sim.wait();
        assert_eq!(sim.now, add(since.expect("opened"), secs(60)));
        sim.probe(Some(FailureKind::Outage));
        sim.advance(secs(20));
        assert!(sim.edge());
        let fx = sim.probe(None);
        let expected = if closed {
            BreakerState::Closed
        } else {
            BreakerState::HalfOpen
        };
        assert_eq!(sim.state.breaker, expected, "{fx:?}");
        assert_eq!(
            sim.state.half_open_successes,
            if closed { 0 } else { 1 },
            "{fx:?}"
        );
        assert!(fx.contains(&Effect::BreakerChanged {
            from: BreakerState::Open,
            to: BreakerState::HalfOpen
        }));
    }
}

#[test]
fn a_failed_trial_during_a_cooldown_keeps_the_cooldown() {
    let mut sim = Sim::new(Policy {
        mode: BreakerMode::Disabled,
        ..exact()
    });
    sim.fail_on_schedule(10);
    let until = sim.state.cooldown_until.expect("cooling down");
    assert_eq!(phase(&sim.state), Phase::CoolingDown);
    sim.advance(secs(100));
    assert!(sim.edge());
    sim.probe(Some(FailureKind::Outage));
    assert_eq!(sim.state.cooldown_until, Some(until));
    assert_eq!(sim.state.attempts, 10);
    assert_eq!(sim.state.consecutive_failures, 11);
    assert_eq!(next_deadline(&sim.state, &sim.policy), Some(until));
    // And a successful one ends it.
    sim.advance(secs(100));
    assert!(!sim.edge(), "one trial per scheduled probe");
    sim.wait();
    sim.probe(Some(FailureKind::Outage)); // the cooldown's end: a new cycle
    assert_eq!(sim.state.cooldown_until, None);
    sim.advance(ms(500));
    assert!(sim.edge());
    let fx = sim.probe(None);
    assert!(fx.contains(&Effect::Recovered));
}

#[test]
fn no_trial_when_forced_open_turned_off_misconfigured_or_due_anyway() {
    for policy in [
        Policy {
            mode: BreakerMode::ForcedOpen,
            ..exact()
        },
        Policy {
            early_trial: false,
            ..exact()
        },
    ] {
        let mut sim = Sim::new(policy);
        sim.fail_on_schedule(7);
        sim.advance(ms(100));
        let before = sim.state.clone();
        assert!(!sim.edge());
        assert_eq!(sim.state, before);
    }
    // ConfigError.
    let mut sim = Sim::new(exact());
    sim.probe(Some(FailureKind::Config));
    sim.advance(ms(100));
    assert!(!sim.edge());
    // Never probed.
    let mut sim = Sim::new(exact());
    assert!(!sim.edge());
    // The scheduled probe is due: it goes ahead as a scheduled probe.
    let mut sim = Sim::new(exact());
    sim.fail_on_schedule(2);
    sim.wait();
    assert!(!sim.edge());
    sim.probe(Some(FailureKind::Outage));
    assert_eq!(sim.state.attempts, 3);
}

#[test]
fn a_granted_trial_that_starts_late_is_the_scheduled_probe() {
    let mut sim = Sim::new(exact());
    sim.fail_on_schedule(2); // next at +2 s
    sim.advance(ms(100));
    assert!(sim.edge());
    // The caller was slow: the schedule's deadline passed before the probe started.
    sim.advance(secs(5));
    sim.probe(Some(FailureKind::Outage));
    assert_eq!(sim.state.attempts, 3, "counted as the scheduled probe");
    assert_eq!(sim.state.current_backoff, Some(secs(4)));
    // And the next edge may grant again.
    sim.advance(ms(100));
    assert!(sim.edge());
}

#[test]
fn trials_are_at_least_the_current_backoff_apart() {
    let mut sim = Sim::new(exact());
    sim.fail_on_schedule(5); // open; backoff 16 s, trial at openTimeout
    sim.advance(ms(100));
    assert!(sim.edge());
    let granted = sim.now;
    sim.probe(Some(FailureKind::Outage));
    assert_eq!(trial_gap(&sim.state, &sim.policy), secs(16));
    // A scheduled probe in between would allow another trial, but not within 16 s of the last.
    sim.state.trial_since_scheduled = false;
    sim.advance(secs(15));
    assert!(!sim.edge());
    sim.now = add(granted, secs(16));
    assert!(sim.edge());
}

#[test]
fn force_reopen_and_a_policy_without_trials_drop_a_granted_trial() {
    let mut sim = Sim::new(exact());
    sim.fail_on_schedule(2);
    sim.advance(ms(100));
    assert!(sim.edge());
    sim.policy.early_trial = false;
    sim.apply(Event::SpecChanged);
    assert!(!sim.state.trial_requested);
    assert_eq!(sim.deadline_in(), Some(ms(1900)));

    let mut sim = Sim::new(exact());
    sim.fail_on_schedule(2);
    sim.advance(ms(100));
    assert!(sim.edge());
    sim.apply(Event::ForceReopen);
    assert!(!sim.state.trial_requested);
    sim.probe(Some(FailureKind::Outage));
    // The force reopen's probe is an ordinary one: a new cycle.
    assert_eq!(sim.state.attempts, 1);
}
