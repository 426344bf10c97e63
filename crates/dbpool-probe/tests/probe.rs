//! The staged probe against real PostgreSQL 15 servers (one per test): stages and numbers of a
//! healthy probe, reuse of the persistent connection, classification of every failure, TLS modes,
//! standbys, and event-driven loss detection.

use dbpool_testkit as support;

use std::time::Duration;

use dbpool_probe::{
    ConnectionLost, Password, ProbeOutcome, ProbeReport, ProbeStage, ProbeTarget, Prober,
    ProberConfig, SslMode, TargetSessionAttrs,
};
use support::{
    postgres::{APP_DB, APP_PASSWORD, APP_USER, PgServer, unrelated_ca_pem},
    proxy::{FaultProxy, Mode},
    wait::{wait_for, wait_until},
};
use tokio::{sync::mpsc::UnboundedReceiver, time::Instant};
use tokio_postgres::Client;

/// Loss must be reported this fast after the server ends the session.
const LOSS_BOUND: Duration = Duration::from_millis(100);

fn target(port: u16, application_name: &str) -> ProbeTarget {
    ProbeTarget {
        host: "127.0.0.1".into(),
        port,
        dbname: APP_DB.into(),
        user: APP_USER.into(),
        password: Some(Password::new(APP_PASSWORD.into())),
        ssl_mode: SslMode::Prefer,
        ca_pem: None,
        target_session_attrs: TargetSessionAttrs::ReadWrite,
        application_name: application_name.into(),
        pool_max_size: 10,
        allow_md5: false,
        timeout: Duration::from_secs(5),
    }
}

fn stages(report: &ProbeReport) -> Vec<ProbeStage> {
    report.stage_latencies.iter().map(|(s, _)| *s).collect()
}

/// Backend pids of sessions with `application_name`.
async fn backends(su: &Client, application_name: &str) -> Vec<i32> {
    su.query(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
        &[&application_name],
    )
    .await
    .expect("pg_stat_activity")
    .iter()
    .map(|row| row.get(0))
    .collect()
}

/// Waits for the next ConnectionLost and returns it with the instant it arrived.
async fn next_loss(rx: &mut UnboundedReceiver<ConnectionLost>) -> (ConnectionLost, Instant) {
    let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("no ConnectionLost within 5s")
        .expect("channel closed");
    (event, Instant::now())
}

