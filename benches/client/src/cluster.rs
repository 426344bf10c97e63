//! The "with a DbPool" mode: dbpool-client made by `from_dbpool`, following a DbPool that the real
//! operator (its release binary, a child process) reconciles on a real kube-apiserver.
//!
//! Lives here: [`Cluster`] (the control plane's client, the run's namespace with its consenting
//! Secret, the operator process and its log) and [`Cluster::pool`] (a DbPool at the API's default
//! recovery settings per run, Ready, then the client from it) and [`Cluster::delete`]. The control
//! plane itself is `hack/with-env.sh`'s (started by `hack/bench-client.sh` inside the benchmark's
//! network namespace); without `DBPOOL_TEST_KUBECONFIG` and `BENCH_CLIENT_OPERATOR` the mode is
//! skipped and says so. Must not live here: the load, the scenario, or the pool's calls
//! (`pools`).

use std::{
    process::Stdio,
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use dbpool_api::DbPool;
use dbpool_testkit::{
    kube::{TestNamespace, client, create_consenting_secret, install_crd},
    pools,
    postgres::APP_PASSWORD,
    wait::wait_for,
};
use kube::{Api, Client, api::DeleteParams};

/// The Secret and key of every DbPool of the mode.
const SECRET: &str = "db";
const KEY: &str = "password";

/// The one cluster of a benchmark run (set by `main` when the mode can run).
pub static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The control plane's client, the namespace and the operator.
pub struct Cluster {
    client: Client,
    ns: TestNamespace,
    operator: std::sync::Mutex<Option<tokio::process::Child>>,
    /// The operator's stderr log.
    pub log: std::path::PathBuf,
    next: AtomicU32,
}

/// The recovery settings of every DbPool: the API's defaults, written out (the testkit's
/// manifests have short test timings), and the standalone client's TLS (`prefer`) and sizes.
fn default_spec() -> serde_json::Value {
    serde_json::json!({
        "database": { "sslMode": "prefer" },
        "pool": { "minSize": 1, "maxSize": crate::pools::MAX_SIZE },
        "healthCheck": { "interval": "30s", "timeout": "5s", "adaptiveTimeout": true },
        "backoff": { "initialDelay": "1s", "multiplier": 2.0, "maxDelay": "60s",
                     "maxAttempts": 10, "cooldown": "5m", "jitter": 0.1 },
        "breaker": { "failureThreshold": 5, "openTimeout": "60s", "successThreshold": 1 },
    })
}

impl Cluster {
    /// The cluster when the environment names one (`DBPOOL_TEST_KUBECONFIG`) and the operator's
    /// binary (`BENCH_CLIENT_OPERATOR`): the CRD, a namespace with the Secret, the operator
    /// started on it. Err: why the mode cannot run.
    pub async fn start(log_dir: &std::path::Path) -> Result<Cluster, String> {
        if std::env::var_os("DBPOOL_TEST_KUBECONFIG").is_none() {
            return Err("no control plane (DBPOOL_TEST_KUBECONFIG unset)".into());
        }
        let bin = std::env::var_os("BENCH_CLIENT_OPERATOR")
            .ok_or("no operator binary (BENCH_CLIENT_OPERATOR unset)")?;
        let client = client().await;
        install_crd(&client).await;
        let ns = TestNamespace::with_prefix(&client, "bench-client").await;
        create_consenting_secret(
            &client,
            ns.name(),
            SECRET,
            KEY,
            APP_PASSWORD,
            &["127.0.0.1"],
        )
        .await;
        std::fs::create_dir_all(log_dir).map_err(|e| format!("{}: {e}", log_dir.display()))?;
        let log = log_dir.join("operator.log");
        let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = tokio::process::Command::new(&bin)
            .arg("run")
            .arg("--namespace")
            .arg(ns.name())
            .arg("--metrics-addr")
            .arg("127.0.0.1:0")
            .env("DBPOOL_KUBECONFIG", dbpool_testkit::kube::kubeconfig_path())
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.to_string_lossy()))?;
        Ok(Cluster {
            client,
            ns,
            operator: std::sync::Mutex::new(Some(child)),
            log,
            next: AtomicU32::new(0),
        })
    }

    /// A new DbPool on 127.0.0.1:`port`, once the operator has made it Ready, and the client
    /// made from it by `from_dbpool` (with the client's default options). Call on the runtime
    /// the pool is to live on.
    pub async fn pool(&self, port: u16) -> Result<dbpool_client::Pool, String> {
        let name = format!("bench-{}", self.next.fetch_add(1, Ordering::Relaxed));
        let manifest = pools::pool(&name, port, Some((SECRET, KEY)), default_spec());
        pools::create(&self.client, self.ns.name(), &manifest).await;
        let (client, ns) = (&self.client, self.ns.name());
        wait_for(
            "the operator to make the DbPool Ready",
            Duration::from_secs(60),
            || async {
                let s = pools::status(client, ns, &name).await?;
                pools::condition(&s, dbpool_api::CONDITION_READY)
                    .filter(|c| c.0 == "True")
                    .map(|_| ())
            },
        )
        .await;
        dbpool_client::from_dbpool(self.client.clone(), self.ns.name(), &name)
            .await
            .map_err(|e| format!("from_dbpool {name}: {e}"))
    }

    /// Deletes the DbPool of `pool` (named `namespace/name`), so the operator stops working on it.
    pub async fn delete(&self, pool_name: &str) {
        let name = pool_name.rsplit('/').next().unwrap_or(pool_name);
        let api: Api<DbPool> = Api::namespaced(self.client.clone(), self.ns.name());
        let _ = api.delete(name, &DeleteParams::default()).await;
    }

    /// Stops the operator (kill, then reap).
    pub async fn stop(&self) {
        let child = self
            .operator
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(mut child) = child {
            let _ = child.kill().await;
        }
    }
}
