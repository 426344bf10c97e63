//! The pool driven by its DbPool, against the real kube-apiserver and real PostgreSQL 15. The
//! operator is simulated by patching the status subresource directly; the client runs as a
//! ServiceAccount with exactly the Role the README documents (get/list/watch on dbpools, get on
//! secrets).

use std::time::Duration;

use dbpool_api::{DbPool, FORCE_REOPEN_ANNOTATION};
use dbpool_client::{BreakerState, Pool, PoolError, from_dbpool};
use dbpool_testkit::{
    kube::{TestNamespace, client, create_consenting_secret, install_crd, kubeconfig_path},
    pools,
    postgres::{APP_PASSWORD, PgServer},
    wait::{wait_for, wait_until},
};
use k8s_openapi::api::{
    core::v1::{Secret, ServiceAccount},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::json;
use tokio::time::Instant;

const SA: &str = "orders-app";

/// The Role of the README (examples/client-service/rbac.yaml): get/list/watch on dbpools, get
/// on the one Secret, bound to `SA`.
async fn app_role(admin: &Client, ns: &str) {
    let sa: ServiceAccount =
        serde_json::from_value(json!({ "metadata": { "name": SA } })).expect("sa");
    Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .expect("create sa");
    let role: Role = serde_json::from_value(json!({
        "metadata": { "name": "dbpool-client" },
        "rules": [
            { "apiGroups": ["dbpool.io"], "resources": ["dbpools"], "verbs": ["get", "list", "watch"] },
            { "apiGroups": [""], "resources": ["secrets"], "resourceNames": ["db"], "verbs": ["get"] },
        ],
    }))
    .expect("role");
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .expect("create role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": { "name": "dbpool-client" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "dbpool-client" },
        "subjects": [{ "kind": "ServiceAccount", "name": SA, "namespace": ns }],
    }))
    .expect("binding");
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .expect("create binding");
}

/// A client of the test control plane acting as ServiceAccount `ns/SA`.
async fn as_app(ns: &str) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig_path()).expect("kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:{SA}"));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".to_owned(),
        format!("system:serviceaccounts:{ns}"),
    ]);
    Client::try_from(config).expect("impersonating client")
}

struct Setup {
    admin: Client,
    ns: TestNamespace,
    pg: PgServer,
    pool: Pool,
}

/// PostgreSQL, a namespace with the Secret, a DbPool (openTimeout as given) and the app's Role;
/// the pool made by `from_dbpool` as the app's ServiceAccount, serving.
async fn setup(name: &str, open_timeout: &str) -> Setup {
    setup_with(
        name,
        json!({ "breaker": { "openTimeout": open_timeout }, "pool": { "minSize": 1, "maxSize": 5 } }),
    )
    .await
}

/// As [`setup`], with `spec` merged into the DbPool's spec.
async fn setup_with(name: &str, spec: serde_json::Value) -> Setup {
    // RUST_LOG=dbpool_client=debug shows the pool's decisions.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let admin = client().await;
    install_crd(&admin).await;
    let ns = TestNamespace::new(&admin).await;
    let pg = PgServer::start().await;
    create_consenting_secret(
        &admin,
        ns.name(),
        "db",
        "password",
        APP_PASSWORD,
        &["127.0.0.1"],
    )
    .await;
    let manifest = pools::pool(name, pg.port(), Some(("db", "password")), spec);
    pools::create(&admin, ns.name(), &manifest).await;
    app_role(&admin, ns.name()).await;
    let app = as_app(ns.name()).await;
    // The role is exactly that: listing Secrets is forbidden.
    let forbidden = Api::<Secret>::namespaced(app.clone(), ns.name())
        .list(&Default::default())
        .await;
    assert!(
        matches!(forbidden, Err(kube::Error::Api(ref s)) if s.code == 403),
        "{forbidden:?}"
    );
    let pool = wait_for("from_dbpool as the app", Duration::from_secs(10), || {
        let app = app.clone();
        let ns = ns.name().to_owned();
        async move { from_dbpool(app, &ns, name).await.ok() }
    })
    .await;
    wait_until("serving", Duration::from_secs(10), || async {
        select_one(&pool).await.is_ok()
    })
    .await;
    Setup {
        admin,
        ns,
        pg,
        pool,
    }
}

