//! The probe against fake, hostile servers on loopback (`dbpool_testkit::hostile`): unsafe
//! authentication requests are refused before the client answers them, so the password and
//! anything derived from it never reach the server; oversized, dripping and endless servers cost
//! bounded memory and time.

use std::time::Duration;

use dbpool_probe::{
    MAX_SERVER_MESSAGE, Password, ProbeOutcome, ProbeReport, ProbeStage, ProbeTarget, Prober,
    ProberConfig, SslMode, TargetSessionAttrs,
};
use dbpool_testkit::hostile::{Behaviour, FakeServer, MD5_SALT, Received};
use tokio::time::Instant;

const USER: &str = "app";
const PASSWORD: &str = "hostile-test-password-9f3";

fn target(port: u16, timeout: Duration) -> ProbeTarget {
    ProbeTarget {
        host: "127.0.0.1".into(),
        port,
        dbname: "app".into(),
        user: USER.into(),
        password: Some(Password::new(PASSWORD.into())),
        allow_md5: false,
        ssl_mode: SslMode::Prefer,
        ca_pem: None,
        target_session_attrs: TargetSessionAttrs::ReadWrite,
        application_name: "hostile".into(),
        pool_max_size: 1,
        timeout,
    }
}

async fn probe(t: &ProbeTarget) -> (ProbeReport, Duration) {
    let (prober, _lost) = Prober::new(ProberConfig::default());
    let started = Instant::now();
    let report = prober.probe("ns/hostile", t).await;
    (report, started.elapsed())
}

