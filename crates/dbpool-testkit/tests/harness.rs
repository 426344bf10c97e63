//! The test harness itself, against real PostgreSQL 15: servers start, answer, stop, come back on
//! the same port, standbys are in recovery, and the fault proxy passes, refuses, black-holes and
//! cuts as it says.

use dbpool_testkit as support;

use std::time::Duration;

use support::{
    postgres::{APP_DB, APP_PASSWORD, APP_USER, PgServer},
    proxy::{FaultProxy, Mode},
    wait::wait_until,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[tokio::test]
async fn server_starts_answers_stops_and_restarts_on_the_same_port() {
    let mut pg = PgServer::start().await;
    let port = pg.port();
    assert_eq!(pg.query_text("SELECT 40 + 2").await.as_deref(), Some("42"));
    let version = pg.query_text("SHOW server_version").await.expect("version");
    assert!(version.starts_with("15"), "{version}");

    // The app role logs in with its password over TCP (scram-sha-256) and owns its database.
    let app = pg.app_client().await;
    let row = app
        .query_one("SELECT current_user::text, current_database()::text", &[])
        .await
        .expect("query");
    assert_eq!(row.get::<_, String>(0), APP_USER);
    assert_eq!(row.get::<_, String>(1), APP_DB);
    let wrong = pg.connect_as(APP_USER, "not-the-password", APP_DB).await;
    let code = wrong.expect_err("wrong password").code().cloned();
    assert_eq!(code.as_ref().map(|c| c.code()), Some("28P01"));
    assert!(pg.connect_as(APP_USER, APP_PASSWORD, APP_DB).await.is_ok());

    pg.stop().await;
    assert!(
        TcpStream::connect(pg.addr()).await.is_err(),
        "stopped server refuses"
    );
    pg.start().await;
    assert_eq!(pg.port(), port);
    assert_eq!(pg.query_text("SELECT 1").await.as_deref(), Some("1"));

    pg.stop_immediate().await;
    pg.start().await;
    assert_eq!(pg.query_text("SELECT 2").await.as_deref(), Some("2"));

    pg.kill().await;
    pg.start().await;
    assert_eq!(pg.port(), port);
    assert_eq!(pg.query_text("SELECT 3").await.as_deref(), Some("3"));
}

#[tokio::test]
async fn options_apply() {
    let pg = PgServer::options()
        .max_connections(7)
        .superuser_reserved_connections(2)
        .conf("application_name = 'from-conf'")
        .tls()
        .start()
        .await;
    assert_eq!(
        pg.query_text("SHOW max_connections").await.as_deref(),
        Some("7")
    );
    assert_eq!(
        pg.query_text("SHOW superuser_reserved_connections")
            .await
            .as_deref(),
        Some("2")
    );
    assert_eq!(pg.query_text("SHOW ssl").await.as_deref(), Some("on"));
    assert!(
        pg.ca_pem()
            .is_some_and(|pem| pem.contains("BEGIN CERTIFICATE"))
    );
}

#[tokio::test]
async fn standby_is_in_recovery_and_follows_the_primary() {
    let primary = PgServer::start().await;
    primary.execute("CREATE TABLE marker (v int)").await;
    let standby = primary.standby().await;
    assert_ne!(standby.port(), primary.port());
    assert_eq!(
        standby
            .query_text("SELECT pg_is_in_recovery()")
            .await
            .as_deref(),
        Some("t")
    );
    assert_eq!(
        primary
            .query_text("SELECT pg_is_in_recovery()")
            .await
            .as_deref(),
        Some("f")
    );
    primary.execute("INSERT INTO marker VALUES (7)").await;
    let standby_client = standby.superuser().await;
    wait_until("the insert to replicate", Duration::from_secs(10), || {
        let client = &standby_client;
        async move {
            client
                .simple_query("SELECT count(*) FROM marker WHERE v = 7")
                .await
                .ok()
                .and_then(|messages| {
                    messages.into_iter().find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v == "1"),
                        _ => None,
                    })
                })
                .unwrap_or(false)
        }
    })
    .await;
}

/// Sends a PostgreSQL SSLRequest through `stream` and returns the one-byte answer.
async fn ssl_request(stream: &mut TcpStream) -> std::io::Result<u8> {
    stream
        .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await?;
    stream.read_u8().await
}

#[tokio::test]
async fn proxy_passes_refuses_black_holes_delays_and_cuts() {
    let pg = PgServer::start().await;
    let proxy = FaultProxy::start(pg.addr()).await;
    assert_eq!(proxy.mode(), Mode::Pass);

    // Pass: a real PostgreSQL answer comes back.
    let mut stream = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(ssl_request(&mut stream).await.expect("answer"), b'N');
    drop(stream);

    // Refuse: the kernel refuses.
    proxy.set_mode(Mode::Refuse).await;
    let err = TcpStream::connect(proxy.addr()).await.expect_err("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    // Back to Pass on the same port.
    proxy.set_mode(Mode::Pass).await;
    let mut stream = TcpStream::connect(proxy.addr())
        .await
        .expect("connect again");
    assert_eq!(ssl_request(&mut stream).await.expect("answer"), b'N');
    drop(stream);

    // BlackHole: connected, and no answer.
    proxy.set_mode(Mode::BlackHole).await;
    let mut stream = TcpStream::connect(proxy.addr())
        .await
        .expect("black hole accepts");
    let silent = tokio::time::timeout(Duration::from_millis(300), ssl_request(&mut stream)).await;
    assert!(silent.is_err(), "black hole answered: {silent:?}");

    // cut_all resets it.
    proxy.cut_all().await;
    let mut buf = [0u8; 1];
    let after_cut = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
        .await
        .expect("reset is noticed");
    assert!(
        matches!(&after_cut, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
            || matches!(after_cut, Ok(0)),
        "{after_cut:?}"
    );
    assert_eq!(proxy.live_connections(), 0);

    // Delay: the answer comes, late.
    proxy
        .set_mode(Mode::Delay(Duration::from_millis(150)))
        .await;
    let mut stream = TcpStream::connect(proxy.addr()).await.expect("connect");
    let started = std::time::Instant::now();
    assert_eq!(ssl_request(&mut stream).await.expect("answer"), b'N');
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "two delayed chunks: {:?}",
        started.elapsed()
    );

    drop(stream);

    // A live connection that is cut while passing traffic sees a reset.
    proxy.set_mode(Mode::Pass).await;
    let mut stream = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(ssl_request(&mut stream).await.expect("answer"), b'N');
    wait_until("one live connection", Duration::from_secs(2), || {
        let n = proxy.live_connections();
        async move { n == 1 }
    })
    .await;
    proxy.cut_all().await;
    let after_cut = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
        .await
        .expect("reset is noticed");
    assert!(
        matches!(&after_cut, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{after_cut:?}"
    );
}
