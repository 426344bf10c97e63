//! Failover without split brain, proved with processes, signals and the fault proxy against the
//! real apiserver and PostgreSQL: a frozen and thawed leader writes nothing, a rolling handover
//! never has two leaders, a leader cut off from the apiserver steps down, leadership flips leave
//! nothing behind, and deleted pools leave no entry, series or session.

use dbpool_testkit as support;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use dbpool_operator::{
    api::{BREAKER_LABEL, BreakerState, DbPool, DbPoolStatus, Phase},
    controller::{Footprint, Observer, OperatorConfig, RunningOperator},
};
use futures::StreamExt;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use support::{
    kube::{TestNamespace, kubeconfig_path, namespace_with_secret, unique_name},
    pools::{create, pool, wait_status},
    postgres::{APP_PASSWORD, PgServer},
    process::{OperatorProcess, sample},
    proxy::{FaultProxy, Mode},
    wait::{wait_for, wait_until},
};

const BINARY: &str = env!("CARGO_BIN_EXE_dbpool-operator");
const SECRET: &str = "db-credentials";
const KEY: &str = "password";
const LEASE_DURATION: Duration = Duration::from_secs(3);

async fn setup() -> (Client, TestNamespace) {
    namespace_with_secret(SECRET, KEY, APP_PASSWORD).await
}

