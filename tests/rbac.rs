//! The chart's RBAC is exactly enough: the operator runs in-process as the chart's ServiceAccount
//! (the admin client impersonating it), with only the (Cluster)Roles the chart renders applied for
//! real, and with the settings the chart's Deployment arguments give it. It elects itself leader
//! through the Lease in the release namespace, brings a DbPool against a real PostgreSQL to
//! Healthy, creates and patches events, and never meets an RBAC denial; requests outside its
//! roles are refused with 403.
//!
//! Both modes run here: cluster-wide (ClusterRole) and single-namespace (`watchNamespace`, a Role
//! in that namespace only). They run one at a time: a cluster-wide operator would otherwise also
//! reconcile the other test's pool.

use dbpool_operator::api::reason as reasons;
use dbpool_operator::controller::RunningOperator;
use dbpool_testkit as support;

use std::{
    collections::BTreeSet,
    io::Write,
    str::FromStr,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use dbpool_operator::{
    api::{BREAKER_LABEL, CONDITION_READY, DbPool, FORCE_REOPEN_ANNOTATION, GoDuration, Phase},
    controller::{LeaderElection, OperatorConfig},
};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Event as CoreEvent, Pod, Secret},
    events::v1::Event,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::{Value, json};
use support::{
    helm::{
        container_args, flag, key, kubectl_stdin_ok, of_kind, one, parse_docs, template, to_yaml,
    },
    kube::{
        TestNamespace, client, create_consenting_secret, create_secret_without_consent,
        install_crd, kubeconfig_path, unique_name,
    },
    pools::{condition, create, pool, wait_status},
    postgres::{APP_PASSWORD, PgServer},
    wait::wait_until,
};
use tracing_subscriber::{EnvFilter, fmt::MakeWriter};

const SECRET: &str = "db-credentials";
const KEY: &str = "password";
const POOL: &str = "orders";
/// Generous for a shared 2-core machine; the operator usually needs well under a second.
const DEADLINE: Duration = Duration::from_secs(30);

/// One operator-running test at a time (see the module documentation).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// Everything the operator logs (at debug level), to find RBAC denials it only logs: a failed event
// publication, a watch that keeps being refused, a reconcile error.

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut logs) = self.0.lock() {
            logs.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Logs {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LogWriter(self.0.clone())
    }
}

impl Logs {
    fn text(&self) -> String {
        self.0
            .lock()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default()
    }
}

fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(
                "debug,hyper=info,hyper_util=info,h2=info,rustls=info,tower=info,tokio_postgres=info",
            ))
            .with_ansi(false)
            .with_writer(logs.clone())
            .try_init();
        logs
    })
}

// ---------------------------------------------------------------------------------------------

/// A client of the test control plane that acts as ServiceAccount `namespace/name`.
async fn impersonating(namespace: &str, name: &str) -> Client {
    let path = kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path).expect("kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{namespace}:{name}"));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".to_owned(),
        format!("system:serviceaccounts:{namespace}"),
    ]);
    Client::try_from(config).expect("impersonating client")
}

/// Panics unless `result` is the apiserver's 403.
fn assert_forbidden<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>) {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

/// The operator's settings as the chart's Deployment arguments give them, `$(POD_NAMESPACE)`
/// resolved to the release namespace the way the kubelet would. The lease timings are shortened
/// (they are not chart settings) so that renewals happen within the test.
fn config_from_args(args: &[String], release_ns: &str, instance: &str) -> OperatorConfig {
    let resolve = |v: &str| v.replace("$(POD_NAMESPACE)", release_ns);
    let leader_election = args
        .iter()
        .any(|a| a == "--leader-elect")
        .then(|| LeaderElection {
            lease_name: flag(args, "--lease-name").expect("--lease-name").to_owned(),
            lease_namespace: resolve(flag(args, "--lease-namespace").expect("--lease-namespace")),
            lease_duration: Duration::from_secs(4),
            renew_grace: Duration::from_secs(2),
        });
    OperatorConfig {
        namespace: flag(args, "--namespace").map(str::to_owned),
        max_concurrent_probes: flag(args, "--max-concurrent-probes")
            .expect("--max-concurrent-probes")
            .parse()
            .expect("a number"),
        status_refresh: GoDuration::from_str(
            flag(args, "--status-refresh").expect("--status-refresh"),
        )
        .expect("a duration")
        .0,
        instance: instance.to_owned(),
        leader_election,
        ..OperatorConfig::default()
    }
}

/// The rules of a (Cluster)Role as a set of (apiGroup, resource, verb, resourceName) tuples.
fn rule_set(role: &Value) -> BTreeSet<(String, String, String, String)> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s.as_str().expect("string").to_owned())
                    .collect()
            })
            .unwrap_or_else(|| vec![String::new()])
    };
    let mut set = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    for name in strings(&rule["resourceNames"]) {
                        set.insert((group.clone(), resource.clone(), verb.clone(), name));
                    }
                }
            }
        }
    }
    set
}

