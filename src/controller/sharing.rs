//! Sharing probe results while a target is healthy: one probe stream per set of equivalent
//! probes, its results fanned out to every owner whose deadline they satisfy.
//!
//! Lives here: [`ShareKey`] (what makes two pools' probes equivalent), [`SharedResult`] (a real
//! probe's result as another owner takes it, and whether it fits that owner's timeout),
//! [`Streams`] (per key: the grid's anchor, the latest result, the probe in flight, its owners) with [`Streams::decide`]
//! and the [`Ticket`] a real probe holds while it runs. Must not live here: the decision rule
//! itself (`dbpool-recovery`'s `share.rs`, pure), what a result means for one pool (its own
//! engine), the shared schedule of a target that is down (`targets`).
//!
//! A stream is keyed by the prober's connection key (host, port, database, user, sslMode, CA,
//! application name, password) plus what else changes a probe's verdict: the role the pool asks
//! for (`targetSessionAttrs`), whether MD5 is allowed, and `pool.maxSize` (the saturation
//! verdict). A success or a server's answer (SQLSTATE, authentication) therefore only ever
//! reaches pools with the same credentials.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::watch;

use super::{
    names::{PerPool, PoolRef},
    sync::lock,
};
use crate::{
    api::{DbPool, ProbeOutcome, ProbeSummary, TargetSessionAttrs},
    probe::{ConnectionKey, ProbeTarget, Prober},
    recovery::{FailureKind, Policy, PoolState, ShareDecision, StreamView, share_decision},
};

/// A probe in flight is waited for at most the waiting pool's timeout plus this (time for a
/// probe slot, and for the result to reach the stream).
pub(super) const IN_FLIGHT_GRACE: Duration = Duration::from_secs(1);

/// What makes two pools' probes equivalent (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct ShareKey {
    connection: ConnectionKey,
    session_attrs: TargetSessionAttrs,
    allow_md5: bool,
    pool_max_size: u32,
}

impl ShareKey {
    /// The key of `target` as `prober` shares connections.
    pub fn of(prober: &Prober, target: &ProbeTarget) -> Self {
        Self {
            connection: prober.connection_key(target),
            session_attrs: target.target_session_attrs,
            allow_md5: target.allow_md5,
            pool_max_size: target.pool_max_size,
        }
    }
}

/// Most owners of one stream woken by the loss of its connection (the rest probe at their own
/// deadlines).
pub(super) const MAX_PEERS_WOKEN: usize = 10_000;

/// A real probe's result, as another owner of its stream takes it.
#[derive(Clone, Debug)]
pub(super) struct SharedResult {
    /// The status's lastProbe; its time is when the probe finished.
    pub summary: ProbeSummary,
    /// `None` for a success.
    pub kind: Option<FailureKind>,
    /// The success did not leave room for `pool.maxSize`.
    pub degraded: bool,
    /// Wall time of the probe.
    pub latency: Duration,
    /// The timeout the probe ran with.
    pub budget: Duration,
    /// The authenticated address (for a gate), on success.
    pub peer: Option<SocketAddr>,
    /// A failure that is evidence about the network path (for the fleet guard).
    pub path_evidence: bool,
}

impl SharedResult {
    /// When the probe finished.
    pub fn finished(&self) -> Timestamp {
        self.summary.time.0
    }

    /// Whether the result holds for a pool with `timeout`: it came within that timeout, and a
    /// failure came with at least as much budget (a probe cut short by a smaller timeout says
    /// nothing about a larger one) or is the server's own answer (a SQLSTATE: no timeout cut it
    /// short, so an early trial's 28P01 answers every pool of its credential key).
    pub fn fits(&self, timeout: Duration) -> bool {
        self.latency <= timeout
            && (self.summary.outcome == ProbeOutcome::Success
                || self.summary.sql_state.is_some()
                || self.budget >= timeout)
    }
}

/// What a due pool does, as [`Streams::decide`] answers.
pub(super) enum Decision {
    /// Probe for real, holding this ticket (the stream's probe in flight).
    Probe(Ticket),
    /// Take this result as the pool's own.
    Take(SharedResult),
    /// Wait for the probe in flight: this receiver changes when it ends.
    Join(watch::Receiver<u64>),
}

