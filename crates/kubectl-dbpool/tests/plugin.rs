//! `kubectl dbpool` against the real apiserver and PostgreSQL, with the operator running
//! in-process so pools change state: every verb (status, reopen, hold, release, diagnose, events),
//! kubectl's plugin discovery, and errors as messages (never panics).

use dbpool_operator::controller::RunningOperator;
use dbpool_testkit as support;

use std::{path::Path, process::Output, time::Duration};

use dbpool_api::{
    BreakerState, CONDITION_BREAKER_OPEN, DbPool, DbPoolStatus, HELD_BY_ANNOTATION,
    HOLD_ANNOTATION, Phase, RELEASED_BY_ANNOTATION, reason,
};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::{Api, Client, ResourceExt, api::PostParams};
use support::{
    kube::{TestNamespace, create_consenting_secret, install_crd, kubeconfig_path},
    pools::{condition, create, pool, wait_status},
    postgres::{APP_PASSWORD, PgServer},
};

const SECRET: &str = "db-credentials";
const KEY: &str = "password";
const BIN: &str = env!("CARGO_BIN_EXE_kubectl-dbpool");

struct Setup {
    client: Client,
    ns: TestNamespace,
}

async fn setup() -> Setup {
    let client = support::kube::client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client).await;
    Setup { client, ns }
}

impl Setup {
    fn ns(&self) -> &str {
        self.ns.name()
    }

    /// Runs the plugin with `--kubeconfig` and `-n` of this test.
    async fn plugin(&self, args: &[&str]) -> Output {
        let kubeconfig = kubeconfig_path();
        let mut all = vec![
            "--kubeconfig",
            kubeconfig.to_str().unwrap_or_default(),
            "-n",
            self.ns(),
        ];
        all.extend_from_slice(args);
        run(&all, &[("KUBECONFIG", "/dev/null")]).await
    }

    async fn wait(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&DbPoolStatus) -> bool,
    ) -> DbPoolStatus {
        wait_status(
            &self.client,
            self.ns(),
            name,
            what,
            Duration::from_secs(20),
            check,
        )
        .await
    }

    async fn get(&self, name: &str) -> DbPool {
        Api::<DbPool>::namespaced(self.client.clone(), self.ns())
            .get(name)
            .await
            .expect("get pool")
    }

    async fn healthy_pool(&self, pg: &PgServer, breaker: serde_json::Value) {
        create(
            &self.client,
            self.ns(),
            &pool(
                "orders",
                pg.port(),
                Some((SECRET, KEY)),
                serde_json::json!({
                    "backoff": {"initialDelay": "200ms", "maxDelay": "400ms"},
                    "breaker": breaker,
                }),
            ),
        )
        .await;
        self.wait("orders", "Healthy", |s| s.phase == Some(Phase::Healthy))
            .await;
    }
}

async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .await
        .expect("run kubectl-dbpool")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts the exit code, returning stdout.
