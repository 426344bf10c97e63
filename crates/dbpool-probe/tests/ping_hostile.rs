//! The readiness ping against fake, hostile servers on loopback (`dbpool_testkit::hostile`):
//! garbage, a 1 GiB length prefix, an endless trickle and silence are each classified within the
//! ping's time bound and without reading more than one small message; a server that would take a
//! cleartext password never receives one (the ping has none to send).

use std::time::Duration;

use dbpool_probe::{MAX_PING_TIME, PingReport, PingTarget, Readiness, SslMode, ping};
use dbpool_testkit::hostile::{Behaviour, FakeServer, Received};
use tokio::time::Instant;

/// Slack over the ping's budget for a loaded machine (the close is bounded by the same deadline).
const SLACK: Duration = Duration::from_millis(300);

fn target(port: u16, ssl_mode: SslMode, timeout: Duration) -> PingTarget {
    PingTarget {
        host: "127.0.0.1".into(),
        port,
        dbname: "app".into(),
        user: "app".into(),
        ssl_mode,
        ca_pem: None,
        timeout,
    }
}

async fn timed(t: &PingTarget) -> (PingReport, Duration) {
    let started = Instant::now();
    let report = ping(t).await;
    (report, started.elapsed())
}

/// `received` holds `n` startup messages, each naming only user and database, and no typed
/// message at all.
fn assert_startups_only(received: &[Received], n: usize) {
    let startup: Vec<&Received> = received
        .iter()
        .filter(|m| m.tag == 0 && m.body.get(..4) == Some(&196_608u32.to_be_bytes()[..]))
        .collect();
    assert_eq!(startup.len(), n, "{received:?}");
    for message in startup {
        assert_eq!(&message.body[4..], b"user\0app\0database\0app\0\0");
    }
    assert!(
        received.iter().all(|m| m.tag == 0),
        "the ping sent a typed message: {received:?}"
    );
}

#[tokio::test]
async fn a_cleartext_server_receives_no_password() {
    let server = FakeServer::start(Behaviour::Cleartext).await;
    for (n, mode) in [SslMode::Disable, SslMode::Prefer].into_iter().enumerate() {
        let (report, took) = timed(&target(server.port(), mode, Duration::from_secs(5))).await;
        // It asked for authentication: the server accepts connections.
        assert_eq!(report.readiness, Readiness::Accepting, "{report:?}");
        assert!(took < MAX_PING_TIME + SLACK, "{took:?}");
        let received = server.received_after(n + 1).await;
        assert_eq!(received.iter().filter(|m| m.tag == b'p').count(), 0);
    }
    let received = server.received_after(2).await;
    // Disable: the startup only. Prefer: an SSLRequest (declined), then the startup.
    assert_startups_only(&received, 2);
}

#[tokio::test]
async fn garbage_is_not_postgres() {
    let server = FakeServer::start(Behaviour::Garbage).await;
    let (report, took) = timed(&target(
        server.port(),
        SslMode::Disable,
        Duration::from_secs(5),
    ))
    .await;
    assert_eq!(report.readiness, Readiness::NotPostgres, "{report:?}");
    assert!(report.message.contains("0x48"), "{}", report.message);
    assert!(took < MAX_PING_TIME, "{took:?}");
}

#[tokio::test]
async fn a_gigabyte_length_prefix_is_refused_at_its_header() {
    let server = FakeServer::start(Behaviour::Oversized).await;
    let (report, took) = timed(&target(
        server.port(),
        SslMode::Prefer,
        Duration::from_secs(5),
    ))
    .await;
    assert_eq!(report.readiness, Readiness::NotPostgres, "{report:?}");
    assert!(
        report.message.contains("1073741824-byte"),
        "{}",
        report.message
    );
    assert!(report.latency < Duration::from_millis(500), "{report:?}");
    assert!(took < MAX_PING_TIME + SLACK, "{took:?}");
    let _ = server.received_after(1).await;
    // The ping read the header and at most its drain limit: the server could write no more than
    // the socket buffers hold.
    assert!(
        server.bytes_sent() < 32 * 1024 * 1024,
        "{}",
        server.bytes_sent()
    );
}

#[tokio::test]
async fn an_endless_trickle_ends_at_the_time_bound() {
    let server = FakeServer::start(Behaviour::Trickle {
        every: Duration::from_millis(10),
    })
    .await;
    // The health-check timeout is 5 s, the ping's bound is 1 s.
    let (report, took) = timed(&target(
        server.port(),
        SslMode::Disable,
        Duration::from_secs(5),
    ))
    .await;
    assert_eq!(report.readiness, Readiness::Unreachable, "{report:?}");
    assert!(report.message.contains("timed out"), "{}", report.message);
    assert!(
        took >= MAX_PING_TIME - Duration::from_millis(50),
        "{took:?}"
    );
    assert!(took < MAX_PING_TIME + SLACK, "{took:?}");
    let _ = server.received_after(1).await;
    assert!(server.bytes_sent() < 1024, "{}", server.bytes_sent());
}

#[tokio::test]
async fn silence_ends_at_the_health_check_timeout_when_shorter() {
    let server = FakeServer::start(Behaviour::HangAfterAccept).await;
    for mode in [SslMode::Disable, SslMode::Require] {
        let budget = Duration::from_millis(300);
        let (report, took) = timed(&target(server.port(), mode, budget)).await;
        assert_eq!(report.readiness, Readiness::Unreachable, "{report:?}");
        assert!(report.message.contains("timed out"), "{}", report.message);
        assert!(took < budget + SLACK, "{mode:?}: {took:?}");
    }
}

#[tokio::test]
async fn nothing_listening_is_unreachable_at_once() {
    let port = dbpool_testkit::ports::free_port();
    let (report, took) = timed(&target(port, SslMode::Require, Duration::from_secs(5))).await;
    assert_eq!(report.readiness, Readiness::Unreachable, "{report:?}");
    assert!(report.message.contains("refused"), "{}", report.message);
    assert!(took < Duration::from_millis(200), "{took:?}");
}
