//! Each checker proven able to fail: a clean history passes, a doctored one is caught.

use super::*;
use crate::history::*;

const P: &str = "ns-a/p1";

fn write(time: Ms, rv: u64, user: &str, epoch: i64, breaker: &str, failures: i32) -> StatusWrite {
    StatusWrite {
        time,
        user: user.to_owned(),
        pool: P.to_owned(),
        code: 200,
        rv,
        epoch: Some(epoch),
        breaker: Some(breaker.to_owned()),
        failures,
        phase: Some("Healthy".to_owned()),
        ..StatusWrite::default()
    }
}

fn base() -> History {
    History {
        seed: 1,
        start: 0,
        last_fault_end: 100_000,
        pools: vec![PoolInfo {
            key: P.into(),
            target: "t0".into(),
            threshold: 3,
            isolated: false,
        }],
        faults: vec![Fault {
            kind: FaultKind::DbStop,
            scope: Scope::Target("t0".into()),
            start: 10_000,
            end: Some(40_000),
            detail: String::new(),
        }],
        writes: vec![
            write(1_000, 1, "op-0", 1, "Closed", 0),
            write(15_000, 2, "op-0", 1, "Open", 3),
            // The leader changes: op-1's term 2 takes over.
            write(30_000, 3, "op-1", 2, "Open", 4),
            write(45_000, 4, "op-1", 2, "HalfOpen", 4),
            write(46_000, 5, "op-1", 2, "Closed", 0),
        ],
        ..History::default()
    }
}

fn checkers_of(h: &History) -> Vec<String> {
    run(h, &Bounds::default(), &[], &[])
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(name, _)| name)
        .collect()
}

#[test]
fn a_clean_history_passes() {
    assert_eq!(checkers_of(&base()), Vec::<String>::new());
}

#[test]
fn a_write_by_a_non_leader_is_a_stale_write() {
    let mut h = base();
    // op-0, frozen past its lease, lands a write of its old term after op-1's first.
    h.writes.push(write(31_000, 6, "op-0", 1, "Closed", 0));
    h.writes.sort_by_key(|w| w.rv);
    let v = check_stale_writes(&h);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].message.contains("stale write"), "{v:?}");
    assert!(!v[0].slice.is_empty());
    // The same term written by another identity.
    let mut h = base();
    h.writes.push(write(47_000, 9, "op-2", 2, "Closed", 0));
    assert!(check_stale_writes(&h)[0].message.contains("two identities"));
    // A write that drops writerEpoch (the CRD's rule lets it through, and no longer fences
    // afterwards: the long run's seed 882113).
    let mut h = base();
    let mut unstamped = write(47_000, 9, "op-1", 2, "Closed", 0);
    unstamped.epoch = None;
    h.writes.push(unstamped);
    assert!(
        check_stale_writes(&h)[0]
            .message
            .contains("without writerEpoch")
    );
    // A refused stale write is the fence working, not a violation.
    let mut h = base();
    let mut refused = write(31_000, 0, "op-0", 1, "Closed", 0);
    refused.code = 422;
    h.writes.push(refused);
    assert!(check_stale_writes(&h).is_empty());
}

#[test]
fn a_token_acted_on_twice_or_never_is_caught() {
    let mut h = base();
    h.actions.push(Action {
        pool: P.into(),
        time: 41_000,
        kind: ActionKind::Token("tok-1".into()),
    });
    let mut acted = write(42_000, 10, "op-1", 2, "HalfOpen", 4);
    acted.reopen = Some(("tok-1".into(), "t-a".into()));
    h.writes.push(acted.clone());
    assert!(check_tokens(&h).is_empty());
    // A new leader replays the same token.
    let mut again = acted.clone();
    again.rv = 11;
    again.epoch = Some(3);
    again.user = "op-2".into();
    again.reopen = Some(("tok-1".into(), "t-b".into()));
    h.writes.push(again);
    let v = check_tokens(&h);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].message.contains("2 times"), "{v:?}");
    // A token never acted on (and not excused by a delete or a newer token).
    let mut h = base();
    h.actions.push(Action {
        pool: P.into(),
        time: 41_000,
        kind: ActionKind::Token("tok-2".into()),
    });
    assert!(check_tokens(&h)[0].message.contains("never acted on"));
    h.actions.push(Action {
        pool: P.into(),
        time: 42_000,
        kind: ActionKind::Delete,
    });
    assert!(check_tokens(&h).is_empty());
    // A token nobody set.
    let mut h = base();
    let mut ghost = write(42_000, 10, "op-1", 2, "Closed", 0);
    ghost.reopen = Some(("ghost".into(), "t".into()));
    h.writes.push(ghost);
    assert!(check_tokens(&h)[0].message.contains("nobody set"));
}

