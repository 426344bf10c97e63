//! Unit tests of the probe streams: keys, the probe in flight, taking and fitting results.

use std::time::Duration;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};

use super::*;
use crate::{
    api::{DbPoolSpec, ProbeStage, SslMode},
    probe::{Password, ProberConfig},
    recovery::{Event, apply},
};

fn target(password: &str, application_name: &str) -> ProbeTarget {
    ProbeTarget {
        host: "127.0.0.1".into(),
        port: 5432,
        dbname: "app".into(),
        user: "app".into(),
        password: Some(Password::new(password.into())),
        allow_md5: false,
        ssl_mode: SslMode::Disable,
        ca_pem: None,
        target_session_attrs: TargetSessionAttrs::Any,
        application_name: application_name.into(),
        pool_max_size: 5,
        timeout: Duration::from_secs(1),
    }
}

fn policy() -> Policy {
    let spec: DbPoolSpec = serde_json::from_value(serde_json::json!({
        "database": {"host": "h", "dbname": "d", "user": "u"},
        "healthCheck": {"interval": "2s", "timeout": "1s"},
    }))
    .expect("spec");
    spec.policy()
}

fn at(ms: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000)
        .expect("valid")
        .checked_add(SignedDuration::from_millis(ms))
        .expect("valid")
}

/// A pool whose last probe succeeded at `ms`.
fn healthy(ms: i64) -> PoolState {
    let p = policy();
    let s = apply(&PoolState::new(1), Event::ProbeStarted, at(ms), &p).0;
    let seq = s.probe_seq;
    let ok = Event::ProbeSucceeded {
        seq,
        degraded: false,
    };
    apply(&s, ok, at(ms), &p).0
}

fn success(finished: Timestamp, latency_ms: u64) -> SharedResult {
    SharedResult {
        summary: ProbeSummary {
            time: MicroTime(finished),
            outcome: ProbeOutcome::Success,
            stage: Some(ProbeStage::Saturation),
            latency_ms: 1,
            message: Some("ok".into()),
            sql_state: None,
            server_version: None,
            in_recovery: None,
            connections: None,
            max_connections: None,
        },
        kind: None,
        degraded: false,
        latency: Duration::from_millis(latency_ms),
        budget: Duration::from_secs(1),
        peer: None,
        path_evidence: false,
    }
}

fn pool(name: &str) -> ObjectRef<DbPool> {
    ObjectRef::<DbPool>::new(name).within("ns")
}

const BOUND: Duration = Duration::from_secs(2);

#[test]
fn keys_follow_the_credentials() {
    let (prober, _lost) = Prober::new(ProberConfig::default());
    let a = ShareKey::of(&prober, &target("secret", "app"));
    assert_eq!(a, ShareKey::of(&prober, &target("secret", "app")));
    assert_ne!(a, ShareKey::of(&prober, &target("other", "app")));
    assert_ne!(a, ShareKey::of(&prober, &target("secret", "reports")));
    let mut primary = target("secret", "app");
    primary.target_session_attrs = TargetSessionAttrs::ReadWrite;
    assert_ne!(a, ShareKey::of(&prober, &primary));
    let mut larger = target("secret", "app");
    larger.pool_max_size = 50;
    assert_ne!(a, ShareKey::of(&prober, &larger));
    assert!(
        !format!("{a:?}").contains("secret"),
        "no password in a key's Debug"
    );
}

#[test]
fn one_probe_in_flight_serves_the_owners_due_meanwhile() {
    let (prober, _lost) = Prober::new(ProberConfig::default());
    let key = ShareKey::of(&prober, &target("secret", "app"));
    let streams = Streams::default();
    let p = policy();
    let (a, b) = (pool("a"), pool("b"));
    let state = healthy(0);
    let Decision::Probe(ticket) = streams.decide(&a, &key, &state, &p, at(2000), at(2000), BOUND)
    else {
        panic!("the first due owner probes");
    };
    let Decision::Join(mut ended) = streams.decide(&b, &key, &state, &p, at(2001), at(2001), BOUND)
    else {
        panic!("the second joins the probe in flight");
    };
    ticket.finish(success(at(2003), 3));
    assert!(ended.has_changed().expect("stream alive"));
    ended.mark_unchanged();
    match streams.decide(&b, &key, &state, &p, at(2001), at(2004), BOUND) {
        Decision::Take(result) => assert_eq!(result.finished(), at(2003)),
        _ => panic!("b takes the result that finished after its deadline"),
    }
    // Due 100 ms after the result (a tenth of 2 s is 200 ms): taken too.
    assert!(matches!(
        streams.decide(&b, &key, &state, &p, at(2100), at(2100), BOUND),
        Decision::Take(_)
    ));
    // Due 300 ms after it: too old, probe.
    assert!(matches!(
        streams.decide(&b, &key, &state, &p, at(2300), at(2300), BOUND),
        Decision::Probe(_)
    ));
}

