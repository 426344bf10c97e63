//! One reconcile of one pool, as a pipeline of short steps.
//!
//! Lives here: [`reconcile`] and its steps: recall the pool's memory, load its credentials,
//! apply the [`triggers`](super::triggers), probe when due (or take the result of the target's
//! shared attempt while it is down, or of the pool's probe stream while it is healthy), record metrics, hand what a user
//! would see changed (status, label, events) to the pool's writer without waiting for it, store
//! the memory and requeue at the engine's next deadline; and [`error_policy`]. The steps that
//! use the pool's probe stream are in `reconcile/stream.rs`; the write step and which changes
//! are transitions (`is_transition`) in `reconcile/outbox.rs`. Must not live here: the engine's rules (`dbpool-recovery`),
//! the shape of the status (`status`), the wording of events (`events`) or the writes
//! themselves (`write`).

use std::{sync::Arc, time::Duration};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp};
use kube::{
    ResourceExt,
    runtime::{controller::Action, events::EventType, reflector::ObjectRef},
};
use tracing::warn;

use super::{
    Error,
    context::{Context, PoolMemory, owner_key, pool_labels},
    credentials::{CredentialError, Credentials},
    fleet::{self, Seen},
    observer::ProbeObservation,
    sharing::{ShareKey, SharedResult, Ticket},
    targets::{Claim, SharedFailure},
    triggers::{Observed, Trigger, triggers},
};
use crate::{
    api::{
        BreakerMode, BreakerState, DbPool, FORCE_REOPEN_ANNOTATION, ForceReopenRecord, Hold,
        ProbeOutcome, ProbeStage, ProbeSummary, RELEASED_BY_ANNOTATION, reason,
    },
    probe::ProbeTarget,
    recovery::{self, Effect, Event, FailureKind, Policy, add},
};

/// Where a due pool's probe result comes from.
enum Source {
    /// A probe of its own; with a ticket when it is its probe stream's probe in flight.
    Own(Option<Ticket>),
    /// The latest failed attempt of its target, which is down (see `targets`).
    DownTarget(SharedFailure),
    /// Another owner's equivalent probe (see `sharing`).
    Stream(SharedResult),
}

