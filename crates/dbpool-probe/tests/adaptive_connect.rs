//! The client's connect path against a black hole (issue 28): `open_session_within` with the
//! limits of an [`AdaptiveTimeouts`] that learns from every attempt, exactly as dbpool-client's
//! pool connects (`pool/conn.rs`), against a real PostgreSQL 15 behind the fault proxy. After
//! a few fast connects, every connect into the black hole fails within 1 s: the login's
//! learned timeout backs off 250 ms, 500 ms, then stays at the 750 ms cap (3 × its un-backed-off
//! value), where RFC 6298's unbounded doubling went on to 1 s, 2 s, 4 s. The figures are
//! printed (`--nocapture`).

use std::time::Duration;

use dbpool_probe::{
    AdaptiveTimeouts, Password, ProbeStage, ProbeTarget, SslMode, TargetSessionAttrs,
    open_session_within,
};
use dbpool_testkit::{
    postgres::{APP_DB, APP_PASSWORD, APP_USER, PgServer},
    proxy::{FaultProxy, Mode},
};
use tokio::time::Instant;

fn target(port: u16) -> ProbeTarget {
    ProbeTarget {
        host: "127.0.0.1".into(),
        port,
        dbname: APP_DB.into(),
        user: APP_USER.into(),
        password: Some(Password::new(APP_PASSWORD.into())),
        ssl_mode: SslMode::Disable,
        ca_pem: None,
        target_session_attrs: TargetSessionAttrs::ReadWrite,
        application_name: "adaptive-connect".into(),
        pool_max_size: 10,
        allow_md5: false,
        // The default healthCheck.timeout: the ceiling.
        timeout: Duration::from_secs(5),
    }
}

#[tokio::test]
async fn every_connect_into_a_black_hole_fails_within_a_second() {
    let pg = PgServer::start().await;
    let proxy = FaultProxy::start(pg.addr()).await;
    let target = target(proxy.port());
    let mut learned = AdaptiveTimeouts::new();
    for _ in 0..5 {
        let limits = learned.timeouts(target.timeout);
        let (result, stages) = open_session_within(&target, limits).await;
        if let Err(e) = &result {
            panic!("a connect through the proxy failed: {}", e.message);
        }
        learned.learn_stages(&stages, None, false);
    }
    let auth = learned.timeouts(target.timeout).get(ProbeStage::Auth);
    println!("learned login timeout after 5 fast connects: {auth:?}");

    proxy.set_mode(Mode::BlackHole).await;
    let mut attempts = Vec::new();
    for _ in 0..6 {
        let limits = learned.timeouts(target.timeout);
        let start = Instant::now();
        let (result, stages) = open_session_within(&target, limits).await;
        let took = start.elapsed();
        let Err(e) = result else {
            panic!("a connect into the black hole succeeded");
        };
        let timed_out = e.message.contains("timed out");
        learned.learn_stages(&stages, Some(e.stage), timed_out);
        attempts.push((took, limits.get(ProbeStage::Auth), e.message));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "client connects into a black hole (load {}): {:#?}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        attempts
            .iter()
            .map(|(took, limit, _)| format!("{}ms (login limit {limit:?})", took.as_millis()))
            .collect::<Vec<_>>()
    );
    for (took, _, message) in &attempts {
        assert!(message.contains("adaptive timeout"), "{message}");
        assert!(*took <= Duration::from_secs(1), "{took:?}: {message}");
    }
    // The backoff reached its cap and stayed there.
    let limits: Vec<_> = attempts.iter().map(|(_, limit, _)| *limit).collect();
    assert_eq!(
        limits.last(),
        Some(&Some(Duration::from_millis(750))),
        "{limits:?}"
    );
}