#[tokio::test]
async fn healthy_probe_runs_every_stage_then_reuses_the_connection() {
    let pg = PgServer::start().await;
    let su = pg.superuser().await;
    let (prober, mut lost) = Prober::new(ProberConfig::default());
    let t = target(pg.port(), "probe-healthy");

    let first = prober.probe("ns/a", &t).await;
    assert_eq!(first.outcome, ProbeOutcome::Success, "{first:?}");
    assert_eq!(first.stage, ProbeStage::Saturation);
    assert!(first.fresh_connection);
    // The resolved address the probe logged in at (what a gate may point at).
    assert_eq!(first.peer, Some(pg.addr()), "{first:?}");
    // Every stage but Credentials (the operator's, before connecting), in order.
    assert_eq!(stages(&first), ProbeStage::ALL[1..]);
    assert!(
        first
            .server_version
            .as_deref()
            .is_some_and(|v| v.starts_with("15")),
        "{first:?}"
    );
    assert_eq!(first.in_recovery, Some(false));
    assert_eq!(first.sql_state, None);
    assert_eq!(
        first.max_connections,
        Some(100 - 3),
        "default 100 minus 3 reserved"
    );
    let in_use = first.connections.expect("connections");
    assert!(in_use >= 2, "the probe and the superuser session: {in_use}");
    assert_eq!(first.free_slots, Some(97 - in_use));
    assert_eq!(first.pool_fits, Some(true));
    assert!(
        first.message.starts_with("ok: PostgreSQL 15"),
        "{}",
        first.message
    );
    assert!(first.latency < t.timeout);
    let stage_sum: Duration = first.stage_latencies.iter().map(|(_, d)| *d).sum();
    assert!(
        stage_sum <= first.latency,
        "{stage_sum:?} > {:?}",
        first.latency
    );

    let second = prober.probe("ns/a", &t).await;
    assert_eq!(
        second.peer,
        Some(pg.addr()),
        "a reused session reports its address too"
    );
    assert_eq!(second.outcome, ProbeOutcome::Success, "{second:?}");
    assert!(!second.fresh_connection);
    assert_eq!(
        stages(&second),
        [ProbeStage::Query, ProbeStage::Role, ProbeStage::Saturation]
    );
    assert_eq!(second.server_version, first.server_version);
    assert_eq!(backends(&su, "probe-healthy").await.len(), 1);
    assert_eq!(prober.open_connections(), 1);

    // Other sessions (of another role) are counted.
    let mut extra = Vec::new();
    for _ in 0..3 {
        extra.push(pg.superuser().await);
    }
    let third = prober.probe("ns/a", &t).await;
    assert_eq!(third.connections, Some(second.connections.expect("n") + 3));
    assert_eq!(third.free_slots, Some(97 - third.connections.expect("n")));

    // A pool that does not fit is still a success, flagged.
    let huge = ProbeTarget {
        pool_max_size: 500,
        ..t.clone()
    };
    let report = prober.probe("ns/a", &huge).await;
    assert_eq!(report.outcome, ProbeOutcome::Success);
    assert_eq!(report.pool_fits, Some(false));
    assert!(
        report.message.contains("does not fit"),
        "{}",
        report.message
    );

    // A second pool with the same target shares the connection.
    let shared = prober.probe("ns/b", &t).await;
    assert!(!shared.fresh_connection);
    assert_eq!(prober.open_connections(), 1);

    // Forgetting closes the connection once no pool uses it, without a loss event.
    prober.forget("ns/a");
    assert_eq!(prober.open_connections(), 1);
    prober.forget("ns/b");
    assert_eq!(prober.open_connections(), 0);
    wait_until("the probe session to end", Duration::from_secs(5), || {
        let su = &su;
        async move { backends(su, "probe-healthy").await.is_empty() }
    })
    .await;
    assert!(lost.try_recv().is_err(), "a deliberate close is not a loss");
}

#[tokio::test]
async fn concurrent_probes_of_one_target_open_one_connection() {
    let pg = PgServer::start().await;
    let su = pg.superuser().await;
    let (prober, _lost) = Prober::new(ProberConfig::default());
    let t = target(pg.port(), "probe-concurrent");
    let (a, b, c) = tokio::join!(
        prober.probe("ns/a", &t),
        prober.probe("ns/b", &t),
        prober.probe("ns/c", &t)
    );
    for report in [&a, &b, &c] {
        assert_eq!(report.outcome, ProbeOutcome::Success, "{report:?}");
    }
    let fresh = [&a, &b, &c].iter().filter(|r| r.fresh_connection).count();
    assert_eq!(fresh, 1, "exactly one probe connected");
    assert_eq!(prober.open_connections(), 1);
    assert_eq!(backends(&su, "probe-concurrent").await.len(), 1);
}

#[tokio::test]
async fn stopped_server_is_a_transient_failure_at_connect() {
    let mut pg = PgServer::start().await;
    let (prober, _lost) = Prober::new(ProberConfig::default());
    let t = target(pg.port(), "probe-stopped");
    pg.stop().await;
    let report = prober.probe("ns/a", &t).await;
    assert_eq!(report.outcome, ProbeOutcome::TransientFailure, "{report:?}");
    assert_eq!(report.stage, ProbeStage::Connect);
    assert_eq!(
        report.message,
        format!("connection refused by 127.0.0.1:{}", pg.port())
    );
    assert_eq!(report.sql_state, None);
    assert!(report.fresh_connection);
    assert_eq!(prober.open_connections(), 0);

    // And back.
    pg.start().await;
    let report = prober.probe("ns/a", &t).await;
    assert_eq!(report.outcome, ProbeOutcome::Success, "{report:?}");
}

