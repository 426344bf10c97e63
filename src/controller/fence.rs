//! The fence and the one door through which the controller publishes.
//!
//! Lives here: [`Leadership`] (whether this process may write, and under which term),
//! [`Fence`] (the receiving end of the leadership channel, consulted right before every write)
//! and [`Door`], the only way the controller sends an apiserver write (status, breaker label,
//! event, gate Service) or touches a per-pool metric series: both happen only while this process
//! leads. Must not live here: acquiring the Lease (`leadership`), what is written (`write`,
//! `gate`, `events`), the request budget's order (`api_permits`).
//!
//! **Why one door.** A deposed leader's in-flight reconcile must neither write nor re-create a
//! per-pool series after the term ended (the next leader owns them). A write checks the fence
//! right before it is sent and is bounded by what is left of the term; a term that ends while a
//! request is in flight cancels it, and one that the apiserver already applied is fenced by
//! `status.writerEpoch` (see `leadership`). Per-pool metrics are reachable only through
//! [`Door::metrics`], which answers None unless this process leads.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{sync::watch, time::Instant};

use super::{
    Error,
    api_permits::{ApiPermit, ApiPermits, Priority},
};
use crate::metrics::Metrics;

/// Whether this process may write, and under which term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leadership {
    /// Not the leader: no writes.
    Standby,
    /// The leader until `valid_until` (monotonic), under lease epoch `epoch` (None: no election).
    Leading {
        /// The Lease's leaseTransitions of this term.
        epoch: Option<i64>,
        /// End of the term unless renewed.
        valid_until: Instant,
    },
}

/// The receiving end of the leadership channel: what every write consults right before sending.
#[derive(Clone, Debug)]
pub struct Fence(watch::Receiver<Leadership>);

impl Fence {
    /// A fence over the leadership channel `rx` (see `leadership`).
    pub fn new(rx: watch::Receiver<Leadership>) -> Self {
        Self(rx)
    }

    /// A fence that is always open (a single instance without leader election).
    pub fn always_open() -> Self {
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let (_tx, rx) = watch::channel(Leadership::Leading {
            epoch: None,
            valid_until: far,
        });
        Self(rx)
    }

    /// How long the current term still runs; None when not leading (or expired).
    pub fn remaining(&self) -> Option<Duration> {
        match *self.0.borrow() {
            Leadership::Leading { valid_until, .. } => {
                let left = valid_until.saturating_duration_since(Instant::now());
                (!left.is_zero()).then_some(left)
            }
            Leadership::Standby => None,
        }
    }

    /// Whether a write may be sent now.
    pub fn may_write(&self) -> bool {
        self.remaining().is_some()
    }

    /// The current term as one reading: its epoch and how long it still runs; None when not
    /// leading (or expired). A status write takes its writerEpoch from the same reading as its
    /// leader check ([`Door::send_in_term`]), never from an earlier one.
    pub fn term(&self) -> Option<(Option<i64>, Duration)> {
        match *self.0.borrow() {
            Leadership::Leading { epoch, valid_until } => {
                let left = valid_until.saturating_duration_since(Instant::now());
                (!left.is_zero()).then_some((epoch, left))
            }
            Leadership::Standby => None,
        }
    }

    /// The epoch of the current term (None while standing by, or without election).
    pub fn epoch(&self) -> Option<i64> {
        match *self.0.borrow() {
            Leadership::Leading { epoch, .. } => epoch,
            Leadership::Standby => None,
        }
    }