struct Stream {
    /// When its first result finished: with `phase`, the origin of its grid (see
    /// `aligned_deadline` and [`Streams::anchor`]).
    anchor: Option<Timestamp>,
    /// Where in the interval the stream's grid lies, as a share of it (in 2⁻³² units): see
    /// [`stream_phase`].
    phase: u32,
    latest: Option<SharedResult>,
    in_flight: usize,
    in_flight_since: Option<Timestamp>,
    /// The namespaces of probes in flight that still wait for their probe permit (one entry
    /// per probe): only owners in the same namespace wait for those (see [`Ticket::permitted`]).
    queued: Vec<String>,
    /// Bumped whenever a probe of the stream ends (with or without a result).
    ended: watch::Sender<u64>,
    owners: usize,
}

#[derive(Default)]
struct Inner {
    streams: HashMap<ShareKey, Stream>,
    owners: HashMap<ObjectRef<DbPool>, ShareKey>,
    /// Streams created so far (each new one takes the next [`stream_phase`]).
    created: u32,
}

/// The grid phase of the `n`-th stream this process created: the fractional parts of
/// `n × φ` (the golden ratio), a sequence that keeps any number of streams spread over the
/// interval (4 streams lie at least 14 % of it apart). Streams formed together (every
/// stream's first result came within the same second of an operator's start) would otherwise
/// put their grid points, and so the reconciles of all their owners, in the same second: at
/// 10,000 pools on 4 streams the probing pool of one stream waited behind the other streams'
/// 2,500 owners each (docs/benchmarks.md, issue 29: its probe 200–530 ms behind its grid).
fn stream_phase(n: u32) -> u32 {
    n.wrapping_mul(0x9e37_79b9)
}

impl Inner {
    /// Records `pool` as an owner of `key` only (leaving the stream it had).
    fn own(&mut self, pool: &ObjectRef<DbPool>, key: &ShareKey) {
        if self.owners.get(pool) == Some(key) {
            return;
        }
        if let Some(previous) = self.owners.insert(pool.clone(), key.clone()) {
            self.release(&previous);
        }
        let created = &mut self.created;
        self.streams
            .entry(key.clone())
            .or_insert_with(|| {
                let phase = stream_phase(*created);
                *created = created.wrapping_add(1);
                Stream {
                    anchor: None,
                    phase,
                    latest: None,
                    in_flight: 0,
                    in_flight_since: None,
                    queued: Vec::new(),
                    ended: watch::Sender::new(0),
                    owners: 0,
                }
            })
            .owners += 1;
    }

    /// One owner left `key`; a stream without owners or probes in flight is dropped.
    fn release(&mut self, key: &ShareKey) {
        if let Some(stream) = self.streams.get_mut(key) {
            stream.owners = stream.owners.saturating_sub(1);
            if stream.owners == 0 && stream.in_flight == 0 {
                self.streams.remove(key);
            }
        }
    }
}

impl Stream {
    /// Whether an owner in `namespace` may wait for the probes in flight: one of them holds its
    /// probe permit, or waits for it in this very namespace.
    fn worth_joining(&self, namespace: &str) -> bool {
        self.in_flight > self.queued.len() || self.queued.iter().any(|n| n == namespace)
    }

    /// One queued probe of `namespace` got its permit or ended.
    fn unqueue(&mut self, namespace: &str) {
        if let Some(i) = self.queued.iter().position(|n| n == namespace) {
            self.queued.swap_remove(i);
        }
    }
}

/// Every probe stream of one controller.
#[derive(Default)]
pub(super) struct Streams {
    inner: Arc<Mutex<Inner>>,
}

/// A real probe of a stream, in flight. [`Ticket::finish`] publishes its result; dropping it
/// unfinished (the probe did not run, or the reconcile was cancelled) only ends it, so waiting
/// owners decide again at once.
pub(super) struct Ticket {
    inner: Arc<Mutex<Inner>>,
    key: ShareKey,
    done: bool,
    /// The namespace of the probing pool while it waits for its probe permit.
    queued_in: Option<String>,
}

impl Ticket {
    /// The probe got its probe permit: from now on every owner may wait for it. Until then only
    /// owners in its own namespace do, so no pool waits in another namespace's permit queue
    /// (issue 23: a hostile namespace's hanging probes must not delay an innocent one).
    pub fn permitted(&mut self) {
        let Some(namespace) = self.queued_in.take() else {
            return;
        };
        let mut inner = lock(&self.inner);
        if let Some(stream) = inner.streams.get_mut(&self.key) {
            stream.unqueue(&namespace);
        }
    }

    /// Ends the probe with `result`, which becomes the stream's latest unless a newer one is.
    pub fn finish(mut self, result: SharedResult) {
        self.end(Some(result));
    }

