//! The pure rule of the probe slots: which waiting probe a free slot goes to.
//!
//! Lives here: [`Policy`] (the counts, the per-namespace queues, the round-robin ring and the
//! rules of the module comment of `slots`), [`Grant`] and [`WaiterId`]. Must not live here:
//! tokio, channels, the clock (every instant is passed in), the probe itself. The async
//! [`ProbePermits`](super::ProbePermits) only applies what this decides.
//!
//! The rules and the guarantees they give are written in `slots`'s module comment; the property
//! tests at the end of this file check them for any sequence of asks, cancels, releases and
//! slots that are never released.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

/// A namespace that asked for a slot this recently still counts as active for the shares.
pub(crate) const ACTIVE_WINDOW: Duration = Duration::from_secs(120);

/// Names one waiting ask.
pub(crate) type WaiterId = u64;

/// A slot the policy handed to a waiter: the caller must deliver it, or give it back with
/// [`Policy::release`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Grant {
    /// The ask this grant answers.
    pub id: WaiterId,
    /// The namespace now holding one more slot.
    pub namespace: String,
    /// The target now holding one more slot.
    pub target: String,
}

/// Which count of a target changes.
#[derive(Clone, Copy)]
enum Count {
    Held,
    Waiting,
}

struct Waiter {
    id: WaiterId,
    target: String,
}

/// The slots' state and rules, with no clock and no channels.
pub(crate) struct Policy {
    capacity: usize,
    reserve: usize,
    in_use: usize,
    by_namespace: HashMap<String, usize>,
    by_target: HashMap<String, usize>,
    /// Waiters per target (never zero).
    waiting_by_target: HashMap<String, usize>,
    /// Targets in `by_target` or `waiting_by_target`.
    active_targets: usize,
    /// Waiters per namespace, in arrival order (never an empty queue).
    waiting: HashMap<String, VecDeque<Waiter>>,
    /// Namespaces with waiters, in turn order: a namespace joins at the back, and only the one
    /// served moves (to the back), so no namespace loses its place by being passed over.
    ring: VecDeque<String>,
    /// When each namespace last asked for a slot.
    recent: HashMap<String, Instant>,
    next_id: WaiterId,
}

