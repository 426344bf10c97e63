//! Standalone readiness pinging against real PostgreSQL 15, counted at the server side: a small
//! front (`Front`) between the pool and the server tells pings (a StartupMessage naming only the
//! user and the database) from credentialed logins. While "down" it reads the startup and closes
//! (an outage-class failure for both); while "up" it forwards. The limbo rule (callers get the
//! real cause at once while nothing is in flight) and the early trial a ping brings.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use dbpool_client::{Policy, Pool, PoolConfig, PoolError, PoolOptions, SslMode};
use dbpool_testkit::{
    postgres::{APP_DB, APP_PASSWORD, APP_USER, PgServer},
    wait::wait_until,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
    time::Instant,
};

/// Counts, at the server side, the pings and the logins that reached it.
#[derive(Default)]
struct Counts {
    pings: AtomicU64,
    logins: AtomicU64,
    up: AtomicBool,
    /// While down, pings get a pg_hba refusal (SQLSTATE 28000): a configuration answer.
    hba_refuses_pings: AtomicBool,
}

/// The counting front: forwards while up, reads the startup and closes while down.
struct Front {
    port: u16,
    counts: Arc<Counts>,
    task: JoinHandle<()>,
    cut: Arc<tokio::sync::Notify>,
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Front {
    async fn start(upstream: SocketAddr) -> Front {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let counts = Arc::new(Counts::default());
        counts.up.store(true, Ordering::SeqCst);
        let cut = Arc::new(tokio::sync::Notify::new());
        let task = {
            let counts = Arc::clone(&counts);
            let cut = Arc::clone(&cut);
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let counts = Arc::clone(&counts);
                    let cut = Arc::clone(&cut);
                    tokio::spawn(async move {
                        let _ = serve(stream, upstream, &counts, &cut).await;
                    });
                }
            })
        };
        Front {
            port,
            counts,
            task,
            cut,
        }
    }

    fn set_up(&self, up: bool) {
        self.counts.up.store(up, Ordering::SeqCst);
    }

    /// Closes every forwarded connection (the server "restarts").
    fn cut_all(&self) {
        self.cut.notify_waiters();
    }

    fn pings(&self) -> u64 {
        self.counts.pings.load(Ordering::SeqCst)
    }

    fn logins(&self) -> u64 {
        self.counts.logins.load(Ordering::SeqCst)
    }
}

/// Reads one untyped message (length word, body), at most 10 kB.
async fn read_untyped(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = stream.read_u32().await? as usize;
    if !(8..=10_000).contains(&len) {
        return Err(std::io::Error::other("bad length"));
    }
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

/// Whether a StartupMessage body names only `user` and `database` (a readiness ping).
fn is_ping(body: &[u8]) -> bool {
    let keys: Vec<&[u8]> = body[4..]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .step_by(2)
        .collect();
    keys == [&b"user"[..], &b"database"[..]]
}

/// An ErrorResponse as pg_hba sends it: FATAL 28000.
fn hba_error() -> Vec<u8> {
    let mut body = Vec::new();
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'C', "28000"),
        (b'M', "no pg_hba.conf entry for host"),
    ] {
        body.push(tag);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut message = vec![b'E'];
    message.extend_from_slice(&u32::try_from(body.len() + 4).unwrap_or(0).to_be_bytes());
    message.extend_from_slice(&body);
    message
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    counts: &Counts,
    cut: &tokio::sync::Notify,
) -> std::io::Result<()> {
    // SSLRequest first (answered 'N'), then the StartupMessage.
    let mut first = read_untyped(&mut client).await?;
    if first[..4] == 80_877_103u32.to_be_bytes() {
        client.write_all(b"N").await?;
        first = read_untyped(&mut client).await?;
    }
    if is_ping(&first) {
        counts.pings.fetch_add(1, Ordering::SeqCst);
    } else {
        counts.logins.fetch_add(1, Ordering::SeqCst);
    }
    if !counts.up.load(Ordering::SeqCst) {
        if is_ping(&first) && counts.hba_refuses_pings.load(Ordering::SeqCst) {
            client.write_all(&hba_error()).await?;
            client.flush().await?;
            // Wait for the client's close, as a server does.
            let mut rest = Vec::new();
            let _ = client.read_to_end(&mut rest).await;
        }
        return Ok(()); // closed: an outage-class failure for a login
    }
    let mut server = TcpStream::connect(upstream).await?;
    let len = u32::try_from(first.len() + 4).unwrap_or(u32::MAX);
    server.write_all(&len.to_be_bytes()).await?;
    server.write_all(&first).await?;
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        () = cut.notified() => {}
    }
    Ok(())
}

/// Retries every 10 s at the earliest (no 1 s retry could explain a recovery), breaker after
/// 50 failures (never here): only a ping brings the trial.
fn slow_policy() -> Policy {
    Policy {
        timeout: Duration::from_secs(3),
        initial_delay: Duration::from_secs(10),
        max_delay: Duration::from_secs(10),
        jitter: 0.0,
        failure_threshold: 50,
        ..Policy::default()
    }
}

fn config(name: &str, port: u16) -> PoolConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    PoolConfig::new(
        name,
        "127.0.0.1",
        port,
        APP_DB,
        APP_USER,
        Some(APP_PASSWORD.to_owned()),
    )
    .ssl_mode(SslMode::Disable)
    .policy(slow_policy())
    .options(PoolOptions {
        acquire_timeout: Duration::from_secs(2),
        ..PoolOptions::default()
    })
}

