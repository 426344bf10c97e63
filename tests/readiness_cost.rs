//! What readiness pings and early trials cost the database, counted at the server: a counting
//! fake server (`dbpool_testkit::counting`) records every connection and whether it sent a
//! password, and the operator runs in-process against a real kube-apiserver.
//!
//! - A ping never sends a password, even to a server that asks for one in clear text.
//! - While the server never comes back (57P03 for every connection), the credentialed attempts
//!   follow exactly the recovery engine's schedule (replayed for the recorded time span; ±1 at
//!   the span's ends), and the pings stay within 4 per second for the target.
//! - When the server starts accepting, the pools of one credential key (several DbPools on one
//!   Secret) make one credentialed early trial between them, and all take its answer.

use dbpool_testkit as support;

use std::time::{Duration, SystemTime};

use dbpool_operator::{
    api::{DbPoolStatus, Phase, Readiness},
    controller::RunningOperator,
    probe::{PingTarget, SslMode, ping},
    recovery::{self, Event, FailureKind, PoolState},
};
use k8s_openapi::jiff::Timestamp;
use support::{
    counting::{Answer, CountingServer, Kind},
    kube::{TestNamespace, create_consenting_secret, install_crd},
    pools::{create, pool, status, wait_status},
    postgres::{APP_DB, APP_PASSWORD, APP_USER},
    wait::wait_for,
};

const SECRET: &str = "db-credentials";
const KEY: &str = "password";

fn ping_to(port: u16) -> PingTarget {
    PingTarget {
        host: "127.0.0.1".into(),
        port,
        dbname: APP_DB.into(),
        user: APP_USER.into(),
        ssl_mode: SslMode::Disable,
        ca_pem: None,
        timeout: Duration::from_secs(1),
    }
}

#[tokio::test]
async fn a_ping_sends_no_password_even_to_a_server_that_would_take_one_in_clear() {
    for answer in [Answer::Cleartext, Answer::Scram] {
        let server = CountingServer::start(answer).await;
        for _ in 0..3 {
            let report = ping(&ping_to(server.port())).await;
            assert_eq!(
                report.readiness,
                Readiness::Accepting,
                "{answer:?}: {report:?}"
            );
        }
        let seen = wait_for(
            "three connections with their startup",
            Duration::from_secs(5),
            || {
                let c = server.connections();
                let done = c.len() == 3 && c.iter().all(|c| c.startup_keys.is_some());
                async move { done.then_some(c) }
            },
        )
        .await;
        for c in &seen {
            assert_eq!(c.kind(), Kind::Ping, "{answer:?}: {c:?}");
            assert_eq!(c.password_len, None, "{answer:?}: a ping sent a password");
        }
    }
}

/// The timings of the schedule test: exact (no jitter), short, every phase within ~20 s.
fn short_timings() -> serde_json::Value {
    serde_json::json!({
        "healthCheck": { "interval": "30s", "timeout": "1s", "adaptiveTimeout": false },
        "backoff": { "initialDelay": "500ms", "multiplier": 2.0, "maxDelay": "4s",
                     "maxAttempts": 6, "cooldown": "5s", "jitter": 0.0 },
        "breaker": { "failureThreshold": 3, "openTimeout": "3s", "successThreshold": 1 },
    })
}

/// The recovery engine's credentialed attempts within `span` of a first failed attempt, every
/// attempt failing (an outage) the instant it starts.
fn replayed_attempts(policy: &recovery::Policy, span: Duration) -> usize {
    let t0 = Timestamp::from_second(1_800_000_000).unwrap_or(Timestamp::UNIX_EPOCH);
    let end = recovery::add(t0, span);
    let mut state = PoolState::new(1);
    let mut at = t0;
    let mut attempts = 0;
    while at <= end && attempts < 10_000 {
        state = recovery::apply(&state, Event::ProbeStarted, at, policy).0;
        let seq = state.probe_seq;
        let failed = Event::ProbeFailed {
            seq,
            kind: FailureKind::Outage,
        };
        state = recovery::apply(&state, failed, at, policy).0;
        attempts += 1;
        match recovery::next_deadline(&state, policy) {
            Some(next) if next > at => at = next,
            _ => break,
        }
    }
    attempts
}

/// A namespace (the CRD installed) with the Secret the pools log in with, consenting to loopback.
async fn consenting_namespace() -> (kube::Client, TestNamespace) {
    let client = support::kube::client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client).await;
    create_consenting_secret(
        &client,
        ns.name(),
        SECRET,
        KEY,
        APP_PASSWORD,
        &["127.0.0.1"],
    )
    .await;
    (client, ns)
}

