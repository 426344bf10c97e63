//! Fair probe permits (a *slot* below is one permit of `--max-concurrent-probes`; a probe runs
//! only while it holds one): one namespace's slow or hanging probes cannot hold another namespace's
//! probes back, and a namespace that holds no slot never waits out someone else's timeouts.
//!
//! Lives here: [`ProbePermits`] (the `--max-concurrent-probes` slots) and [`ProbePermit`] (a held
//! slot, released on drop), which apply the pure rule in `policy` (no clock but the instants it
//! is given, no channels; property-tested there). Must not live here: when a pool is due (the
//! engine), the probe itself (`dbpool-probe`).
//!
//! **The rules.** Of `C` slots, `R = floor(C / 2)` are the *reserve* (32 of the default 64).
//! Waiters queue per namespace, first come first served within one; namespaces with waiters
//! stand in a ring, a newcomer at the back, and each free slot goes to the first namespace in
//! the ring that may take it, which then moves to the back (the others keep their places).
//! - A namespace holding **no** slot may take any free slot, the reserve included. Its first
//!   waiter whose target is under the target share goes first, else its first waiter.
//! - A namespace holding slots may take another (an *extra*) only if at most `C − R` slots are
//!   then in use — the reserve stays whole — and it holds fewer than its share,
//!   `ceil((C − R) / active namespaces)`, active meaning it asked for a slot within the last
//!   [`ACTIVE_WINDOW`](policy::ACTIVE_WINDOW) (2 minutes) or holds or waits for one.
//! - An extra goes to a waiter whose *target* (the spec's `host:port`, see `docs/design.md`
//!   "Fair probing") holds fewer than `ceil(C / active targets)` slots, active meaning holding or
//!   waiting for one.
//!
//! So the reserve is taken only by first slots, one per namespace, and refills before any
//! namespace gets an extra: a freed slot goes to a namespace holding none, or stays free.
//!
//! **Newcomers.** A namespace holding no slot is granted one in the same call it asks, without
//! waiting for any release, unless all `C` slots are held; and all are held only when at least
//! `R + 1` namespaces hold a slot (every extra leaves `R` free, so `C` slots in use take `R + 1`
//! first slots). Hence: while at most `R` other namespaces hold slots (32 with the default 64),
//! a namespace holding none never waits, however many pools they have, however long their
//! probes hang, in whatever order they came. No rule can do better without cancelling probes:
//! `C` namespaces with one hanging probe each hold every slot.
//!
//! **Established namespaces.** Newcomers cannot starve them: a namespace that waits holding
//! none is passed over by at most one grant per namespace ahead of it in the ring (newcomers
//! join behind it), so it is served within that many grants; one holding slots keeps them and
//! gets extras in turn whenever the reserve is whole. A newcomer takes at most one slot of the
//! reserve. Nobody waits forever unless hanging probes hold the slots it needs (all `C` for a
//! namespace holding none; the reserve, its share or its targets' share for one holding some),
//! and a probe hangs at most its timeout.

mod policy;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::sync::oneshot;

use self::policy::{Grant, Policy, WaiterId};
use super::sync::lock;

/// The probe slots of one controller.
pub(super) struct ProbePermits {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    policy: Policy,
    /// Where each waiting ask's slot goes.
    senders: HashMap<WaiterId, oneshot::Sender<ProbePermit>>,
}

/// A held probe slot; dropping it frees the slot and grants it to the next waiter.
pub(super) struct ProbePermit {
    inner: Arc<Mutex<Inner>>,
    namespace: String,
    target: String,
    armed: bool,
}

impl ProbePermits {
    /// `capacity` slots (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                policy: Policy::new(capacity),
                senders: HashMap::new(),
            })),
        }
    }

    /// Waits for a slot for a probe of `target` on behalf of a pool in `namespace`. Cancel-safe:
    /// a waiter dropped before its grant takes nothing, one dropped after frees its slot.
    pub async fn acquire(&self, namespace: &str, target: &str) -> ProbePermit {
        let (id, rx) = {
            let mut inner = lock(&self.inner);
            let (tx, rx) = oneshot::channel();
            let (id, grants) = inner.policy.ask(namespace, target, Instant::now());
            inner.senders.insert(id, tx);
            deliver(&mut inner, &self.inner, grants);
            (id, rx)
        };
        let mut pending = Pending {
            inner: &self.inner,
            id,
            done: false,
        };
        let granted = rx.await;
        pending.done = true;
        match granted {
            Ok(slot) => slot,
            // The sender lives in `inner` until it has sent: unreachable, but a slot that
            // counts nothing is harmless.
            Err(_) => ProbePermit {
                inner: self.inner.clone(),
                namespace: namespace.to_owned(),
                target: target.to_owned(),
                armed: false,
            },
        }
    }
}