#[tokio::test]
async fn black_hole_times_out_within_the_budget() {
    let pg = PgServer::start().await;
    let proxy = FaultProxy::start(pg.addr()).await;
    proxy.set_mode(Mode::BlackHole).await;
    let (prober, _lost) = Prober::new(ProberConfig::default());
    let budget = Duration::from_secs(1);

    for (ssl_mode, stuck_in) in [
        (SslMode::Prefer, ProbeStage::Tls),
        (SslMode::Disable, ProbeStage::Auth),
    ] {
        let t = ProbeTarget {
            ssl_mode,
            timeout: budget,
            ..target(proxy.port(), "probe-black-hole")
        };
        let started = Instant::now();
        let report = prober.probe("ns/a", &t).await;
        let took = started.elapsed();
        assert_eq!(report.outcome, ProbeOutcome::TransientFailure, "{report:?}");
        assert_eq!(report.stage, stuck_in, "{report:?}");
        assert!(report.message.contains("timed out"), "{}", report.message);
        assert!(
            took >= budget - Duration::from_millis(50),
            "gave up early: {took:?}"
        );
        assert!(
            took <= budget + Duration::from_millis(200),
            "overran the budget: {took:?}"
        );
        assert!(report.latency <= budget + Duration::from_millis(200));
    }
}

#[tokio::test]
async fn wrong_password_is_a_config_failure_at_auth() {
    let pg = PgServer::start().await;
    let (prober, _lost) = Prober::new(ProberConfig::default());
    let t = ProbeTarget {
        password: Some(Password::new("Wr0ng-Passw0rd-xyz".into())),
        ..target(pg.port(), "probe-wrong-password")
    };
    let report = prober.probe("ns/a", &t).await;
    assert_eq!(report.outcome, ProbeOutcome::ConfigFailure, "{report:?}");
    assert_eq!(report.stage, ProbeStage::Auth);
    assert_eq!(report.sql_state.as_deref(), Some("28P01"));
    assert_eq!(
        report.message,
        "password authentication failed for user \"app\" (28P01)"
    );
    assert_eq!(prober.open_connections(), 0);

    // No password at all, where the server wants one.
    let none = ProbeTarget {
        password: None,
        ..t.clone()
    };
    let report = prober.probe("ns/a", &none).await;
    assert_eq!(report.outcome, ProbeOutcome::ConfigFailure, "{report:?}");
    assert_eq!(report.stage, ProbeStage::Auth);
    assert!(report.message.contains("password"), "{}", report.message);
}

#[tokio::test]
async fn missing_database_is_a_config_failure() {
    let pg = PgServer::start().await;
    let (prober, _lost) = Prober::new(ProberConfig::default());
    let t = ProbeTarget {
        dbname: "nope".into(),
        ..target(pg.port(), "probe-no-db")
    };
    let report = prober.probe("ns/a", &t).await;
    assert_eq!(report.outcome, ProbeOutcome::ConfigFailure, "{report:?}");
    assert_eq!(report.stage, ProbeStage::Auth);
    assert_eq!(report.sql_state.as_deref(), Some("3D000"));
    assert_eq!(report.message, "database \"nope\" does not exist (3D000)");
}