#[test]
fn an_open_with_no_fault_is_a_false_open() {
    let mut h = base();
    h.writes.push(write(200_000, 20, "op-1", 2, "Open", 3));
    let v = check_breaker_moves(&h, &Bounds::default());
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].message.contains("no fault"), "{v:?}");
    assert!(v[0].slice.iter().any(|l| l.contains("Open")));
    // ForcedOpen explains it by rule, also when the driver recorded the edit a moment after the
    // operator acted on it.
    h.actions.push(Action {
        pool: P.into(),
        time: 200_013,
        kind: ActionKind::Mode("ForcedOpen".into()),
    });
    assert!(check_breaker_moves(&h, &Bounds::default()).is_empty());
    // Too few failures for the threshold, inside a fault.
    let mut h = base();
    h.writes[1].failures = 1;
    assert!(
        check_breaker_moves(&h, &Bounds::default())[0]
            .message
            .contains("threshold")
    );
    // A latency fault does not make a target down, but does explain an Open.
    let mut h = base();
    h.faults[0].kind = FaultKind::Latency;
    assert!(check_breaker_moves(&h, &Bounds::default()).is_empty());
}

#[test]
fn a_close_while_the_target_is_down_is_caught() {
    let mut h = base();
    h.faults[0].end = Some(90_000);
    h.last_fault_end = 90_000;
    let v = check_breaker_moves(&h, &Bounds::default());
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].message.contains("down"), "{v:?}");
    // A write the apiserver's restart may have delayed is not judged.
    h.faults.push(Fault {
        kind: FaultKind::ApiserverRestart,
        scope: Scope::ControlPlane,
        start: 30_000,
        end: Some(35_000),
        detail: String::new(),
    });
    assert!(check_breaker_moves(&h, &Bounds::default()).is_empty());
}

#[test]
fn convergence_late_or_never_is_caught() {
    let mut h = base();
    h.convergence.push(Convergence {
        pool: P.into(),
        expected: "Healthy/Closed".into(),
        observed: "Healthy/Closed".into(),
        at: Some(110_000),
        bound_ms: 20_000,
    });
    assert!(check_convergence(&h).is_empty());
    h.convergence[0].at = Some(130_000);
    assert!(check_convergence(&h)[0].message.contains("after 30000 ms"));
    h.convergence[0].at = None;
    assert!(check_convergence(&h)[0].message.contains("never"));
    // Left ForcedOpen by the last edit, Open is the truth.
    h.actions.push(Action {
        pool: P.into(),
        time: 95_000,
        kind: ActionKind::Mode("ForcedOpen".into()),
    });
    h.convergence[0].observed = "BreakerOpen/Open gen Some(2)/Some(2)".into();
    assert!(check_convergence(&h).is_empty());
    h.convergence[0].observed = "Healthy/Closed".into();
    assert_eq!(check_convergence(&h).len(), 1);
    let mut h = base();
    h.faults[0].end = None;
    assert!(check_convergence(&h)[0].message.contains("never undone"));
}

fn attempt(time: Ms) -> Attempt {
    Attempt {
        time,
        target: "t0".into(),
        user: "app".into(),
        db: "app".into(),
        ok: true,
    }
}

fn unexplained(h: &History) -> Vec<Ms> {
    replay_cost(h, &Bounds::default())
        .into_iter()
        .flat_map(|c| c.unexplained)
        .collect()
}

#[test]
fn the_cost_replay_allows_one_login_when_a_stopped_server_is_back_and_none_while_it_is_down() {
    // base(): t0 stopped from 10 s to 40 s. The replay fails every probe inside the window
    // without a password and grants the early trial at 40 s (readiness edge): one login.
    let mut h = base();
    h.attempts = vec![attempt(40_100)];
    assert!(check_cost(&h, &Bounds::default()).is_empty());
    let cost = replay_cost(&h, &Bounds::default());
    assert_eq!((cost[0].seen, cost[0].allowed), (1, 1), "{cost:?}");
    // A login while the server is stopped (no password can reach it) is unexplained ...
    h.attempts = vec![attempt(20_000), attempt(40_100)];
    assert_eq!(unexplained(&h), vec![20_000]);
    // ... and so is a second login after the return: the engine's schedule allows one.
    h.attempts = vec![attempt(40_100), attempt(40_200)];
    assert_eq!(unexplained(&h), vec![40_200]);
    let v = check_cost(&h, &Bounds::default());
    assert_eq!(v.len(), 1);
    assert!(v[0].slice[0].contains("40200"), "{:?}", v[0].slice);
    // A login in a quiet healthy stretch, with nothing to explain it.
    h.attempts = vec![attempt(40_100), attempt(70_000)];
    assert_eq!(unexplained(&h), vec![70_000]);
    // A term an operator started at 69.5 s (its prober has no connection) explains it.
    h.terms = vec![Term {
        time: 69_500,
        identity: "op-1".into(),
        epoch: 2,
    }];
    assert!(unexplained(&h).is_empty());
    // The clients' logins (another role and database) are not the operator's.
    h.terms.clear();
    h.attempts = vec![
        attempt(40_100),
        Attempt {
            user: "client".into(),
            db: "postgres".into(),
            ..attempt(70_000)
        },
    ];
    assert!(check_cost(&h, &Bounds::default()).is_empty());
}