fn rules(items: &[(&str, &str, &[&str], &str)]) -> BTreeSet<(String, String, String, String)> {
    items
        .iter()
        .flat_map(|(group, resource, verbs, name)| {
            verbs.iter().map(move |verb| {
                (
                    group.to_string(),
                    resource.to_string(),
                    verb.to_string(),
                    name.to_string(),
                )
            })
        })
        .collect()
}

/// What the operator needs on DbPools, Secrets and events; nothing more.
fn operator_rules() -> BTreeSet<(String, String, String, String)> {
    rules(&[
        (
            "dbpool.io",
            "dbpools",
            &["get", "list", "watch", "patch"],
            "",
        ),
        ("dbpool.io", "dbpools/status", &["get", "patch"], ""),
        ("", "secrets", &["get", "list", "watch"], ""),
        ("events.k8s.io", "events", &["create", "patch"], ""),
    ])
}

/// Deletes the cluster-scoped objects a test applied, also when it fails.
struct ClusterObjects(Vec<String>);

impl Drop for ClusterObjects {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let _ = std::process::Command::new("kubectl")
            .arg("delete")
            .args(&self.0)
            .args(["--ignore-not-found", "--wait=false"])
            .env("KUBECONFIG", kubeconfig_path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}

async fn events(client: &Client, ns: &str, reason: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(POOL)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Runs the whole scenario in cluster mode (`namespace_mode` false) or namespace mode.
async fn operator_works_with_only_the_charts_rbac(namespace_mode: bool) {
    let logs = logs();
    let _serial = SERIAL.lock().await;
    let admin = client().await;
    install_crd(&admin).await;
    let release_ns = TestNamespace::with_prefix(&admin, "rbac-release").await;
    let apps = TestNamespace::with_prefix(&admin, "rbac-apps").await;
    let elsewhere = TestNamespace::with_prefix(&admin, "rbac-elsewhere").await;
    let (r, a, o) = (release_ns.name(), apps.name(), elsewhere.name());

    // Render the chart and check its RBAC is exactly what the operator needs.
    let release = unique_name("rbac");
    let mut extra = vec![];
    let watch = format!("watchNamespace={a}");
    if namespace_mode {
        extra = vec!["--set", watch.as_str()];
    }
    let docs = parse_docs(&template(&release, r, &extra).await);
    let fullname = format!("{release}-dbpool-operator");
    let sa = one(&docs, "ServiceAccount");
    assert_eq!(sa["metadata"]["name"], fullname.as_str());
    let deployment = one(&docs, "Deployment");
    let args = container_args(deployment);
    let lease_name = flag(&args, "--lease-name")
        .expect("--lease-name")
        .to_owned();
    let lease_rules = rules(&[
        ("coordination.k8s.io", "leases", &["create"], ""),
        (
            "coordination.k8s.io",
            "leases",
            &["get", "update"],
            &lease_name,
        ),
    ]);
    let roles: Vec<&Value> = of_kind(&docs, "Role");
    let cluster_roles: Vec<&Value> = of_kind(&docs, "ClusterRole");
    let election_role = roles
        .iter()
        .find(|role| role["metadata"]["name"] == format!("{fullname}-leader-election").as_str())
        .expect("the leader-election Role");
    assert_eq!(election_role["metadata"]["namespace"], r);
    assert_eq!(rule_set(election_role), lease_rules);
    if namespace_mode {
        assert!(
            cluster_roles.is_empty(),
            "namespace mode has no ClusterRole"
        );
        assert!(of_kind(&docs, "ClusterRoleBinding").is_empty());
        let role = roles
            .iter()
            .find(|role| role["metadata"]["name"] == fullname.as_str())
            .expect("the operator's Role");
        assert_eq!(role["metadata"]["namespace"], a);
        assert_eq!(rule_set(role), operator_rules());
        assert_eq!(roles.len(), 2);
    } else {
        assert_eq!(cluster_roles.len(), 1);
        assert_eq!(rule_set(cluster_roles[0]), operator_rules());
        assert_eq!(roles.len(), 1, "only the leader-election Role");
    }
    for binding in of_kind(&docs, "RoleBinding")
        .into_iter()
        .chain(of_kind(&docs, "ClusterRoleBinding"))
    {
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": fullname, "namespace": r}]),
            "{}",
            key(binding)
        );
    }

    // Apply the ServiceAccount and RBAC for real (nothing else of the chart).
    let rbac: Vec<Value> = docs
        .iter()
        .filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some(
                    "ServiceAccount"
                        | "Role"
                        | "RoleBinding"
                        | "ClusterRole"
                        | "ClusterRoleBinding"
                )
            )
        })
        .cloned()
        .collect();
    let _cluster_objects = ClusterObjects(
        rbac.iter()
            .filter(|d| d["metadata"].get("namespace").is_none())
            .map(|d| {
                format!(
                    "{}/{}",
                    d["kind"].as_str().unwrap_or_default().to_lowercase(),
                    d["metadata"]["name"].as_str().unwrap_or_default()
                )
            })
            .collect(),
    );
    kubectl_stdin_ok(
        [
            "apply",
            "--server-side",
            "--field-manager=dbpool-tests",
            "-f",
            "-",
        ],
        &to_yaml(&rbac),
    )
    .await;

    let operator_client = impersonating(r, &fullname).await;
    // The authorizer learns about new roles through its informers: wait until they apply.
    wait_until("the chart's RBAC to take effect", DEADLINE, || {
        let operator_client = operator_client.clone();
        let lease_name = lease_name.clone();
        async move {
            let pools: Api<DbPool> = if namespace_mode {
                Api::namespaced(operator_client.clone(), a)
            } else {
                Api::all(operator_client.clone())
            };
            let leases: Api<Lease> = Api::namespaced(operator_client, r);
            let lease_readable = match leases.get(&lease_name).await {
                Ok(_) => true,
                Err(kube::Error::Api(s)) => s.code == 404,
                Err(_) => false,
            };
            pools.list(&ListParams::default()).await.is_ok() && lease_readable
        }
    })
    .await;

    // Run the operator as the ServiceAccount, configured by the chart's arguments.
    let instance = format!("{fullname}-5d8f7c9b4-x2k7q");
    let config = config_from_args(&args, r, &instance);
    assert_eq!(config.namespace.as_deref(), namespace_mode.then_some(a));
    let election = config
        .leader_election
        .clone()
        .expect("the chart enables leader election");
    assert_eq!(election.lease_namespace, r);
    let log_start = logs.text().len();
    let operator = RunningOperator::start_with(operator_client.clone(), config);

    wait_until("the operator to lead", DEADLINE, || async {
        operator.metrics.is_leader()
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), r);
    let lease = leases.get(&election.lease_name).await.expect("the Lease");
    let spec = lease.spec.expect("lease spec");
    let holder = spec.holder_identity.unwrap_or_default();
    assert!(
        holder.starts_with(&format!("{instance}_")),
        "holder {holder:?} is not a unique identity of {instance:?}"
    );
    let first_renewal = spec.renew_time.expect("renewTime");

    // A pool whose Secret is missing: ConfigError, with an event (events create).
    let pg = PgServer::start().await;
    create(
        &admin,
        a,
        &pool(POOL, pg.port(), Some((SECRET, KEY)), json!({})),
    )
    .await;
    wait_status(&admin, a, POOL, "ConfigError", DEADLINE, |s| {
        s.phase == Some(Phase::ConfigError)
    })
    .await;
    let started = Instant::now();
    let config_error = loop {
        if let Some(event) = events(&admin, a, reasons::CONFIG_ERROR)
            .await
            .into_iter()
            .next()
        {
            break event;
        }
        if started.elapsed() > DEADLINE {
            let all: Api<DbPool> = Api::all(admin.clone());
            let pools = all
                .list(&ListParams::default())
                .await
                .map(|l| l.items.len());
            let text = logs.text();
            let tail: Vec<&str> = text[log_start.min(text.len())..]
                .lines()
                .filter(|l| l.contains(POOL) || l.contains("event") || l.contains("write"))
                .collect();
            panic!(
                "no ConfigError event after {DEADLINE:?} ({pools:?} DbPools in the cluster); the \
                 operator's log about it:\n{}",
                tail[tail.len().saturating_sub(60)..].join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // poll interval of the wait
    };
    assert_eq!(
        config_error.reporting_instance.as_deref(),
        Some(instance.as_str())
    );

    // The Secret appears (the metadata watch sees it, get reads it): Healthy, Ready, and the
    // breaker label written (dbpools patch).
    create_consenting_secret(&admin, a, SECRET, KEY, APP_PASSWORD, &["127.0.0.1"]).await;
    let status = wait_status(&admin, a, POOL, "Healthy", DEADLINE, |s| {
        s.phase == Some(Phase::Healthy)
    })
    .await;
    assert_eq!(
        condition(&status, CONDITION_READY).map(|c| c.0),
        Some("True".to_owned())
    );
    let pools: Api<DbPool> = Api::namespaced(admin.clone(), a);
    wait_until("the breaker label", DEADLINE, || async {
        pools
            .get(POOL)
            .await
            .ok()
            .is_some_and(|p| p.labels().get(BREAKER_LABEL).map(String::as_str) == Some("closed"))
    })
    .await;

    // The same event twice: created, then patched (a series).
    for token in ["first", "second"] {
        let patch = json!({"metadata": {"annotations": {FORCE_REOPEN_ANNOTATION: token}}});
        pools
            .patch(POOL, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("annotate");
        wait_status(&admin, a, POOL, "the force-reopen token", DEADLINE, |s| {
            s.last_force_reopen.as_ref().map(|r| r.token.as_str()) == Some(token)
        })
        .await;
    }
    wait_until(
        "the ForceReopen event patched into a series of 2",
        DEADLINE,
        || async {
            let found = events(&admin, a, reasons::FORCE_REOPEN).await;
            found.len() == 1 && found[0].series.as_ref().is_some_and(|s| s.count >= 2)
        },
    )
    .await;

    // The leader renews the Lease (update) and keeps it.
    wait_until("a Lease renewal", DEADLINE, || async {
        let spec = leases
            .get(&election.lease_name)
            .await
            .ok()
            .and_then(|l| l.spec);
        spec.is_some_and(|s| {
            s.holder_identity.as_deref() == Some(holder.as_str())
                && s.renew_time.is_some_and(|t| t.0 > first_renewal.0)
        })
    })
    .await;
    assert!(operator.metrics.is_leader());

    // The metrics the chart's alerts use exist, labelled with the pool's namespace and name.
    let exposition = operator.metrics.encode();
    for needle in [
        format!(r#"dbpool_circuit_breaker_state{{namespace="{a}",name="{POOL}",state="open"}} 0"#),
        format!(r#"dbpool_consecutive_failures{{namespace="{a}",name="{POOL}"}} 0"#),
        "# TYPE dbpool_recovery_attempts counter".to_owned(),
    ] {
        assert!(
            exposition.contains(&needle),
            "/metrics lacks {needle}:\n{exposition}"
        );
    }

    // No RBAC denial anywhere in what the operator logged.
    let user = format!("system:serviceaccount:{r}:{fullname}");
    let text = logs.text();
    let denials: Vec<&str> = text[log_start.min(text.len())..]
        .lines()
        .filter(|l| l.contains(&user) || l.contains("forbidden") || l.contains("Forbidden"))
        .filter(|l| l.contains(&user) || !l.contains("being terminated"))
        .collect();
    assert!(
        denials.is_empty(),
        "the operator met RBAC denials:\n{}",
        denials.join("\n")
    );

    // Outside its roles, the ServiceAccount is refused.
    let as_operator_pools: Api<DbPool> = Api::namespaced(operator_client.clone(), a);
    assert_forbidden(
        "deleting a DbPool",
        as_operator_pools
            .delete(POOL, &DeleteParams::default())
            .await,
    );
    let current = as_operator_pools.get(POOL).await.expect("get is allowed");
    assert_forbidden(
        "updating (PUT) a DbPool",
        as_operator_pools
            .replace(POOL, &PostParams::default(), &current)
            .await,
    );
    let pods: Api<Pod> = Api::namespaced(operator_client.clone(), a);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "not-allowed"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }))
    .expect("pod");
    assert_forbidden(
        "creating a pod",
        pods.create(&PostParams::default(), &pod).await,
    );
    let secrets: Api<Secret> = Api::namespaced(operator_client.clone(), a);
    assert_forbidden(
        "deleting a Secret",
        secrets.delete(SECRET, &DeleteParams::default()).await,
    );
    let new_secret = Secret {
        metadata: ObjectMeta {
            name: Some("planted".to_owned()),
            ..ObjectMeta::default()
        },
        ..Secret::default()
    };
    assert_forbidden(
        "creating a Secret",
        secrets.create(&PostParams::default(), &new_secret).await,
    );
    let core_events: Api<CoreEvent> = Api::namespaced(operator_client.clone(), a);
    assert_forbidden(
        "listing core/v1 events",
        core_events.list(&ListParams::default()).await,
    );
    let other_leases: Api<Lease> = Api::namespaced(operator_client.clone(), r);
    assert_forbidden(
        "reading another Lease of the release namespace",
        other_leases.get("some-other-lease").await,
    );
    let app_leases: Api<Lease> = Api::namespaced(operator_client.clone(), a);
    assert_forbidden(
        "reading a Lease outside the release namespace",
        app_leases.get(&election.lease_name).await,
    );
    create_secret_without_consent(&admin, o, "elsewhere", KEY, "not for the operator").await;
    let all_secrets: Api<Secret> = Api::all(operator_client.clone());
    let other_secrets: Api<Secret> = Api::namespaced(operator_client.clone(), o);
    if namespace_mode {
        assert_forbidden(
            "listing Secrets in a namespace it does not watch",
            other_secrets.list(&ListParams::default()).await,
        );
        assert_forbidden(
            "reading a Secret in a namespace it does not watch",
            other_secrets.get("elsewhere").await,
        );
        assert_forbidden(
            "listing Secrets cluster-wide",
            all_secrets.list(&ListParams::default()).await,
        );
        let all_pools: Api<DbPool> = Api::all(operator_client.clone());
        assert_forbidden(
            "listing DbPools cluster-wide",
            all_pools.list(&ListParams::default()).await,
        );
        let other_pools: Api<DbPool> = Api::namespaced(operator_client.clone(), o);
        assert_forbidden(
            "listing DbPools in a namespace it does not watch",
            other_pools.list(&ListParams::default()).await,
        );
    } else {
        // Cluster mode needs Secrets cluster-wide: pools in any namespace refer to their own.
        all_secrets
            .list(&ListParams::default())
            .await
            .expect("cluster mode lists Secrets cluster-wide");
        other_secrets
            .get("elsewhere")
            .await
            .expect("cluster mode reads Secrets in any namespace");
    }

    operator.kill().await;
    drop(pg);
    release_ns.cleanup().await;
    apps.cleanup().await;
    elsewhere.cleanup().await;
}

#[tokio::test]
async fn cluster_mode_operator_works_with_only_the_charts_rbac() {
    operator_works_with_only_the_charts_rbac(false).await;
}

#[tokio::test]
async fn namespace_mode_operator_works_with_only_the_charts_rbac() {
    operator_works_with_only_the_charts_rbac(true).await;
}