/// A checkout and `SELECT 1`; a failing query on a checked-out connection is a test failure.
async fn select_one(pool: &Pool) -> Result<(), PoolError> {
    let client = pool.get().await?;
    if let Err(e) = client.simple_query("SELECT 1").await {
        panic!("SELECT 1 failed on a checked-out connection: {e}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_pings_stay_within_the_rate_and_bring_the_trial_when_the_server_is_back() {
    let pg = PgServer::start().await;
    let front = Front::start(SocketAddr::from(([127, 0, 0, 1], pg.port()))).await;
    let pool = Pool::new(config("pinging", front.port), None);
    wait_until("the pool serves", Duration::from_secs(10), || async {
        select_one(&pool).await.is_ok()
    })
    .await;
    assert_eq!(front.pings(), 0, "no pings while healthy");

    // The server goes away: sessions closed, new connections closed after the startup.
    front.set_up(false);
    front.cut_all();
    wait_until(
        "the loss is seen and probed",
        Duration::from_secs(10),
        || async { pool.status().last_error.is_some() && pool.status().connecting == 0 },
    )
    .await;
    let logins_down = front.logins();
    let pings_before = front.pings();

    // 3.5 s of callers: each gets the real cause at once (no next retry within acquire_timeout
    // to wait for), and the pings stay within 1/s.
    let window = Instant::now();
    let mut calls = 0u64;
    let mut slowest = Duration::ZERO;
    while window.elapsed() < Duration::from_millis(3500) {
        let started = Instant::now();
        match select_one(&pool).await {
            Err(PoolError::Unavailable { cause, .. }) => {
                assert_eq!(cause.outcome, dbpool_client::ProbeOutcome::TransientFailure);
            }
            other => panic!("expected the real cause while down, got {other:?}"),
        }
        slowest = slowest.max(started.elapsed());
        calls += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pings = front.pings() - pings_before;
    println!(
        "down 3.5 s: {calls} calls, slowest {slowest:?}, {pings} pings at the server, {} logins",
        front.logins() - logins_down
    );
    assert!(
        (2..=4).contains(&pings),
        "pings at the server side in 3.5 s at ≤ 1/s: {pings}"
    );
    assert_eq!(
        front.logins(),
        logins_down,
        "no credentialed attempt before the 10 s retry"
    );
    // Far below acquire_timeout (2 s): nobody waited for the retry due in 10 s.
    assert!(
        slowest < Duration::from_secs(1),
        "slowest failure {slowest:?}"
    );
    assert_eq!(pool.status().pings_started, front.pings());

    // The server is back: a ping sees it accepting and the early trial serves, long before the
    // 10 s retry.
    front.set_up(true);
    let back = Instant::now();
    wait_until(
        "served again after the ping's trial",
        Duration::from_secs(5),
        || async { select_one(&pool).await.is_ok() },
    )
    .await;
    println!("ready → served: {:?}", back.elapsed());
    let pings_after = front.pings();
    // Healthy again: no more pings.
    for _ in 0..20 {
        select_one(&pool).await.expect("healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(front.pings(), pings_after, "no pings while healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pool_serves_at_once_after_a_blip() {
    let pg = PgServer::start().await;
    let front = Front::start(SocketAddr::from(([127, 0, 0, 1], pg.port()))).await;
    let pool = Pool::new(config("blip", front.port), None);
    wait_until("the pool serves", Duration::from_secs(10), || async {
        select_one(&pool).await.is_ok()
    })
    .await;
    // A blip while nobody calls: the loss is probed (and fails) while down.
    front.set_up(false);
    front.cut_all();
    wait_until(
        "the loss is seen and probed",
        Duration::from_secs(10),
        || async { pool.status().last_error.is_some() && pool.status().connecting == 0 },
    )
    .await;
    assert_eq!(front.pings(), 0, "an idle pool pings nothing");
    front.set_up(true);
    // The first caller's ping finds the server accepting and the trial serves (the retry is 10 s
    // away). The caller waits for the ping at most 50 ms: on a loaded debug build the ping can
    // take longer, and that caller gets the real cause; the next one is served.
    let back = Instant::now();
    let first = select_one(&pool).await;
    println!("first call after the blip: {first:?}");
    wait_until("served after the blip", Duration::from_secs(5), || async {
        select_one(&pool).await.is_ok()
    })
    .await;
    println!("ready → served: {:?}", back.elapsed());
    assert!(
        (1..=2).contains(&front.pings()),
        "pings by the returning caller: {}",
        front.pings()
    );
}

/// A configuration answer to a ping (pg_hba refuses it) stops the pings: one ping, then none,
/// however many callers ask; callers keep getting the real cause at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_answer_stops_the_pings() {
    let pg = PgServer::start().await;
    let front = Front::start(SocketAddr::from(([127, 0, 0, 1], pg.port()))).await;
    let pool = Pool::new(config("hba", front.port), None);
    wait_until("the pool serves", Duration::from_secs(10), || async {
        select_one(&pool).await.is_ok()
    })
    .await;
    front.counts.hba_refuses_pings.store(true, Ordering::SeqCst);
    front.set_up(false);
    front.cut_all();
    wait_until(
        "the loss is seen and probed",
        Duration::from_secs(10),
        || async { pool.status().last_error.is_some() && pool.status().connecting == 0 },
    )
    .await;
    let window = Instant::now();
    while window.elapsed() < Duration::from_millis(2500) {
        assert!(matches!(
            select_one(&pool).await,
            Err(PoolError::Unavailable { .. })
        ));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(front.pings(), 1, "one ping, answered by pg_hba, then none");
    assert_eq!(pool.status().pings_started, 1);
}