/// An ask waiting for its slot. Dropped before the grant, it withdraws the ask; a slot already
/// sent is then dropped with the receiver, which frees it.
struct Pending<'a> {
    inner: &'a Arc<Mutex<Inner>>,
    id: WaiterId,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut inner = lock(self.inner);
        inner.senders.remove(&self.id);
        let grants = inner.policy.cancel(self.id);
        deliver(&mut inner, self.inner, grants);
    }
}

/// Sends each granted slot to its waiter; a slot whose waiter is gone is given back at once
/// (without re-entering the lock), which may grant further slots.
fn deliver(inner: &mut Inner, shared: &Arc<Mutex<Inner>>, grants: Vec<Grant>) {
    let mut grants = grants;
    while let Some(grant) = grants.pop() {
        let slot = ProbePermit {
            inner: shared.clone(),
            namespace: grant.namespace,
            target: grant.target,
            armed: true,
        };
        let sent = match inner.senders.remove(&grant.id) {
            Some(tx) => tx.send(slot),
            None => Err(slot),
        };
        if let Err(mut slot) = sent {
            slot.armed = false;
            let more = inner
                .policy
                .release(&slot.namespace, &slot.target, Instant::now());
            grants.extend(more);
        }
    }
}

impl Drop for ProbePermit {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        let shared = self.inner.clone();
        let mut inner = lock(&shared);
        let grants = inner
            .policy
            .release(&self.namespace, &self.target, Instant::now());
        deliver(&mut inner, &shared, grants);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `fut` is ready at once.
    fn now_or_never<T>(fut: impl std::future::Future<Output = T>) -> Option<T> {
        futures::FutureExt::now_or_never(fut)
    }

    #[tokio::test]
    async fn namespaces_are_served_round_robin() {
        let slots = Arc::new(ProbePermits::new(1));
        let held = slots.acquire("a", "t0").await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (ns, target) in [("a", "t1"), ("a", "t2"), ("a", "t3"), ("b", "t4")] {
            let (slots, order) = (slots.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _slot = slots.acquire(ns, target).await;
                lock(&order).push(target);
            }));
            // Queue them in this order.
            tokio::task::yield_now().await;
        }
        drop(held);
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(*lock(&order), ["t1", "t4", "t2", "t3"]);
    }

    #[tokio::test]
    async fn one_namespace_leaves_the_reserve_to_newcomers() {
        let slots = ProbePermits::new(16);
        let mut held = Vec::new();
        for i in 0..16 {
            if let Some(slot) = now_or_never(slots.acquire("hog", &format!("t{i}"))) {
                held.push(slot);
            }
        }
        assert_eq!(held.len(), 8, "16 slots less the reserve of 8");
        assert!(now_or_never(slots.acquire("other", "good")).is_some());
    }

    #[tokio::test]
    async fn issue_23_many_hostile_namespaces_do_not_block_a_newcomer() {
        let slots = ProbePermits::new(64);
        let asks: Vec<(String, String)> = [(5, 16), (20, 4)]
            .into_iter()
            .flat_map(|(namespaces, pools)| {
                (0..namespaces).flat_map(move |ns| {
                    (0..pools).map(move |i| (format!("h{namespaces}-{ns}"), format!("h{ns}-{i}")))
                })
            })
            .collect();
        let mut held = Vec::new();
        let mut queued = Vec::new();
        for (ns, target) in &asks {
            let mut acquire = Box::pin(slots.acquire(ns, target));
            match now_or_never(&mut acquire) {
                Some(slot) => held.push(slot),
                None => queued.push(acquire),
            }
        }
        // The hanging probes never end; two innocent namespaces come and go.
        for innocent in ["tenant-a", "tenant-b"] {
            let slot = now_or_never(slots.acquire(innocent, "db:5432"));
            assert!(
                slot.is_some(),
                "{innocent} waits with {} slots held",
                held.len()
            );
        }
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_takes_nothing() {
        let slots = ProbePermits::new(1);
        let held = now_or_never(slots.acquire("a", "t")).expect("a free slot");
        assert!(now_or_never(slots.acquire("b", "t")).is_none());
        drop(held);
        assert_eq!(lock(&slots.inner).policy.in_use(), 0);
        assert!(now_or_never(slots.acquire("c", "t")).is_some());
    }

    #[tokio::test]
    async fn one_target_holds_at_most_its_share() {
        let slots = ProbePermits::new(64);
        let others: Vec<_> = ["b", "c", "d"]
            .iter()
            .map(|t| now_or_never(slots.acquire("ns", t)).expect("a free slot"))
            .collect();
        // Four active targets: ceil(64 / 4) = 16 each; the 17th probe of `a` waits.
        let mut waiting = Vec::new();
        let mut a = Vec::new();
        for _ in 0..20 {
            let mut acquire = Box::pin(slots.acquire("ns", "a"));
            match now_or_never(&mut acquire) {
                Some(slot) => a.push(slot),
                None => waiting.push(acquire),
            }
        }
        assert_eq!(a.len(), 16);
        assert!(now_or_never(slots.acquire("ns", "b")).is_some());
        drop(others);
    }
}