#[tokio::test]
async fn while_the_server_never_comes_back_attempts_keep_the_schedule_and_pings_stay_at_4_per_second()
 {
    let (client, ns) = consenting_namespace().await;
    let server = CountingServer::start(Answer::StartingUp).await;
    let op = RunningOperator::start(client.clone(), ns.name());
    let spec = pool("stuck", server.port(), Some((SECRET, KEY)), short_timings());
    let policy = spec.spec.policy();
    create(&client, ns.name(), &spec).await;

    let first = wait_for(
        "a first credentialed attempt",
        Duration::from_secs(30),
        || {
            let first = server
                .connections()
                .iter()
                .find(|c| c.credentialed())
                .map(|c| c.at);
            async move { first }
        },
    )
    .await;
    // The span is the scenario's length, not a wait for a condition.
    let span = Duration::from_secs(20);
    tokio::time::sleep(span + Duration::from_millis(500)).await;
    let end = first + span;
    let within = |c: &&support::counting::Connection| c.at >= first && c.at <= end;
    let seen = server.connections();
    let attempts = seen
        .iter()
        .filter(within)
        .filter(|c| c.credentialed())
        .count();
    let pings = seen
        .iter()
        .filter(within)
        .filter(|c| c.kind() == Kind::Ping)
        .count();
    let expected = replayed_attempts(&policy, span);
    let text = op.metrics.encode();
    let early = metric(&text, "dbpool_early_trials_total");
    eprintln!(
        "server never back, {span:?}: {attempts} credentialed attempts (the schedule: \
         {expected}), {pings} pings ({:.2}/s), early trials {early}, load {}",
        pings as f64 / span.as_secs_f64(),
        load_average()
    );
    // The attempt at the span's end may fall either side of it (probe latency shifts every
    // attempt a little later than the replay's instant ones).
    assert!(
        attempts.abs_diff(expected) <= 1,
        "{attempts} credentialed attempts, the schedule has {expected}"
    );
    assert_eq!(early, 0.0, "no edge, no early trial: {text}");
    assert!(pings >= 1, "the target was pinged");
    // At most 4 per second, plus the one at the span's start.
    let bound = 4 * span.as_secs() as usize + 1;
    assert!(pings <= bound, "{pings} pings in {span:?}, at most {bound}");
    // Every ping the operator counted is one the server saw (± one in flight at the end).
    let counted = metric(&text, "dbpool_readiness_pings_total");
    let all_pings = server
        .connections()
        .iter()
        .filter(|c| c.kind() == Kind::Ping)
        .count() as f64;
    assert!(
        (all_pings - counted).abs() <= 1.0,
        "{all_pings} at the server, {counted} counted"
    );
    // Nobody sent a password (57P03 comes before any), and the status says StartingUp.
    assert!(seen.iter().all(|c| c.password_len.is_none()));
    let s = status(&client, ns.name(), "stuck").await.expect("a status");
    assert_eq!(s.readiness.map(|r| r.state), Some(Readiness::StartingUp));
    drop(op);
    ns.cleanup().await;
}

fn shows(s: &DbPoolStatus, code: &str) -> bool {
    s.last_probe
        .as_ref()
        .is_some_and(|p| p.sql_state.as_deref() == Some(code))
}

#[tokio::test]
async fn the_pools_of_one_secret_make_one_credentialed_early_trial_per_edge() {
    const POOLS: usize = 5;
    let (client, ns) = consenting_namespace().await;
    let server = CountingServer::start(Answer::StartingUp).await;
    let op = RunningOperator::start(client.clone(), ns.name());
    // Scheduled retries 30 s apart: within the test every credentialed attempt after the edge
    // is an early trial.
    let timings = serde_json::json!({
        "healthCheck": { "interval": "30s", "timeout": "2s", "adaptiveTimeout": false },
        "backoff": { "initialDelay": "30s", "maxDelay": "60s", "jitter": 0.0 },
        "breaker": { "failureThreshold": 5, "openTimeout": "60s" },
    });
    let names: Vec<String> = (0..POOLS).map(|i| format!("p{i}")).collect();
    for name in &names {
        let spec = pool(name, server.port(), Some((SECRET, KEY)), timings.clone());
        create(&client, ns.name(), &spec).await;
    }
    for name in &names {
        wait_status(
            &client,
            ns.name(),
            name,
            "57P03",
            Duration::from_secs(30),
            |s| shows(s, "57P03") && s.phase == Some(Phase::Recovering),
        )
        .await;
    }
    // Every pool waits on the target's ping stream: a ping after the last pool's failure.
    let waiting = SystemTime::now();
    wait_for("a ping", Duration::from_secs(10), || {
        let pinged = server.count(Kind::Ping, waiting) >= 1;
        async move { pinged.then_some(()) }
    })
    .await;
    let edge = SystemTime::now();
    server.set_answer(Answer::Scram);
    for name in &names {
        wait_status(
            &client,
            ns.name(),
            name,
            "28P01",
            Duration::from_secs(20),
            |s| shows(s, "28P01"),
        )
        .await;
    }
    let after: Vec<_> = server
        .connections()
        .into_iter()
        .filter(|c| c.at >= edge)
        .collect();
    let trials = after.iter().filter(|c| c.credentialed()).count();
    let pings = after.iter().filter(|c| c.kind() == Kind::Ping).count();
    let text = op.metrics.encode();
    eprintln!(
        "{POOLS} pools on one Secret: {trials} credentialed attempt(s) after the edge, {pings} \
         ping(s); early trials granted {}, load {}",
        metric(&text, "dbpool_early_trials_total"),
        load_average()
    );
    assert_eq!(
        trials, 1,
        "one credentialed trial per credential key per edge: {after:?}"
    );
    // Every pool shows the edge: accepting since after the server was switched, and the
    // trial's own answer.
    let switched = Timestamp::try_from(edge).expect("a timestamp");
    for name in &names {
        let s = status(&client, ns.name(), name).await.expect("a status");
        let readiness = s.readiness.expect("readiness in the status");
        assert_eq!(readiness.state, Readiness::Accepting, "{name}");
        assert!(readiness.since.0 >= switched, "{name}: {readiness:?}");
        assert_eq!(s.phase, Some(Phase::ConfigError), "{name}");
    }
    drop(op);
    ns.cleanup().await;
}

/// The sum of the samples of metric lines starting with `prefix`.
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
