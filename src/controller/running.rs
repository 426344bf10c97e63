//! An operator running as a tokio task: how the tests and the benchmark start one in-process.
//!
//! Lives here: [`RunningOperator`] (start, graceful stop, abrupt kill). Must not live here:
//! anything the operator does; this only starts [`super::run`] and holds its handle.

use std::sync::Arc;

use tokio::{sync::oneshot, task::JoinHandle};

use kube::Client;

use super::{NoObserver, Observer, OperatorConfig};
use crate::metrics::Metrics;

/// An operator running as a tokio task.
pub struct RunningOperator {
    handle: JoinHandle<()>,
    shutdown: Option<oneshot::Sender<()>>,
    /// The operator's metrics, readiness and leadership, as its HTTP endpoints would show them.
    pub metrics: Arc<Metrics>,
}

impl RunningOperator {
    /// Starts an operator watching `namespace` with default settings.
    pub fn start(client: Client, namespace: &str) -> Self {
        Self::start_with(
            client,
            OperatorConfig {
                namespace: Some(namespace.to_owned()),
                instance: format!("test-{namespace}"),
                ..OperatorConfig::default()
            },
        )
    }

    /// Starts an operator with the given settings.
    pub fn start_with(client: Client, config: OperatorConfig) -> Self {
        Self::start_observed(client, config, Arc::new(NoObserver))
    }

    /// Starts an operator with the given settings, telling `observer` what it does.
    pub fn start_observed(
        client: Client,
        config: OperatorConfig,
        observer: Arc<dyn Observer>,
    ) -> Self {
        let (tx, rx) = oneshot::channel::<()>();
        let metrics = Arc::new(Metrics::new());
        let run = super::run_observed(client, config, metrics.clone(), observer, async move {
            let _ = rx.await;
        });
        let handle = tokio::spawn(async move {
            if let Err(err) = run.await {
                tracing::error!("{err}");
            }
        });
        Self {
            handle,
            shutdown: Some(tx),
            metrics,
        }
    }

    /// Kills the operator abruptly (like kill -9: no graceful shutdown).
    pub async fn kill(mut self) {
        self.shutdown.take();
        self.handle.abort();
        let _ = (&mut self.handle).await;
    }
}

impl Drop for RunningOperator {
    fn drop(&mut self) {
        self.handle.abort();
    }
}