    fn end(&mut self, result: Option<SharedResult>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let mut inner = lock(&self.inner);
        let Some(stream) = inner.streams.get_mut(&self.key) else {
            return;
        };
        if let Some(result) = &result {
            stream.anchor.get_or_insert(result.finished());
        }
        if let Some(result) = result
            && stream
                .latest
                .as_ref()
                .is_none_or(|l| l.finished() <= result.finished())
        {
            stream.latest = Some(result);
        }
        if let Some(namespace) = self.queued_in.take() {
            stream.unqueue(&namespace);
        }
        stream.in_flight = stream.in_flight.saturating_sub(1);
        if stream.in_flight == 0 {
            stream.in_flight_since = None;
        }
        stream.ended.send_modify(|n| *n = n.wrapping_add(1));
        if stream.owners == 0 && stream.in_flight == 0 {
            inner.streams.remove(&self.key);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.end(None);
    }
}

impl Streams {
    /// What `pool` (in `state`, with `policy`, due at `due`) does at `now` about the stream of
    /// `key`; records the pool as the stream's owner. A probe in flight longer than
    /// `in_flight_bound` is not waited for.
    #[allow(clippy::too_many_arguments)]
    pub fn decide(
        &self,
        pool: &ObjectRef<DbPool>,
        key: &ShareKey,
        state: &PoolState,
        policy: &Policy,
        due: Timestamp,
        now: Timestamp,
        in_flight_bound: Duration,
    ) -> Decision {
        let mut inner = lock(&self.inner);
        inner.own(pool, key);
        let Some(stream) = inner.streams.get_mut(key) else {
            // `own` just made it; never reached.
            return Decision::Probe(self.ticket(key, true));
        };
        let latest = stream
            .latest
            .as_ref()
            .filter(|result| result.fits(policy.timeout));
        let namespace = pool.namespace.clone().unwrap_or_default();
        let view = StreamView {
            latest: latest.map(SharedResult::finished),
            in_flight_since: stream
                .in_flight_since
                .filter(|_| stream.worth_joining(&namespace)),
        };
        match share_decision(state, policy, due, &view, now, in_flight_bound) {
            ShareDecision::Take => match latest {
                Some(result) => Decision::Take(result.clone()),
                None => Decision::Probe(self.ticket(key, true)),
            },
            ShareDecision::Join => Decision::Join(stream.ended.subscribe()),
            ShareDecision::Probe => {
                stream.in_flight += 1;
                stream.in_flight_since = Some(now);
                stream.queued.push(namespace.clone());
                let mut ticket = self.ticket(key, false);
                ticket.queued_in = Some(namespace);
                Decision::Probe(ticket)
            }
        }
    }

    fn ticket(&self, key: &ShareKey, done: bool) -> Ticket {
        Ticket {
            inner: Arc::clone(&self.inner),
            key: key.clone(),
            done,
            queued_in: None,
        }
    }

    /// The origin of the grid of `key`'s stream for owners probing every `interval`: when its
    /// first result finished, moved back by the stream's phase (a share of `interval`, see
    /// [`stream_phase`]), so that streams formed together have their grid points apart.
    pub fn anchor(&self, key: &ShareKey, interval: Duration) -> Option<Timestamp> {
        let inner = lock(&self.inner);
        let stream = inner.streams.get(key)?;
        let first = stream.anchor?;
        let share = u128::from(stream.phase);
        let back = interval.as_micros().saturating_mul(share) >> 32;
        let back = i64::try_from(back).ok()?;
        first
            .checked_sub(k8s_openapi::jiff::SignedDuration::from_micros(back))
            .ok()
    }

    /// The other owners of `pool`'s stream: when the connection its probes use dies, they are
    /// asked to probe too (only the pool that probed owns the connection). At most
    /// [`MAX_PEERS_WOKEN`] of them, so a loss costs a bounded scan.
    pub fn peers(&self, pool: &ObjectRef<DbPool>) -> Vec<ObjectRef<DbPool>> {
        let inner = lock(&self.inner);
        let Some(key) = inner.owners.get(pool) else {
            return Vec::new();
        };
        inner
            .owners
            .iter()
            .filter(|(owner, owned)| *owned == key && *owner != pool)
            .map(|(owner, _)| owner.clone())
            .take(MAX_PEERS_WOKEN)
            .collect()
    }

    /// Number of streams (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.inner).streams.len()
    }
}

impl PerPool for Streams {
    /// Forgets `pool` as an owner; a stream left without owners is dropped.
    fn forget(&self, pool: &PoolRef) {
        let mut inner = lock(&self.inner);
        if let Some(key) = inner.owners.remove(pool) {
            inner.release(&key);
        }
    }

    fn pools_known(&self) -> usize {
        lock(&self.inner).owners.len()
    }
}

#[cfg(test)]
mod tests;