async fn select_one(pool: &Pool) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    client
        .simple_query("SELECT 1")
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Simulates the operator: sets `status.breaker.state`.
async fn set_breaker(admin: &Client, ns: &str, name: &str, state: &str) {
    let api: Api<DbPool> = Api::namespaced(admin.clone(), ns);
    let since = jiff::Timestamp::now().to_string();
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": {
            "breaker": { "state": state, "since": since },
            "lastProbe": { "time": since, "outcome": "TransientFailure", "stage": "Connect",
                           "message": "connection refused by 10.0.0.7:5432" },
        } })),
    )
    .await
    .expect("patch status");
}

/// Simulates the operator's readiness pings: sets `status.readiness` (state, since now).
async fn set_readiness(admin: &Client, ns: &str, name: &str, state: &str) {
    let api: Api<DbPool> = Api::namespaced(admin.clone(), ns);
    let since = jiff::Timestamp::now().to_string();
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": { "readiness": { "state": state, "since": since } } })),
    )
    .await
    .expect("patch status");
}

async fn patch_pool(admin: &Client, ns: &str, name: &str, patch: serde_json::Value) {
    let api: Api<DbPool> = Api::namespaced(admin.clone(), ns);
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("patch DbPool");
}

async fn sessions(pg: &PgServer, ns: &str, name: &str) -> i64 {
    pg.query_text(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dbpool-client/{ns}/{name}'"
    ))
    .await
    .and_then(|t| t.parse().ok())
    .unwrap_or(-1)
}

/// The readiness edge from the DbPool's status: the server stops and comes back, the simulated
/// operator writes `status.readiness` Unreachable, then Accepting, and the client's early trial
/// serves at once, long before its 10 s retry. While its watch is live the client pings nothing,
/// and its callers get the real cause at once (nothing in flight to wait for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readiness_edge_in_the_status_brings_the_trial_and_the_client_pings_nothing() {
    let Setup {
        admin,
        ns,
        mut pg,
        pool,
    } = setup_with(
        "orders",
        json!({
            "breaker": { "openTimeout": "10m" },
            "backoff": { "initialDelay": "10s", "maxDelay": "10s" },
            "pool": { "minSize": 1, "maxSize": 5 },
        }),
    )
    .await;
    let n = ns.name().to_owned();
    assert!(pool.status().readiness_followed, "{:?}", pool.status());

    pg.stop().await;
    wait_until(
        "the loss is probed and the probe fails",
        Duration::from_secs(10),
        || async { pool.status().consecutive_failures >= 1 },
    )
    .await;
    set_readiness(&admin, &n, "orders", "Unreachable").await;
    for _ in 0..20 {
        let t = Instant::now();
        let err = pool.get().await.expect_err("the server is down");
        assert!(
            matches!(err, PoolError::Unavailable { .. }),
            "the real cause while down: {err}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "no wait for the 10 s retry"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    pg.start().await;
    let t = Instant::now();
    set_readiness(&admin, &n, "orders", "Accepting").await;
    wait_until(
        "serving after the readiness edge",
        Duration::from_secs(5),
        || async { select_one(&pool).await.is_ok() },
    )
    .await;
    eprintln!("status.readiness Accepting → serving in {:?}", t.elapsed());
    let status = pool.status();
    assert_eq!(status.pings_started, 0, "no pings while the watch is live");
    assert!(status.readiness_followed);
    ns.cleanup().await;
}

/// DbPool Open → the client fails fast and its idle connections are gone; DbPool Closed → it
/// probes at once and serves; Open again, then a new force-reopen token → it probes at once.
/// The open timeout is 10 min, so only the hints explain the quick recoveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbpool_open_fails_fast_and_closing_or_force_reopen_probes_at_once() {
    let Setup {
        admin,
        ns,
        pg,
        pool,
    } = setup("orders", "10m").await;
    let n = ns.name().to_owned();

    set_breaker(&admin, &n, "orders", "Open").await;
    let err = wait_for(
        "fail fast after the DbPool opens",
        Duration::from_secs(10),
        || async { pool.get().await.err().filter(PoolError::is_breaker_open) },
    )
    .await;
    eprintln!("DbPool Open → {err}");
    let cause = err.cause().expect("the operator's cause");
    assert!(
        cause.message.contains("connection refused by 10.0.0.7"),
        "{cause:?}"
    );
    let t = Instant::now();
    for _ in 0..100 {
        assert!(pool.get().await.is_err());
    }
    let per_call = t.elapsed() / 100;
    assert!(
        per_call < Duration::from_millis(2),
        "fail-fast {per_call:?} per call"
    );
    assert_eq!(pool.status().idle, 0, "idle connections purged");
    wait_until("server sessions closed", Duration::from_secs(5), || async {
        sessions(&pg, &n, "orders").await == 0
    })
    .await;

    let t = Instant::now();
    set_breaker(&admin, &n, "orders", "Closed").await;
    wait_until(
        "serving after the DbPool closed",
        Duration::from_secs(5),
        || async { select_one(&pool).await.is_ok() },
    )
    .await;
    eprintln!("DbPool Closed → serving in {:?}", t.elapsed());

    set_breaker(&admin, &n, "orders", "Open").await;
    wait_until("fail fast again", Duration::from_secs(10), || async {
        pool.get().await.is_err()
    })
    .await;
    let t = Instant::now();
    patch_pool(
        &admin,
        &n,
        "orders",
        json!({ "metadata": { "annotations": { FORCE_REOPEN_ANNOTATION: "token-1" } } }),
    )
    .await;
    wait_until(
        "serving after force-reopen",
        Duration::from_secs(5),
        || async { select_one(&pool).await.is_ok() },
    )
    .await;
    eprintln!("force-reopen token → serving in {:?}", t.elapsed());
    // The DbPool still says Open: the local trial's success is what serves.
    assert_eq!(pool.status().dbpool_breaker, Some(BreakerState::Open));
    ns.cleanup().await;
}

