//! Watch liveness: what `/healthz` judges, and how watch errors are logged.
//!
//! Lives here: [`WatchHealth`], which every watch event passes through: a success ends a failing
//! streak, an error starts one (the process-wide streak lives in `Metrics`, which `/healthz`
//! reads) and is logged, rate-limited: 403 (a permission the operator lacks) at error, anything
//! else at warn. Must not live here: the watches themselves (`watches`) or HTTP (`main.rs`).

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use kube::runtime::watcher;
use tracing::{error, warn};

use crate::metrics::Metrics;

/// At most one log line per watch and this period.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Tracks one watch's errors for liveness and logging.
#[derive(Clone)]
pub(super) struct WatchHealth {
    what: &'static str,
    metrics: Arc<Metrics>,
    last_log: Arc<Mutex<Option<Instant>>>,
}

impl WatchHealth {
    /// A tracker for the watch named `what` (e.g. "DbPools").
    pub fn new(what: &'static str, metrics: Arc<Metrics>) -> Self {
        Self {
            what,
            metrics,
            last_log: Arc::new(Mutex::new(None)),
        }
    }

    /// Records one watch result.
    pub fn note<T>(&self, result: &Result<T, watcher::Error>) {
        let Err(err) = result else {
            self.metrics.watch_succeeded();
            return;
        };
        self.metrics.watch_failed();
        let mut last = self.last_log.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|at| at.elapsed() < LOG_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        if forbidden(err) {
            error!(watch = self.what, error = %err, "watch forbidden: the operator's RBAC lacks list/watch here");
        } else {
            warn!(watch = self.what, error = %err, "watch failing; retrying with backoff");
        }
    }
}

fn forbidden(err: &watcher::Error) -> bool {
    let code = match err {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    };
    code == Some(403)
}
