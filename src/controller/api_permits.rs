//! The API permits: the request budget to the apiserver (`--max-concurrent-api-requests`),
//! with three classes.
//!
//! Lives here: [`ApiPermits`], [`Priority`] and the retry delay after apiserver failures
//! ([`apiserver_retry_delay`]). A freed permit goes to a [`Priority::User`] request (the status
//! that answers a person's action: a force reopen, a spec edit, a hold) before anything else, so
//! a person's action never queues behind thousands of recovery writes (issue 29); then to a
//! [`Priority::First`] request (a status
//! write carrying a transition, a Secret read a reconcile waits on, a gate write) before any
//! [`Priority::Later`] one (breaker labels, events, counter-only statuses), so when hundreds of
//! pools open together every Open status is written before the labels and events that follow
//! them. Within a class the namespaces with a waiting request take turns (first come, first
//! served within one), so a namespace whose thousands of pools change at once delays another
//! namespace's request by at most one request of its own per turn (issue 23: a newcomer's first
//! status never queues behind a tenant's flood). Must not live here: what a request is or
//! whether it may be sent (`write`, `credentials`, `gate`).

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::Duration,
};

use tokio::sync::oneshot;

use super::sync::lock;

/// How long to wait before retrying after `failures` apiserver failures in a row (a reconcile
/// or a write): 1 s, 2 s, 4 s … doubling from 500 ms, at most 60 s.
pub(crate) fn apiserver_retry_delay(failures: u32) -> Duration {
    Duration::from_millis(500)
        .saturating_mul(1 << failures.min(7))
        .min(Duration::from_secs(60))
}

/// Which queue a request waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Priority {
    /// Goes before every `First` and `Later` request: what answers a person.
    User,
    /// Goes before every `Later` request.
    First,
    /// Waits while any `First` request waits.
    Later,
}

#[derive(Default)]
struct State {
    free: usize,
    user: Queue,
    first: Queue,
    later: Queue,
}

impl State {
    /// Whether no request of a class served before `priority` waits.
    fn none_before(&self, priority: Priority) -> bool {
        match priority {
            Priority::User => true,
            Priority::First => self.user.is_empty(),
            Priority::Later => self.user.is_empty() && self.first.is_empty(),
        }
    }
}

/// The waiters of one class: per namespace in arrival order, the namespaces served in turn.
#[derive(Default)]
struct Queue {
    /// Namespaces with a waiter, in the order they are served.
    ring: VecDeque<String>,
    waiting: HashMap<String, VecDeque<oneshot::Sender<()>>>,
}

impl Queue {
    fn push(&mut self, namespace: &str, waiter: oneshot::Sender<()>) {
        let queue = self.waiting.entry(namespace.to_owned()).or_default();
        if queue.is_empty() {
            self.ring.push_back(namespace.to_owned());
        }
        queue.push_back(waiter);
    }

    /// The first waiter of the namespace whose turn it is; that namespace goes to the back.
    fn pop(&mut self) -> Option<oneshot::Sender<()>> {
        let namespace = self.ring.pop_front()?;
        let queue = self.waiting.get_mut(&namespace)?;
        let waiter = queue.pop_front();
        if queue.is_empty() {
            self.waiting.remove(&namespace);
        } else {
            self.ring.push_back(namespace);
        }
        waiter
    }

    fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }
}

/// At most `n` requests in flight; see the module comment for the order.
pub(crate) struct ApiPermits {
    state: Mutex<State>,
}

/// One request's permit; dropping it hands the permit on.
pub(crate) struct ApiPermit<'a> {
    permits: &'a ApiPermits,
}

impl ApiPermits {
    /// A budget of `n` requests in flight (at least one).
    pub fn new(n: usize) -> Self {
        Self {
            state: Mutex::new(State {
                free: n.max(1),
                ..State::default()
            }),
        }
    }

    /// Waits for a permit in `priority`'s queue, for a request about `namespace`.
    pub async fn acquire(&self, priority: Priority, namespace: &str) -> ApiPermit<'_> {
        let waiting = {
            let mut state = lock(&self.state);
            if state.free > 0 && state.none_before(priority) {
                state.free -= 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                match priority {
                    Priority::User => state.user.push(namespace, tx),
                    Priority::First => state.first.push(namespace, tx),
                    Priority::Later => state.later.push(namespace, tx),
                }
                Some(rx)
            }
        };
        if let Some(rx) = waiting {
            // A handed-over permit arrives as a message. If this future is dropped while it
            // waits, `Pending` hands on a permit that arrived meanwhile.
            let mut pending = Pending {
                rx,
                permits: self,
                done: false,
            };
            let _ = (&mut pending.rx).await;
            pending.done = true;
        }
        ApiPermit { permits: self }
    }

    /// Hands a permit to the next waiter (First before Later) or returns it to the pool. A
    /// waiter that gave up (its future dropped) is skipped.
    fn release(&self) {
        let mut state = lock(&self.state);
        loop {
            let next = state
                .user
                .pop()
                .or_else(|| state.first.pop())
                .or_else(|| state.later.pop());
            match next {
                Some(waiter) => {
                    if waiter.send(()).is_ok() {
                        return;
                    }
                }
                None => {
                    state.free += 1;
                    return;
                }
            }
        }
    }
}

