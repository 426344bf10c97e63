//! The readiness ping against real PostgreSQL 15 servers: each answer it classifies, and what a
//! ping costs the server's log with `log_connections` on, under sslMode disable, require and
//! verify-full. While the server accepts, a ping adds only "connection received"; while it
//! answers 57P03 or 28000, exactly one FATAL line per ping; never 28P01 (no password is ever
//! sent), "could not receive data from client" (the ping closes with FIN, never a reset) or an SSL
//! EOF error (TLS is closed with close_notify).

use std::time::Duration;

use dbpool_probe::{PingReport, PingTarget, Readiness, SslMode, ping};
use dbpool_testkit::{
    postgres::{APP_DB, APP_USER, PgServer, unrelated_ca_pem},
    wait::{wait_for, wait_until},
};

/// A role pg_hba.conf rejects (28000) before any authentication.
const BLOCKED: &str = "blocked";

/// Pings per mode and case.
const PINGS: usize = 3;

/// What must never appear in the log because of a ping.
const FORBIDDEN: [&str; 6] = [
    "28P01",
    "password authentication failed",
    "could not receive data from client",
    "EOF detected",
    "unexpected eof",
    "incomplete startup packet",
];

fn target(pg: &PgServer, user: &str, ssl_mode: SslMode) -> PingTarget {
    PingTarget {
        host: "127.0.0.1".into(),
        port: pg.port(),
        dbname: APP_DB.into(),
        user: user.into(),
        ssl_mode,
        ca_pem: pg.ca_pem().map(|ca| ca.as_bytes().to_vec()),
        timeout: Duration::from_secs(5),
    }
}

/// The length of the server log now: what is logged later starts there.
fn mark(pg: &PgServer) -> usize {
    std::fs::read(pg.log_path()).map_or(0, |log| log.len())
}

/// The log's lines since `from`.
fn lines_since(pg: &PgServer, from: usize) -> Vec<String> {
    let log = std::fs::read(pg.log_path()).unwrap_or_default();
    String::from_utf8_lossy(log.get(from..).unwrap_or_default())
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Pings `PINGS` times, expecting `readiness` each time, and returns the reports.
async fn ping_n(t: &PingTarget, readiness: Readiness) -> Vec<PingReport> {
    let mut reports = Vec::new();
    for _ in 0..PINGS {
        let report = ping(t).await;
        assert_eq!(report.readiness, readiness, "{:?}: {report:?}", t.ssl_mode);
        assert!(report.latency < Duration::from_secs(1), "{report:?}");
        reports.push(report);
    }
    reports
}

/// Waits until the log since `from` has `PINGS` "connection received" lines and `fatal` FATAL
/// lines containing `fatal_text`, then checks that nothing else was logged.
async fn assert_logged(pg: &PgServer, from: usize, fatal: usize, fatal_text: &str, case: &str) {
    let count = |lines: &[String], what: &str| lines.iter().filter(|l| l.contains(what)).count();
    let lines = wait_for(
        &format!("the log lines of {case}"),
        Duration::from_secs(5),
        || {
            let lines = lines_since(pg, from);
            let done =
                count(&lines, "connection received") >= PINGS && count(&lines, "FATAL:") >= fatal;
            async move { done.then_some(lines) }
        },
    )
    .await;
    assert_eq!(
        count(&lines, "connection received"),
        PINGS,
        "{case}: {lines:#?}"
    );
    assert_eq!(count(&lines, "FATAL:"), fatal, "{case}: {lines:#?}");
    assert_eq!(count(&lines, fatal_text), fatal, "{case}: {lines:#?}");
    for line in &lines {
        assert!(
            line.contains("connection received") || line.contains("FATAL:"),
            "{case}: a ping logged more than it should: {line}\n{lines:#?}"
        );
        for bad in FORBIDDEN {
            assert!(!line.contains(bad), "{case}: {line}");
        }
    }
}

/// Sends the ping's StartupMessage in plain text, reads the authentication request, then resets
/// the connection (SO_LINGER 0) instead of closing it.
async fn reset_after_the_request(pg: &PgServer) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(pg.addr())
        .await
        .expect("connect");
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0app\0database\0app\0\0");
    let mut startup = u32::try_from(body.len() + 4)
        .unwrap_or(0)
        .to_be_bytes()
        .to_vec();
    startup.extend_from_slice(&body);
    stream.write_all(&startup).await.expect("startup");
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await.expect("answer");
    assert_eq!(header[0], b'R');
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut rest = vec![0u8; len - 4];
    stream.read_exact(&mut rest).await.expect("answer body");
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
    drop(stream);
}

