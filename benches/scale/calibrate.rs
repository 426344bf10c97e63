//! The control plane's price per write on this machine, measured before any operator runs.
//!
//! Lives here: [`calibrate`]: 200 ConfigMap merge patches, 200 server-side applies of a
//! realistic DbPool status and 200 merge patches of it, one at a time, with kube-apiserver +
//! etcd CPU above idle and the client-side latency. Must not live here: anything about the
//! operator (none runs during the calibration).

use std::time::{Duration, Instant};

use dbpool_operator::api::DbPool;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};

use crate::{
    procfs::control_plane_cpu,
    report::{show, stats},
    settings::{KEY, SECRET},
    support::{self, kube::TestNamespace},
};

/// Writes per kind.
const WRITES: usize = 200;

/// The kinds of write, in the order they are measured.
const KINDS: [&str; 3] = [
    "ConfigMap merge patch",
    "DbPool status server-side apply (what the operator sends)",
    "DbPool status merge patch",
];

/// What one write costs the control plane on this machine, without the operator: 200 ConfigMap
/// merge patches and 200 server-side applies of a realistic DbPool status, one at a time
/// (kube-apiserver + etcd CPU above idle, and the client-side latency).
pub async fn calibrate(client: &Client) -> String {
    let Some(_) = control_plane_cpu() else {
        return "skipped (no DBPOOL_ENV_DIR pid files)".to_owned();
    };
    let ns = TestNamespace::with_prefix(client, "bench-calibrate").await;
    let maps: Api<ConfigMap> = ns.api();
    let pools: Api<DbPool> = ns.api();
    let map = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "calibrate"},
        "data": {"n": "0"},
    }))
    .expect("ConfigMap");
    maps.create(&PostParams::default(), &map)
        .await
        .expect("create ConfigMap");
    let pool = support::pools::pool(
        "calibrate",
        5432,
        Some((SECRET, KEY)),
        serde_json::json!({}),
    );
    pools
        .create(&PostParams::default(), &pool)
        .await
        .expect("create DbPool");
    // Idle rate first.
    let idle_from = (Instant::now(), control_plane_cpu().unwrap_or(0.0));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle =
        (control_plane_cpu().unwrap_or(0.0) - idle_from.1) / idle_from.0.elapsed().as_secs_f64();
    let mut results = Vec::new();
    for kind in KINDS {
        let (start, cpu0) = (Instant::now(), control_plane_cpu().unwrap_or(0.0));
        let mut latencies = Vec::with_capacity(WRITES);
        for i in 0..WRITES {
            let t = Instant::now();
            write_once(kind, i, &maps, &pools).await;
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let wall = start.elapsed().as_secs_f64();
        let cpu = control_plane_cpu().unwrap_or(0.0) - cpu0 - idle * wall;
        let latency = stats(latencies);
        results.push(format!(
            "{kind}: {:.1} ms kube-apiserver + etcd CPU per write above idle, latency {}",
            cpu * 1000.0 / WRITES as f64,
            show(latency)
        ));
    }
    ns.cleanup().await;
    let text = results.join("; ");
    progress!("calibration: {text}");
    text
}

/// Write number `i` of `kind`.
async fn write_once(kind: &str, i: usize, maps: &Api<ConfigMap>, pools: &Api<DbPool>) {
    if kind.starts_with("ConfigMap") {
        let body = serde_json::json!({"data": {"n": i.to_string()}});
        maps.patch("calibrate", &PatchParams::default(), &Patch::Merge(&body))
            .await
            .expect("patch ConfigMap");
    } else if kind.contains("server-side apply") {
        pools
            .patch_status(
                "calibrate",
                &PatchParams::apply("dbpool-bench").force(),
                &Patch::Apply(&status_body()),
            )
            .await
            .expect("apply DbPool status");
    } else {
        pools
            .patch_status(
                "calibrate",
                &PatchParams::default(),
                &Patch::Merge(&status_body()),
            )
            .await
            .expect("merge-patch DbPool status");
    }
}

/// A healthy pool's status as the operator writes it, stamped now.
fn status_body() -> serde_json::Value {
    let time = k8s_openapi::jiff::Timestamp::now().to_string();
    serde_json::json!({
        "apiVersion": "dbpool.io/v1alpha1", "kind": "DbPool",
        "status": {
            "observedGeneration": 1, "phase": "Healthy",
            "breaker": {"state": "Closed", "openCount": 0, "halfOpenSuccesses": 0},
            "consecutiveFailures": 0, "recoveryAttempts": 0,
            "lastProbe": {
                "time": time, "outcome": "Success", "stage": "Saturation",
                "latencyMs": 1, "message": "ok: PostgreSQL 15, primary",
                "serverVersion": "15", "inRecovery": false, "connections": 1,
                "maxConnections": 97,
            },
            "lastSuccessTime": time,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "ProbeSucceeded",
                 "message": "the database answered the last probe",
                 "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1},
                {"type": "Degraded", "status": "False", "reason": "AsExpected",
                 "message": "no failures",
                 "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1},
                {"type": "BreakerOpen", "status": "False", "reason": "Closed",
                 "message": "breaker is closed",
                 "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1},
            ],
        },
    })
}