#[tokio::test]
async fn exhausted_connection_slots_are_transient_53300_with_saturation() {
    let pg = PgServer::options()
        .max_connections(5)
        .superuser_reserved_connections(1)
        .start()
        .await;
    // Every probe opens a new connection, as a periodic reconnect does.
    let (prober, _lost) = Prober::new(ProberConfig {
        reconnect_every: Duration::ZERO,
    });
    let t = target(pg.port(), "probe-full");
    let report = prober.probe("ns/a", &t).await;
    assert_eq!(report.outcome, ProbeOutcome::Success, "{report:?}");
    assert_eq!(report.max_connections, Some(4));
    assert_eq!(report.connections, Some(1));
    assert_eq!(report.free_slots, Some(3));
    assert_eq!(report.pool_fits, Some(false), "10 do not fit into 3");

    // Fill the remaining slots with app sessions until the server refuses.
    let mut sessions = Vec::new();
    loop {
        match pg.connect_as(APP_USER, APP_PASSWORD, APP_DB).await {
            Ok(client) => sessions.push(client),
            Err(e) => {
                assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e:?}");
                break;
            }
        }
        assert!(sessions.len() < 10, "max_connections not enforced");
    }
    assert_eq!(sessions.len(), 3);

    let report = prober.probe("ns/a", &t).await;
    assert_eq!(report.outcome, ProbeOutcome::TransientFailure, "{report:?}");
    assert_eq!(report.stage, ProbeStage::Auth);
    assert_eq!(report.sql_state.as_deref(), Some("53300"));
    assert!(report.message.ends_with("(53300)"), "{}", report.message);
    // Told by the connection already held.
    assert_eq!(report.connections, Some(4));
    assert_eq!(report.max_connections, Some(4));
    assert_eq!(report.free_slots, Some(0));
    assert_eq!(report.pool_fits, Some(false));

    // A prober without a connection still classifies it, without numbers.
    let (cold, _lost) = Prober::new(ProberConfig::default());
    let report = cold.probe("ns/b", &t).await;
    assert_eq!(report.sql_state.as_deref(), Some("53300"), "{report:?}");
    assert_eq!(report.outcome, ProbeOutcome::TransientFailure);
    assert_eq!(report.connections, None);

    drop(sessions);
    wait_for("slots to free up", Duration::from_secs(10), || {
        let prober = &prober;
        let t = &t;
        async move {
            let r = prober.probe("ns/a", t).await;
            (r.outcome == ProbeOutcome::Success).then_some(r)
        }
    })
    .await;
}

#[tokio::test]
async fn standby_is_wrong_role_for_read_write_and_fine_for_any() {
    let primary = PgServer::start().await;
    let standby = primary.standby().await;
    let (prober, _lost) = Prober::new(ProberConfig::default());

    let read_write = target(standby.port(), "probe-standby");
    let report = prober.probe("ns/rw", &read_write).await;
    assert_eq!(report.outcome, ProbeOutcome::WrongRole, "{report:?}");
    assert_eq!(report.stage, ProbeStage::Role);
    assert_eq!(report.in_recovery, Some(true));
    assert!(report.message.contains("standby"), "{}", report.message);
    assert_eq!(report.sql_state, None);

    let any = ProbeTarget {
        target_session_attrs: TargetSessionAttrs::Any,
        ..read_write.clone()
    };
    let report = prober.probe("ns/any", &any).await;
    assert_eq!(report.outcome, ProbeOutcome::Success, "{report:?}");
    assert_eq!(report.in_recovery, Some(true));
    assert!(!report.fresh_connection, "same target, same connection");

    let report = prober
        .probe("ns/primary", &target(primary.port(), "probe-primary"))
        .await;
    assert_eq!(report.outcome, ProbeOutcome::Success, "{report:?}");
    assert_eq!(report.in_recovery, Some(false));
}

#[tokio::test]
async fn tls_required_from_a_plain_server_is_a_config_failure_at_tls() {
    let pg = PgServer::start().await;
    let (prober, _lost) = Prober::new(ProberConfig::default());
    let require = ProbeTarget {
        ssl_mode: SslMode::Require,
        ..target(pg.port(), "probe-require-plain")
    };
    let report = prober.probe("ns/a", &require).await;
    assert_eq!(report.outcome, ProbeOutcome::ConfigFailure, "{report:?}");
    assert_eq!(report.stage, ProbeStage::Tls);
    assert_eq!(
        report.message,
        "server does not support TLS but sslMode is require"
    );

    let full = ProbeTarget {
        ssl_mode: SslMode::VerifyFull,
        ca_pem: Some(unrelated_ca_pem().into_bytes()),
        ..require.clone()
    };
    let report = prober.probe("ns/a", &full).await;
    assert_eq!(report.stage, ProbeStage::Tls, "{report:?}");
    assert_eq!(
        report.message,
        "server does not support TLS but sslMode is verify-full"
    );

    let disable = ProbeTarget {
        ssl_mode: SslMode::Disable,
        ..require
    };
    let report = prober.probe("ns/a", &disable).await;
    assert_eq!(report.outcome, ProbeOutcome::Success, "{report:?}");
    assert!(!stages(&report).contains(&ProbeStage::Tls));
}

