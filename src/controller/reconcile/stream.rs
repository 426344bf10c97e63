//! The reconcile's steps that use the pool's probe stream while its target is healthy.
//!
//! Lives here: asking the stream (`Run::share`: probe, take a result or join the probe in
//! flight), a taken result as the pool's own outcome (`Run::stream_outcome`; applied by
//! `reconcile/apply.rs` like any other) and planning the next
//! probe on the stream's grid (`Run::align`). Must not live here: the streams themselves and the
//! key (`sharing`), the rule (`dbpool-recovery`'s `share.rs`), the rest of the pipeline
//! (`reconcile`).

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::{Run, Source, apply::Outcome, decide::probe_target};
use crate::{
    api::DbPool,
    controller::{
        context::{Context, Plan, Reason},
        credentials::Credentials,
        fleet::Seen,
        names::pool_labels,
        sharing::{Decision, IN_FLIGHT_GRACE, ShareKey, SharedResult},
    },
    recovery,
};

impl Run {
    /// Step 2c (the target is not known down): ask the pool's probe stream whether a result of
    /// an equivalent probe answers for this pool (see `sharing`). Waits for a probe in flight
    /// at most the pool's timeout plus [`IN_FLIGHT_GRACE`]; a pool due "now" keeps the instant
    /// it first became due as its deadline (`Wants`).
    pub(super) async fn share(
        &mut self,
        pool: &DbPool,
        ctx: &Context,
        creds: &Credentials,
    ) -> Source {
        let key = ShareKey::of(&ctx.parts.prober, &probe_target(pool, creds));
        self.stream = Some(key.clone());
        let bound = self.policy.timeout.saturating_add(IN_FLIGHT_GRACE);
        let give_up = tokio::time::Instant::now() + bound;
        let now = Timestamp::now();
        // A requested probe (the connection was lost) takes only what its stream saw since the
        // request; an early trial what it saw since the readiness edge (one credentialed trial
        // per credential key per edge: the first pool probes, the others join or take it).
        let deadline = self.memory.next(&self.policy, now).at;
        let state = &self.memory.state;
        let asked = (state.probe_requested, state.trial_requested);
        let due = self.memory.wants.stream_due(deadline, asked);
        loop {
            // Past the bound nobody is waited for: the decision is a probe or a result.
            let waiting = if tokio::time::Instant::now() < give_up {
                bound
            } else {
                Duration::ZERO
            };
            let decision = ctx.parts.streams.decide(
                &self.key,
                &key,
                &self.memory.state,
                &self.policy,
                due,
                Timestamp::now(),
                waiting,
            );
            match decision {
                Decision::Probe(ticket) => return Source::Own(Some(ticket)),
                Decision::Take(result) => return Source::Stream(result),
                Decision::Join(mut ended) => {
                    // Ended, dropped, or the bound passed: decide again either way.
                    let _ = tokio::time::timeout_at(give_up, ended.changed()).await;
                }
            }
        }
    }

    /// Step 3 for a result of the pool's probe stream: the pool's own probe, started and
    /// finished at the instant the real probe finished (so the next deadline is planned from
    /// it), reported to the observer as shared and counted as a shared result, not as a probe.
    /// Applied like any result (through the fleet guard too: a shared path failure must not
    /// open a breaker the guard holds).
    pub(super) fn stream_outcome(&mut self, ctx: &Context, result: SharedResult) -> Outcome {
        let at = result.finished();
        let seq = self.start_probe(at);
        if let Some(metrics) = ctx.door.metrics() {
            metrics.result_shared(&pool_labels(&self.key));
        }
        let seen = if result.kind.is_none() {
            Seen::Healthy
        } else {
            Seen::Failed {
                path: result.path_evidence,
            }
        };
        Outcome {
            seq,
            at,
            kind: result.kind,
            degraded: result.degraded,
            seen: Some(seen),
            peer: result.peer,
            observed: Some((result.latency, false, true)),
            summary: result.summary,
        }
    }

    /// After a result: a steady pool that asked a probe stream plans its next probe at the
    /// stream's grid point (`aligned_deadline`), when that is before the engine's deadline;
    /// every other pool on the engine's deadline.
    pub(super) fn align(&mut self, ctx: &Context) {
        let anchor = self
            .stream
            .as_ref()
            .and_then(|key| ctx.parts.streams.anchor(key, self.policy.interval));
        self.align_on(anchor);
    }

    /// [`Run::align`] on the grid anchored at `anchor` (None: the pool asked no stream, or the
    /// stream has no result yet).
    pub(super) fn align_on(&mut self, anchor: Option<Timestamp>) {
        self.memory.plan = Plan::Engine;
        let state = &self.memory.state;
        if !recovery::is_steady(state) {
            return;
        }
        if let (Some(anchor), Some(last), Some(deadline)) = (
            anchor,
            state.last_probe_at,
            recovery::next_deadline(state, &self.policy),
        ) {
            // On the grid, a stable offset after it (never after the engine's deadline).
            let offset = recovery::grid_offset(state.seed, &self.policy);
            if let Some(point) =
                recovery::aligned_deadline(anchor, self.policy.interval, last, deadline)
            {
                let at = recovery::add(point, offset).min(deadline);
                self.memory.plan = Plan::At(at, Reason::StreamGrid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::{
        controller::{context::PoolMemory, testing},
        recovery::{Event, FailureKind},
    };

    /// A run of a pool whose last probe, at `t`, ended as `kind` says.
    fn run_after(t: Timestamp, kind: Option<FailureKind>) -> Run {
        let pool = testing::pool("orders");
        let policy = pool.spec.policy();
        let mut run = Run::new(&pool, PoolMemory::restore(&pool, None, &policy, t));
        let seq = run.start_probe(t);
        let event = match kind {
            None => Event::ProbeSucceeded {
                seq,
                degraded: false,
            },
            Some(kind) => Event::ProbeFailed { seq, kind },
        };
        run.memory.apply(event, t, &policy, &mut Vec::new());
        run
    }

    #[test]
    fn a_steady_pool_plans_on_its_streams_grid_never_after_its_own_deadline() {
        let last = Timestamp::from_second(1_800_000_000).expect("valid");
        let mut run = run_after(last, None);
        let deadline = recovery::next_deadline(&run.memory.state, &run.policy).expect("steady");
        // The stream's grid started 10 s into the pool's 30 s interval.
        run.align_on(Some(recovery::add(last, Duration::from_secs(10))));
        let Plan::At(at, Reason::StreamGrid) = run.memory.plan else {
            panic!("on the grid: {:?}", run.memory.plan);
        };
        assert!(
            at <= deadline && at > last,
            "{at} within ({last}, {deadline}]"
        );
        // No stream result yet: the engine's deadline.
        run.align_on(None);
        assert_eq!(run.memory.plan, Plan::Engine);
        // A failing pool follows its backoff, whatever the grid.
        let mut failing = run_after(last, Some(FailureKind::Outage));
        failing.align_on(Some(last));
        assert_eq!(failing.memory.plan, Plan::Engine);
    }
}