/// Leader-election flags with a lease of this test's own (3s, renewed 1s before expiry).
fn lease_flags(ns: &str, lease: &str) -> Vec<String> {
    [
        "--leader-elect",
        "--lease-namespace",
        ns,
        "--lease-name",
        lease,
        "--lease-duration",
        "3s",
        "--lease-renew-grace",
        "1s",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn start(ns: &str, name: &str, flags: &[String]) -> OperatorProcess {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    OperatorProcess::start(BINARY, ns, name, &flags)
}

async fn is_leader(p: &OperatorProcess) -> bool {
    sample(&p.metrics().await, "dbpool_leader", &[]) == Some(1.0)
}

async fn is_standby(p: &OperatorProcess) -> bool {
    p.get("/readyz")
        .await
        .is_some_and(|(code, body)| code == 200 && body.trim() == "ready: standby")
        && sample(&p.metrics().await, "dbpool_leader", &[]) == Some(0.0)
}

/// The index of the one process that leads (waits for exactly one).
async fn the_leader(procs: &[&OperatorProcess]) -> usize {
    wait_for("exactly one leader", Duration::from_secs(20), || async {
        let mut leaders = Vec::new();
        for (i, p) in procs.iter().enumerate() {
            if is_leader(p).await {
                leaders.push(i);
            }
        }
        (leaders.len() == 1).then(|| leaders[0])
    })
    .await
}

fn breaker(s: &DbPoolStatus) -> Option<BreakerState> {
    s.breaker.as_ref().map(|b| b.state)
}

/// Every version of pool `name` a watch sees, in order: (writerEpoch, breaker, since, label).
type Seen = Arc<
    Mutex<
        Vec<(
            Option<i64>,
            Option<BreakerState>,
            Option<String>,
            Option<String>,
        )>,
    >,
>;

fn record(api: Api<DbPool>, name: &str) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let sink = seen.clone();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let task = tokio::spawn(async move {
        let mut stream = watcher(api, config).applied_objects().boxed();
        while let Some(Ok(pool)) = stream.next().await {
            let label = pool.labels().get(BREAKER_LABEL).cloned();
            let status = pool.status.unwrap_or_default();
            let since = status
                .breaker
                .as_ref()
                .and_then(|b| b.since.as_ref())
                .map(|t| t.0.to_string());
            let entry = (status.writer_epoch, breaker(&status), since, label);
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
        }
    });
    (seen, task)
}

/// (name, series count) of every event `instance` reported in `ns`.
async fn events_by(client: &Client, ns: &str, instance: &str) -> BTreeMap<String, i32> {
    let api: Api<K8sEvent> = Api::namespaced(client.clone(), ns);
    let list = api.list(&ListParams::default()).await.expect("events");
    list.items
        .into_iter()
        .filter(|e| e.reporting_instance.as_deref() == Some(instance))
        .map(|e| {
            let count = e.series.as_ref().map(|s| s.count).unwrap_or(1);
            (e.name_any(), count)
        })
        .collect()
}

/// SIGSTOP the leader until the standby has taken over and opened the breaker in an outage;
/// SIGCONT it. A watch never sees the breaker regress after the new leader's first write, and the
/// thawed process writes no status, label or event and exports no pool series.
#[tokio::test]
async fn a_thawed_leader_writes_nothing() {
    let (client, ns) = setup().await;
    let mut pg = PgServer::start().await;
    let flags = lease_flags(ns.name(), &unique_name("lease"));
    let a = start(ns.name(), "thaw-a", &flags);
    let b = start(ns.name(), "thaw-b", &flags);
    let spec = pool(
        "orders",
        pg.port(),
        Some((SECRET, KEY)),
        serde_json::json!({"breaker": {"failureThreshold": 2, "openTimeout": "1s"}}),
    );
    create(&client, ns.name(), &spec).await;
    // A pool whose Secret is missing fails on the credentials path at every backoff step: the
    // thawed ex-leader's in-flight reconciles of it must not re-create its series either.
    let no_secret = pool(
        "nosecret",
        pg.port(),
        Some(("missing-secret", KEY)),
        serde_json::json!({}),
    );
    create(&client, ns.name(), &no_secret).await;
    wait_phases(
        &client,
        ns.name(),
        &[("orders", Phase::Healthy), ("nosecret", Phase::ConfigError)],
    )
    .await;
    let procs = [&a, &b];
    let old = the_leader(&procs).await;
    let new = 1 - old;
    let old_epoch = wait_status(
        &client,
        ns.name(),
        "orders",
        "an epoch",
        Duration::from_secs(10),
        |s| s.writer_epoch.is_some(),
    )
    .await
    .writer_epoch;

    procs[old].signal("STOP");
    wait_until("the standby leads", Duration::from_secs(15), || {
        is_leader(procs[new])
    })
    .await;
    let api: Api<DbPool> = Api::namespaced(client.clone(), ns.name());
    let (seen, watch_task) = record(api, "orders");
    pg.stop().await;
    let opened = wait_status(
        &client,
        ns.name(),
        "orders",
        "Open, written by the new leader",
        Duration::from_secs(30),
        |s| breaker(s) == Some(BreakerState::Open) && s.writer_epoch > old_epoch,
    )
    .await;
    let new_epoch = opened.writer_epoch;
    let old_events = events_by(&client, ns.name(), &procs[old].name).await;

    procs[old].signal("CONT");
    wait_until(
        "the thawed process stands by",
        Duration::from_secs(10),
        || is_standby(procs[old]),
    )
    .await;
    // Let both run through several probes of the open breaker (openTimeout 1s).
    let later = opened.consecutive_failures + 3;
    wait_status(
        &client,
        ns.name(),
        "orders",
        "three more probes",
        Duration::from_secs(30),
        |s| s.consecutive_failures >= later,
    )
    .await;
    watch_task.abort();

    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let first_new = seen
        .iter()
        .position(|(epoch, ..)| *epoch == new_epoch)
        .expect("the new leader's first write");
    // After the new leader's first write no status from an older term lands, and once the
    // breaker is Open (the database stays down) neither it nor its label goes back to closed.
    let mut open_seen = false;
    let mut open_label_seen = false;
    for (epoch, state, _since, label) in &seen[first_new..] {
        assert!(*epoch >= new_epoch, "a stale write landed: {seen:?}");
        open_seen |= *state == Some(BreakerState::Open);
        open_label_seen |= label.as_deref() == Some("open");
        assert!(
            !(open_seen && *state == Some(BreakerState::Closed)),
            "breaker regressed: {seen:?}"
        );
        assert!(
            !(open_label_seen && label.as_deref() == Some("closed")),
            "label regressed: {seen:?}"
        );
    }
    assert!(open_seen, "{seen:?}");
    let metrics = procs[old].metrics().await;
    assert!(
        !metrics.contains("dbpool_circuit_breaker_state{"),
        "the ex-leader exports pool series:\n{metrics}"
    );
    for name in ["orders", "nosecret"] {
        assert!(
            !metrics.contains(&format!("name=\"{name}\"")),
            "the ex-leader exports a series of {name}:\n{metrics}"
        );
    }
    assert_eq!(
        events_by(&client, ns.name(), &procs[old].name).await,
        old_events,
        "the thawed process published events"
    );
}

/// One term of one process, on the host's monotonic clock.
#[derive(Debug)]
struct Term {
    identity: String,
    start: u64,
    end: Option<u64>,
}

/// The terms a process logged ("leadership: term started/ended" with mono_ns).
fn terms(log: &str) -> Vec<Term> {
    let mut out: Vec<Term> = Vec::new();
    for line in log.lines() {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let fields = &value["fields"];
        let (Some(message), Some(mono), Some(identity)) = (
            fields["message"].as_str(),
            fields["mono_ns"].as_u64(),
            fields["identity"].as_str(),
        ) else {
            continue;
        };
        match message {
            "leadership: term started" => out.push(Term {
                identity: identity.to_owned(),
                start: mono,
                end: None,
            }),
            "leadership: term ended" => {
                if let Some(open) = out.iter_mut().rev().find(|t| t.end.is_none()) {
                    open.end = Some(mono);
                }
            }
            _ => {}
        }
    }
    out
}

/// Three replicas; SIGTERM the current leader ten times in a row (starting a replacement each
/// time). The terms every process logged never overlap.
#[tokio::test]
async fn a_rolling_handover_never_has_two_leaders() {
    let (_client, ns) = setup().await;
    let flags = lease_flags(ns.name(), &unique_name("lease"));
    let mut running: Vec<OperatorProcess> = (0..3)
        .map(|i| start(ns.name(), &format!("roll-{i}"), &flags))
        .collect();
    let mut logs = Vec::new();
    for round in 0..10 {
        let procs: Vec<&OperatorProcess> = running.iter().collect();
        let leader = the_leader(&procs).await;
        let mut stopped = running.remove(leader);
        stopped.signal("TERM");
        let exit = tokio::time::timeout(
            Duration::from_secs(15),
            wait_for("the leader to exit", Duration::from_secs(15), || {
                let exited = stopped.child.try_wait().ok().flatten();
                async move { exited }
            }),
        )
        .await;
        assert!(
            exit.is_ok(),
            "round {round}: no exit after SIGTERM; log:\n{}",
            stopped.log()
        );
        logs.push(stopped.log());
        running.push(start(ns.name(), &format!("roll-{}", round + 3), &flags));
    }
    let procs: Vec<&OperatorProcess> = running.iter().collect();
    the_leader(&procs).await;
    logs.extend(running.iter().map(OperatorProcess::log));

    let mut all: Vec<Term> = logs.iter().flat_map(|l| terms(l)).collect();
    all.sort_by_key(|t| t.start);
    assert!(all.len() >= 11, "expected 11 terms or more: {all:?}");
    for pair in all.windows(2) {
        let end = pair[0].end.expect("only the last term is still open");
        assert!(
            end <= pair[1].start,
            "terms of {} and {} overlap by {} µs: {:?} and {:?}",
            pair[0].identity,
            pair[1].identity,
            (end - pair[1].start) / 1000,
            pair[0],
            pair[1]
        );
    }
    let gaps: Vec<u64> = all
        .windows(2)
        .filter_map(|p| Some((p[1].start - p[0].end?) / 1_000_000))
        .collect();
    println!("handover gaps (ms): {gaps:?}");
}

/// The test apiserver's address, from the test kubeconfig.
fn apiserver_addr() -> std::net::SocketAddr {
    let config = kube::config::Kubeconfig::read_from(kubeconfig_path()).expect("test kubeconfig");
    let server = config.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.server.clone())
        .expect("server");
    server
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .parse()
        .expect("host:port")
}