/// A request waiting for a permit.
struct Pending<'a> {
    rx: oneshot::Receiver<()>,
    permits: &'a ApiPermits,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.rx.close();
            if self.rx.try_recv().is_ok() {
                self.permits.release();
            }
        }
    }
}

impl Drop for ApiPermit<'_> {
    fn drop(&mut self) {
        self.permits.release();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_freed_slot_goes_to_first_before_later() {
        let permits = Arc::new(ApiPermits::new(1));
        let held = permits.acquire(Priority::Later, "ns").await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let spawn = |priority: Priority, name: &'static str| {
            let (permits, order) = (permits.clone(), order.clone());
            tokio::spawn(async move {
                let _permit = permits.acquire(priority, "ns").await;
                lock(&order).push(name);
            })
        };
        let later = spawn(Priority::Later, "later");
        tokio::task::yield_now().await;
        let first = spawn(Priority::First, "first");
        // Both wait (the Later one queued earlier).
        loop {
            let queued = {
                let state = lock(&permits.state);
                state.first.len() + state.later.len()
            };
            if queued == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(held);
        let (a, b) = tokio::join!(first, later);
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(*lock(&order), ["first", "later"]);
        assert_eq!(lock(&permits.state).free, 1);
    }

    #[tokio::test]
    async fn a_persons_request_overtakes_a_thousand_recovery_writes() {
        // 2,450 pools closing after an outage queue First; a force reopen's status, queued
        // after all of them, gets the next freed permit (issue 29).
        let permits = Arc::new(ApiPermits::new(2));
        let held = [
            permits.acquire(Priority::First, "shop").await,
            permits.acquire(Priority::First, "shop").await,
        ];
        // A person's request finds no free permit either (both budgets are taken).
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        let spawn = |priority: Priority, name: String| {
            let (permits, order) = (permits.clone(), order.clone());
            tokio::spawn(async move {
                let permit = permits.acquire(priority, "shop").await;
                lock(&order).push(name);
                drop(permit);
            })
        };
        for i in 0..1_000 {
            tasks.push(spawn(Priority::First, format!("recovery-{i}")));
        }
        tasks.push(spawn(Priority::Later, "label".to_owned()));
        let queued = || {
            let state = lock(&permits.state);
            state.first.len() + state.later.len()
        };
        while queued() < 1_001 {
            tokio::task::yield_now().await;
        }
        tasks.push(spawn(Priority::User, "force-reopen".to_owned()));
        while lock(&permits.state).user.is_empty() {
            tokio::task::yield_now().await;
        }
        drop(held);
        for task in tasks {
            assert!(task.await.is_ok());
        }
        let order = lock(&order);
        assert_eq!(order.first().map(String::as_str), Some("force-reopen"));
        assert_eq!(order.last().map(String::as_str), Some("label"));
        assert_eq!(order.len(), 1_002);
        assert_eq!(lock(&permits.state).free, 2);
    }

    #[tokio::test]
    async fn a_persons_request_takes_a_free_permit_while_others_wait() {
        let permits = ApiPermits::new(1);
        {
            let mut state = lock(&permits.state);
            let (tx, _rx) = oneshot::channel();
            state.first.push("shop", tx);
        }
        // A Later request waits behind the queued First one; a User request does not.
        assert!(!lock(&permits.state).none_before(Priority::Later));
        let permit = permits.acquire(Priority::User, "shop").await;
        assert_eq!(lock(&permits.state).free, 0);
        drop(permit);
    }

    #[tokio::test]
    async fn namespaces_take_turns_within_a_class() {
        let permits = Arc::new(ApiPermits::new(1));
        let held = permits.acquire(Priority::First, "flood").await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (namespace, name) in [
            ("flood", "flood-1"),
            ("flood", "flood-2"),
            ("flood", "flood-3"),
            ("newcomer", "newcomer"),
        ] {
            let (mine, order) = (permits.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = mine.acquire(Priority::First, namespace).await;
                lock(&order).push(name);
            }));
            // Queued in this order.
            while lock(&permits.state).first.len() < tasks.len() {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for task in tasks {
            assert!(task.await.is_ok());
        }
        assert_eq!(*lock(&order), ["flood-1", "newcomer", "flood-2", "flood-3"]);
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_does_not_keep_the_permit() {
        let permits = ApiPermits::new(1);
        let held = permits.acquire(Priority::First, "ns").await;
        let gave_up = tokio::time::timeout(
            std::time::Duration::from_millis(10),
            permits.acquire(Priority::First, "ns"),
        )
        .await;
        assert!(gave_up.is_err());
        drop(held);
        assert_eq!(lock(&permits.state).free, 1);
        let _again = permits.acquire(Priority::Later, "ns").await;
    }
}