#[tokio::test]
async fn pings_cost_the_log_one_line_while_accepting_and_one_fatal_while_refusing() {
    let mut pg = PgServer::options()
        .tls()
        .conf("log_connections = on")
        .hba_first(&format!("host all {BLOCKED} 127.0.0.1/32 reject"))
        .start()
        .await;
    let modes = [SslMode::Disable, SslMode::Require, SslMode::VerifyFull];

    for mode in modes {
        let from = mark(&pg);
        ping_n(&target(&pg, APP_USER, mode), Readiness::Accepting).await;
        assert_logged(&pg, from, 0, "FATAL:", &format!("accepting, {mode:?}")).await;

        let from = mark(&pg);
        for report in ping_n(&target(&pg, BLOCKED, mode), Readiness::ConfigAnswer).await {
            assert_eq!(report.sql_state.as_deref(), Some("28000"), "{report:?}");
        }
        let case = format!("28000, {mode:?}");
        assert_logged(&pg, from, PINGS, "pg_hba.conf rejects connection", &case).await;
    }

    // The control: a client that resets the connection where the ping closes it is logged, so
    // the checks above would have seen it.
    let from = mark(&pg);
    reset_after_the_request(&pg).await;
    wait_until("the reset is logged", Duration::from_secs(5), || {
        let logged = lines_since(&pg, from)
            .iter()
            .any(|l| l.contains("could not receive data from client"));
        async move { logged }
    })
    .await;

    // A smart shutdown held by an open session: new connections get 57P03.
    let _session = pg.superuser().await;
    pg.begin_smart_shutdown().await;
    let probe = target(&pg, APP_USER, SslMode::Disable);
    wait_until("the server answers 57P03", Duration::from_secs(10), || {
        let probe = probe.clone();
        async move { ping(&probe).await.readiness == Readiness::StartingUp }
    })
    .await;
    for mode in modes {
        let from = mark(&pg);
        for report in ping_n(&target(&pg, APP_USER, mode), Readiness::StartingUp).await {
            assert_eq!(report.sql_state.as_deref(), Some("57P03"), "{report:?}");
        }
        let case = format!("57P03, {mode:?}");
        assert_logged(
            &pg,
            from,
            PINGS,
            "the database system is shutting down",
            &case,
        )
        .await;
    }
}

#[tokio::test]
async fn tls_answers_about_the_configuration_are_config_answers() {
    let tls = PgServer::options().tls().start().await;
    // A certificate from another CA is rejected before the StartupMessage.
    let foreign = PingTarget {
        ca_pem: Some(unrelated_ca_pem().into_bytes()),
        ..target(&tls, APP_USER, SslMode::VerifyFull)
    };
    let report = ping(&foreign).await;
    assert_eq!(report.readiness, Readiness::ConfigAnswer, "{report:?}");
    assert!(report.message.contains("certificate"), "{}", report.message);
    // The right CA but the wrong name under verify-full; verify-ca does not check the name.
    let wrong_name = PingTarget {
        host: "localhost".into(),
        ..target(&tls, APP_USER, SslMode::VerifyFull)
    };
    assert_eq!(ping(&wrong_name).await.readiness, Readiness::Accepting);
    let verify_ca = target(&tls, APP_USER, SslMode::VerifyCa);
    assert_eq!(ping(&verify_ca).await.readiness, Readiness::Accepting);
    // verify-full without a CA is a configuration answer without connecting anywhere useful.
    let no_ca = PingTarget {
        ca_pem: None,
        ..target(&tls, APP_USER, SslMode::VerifyFull)
    };
    assert_eq!(ping(&no_ca).await.readiness, Readiness::ConfigAnswer);

    // A server without TLS: 'N' is a configuration answer under require and verify-*, and
    // accepting under prefer and disable.
    let plain = PgServer::start().await;
    for mode in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
        let t = PingTarget {
            ca_pem: tls.ca_pem().map(|ca| ca.as_bytes().to_vec()),
            ..target(&plain, APP_USER, mode)
        };
        let report = ping(&t).await;
        assert_eq!(
            report.readiness,
            Readiness::ConfigAnswer,
            "{mode:?}: {report:?}"
        );
        assert!(
            report.message.contains("does not support TLS"),
            "{}",
            report.message
        );
    }
    for mode in [SslMode::Prefer, SslMode::Disable] {
        let report = ping(&target(&plain, APP_USER, mode)).await;
        assert_eq!(
            report.readiness,
            Readiness::Accepting,
            "{mode:?}: {report:?}"
        );
        assert_eq!(report.peer, Some(plain.addr()));
    }
}

#[tokio::test]
async fn a_stopped_server_is_unreachable_and_a_restarted_one_accepts() {
    let mut pg = PgServer::start().await;
    let t = target(&pg, APP_USER, SslMode::Prefer);
    assert_eq!(ping(&t).await.readiness, Readiness::Accepting);
    pg.stop().await;
    let report = ping(&t).await;
    assert_eq!(report.readiness, Readiness::Unreachable, "{report:?}");
    assert!(report.message.contains("refused"), "{}", report.message);
    pg.start().await;
    assert_eq!(ping(&t).await.readiness, Readiness::Accepting);
}

/// The cost of a ping on loopback (printed with `--nocapture`; docs/probe.md quotes it): the time
/// to the answer and the whole ping with its clean close, per sslMode, means of 30.
#[tokio::test]
async fn measure_ping_latency() {
    let pg = PgServer::options().tls().start().await;
    for mode in [SslMode::Disable, SslMode::Require, SslMode::VerifyFull] {
        let t = target(&pg, APP_USER, mode);
        let mut answer = Duration::ZERO;
        let started = tokio::time::Instant::now();
        for _ in 0..30 {
            let report = ping(&t).await;
            assert_eq!(report.readiness, Readiness::Accepting, "{report:?}");
            answer += report.latency;
        }
        let whole = started.elapsed() / 30;
        eprintln!(
            "ping {mode:?}: answer after {:?}, whole ping {whole:?}",
            answer / 30
        );
    }
}