#[test]
fn a_retry_storm_during_a_secret_rotation_is_more_than_the_backoff_allows() {
    // Secrets first at 10 s, the server's password at 12 s: the pool's probes fail with its new
    // password at 10, 10.3 and 10.9 s (backoff 300 ms × 2), and the rotation's end re-keys the
    // connection at 12 s: four logins (base()'s new term, at 30 s, is left out: its writes go).
    let mut h = base();
    h.writes.clear();
    h.faults[0] = Fault {
        kind: FaultKind::SecretRotation,
        scope: Scope::Target("t0".into()),
        start: 10_000,
        end: Some(12_000),
        detail: "Secrets first".into(),
    };
    h.attempts = [10_050, 10_350, 10_950, 12_050].map(attempt).to_vec();
    assert!(
        check_cost(&h, &Bounds::default()).is_empty(),
        "{:?}",
        replay_cost(&h, &Bounds::default())
    );
    // A login every 100 ms through the rotation: a retry storm.
    h.attempts = (0..20).map(|i| attempt(10_000 + 100 * i)).collect();
    let cost = replay_cost(&h, &Bounds::default());
    assert_eq!(cost[0].allowed, 4, "{cost:?}");
    assert_eq!(cost[0].unexplained.len(), 16);
    assert_eq!(check_cost(&h, &Bounds::default())[0].subject, "t0");
}

#[test]
fn leaks_are_caught() {
    let mut h = base();
    h.leaks.baseline_sessions = vec![("t0".into(), 1)];
    h.leaks.final_sessions = vec![("t0".into(), 2)];
    h.leaks.fds = Some((40.0, 50.0));
    h.leaks.series_per_pool = Some((10.0, 10.0));
    assert!(check_leaks(&h, &Bounds::default()).is_empty());
    h.leaks.final_sessions = vec![("t0".into(), 3)];
    h.leaks.fds = Some((40.0, 80.0));
    h.leaks.series_per_pool = Some((10.0, 14.0));
    h.leaks.deleted_with_series = vec!["ns-a/gone".into()];
    assert_eq!(check_leaks(&h, &Bounds::default()).len(), 4);
    // RSS growing by a third over a long-lived process.
    let mut h = base();
    let rss = |i: i64, v: f64| Sample {
        time: i * 60_000,
        what: "rss_kib".into(),
        subject: "op-0#1".into(),
        value: v,
    };
    h.samples = (0..30).map(|i| rss(i, 30_000.0)).collect();
    assert!(check_leaks(&h, &Bounds::default()).is_empty());
    h.samples = (0..30)
        .map(|i| rss(i, 30_000.0 + 500.0 * i as f64))
        .collect();
    assert!(
        check_leaks(&h, &Bounds::default())[0]
            .message
            .contains("RSS")
    );
}

#[test]
fn a_password_in_a_log_is_caught_without_printing_it() {
    let passwords = vec!["s3cret-rotated-9f".to_owned()];
    let texts = vec![
        (
            "operator op-0".to_owned(),
            "probe failed: password authentication failed".to_owned(),
        ),
        (
            "audit".to_owned(),
            "{\"stringData\":{\"password\":\"s3cret-rotated-9f\"}}".to_owned(),
        ),
    ];
    let v = check_passwords(&passwords, &texts);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].subject, "audit");
    assert!(!v[0].message.contains("s3cret"));
}

#[test]
fn a_login_for_an_isolated_pool_is_caught() {
    let mut h = base();
    h.attempts.push(Attempt {
        time: 5,
        target: "t0".into(),
        user: "app".into(),
        db: "app".into(),
        ok: true,
    });
    assert!(check_isolation(&h).is_empty());
    h.attempts.push(Attempt {
        time: 6,
        target: "t0".into(),
        user: "app".into(),
        db: ISOLATED_DB.into(),
        ok: false,
    });
    assert_eq!(check_isolation(&h).len(), 1);
}
