//! The request budget to the apiserver (`--max-concurrent-api-requests`), with two classes.
//!
//! Lives here: [`ApiSlots`] and [`Priority`]. A freed slot goes to the longest-waiting
//! [`Priority::First`] request (a status write carrying a transition, a Secret read a reconcile
//! waits on, a gate write) before any [`Priority::Later`] one (breaker labels, events,
//! counter-only statuses), so when hundreds of pools open together every Open status is
//! written before the labels and events that follow them. Must not live here: what a request
//! is or whether it may be sent (`write`, `credentials`, `gate`).

use std::{collections::VecDeque, sync::Mutex};

use tokio::sync::oneshot;

use super::context::lock;

/// Which queue a request waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Priority {
    /// Goes before every `Later` request.
    First,
    /// Waits while any `First` request waits.
    Later,
}

#[derive(Default)]
struct State {
    free: usize,
    first: VecDeque<oneshot::Sender<()>>,
    later: VecDeque<oneshot::Sender<()>>,
}

/// At most `n` requests in flight; see the module comment for the order.
pub(crate) struct ApiSlots {
    state: Mutex<State>,
}

/// One request's slot; dropping it hands the slot on.
pub(crate) struct ApiSlot<'a> {
    slots: &'a ApiSlots,
}

impl ApiSlots {
    /// A budget of `n` requests in flight (at least one).
    pub fn new(n: usize) -> Self {
        Self {
            state: Mutex::new(State {
                free: n.max(1),
                ..State::default()
            }),
        }
    }

    /// Waits for a slot in `priority`'s queue.
    pub async fn acquire(&self, priority: Priority) -> ApiSlot<'_> {
        let waiting = {
            let mut state = lock(&self.state);
            if state.free > 0 && (priority == Priority::First || state.first.is_empty()) {
                state.free -= 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                match priority {
                    Priority::First => state.first.push_back(tx),
                    Priority::Later => state.later.push_back(tx),
                }
                Some(rx)
            }
        };
        if let Some(rx) = waiting {
            // A handed-over slot arrives as a message. If this future is dropped while it
            // waits, `Pending` hands on a slot that arrived meanwhile.
            let mut pending = Pending {
                rx,
                slots: self,
                done: false,
            };
            let _ = (&mut pending.rx).await;
            pending.done = true;
        }
        ApiSlot { slots: self }
    }

    /// Hands a slot to the next waiter (First before Later) or returns it to the pool. A
    /// waiter that gave up (its future dropped) is skipped.
    fn release(&self) {
        let mut state = lock(&self.state);
        loop {
            let next = state.first.pop_front().or_else(|| state.later.pop_front());
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

/// A request waiting for a slot.
struct Pending<'a> {
    rx: oneshot::Receiver<()>,
    slots: &'a ApiSlots,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.rx.close();
            if self.rx.try_recv().is_ok() {
                self.slots.release();
            }
        }
    }
}

impl Drop for ApiSlot<'_> {
    fn drop(&mut self) {
        self.slots.release();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_freed_slot_goes_to_first_before_later() {
        let slots = Arc::new(ApiSlots::new(1));
        let held = slots.acquire(Priority::Later).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let spawn = |priority: Priority, name: &'static str| {
            let (slots, order) = (slots.clone(), order.clone());
            tokio::spawn(async move {
                let _slot = slots.acquire(priority).await;
                lock(&order).push(name);
            })
        };
        let later = spawn(Priority::Later, "later");
        tokio::task::yield_now().await;
        let first = spawn(Priority::First, "first");
        // Both wait (the Later one queued earlier).
        loop {
            let queued = {
                let state = lock(&slots.state);
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
        assert_eq!(lock(&slots.state).free, 1);
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_does_not_keep_the_slot() {
        let slots = ApiSlots::new(1);
        let held = slots.acquire(Priority::First).await;
        let gave_up = tokio::time::timeout(
            std::time::Duration::from_millis(10),
            slots.acquire(Priority::First),
        )
        .await;
        assert!(gave_up.is_err());
        drop(held);
        assert_eq!(lock(&slots.state).free, 1);
        let _again = slots.acquire(Priority::Later).await;
    }
}
