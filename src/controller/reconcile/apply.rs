//! Step 4 of the reconcile: apply one probe result, whoever probed.
//!
//! Lives here: [`Outcome`] (a result as the pipeline applies it: the pool's own probe, the
//! target's shared attempt while it is down, or another owner's result through the probe
//! stream) and `Run::apply`, the one function that applies it: the fleet guard's word, the
//! engine, the hold counter, the pool's last probe and gate address, its scheduling markers,
//! the observer. Must not live here: getting the result (`reconcile/decide.rs`,
//! `reconcile/stream.rs`), the guard's rule (`fleet`, `dbpool-recovery`), the engine's rules.

use std::{net::SocketAddr, time::Duration};

use k8s_openapi::jiff::Timestamp;

use super::Run;
use crate::{
    api::ProbeSummary,
    controller::{
        context::{Context, Plan, Wants},
        fence::Door,
        fleet::Fleet,
        fleet::Seen,
        observer::Observer,
        observer::ProbeObservation,
    },
    recovery::{Effect, Event, FailureKind},
};

/// One probe result, as the pipeline applies it.
pub(super) struct Outcome {
    /// The engine's sequence number of the probe it answers (`Run::start_probe`).
    pub seq: u64,
    /// When the engine takes it: it plans the next probe from this instant.
    pub at: Timestamp,
    /// The status's lastProbe.
    pub summary: ProbeSummary,
    /// `None` for a success.
    pub kind: Option<FailureKind>,
    /// The success did not leave room for `pool.maxSize`.
    pub degraded: bool,
    /// What it tells the fleet guard (None: a Secret problem says nothing about the path).
    pub seen: Option<Seen>,
    /// The address a successful login reached: the only address a gate may point at.
    pub peer: Option<SocketAddr>,
    /// For the observer: (probe latency, fresh connection, shared); None: not a probe.
    pub observed: Option<(Duration, bool, bool)>,
}

/// What applying a result touches besides the run.
pub(super) struct Sinks<'a> {
    /// The fleet guard.
    pub fleet: &'a Fleet,
    /// The door (the hold counter is a metric: only a leader counts).
    pub door: &'a Door,
    /// Told about each result.
    pub observer: &'a dyn Observer,
}

impl<'a> Sinks<'a> {
    /// The sinks of `ctx`.
    pub fn of(ctx: &'a Context) -> Self {
        Self {
            fleet: &ctx.parts.fleet,
            door: &ctx.door,
            observer: ctx.observer.as_ref(),
        }
    }
}

impl Run {
    /// Step 4 (through the context's sinks): see [`Run::apply_to`].
    pub(super) fn apply(&mut self, ctx: &Context, target: &str, outcome: Outcome) {
        self.apply_to(&Sinks::of(ctx), target, outcome);
    }

    /// Applies `outcome` of the pool's `target`: the fleet guard hears it (unless it says
    /// nothing about the path) and says whether a failure must be held from opening the
    /// breaker; the engine takes it; a hold that starts is counted; the pool keeps it as its
    /// last probe (and a success's address for its gate); the markers that waited for a result
    /// are cleared; the observer hears of it.
    pub(super) fn apply_to(&mut self, sinks: &Sinks<'_>, target: &str, outcome: Outcome) {
        let Outcome { seq, at, .. } = outcome;
        let event = match outcome.kind {
            None => Event::ProbeSucceeded {
                seq,
                degraded: outcome.degraded,
            },
            Some(kind) => Event::ProbeFailed { seq, kind },
        };
        let hold = outcome.seen.is_some_and(|seen| {
            sinks
                .fleet
                .observe(&self.key, target, seen, &self.memory.state, at)
        });
        let before = self.effects.len();
        self.memory
            .apply_guarded(event, at, &self.policy, hold, &mut self.effects);
        if self.effects[before..].contains(&Effect::OpeningHeld)
            && let Some(metrics) = sinks.door.metrics()
        {
            metrics.fleet_opening_held();
        }
        if outcome.kind.is_none() {
            self.memory.gate_peer = outcome.peer;
        }
        if let Some((latency, fresh_connection, shared)) = outcome.observed {
            sinks.observer.probe_finished(&ProbeObservation {
                pool: &self.key,
                finished: at,
                latency,
                outcome: outcome.summary.outcome,
                fresh_connection,
                shared,
            });
        }
        self.memory.last_probe = Some(outcome.summary);
        self.memory.plan = Plan::Engine;
        self.memory.wants = Wants::default();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::{
        api::ProbeOutcome,
        controller::{
            api_permits::ApiPermits,
            context::{PoolMemory, Reason},
            fence::Fence,
            fence::Leadership,
            testing,
        },
        metrics::Metrics,
        recovery::BreakerState,
    };

    fn run() -> Run {
        let pool = testing::pool("orders");
        let memory = PoolMemory::restore(&pool, None, &pool.spec.policy(), Timestamp::now());
        Run::new(&pool, memory)
    }

    #[derive(Default)]
    struct Seen(Mutex<Vec<(bool, ProbeOutcome)>>);

    impl Observer for Seen {
        fn probe_finished(&self, probe: &ProbeObservation<'_>) {
            if let Ok(mut seen) = self.0.lock() {
                seen.push((probe.shared, probe.outcome));
            }
        }
    }

    fn outcome(run: &mut Run, kind: Option<FailureKind>, path: bool) -> Outcome {
        let at = Timestamp::now();
        let seq = run.start_probe(at);
        let outcome_of = if kind.is_none() {
            ProbeOutcome::Success
        } else {
            ProbeOutcome::TransientFailure
        };
        let summary = testing::summary(outcome_of, at);
        Outcome {
            seq,
            at,
            summary,
            kind,
            degraded: false,
            seen: Some(if kind.is_none() {
                super::Seen::Healthy
            } else {
                super::Seen::Failed { path }
            }),
            peer: Some("127.0.0.1:5432".parse().expect("addr")),
            observed: Some((Duration::from_millis(3), false, false)),
        }
    }

    struct Parts {
        fleet: Fleet,
        door: Door,
        observer: Arc<Seen>,
        metrics: Arc<Metrics>,
    }

    fn parts(leadership: Leadership) -> Parts {
        let metrics = Arc::new(Metrics::new());
        let (tx, rx) = tokio::sync::watch::channel(leadership);
        std::mem::forget(tx);
        Parts {
            fleet: Fleet::new(testing::fleet_settings(), metrics.clone()),
            door: Door::new(
                Fence::new(rx),
                Arc::new(ApiPermits::new(1)),
                metrics.clone(),
            ),
            observer: Arc::new(Seen::default()),
            metrics,
        }
    }

    fn sinks(parts: &Parts) -> Sinks<'_> {
        Sinks {
            fleet: &parts.fleet,
            door: &parts.door,
            observer: parts.observer.as_ref(),
        }
    }

