//! Running the operator in-process for end-to-end tests, and building DbPool manifests.
//!
//! Each test runs its own operator watching only the test's namespace, so tests can run in
//! parallel without seeing each other's pools.

use std::{sync::Arc, time::Duration};

use dbpool_operator::{
    api::{DbPool, DbPoolStatus},
    controller::{self, OperatorConfig},
    metrics::Metrics,
};
use kube::{Api, Client, api::PostParams};
use tokio::{sync::oneshot, task::JoinHandle};

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
        let (tx, rx) = oneshot::channel::<()>();
        let metrics = Arc::new(Metrics::new());
        let handle = tokio::spawn(controller::run(
            client,
            config,
            metrics.clone(),
            async move {
                let _ = rx.await;
            },
        ));
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

/// A DbPool manifest for `host:port` with short test timings, patched by `overrides` (a JSON
/// merge of the spec).
pub fn pool(
    name: &str,
    port: u16,
    secret: Option<(&str, &str)>,
    overrides: serde_json::Value,
) -> DbPool {
    let mut spec = serde_json::json!({
        "database": {
            "host": "127.0.0.1",
            "port": port,
            "dbname": super::postgres::APP_DB,
            "user": super::postgres::APP_USER,
            "sslMode": "disable",
        },
        "healthCheck": { "interval": "2s", "timeout": "1s" },
        "backoff": { "initialDelay": "300ms", "multiplier": 2.0, "maxDelay": "2s", "maxAttempts": 10, "cooldown": "30s", "jitter": 0.0 },
        "breaker": { "failureThreshold": 3, "openTimeout": "1s", "successThreshold": 1 },
    });
    if let Some((secret, key)) = secret {
        spec["database"]["passwordSecretRef"] = serde_json::json!({ "name": secret, "key": key });
    }
    merge(&mut spec, overrides);
    let manifest = serde_json::json!({
        "apiVersion": "dbpool.io/v1alpha1",
        "kind": "DbPool",
        "metadata": { "name": name },
        "spec": spec,
    });
    serde_json::from_value(manifest).expect("valid DbPool manifest")
}

fn merge(base: &mut serde_json::Value, patch: serde_json::Value) {
    match (base, patch) {
        (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}

/// Creates `pool` in `namespace`.
pub async fn create(client: &Client, namespace: &str, pool: &DbPool) -> DbPool {
    let api: Api<DbPool> = Api::namespaced(client.clone(), namespace);
    api.create(&PostParams::default(), pool)
        .await
        .expect("create DbPool")
}

/// The status of pool `name`, if it has one.
pub async fn status(client: &Client, namespace: &str, name: &str) -> Option<DbPoolStatus> {
    let api: Api<DbPool> = Api::namespaced(client.clone(), namespace);
    api.get(name).await.ok().and_then(|p| p.status)
}

/// Waits until pool `name`'s status satisfies `check`, returning that status.
pub async fn wait_status(
    client: &Client,
    namespace: &str,
    name: &str,
    what: &str,
    deadline: Duration,
    check: impl Fn(&DbPoolStatus) -> bool,
) -> DbPoolStatus {
    let check = &check;
    super::wait::wait_for(what, deadline, || async move {
        status(client, namespace, name).await.filter(|s| check(s))
    })
    .await
}

/// The condition `type_` of a status, as (status, reason, message).
pub fn condition(status: &DbPoolStatus, type_: &str) -> Option<(String, String, String)> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}
