//! Fair probe slots: one namespace's slow or hanging probes cannot hold another namespace's
//! probes back.
//!
//! Lives here: [`ProbeSlots`] (the `--max-concurrent-probes` slots, granted round-robin across
//! namespaces, with a namespace share and a target share) and [`ProbeSlot`] (a held slot,
//! released on drop). Must not live here: when a pool is due (the engine), the probe itself
//! (`dbpool-probe`).
//!
//! **The rules.** Waiters queue per namespace, first come first served within one. Whenever a
//! slot frees, namespaces with a grantable waiter are served in turn (round-robin), so a
//! namespace with a thousand due pools gets one slot per turn like a namespace with one.
//! - A *target* (the spec's `host:port`, see `docs/design.md` "Fair probing") holds at most
//!   `ceil(slots / active targets)` slots, active meaning holding or waiting for one.
//! - A namespace holds at most `ceil(slots / active namespaces)` slots, active meaning it asked
//!   for a slot within the last [`ACTIVE_WINDOW`] or holds or waits for one; and never more than
//!   `slots − ceil(slots / 8)`, so a namespace that shows up while another one's probes hang
//!   finds a free slot at once instead of waiting out their timeouts.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use super::sync::lock;

/// A namespace that asked for a slot this recently still counts as active for the shares.
pub(super) const ACTIVE_WINDOW: Duration = Duration::from_secs(120);

/// The probe slots of one controller.
pub(super) struct ProbeSlots {
    inner: Arc<Mutex<Inner>>,
}

struct Waiter {
    target: String,
    tx: oneshot::Sender<ProbeSlot>,
}

struct Inner {
    capacity: usize,
    in_use: usize,
    by_namespace: HashMap<String, usize>,
    by_target: HashMap<String, usize>,
    /// Waiters per namespace, in arrival order.
    waiting: HashMap<String, VecDeque<Waiter>>,
    /// Namespaces with waiters, in the order they are served next.
    ring: VecDeque<String>,
    /// When each namespace last asked for a slot.
    recent: HashMap<String, Instant>,
}

/// A held probe slot; dropping it frees the slot and grants it to the next waiter.
pub(super) struct ProbeSlot {
    inner: Arc<Mutex<Inner>>,
    namespace: String,
    target: String,
    armed: bool,
}

impl ProbeSlots {
    /// `capacity` slots (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                capacity: capacity.max(1),
                in_use: 0,
                by_namespace: HashMap::new(),
                by_target: HashMap::new(),
                waiting: HashMap::new(),
                ring: VecDeque::new(),
                recent: HashMap::new(),
            })),
        }
    }

    /// Waits for a slot for a probe of `target` on behalf of a pool in `namespace`. Cancel-safe:
    /// a waiter dropped before its grant takes nothing, one dropped after frees its slot.
    pub async fn acquire(&self, namespace: &str, target: &str) -> ProbeSlot {
        let rx = {
            let mut inner = lock(&self.inner);
            let now = Instant::now();
            inner
                .recent
                .retain(|_, at| now.duration_since(*at) < ACTIVE_WINDOW);
            inner.recent.insert(namespace.to_owned(), now);
            let (tx, rx) = oneshot::channel();
            let queue = inner.waiting.entry(namespace.to_owned()).or_default();
            let was_empty = queue.is_empty();
            queue.push_back(Waiter {
                target: target.to_owned(),
                tx,
            });
            if was_empty && !inner.ring.iter().any(|n| n == namespace) {
                inner.ring.push_back(namespace.to_owned());
            }
            grant(&mut inner, &self.inner);
            rx
        };
        match rx.await {
            Ok(slot) => slot,
            // The sender lives in `inner`, which this `ProbeSlots` keeps alive, and is only
            // dropped after a send: unreachable, but a slot that counts nothing is harmless.
            Err(_) => ProbeSlot {
                inner: self.inner.clone(),
                namespace: namespace.to_owned(),
                target: target.to_owned(),
                armed: false,
            },
        }
    }
}

impl Inner {
    fn namespace_cap(&self) -> usize {
        let mut active: Vec<&String> = self.recent.keys().collect();
        for ns in self.by_namespace.keys().chain(self.waiting.keys()) {
            if !active.contains(&ns) {
                active.push(ns);
            }
        }
        let share = self.capacity.div_ceil(active.len().max(1));
        let headroom = self.capacity.div_ceil(8);
        share.min(self.capacity.saturating_sub(headroom).max(1))
    }

