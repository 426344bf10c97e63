//! Steps 2b and 3 of the reconcile: is a probe due, where does its result come from, and
//! getting it.
//!
//! Lives here: `Run::decide` (due? then the target's word: probe, make the shared attempt,
//! take its latest failure, or wait for it; or the probe stream's), `Run::probe` (the result of
//! each source as an [`Outcome`], handed to the one apply step), the pool's own probe under a
//! probe permit, the credentials' config failure, and what the probe needs from the spec
//! ([`probe_target`]). Must not live here: applying a result (`reconcile/apply.rs`), the
//! shared schedules (`targets`, `sharing`), the probe itself (`dbpool-probe`).

use std::time::Duration;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp};

use super::{Run, Source, apply::Outcome};
use crate::{
    api::{BreakerState, DbPool, ProbeOutcome, ProbeStage, ProbeSummary},
    controller::{
        Error,
        context::{Context, Plan, Reason},
        credentials::Credentials,
        error::CredentialError,
        fleet::Seen,
        names::{PoolRef, owner_key, pool_labels, spec_target_key},
        sharing::{SharedResult, Ticket},
        targets::{Claim, SharedFailure},
    },
    probe::{PingTarget, ProbeReport, ProbeTarget, STAGES},
    recovery::{self, Event, FailureKind},
};

impl Run {
    /// Step 2b: None when no probe is due (or the target's next shared attempt will answer);
    /// else where the result comes from. A requested probe (force reopen, lost connection, new
    /// Secret) always probes itself.
    pub(super) async fn decide(
        &mut self,
        pool: &DbPool,
        ctx: &Context,
        credentials: &Result<Credentials, CredentialError>,
    ) -> Option<Source> {
        if !self.probe_due() {
            return None;
        }
        let Ok(creds) = credentials else {
            return Some(Source::Own(None));
        };
        match self.claim_target(pool, ctx) {
            Claim::Probe => Some(self.share(pool, ctx, creds).await),
            Claim::Attempt => Some(Source::Attempt),
            Claim::Alone => Some(Source::Own(None)),
            Claim::Use(result) => Some(Source::DownTarget(result)),
            Claim::Wait(at) => {
                // The target is down and its next shared attempt will answer for this pool too.
                self.memory.plan = Plan::At(at, Reason::TargetAttempt);
                None
            }
        }
    }

    /// Whether the pool's next action (see `context::schedule`) is now.
    fn probe_due(&self) -> bool {
        let now = Timestamp::now();
        self.memory.next(&self.policy, now).at <= now
    }

    /// Asks the pool's target what to do (see `targets`). A requested probe and an early trial
    /// (the target was seen accepting again) do not wait for the target's shared attempt; nor
    /// does a due probe in the reconcile of a readiness edge: the engine grants no trial when
    /// the pool's own scheduled probe is due already ("it goes ahead as it is"), and a pool
    /// whose target is down has that probe waiting for the target's next shared attempt,
    /// seconds to a minute away, so the edge would otherwise be lost.
    fn claim_target(&mut self, pool: &DbPool, ctx: &Context) -> Claim {
        let state = &self.memory.state;
        if state.probe_requested || state.trial_requested || self.readiness_edge {
            return Claim::Probe;
        }
        let now = Timestamp::now();
        let engine = recovery::next_deadline(&self.memory.state, &self.policy);
        let due = self.memory.wants.target_due(engine, now);
        ctx.parts.targets.claim(
            &spec_target_key(pool),
            &self.key,
            &self.policy,
            (due, self.memory.state.last_probe_at),
            now,
        )
    }

    /// Step 3: the result from `source` (or the credentials' config error), applied. An
    /// apiserver error reading a Secret ends the reconcile with an error instead.
    pub(super) async fn probe(
        &mut self,
        pool: &DbPool,
        ctx: &Context,
        credentials: Result<Credentials, CredentialError>,
        source: Source,
    ) -> Result<(), Error> {
        let ping = credentials
            .as_ref()
            .ok()
            .map(|creds| PingTarget::from(&probe_target(pool, creds)));
        let outcome = match (source, credentials) {
            (Source::Stream(result), _) => self.stream_outcome(ctx, result),
            (Source::DownTarget(failure), Ok(_)) => self.down_target_outcome(failure),
            (Source::Own(ticket), Ok(creds)) => {
                let held = ticket.map_or(Held::Nothing, Held::Stream);
                self.own_probe(pool, ctx, &creds, held).await?
            }
            (Source::Attempt, Ok(creds)) => {
                self.own_probe(pool, ctx, &creds, Held::TargetAttempt)
                    .await?
            }
            (_, Err(err)) if err.is_config() => self.config_failure(ctx, &err),
            (_, Err(err)) => return Err(err.into()),
        };
        self.apply(ctx, &spec_target_key(pool), outcome);
        self.align(ctx);
        self.await_readiness(pool, ctx, ping);
        Ok(())
    }

    /// Starts a probe in the engine at `at`; returns its sequence number.
    pub(super) fn start_probe(&mut self, at: Timestamp) -> u64 {
        self.memory
            .apply(Event::ProbeStarted, at, &self.policy, &mut self.effects);
        self.memory.state.probe_seq
    }