/// A kubeconfig like the test one whose server is `server` (e.g. a fault proxy).
fn kubeconfig_via(server: &str, dir: &std::path::Path) -> PathBuf {
    let mut config =
        kube::config::Kubeconfig::read_from(kubeconfig_path()).expect("test kubeconfig");
    for cluster in &mut config.clusters {
        if let Some(c) = cluster.cluster.as_mut() {
            c.server = Some(server.to_owned());
        }
    }
    let path = dir.join("kubeconfig-proxied.json");
    std::fs::write(&path, serde_json::to_vec(&config).expect("serialize")).expect("write");
    path
}

/// The leader's apiserver connection goes through the fault proxy, which then stalls (accepts
/// and answers nothing; live connections stop moving). Within the lease duration the leader
/// stops writing and reports standby; the other replica takes over.
#[tokio::test]
async fn a_leader_cut_off_from_the_apiserver_steps_down() {
    let (_client, ns) = setup().await;
    let upstream = apiserver_addr();
    let proxy = FaultProxy::start(upstream).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let proxied = kubeconfig_via(&format!("https://127.0.0.1:{}", proxy.port()), dir.path());
    let flags = lease_flags(ns.name(), &unique_name("lease"));
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let a =
        OperatorProcess::start_with_kubeconfig(BINARY, &proxied, ns.name(), "cut-a", &flag_refs);
    wait_until("a leads", Duration::from_secs(20), || is_leader(&a)).await;
    let b = start(ns.name(), "cut-b", &flags);
    wait_until("b stands by", Duration::from_secs(20), || is_standby(&b)).await;

    proxy.set_mode(Mode::BlackHole).await;
    let cut = Instant::now();
    wait_until("a stands by", Duration::from_secs(10), || is_standby(&a)).await;
    let stepped_down = cut.elapsed();
    wait_until("b leads", Duration::from_secs(15), || is_leader(&b)).await;
    let taken_over = cut.elapsed();
    println!("cut-off leader stood by after {stepped_down:?}; standby led after {taken_over:?}");
    assert!(
        stepped_down <= LEASE_DURATION + Duration::from_millis(500),
        "stood by only after {stepped_down:?}"
    );
}