    fn target_cap(&self) -> usize {
        let mut active: Vec<&String> = self.by_target.keys().collect();
        for waiter in self.waiting.values().flatten() {
            if !waiter.tx.is_closed() && !active.contains(&&waiter.target) {
                active.push(&waiter.target);
            }
        }
        self.capacity.div_ceil(active.len().max(1))
    }
}

/// Grants free slots to waiters, serving namespaces round-robin.
fn grant(inner: &mut Inner, shared: &Arc<Mutex<Inner>>) {
    while inner.in_use < inner.capacity {
        let namespace_cap = inner.namespace_cap();
        let target_cap = inner.target_cap();
        let mut granted = false;
        for _ in 0..inner.ring.len() {
            let Some(namespace) = inner.ring.pop_front() else {
                break;
            };
            let held = inner.by_namespace.get(&namespace).copied().unwrap_or(0);
            let mut chosen = None;
            if let Some(queue) = inner.waiting.get_mut(&namespace) {
                queue.retain(|w| !w.tx.is_closed());
                if held < namespace_cap {
                    chosen = queue
                        .iter()
                        .position(|w| {
                            inner.by_target.get(&w.target).copied().unwrap_or(0) < target_cap
                        })
                        .and_then(|i| queue.remove(i));
                }
            }
            let remaining = inner.waiting.get(&namespace).is_some_and(|q| !q.is_empty());
            if !remaining {
                inner.waiting.remove(&namespace);
            }
            if let Some(waiter) = chosen {
                *inner.by_namespace.entry(namespace.clone()).or_default() += 1;
                *inner.by_target.entry(waiter.target.clone()).or_default() += 1;
                inner.in_use += 1;
                let slot = ProbeSlot {
                    inner: shared.clone(),
                    namespace: namespace.clone(),
                    target: waiter.target,
                    armed: true,
                };
                if let Err(mut slot) = waiter.tx.send(slot) {
                    // The waiter went away after all: undo, without re-entering the lock.
                    slot.armed = false;
                    release(inner, &slot.namespace, &slot.target);
                }
                if remaining {
                    inner.ring.push_back(namespace);
                }
                granted = true;
                break;
            }
            if remaining {
                inner.ring.push_back(namespace);
            }
        }
        if !granted {
            break;
        }
    }
}

/// Counts one slot of `namespace` and `target` as free.
fn release(inner: &mut Inner, namespace: &str, target: &str) {
    inner.in_use = inner.in_use.saturating_sub(1);
    for (map, key) in [
        (&mut inner.by_namespace, namespace),
        (&mut inner.by_target, target),
    ] {
        if let Some(n) = map.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(key);
            }
        }
    }
}

impl Drop for ProbeSlot {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        let shared = self.inner.clone();
        let mut inner = lock(&shared);
        release(&mut inner, &self.namespace, &self.target);
        grant(&mut inner, &shared);
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
        let slots = Arc::new(ProbeSlots::new(1));
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
    async fn one_namespace_leaves_headroom_for_a_newcomer() {
        let slots = ProbeSlots::new(16);
        let mut held = Vec::new();
        for i in 0..16 {
            if let Some(slot) = now_or_never(slots.acquire("hog", &format!("t{i}"))) {
                held.push(slot);
            }
        }
        assert_eq!(held.len(), 14, "16 slots less ceil(16 / 8) of headroom");
        assert!(now_or_never(slots.acquire("other", "good")).is_some());
    }

    #[tokio::test]
    async fn one_target_holds_at_most_its_share() {
        let slots = ProbeSlots::new(8);
        let _b = now_or_never(slots.acquire("ns", "b")).expect("a free slot");
        // Two active targets: ceil(8 / 2) = 4 each; a fifth probe of `a` waits.
        let a: Vec<_> = (0..5)
            .filter_map(|_| now_or_never(slots.acquire("ns", "a")))
            .collect();
        assert_eq!(a.len(), 4);
        assert!(now_or_never(slots.acquire("ns", "b")).is_some());
    }
}
