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
    /// it first became due as its deadline (`due_since`).
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
        // request.
        let deadline = self.memory.next(&self.policy, now).at;
        let requested = self.memory.state.probe_requested;
        let due = self.memory.wants.stream_due(deadline, requested);
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
        self.memory.plan = Plan::Engine;
        let Some(key) = &self.stream else { return };
        if !recovery::is_steady(&self.memory.state) {
            return;
        }
        let state = &self.memory.state;
        if let (Some(anchor), Some(last), Some(deadline)) = (
            ctx.parts.streams.anchor(key),
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