fn expect_code(out: &Output, code: i32, what: &str) -> String {
    let (stdout, stderr) = text(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stdout
}

/// Who the test's credentials are, as the apiserver says.
async fn whoami(client: &Client) -> String {
    Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview")
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .expect("a user name")
}

fn breaker(s: &DbPoolStatus) -> Option<BreakerState> {
    s.breaker.as_ref().map(|b| b.state)
}

/// status, diagnose and events through an outage; reopen closes the breaker at once; kubectl
/// finds the plugin on PATH (`kubectl dbpool status -A`).
#[tokio::test]
async fn status_diagnose_events_and_reopen_through_an_outage() {
    let t = setup().await;
    let mut pg = PgServer::start().await;
    create_consenting_secret(&t.client, t.ns(), SECRET, KEY, APP_PASSWORD, &["127.0.0.1"]).await;
    let _op = RunningOperator::start(t.client.clone(), t.ns());
    t.healthy_pool(
        &pg,
        serde_json::json!({"failureThreshold": 2, "openTimeout": "10m"}),
    )
    .await;

    let out = expect_code(&t.plugin(&["status", "orders"]).await, 0, "status");
    let line = out.lines().nth(1).unwrap_or_default();
    assert!(out.starts_with("NAME"), "{out}");
    for word in ["orders", "Healthy", "Closed", "Success", "Saturation"] {
        assert!(line.contains(word), "{word} in {line:?}");
    }
    let out = expect_code(
        &t.plugin(&["diagnose", "orders"]).await,
        0,
        "diagnose healthy",
    );
    assert!(
        out.contains("HEALTHY") && out.contains("succeeded"),
        "{out}"
    );

    // kubectl's plugin discovery: kubectl-dbpool on PATH is `kubectl dbpool`, which then reads
    // KUBECONFIG like kubectl.
    let dir = Path::new(BIN).parent().expect("bin dir");
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let kubeconfig = kubeconfig_path();
    let out = tokio::process::Command::new("kubectl")
        .args(["dbpool", "status", "-A"])
        .env("PATH", &path)
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .await
        .expect("kubectl dbpool");
    let stdout = expect_code(&out, 0, "kubectl dbpool status -A");
    assert!(stdout.starts_with("NAMESPACE"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with(t.ns()) && l.contains("orders") && l.contains("Healthy")),
        "{stdout}"
    );

    pg.stop().await;
    t.wait("orders", "breaker Open", |s| {
        breaker(s) == Some(BreakerState::Open)
    })
    .await;
    let out = expect_code(&t.plugin(&["status", "orders"]).await, 0, "status open");
    let line = out.lines().nth(1).unwrap_or_default();
    for word in [
        "BreakerOpen",
        "Open",
        " ago",
        "in 9m",
        "TransientFailure",
        "Connect",
    ] {
        assert!(line.contains(word), "{word} in {line:?}");
    }
    let out = expect_code(&t.plugin(&["diagnose", "orders"]).await, 1, "diagnose open");
    assert!(
        out.starts_with(&format!("DbPool {}/orders: UNHEALTHY", t.ns())),
        "{out}"
    );
    assert!(out.contains("circuit breaker Open"), "{out}");
    assert!(out.contains("failed at stage Connect"), "{out}");
    assert!(out.contains("Nothing accepts TCP connections"), "{out}");
    assert!(out.contains("event BreakerOpened"), "{out}");
    let out = expect_code(&t.plugin(&["events", "orders"]).await, 0, "events");
    assert!(out.starts_with("LAST SEEN"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("Warning") && l.contains("BreakerOpened")),
        "{out}"
    );

    // The database is back; the open timeout is 10 minutes, so only a reopen closes it now.
    pg.start().await;
    let out = expect_code(
        &t.plugin(&["reopen", "orders", "--timeout", "20s"]).await,
        0,
        "reopen",
    );
    assert!(out.contains("force-reopen token kubectl-dbpool-"), "{out}");
    assert!(out.contains("the operator acted on it"), "{out}");
    let result = out.lines().last().unwrap_or_default();
    assert!(
        result.contains("Healthy") && result.contains("Closed"),
        "{out}"
    );
    let status = t.get("orders").await.status.expect("status");
    let token = status
        .last_force_reopen
        .map(|r| r.token)
        .unwrap_or_default();
    assert!(
        out.contains(&token) && token.starts_with("kubectl-dbpool-"),
        "{token} {out}"
    );
}

/// hold records who (SelfSubjectReview) and why and holds a healthy pool's breaker open; status
/// and diagnose show it; release records who and closes it.
#[tokio::test]
async fn hold_and_release_record_who_and_why() {
    let t = setup().await;
    let pg = PgServer::start().await;
    create_consenting_secret(&t.client, t.ns(), SECRET, KEY, APP_PASSWORD, &["127.0.0.1"]).await;
    let _op = RunningOperator::start(t.client.clone(), t.ns());
    t.healthy_pool(
        &pg,
        serde_json::json!({"openTimeout": "1s", "successThreshold": 1}),
    )
    .await;
    let who = whoami(&t.client).await;

    let out = expect_code(
        &t.plugin(&["hold", "orders", "--reason", "failover drill"])
            .await,
        0,
        "hold",
    );
    let held = format!("held by {who}: failover drill");
    assert!(out.contains(&held), "{out}");
    let pool = t.get("orders").await;
    assert_eq!(
        pool.annotations().get(HOLD_ANNOTATION).map(String::as_str),
        Some("failover drill")
    );
    assert_eq!(pool.annotations().get(HELD_BY_ANNOTATION), Some(&who));
    let s = t
        .wait("orders", "held open", |s| {
            condition(s, CONDITION_BREAKER_OPEN).is_some_and(|c| c.1 == reason::HELD)
        })
        .await;
    assert_eq!(breaker(&s), Some(BreakerState::Open));
    assert_eq!(
        condition(&s, CONDITION_BREAKER_OPEN).map(|c| c.2),
        Some(held.clone())
    );
    let out = expect_code(&t.plugin(&["status"]).await, 0, "status held");
    assert!(out.contains("Open (held)"), "{out}");
    let out = expect_code(&t.plugin(&["diagnose", "orders"]).await, 1, "diagnose held");
    assert!(
        out.contains(&format!("held open on purpose: {held}")),
        "{out}"
    );
    assert!(out.contains("kubectl dbpool release"), "{out}");
    let out = expect_code(&t.plugin(&["events", "orders"]).await, 0, "events held");
    assert!(
        out.lines()
            .any(|l| l.contains(reason::HELD) && l.contains(&held)),
        "{out}"
    );

    let out = expect_code(&t.plugin(&["release", "orders"]).await, 0, "release");
    assert!(out.contains(&format!("released by {who}")), "{out}");
    let pool = t.get("orders").await;
    assert_eq!(pool.annotations().get(HOLD_ANNOTATION), None);
    assert_eq!(pool.annotations().get(RELEASED_BY_ANNOTATION), Some(&who));
    t.wait("orders", "Healthy after the release", |s| {
        s.phase == Some(Phase::Healthy) && breaker(s) == Some(BreakerState::Closed)
    })
    .await;
    let out = expect_code(&t.plugin(&["release", "orders"]).await, 0, "release again");
    assert!(out.contains("is not held"), "{out}");
    let out = t.plugin(&["hold", "orders", "--reason", " "]).await;
    expect_code(&out, 2, "hold without a reason");
    assert!(text(&out).1.contains("--reason must say why"));
    expect_code(
        &t.plugin(&["diagnose", "orders"]).await,
        0,
        "diagnose released",
    );
}

/// A wrong password: diagnose names the Auth stage and SQLSTATE 28P01 with what to do.
#[tokio::test]
async fn diagnose_recommends_for_the_sqlstate() {
    let t = setup().await;
    let pg = PgServer::start().await;
    create_consenting_secret(
        &t.client,
        t.ns(),
        SECRET,
        KEY,
        "not-the-password-7f3a",
        &["127.0.0.1"],
    )
    .await;
    let _op = RunningOperator::start(t.client.clone(), t.ns());
    create(
        &t.client,
        t.ns(),
        &pool(
            "orders",
            pg.port(),
            Some((SECRET, KEY)),
            serde_json::json!({}),
        ),
    )
    .await;
    t.wait("orders", "ConfigError", |s| {
        s.phase == Some(Phase::ConfigError)
    })
    .await;
    let out = expect_code(&t.plugin(&["diagnose", "orders"]).await, 1, "diagnose");
    assert!(
        out.contains("failed at stage Auth (ConfigFailure)"),
        "{out}"
    );
    assert!(out.contains("SQLSTATE 28P01: wrong password"), "{out}");
    assert!(
        !out.contains("not-the-password"),
        "no password in output: {out}"
    );
}

/// Errors are one-line messages with exit code 2, never panics: a missing pool, an unknown
/// context, a missing kubeconfig, a namespace without pools.
#[tokio::test]
async fn errors_are_messages_not_panics() {
    let t = setup().await;
    for verb in [
        &["status", "nope"][..],
        &["diagnose", "nope"],
        &["events", "nope"],
        &["reopen", "nope"],
        &["hold", "nope", "--reason", "x"],
        &["release", "nope"],
    ] {
        let out = t.plugin(verb).await;
        expect_code(&out, 2, &format!("{verb:?}"));
        let stderr = text(&out).1;
        assert!(
            stderr.starts_with("error: dbpool \"nope\" not found in namespace"),
            "{verb:?}: {stderr}"
        );
    }
    let out = t.plugin(&["--context", "no-such-context", "status"]).await;
    expect_code(&out, 2, "unknown context");
    assert!(
        text(&out).1.starts_with("error: kubeconfig:"),
        "{:?}",
        text(&out)
    );
    let out = run(&["--kubeconfig", "/nonexistent/kubeconfig", "status"], &[]).await;
    expect_code(&out, 2, "missing kubeconfig");
    assert!(text(&out).1.contains("/nonexistent/kubeconfig"));
    let out = t.plugin(&["status"]).await;
    expect_code(&out, 0, "no pools");
    assert!(
        text(&out).1.contains("No DbPools found"),
        "{:?}",
        text(&out)
    );
}

/// The Krew manifest template names this binary for every platform and describes every verb.
#[test]
fn the_krew_manifest_template_ships_this_binary() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/krew/dbpool.yaml");
    let manifest = std::fs::read_to_string(&path).expect("deploy/krew/dbpool.yaml");
    assert!(manifest.contains("kind: Plugin\nmetadata:\n  name: dbpool\n"));
    assert_eq!(manifest.matches("bin: kubectl-dbpool\n").count(), 4);
    assert_eq!(
        manifest.matches("addURIAndSha").count(),
        5,
        "4 platforms + the comment"
    );
    for verb in ["status", "reopen", "hold", "release", "diagnose", "events"] {
        assert!(
            manifest.contains(&format!("kubectl dbpool {verb}")),
            "{verb}"
        );
    }
}