/// Whether the session of `application_name` is encrypted, from the server's point of view.
async fn uses_ssl(su: &Client, application_name: &str) -> bool {
    su.query_one(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = $1",
        &[&application_name],
    )
    .await
    .expect("pg_stat_ssl")
    .get(0)
}

#[tokio::test]
async fn tls_server_passes_require_and_verify_full_and_rejects_a_foreign_ca() {
    let pg = PgServer::options().tls().start().await;
    let su = pg.superuser().await;
    let ca = pg.ca_pem().expect("ca").as_bytes().to_vec();
    let (prober, _lost) = Prober::new(ProberConfig::default());

    for (i, (mode, host)) in [
        (SslMode::Prefer, "127.0.0.1"),
        (SslMode::Require, "127.0.0.1"),
        (SslMode::VerifyCa, "127.0.0.1"),
        (SslMode::VerifyFull, "127.0.0.1"),
        (SslMode::VerifyFull, "localhost"),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("probe-tls-{i}");
        let t = ProbeTarget {
            host: host.into(),
            ssl_mode: mode,
            ca_pem: Some(ca.clone()),
            ..target(pg.port(), &name)
        };
        let report = prober.probe(&format!("ns/{i}"), &t).await;
        assert_eq!(
            report.outcome,
            ProbeOutcome::Success,
            "{mode:?} {host}: {report:?}"
        );
        assert!(stages(&report).contains(&ProbeStage::Tls));
        assert!(
            uses_ssl(&su, &name).await,
            "{mode:?}: session not encrypted"
        );
    }

    for mode in [SslMode::VerifyFull, SslMode::VerifyCa] {
        let t = ProbeTarget {
            ssl_mode: mode,
            ca_pem: Some(unrelated_ca_pem().into_bytes()),
            ..target(pg.port(), "probe-tls-foreign")
        };
        let report = prober.probe("ns/foreign", &t).await;
        assert_eq!(report.outcome, ProbeOutcome::ConfigFailure, "{report:?}");
        assert_eq!(report.stage, ProbeStage::Tls);
        assert!(
            report.message.contains("certificate") && report.message.contains("rejected"),
            "{}",
            report.message
        );
    }
}

#[tokio::test]
async fn verify_ca_ignores_the_host_name_and_verify_full_does_not() {
    let pg = PgServer::options()
        .tls_names(&["db.example.internal"])
        .start()
        .await;
    let ca = pg.ca_pem().expect("ca").as_bytes().to_vec();
    let (prober, _lost) = Prober::new(ProberConfig::default());
    let verify_ca = ProbeTarget {
        ssl_mode: SslMode::VerifyCa,
        ca_pem: Some(ca),
        ..target(pg.port(), "probe-verify-ca")
    };
    let report = prober.probe("ns/a", &verify_ca).await;
    assert_eq!(report.outcome, ProbeOutcome::Success, "{report:?}");

    let verify_full = ProbeTarget {
        ssl_mode: SslMode::VerifyFull,
        ..verify_ca
    };
    let report = prober.probe("ns/a", &verify_full).await;
    assert_eq!(report.outcome, ProbeOutcome::ConfigFailure, "{report:?}");
    assert_eq!(report.stage, ProbeStage::Tls);
    assert!(report.message.contains("rejected"), "{}", report.message);
}