    /// Resolves when this process is no longer leading (channel says Standby, or the term ran out).
    pub async fn lost(&mut self) {
        loop {
            let until = match *self.0.borrow_and_update() {
                Leadership::Standby => return,
                Leadership::Leading { valid_until, .. } => valid_until,
            };
            tokio::select! {
                () = tokio::time::sleep_until(until) => {
                    if !self.may_write() {
                        return;
                    }
                }
                changed = self.0.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Resolves true once leading, false if the channel closed.
    pub async fn leading(&mut self) -> bool {
        loop {
            if self.may_write() {
                return true;
            }
            if self.0.changed().await.is_err() {
                return false;
            }
        }
    }
}

/// The longest any single write may take.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The one door for everything the controller publishes (see the module comment).
pub(crate) struct Door {
    fence: Fence,
    permits: Arc<ApiPermits>,
    metrics: Arc<Metrics>,
}

impl Door {
    /// A door that checks `fence`, sends within `permits` and exports into `metrics`.
    pub fn new(fence: Fence, permits: Arc<ApiPermits>, metrics: Arc<Metrics>) -> Self {
        Self {
            fence,
            permits,
            metrics,
        }
    }

    /// The fence (leadership as of now).
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// The request budget, for reads (writes go through [`Door::send`]).
    pub fn permits(&self) -> &ApiPermits {
        &self.permits
    }

    /// The metrics, for per-pool series: only while this process leads.
    pub fn metrics(&self) -> Option<&Metrics> {
        self.fence.may_write().then_some(self.metrics.as_ref())
    }

    /// Sends one write about `namespace` through the request budget, only if this process still leads right
    /// before sending, and bounded by what is left of its term. Ok(false): not sent (not
    /// leading).
    pub async fn send<T>(
        &self,
        priority: Priority,
        namespace: &str,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<bool, Error> {
        let permit = self.permits.acquire(priority, namespace).await;
        self.send_with(permit, request).await
    }

    /// [`Door::send`] with a permit already held.
    pub async fn send_with<T>(
        &self,
        permit: ApiPermit<'_>,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<bool, Error> {
        self.send_in_term(permit, |_| request).await
    }

    /// [`Door::send_with`] for a request that carries the term's epoch (a status write's
    /// `writerEpoch`): `make` builds the request from the epoch of the very term whose check lets
    /// it through. A status computed while this process stood by (no epoch) and sent after it
    /// became the leader is therefore stamped with the new term, never sent without one: a write
    /// without writerEpoch would unfence the pool (the CRD rule lets a write drop it, for an
    /// operator without leader election).
    pub async fn send_in_term<T, F, Fut>(
        &self,
        _permit: ApiPermit<'_>,
        make: F,
    ) -> Result<bool, Error>
    where
        F: FnOnce(Option<i64>) -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let Some((epoch, budget)) = self.fence.term() else {
            return Ok(false);
        };
        let bound = budget.min(WRITE_TIMEOUT);
        match tokio::time::timeout(bound, make(epoch)).await {
            Ok(result) => result.map(|_| true).map_err(Error::Kube),
            Err(_) => Err(Error::WriteTimeout(bound)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_standby_door_exports_no_series_and_sends_nothing() {
        let (tx, rx) = watch::channel(Leadership::Standby);
        let door = Door::new(
            Fence::new(rx),
            Arc::new(ApiPermits::new(1)),
            Arc::new(Metrics::new()),
        );
        assert!(door.metrics().is_none());
        let sent = door
            .send(Priority::First, "ns", async { Ok::<(), kube::Error>(()) })
            .await;
        assert!(matches!(sent, Ok(false)));
        let _ = tx.send(Leadership::Leading {
            epoch: Some(3),
            valid_until: Instant::now() + Duration::from_secs(30),
        });
        assert!(door.metrics().is_some());
        assert_eq!(door.fence().epoch(), Some(3));
        let sent = door
            .send(Priority::Later, "ns", async { Ok::<(), kube::Error>(()) })
            .await;
        assert!(matches!(sent, Ok(true)));
    }

    /// Found by the chaos soak (seed 882113): a status computed while standing by carried no
    /// writerEpoch and was sent once the process led, unfencing the pool. The epoch a request
    /// carries is the one of the term that let it through.
    #[tokio::test]
    async fn a_write_carries_the_epoch_of_the_term_that_lets_it_through() {
        let (tx, rx) = watch::channel(Leadership::Standby);
        let door = Door::new(
            Fence::new(rx),
            Arc::new(ApiPermits::new(1)),
            Arc::new(Metrics::new()),
        );
        let computed_while_standing_by = door.fence().epoch();
        assert_eq!(computed_while_standing_by, None);
        let permits = ApiPermits::new(1);
        let stamped = std::sync::Mutex::new(None);
        let sent = door
            .send_in_term(permits.acquire(Priority::First, "ns").await, |epoch| {
                *stamped.lock().unwrap_or_else(|e| e.into_inner()) = Some(epoch);
                async { Ok::<(), kube::Error>(()) }
            })
            .await;
        assert!(
            matches!(sent, Ok(false)),
            "nothing is sent while standing by"
        );
        assert_eq!(*stamped.lock().unwrap_or_else(|e| e.into_inner()), None);
        let _ = tx.send(Leadership::Leading {
            epoch: Some(7),
            valid_until: Instant::now() + Duration::from_secs(30),
        });
        let sent = door
            .send_in_term(permits.acquire(Priority::First, "ns").await, |epoch| {
                *stamped.lock().unwrap_or_else(|e| e.into_inner()) = Some(epoch);
                async { Ok::<(), kube::Error>(()) }
            })
            .await;
        assert!(matches!(sent, Ok(true)));
        assert_eq!(
            *stamped.lock().unwrap_or_else(|e| e.into_inner()),
            Some(Some(7)),
            "the write carries the epoch of the term that let it through"
        );
    }
}