    /// Whether the pool is recovering (failing, or its breaker not Closed): probe metrics
    /// count recovery attempts apart.
    fn recovering(&self) -> bool {
        self.memory.state.consecutive_failures > 0
            || self.memory.state.breaker != BreakerState::Closed
    }

    /// The target's latest failed attempt answers for this pool (no connection of its own).
    fn down_target_outcome(&mut self, failure: SharedFailure) -> Outcome {
        let now = Timestamp::now();
        let seq = self.start_probe(now);
        let latency = u64::try_from(failure.summary.latency_ms).unwrap_or(0);
        Outcome {
            seq,
            // The instant the pool applies it (the engine plans from it), not the attempt's own
            // finish.
            at: now,
            kind: Some(FailureKind::Outage),
            degraded: false,
            seen: Some(Seen::Failed {
                path: failure.path_evidence,
            }),
            peer: None,
            observed: Some((Duration::from_millis(latency), false, true)),
            summary: failure.summary,
        }
    }

    /// Credentials that cannot be used: a config failure, counted as a probe.
    fn config_failure(&mut self, ctx: &Context, err: &CredentialError) -> Outcome {
        let recovering = self.recovering();
        let now = Timestamp::now();
        let seq = self.start_probe(now);
        if let Some(metrics) = ctx.door.metrics() {
            metrics.probe_finished(
                &crate::controller::names::pool_labels(&self.key),
                ProbeOutcome::ConfigFailure,
                recovering,
                &[],
            );
        }
        Outcome {
            seq,
            at: now,
            summary: credential_failure(err, now),
            kind: Some(FailureKind::Config),
            degraded: false,
            // A Secret problem says nothing about the path.
            seen: None,
            peer: None,
            observed: None,
        }
    }

    /// A probe of the pool's own, under a probe permit fair across namespaces and targets; its
    /// result is recorded for the target and, for a stream's probe, published to the stream.
    async fn own_probe(
        &mut self,
        pool: &DbPool,
        ctx: &Context,
        creds: &Credentials,
        mut held: Held,
    ) -> Result<Outcome, Error> {
        let recovering = self.recovering();
        // Taken on readiness evidence: the server just came back (see probe_adaptive).
        let after_edge = self.memory.state.trial_requested || self.readiness_edge;
        let seq = self.start_probe(Timestamp::now());
        let target = probe_target(pool, creds);
        let target_key = spec_target_key(pool);
        let (started, (report, budget)) = {
            let namespace = self.key.namespace.as_deref().unwrap_or_default();
            let _permit = ctx.probe_permits.acquire(namespace, &target_key).await;
            // Holding a permit, its probe is worth waiting for in every namespace.
            match &mut held {
                Held::Stream(ticket) => ticket.permitted(),
                Held::TargetAttempt => ctx.parts.targets.permitted(&target_key),
                Held::Nothing => {}
            }
            // Deleted while queued for a permit: open no connection for it.
            if !ctx.exists(pool, &self.key) {
                ctx.parts.targets.abandon(&target_key);
                return Err(Error::Deleted);
            }
            let started = Timestamp::now();
            let probed =
                probe_adaptive(ctx, (&self.key, pool, after_edge), &target, &target_key).await;
            (started, probed)
        };
        let finished = Timestamp::now();
        if let Some(metrics) = ctx.door.metrics() {
            let labels = crate::controller::names::pool_labels(&self.key);
            metrics.probe_finished(&labels, report.outcome, recovering, &report.stage_latencies);
        }
        let summary = ProbeSummary::from_report(&report, MicroTime(finished));
        let success = report.is_success();
        ctx.parts
            .targets
            .record(&target_key, started, &summary, report.path_evidence);
        if let Held::Stream(ticket) = held {
            ticket.finish(shared_result(&report, &summary, budget));
        }
        Ok(Outcome {
            seq,
            at: finished,
            summary,
            kind: report.outcome.failure_kind(),
            degraded: report.pool_fits == Some(false),
            seen: Some(if success {
                Seen::Healthy
            } else {
                Seen::Failed {
                    path: report.path_evidence,
                }
            }),
            // The gate follows the probe: only an address it just logged in at.
            peer: report.peer,
            observed: Some((report.latency, report.fresh_connection, false)),
        })
    }
}

