//! Unit and property tests of the probe-permit rule.

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
                    || queue
                        .iter()
                        .all(|w| p.by_target.get(&w.target).copied().unwrap_or(0) >= target_cap);
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