/// Ten leadership flips (SIGSTOP the leader until the other takes over, then SIGCONT): the
/// ex-leader ends with no controller context and no PostgreSQL session.
#[tokio::test]
async fn leadership_flips_leave_nothing_behind() {
    let (client, ns) = setup().await;
    let pg = PgServer::start().await;
    let app = unique_name("flips");
    let flags = lease_flags(ns.name(), &unique_name("lease"));
    let a = start(ns.name(), "flip-a", &flags);
    let b = start(ns.name(), "flip-b", &flags);
    let spec = pool(
        "orders",
        pg.port(),
        Some((SECRET, KEY)),
        serde_json::json!({"database": {"applicationName": app}}),
    );
    create(&client, ns.name(), &spec).await;
    wait_status(
        &client,
        ns.name(),
        "orders",
        "Healthy",
        Duration::from_secs(30),
        |s| s.phase == Some(Phase::Healthy),
    )
    .await;
    let procs = [&a, &b];
    let rss_before = [a.rss_kib(), b.rss_kib()];
    for _ in 0..10 {
        let leader = the_leader(&procs).await;
        procs[leader].signal("STOP");
        wait_until("the other leads", Duration::from_secs(15), || {
            is_leader(procs[1 - leader])
        })
        .await;
        procs[leader].signal("CONT");
        wait_until("the thawed one stands by", Duration::from_secs(10), || {
            is_standby(procs[leader])
        })
        .await;
    }
    let leader = the_leader(&procs).await;
    let ex = procs[1 - leader];
    let sessions =
        format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'");
    wait_until(
        "the ex-leader holds no context and only the leader a session",
        Duration::from_secs(20),
        || async {
            let contexts = sample(&ex.metrics().await, "dbpool_controller_contexts", &[]);
            contexts == Some(0.0) && pg.query_text(&sessions).await.as_deref() == Some("1")
        },
    )
    .await;
    let leader_contexts = sample(
        &procs[leader].metrics().await,
        "dbpool_controller_contexts",
        &[],
    );
    assert_eq!(leader_contexts, Some(1.0));
    println!(
        "RSS KiB before/after 10 flips: a {:?} -> {:?}, b {:?} -> {:?}",
        rss_before[0],
        a.rss_kib(),
        rss_before[1],
        b.rss_kib()
    );
}

/// Operator process settings for the in-process tests below.
fn in_process(ns: &str, max_concurrent_probes: usize) -> OperatorConfig {
    OperatorConfig {
        namespace: Some(ns.to_owned()),
        instance: format!("test-{ns}"),
        max_concurrent_probes,
        ..OperatorConfig::default()
    }
}

fn has_series(op: &RunningOperator, pool: &str) -> bool {
    op.metrics.encode().contains(&format!("name=\"{pool}\""))
}