/// What one reconcile works on: the pool's memory and the effects gathered so far.
struct Run {
    key: ObjectRef<DbPool>,
    /// The maintenance hold the annotations declare (the policy is then ForcedOpen).
    hold: Option<Hold>,
    policy: Policy,
    memory: PoolMemory,
    effects: Vec<Effect>,
    /// Events of this reconcile that no engine effect describes (holds set and released).
    notes: Vec<(EventType, &'static str, String)>,
    /// The probe stream this reconcile asked (see `sharing`), if it did.
    stream: Option<ShareKey>,
}

/// Reconciles one pool: see the module comment for the steps.
pub(super) async fn reconcile(pool: Arc<DbPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let (mut run, connection_lost) = Run::recall(&pool, &ctx);
    let credentials = load_credentials(&pool, &ctx).await;
    if let Err(err @ CredentialError::NotSynced { .. }) = credentials {
        // Nothing is known about the Secrets yet; the Secret watch's first list triggers the
        // pool again. Recording this as a credentials state would make that list look like a
        // changed Secret.
        ctx.store_memory(&run.key, run.memory, false);
        return Err(err.into());
    }
    run.apply_triggers(&pool, connection_lost, &credentials);
    let mut due = run.probe_due();
    let mut source = Source::Own(None);
    if due && let Ok(creds) = &credentials {
        match run.claim_target(&pool, &ctx) {
            Claim::Probe => source = run.share(&pool, &ctx, creds).await,
            Claim::Attempt => {}
            Claim::Use(result) => source = Source::DownTarget(result),
            Claim::Wait(at) => {
                // The target is down and its next shared attempt will answer for this pool too.
                run.memory.not_before = Some(at);
                due = false;
            }
        }
    }
    if due && let Err(err) = run.probe(&pool, &ctx, credentials, source).await {
        if matches!(err, Error::Deleted) || !ctx.exists(&pool, &run.key) {
            ctx.forget(&run.key);
            return Ok(Action::await_change());
        }
        ctx.store_memory(&run.key, run.memory, false);
        return Err(err);
    }
    // Only a leader exports per-pool series (a deposed one must not keep a stale breaker).
    if ctx.gate.may_write() {
        ctx.metrics.pool_state(
            &pool_labels(&run.key),
            run.memory.state.breaker,
            run.memory.state.consecutive_failures,
        );
    }
    run.write(&pool, &ctx).await;
    let requeue = run.memory.requeue_after(&run.policy);
    // Deleted while this reconcile ran: remember nothing (no entry, series or probe connection).
    if !ctx.exists(&pool, &run.key) {
        ctx.forget(&run.key);
        return Ok(Action::await_change());
    }
    ctx.store_memory(&run.key, run.memory, true);
    Ok(Action::requeue(requeue))
}

/// Reads the Secrets the pool refers to (through the cache).
async fn load_credentials(pool: &DbPool, ctx: &Context) -> Result<Credentials, CredentialError> {
    let db = &pool.spec.database;
    ctx.secrets
        .load(
            &pool.namespace().unwrap_or_default(),
            &db.host,
            db.password_secret_ref.as_ref(),
            db.ca_secret_ref.as_ref(),
        )
        .await
}

impl Run {
    /// Step 1: the pool's memory in this process, or a new one rebuilt from its status; and
    /// whether its probe connection was lost since the last reconcile.
    fn recall(pool: &DbPool, ctx: &Context) -> (Self, bool) {
        let key = ObjectRef::from_obj(pool);
        let hold = Hold::from_annotations(pool.annotations());
        let mut policy = pool.spec.policy();
        if hold.is_some() {
            // A hold is breaker.mode ForcedOpen set outside the spec, which GitOps would revert.
            policy.mode = BreakerMode::ForcedOpen;
        }
        let (memory, requested_at) = ctx.take_memory(pool, &key);
        let connection_lost = requested_at.is_some();
        let mut memory = memory.unwrap_or_else(|| {
            // First reconcile of this pool in this process: its series start at 0 (only a
            // leader exports per-pool series).
            if ctx.gate.may_write() {
                ctx.metrics.pool_seen(&pool_labels(&key));
            }
            let memory = PoolMemory::restore(pool, &policy, Timestamp::now());
            let held = memory.state.held_since.is_some();
            ctx.fleet
                .restored(&key, &spec_target_key(pool), &memory.state, held);
            memory
        });
        if let Some(at) = requested_at {
            memory.requested_at.get_or_insert(at);
        }
        let run = Self {
            key,
            hold,
            policy,
            memory,
            effects: Vec::new(),
            notes: Vec::new(),
            stream: None,
        };
        (run, connection_lost)
    }

    /// Step 2: feed the engine what changed since the last reconcile.
    fn apply_triggers(
        &mut self,
        pool: &DbPool,
        connection_lost: bool,
        credentials: &Result<Credentials, CredentialError>,
    ) {
        let now = Timestamp::now();
        let fingerprint = match credentials {
            Ok(c) => c.fingerprint.clone(),
            Err(e) => format!("error: {e}"),
        };
        let token = pool.annotations().get(FORCE_REOPEN_ANNOTATION).cloned();
        let hold = self.hold.as_ref().map(Hold::describe);
        let observed = Observed {
            known_hold: self.memory.hold.as_deref(),
            hold: hold.as_deref(),
            known_generation: self.memory.generation,
            generation: pool.metadata.generation,
            force_reopen_token: token.as_deref(),
            handled_token: self
                .memory
                .last_force_reopen
                .as_ref()
                .map(|r| r.token.as_str()),
            connection_lost,
            failing: self.memory.state.consecutive_failures > 0,
            known_fingerprint: self.memory.credentials_fingerprint.as_deref(),
            fingerprint: &fingerprint,
        };
        let fired = triggers(&observed);
        for trigger in fired {
            self.memory.aligned = None;
            self.memory
                .apply(trigger.event(), now, &self.policy, &mut self.effects);
            self.memory.not_before = match trigger {
                // A connection that dies right after every probe must not become a probe loop.
                Trigger::ConnectionLost => self
                    .memory
                    .state
                    .last_probe_at
                    .map(|t| add(t, self.policy.initial_delay)),
                Trigger::SpecChanged
                | Trigger::HoldChanged
                | Trigger::ForceReopen
                | Trigger::CredentialsChanged => None,
            };
            match trigger {
                Trigger::SpecChanged => self.memory.generation = pool.metadata.generation,
                Trigger::ForceReopen => {
                    self.memory.last_force_reopen = token.clone().map(|token| ForceReopenRecord {
                        token,
                        time: MicroTime(now),
                    });
                }
                Trigger::HoldChanged => {
                    let note = match (&hold, &self.memory.hold) {
                        (Some(now), _) => (
                            EventType::Normal,
                            reason::HELD,
                            format!("circuit breaker {now}; probes continue, nothing closes it"),
                        ),
                        (None, before) => (
                            EventType::Normal,
                            reason::RELEASED,
                            format!(
                                "hold released by {} ({}); breaker.mode {:?} applies again",
                                pool.annotations()
                                    .get(RELEASED_BY_ANNOTATION)
                                    .map_or("an unknown user", String::as_str),
                                before.as_deref().unwrap_or("no hold recorded"),
                                pool.spec.breaker.mode
                            ),
                        ),
                    };
                    self.notes.push(note);
                    self.memory.hold = hold.clone();
                }
                Trigger::ConnectionLost | Trigger::CredentialsChanged => {}
            }
        }
        self.memory.credentials_fingerprint = Some(fingerprint);
    }

