//! End to end with a real Prometheus: the operator binary is scraped every second, the chart's
//! alert rules (rendered by helm, `for:` and the recovery-attempts window shortened through
//! values) are loaded, a PostgreSQL outage makes all three alerts fire in `/api/v1/alerts`, the
//! database's return resolves them, and then every Grafana dashboard query returns data
//! (`hack/dashboard-queries.py query`).
//!
//! Needs `prometheus` (Debian's package, hack/install-deps.sh) and python3; loopback only.

use dbpool_testkit as support;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use dbpool_operator::api::Phase;
use serde_json::{Value, json};
use support::{
    helm::{parse_docs, repo_root, template},
    kube::{kubeconfig_path, namespace_with_secret},
    pools::{create, pool, wait_status},
    ports::free_port,
    postgres::{APP_PASSWORD, PgServer},
    process::http_get,
    wait::{wait_for, wait_until},
};

const SECRET: &str = "db-credentials";
const KEY: &str = "password";
const ALERTS: [&str; 3] = [
    "DbPoolBreakerOpen",
    "DbPoolRecoveryAttemptsHigh",
    "DbPoolHealthCheckFailing",
];

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The result of an instant query, or None before Prometheus answers.
async fn query(port: u16, promql: &str) -> Option<Vec<Value>> {
    let (_, body) = http_get(port, &format!("/api/v1/query?query={}", url_encode(promql))).await?;
    let v: Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"].as_array().cloned()
}

/// The states of the three alerts for pools of `namespace` ("firing", "pending"; absent: none).
async fn alerts(port: u16, namespace: &str) -> Vec<(String, String)> {
    let Some((200, body)) = http_get(port, "/api/v1/alerts").await else {
        return Vec::new();
    };
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    let mut out: Vec<(String, String)> = v["data"]["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|a| a["labels"]["namespace"] == namespace)
        .map(|a| {
            (
                a["labels"]["alertname"].as_str().unwrap_or("").to_owned(),
                a["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The chart's alert rules as a Prometheus rules file, with shortened `for:` and window.
async fn render_rules(path: &Path) {
    let rendered = template(
        "dbpool-operator",
        "dbpool-system",
        &[
            "--show-only",
            "templates/prometheusrule.yaml",
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "prometheusRule.for.breakerOpen=2s",
            "--set",
            "prometheusRule.for.recoveryAttemptsHigh=0s",
            "--set",
            "prometheusRule.for.healthCheckFailing=0s",
            "--set",
            "prometheusRule.recoveryAttemptsWindow=15s",
        ],
    )
    .await;
    let docs = parse_docs(&rendered);
    let rule = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    let groups = &rule["spec"]["groups"];
    let text = serde_json::to_string_pretty(&json!({ "groups": groups })).expect("json");
    for alert in ALERTS {
        assert!(text.contains(alert), "{alert} in the rendered rules");
    }
    std::fs::write(path, text).expect("write rules");
}

#[tokio::test]
async fn alerts_fire_during_an_outage_and_resolve_after_it_and_the_dashboard_has_data() {
    let started = Instant::now();
    let (client, ns) = namespace_with_secret(SECRET, KEY, APP_PASSWORD).await;
    let mut pg = PgServer::start().await;

    // The operator binary, as it runs in the cluster.
    let metrics_port = free_port();
    let _operator = Process(
        Command::new(env!("CARGO_BIN_EXE_dbpool-operator"))
            .arg("run")
            .arg("--kubeconfig")
            .arg(kubeconfig_path())
            .args(["--namespace", ns.name()])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .env("POD_NAME", "dbpool-operator-e2e")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dbpool-operator"),
    );

    // Prometheus scraping it every second, with the chart's rules evaluated every second.
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.json");
    render_rules(&rules).await;
    let config = json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
        "rule_files": [rules],
        "scrape_configs": [{
            "job_name": "dbpool-operator",
            "honor_labels": true,
            "static_configs": [{"targets": [format!("127.0.0.1:{metrics_port}")]}],
        }],
    });
    let config_path = dir.path().join("prometheus.json");
    std::fs::write(&config_path, config.to_string()).expect("write config");
    let prom_port = free_port();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
    let _prometheus = Process(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus (Debian package prometheus: hack/install-deps.sh)"),
    );
    wait_until("Prometheus ready", Duration::from_secs(30), || async {
        matches!(http_get(prom_port, "/-/ready").await, Some((200, _)))
    })
    .await;

    // A pool with short timings: the breaker opens after 3 failures, trial probes every second.
    create(
        &client,
        ns.name(),
        &pool(
            "orders",
            pg.port(),
            Some((SECRET, KEY)),
            json!({
                "healthCheck": {"interval": "1s", "timeout": "500ms"},
                "backoff": {"initialDelay": "200ms", "maxDelay": "400ms", "maxAttempts": 100},
                "breaker": {"failureThreshold": 3, "openTimeout": "1s", "successThreshold": 1},
            }),
        ),
    )
    .await;
    wait_status(
        &client,
        ns.name(),
        "orders",
        "Healthy",
        Duration::from_secs(20),
        |s| s.phase == Some(Phase::Healthy),
    )
    .await;
    // Prometheus has the pool's counter at 0 and the leader gauge before the outage.
    let selector = format!(
        r#"dbpool_recovery_attempts_total{{namespace="{}"}}"#,
        ns.name()
    );
    wait_until(
        "Prometheus scraped the pool's series",
        Duration::from_secs(20),
        || async {
            query(prom_port, &selector)
                .await
                .is_some_and(|r| !r.is_empty())
                && query(prom_port, "dbpool_leader == 1")
                    .await
                    .is_some_and(|r| !r.is_empty())
        },
    )
    .await;
    assert!(alerts(prom_port, ns.name()).await.is_empty());

    // The outage: all three alerts reach firing.
    pg.stop().await;
    let outage = Instant::now();
    let firing = wait_for(
        "all three alerts firing",
        Duration::from_secs(45),
        || async {
            let now = alerts(prom_port, ns.name()).await;
            let all = ALERTS
                .iter()
                .all(|name| now.iter().any(|(a, s)| a == name && s == "firing"));
            all.then_some(now)
        },
    )
    .await;
    let fired_after = outage.elapsed();
    eprintln!("all alerts firing {fired_after:?} into the outage: {firing:?}");

    // The database returns: every alert resolves (leaves /api/v1/alerts).
    pg.start().await;
    let back = Instant::now();
    wait_until("all alerts resolved", Duration::from_secs(45), || async {
        alerts(prom_port, ns.name()).await.is_empty()
    })
    .await;
    let resolved_after = back.elapsed();
    eprintln!("all alerts resolved {resolved_after:?} after the database returned");

    // Every dashboard query returns data from this Prometheus.
    let out = tokio::process::Command::new("python3")
        .arg(repo_root().join("hack/dashboard-queries.py"))
        .args(["query", &format!("http://127.0.0.1:{prom_port}")])
        .args(["--namespace", ns.name(), "--rate-interval", "1m"])
        .output()
        .await
        .expect("run hack/dashboard-queries.py");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    assert!(out.status.success(), "dashboard queries:\n{report}");
    assert!(report.contains(" 0 failed"), "{report}");
    eprintln!("whole test: {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(120));
}