/// A pool deleted while it waits for a probe slot, and one deleted while its probe runs, leave
/// no metric series and no PostgreSQL session.
#[tokio::test]
async fn deleted_pools_leave_nothing_behind() {
    let (client, ns) = setup().await;
    let pg = PgServer::start().await;
    let hole = FaultProxy::start(pg.addr()).await;
    hole.set_mode(Mode::BlackHole).await;
    let slow = FaultProxy::start(pg.addr()).await;
    let op = RunningOperator::start_with(client.clone(), in_process(ns.name(), 1));
    let api: Api<DbPool> = Api::namespaced(client.clone(), ns.name());

    // One slot, held by a probe into a black hole; "queued" waits behind it and is deleted.
    let hang = pool(
        "hang",
        hole.port(),
        Some((SECRET, KEY)),
        serde_json::json!({"healthCheck": {"interval": "10s", "timeout": "4s"}}),
    );
    create(&client, ns.name(), &hang).await;
    wait_until(
        "the hanging probe holds the slot",
        Duration::from_secs(10),
        || async { hole.live_connections() >= 1 },
    )
    .await;
    let queued_app = unique_name("queued");
    let queued = pool(
        "queued",
        pg.port(),
        Some((SECRET, KEY)),
        serde_json::json!({"database": {"applicationName": queued_app}}),
    );
    create(&client, ns.name(), &queued).await;
    api.delete("queued", &DeleteParams::default())
        .await
        .expect("delete");
    wait_status(
        &client,
        ns.name(),
        "hang",
        "the slot freed",
        Duration::from_secs(15),
        |s| s.consecutive_failures >= 1,
    )
    .await;

    // "slow" probes through a proxy that delays every chunk: deleted while its probe runs.
    slow.set_mode(Mode::Delay(Duration::from_millis(300))).await;
    let slow_app = unique_name("slow");
    let slow_pool = pool(
        "slow",
        slow.port(),
        Some((SECRET, KEY)),
        serde_json::json!({"database": {"applicationName": slow_app}, "healthCheck": {"interval": "10s", "timeout": "8s"}}),
    );
    let hang_api = api.clone();
    hang_api
        .delete("hang", &DeleteParams::default())
        .await
        .expect("delete hang");
    create(&client, ns.name(), &slow_pool).await;
    wait_until("the slow probe runs", Duration::from_secs(10), || async {
        slow.live_connections() >= 1
    })
    .await;
    api.delete("slow", &DeleteParams::default())
        .await
        .expect("delete slow");

    let sessions = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name IN ('{queued_app}', '{slow_app}')"
    );
    wait_until(
        "no session and no series is left",
        Duration::from_secs(20),
        || async {
            pg.query_text(&sessions).await.as_deref() == Some("0")
                && !has_series(&op, "queued")
                && !has_series(&op, "slow")
                && !has_series(&op, "hang")
                && slow.live_connections() == 0
        },
    )
    .await;
}

/// Waits (30 s each) until every named pool shows its phase.
async fn wait_phases(client: &Client, ns: &str, phases: &[(&str, Phase)]) {
    for (name, phase) in phases {
        wait_status(
            client,
            ns,
            name,
            "its phase",
            Duration::from_secs(30),
            |s| s.phase == Some(*phase),
        )
        .await;
    }
}

/// Keeps the footprint of the controller it is told about.
#[derive(Default)]
struct FootprintWatch(Mutex<Option<Weak<dyn Footprint>>>);

impl Observer for FootprintWatch {
    fn controller_started(&self, footprint: Weak<dyn Footprint>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(footprint);
    }
}

impl FootprintWatch {
    /// (part, pools it knows) of the running controller; None before it started.
    fn now(&self) -> Option<Vec<(&'static str, usize)>> {
        let weak = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        Some(weak.upgrade()?.pools_known())
    }
}