    /// Step 2b: ask the pool's target what to do (see `targets`). A requested probe (force
    /// reopen, lost connection, new Secret) always probes itself.
    fn claim_target(&mut self, pool: &DbPool, ctx: &Context) -> Claim {
        if self.memory.state.probe_requested {
            return Claim::Probe;
        }
        let now = Timestamp::now();
        // A pool due "now" (never probed) keeps the instant it first became due, so a shared
        // result finished after it satisfies it (else it would chase every new attempt).
        let due = match recovery::next_deadline(&self.memory.state, &self.policy) {
            Some(deadline) => deadline,
            None => *self.memory.due_since.get_or_insert(now),
        };
        ctx.targets.claim(
            &spec_target_key(pool),
            &self.key,
            &self.policy,
            (due, self.memory.state.last_probe_at),
            now,
        )
    }

    /// Whether the engine's deadline (or the rate limit) says probe now.
    fn probe_due(&self) -> bool {
        let now = Timestamp::now();
        self.memory.deadline(&self.policy, now) <= now
    }

    /// Step 3: probe (or report the credentials' config error) and feed the result to the engine.
    /// An apiserver error reading a Secret ends the reconcile with an error instead.
    async fn probe(
        &mut self,
        pool: &DbPool,
        ctx: &Context,
        credentials: Result<Credentials, CredentialError>,
        source: Source,
    ) -> Result<(), Error> {
        let (shared, ticket) = match source {
            Source::Stream(result) => {
                self.take_shared(ctx, pool, result);
                self.align(ctx);
                return Ok(());
            }
            Source::DownTarget(failure) => (Some(failure), None),
            Source::Own(ticket) => (None, ticket),
        };
        let recovering = self.memory.state.consecutive_failures > 0
            || self.memory.state.breaker != BreakerState::Closed;
        self.memory.apply(
            Event::ProbeStarted,
            Timestamp::now(),
            &self.policy,
            &mut self.effects,
        );
        let seq = self.memory.state.probe_seq;
        let labels = pool_labels(&self.key);
        let (summary, kind, degraded, observed) = match credentials {
            // The target's latest failed attempt answers for this pool (no connection of its own).
            Ok(_) if let Some(shared) = shared => {
                ctx.observer.probe_finished(&ProbeObservation {
                    pool: &self.key,
                    // The instant the pool applies it (the engine plans from it), not the
                    // attempt's own finish.
                    finished: Timestamp::now(),
                    latency: Duration::from_millis(
                        u64::try_from(shared.summary.latency_ms).unwrap_or(0),
                    ),
                    outcome: shared.summary.outcome,
                    fresh_connection: false,
                    shared: true,
                });
                (
                    shared.summary,
                    Some(FailureKind::Outage),
                    false,
                    Some(Seen::Failed {
                        path: shared.path_evidence,
                    }),
                )
            }
            Ok(creds) => {
                let target = probe_target(pool, &creds);
                let target_key = target_key(&target);
                let report = {
                    let _slot = ctx
                        .probe_slots
                        .acquire(
                            self.key.namespace.as_deref().unwrap_or_default(),
                            &target_key,
                        )
                        .await;
                    // Deleted while queued for a slot: open no connection for it.
                    if !ctx.exists(pool, &self.key) {
                        ctx.targets.abandon(&target_key);
                        return Err(Error::Deleted);
                    }
                    let started = Timestamp::now();
                    let report = ctx.prober.probe(&owner_key(&self.key), &target).await;
                    (started, report)
                };
                let (started, report) = report;
                let finished = Timestamp::now();
                ctx.observer.probe_finished(&ProbeObservation {
                    pool: &self.key,
                    finished,
                    latency: report.latency,
                    outcome: report.outcome,
                    fresh_connection: report.fresh_connection,
                    shared: false,
                });
                if ctx.gate.may_write() {
                    ctx.metrics.probe_finished(
                        &labels,
                        report.outcome,
                        recovering,
                        &report.stage_latencies,
                    );
                }
                if report.is_success() {
                    // The gate follows the probe: only an address it just logged in at.
                    self.memory.gate_peer = report.peer;
                }
                let summary = ProbeSummary::from_report(&report, MicroTime(finished));
                ctx.targets
                    .record(&target_key, started, &summary, report.path_evidence);
                if let Some(ticket) = ticket {
                    ticket.finish(SharedResult {
                        summary: summary.clone(),
                        kind: report.outcome.failure_kind(),
                        degraded: report.pool_fits == Some(false),
                        latency: report.latency,
                        budget: target.timeout,
                        peer: report.peer.filter(|_| report.is_success()),
                        path_evidence: report.path_evidence,
                    });
                }
                let observed = if report.is_success() {
                    Seen::Healthy
                } else {
                    Seen::Failed {
                        path: report.path_evidence,
                    }
                };
                (
                    summary,
                    report.outcome.failure_kind(),
                    report.pool_fits == Some(false),
                    Some(observed),
                )
            }
            Err(err) if err.is_config() => {
                ctx.metrics
                    .probe_finished(&labels, ProbeOutcome::ConfigFailure, recovering, &[]);
                (
                    credential_failure(&err, Timestamp::now()),
                    Some(FailureKind::Config),
                    false,
                    None,
                )
            }
            Err(err) => return Err(err.into()),
        };
        let event = match kind {
            None => Event::ProbeSucceeded { seq, degraded },
            Some(kind) => Event::ProbeFailed { seq, kind },
        };
        fleet::apply_result(
            ctx,
            &self.key,
            &spec_target_key(pool),
            (event, observed),
            Timestamp::now(),
            &self.policy,
            &mut self.memory,
            &mut self.effects,
        );
        self.memory.last_probe = Some(summary);
        self.memory.not_before = None;
        self.memory.due_since = None;
        self.memory.requested_at = None;
        self.align(ctx);
        Ok(())
    }
}

/// What the probe needs from the spec and the Secrets.
fn probe_target(pool: &DbPool, creds: &Credentials) -> ProbeTarget {
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

/// The target key of a pool's spec (see [`target_key`]).
pub(super) fn spec_target_key(pool: &DbPool) -> String {
    let db = &pool.spec.database;
    format!(
        "{}:{}",
        db.host.to_ascii_lowercase(),
        u16::try_from(db.port).unwrap_or(5432)
    )
}

/// The target a probe slot is counted against: `host:port` as the spec writes it (lowercased).
/// Names are not resolved before a slot is granted (a lookup is part of the bounded probe), so
/// two names for one address count as two targets.
fn target_key(target: &ProbeTarget) -> String {
    format!("{}:{}", target.host.to_ascii_lowercase(), target.port)
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

/// A failed reconcile is retried after 1s, 2s, 4s … up to 60s.
pub(super) fn error_policy(pool: Arc<DbPool>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = ObjectRef::from_obj(pool.as_ref());
    if !ctx.exists(&pool, &key) {
        ctx.forget(&key);
        return Action::await_change();
    }
    let failures = ctx.count_error(&key);
    let delay = Duration::from_millis(500)
        .saturating_mul(1 << failures.min(7))
        .min(Duration::from_secs(60));
    if ctx.gate.may_write() {
        ctx.metrics.reconcile_failed(&pool_labels(&key));
    }
    warn!(pool = %key, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

mod outbox;
mod stream;