#[test]
fn a_result_that_does_not_fit_is_not_taken() {
    let (prober, _lost) = Prober::new(ProberConfig::default());
    let key = ShareKey::of(&prober, &target("secret", "app"));
    let streams = Streams::default();
    let (a, b) = (pool("a"), pool("b"));
    let state = healthy(0);
    let Decision::Probe(ticket) =
        streams.decide(&a, &key, &state, &policy(), at(2000), at(2000), BOUND)
    else {
        panic!("the first due owner probes");
    };
    // 1.5 s: within a's timeout of 2 s, beyond b's of 1 s.
    let mut slow = success(at(3500), 1500);
    slow.budget = Duration::from_secs(2);
    ticket.finish(slow);
    let mut tight = policy();
    tight.timeout = Duration::from_secs(1);
    assert!(matches!(
        streams.decide(&b, &key, &state, &tight, at(3500), at(3500), BOUND),
        Decision::Probe(_)
    ));
    // A failure that had less budget than the pool's timeout does not hold for it either.
    let mut failed = success(at(10), 900);
    failed.summary.outcome = ProbeOutcome::TransientFailure;
    failed.budget = Duration::from_secs(1);
    assert!(failed.fits(Duration::from_secs(1)));
    assert!(!failed.fits(Duration::from_secs(5)));
    // The server's own answer (a SQLSTATE) was cut short by no timeout: it holds.
    failed.summary.sql_state = Some("28P01".into());
    assert!(failed.fits(Duration::from_secs(5)));
    assert!(
        !failed.fits(Duration::from_millis(500)),
        "came too late for this pool"
    );
}

#[test]
fn an_abandoned_probe_wakes_its_joiners_and_forgotten_owners_drop_the_stream() {
    let (prober, _lost) = Prober::new(ProberConfig::default());
    let key = ShareKey::of(&prober, &target("secret", "app"));
    let streams = Streams::default();
    let p = policy();
    let (a, b) = (pool("a"), pool("b"));
    let state = healthy(0);
    let Decision::Probe(ticket) = streams.decide(&a, &key, &state, &p, at(2000), at(2000), BOUND)
    else {
        panic!("the first due owner probes");
    };
    let Decision::Join(ended) = streams.decide(&b, &key, &state, &p, at(2000), at(2000), BOUND)
    else {
        panic!("b joins");
    };
    drop(ticket);
    assert!(ended.has_changed().expect("stream alive"));
    // Nothing in flight, nothing fresh: b probes itself.
    assert!(matches!(
        streams.decide(&b, &key, &state, &p, at(2000), at(2001), BOUND),
        Decision::Probe(_)
    ));
    streams.forget(&a);
    assert_eq!(streams.len(), 1);
    streams.forget(&b);
    assert_eq!(streams.len(), 0);
}

#[test]
fn nobody_waits_in_another_namespaces_permit_queue() {
    let (prober, _lost) = Prober::new(ProberConfig::default());
    let key = ShareKey::of(&prober, &target("secret", "app"));
    let streams = Streams::default();
    let p = policy();
    let state = healthy(0);
    let hostile = ObjectRef::<DbPool>::new("a").within("hostile");
    let neighbour = ObjectRef::<DbPool>::new("b").within("hostile");
    let innocent = ObjectRef::<DbPool>::new("c").within("innocent");
    let Decision::Probe(mut ticket) =
        streams.decide(&hostile, &key, &state, &p, at(2000), at(2000), BOUND)
    else {
        panic!("the first due owner probes");
    };
    // Its probe still waits for a permit: its own namespace joins, another probes itself.
    assert!(matches!(
        streams.decide(&neighbour, &key, &state, &p, at(2001), at(2001), BOUND),
        Decision::Join(_)
    ));
    let Decision::Probe(mut own) =
        streams.decide(&innocent, &key, &state, &p, at(2001), at(2001), BOUND)
    else {
        panic!("the innocent pool does not wait in the hostile namespace's queue");
    };
    own.permitted();
    ticket.permitted();
    // Once a probe holds its permit, every owner may wait for it.
    let other = ObjectRef::<DbPool>::new("d").within("third");
    assert!(matches!(
        streams.decide(&other, &key, &state, &p, at(2002), at(2002), BOUND),
        Decision::Join(_)
    ));
}

#[test]
fn streams_formed_together_have_their_grids_apart() {
    let (prober, _lost) = Prober::new(ProberConfig::default());
    let streams = Streams::default();
    let p = policy();
    let interval = Duration::from_secs(30);
    let mut anchors = Vec::new();
    // Four streams (four servers), each with its first result in the same millisecond.
    for server in 0..4 {
        let key = ShareKey::of(&prober, &target("secret", &format!("app-{server}")));
        let owner = pool(&format!("p{server}"));
        let Decision::Probe(ticket) =
            streams.decide(&owner, &key, &healthy(0), &p, at(2000), at(2000), BOUND)
        else {
            panic!("the first owner of stream {server} probes");
        };
        ticket.finish(success(at(2003), 3));
        let anchor = streams.anchor(&key, interval).expect("a first result");
        assert!(
            anchor <= at(2003),
            "the grid's origin is never after the first result"
        );
        anchors.push(anchor);
    }
    // The first stream's grid starts at its first result; the four grids lie at least 14 % of
    // the interval (4.2 s) apart from each other, modulo the interval.
    assert_eq!(anchors[0], at(2003));
    let step = i64::try_from(interval.as_micros()).expect("fits");
    for (i, a) in anchors.iter().enumerate() {
        for b in &anchors[i + 1..] {
            let gap = (a.as_microsecond() - b.as_microsecond()).rem_euclid(step);
            let gap = gap.min(step - gap);
            assert!(gap >= step * 14 / 100, "grids {gap} µs apart");
        }
    }
}