impl Policy {
    /// `capacity` slots (at least one); half of them, rounded down, are the reserve.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            reserve: capacity / 2,
            in_use: 0,
            by_namespace: HashMap::new(),
            by_target: HashMap::new(),
            waiting_by_target: HashMap::new(),
            active_targets: 0,
            waiting: HashMap::new(),
            ring: VecDeque::new(),
            recent: HashMap::new(),
            next_id: 0,
        }
    }

    /// All slots.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Slots kept for namespaces holding none: a namespace that already holds a slot gets
    /// another only while more than this many are free.
    #[cfg(test)]
    pub fn reserve(&self) -> usize {
        self.reserve
    }

    /// Slots held.
    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Slots `namespace` holds.
    pub fn held(&self, namespace: &str) -> usize {
        self.by_namespace.get(namespace).copied().unwrap_or(0)
    }

    /// Asks for a slot for `target` on behalf of `namespace` at `now`: queues the ask and
    /// returns its id with every grant the ask made possible (its own among them when it is
    /// granted at once).
    pub fn ask(&mut self, namespace: &str, target: &str, now: Instant) -> (WaiterId, Vec<Grant>) {
        self.forget_quiet(now);
        self.recent.insert(namespace.to_owned(), now);
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.count_target(target, Count::Waiting, true);
        let queue = self.waiting.entry(namespace.to_owned()).or_default();
        queue.push_back(Waiter {
            id,
            target: target.to_owned(),
        });
        if queue.len() == 1 {
            self.ring.push_back(namespace.to_owned());
        }
        (id, self.grant())
    }

    /// Withdraws a waiting ask (its caller gave up). Returns the grants this makes possible
    /// (one target fewer raises the others' share); nothing when `id` is not waiting.
    pub fn cancel(&mut self, id: WaiterId) -> Vec<Grant> {
        let mut found = None;
        for (namespace, queue) in &mut self.waiting {
            if let Some(waiter) = queue
                .iter()
                .position(|w| w.id == id)
                .and_then(|i| queue.remove(i))
            {
                found = Some((namespace.clone(), waiter.target, queue.is_empty()));
                break;
            }
        }
        match found {
            None => Vec::new(),
            Some((namespace, target, emptied)) => {
                self.count_target(&target, Count::Waiting, false);
                if emptied {
                    self.leave(&namespace);
                }
                self.grant()
            }
        }
    }

    /// Frees one slot of `namespace` and `target` at `now`; returns the grants that follow.
    pub fn release(&mut self, namespace: &str, target: &str, now: Instant) -> Vec<Grant> {
        self.in_use = self.in_use.saturating_sub(1);
        decrement(&mut self.by_namespace, namespace);
        self.count_target(target, Count::Held, false);
        self.forget_quiet(now);
        self.grant()
    }

    /// Whether `namespace` has a waiter the rules let take a slot right now (nothing is granted).
    #[cfg(test)]
    pub fn may_take(&self, namespace: &str) -> bool {
        self.pick(namespace, self.share(), self.target_cap())
            .is_some()
    }

    /// The most slots a namespace may hold through extra grants: `ceil((capacity − reserve) /
    /// active namespaces)`.
    fn share(&self) -> usize {
        let mut active: HashSet<&str> = self.recent.keys().map(String::as_str).collect();
        active.extend(self.by_namespace.keys().map(String::as_str));
        active.extend(self.waiting.keys().map(String::as_str));
        self.general().div_ceil(active.len().max(1))
    }

    /// `capacity − reserve`: the most slots held after an extra grant.
    fn general(&self) -> usize {
        self.capacity - self.reserve
    }

    /// The most slots one target may hold: `ceil(capacity / active targets)`.
    fn target_cap(&self) -> usize {
        self.capacity.div_ceil(self.active_targets.max(1))
    }

    /// The index in `namespace`'s queue of the waiter that may take a slot now, if any.
    fn pick(&self, namespace: &str, share: usize, target_cap: usize) -> Option<usize> {
        if self.in_use >= self.capacity {
            return None;
        }
        let queue = self.waiting.get(namespace)?;
        let under_cap = || {
            queue
                .iter()
                .position(|w| self.by_target.get(&w.target).copied().unwrap_or(0) < target_cap)
        };
        let held = self.held(namespace);
        if held == 0 {
            // A namespace's first slot: any free slot, reserve included; the target share only
            // picks which of its waiters goes first.
            return Some(under_cap().unwrap_or(0));
        }
        // An extra slot: only while the reserve stays whole, and within the namespace's share.
        if self.in_use + 1 > self.general() || held >= share {
            return None;
        }
        under_cap()
    }

    /// Grants free slots, one per turn, to the first namespace in the ring that may take one.
    fn grant(&mut self) -> Vec<Grant> {
        let mut grants = Vec::new();
        if self.in_use >= self.capacity || self.ring.is_empty() {
            return grants;
        }
        let share = self.share();
        let target_cap = self.target_cap();
        while self.in_use < self.capacity {
            let Some((at, i)) = self
                .ring
                .iter()
                .enumerate()
                .find_map(|(at, ns)| self.pick(ns, share, target_cap).map(|i| (at, i)))
            else {
                break;
            };
            let Some(namespace) = self.ring.remove(at) else {
                break;
            };
            let Some(queue) = self.waiting.get_mut(&namespace) else {
                break;
            };
            let Some(waiter) = queue.remove(i) else {
                break;
            };
            if queue.is_empty() {
                self.waiting.remove(&namespace);
            } else {
                self.ring.push_back(namespace.clone());
            }
            self.count_target(&waiter.target, Count::Waiting, false);
            self.count_target(&waiter.target, Count::Held, true);
            self.in_use += 1;
            *self.by_namespace.entry(namespace.clone()).or_default() += 1;
            grants.push(Grant {
                id: waiter.id,
                namespace,
                target: waiter.target,
            });
        }
        grants
    }

    /// Counts one more (`up`) or one fewer of `target`'s held slots or waiters, keeping
    /// `active_targets` in step.
    fn count_target(&mut self, target: &str, count: Count, up: bool) {
        let (map, other) = match count {
            Count::Held => (&mut self.by_target, &self.waiting_by_target),
            Count::Waiting => (&mut self.waiting_by_target, &self.by_target),
        };
        let was = map.contains_key(target);
        if up {
            *map.entry(target.to_owned()).or_default() += 1;
        } else {
            decrement(map, target);
        }
        let is = map.contains_key(target);
        if !other.contains_key(target) {
            match (was, is) {
                (false, true) => self.active_targets += 1,
                (true, false) => self.active_targets = self.active_targets.saturating_sub(1),
                _ => {}
            }
        }
    }

    /// Takes a namespace whose queue emptied out of the ring.
    fn leave(&mut self, namespace: &str) {
        self.waiting.remove(namespace);
        self.ring.retain(|n| n != namespace);
    }

    /// Forgets namespaces that last asked [`ACTIVE_WINDOW`] or longer before `now`.
    fn forget_quiet(&mut self, now: Instant) {
        self.recent
            .retain(|_, at| now.saturating_duration_since(*at) < ACTIVE_WINDOW);
    }
}

/// Counts one fewer of `key`, dropping it at zero.
fn decrement(map: &mut HashMap<String, usize>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests;