/// Pools that touch every part that keeps something per pool (two healthy pools sharing a probe
/// stream and the prober's connection, one on a refused port that the targets coalesce, one
/// whose Secret is missing; all fed to the fleet guard, all with writers and series), then
/// deleted: the registry, every part and every per-pool metric series end empty.
#[tokio::test]
async fn deleted_pools_leave_the_registry_and_every_part_empty() {
    let (client, ns) = setup().await;
    let pg = PgServer::start().await;
    let refused = FaultProxy::start(pg.addr()).await;
    refused.set_mode(Mode::Refuse).await;
    let watch = Arc::new(FootprintWatch::default());
    let op =
        RunningOperator::start_observed(client.clone(), in_process(ns.name(), 8), watch.clone());
    let pools = [
        pool("a", pg.port(), Some((SECRET, KEY)), serde_json::json!({})),
        pool("b", pg.port(), Some((SECRET, KEY)), serde_json::json!({})),
        pool(
            "down",
            refused.port(),
            Some((SECRET, KEY)),
            serde_json::json!({}),
        ),
        pool(
            "nosecret",
            pg.port(),
            Some(("missing-secret", KEY)),
            serde_json::json!({}),
        ),
    ];
    for p in &pools {
        create(&client, ns.name(), p).await;
    }
    wait_phases(
        &client,
        ns.name(),
        &[
            ("a", Phase::Healthy),
            ("b", Phase::Healthy),
            ("down", Phase::BreakerOpen),
            ("nosecret", Phase::ConfigError),
        ],
    )
    .await;
    let before = watch.now().expect("the controller runs");
    println!("per-pool entries with 4 pools: {before:?}");
    for (part, pools) in &before {
        assert!(*pools >= 1, "{part} knows no pool: {before:?}");
    }
    let api: Api<DbPool> = Api::namespaced(client.clone(), ns.name());
    for p in &pools {
        api.delete(&p.name_any(), &DeleteParams::default())
            .await
            .expect("delete");
    }
    wait_until(
        "every part and every series is empty",
        Duration::from_secs(20),
        || async {
            let empty = watch
                .now()
                .is_some_and(|parts| parts.iter().all(|(_, n)| *n == 0));
            empty && pools.iter().all(|p| !has_series(&op, &p.name_any()))
        },
    )
    .await;
}

/// A `dbpool.io/breaker` label changed by hand is put back within about one interval.
#[tokio::test]
async fn a_label_changed_by_hand_is_put_back() {
    let (client, ns) = setup().await;
    let pg = PgServer::start().await;
    let _op = RunningOperator::start_with(client.clone(), in_process(ns.name(), 8));
    let spec = pool(
        "orders",
        pg.port(),
        Some((SECRET, KEY)),
        serde_json::json!({}),
    );
    create(&client, ns.name(), &spec).await;
    let api: Api<DbPool> = Api::namespaced(client.clone(), ns.name());
    let label = |p: &DbPool| p.labels().get(BREAKER_LABEL).cloned();
    wait_until("labelled closed", Duration::from_secs(20), || async {
        api.get("orders")
            .await
            .ok()
            .and_then(|p| label(&p))
            .as_deref()
            == Some("closed")
    })
    .await;
    let patch = serde_json::json!({"metadata": {"labels": {BREAKER_LABEL: "open"}}});
    api.patch("orders", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("label by hand");
    let changed = Instant::now();
    // The pool's interval is 2s (the test manifests' default).
    wait_until("the label is put back", Duration::from_secs(10), || async {
        api.get("orders")
            .await
            .ok()
            .and_then(|p| label(&p))
            .as_deref()
            == Some("closed")
    })
    .await;
    println!("label restored after {:?}", changed.elapsed());
}

/// `/healthz` fails once the watches have failed for longer than `--watch-failure-timeout`, and
/// recovers when they work again.
#[tokio::test]
async fn healthz_fails_while_the_watches_fail() {
    let (_client, ns) = setup().await;
    let upstream = apiserver_addr();
    let proxy = FaultProxy::start(upstream).await;
    proxy.set_mode(Mode::Refuse).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let proxied = kubeconfig_via(&format!("https://127.0.0.1:{}", proxy.port()), dir.path());
    let op = OperatorProcess::start_with_kubeconfig(
        BINARY,
        &proxied,
        ns.name(),
        "wedged",
        &["--watch-failure-timeout", "1s"],
    );
    let healthz = || async { op.get("/healthz").await.map(|(code, _)| code) };
    wait_until("/healthz 503", Duration::from_secs(20), || async {
        healthz().await == Some(503)
    })
    .await;
    proxy.set_mode(Mode::Pass).await;
    wait_until("/healthz 200 again", Duration::from_secs(30), || async {
        healthz().await == Some(200)
    })
    .await;
}