#[tokio::test]
async fn terminated_backend_is_reported_within_100ms() {
    let pg = PgServer::start().await;
    let su = pg.superuser().await;
    let (prober, mut lost) = Prober::new(ProberConfig::default());
    let t = target(pg.port(), "probe-terminate");
    assert!(prober.probe("ns/a", &t).await.is_success());
    assert!(prober.probe("ns/b", &t).await.is_success());
    let pids = backends(&su, "probe-terminate").await;
    assert_eq!(pids.len(), 1);

    let killed_at = Instant::now();
    su.execute("SELECT pg_terminate_backend($1)", &[&pids[0]])
        .await
        .expect("terminate");
    let (event, at) = next_loss(&mut lost).await;
    let delay = at - killed_at;
    println!("pg_terminate_backend -> ConnectionLost: {delay:?}");
    assert!(delay < LOSS_BOUND, "took {delay:?}");
    assert_eq!(event.owners, ["ns/a", "ns/b"]);
    assert!(event.reason.contains("57P01"), "{}", event.reason);
    assert_eq!(prober.open_connections(), 0);

    let report = prober.probe("ns/a", &t).await;
    assert_eq!(report.outcome, ProbeOutcome::Success, "{report:?}");
    assert!(report.fresh_connection);
}

#[tokio::test]
async fn server_stop_restart_and_crash_are_reported_within_100ms() {
    let mut pg = PgServer::start().await;
    let (prober, mut lost) = Prober::new(ProberConfig::default());
    let t = target(pg.port(), "probe-restart");

    // Fast stop (the first half of a restart), immediate stop, SIGKILL of the postmaster.
    for how in ["fast", "immediate", "kill"] {
        let report = prober.probe("ns/a", &t).await;
        assert_eq!(report.outcome, ProbeOutcome::Success, "{how}: {report:?}");
        assert_eq!(prober.open_connections(), 1);
        let stopped_at = Instant::now();
        let ((event, at), ()) = tokio::join!(next_loss(&mut lost), async {
            match how {
                "fast" => pg.stop().await,
                "immediate" => pg.stop_immediate().await,
                _ => pg.kill().await,
            }
        });
        let delay = at - stopped_at;
        println!("{how} stop -> ConnectionLost: {delay:?} ({})", event.reason);
        assert!(delay < LOSS_BOUND, "{how}: took {delay:?}");
        assert_eq!(event.owners, ["ns/a"]);
        assert_eq!(prober.open_connections(), 0);
        pg.start().await;
    }
    let report = prober.probe("ns/a", &t).await;
    assert_eq!(report.outcome, ProbeOutcome::Success, "{report:?}");
    assert!(report.fresh_connection);
}

#[tokio::test]
async fn network_reset_is_reported_and_a_probe_reconnects() {
    let pg = PgServer::start().await;
    let proxy = FaultProxy::start(pg.addr()).await;
    let (prober, mut lost) = Prober::new(ProberConfig::default());
    let t = target(proxy.port(), "probe-reset");
    assert!(prober.probe("ns/a", &t).await.is_success());

    let cut_at = Instant::now();
    let ((event, at), ()) = tokio::join!(next_loss(&mut lost), proxy.cut_all());
    let delay = at - cut_at;
    println!(
        "proxy reset -> ConnectionLost: {delay:?} ({})",
        event.reason
    );
    assert!(delay < LOSS_BOUND, "took {delay:?}");
    assert!(event.reason.contains("reset"), "{}", event.reason);

    // While the network is partitioned, a probe fails within its budget...
    proxy.set_mode(Mode::Refuse).await;
    let report = prober.probe("ns/a", &t).await;
    assert_eq!(report.outcome, ProbeOutcome::TransientFailure, "{report:?}");
    assert_eq!(report.stage, ProbeStage::Connect);
    assert!(
        report.message.starts_with("connection refused"),
        "{}",
        report.message
    );
    // ...and the next one after it heals reconnects.
    proxy.set_mode(Mode::Pass).await;
    let report = prober.probe("ns/a", &t).await;
    assert_eq!(report.outcome, ProbeOutcome::Success, "{report:?}");
    assert!(report.fresh_connection);
}

