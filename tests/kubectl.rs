//! What a person sees with kubectl against the real kube-apiserver: the CRD and examples apply,
//! `get` prints the printer columns (with values once a status exists), `explain` shows the field
//! docs written in src/api, admission messages reach the user, and kubectl matches the server.
//!
//! Needs the control plane that `make test` starts (or `eval "$(make -s env-up)"`).

use dbpool_testkit as support;

use std::time::Duration;

use dbpool_operator::api::{
    BreakerState, BreakerStatus, DbPool, DbPoolStatus, Phase, ProbeOutcome, ProbeStage,
    ProbeSummary,
};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp};
use kube::api::{Patch, PatchParams};
use support::{
    kube::{TestNamespace, client, install_crd, kubectl, kubectl_ok},
    wait::wait_for,
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const DEADLINE: Duration = Duration::from_secs(60);

/// The whitespace-separated words of the header line of `kubectl get` output.
fn header(output: &str) -> Vec<&str> {
    output
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect()
}

/// The row of `kubectl get` output whose first column is `name`, split into columns.
fn row<'a>(output: &'a str, name: &str) -> Vec<&'a str> {
    output
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&name))
        .unwrap_or_else(|| panic!("no row {name} in:\n{output}"))
}

#[tokio::test]
async fn crds_and_examples_apply_and_get_shows_the_columns() {
    let client = client().await;
    let applied = kubectl_ok(["apply", "-f", &format!("{ROOT}/crds/")]).await;
    assert!(
        applied.contains("customresourcedefinition.apiextensions.k8s.io/dbpools.dbpool.io"),
        "{applied}"
    );
    kubectl_ok([
        "wait",
        "--for=condition=Established",
        "crd/dbpools.dbpool.io",
        "--timeout=60s",
    ])
    .await;

    let ns = TestNamespace::new(&client).await;
    let applied = kubectl_ok(["apply", "-n", ns.name(), "-f", &format!("{ROOT}/examples/")]).await;
    for name in ["orders", "payments"] {
        assert!(
            applied.contains(&format!("dbpool.dbpool.io/{name}")),
            "{applied}"
        );
    }

    let listed = kubectl_ok(["get", "dbpools", "-n", ns.name()]).await;
    assert_eq!(
        header(&listed),
        [
            "NAME",
            "PHASE",
            "BREAKER",
            "FAILURES",
            "LATENCY",
            "LAST-PROBE",
            "AGE"
        ],
        "{listed}"
    );
    // No status yet: the name, then only the age.
    assert_eq!(row(&listed, "orders").len(), 2, "{listed}");
    assert_eq!(row(&listed, "payments").len(), 2, "{listed}");

    // The short name and the category both work.
    let short = kubectl_ok(["get", "dbp", "-n", ns.name(), "-o", "name"]).await;
    assert_eq!(
        short.lines().collect::<Vec<_>>(),
        ["dbpool.dbpool.io/orders", "dbpool.dbpool.io/payments"]
    );

    // Once the operator has written a status, the columns show it. The status is written here as
    // the operator would: the typed DbPoolStatus through the status subresource.
    let now = MicroTime(Timestamp::now());
    let status = DbPoolStatus {
        observed_generation: Some(1),
        phase: Some(Phase::Healthy),
        breaker: Some(BreakerStatus {
            state: BreakerState::Closed,
            since: Some(now.clone()),
            next_probe_at: None,
            open_count: 0,
            half_open_successes: 0,
        }),
        consecutive_failures: 0,
        last_probe: Some(ProbeSummary {
            time: now.clone(),
            outcome: ProbeOutcome::Success,
            stage: Some(ProbeStage::Saturation),
            latency_ms: 7,
            message: None,
            sql_state: None,
            server_version: Some("15.18".into()),
            in_recovery: Some(false),
            connections: Some(3),
            max_connections: Some(97),
        }),
        last_success_time: Some(now),
        ..DbPoolStatus::default()
    };
    let pools = ns.api::<DbPool>();
    pools
        .patch_status(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": status })),
        )
        .await
        .expect("the apiserver accepts the operator's status");
    let listed = kubectl_ok(["get", "dbpools", "-n", ns.name()]).await;
    let orders = row(&listed, "orders");
    assert_eq!(orders[1..5], ["Healthy", "Closed", "0", "7"], "{listed}");
    assert_eq!(orders.len(), 7, "{listed}");
    ns.cleanup().await;
}

#[tokio::test]
async fn explain_shows_the_field_docs() {
    let client = client().await;
    install_crd(&client).await;
    // The OpenAPI document of a new CRD is published a moment after it is Established.
    let explained = wait_for("kubectl explain dbpool.spec.backoff", DEADLINE, || async {
        let out = kubectl(["explain", "dbpool.spec.backoff"]).await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && text.contains("initialDelay")).then_some(text)
    })
    .await;
    for want in [
        "Reconnect schedule after failures",
        "initialDelay",
        "Delay before the first retry.",
        "maxAttempts",
        "cooldown",
        "Fraction (0 to 1) by which each delay is randomly shortened",
    ] {
        assert!(
            explained.contains(want),
            "missing {want:?} in:\n{explained}"
        );
    }

    let spec = kubectl_ok(["explain", "dbpool.spec"]).await;
    for want in ["database", "-required-", "healthCheck", "breaker", "pool"] {
        assert!(spec.contains(want), "missing {want:?} in:\n{spec}");
    }
}

#[tokio::test]
async fn kubectl_reports_admission_messages() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: dbpool.io/v1alpha1\nkind: DbPool\nmetadata:\n  name: bad\nspec:\n  \
         database: {host: db, dbname: app, user: app}\n  pool: {minSize: 9, maxSize: 3}\n",
    )
    .expect("write manifest");
    let out = kubectl([
        "apply",
        "-n",
        ns.name(),
        "-f",
        file.to_str().expect("utf-8"),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an invalid DbPool was applied");
    assert!(
        stderr.contains("pool.minSize must not be greater than pool.maxSize"),
        "{stderr}"
    );
    ns.cleanup().await;
}

#[tokio::test]
async fn kubectl_and_apiserver_are_the_pinned_version() {
    let out = kubectl_ok(["version"]).await;
    assert!(out.contains("Client Version: v1.35.4"), "{out}");
    assert!(out.contains("Server Version: v1.35.4"), "{out}");
}
