//! End-to-end tests of the operator: real kube-apiserver, real PostgreSQL, the operator in-process.
//!
//! Each test has its own namespace, PostgreSQL server(s) and operator (watching that namespace
//! only). Timings in the specs are short (300ms initial delay, 1s open timeout) so the suite stays
//! fast; every wait has a deadline.

use dbpool_operator::api::reason as reasons;
use dbpool_operator::controller::RunningOperator;
use dbpool_testkit as support;

use std::time::{Duration, Instant};

use dbpool_operator::api::{
    BREAKER_LABEL, BreakerState, CONDITION_BREAKER_OPEN, CONDITION_READY, DbPool, DbPoolStatus,
    FORCE_REOPEN_ANNOTATION, HELD_BY_ANNOTATION, HOLD_ANNOTATION, Phase, ProbeOutcome,
    RELEASED_BY_ANNOTATION, reason,
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use support::{
    hostile::{Behaviour, FakeServer},
    kube::{
        TestNamespace, create_consenting_secret, create_secret_without_consent, install_crd,
        kubectl,
    },
    pools::{condition, create, pool, status, wait_status},
    postgres::{APP_PASSWORD, PgServer},
    wait::{wait_for, wait_until},
};

const SECRET: &str = "db-credentials";
const KEY: &str = "password";

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
    fn api(&self) -> Api<DbPool> {
        Api::namespaced(self.client.clone(), self.ns())
    }
    async fn secret(&self, value: &str) {
        create_consenting_secret(&self.client, self.ns(), SECRET, KEY, value, &["127.0.0.1"]).await;
    }
    async fn create(&self, pool: &DbPool) {
        create(&self.client, self.ns(), pool).await;
    }
    /// Creates `pool` and waits until it is Healthy.
    async fn create_healthy(&self, pool: &DbPool) {
        self.create(pool).await;
        let name = pool.name_any();
        self.wait(&name, "Healthy", Duration::from_secs(20), is_ready)
            .await;
    }
    async fn status(&self, name: &str) -> Option<DbPoolStatus> {
        status(&self.client, self.ns(), name).await
    }
    async fn wait(
        &self,
        name: &str,
        what: &str,
        deadline: Duration,
        check: impl Fn(&DbPoolStatus) -> bool,
    ) -> DbPoolStatus {
        wait_status(&self.client, self.ns(), name, what, deadline, check).await
    }
    /// Waits until pool `name`'s breaker is Open.
    async fn wait_open(&self, name: &str) -> DbPoolStatus {
        self.wait(name, "breaker Open", Duration::from_secs(20), |s| {
            breaker(s) == Some(BreakerState::Open)
        })
        .await
    }
    async fn events(&self, reason: &str) -> Vec<K8sEvent> {
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), self.ns());
        api.list(&ListParams::default())
            .await
            .map(|l| {
                l.items
                    .into_iter()
                    .filter(|e| e.reason.as_deref() == Some(reason))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// When the operator's probe connection last started a query (epoch seconds), from
/// pg_stat_activity, which is live (unlike the cumulative statistics).
async fn last_probe_query(pg: &PgServer) -> f64 {
    let sql = "SELECT coalesce(extract(epoch from max(query_start)), 0)::float8::text \
               FROM pg_stat_activity WHERE application_name = 'dbpool-operator'";
    pg.query_text(sql)
        .await
        .and_then(|t| t.parse().ok())
        .unwrap_or(0.0)
}

fn is_ready(s: &DbPoolStatus) -> bool {
    s.phase == Some(Phase::Healthy) && condition(s, CONDITION_READY).is_some_and(|c| c.0 == "True")
}

fn breaker(s: &DbPoolStatus) -> Option<BreakerState> {
    s.breaker.as_ref().map(|b| b.state)
}

/// 1. A DbPool becomes Ready/Healthy; kubectl shows it and `kubectl wait` returns.
#[tokio::test]
async fn a_pool_becomes_healthy_and_kubectl_shows_it() {
    let t = setup().await;
    let pg = PgServer::start().await;
    t.secret(APP_PASSWORD).await;
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

    let out = kubectl([
        "wait",
        "-n",
        t.ns(),
        "--for=condition=Ready",
        "dbpool/orders",
        "--timeout=30s",
    ])
    .await;
    assert!(
        out.status.success(),
        "kubectl wait: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = t.status("orders").await.expect("status");
    assert!(is_ready(&s), "{s:?}");
    let probe = s.last_probe.expect("lastProbe");
    assert_eq!(probe.outcome, ProbeOutcome::Success);
    assert!(probe.server_version.is_some_and(|v| v.starts_with("15")));
    assert_eq!(s.observed_generation, Some(1));

    let out = kubectl(["get", "dbpools", "-n", t.ns()]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("PHASE") && table.contains("BREAKER"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("orders"))
        .expect("row for orders");
    assert!(row.contains("Healthy") && row.contains("Closed"), "{row}");
    let labels = t.api().get("orders").await.expect("get").labels().clone();
    assert_eq!(
        labels.get(BREAKER_LABEL).map(String::as_str),
        Some("closed")
    );
}

/// 2 + 3. Stop PostgreSQL: failures climb on the backoff schedule, the breaker opens with its
/// label and an event; start it: half-open after openTimeout, closed after successThreshold.
#[tokio::test]
async fn outage_opens_the_breaker_on_schedule_and_recovery_closes_it() {
    let t = setup().await;
    let mut pg = PgServer::start().await;
    t.secret(APP_PASSWORD).await;
    // Every failure count must reach the status to check the schedule: no per-pool coalescing
    // (the write budget has its own test, tests/write_budget.rs).
    let _op = RunningOperator::start_with(
        t.client.clone(),
        dbpool_operator::controller::OperatorConfig {
            namespace: Some(t.ns().to_owned()),
            min_status_period: Duration::ZERO,
            ..Default::default()
        },
    );
    let spec = pool(
        "flappy",
        pg.port(),
        Some((SECRET, KEY)),
        serde_json::json!({
            "healthCheck": {"interval": "1s", "timeout": "500ms"},
            "backoff": {"initialDelay": "400ms", "multiplier": 2.0, "maxDelay": "10s"},
            "breaker": {"failureThreshold": 4, "openTimeout": "2s", "successThreshold": 2},
        }),
    );
    t.create_healthy(&spec).await;

    // Watch the pool and record, for each new failure count, the failure time the operator wrote
    // (microsecond precision): the attempt times the schedule is checked against.
    let api = t.api();
    let (listed_tx, listed) = tokio::sync::oneshot::channel::<()>();
    let observed = tokio::spawn(async move {
        let mut seen: Vec<(i32, k8s_openapi::jiff::Timestamp)> = Vec::new();
        let mut stream = watcher(
            api,
            watcher::Config::default().fields("metadata.name=flappy"),
        )
        .applied_objects()
        .boxed();
        let mut listed_tx = Some(listed_tx);
        while let Ok(Some(p)) = stream.try_next().await {
            // The watch has listed the pool: the outage may start.
            if let Some(tx) = listed_tx.take() {
                let _ = tx.send(());
            }
            let failures = p
                .status
                .as_ref()
                .map(|s| s.consecutive_failures)
                .unwrap_or(0);
            let failed_at = p.status.as_ref().and_then(|s| s.last_failure_time.as_ref());
            if let Some(at) = failed_at.filter(|_| failures > 0)
                && seen.last().is_none_or(|(n, _)| *n != failures)
            {
                seen.push((failures, at.0));
            }
            if p.status.as_ref().and_then(breaker) == Some(BreakerState::Open) {
                return seen;
            }
        }
        seen
    });
    // Stop the database only once the watch sees the pool, so it cannot miss the first failure
    // (writes no longer wait for the reconcile, so they can beat a slow initial list).
    tokio::time::timeout(Duration::from_secs(10), listed)
        .await
        .expect("the watch listed the pool within 10s")
        .expect("watch task");
    pg.stop().await;
    let seen = tokio::time::timeout(Duration::from_secs(30), observed)
        .await
        .expect("breaker opened within 30s")
        .expect("watch task");
    let counts: Vec<i32> = seen.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        counts,
        [1, 2, 3, 4],
        "failures climb one at a time until the threshold"
    );
    // Delays after failures 1, 2, 3 are 400ms, 800ms, 1600ms (jitter 0): each attempt comes no
    // earlier than its delay, and late only by the probe and scheduling overhead.
    for (i, expected) in [400u64, 800, 1600].into_iter().enumerate() {
        let gap = Duration::try_from(seen[i + 1].1.duration_since(seen[i].1)).expect("ordered");
        let expected = Duration::from_millis(expected);
        assert!(
            gap >= expected && gap <= expected + Duration::from_millis(500),
            "gap after failure {} was {gap:?}, schedule says {expected:?} (failures seen: {seen:?})",
            i + 1
        );
    }
    let s = t.status("flappy").await.expect("status");
    assert_eq!(s.phase, Some(Phase::BreakerOpen));
    let b = s.breaker.clone().expect("breaker");
    assert!(
        b.since.is_some() && b.next_probe_at.is_some() && b.open_count == 1,
        "{b:?}"
    );
    assert_eq!(
        condition(&s, "BreakerOpen").map(|c| c.0),
        Some("True".into())
    );
    // `kubectl get dbpools -l dbpool.io/breaker=open` lists it (the label follows the status).
    let selector = format!("{BREAKER_LABEL}=open");
    wait_until("the breaker=open label", Duration::from_secs(5), || async {
        t.api()
            .list(&ListParams::default().labels(&selector))
            .await
            .is_ok_and(|l| l.items.len() == 1)
    })
    .await;
    let out = kubectl([
        "get",
        "dbpools",
        "-n",
        t.ns(),
        "-l",
        &selector,
        "-o",
        "name",
    ])
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "dbpool.dbpool.io/flappy"
    );
    wait_until("a BreakerOpened event", Duration::from_secs(10), || async {
        !t.events(reasons::BREAKER_OPENED).await.is_empty()
    })
    .await;

    // Recovery: half-open after openTimeout, closed after two successes.
    pg.start().await;
    let s = t
        .wait("flappy", "Healthy again", Duration::from_secs(30), is_ready)
        .await;
    assert_eq!(breaker(&s), Some(BreakerState::Closed));
    assert_eq!(s.consecutive_failures, 0);
    for reason in [reasons::BREAKER_HALF_OPEN, reasons::BREAKER_CLOSED] {
        wait_until(reason, Duration::from_secs(10), || async {
            !t.events(reason).await.is_empty()
        })
        .await;
    }
    // Exactly one BreakerOpened event (with count 1): transitions, not probes, make events.
    let opened = t.events(reasons::BREAKER_OPENED).await;
    assert_eq!(opened.len(), 1);
    assert!(
        opened[0].series.is_none(),
        "no repeated BreakerOpened series"
    );
}

/// 4. While Open, a force-reopen annotation makes the operator probe within 1s, and with the
/// database back the pool is Ready within 2s; the same token again does nothing.
#[tokio::test]
async fn force_reopen_probes_at_once_and_only_once_per_token() {
    let t = setup().await;
    let mut pg = PgServer::start().await;
    t.secret(APP_PASSWORD).await;
    let _op = RunningOperator::start(t.client.clone(), t.ns());
    let spec = pool(
        "orders",
        pg.port(),
        Some((SECRET, KEY)),
        serde_json::json!({
            "backoff": {"initialDelay": "200ms", "maxDelay": "400ms"},
            // Without early trials: only the annotation may close this breaker (with them, the
            // restarted database would be tried at once, before the annotation).
            "breaker": {"failureThreshold": 2, "openTimeout": "10m", "earlyTrial": false},
        }),
    );
    t.create_healthy(&spec).await;
    pg.stop().await;
    let open = t.wait_open("orders").await;
    pg.start().await;

    let annotate = |token: &'static str| {
        let api = t.api();
        async move {
            let patch =
                serde_json::json!({"metadata": {"annotations": {FORCE_REOPEN_ANNOTATION: token}}});
            api.patch("orders", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("annotate");
        }
    };
    let before_probe = open.last_probe.as_ref().map(|p| p.time.clone());
    let start = Instant::now();
    annotate("first").await;
    let s = t
        .wait(
            "orders",
            "Ready after force reopen",
            Duration::from_secs(2),
            is_ready,
        )
        .await;
    let elapsed = start.elapsed();
    assert!(
        elapsed < Duration::from_secs(2),
        "Ready {elapsed:?} after the annotation"
    );
    assert_ne!(s.last_probe.as_ref().map(|p| p.time.clone()), before_probe);
    assert_eq!(
        s.last_force_reopen.as_ref().map(|r| r.token.as_str()),
        Some("first")
    );
    wait_until("a ForceReopen event", Duration::from_secs(5), || async {
        t.events(reasons::FORCE_REOPEN).await.len() == 1
    })
    .await;

    // Open again, then the same token plus a spec change (so the operator surely reconciles):
    // the token is not acted on twice and the breaker stays Open.
    pg.stop().await;
    t.wait(
        "orders",
        "breaker Open again",
        Duration::from_secs(20),
        |s| breaker(s) == Some(BreakerState::Open),
    )
    .await;
    let patch = serde_json::json!({
        "metadata": {"annotations": {FORCE_REOPEN_ANNOTATION: "first"}},
        "spec": {"healthCheck": {"timeout": "900ms"}},
    });
    t.api()
        .patch("orders", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("same token and a spec change");
    let s = t
        .wait(
            "orders",
            "generation 2 observed",
            Duration::from_secs(10),
            |s| s.observed_generation == Some(2),
        )
        .await;
    assert_eq!(
        breaker(&s),
        Some(BreakerState::Open),
        "the same token did nothing: {s:?}"
    );
    assert_eq!(
        t.events(reasons::FORCE_REOPEN).await.len(),
        1,
        "one ForceReopen event for one token"
    );

    // A new token is acted on.
    pg.start().await;
    annotate("second").await;
    let s = t
        .wait(
            "orders",
            "Ready after the second token",
            Duration::from_secs(2),
            is_ready,
        )
        .await;
    assert_eq!(
        s.last_force_reopen.map(|r| r.token),
        Some("second".to_owned())
    );
}

/// 4b. A maintenance hold (annotation, not spec) holds a healthy pool's breaker open like
/// ForcedOpen, saying who and why in the BreakerOpen condition and a Held event; a release
/// closes it again with a Released event naming who released it. The spec never changes.
#[tokio::test]
async fn a_hold_annotation_holds_the_breaker_open_until_released() {
    let t = setup().await;
    let pg = PgServer::start().await;
    t.secret(APP_PASSWORD).await;
    let _op = RunningOperator::start(t.client.clone(), t.ns());
    let spec = pool(
        "orders",
        pg.port(),
        Some((SECRET, KEY)),
        serde_json::json!({
            "healthCheck": {"interval": "1s", "timeout": "800ms"},
            "breaker": {"openTimeout": "1s", "successThreshold": 1},
        }),
    );
    t.create_healthy(&spec).await;

    let patch = serde_json::json!({"metadata": {"annotations": {
        HOLD_ANNOTATION: "failover drill",
        HELD_BY_ANNOTATION: "alice@example.com",
    }}});
    let start = Instant::now();
    t.api()
        .patch("orders", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("hold");
    let s = t
        .wait("orders", "held open", Duration::from_secs(5), |s| {
            breaker(s) == Some(BreakerState::Open)
                && condition(s, CONDITION_BREAKER_OPEN).is_some_and(|c| c.1 == reason::HELD)
        })
        .await;
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(s.phase, Some(Phase::BreakerOpen));
    let (_, _, message) = condition(&s, CONDITION_BREAKER_OPEN).expect("BreakerOpen condition");
    assert_eq!(message, "held by alice@example.com: failover drill");
    wait_until("a Held event", Duration::from_secs(5), || async {
        t.events(reason::HELD).await.iter().any(|e| {
            e.note
                .as_deref()
                .is_some_and(|n| n.contains("alice@example.com") && n.contains("failover drill"))
        })
    })
    .await;

    // The database answers, yet the hold keeps the breaker open over several probe intervals:
    // wait until the server has seen a probe 2 s after the hold took effect.
    let held_since = s.breaker.as_ref().and_then(|b| b.since.clone());
    let held_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    wait_until(
        "probes 2s into the hold",
        Duration::from_secs(10),
        || async { last_probe_query(&pg).await > held_at + 2.0 },
    )
    .await;
    let still = t.status("orders").await.expect("status");
    assert_eq!(breaker(&still), Some(BreakerState::Open), "{still:?}");
    assert_eq!(still.breaker.and_then(|b| b.since), held_since);
    let pool_now = t.api().get("orders").await.expect("get");
    assert_eq!(
        pool_now.metadata.generation,
        Some(1),
        "the spec never changed"
    );

    // Release: remove the hold, record who.
    let patch = serde_json::json!({"metadata": {"annotations": {
        HOLD_ANNOTATION: null,
        HELD_BY_ANNOTATION: null,
        RELEASED_BY_ANNOTATION: "bob@example.com",
    }}});
    t.api()
        .patch("orders", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("release");
    let s = t
        .wait(
            "orders",
            "Ready after the release",
            Duration::from_secs(10),
            is_ready,
        )
        .await;
    assert_eq!(breaker(&s), Some(BreakerState::Closed));
    wait_until("a Released event", Duration::from_secs(5), || async {
        t.events(reason::RELEASED).await.iter().any(|e| {
            e.note.as_deref().is_some_and(|n| {
                n.contains("bob@example.com") && n.contains("held by alice@example.com")
            })
        })
    })
    .await;
}

/// 5. Kill the operator while the breaker is Open; a new one keeps it Open with the same
/// `since` (never resetting it to Closed), and recovery continues on the original schedule.
#[tokio::test]
async fn a_restarted_operator_resumes_an_open_breaker() {
    let t = setup().await;
    let mut pg = PgServer::start().await;
    t.secret(APP_PASSWORD).await;
    let op = RunningOperator::start(t.client.clone(), t.ns());
    let open_timeout = Duration::from_secs(3);
    let spec = pool(
        "orders",
        pg.port(),
        Some((SECRET, KEY)),
        serde_json::json!({
            "backoff": {"initialDelay": "200ms", "maxDelay": "400ms"},
            "breaker": {"failureThreshold": 2, "openTimeout": "3s"},
        }),
    );
    t.create_healthy(&spec).await;
    pg.stop().await;
    let open = t.wait_open("orders").await;
    op.kill().await;
    let since = open
        .breaker
        .as_ref()
        .and_then(|b| b.since.clone())
        .expect("since")
        .0;

    // Record every version of the status from here on.
    let api = t.api();
    let history = tokio::spawn(async move {
        let mut versions = Vec::new();
        let mut stream = watcher(
            api,
            watcher::Config::default().fields("metadata.name=orders"),
        )
        .applied_objects()
        .boxed();
        while let Ok(Some(p)) = stream.try_next().await {
            let Some(s) = p.status else { continue };
            let done = is_ready(&s);
            versions.push(s);
            if done {
                break;
            }
        }
        versions
    });

    let _op2 = RunningOperator::start(t.client.clone(), t.ns());
    // The trial probe comes when openTimeout has passed since the original `since`.
    let s = t
        .wait(
            "orders",
            "the half-open trial",
            Duration::from_secs(20),
            |s| s.consecutive_failures > open.consecutive_failures,
        )
        .await;
    let trial_at = s.last_failure_time.as_ref().expect("lastFailureTime").0;
    let waited = Duration::try_from(trial_at.duration_since(since)).expect("after since");
    assert!(
        waited >= open_timeout,
        "trial {waited:?} after since, openTimeout is {open_timeout:?}"
    );
    assert_eq!(
        breaker(&s),
        Some(BreakerState::Open),
        "a failed trial reopens: {s:?}"
    );
    assert_eq!(s.breaker.as_ref().map(|b| b.open_count), Some(2));

    pg.start().await;
    t.wait("orders", "recovered", Duration::from_secs(30), is_ready)
        .await;
    let versions = tokio::time::timeout(Duration::from_secs(10), history)
        .await
        .expect("history complete")
        .expect("watch task");
    // Until the database came back, no version ever showed the breaker Closed, and until the
    // trial every version kept the original `since`.
    let recovered_at = versions.iter().position(is_ready).expect("a Ready version");
    for v in &versions[..recovered_at] {
        assert_ne!(
            breaker(v),
            Some(BreakerState::Closed),
            "reset to Closed: {v:?}"
        );
        if v.consecutive_failures == open.consecutive_failures {
            assert_eq!(
                v.breaker
                    .as_ref()
                    .and_then(|b| b.since.as_ref())
                    .map(|t| t.0),
                Some(since)
            );
        }
    }
}

/// 6. A missing Secret is a ConfigError naming it; creating it makes the pool Healthy at once.
#[tokio::test]
async fn a_missing_secret_is_a_config_error_fixed_by_creating_it() {
    let t = setup().await;
    let pg = PgServer::start().await;
    let _op = RunningOperator::start(t.client.clone(), t.ns());
    let spec = pool(
        "orders",
        pg.port(),
        Some((SECRET, KEY)),
        // A long backoff: only the Secret trigger can make it Healthy in time.
        serde_json::json!({"backoff": {"initialDelay": "1m", "maxDelay": "5m"}}),
    );
    t.create(&spec).await;
    let s = t
        .wait("orders", "ConfigError", Duration::from_secs(20), |s| {
            s.phase == Some(Phase::ConfigError)
        })
        .await;
    let (_, reason, message) = condition(&s, CONDITION_READY).expect("Ready condition");
    assert_eq!(reason, reasons::CONFIG_ERROR);
    assert!(
        message.contains(SECRET) && message.contains(KEY),
        "{message}"
    );
    assert_eq!(
        breaker(&s),
        Some(BreakerState::Closed),
        "config errors don't open the breaker"
    );

    let start = Instant::now();
    t.secret(APP_PASSWORD).await;
    t.wait(
        "orders",
        "Healthy after the Secret",
        Duration::from_secs(10),
        is_ready,
    )
    .await;
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// 4b. A force-reopen token longer than an event note may be (1 KiB in events.k8s.io) still
/// gives a ForceReopen event, with the note cut to the limit.
#[tokio::test]
async fn a_long_force_reopen_token_still_gives_an_event() {
    let t = setup().await;
    let pg = PgServer::start().await;
    t.secret(APP_PASSWORD).await;
    let _op = RunningOperator::start(t.client.clone(), t.ns());
    t.create_healthy(&pool(
        "orders",
        pg.port(),
        Some((SECRET, KEY)),
        serde_json::json!({}),
    ))
    .await;
    let token = "t".repeat(4000);
    let patch = serde_json::json!({"metadata": {"annotations": {FORCE_REOPEN_ANNOTATION: token}}});
    t.api()
        .patch("orders", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate");
    let events = wait_for("a ForceReopen event", Duration::from_secs(10), || async {
        let events = t.events("ForceReopen").await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    let note = events[0].note.clone().unwrap_or_default();
    assert!(note.len() <= 1024, "{}", note.len());
    assert!(note.starts_with("force-reopen \"ttt"), "{note}");
    assert!(note.ends_with('…'), "{note}");
}

/// 6c. A server that asks for the password in clear text (MD5, SCRAM with 1 iteration) gets
/// nothing: the pool shows ConfigError naming the method, and the fake server never receives a
/// password message.
#[tokio::test]
async fn an_unsafe_login_method_is_a_config_error_and_gets_no_password() {
    let t = setup().await;
    t.secret(APP_PASSWORD).await;
    let _op = RunningOperator::start(t.client.clone(), t.ns());
    let servers = [
        ("cleartext", Behaviour::Cleartext, "clear text"),
        ("md5", Behaviour::Md5, "MD5"),
        (
            "scram",
            Behaviour::Scram { iterations: 1 },
            "only 1 iterations",
        ),
    ];
    let mut running = Vec::new();
    for (name, behaviour, _) in servers {
        let server = FakeServer::start(behaviour).await;
        t.create(&pool(
            name,
            server.port(),
            Some((SECRET, KEY)),
            serde_json::json!({}),
        ))
        .await;
        running.push(server);
    }
    for ((name, _, method), server) in servers.iter().zip(&running) {
        let s = t
            .wait(name, "ConfigError", Duration::from_secs(20), |s| {
                s.phase == Some(Phase::ConfigError)
            })
            .await;
        let message = s
            .last_probe
            .as_ref()
            .and_then(|p| p.message.clone())
            .unwrap_or_default();
        assert!(message.contains(method), "{name}: {message}");
        assert_eq!(breaker(&s), Some(BreakerState::Closed), "{name}");
        let received = server.received_after(1).await;
        // SCRAM: initial responses (mechanism and nonce) only, never a proof; the others: no
        // password message at all. (The pool retries, so there may be several sessions.)
        let answers: Vec<_> = received.iter().filter(|m| m.tag == b'p').collect();
        if *name == "scram" {
            assert!(
                answers
                    .iter()
                    .all(|m| !m.body.windows(3).any(|w| w == b",p=")),
                "{received:?}"
            );
        } else {
            assert!(answers.is_empty(), "{name}: {received:?}");
        }
        for m in &received {
            assert!(
                !m.body
                    .windows(APP_PASSWORD.len())
                    .any(|w| w == APP_PASSWORD.as_bytes()),
                "{name}"
            );
        }
    }
}

/// 6b. A Secret without consent (no label, or an allowed-hosts list without the pool's host) is
/// never used: the pool reads exactly as for a missing Secret, and consenting (label plus host)
/// makes it Healthy at once, through the label-selected watch.
#[tokio::test]
async fn a_secret_without_consent_reads_as_a_missing_one() {
    let t = setup().await;
    let pg = PgServer::start().await;
    let _op = RunningOperator::start(t.client.clone(), t.ns());
    create_secret_without_consent(&t.client, t.ns(), "plain", KEY, APP_PASSWORD).await;
    create_consenting_secret(
        &t.client,
        t.ns(),
        "other-host",
        KEY,
        APP_PASSWORD,
        &["db.elsewhere.svc"],
    )
    .await;
    let slow = serde_json::json!({"backoff": {"initialDelay": "1m", "maxDelay": "5m"}});
    for (name, secret) in [
        ("missing", "absent"),
        ("plain", "plain"),
        ("other", "other-host"),
    ] {
        t.create(&pool(name, pg.port(), Some((secret, KEY)), slow.clone()))
            .await;
    }
    let mut messages = Vec::new();
    for (name, secret) in [
        ("missing", "absent"),
        ("plain", "plain"),
        ("other", "other-host"),
    ] {
        let s = t
            .wait(name, "ConfigError", Duration::from_secs(20), |s| {
                s.phase == Some(Phase::ConfigError)
            })
            .await;
        let message = s
            .last_probe
            .as_ref()
            .and_then(|p| p.message.clone())
            .unwrap_or_default();
        assert!(
            message.contains("not found, or not opted in for host \"127.0.0.1\"")
                && message.contains("dbpool.io/credentials=true")
                && message.contains("dbpool.io/allowed-hosts"),
            "{message}"
        );
        messages.push(message.replace(secret, "<secret>"));
    }
    assert!(
        messages.windows(2).all(|w| w[0] == w[1]),
        "missing and non-consenting Secrets must read the same: {messages:?}"
    );

    let start = Instant::now();
    for args in [
        ["label", "secret", "plain", "dbpool.io/credentials=true"],
        [
            "annotate",
            "secret",
            "plain",
            "dbpool.io/allowed-hosts=127.0.0.1",
        ],
    ] {
        let out = kubectl(["-n", t.ns()].into_iter().chain(args)).await;
        assert!(out.status.success(), "{out:?}");
    }
    t.wait(
        "plain",
        "Healthy after consent",
        Duration::from_secs(10),
        is_ready,
    )
    .await;
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// 7. A wrong password is a ConfigError (28P01) that never opens the breaker; fixing the Secret
/// makes the pool Healthy. The password never shows in status or events.
#[tokio::test]
async fn a_wrong_password_is_a_config_error_that_does_not_open_the_breaker() {
    let t = setup().await;
    let pg = PgServer::start().await;
    let wrong = "not-the-password-7f3a";
    t.secret(wrong).await;
    let _op = RunningOperator::start(t.client.clone(), t.ns());
    let spec = pool(
        "orders",
        pg.port(),
        Some((SECRET, KEY)),
        serde_json::json!({"backoff": {"initialDelay": "100ms", "maxDelay": "200ms"}, "breaker": {"failureThreshold": 2}}),
    );
    t.create(&spec).await;
    let s = t
        .wait(
            "orders",
            "4 config failures",
            Duration::from_secs(20),
            |s| s.phase == Some(Phase::ConfigError) && s.consecutive_failures >= 4,
        )
        .await;
    assert_eq!(
        s.last_probe.as_ref().and_then(|p| p.sql_state.as_deref()),
        Some("28P01")
    );
    assert_eq!(
        breaker(&s),
        Some(BreakerState::Closed),
        "a wrong password is not an outage"
    );
    let text = serde_json::to_string(&s).expect("json");
    assert!(!text.contains(wrong), "password leaked into status");
    let events = t.events(reasons::CONFIG_ERROR).await;
    assert_eq!(
        events.len(),
        1,
        "one event for the transition, not one per probe"
    );
    assert!(
        !serde_json::to_string(&events)
            .expect("json")
            .contains(wrong)
    );

    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(t.client.clone(), t.ns());
    let patch = serde_json::json!({"stringData": {KEY: APP_PASSWORD}});
    secrets
        .patch(SECRET, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("fix the Secret");
    t.wait(
        "orders",
        "Healthy after the fix",
        Duration::from_secs(10),
        is_ready,
    )
    .await;
}

/// 8. In a healthy steady state, 10 probe intervals cause no status write (the rule: write on a
/// visible change, refresh lastProbe at most every 5 minutes), while probes go on.
#[tokio::test]
async fn steady_state_does_not_write_status_per_probe() {
    let t = setup().await;
    let pg = PgServer::start().await;
    t.secret(APP_PASSWORD).await;
    let op = RunningOperator::start(t.client.clone(), t.ns());
    let interval = Duration::from_millis(300);
    let spec = pool(
        "steady",
        pg.port(),
        Some((SECRET, KEY)),
        serde_json::json!({"healthCheck": {"interval": "300ms", "timeout": "200ms"}}),
    );
    t.create_healthy(&spec).await;
    wait_for("the breaker label", Duration::from_secs(5), || async {
        t.api()
            .get("steady")
            .await
            .ok()
            .filter(|p| p.labels().contains_key(BREAKER_LABEL))
    })
    .await;
    let window_start = last_probe_query(&pg).await;

    let writes = count_writes(t.api(), "steady", interval * 10).await;
    assert_eq!(writes, 0, "no status writes in 10 healthy intervals");
    let last_query = last_probe_query(&pg).await;
    assert!(
        last_query >= window_start + 5.0 * interval.as_secs_f64(),
        "the operator kept probing during the window (last probe query {last_query}, window from {window_start})"
    );
    let s = t.status("steady").await.expect("status");
    assert!(is_ready(&s));

    // A restart alone does not rewrite a healthy status either: the new operator resumes probing
    // from the stored state, and the 5-minute refresh is counted from the stored lastProbe.
    op.kill().await;
    let _op2 = RunningOperator::start(t.client.clone(), t.ns());
    let window_start = last_probe_query(&pg).await;
    let writes = count_writes(t.api(), "steady", interval * 10).await;
    assert_eq!(
        writes, 0,
        "no status writes in 10 intervals after a restart"
    );
    let last_query = last_probe_query(&pg).await;
    assert!(
        last_query >= window_start + 3.0 * interval.as_secs_f64(),
        "the new operator probes (last probe query {last_query}, window from {window_start})"
    );
}

/// Every write the apiserver makes visible for pool `name` during `window` (status, labels).
async fn count_writes(api: Api<DbPool>, name: &str, window: Duration) -> usize {
    let window_end = tokio::time::Instant::now() + window;
    let mut writes = 0usize;
    let mut initial_list = true;
    let mut stream = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .touched_objects()
    .boxed();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(window_end) => return writes,
            item = stream.next() => match item {
                Some(Ok(_)) if initial_list => initial_list = false,
                Some(Ok(_)) => writes += 1,
                _ => return writes,
            }
        }
    }
}

/// 9. 50 pools, half pointing at a stopped server: the healthy half stays Healthy and keeps
/// being probed on schedule while the other half fails.
#[tokio::test]
async fn fifty_pools_half_failing_do_not_disturb_the_healthy_half() {
    let t = setup().await;
    let good = PgServer::start().await;
    let mut bad = PgServer::start().await;
    bad.stop().await;
    t.secret(APP_PASSWORD).await;
    // Refresh lastProbe every second so the test can see each pool's probes advance.
    let _op = RunningOperator::start_with(
        t.client.clone(),
        dbpool_operator::controller::OperatorConfig {
            namespace: Some(t.ns().to_owned()),
            status_refresh: Duration::from_secs(1),
            ..Default::default()
        },
    );
    let healthy = |i: usize| i.is_multiple_of(2);
    for i in 0..50 {
        let port = if healthy(i) { good.port() } else { bad.port() };
        let spec = pool(
            &format!("pool-{i}"),
            port,
            Some((SECRET, KEY)),
            serde_json::json!({"healthCheck": {"interval": "1s", "timeout": "500ms"}}),
        );
        t.create(&spec).await;
    }
    let api = t.api();
    let index = |p: &DbPool| {
        p.name_any()
            .trim_start_matches("pool-")
            .parse::<usize>()
            .unwrap_or(usize::MAX)
    };
    let settled = |items: &[DbPool]| {
        items.len() == 50
            && items.iter().all(|p| {
                let s = p.status.as_ref();
                if healthy(index(p)) {
                    s.is_some_and(is_ready)
                } else {
                    s.is_some_and(|s| breaker(s) == Some(BreakerState::Open))
                }
            })
    };
    wait_until(
        "half Healthy, half Open",
        Duration::from_secs(60),
        || async {
            api.list(&ListParams::default())
                .await
                .is_ok_and(|l| settled(&l.items))
        },
    )
    .await;
    // On schedule: every healthy pool's lastProbe moves past a mark taken now, within a few
    // intervals, and the pools stay Healthy throughout.
    let mark = k8s_openapi::jiff::Timestamp::now();
    wait_until(
        "every healthy pool probed again",
        Duration::from_secs(10),
        || async {
            let Ok(list) = api.list(&ListParams::default()).await else {
                return false;
            };
            assert!(settled(&list.items), "a pool left its state");
            list.items.iter().filter(|p| healthy(index(p))).all(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.last_probe.as_ref())
                    .is_some_and(|lp| lp.time.0 > mark)
            })
        },
    )
    .await;
}

/// 10. With a 30s interval, an immediate stop of PostgreSQL is noticed through the probe
/// connection dying, within 1s, not at the next interval.
#[tokio::test]
async fn a_dying_connection_is_noticed_within_a_second() {
    let t = setup().await;
    let mut pg = PgServer::start().await;
    t.secret(APP_PASSWORD).await;
    let _op = RunningOperator::start(t.client.clone(), t.ns());
    let spec = pool(
        "orders",
        pg.port(),
        Some((SECRET, KEY)),
        serde_json::json!({"healthCheck": {"interval": "30s", "timeout": "2s"}}),
    );
    t.create_healthy(&spec).await;
    let start = Instant::now();
    pg.stop_immediate().await;
    let s = t
        .wait("orders", "the first failure", Duration::from_secs(5), |s| {
            s.consecutive_failures >= 1
        })
        .await;
    let elapsed = start.elapsed();
    assert!(
        elapsed < Duration::from_secs(1),
        "first failure recorded after {elapsed:?}"
    );
    assert_eq!(
        s.last_probe.map(|p| p.outcome),
        Some(ProbeOutcome::TransientFailure)
    );
}

/// Spec changes take effect at once: shortening a 1h interval to 300ms reschedules immediately.
#[tokio::test]
async fn a_shorter_interval_reschedules_at_once() {
    let t = setup().await;
    let pg = PgServer::start().await;
    t.secret(APP_PASSWORD).await;
    let _op = RunningOperator::start(t.client.clone(), t.ns());
    let spec = pool(
        "orders",
        pg.port(),
        Some((SECRET, KEY)),
        serde_json::json!({"healthCheck": {"interval": "1h", "timeout": "1s"}}),
    );
    t.create_healthy(&spec).await;
    let first = last_probe_query(&pg).await;

    let patch =
        serde_json::json!({"spec": {"healthCheck": {"interval": "300ms", "timeout": "200ms"}}});
    t.api()
        .patch("orders", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("shorten the interval");
    t.wait(
        "orders",
        "generation 2 observed",
        Duration::from_secs(10),
        |s| s.observed_generation == Some(2),
    )
    .await;
    // Probes now come every 300ms: the probe backend's last query keeps moving.
    wait_until(
        "probes on the new interval",
        Duration::from_secs(10),
        || async { last_probe_query(&pg).await >= first + 1.5 },
    )
    .await;
}

/// Deleting a DbPool stops its probes and closes its probe connection.
#[tokio::test]
async fn deleting_a_pool_stops_probing_and_frees_its_connection() {
    let t = setup().await;
    let pg = PgServer::start().await;
    t.secret(APP_PASSWORD).await;
    let _op = RunningOperator::start(t.client.clone(), t.ns());
    let spec = pool(
        "orders",
        pg.port(),
        Some((SECRET, KEY)),
        serde_json::json!({"healthCheck": {"interval": "300ms", "timeout": "200ms"}}),
    );
    t.create_healthy(&spec).await;
    let backends = || async {
        pg.query_text("SELECT count(*)::text FROM pg_stat_activity WHERE application_name = 'dbpool-operator'")
            .await
            .and_then(|t| t.parse::<i64>().ok())
            .unwrap_or(-1)
    };
    assert_eq!(backends().await, 1, "one persistent probe connection");
    t.api()
        .delete("orders", &Default::default())
        .await
        .expect("delete");
    wait_until(
        "the probe connection closed",
        Duration::from_secs(10),
        || async { backends().await == 0 },
    )
    .await;
}