/// An operator that cannot reach the database must not take down applications that can: the
/// DbPool says Open, the client fails fast until its own trial (openTimeout 1 s) connects, then
/// serves while the DbPool still says Open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbpool_open_but_database_reachable_serves_after_the_local_trial() {
    // Bind the server: `..` would drop (and stop) it at the end of the statement.
    let Setup {
        admin,
        ns,
        pool,
        pg: _pg,
    } = setup("reach", "1s").await;
    let n = ns.name().to_owned();
    set_breaker(&admin, &n, "reach", "Open").await;
    wait_until(
        "fail fast after the DbPool opens",
        Duration::from_secs(10),
        || async { pool.get().await.is_err() },
    )
    .await;
    let t = Instant::now();
    wait_until(
        "served after the local trial",
        Duration::from_secs(10),
        || async { select_one(&pool).await.is_ok() },
    )
    .await;
    let status = pool.status();
    assert_eq!(status.breaker, BreakerState::Closed);
    assert_eq!(status.dbpool_breaker, Some(BreakerState::Open));
    eprintln!("local trial served {:?} after failing fast", t.elapsed());
    ns.cleanup().await;
}

/// breaker.mode ForcedOpen (maintenance) binds the client even though the database answers;
/// back to Auto, it serves. A spec change (maxSize) applies while running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_open_binds_the_client_and_spec_changes_apply() {
    // Bind the server: `..` would drop (and stop) it at the end of the statement.
    let Setup {
        admin,
        ns,
        pool,
        pg: _pg,
    } = setup("maint", "1s").await;
    let n = ns.name().to_owned();
    assert_eq!(pool.status().max_size, 5);
    patch_pool(
        &admin,
        &n,
        "maint",
        json!({ "spec": { "breaker": { "mode": "ForcedOpen" }, "pool": { "maxSize": 7 } } }),
    )
    .await;
    let err = wait_for("held open", Duration::from_secs(10), || async {
        pool.get().await.err()
    })
    .await;
    assert!(
        matches!(err, PoolError::BreakerOpen { forced: true, .. }),
        "{err:?}"
    );
    assert_eq!(pool.status().max_size, 7, "spec change applied");
    // Past the open timeout, with probes succeeding, it stays held.
    let successes_from = pool.status().last_success;
    wait_until(
        "a successful probe while held",
        Duration::from_secs(10),
        || async { pool.status().last_success > successes_from },
    )
    .await;
    assert!(pool.get().await.is_err(), "still held open");
    patch_pool(
        &admin,
        &n,
        "maint",
        json!({ "spec": { "breaker": { "mode": "Auto" } } }),
    )
    .await;
    wait_until(
        "serving after maintenance",
        Duration::from_secs(10),
        || async { select_one(&pool).await.is_ok() },
    )
    .await;
    ns.cleanup().await;
}