    #[test]
    fn a_success_clears_the_markers_and_keeps_the_address_for_the_gate() {
        let parts = parts(Leadership::Standby);
        let mut run = run();
        run.memory.plan = Plan::NotBefore(Timestamp::now(), Reason::LostConnection);
        run.memory.wants.requested(Timestamp::now());
        run.memory.wants.target_due(None, Timestamp::now());
        let result = outcome(&mut run, None, false);
        let peer = result.peer;
        run.apply_to(&sinks(&parts), "db:5432", result);
        assert_eq!(run.memory.gate_peer, peer);
        assert_eq!(run.memory.plan, Plan::Engine);
        assert_eq!(run.memory.wants, Wants::default());
        assert_eq!(
            run.memory.last_probe.as_ref().map(|p| p.outcome),
            Some(ProbeOutcome::Success)
        );
        assert_eq!(
            *parts.observer.0.lock().expect("lock"),
            [(false, ProbeOutcome::Success)]
        );
    }

    #[test]
    fn failures_open_the_breaker_and_keep_the_last_good_address() {
        let parts = parts(Leadership::Standby);
        let mut run = run();
        let first = outcome(&mut run, None, false);
        run.apply_to(&sinks(&parts), "db:5432", first);
        let peer = run.memory.gate_peer;
        for _ in 0..5 {
            let failed = outcome(&mut run, Some(FailureKind::Outage), false);
            run.apply_to(&sinks(&parts), "db:5432", failed);
        }
        assert_eq!(run.memory.state.breaker, BreakerState::Open);
        assert_eq!(run.memory.gate_peer, peer);
        assert!(run.effects.iter().any(|e| matches!(
            e,
            Effect::BreakerChanged {
                to: BreakerState::Open,
                ..
            }
        )));
    }

    #[test]
    fn a_held_opening_is_counted_only_by_a_leader() {
        for (leadership, counted) in [
            (Leadership::Standby, false),
            (
                Leadership::Leading {
                    epoch: None,
                    valid_until: tokio::time::Instant::now() + Duration::from_secs(60),
                },
                true,
            ),
        ] {
            let parts = parts(leadership);
            // Three healthy targets in two namespaces, then all fail on the path: suspect.
            let mut runs: Vec<(Run, String)> = (0..3)
                .map(|i| {
                    let mut pool = testing::pool("orders");
                    pool.metadata.name = Some(format!("p{i}"));

                    let memory =
                        PoolMemory::restore(&pool, None, &pool.spec.policy(), Timestamp::now());
                    (Run::new(&pool, memory), format!("db{i}:5432"))
                })
                .collect();
            for (run, target) in &mut runs {
                let ok = outcome(run, None, false);
                run.apply_to(&sinks(&parts), target, ok);
            }
            for _ in 0..5 {
                for (run, target) in &mut runs {
                    let failed = outcome(run, Some(FailureKind::Outage), true);
                    run.apply_to(&sinks(&parts), target, failed);
                }
            }
            let held = runs
                .iter()
                .any(|(run, _)| run.effects.contains(&Effect::OpeningHeld));
            assert!(held, "the guard held an opening");
            let text = parts.metrics.encode();
            let sample = text
                .lines()
                .find(|l| l.starts_with("dbpool_fleet_held_openings_total "))
                .and_then(|l| l.split_whitespace().nth(1))
                .map(str::to_owned);
            assert_eq!(sample.as_deref() != Some("0"), counted, "{sample:?}");
        }
    }
}