#[tokio::test]
async fn a_connection_black_holed_mid_life_fails_the_probe_within_budget() {
    let pg = PgServer::start().await;
    let proxy = FaultProxy::start(pg.addr()).await;
    let (prober, _lost) = Prober::new(ProberConfig::default());
    let t = ProbeTarget {
        timeout: Duration::from_secs(1),
        ..target(proxy.port(), "probe-partition")
    };
    assert!(prober.probe("ns/a", &t).await.is_success());
    proxy.set_mode(Mode::BlackHole).await;
    let started = Instant::now();
    let report = prober.probe("ns/a", &t).await;
    let took = started.elapsed();
    assert_eq!(report.outcome, ProbeOutcome::TransientFailure, "{report:?}");
    assert!(!report.fresh_connection, "failed on the open connection");
    assert_eq!(report.stage, ProbeStage::Query);
    assert!(took <= t.timeout + Duration::from_millis(200), "{took:?}");
    // The stuck connection was dropped: the next probe connects anew.
    assert_eq!(prober.open_connections(), 0);
    proxy.set_mode(Mode::Pass).await;
    let report = prober.probe("ns/a", &t).await;
    assert_eq!(report.outcome, ProbeOutcome::Success, "{report:?}");
    assert!(report.fresh_connection);
}

#[tokio::test]
async fn periodic_reconnect_catches_a_changed_password() {
    let pg = PgServer::start().await;
    let reconnect_every = Duration::from_millis(300);
    let (prober, _lost) = Prober::new(ProberConfig { reconnect_every });
    let t = target(pg.port(), "probe-rotate");
    assert!(prober.probe("ns/a", &t).await.fresh_connection);

    pg.execute("ALTER ROLE app PASSWORD 'rotated-password-2'")
        .await;
    // The open connection does not notice...
    let report = prober.probe("ns/a", &t).await;
    assert_eq!(report.outcome, ProbeOutcome::Success);
    assert!(!report.fresh_connection);
    // ...a periodic reconnect does.
    let report = wait_for("the reconnect to fail", Duration::from_secs(5), || {
        let prober = &prober;
        let t = &t;
        async move {
            let r = prober.probe("ns/a", t).await;
            (r.outcome != ProbeOutcome::Success).then_some(r)
        }
    })
    .await;
    assert_eq!(report.outcome, ProbeOutcome::ConfigFailure, "{report:?}");
    assert_eq!(report.sql_state.as_deref(), Some("28P01"));
    assert!(report.fresh_connection);
    // It keeps failing, rather than falling back to the old connection.
    let again = prober.probe("ns/a", &t).await;
    assert_eq!(again.sql_state.as_deref(), Some("28P01"), "{again:?}");

    // The new password is a new key: a new connection, and the old one is closed.
    let rotated = ProbeTarget {
        password: Some(Password::new("rotated-password-2".into())),
        ..t.clone()
    };
    let report = prober.probe("ns/a", &rotated).await;
    assert_eq!(report.outcome, ProbeOutcome::Success, "{report:?}");
    assert!(report.fresh_connection);
    assert_eq!(prober.open_connections(), 1);
    let su = pg.superuser().await;
    wait_until("the old session to close", Duration::from_secs(5), || {
        let su = &su;
        async move { backends(su, "probe-rotate").await.len() == 1 }
    })
    .await;
}

#[tokio::test]
async fn an_owner_whose_target_changed_moves_to_the_new_connection() {
    let pg = PgServer::start().await;
    let su = pg.superuser().await;
    let (prober, mut lost) = Prober::new(ProberConfig::default());
    assert!(
        prober
            .probe("ns/a", &target(pg.port(), "probe-move-1"))
            .await
            .is_success()
    );
    assert!(
        prober
            .probe("ns/a", &target(pg.port(), "probe-move-2"))
            .await
            .is_success()
    );
    assert_eq!(prober.open_connections(), 1);
    wait_until("the first session to close", Duration::from_secs(5), || {
        let su = &su;
        async move { backends(su, "probe-move-1").await.is_empty() }
    })
    .await;
    assert_eq!(backends(&su, "probe-move-2").await.len(), 1);
    assert!(lost.try_recv().is_err(), "moving is not a loss");
}

