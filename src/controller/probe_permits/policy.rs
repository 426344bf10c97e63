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
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One step of a run.
    #[derive(Clone, Debug)]
    enum Step {
        /// Namespace `ns` asks for target `target`; the slot, if granted, hangs (is never
        /// released) when `hangs`.
        Ask {
            ns: usize,
            target: usize,
            hangs: bool,
        },
        /// The held slot at this index (among those that end) is released.
        Release(usize),
        /// The waiter at this index gives up.
        Cancel(usize),
        /// Time passes.
        Wait(u64),
    }

    fn step(namespaces: usize, targets: usize) -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0..namespaces, 0..targets, any::<bool>())
                .prop_map(|(ns, target, hangs)| Step::Ask { ns, target, hangs }),
            2 => any::<usize>().prop_map(Step::Release),
            1 => any::<usize>().prop_map(Step::Cancel),
            1 => (0u64..200).prop_map(Step::Wait),
        ]
    }

    /// The model around the policy: who waits, which held slots hang, and what the guarantees
    /// say must hold after every step.
    struct Run {
        policy: Policy,
        now: Instant,
        /// Waiting asks: id → (namespace, hangs).
        waiting: HashMap<WaiterId, (String, bool)>,
        /// Held slots that will be released some day.
        ending: Vec<Grant>,
        /// Held slots that are never released.
        hanging: Vec<Grant>,
        /// Per namespace waiting while holding none: grants to other namespaces since then.
        passed: HashMap<String, usize>,
        namespaces: usize,
    }

    impl Run {
        fn new(capacity: usize, namespaces: usize) -> Self {
            Self {
                policy: Policy::new(capacity),
                now: Instant::now(),
                waiting: HashMap::new(),
                ending: Vec::new(),
                hanging: Vec::new(),
                passed: HashMap::new(),
                namespaces,
            }
        }

        /// Applies one call's grants in order. A namespace holding none may take any free slot
        /// and every grant is made with one free, so each grant to another namespace while it
        /// waits passes it over: the ring bounds that to fewer than the namespaces there are.
        fn take(&mut self, grants: Vec<Grant>) {
            for grant in grants {
                let (ns, hangs) = self
                    .waiting
                    .remove(&grant.id)
                    .expect("a grant answers a waiting ask");
                assert_eq!(ns, grant.namespace);
                self.passed.remove(&ns);
                for (other, n) in &mut self.passed {
                    *n += 1;
                    assert!(
                        *n < self.namespaces,
                        "{other} holds none and was passed over {n} times ({} namespaces)",
                        self.namespaces
                    );
                }
                if hangs {
                    self.hanging.push(grant);
                } else {
                    self.ending.push(grant);
                }
            }
            // From now on count for the namespaces that wait holding none.
            let p = &self.policy;
            self.passed
                .retain(|ns, _| p.waiting.contains_key(ns) && p.held(ns) == 0);
            for ns in p.waiting.keys() {
                if p.held(ns) == 0 {
                    self.passed.entry(ns.clone()).or_insert(0);
                }
            }
        }

        fn apply(&mut self, step: Step) {
            match step {
                Step::Ask { ns, target, hangs } => {
                    let ns = format!("ns-{ns}");
                    let target = format!("t-{target}");
                    let held_before = self.policy.held(&ns);
                    let in_use_before = self.policy.in_use();
                    let (id, grants) = self.policy.ask(&ns, &target, self.now);
                    self.waiting.insert(id, (ns.clone(), hangs));
                    let own = grants.iter().any(|g| g.id == id);
                    self.take(grants);
                    // The newcomer guarantee: a namespace holding none is granted at once
                    // unless every slot is held.
                    if held_before == 0 && in_use_before < self.policy.capacity() {
                        assert!(own, "{ns} held none with a slot free and waits");
                    }
                }
                Step::Release(i) => {
                    if !self.ending.is_empty() {
                        let g = self.ending.swap_remove(i % self.ending.len());
                        let grants = self.policy.release(&g.namespace, &g.target, self.now);
                        self.take(grants);
                    }
                }
                Step::Cancel(i) => {
                    let mut ids: Vec<WaiterId> = self.waiting.keys().copied().collect();
                    ids.sort_unstable();
                    if !ids.is_empty() {
                        let id = ids[i % ids.len()];
                        self.waiting.remove(&id);
                        let grants = self.policy.cancel(id);
                        self.take(grants);
                    }
                }
                Step::Wait(secs) => self.now += Duration::from_secs(secs),
            }
            self.check();
        }

        /// The invariants behind both guarantees, after every step.
        fn check(&self) {
            let p = &self.policy;
            let holders = p.by_namespace.len();
            // Extra slots are only granted while the reserve stays whole, so all slots are held
            // only when more than `reserve` namespaces hold one.
            assert!(
                p.in_use < p.capacity || holders > p.reserve,
                "all {} slots held by {holders} namespaces (reserve {})",
                p.capacity,
                p.reserve
            );
            assert_eq!(p.in_use, self.ending.len() + self.hanging.len());
            assert_eq!(
                p.waiting.values().map(VecDeque::len).sum::<usize>(),
                self.waiting.len()
            );
            let mut by_target: HashMap<String, usize> = HashMap::new();
            for w in p.waiting.values().flatten() {
                *by_target.entry(w.target.clone()).or_default() += 1;
            }
            assert_eq!(p.waiting_by_target, by_target);
            let mut active: HashSet<&String> = p.by_target.keys().collect();
            active.extend(p.waiting_by_target.keys());
            assert_eq!(p.active_targets, active.len());
            // No namespace holding none waits while a slot is free.
            if p.in_use < p.capacity {
                for ns in p.waiting.keys() {
                    assert!(p.held(ns) > 0, "{ns} holds none and waits with a slot free");
                }
            }
            // Nothing grantable is left waiting.
            for ns in p.waiting.keys() {
                assert!(!p.may_take(ns), "{ns} may take a slot but waits");
            }
        }

        /// Releases every slot that ends, and the slots granted meanwhile (they end too), until
        /// nothing more moves: what still waits then must wait only on hanging slots.
        fn drain(&mut self) {
            for (_, hangs) in self.waiting.values_mut() {
                *hangs = false;
            }
            while let Some(g) = self.ending.pop() {
                let grants = self.policy.release(&g.namespace, &g.target, self.now);
                self.take(grants);
                self.check();
            }
            let hanging = self.hanging.len();
            let p = &self.policy;
            for (ns, queue) in &p.waiting {
                let held = p.held(ns);
                if held == 0 {
                    // A namespace holding none waits only while hanging slots hold them all.
                    assert_eq!(hanging, p.capacity, "{ns} holds none and starves");
                } else {
                    // One holding slots (all hanging) waits only on hanging probes: the reserve
                    // is not whole, it is at its share, or its targets are at theirs.
                    let target_cap = p.target_cap();
                    let blocked = p.in_use + 1 > p.general()
                        || held >= p.share()
                        || queue.iter().all(|w| {
                            p.by_target.get(&w.target).copied().unwrap_or(0) >= target_cap
                        });
                    assert!(blocked, "{ns} starves");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any sequence of asks, releases, cancels and hanging slots keeps the invariants, a
        /// namespace holding none is granted at once while a slot is free (and one is free
        /// while at most `reserve` namespaces hold slots), and after every slot that can end
        /// has ended nobody waits but on hanging slots.
        #[test]
        fn newcomers_never_wait_out_hanging_probes_and_nobody_starves(
            capacity in 1usize..20,
            namespaces in 1usize..8,
            targets in 1usize..6,
            steps in proptest::collection::vec(step(8, 6), 0..300),
        ) {
            let mut run = Run::new(capacity, namespaces);
            for s in steps {
                let s = match s {
                    Step::Ask { ns, target, hangs } => Step::Ask {
                        ns: ns % namespaces,
                        target: target % targets,
                        hangs,
                    },
                    other => other,
                };
                run.apply(s);
            }
            run.drain();
        }

        /// The attack of issue 23 at any size: hostile namespaces fill their slots with probes
        /// that hang forever, in any order; a namespace that then asks is granted at once as
        /// long as at most `reserve` namespaces hold slots, however many pools each has.
        #[test]
        fn hostile_namespaces_up_to_the_reserve_never_block_a_newcomer(
            capacity in 1usize..129,
            asks in proptest::collection::vec((0usize..64, 0usize..1000), 0..200),
            hostile in 1usize..64,
        ) {
            let mut policy = Policy::new(capacity);
            let hostile = hostile.min(policy.reserve().max(1));
            let now = Instant::now();
            for (ns, target) in asks {
                // Granted or not, nothing is ever released.
                let _ = policy.ask(&format!("hostile-{}", ns % hostile), &format!("h-{target}"), now);
            }
            if hostile <= policy.reserve() {
                for newcomer in 0..2 {
                    let ns = format!("innocent-{newcomer}");
                    let (id, grants) = policy.ask(&ns, "db:5432", now);
                    prop_assert!(grants.iter().any(|g| g.id == id), "{ns} waits");
                    // Its probe ends; the next one comes in as the pool's interval says.
                    let _ = policy.release(&ns, "db:5432", now);
                }
            }
        }
    }

    #[test]
    fn a_namespace_is_not_passed_over_by_one_that_came_later() {
        let mut policy = Policy::new(2);
        let now = Instant::now();
        // One slot hangs, `b` holds the other.
        let _ = policy.ask("h", "hang", now);
        let (_, b) = policy.ask("b", "db", now);
        assert_eq!(b.len(), 1);
        // `c` waits first, then `b` queues many more.
        let (c, none) = policy.ask("c", "db", now);
        assert!(none.is_empty());
        for _ in 0..5 {
            assert!(policy.ask("b", "db", now).1.is_empty());
        }
        // `b`'s slot ends: both hold none now, and `c` is ahead in the ring.
        let next = policy.release("b", "db", now);
        assert_eq!(next.iter().map(|g| g.id).collect::<Vec<_>>(), [c]);
    }

    #[test]
    fn a_namespace_alone_may_hold_all_but_the_reserve() {
        let mut policy = Policy::new(64);
        let now = Instant::now();
        let granted: usize = (0..100)
            .map(|i| policy.ask("hog", &format!("t{i}"), now).1.len())
            .sum();
        assert_eq!(granted, 32);
        let (id, grants) = policy.ask("new", "db", now);
        assert_eq!(grants.first().map(|g| g.id), Some(id));
    }

    #[test]
    fn issue_23_five_namespaces_of_sixteen_hanging_probes() {
        let mut policy = Policy::new(64);
        let now = Instant::now();
        for ns in 0..5 {
            for i in 0..16 {
                let _ = policy.ask(&format!("hostile-{ns}"), &format!("h-{ns}-{i}"), now);
            }
        }
        assert!(policy.in_use() < 64);
        let (id, grants) = policy.ask("innocent", "db", now);
        assert!(grants.iter().any(|g| g.id == id));
    }
}