/// Every form of the password a client could send: itself, the MD5 inner hash and the MD5 answer.
fn derived_forms() -> Vec<Vec<u8>> {
    let inner = postgres_protocol::password::md5(PASSWORD.as_bytes(), USER);
    let answer =
        postgres_protocol::authentication::md5_hash(USER.as_bytes(), PASSWORD.as_bytes(), MD5_SALT);
    vec![
        PASSWORD.as_bytes().to_vec(),
        inner.as_bytes().to_vec(),
        inner.trim_start_matches("md5").as_bytes().to_vec(),
        answer.as_bytes().to_vec(),
        answer.trim_start_matches("md5").as_bytes().to_vec(),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Asserts that nothing in `received` is or contains the password or a hash of it.
fn assert_nothing_derived(received: &[Received]) {
    for message in received {
        for form in derived_forms() {
            assert!(
                !contains(&message.body, &form),
                "the server received a password-derived value in a {:?} message",
                message.tag as char
            );
        }
    }
}

fn password_messages(received: &[Received]) -> usize {
    received.iter().filter(|m| m.tag == b'p').count()
}

#[tokio::test]
async fn cleartext_request_is_refused_without_sending_the_password() {
    let server = FakeServer::start(Behaviour::Cleartext).await;
    let (report, _) = probe(&target(server.port(), Duration::from_secs(5))).await;
    assert_eq!(report.outcome, ProbeOutcome::ConfigFailure, "{report:?}");
    assert_eq!(report.stage, ProbeStage::Auth);
    assert!(report.message.contains("clear text"), "{}", report.message);
    assert!(report.message.contains("verify-full"), "{}", report.message);
    let received = server.received_after(1).await;
    assert_eq!(password_messages(&received), 0, "{received:?}");
    assert_nothing_derived(&received);
}

#[tokio::test]
async fn md5_request_is_refused_unless_allowed() {
    let server = FakeServer::start(Behaviour::Md5).await;
    let (report, _) = probe(&target(server.port(), Duration::from_secs(5))).await;
    assert_eq!(report.outcome, ProbeOutcome::ConfigFailure, "{report:?}");
    assert_eq!(report.stage, ProbeStage::Auth);
    assert!(report.message.contains("MD5"), "{}", report.message);
    assert!(report.message.contains("allowMd5"), "{}", report.message);
    let received = server.received_after(1).await;
    assert_eq!(password_messages(&received), 0, "{received:?}");
    assert_nothing_derived(&received);

    // The control: with allowMd5 the same server does receive the MD5 answer, so the recording
    // above would have seen it.
    let allowed = ProbeTarget {
        allow_md5: true,
        ..target(server.port(), Duration::from_millis(500))
    };
    let (report, _) = probe(&allowed).await;
    assert_ne!(report.outcome, ProbeOutcome::Success);
    let received = server.received_after(2).await;
    assert_eq!(password_messages(&received), 1, "{received:?}");
    let answer =
        postgres_protocol::authentication::md5_hash(USER.as_bytes(), PASSWORD.as_bytes(), MD5_SALT);
    assert!(
        received
            .iter()
            .any(|m| contains(&m.body, answer.as_bytes()))
    );
}

#[tokio::test]
async fn scram_with_one_iteration_is_refused_before_the_proof() {
    let server = FakeServer::start(Behaviour::Scram { iterations: 1 }).await;
    let (report, _) = probe(&target(server.port(), Duration::from_secs(5))).await;
    assert_eq!(report.outcome, ProbeOutcome::ConfigFailure, "{report:?}");
    assert_eq!(report.stage, ProbeStage::Auth);
    assert!(
        report.message.contains("only 1 iterations"),
        "{}",
        report.message
    );
    let received = server.received_after(1).await;
    // The SASLInitialResponse (mechanism and client nonce) only; no SASLResponse with a proof.
    assert_eq!(password_messages(&received), 1, "{received:?}");
    assert!(!received.iter().any(|m| contains(&m.body, b",p=")));
    assert_nothing_derived(&received);

    // The control: 4096 iterations are accepted and the client does send its proof.
    let server = FakeServer::start(Behaviour::Scram { iterations: 4096 }).await;
    let (report, _) = probe(&target(server.port(), Duration::from_millis(1500))).await;
    assert_ne!(report.outcome, ProbeOutcome::Success);
    let received = server.received_after(1).await;
    assert_eq!(password_messages(&received), 2, "{received:?}");
    assert!(received.iter().any(|m| contains(&m.body, b",p=")));
}

#[tokio::test]
async fn hang_after_accept_ends_within_the_timeout() {
    let server = FakeServer::start(Behaviour::HangAfterAccept).await;
    let budget = Duration::from_secs(1);
    let (report, took) = probe(&target(server.port(), budget)).await;
    assert_eq!(report.outcome, ProbeOutcome::TransientFailure, "{report:?}");
    assert!(report.message.contains("timed out"), "{}", report.message);
    assert!(took < budget + Duration::from_millis(300), "{took:?}");
}

#[tokio::test]
async fn oversized_message_is_refused_at_its_header() {
    let server = FakeServer::start(Behaviour::Oversized).await;
    let budget = Duration::from_secs(5);
    let (report, took) = probe(&target(server.port(), budget)).await;
    assert_eq!(report.outcome, ProbeOutcome::TransientFailure, "{report:?}");
    assert_eq!(report.stage, ProbeStage::Auth);
    assert!(
        report
            .message
            .contains(&format!("at most {MAX_SERVER_MESSAGE} bytes")),
        "{}",
        report.message
    );
    // Refused at the header, not after reading a gigabyte: fast, and the server could write
    // no more than the socket buffers hold.
    assert!(took < Duration::from_secs(1), "{took:?}");
    let _ = server.received_after(1).await;
    assert!(
        server.bytes_sent() < 32 * 1024 * 1024,
        "{}",
        server.bytes_sent()
    );
}

#[tokio::test]
async fn slow_drip_ends_within_the_timeout() {
    let server = FakeServer::start(Behaviour::SlowDrip {
        every: Duration::from_millis(20),
    })
    .await;
    let budget = Duration::from_secs(1);
    let (report, took) = probe(&target(server.port(), budget)).await;
    assert_eq!(report.outcome, ProbeOutcome::TransientFailure, "{report:?}");
    assert_eq!(report.stage, ProbeStage::Auth);
    assert!(report.message.contains("timed out"), "{}", report.message);
    assert!(took < budget + Duration::from_millis(300), "{took:?}");
}

#[tokio::test]
async fn endless_startup_is_cut_at_the_startup_limit() {
    let server = FakeServer::start(Behaviour::EndlessStartup).await;
    let (report, took) = probe(&target(server.port(), Duration::from_secs(5))).await;
    assert_eq!(report.outcome, ProbeOutcome::TransientFailure, "{report:?}");
    assert!(
        report.message.contains("without finishing the startup"),
        "{}",
        report.message
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    let _ = server.received_after(1).await;
    assert!(
        server.bytes_sent() < 32 * 1024 * 1024,
        "{}",
        server.bytes_sent()
    );
}
