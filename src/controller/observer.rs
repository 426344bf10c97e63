//! A typed window into what the controller did, for the benchmark and tests.
//!
//! Lives here: the [`Observer`] trait that [`super::run_observed`] accepts, what it is told, and
//! [`Footprint`] (what a running controller keeps per pool, for the tests that check deleted
//! pools leave nothing behind).
//! Observers learn facts as values, never by parsing log text, so renaming a log field cannot
//! silently break a measurement. Must not live here: anything that changes behaviour; an
//! observer is called inline on the reconcile path and must return at once (push to a channel).

use std::{sync::Weak, time::Duration};

use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;

use crate::api::{DbPool, Phase, ProbeOutcome};

/// A probe result the controller applied to one pool: a probe it ran for the pool, or (with
/// `shared`) a result of the pool's probe stream it took instead of probing.
#[derive(Clone, Debug)]
pub struct ProbeObservation<'a> {
    /// The pool probed.
    pub pool: &'a ObjectRef<DbPool>,
    /// When the probe's result reached the controller (host wall clock). For a shared result,
    /// when the probe that made it finished: the pool records it as its own last probe, so its
    /// next probe is planned from this instant.
    pub finished: Timestamp,
    /// Wall time of the probe itself.
    pub latency: Duration,
    /// How it ended.
    pub outcome: ProbeOutcome,
    /// Whether it opened a new connection (false: it ran on the persistent one, or was shared).
    pub fresh_connection: bool,
    /// Whether this is another owner's probe result, taken instead of probing (no probe ran
    /// for this pool).
    pub shared: bool,
}

/// Told about the controller's probes and acknowledged status writes. Every method has an empty
/// default, so an observer implements only what it needs.
pub trait Observer: Send + Sync + 'static {
    /// A probe finished.
    fn probe_finished(&self, _probe: &ProbeObservation<'_>) {}
    /// The apiserver acknowledged a status write of `pool` at `at`, with this phase.
    fn status_written(&self, _pool: &ObjectRef<DbPool>, _at: Timestamp, _phase: Option<Phase>) {}
    /// A controller (one leadership term) started; `footprint` reads what it keeps per pool
    /// while it runs (it upgrades to None once the controller stopped).
    fn controller_started(&self, _footprint: Weak<dyn Footprint>) {}
}

/// What a running controller keeps per pool: one named count per part that keeps something per
/// pool (the pool registry, the prober's connection shares, the targets, the fleet guard, the
/// probe streams). All reach zero once every pool is deleted.
pub trait Footprint: Send + Sync {
    /// (part, pools it knows) for every part.
    fn pools_known(&self) -> Vec<(&'static str, usize)>;
}

/// The observer of a production operator: ignores everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoObserver;

impl Observer for NoObserver {}
