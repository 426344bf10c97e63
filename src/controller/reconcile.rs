//! One reconcile of one pool, as a pipeline of short, named steps.
//!
//! Lives here: [`reconcile`] and [`error_policy`], the [`Run`] the steps work on, and the
//! steps, one file each:
//! 1. **observe** (`reconcile/observe.rs`): recall the pool's memory (or rebuild it from its
//!    status), load its credentials;
//! 2. **decide** (`reconcile/observe.rs`, `reconcile/decide.rs`): feed the engine the
//!    [`triggers`](super::triggers), ask whether a probe is due and where its result comes
//!    from (a probe of its own, the target's shared attempt while it is down, the pool's probe
//!    stream while it is healthy: `reconcile/stream.rs`);
//! 3. **probe** (`reconcile/decide.rs`): run it, or take the shared result;
//! 4. **apply** (`reconcile/apply.rs`): the one function that applies a result, whoever
//!    probed: fleet guard, engine, the pool's markers, the observer; then whether the pool
//!    waits for its target's readiness, and the readiness its status shows
//!    (`reconcile/readiness.rs`);
//! 5. **write** (`reconcile/outbox.rs`): hand what a user would see changed to the pool's
//!    writer, without waiting for it;
//! 6. **publish** ([`Run::publish_state`]): the pool's metric series, through the door (only a
//!    leader exports them); store the memory; requeue at the next deadline.
//!
//! Must not live here: the engine's rules (`dbpool-recovery`), the shape of the status
//! (`status`), the wording of events (`events`), the writes themselves (`write`).

mod apply;
mod decide;
mod observe;
mod outbox;
mod readiness;
mod stream;

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::{controller::Action, events::EventType, reflector::ObjectRef};
use tracing::{debug, warn};

use super::{
    Error,
    api_permits::apiserver_retry_delay,
    context::{Context, PoolMemory},
    error::CredentialError,
    names::{PoolRef, pool_labels},
    sharing::{ShareKey, SharedResult, Ticket},
    targets::SharedFailure,
};
use crate::{
    api::{DbPool, Hold},
    recovery::{Effect, Policy},
};

/// Where a due pool's probe result comes from.
enum Source {
    /// A probe of its own; with a ticket when it is its probe stream's probe in flight.
    Own(Option<Ticket>),
    /// The shared attempt of its target, which is down (see `targets`).
    Attempt,
    /// The latest failed attempt of its target, which is down (see `targets`).
    DownTarget(SharedFailure),
    /// Another owner's equivalent probe (see `sharing`).
    Stream(SharedResult),
}

/// What one reconcile works on: the pool's memory and the effects gathered so far.
struct Run {
    key: PoolRef,
    /// The maintenance hold the annotations declare (the policy is then ForcedOpen).
    hold: Option<Hold>,
    policy: Policy,
    memory: PoolMemory,
    effects: Vec<Effect>,
    /// Events of this reconcile that no engine effect describes (holds set and released).
    notes: Vec<(EventType, &'static str, String)>,
    /// The probe stream this reconcile asked (see `sharing`), if it did.
    stream: Option<ShareKey>,
    /// Whether this reconcile took a readiness edge (its target was seen accepting again).
    readiness_edge: bool,
}

/// Reconciles one pool: see the module comment for the steps.
pub(super) async fn reconcile(pool: Arc<DbPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let (mut run, connection_lost) = Run::recall(&pool, &ctx);
    let credentials = run.load_credentials(&pool, &ctx).await;
    if let Err(err @ CredentialError::NotSynced { .. }) = credentials {
        // Nothing is known about the Secrets yet; the Secret watch's first list triggers the
        // pool again. Recording this as a credentials state would make that list look like a
        // changed Secret.
        ctx.store_memory(&run.key, run.memory, false);
        return Err(err.into());
    }
    let readiness_edge = ctx.parts.pings.take_edge(&run.key);
    run.apply_triggers(&pool, (connection_lost, readiness_edge), &credentials);
    let Some(source) = run.decide(&pool, &ctx, &credentials).await else {
        run.await_readiness_without_result(&pool, &ctx, &credentials);
        return Ok(run.finish(&pool, &ctx).await);
    };
    if let Err(err) = run.probe(&pool, &ctx, credentials, source).await {
        if matches!(err, Error::Deleted) || !ctx.exists(&pool, &run.key) {
            ctx.forget(&run.key);
            return Ok(Action::await_change());
        }
        ctx.store_memory(&run.key, run.memory, false);
        return Err(err);
    }
    Ok(run.finish(&pool, &ctx).await)
}

impl Run {
    /// Steps 6 to 8: publish the state, write what a user would see changed, remember, and
    /// say when to come back.
    async fn finish(mut self, pool: &Arc<DbPool>, ctx: &Arc<Context>) -> Action {
        self.publish_state(ctx);
        self.write(pool, ctx).await;
        let requeue = self.memory.requeue_after(&self.policy);
        let next = self.memory.next(&self.policy, Timestamp::now());
        debug!(pool = %self.key, at = %next.at, why = ?next.why, "next action");
        // Deleted while this reconcile ran: remember nothing (no entry, series or probe
        // connection).
        if !ctx.exists(pool, &self.key) {
            ctx.forget(&self.key);
            return Action::await_change();
        }
        ctx.store_memory(&self.key, self.memory, true);
        Action::requeue(requeue)
    }

    /// Step 6: the pool's breaker and failure series, through the door (a deposed leader must
    /// not keep a stale breaker).
    fn publish_state(&self, ctx: &Context) {
        if let Some(metrics) = ctx.door.metrics() {
            for _ in self
                .effects
                .iter()
                .filter(|e| **e == Effect::EarlyTrialGranted)
            {
                metrics.early_trial_granted();
            }
            metrics.pool_state(
                &pool_labels(&self.key),
                self.memory.state.breaker,
                self.memory.state.consecutive_failures,
            );
        }
    }
}

/// A failed reconcile is retried after 1s, 2s, 4s … up to 60s ([`apiserver_retry_delay`]).
pub(super) fn error_policy(pool: Arc<DbPool>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = ObjectRef::from_obj(pool.as_ref());
    if !ctx.exists(&pool, &key) {
        ctx.forget(&key);
        return Action::await_change();
    }
    let delay = apiserver_retry_delay(ctx.count_error(&key));
    if let Some(metrics) = ctx.door.metrics() {
        metrics.reconcile_failed(&pool_labels(&key));
    }
    warn!(pool = %key, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}