#[tokio::test]
async fn passwords_never_show() {
    let mut pg = PgServer::start().await;
    let (prober, mut lost) = Prober::new(ProberConfig::default());
    let good = target(pg.port(), "probe-secret");
    let wrong_secret = "Very-Distinct-Wrong-Secret-42";
    let wrong = ProbeTarget {
        password: Some(Password::new(wrong_secret.into())),
        ..good.clone()
    };
    assert_eq!(
        format!("{:?}", Password::new(APP_PASSWORD.into())),
        "<redacted>"
    );

    let mut reports = vec![
        prober.probe("ns/good", &good).await,
        prober.probe("ns/wrong", &wrong).await,
    ];
    pg.stop().await;
    let (event, _) = next_loss(&mut lost).await;
    reports.push(prober.probe("ns/good", &good).await);
    reports.push(prober.probe("ns/wrong", &wrong).await);

    for secret in [APP_PASSWORD, wrong_secret] {
        for t in [&good, &wrong] {
            let debug = format!("{t:?}");
            assert!(!debug.contains(secret), "{debug}");
            assert!(debug.contains("<redacted>"), "{debug}");
        }
        for report in &reports {
            let debug = format!("{report:?}");
            assert!(!debug.contains(secret), "{debug}");
        }
        assert!(!format!("{event:?}").contains(secret));
        assert!(!format!("{prober:?}").contains(secret));
    }
}

#[tokio::test]
async fn measure_connect_versus_reuse() {
    let pg = PgServer::start().await;
    let t = ProbeTarget {
        ssl_mode: SslMode::Disable,
        ..target(pg.port(), "probe-measure")
    };
    let rounds = 20u32;

    let (fresh_prober, _l1) = Prober::new(ProberConfig {
        reconnect_every: Duration::ZERO,
    });
    let mut fresh = Vec::new();
    for _ in 0..rounds {
        let report = fresh_prober.probe("ns/m", &t).await;
        assert!(report.is_success() && report.fresh_connection, "{report:?}");
        fresh.push(report);
    }
    drop(fresh_prober);

    let (reuse_prober, _l2) = Prober::new(ProberConfig::default());
    assert!(reuse_prober.probe("ns/m", &t).await.is_success());
    let mut reused = Vec::new();
    for _ in 0..rounds * 10 {
        let report = reuse_prober.probe("ns/m", &t).await;
        assert!(
            report.is_success() && !report.fresh_connection,
            "{report:?}"
        );
        reused.push(report);
    }

    println!(
        "fresh probe (sslMode disable, scram-sha-256): {}",
        summary(&fresh)
    );
    println!("probe on the open connection: {}", summary(&reused));
    let mean = |reports: &[ProbeReport]| {
        reports.iter().map(|r| r.latency).sum::<Duration>() / reports.len() as u32
    };
    assert!(mean(&reused) < mean(&fresh));
}

/// "total 7.1ms; Resolve 20µs, Connect 90µs, ..." as means over `reports`.
fn summary(reports: &[ProbeReport]) -> String {
    let n = reports.len() as u32;
    let total = reports.iter().map(|r| r.latency).sum::<Duration>() / n;
    let mut text = format!("mean of {n}: total {total:?}");
    for (stage, _) in &reports[0].stage_latencies {
        let sum: Duration = reports.iter().map(|r| stage_time(r, *stage)).sum();
        text.push_str(&format!(", {stage:?} {:?}", sum / n));
    }
    text
}

fn stage_time(report: &ProbeReport, stage: ProbeStage) -> Duration {
    report
        .stage_latencies
        .iter()
        .filter(|(s, _)| *s == stage)
        .map(|(_, d)| *d)
        .sum()
}