/// The pool's own probe, each stage limited by the target's learned timeout when the spec
/// wants adaptive timeouts; the target's learner takes the report, the pool's gauges the
/// timeout its stages get. Also the budget its failure stands for on the probe stream: the
/// longest stage limit when limits applied (a failure cut short by them says nothing to a pool
/// that would wait its whole timeout), else the spec's timeout.
///
/// A probe taken on readiness evidence (an early trial, or the due probe of an edge's
/// reconcile) gets the spec's timeout, not the learned one: the server has just come back, and
/// its first logins (cold caches, a checkpoint after redo) are slower than the latency learned
/// while it was healthy. Cut at the learned floor, the trial failed and the next edge had to
/// wait a whole backoff delay (the recovery bench: one 3 s outage Ready after 4.1 s instead of
/// ≤ 0.35 s). The learner still takes the report, so a slow first login raises the timeout.
async fn probe_adaptive(
    ctx: &Context,
    (key, pool, after_edge): (&PoolRef, &DbPool, bool),
    target: &ProbeTarget,
    target_key: &str,
) -> (ProbeReport, Duration) {
    let ceiling = target.timeout;
    let enabled = pool.spec.health_check.adaptive_timeout && !after_edge;
    let timeouts = &ctx.parts.timeouts;
    let limits = timeouts.limits(key, target_key, enabled, ceiling);
    let budget = STAGES
        .iter()
        .filter_map(|stage| limits.get(*stage))
        .max()
        .unwrap_or(ceiling);
    let report = ctx
        .parts
        .prober
        .probe_within(&owner_key(key), target, limits)
        .await;
    let learned = timeouts.learn(key, target_key, &report, ceiling);
    if let (Some(metrics), Some(learned)) = (ctx.door.metrics(), learned) {
        let timeout = if enabled { learned.timeout } else { ceiling };
        metrics.probe_timeout(&pool_labels(key), timeout, learned.srtt);
    }
    (report, budget)
}

/// What a probe of the pool's own stands for besides the pool while it runs.
enum Held {
    /// Only the pool.
    Nothing,
    /// Its probe stream's probe in flight.
    Stream(Ticket),
    /// The shared attempt of its target, which is down.
    TargetAttempt,
}

/// A probe's result as the other owners of its stream take it.
fn shared_result(report: &ProbeReport, summary: &ProbeSummary, budget: Duration) -> SharedResult {
    SharedResult {
        summary: summary.clone(),
        kind: report.outcome.failure_kind(),
        degraded: report.pool_fits == Some(false),
        latency: report.latency,
        budget,
        peer: report.peer.filter(|_| report.is_success()),
        path_evidence: report.path_evidence,
    }
}

/// What the probe needs from the spec and the Secrets.
pub(super) fn probe_target(pool: &DbPool, creds: &Credentials) -> ProbeTarget {
    let db = &pool.spec.database;
    ProbeTarget {
        host: db.host.clone(),
        port: u16::try_from(db.port).unwrap_or(5432),
        dbname: db.dbname.clone(),
        user: db.user.clone(),
        password: creds.password.clone(),
        allow_md5: db.allow_md5,
        ssl_mode: db.ssl_mode,
        ca_pem: creds.ca_pem.clone(),
        target_session_attrs: db.target_session_attrs,
        application_name: db.application_name.clone(),
        pool_max_size: u32::try_from(pool.spec.pool.max_size).unwrap_or(0),
        timeout: pool.spec.health_check.timeout.as_std(),
    }
}

/// The status's lastProbe for credentials that could not be used.
fn credential_failure(err: &CredentialError, now: Timestamp) -> ProbeSummary {
    ProbeSummary {
        time: MicroTime(now),
        outcome: ProbeOutcome::ConfigFailure,
        stage: Some(ProbeStage::Credentials),
        latency_ms: 0,
        message: Some(err.to_string()),
        sql_state: None,
        server_version: None,
        in_recovery: None,
        connections: None,
        max_connections: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{context::PoolMemory, testing};

    fn run() -> Run {
        let pool = testing::pool("orders");
        let policy = pool.spec.policy();
        Run::new(
            &pool,
            PoolMemory::restore(&pool, None, &policy, Timestamp::now()),
        )
    }

    #[test]
    fn a_down_targets_failure_is_this_pools_outage_at_the_instant_it_applies() {
        let mut run = run();
        let attempt = Timestamp::now();
        let failure = SharedFailure {
            finished: attempt,
            summary: testing::summary(ProbeOutcome::TransientFailure, attempt),
            path_evidence: true,
        };
        let before = run.memory.state.probe_seq;
        let outcome = run.down_target_outcome(failure);
        assert_eq!(outcome.seq, run.memory.state.probe_seq);
        assert!(outcome.seq != before, "a probe of its own was started");
        assert!(outcome.at >= attempt);
        assert_eq!(outcome.kind, Some(FailureKind::Outage));
        assert_eq!(outcome.seen, Some(Seen::Failed { path: true }));
        assert_eq!(outcome.peer, None);
        let (_, fresh, shared) = outcome.observed.expect("observed");
        assert!(!fresh && shared);
    }

    #[test]
    fn the_probe_target_carries_the_spec_and_the_secrets() {
        let pool = testing::pool("orders");
        let creds = Credentials {
            password: None,
            ca_pem: None,
            fingerprint: String::new(),
        };
        let target = probe_target(&pool, &creds);
        assert_eq!((target.host.as_str(), target.port), ("h", 5432));
        assert_eq!(target.timeout, pool.spec.health_check.timeout.as_std());
        let failure = credential_failure(
            &CredentialError::KeyMissing {
                namespace: "ns".into(),
                name: "s".into(),
                key: "k".into(),
            },
            Timestamp::now(),
        );
        assert_eq!(failure.outcome, ProbeOutcome::ConfigFailure);
        assert_eq!(failure.stage, Some(ProbeStage::Credentials));
    }
}
