//! Adaptive connect timeouts (issue 28) against a real PostgreSQL 15 behind the fault proxy: a
//! black-holed server whose connects normally take a few milliseconds fails the pool's next
//! connect in a fraction of the 5 s timeout, and the pool with `adaptive_timeout: false` waits
//! the whole 5 s. The figures are printed (`--nocapture`). After a recovery, slow first logins are
//! not cut at the learned timeout.

use std::time::{Duration, Instant};

use dbpool_client::{Pool, PoolConfig, PoolOptions, SslMode};
use dbpool_testkit::{
    postgres::{APP_DB, APP_PASSWORD, APP_USER, PgServer},
    proxy::{FaultProxy, Mode},
    wait::{wait_for, wait_until},
};

/// A pool on `port` with the default policy (5 s timeout) and adaptive timeouts on or off.
fn pool(name: &str, port: u16, adaptive: bool) -> Pool {
    let config = PoolConfig::new(
        name,
        "127.0.0.1",
        port,
        APP_DB,
        APP_USER,
        Some(APP_PASSWORD.to_owned()),
    )
    .ssl_mode(SslMode::Disable)
    .options(PoolOptions {
        adaptive_timeout: adaptive,
        ..PoolOptions::default()
    });
    Pool::new(config, None)
}

/// Connects `pool` a few times (a checkout of a fresh connection each), so it learns.
async fn warm_up(pool: &Pool) {
    for _ in 0..3 {
        let conn = wait_for("a connection", Duration::from_secs(30), || async {
            pool.get().await.ok()
        })
        .await;
        conn.simple_query("SELECT 1").await.expect("SELECT 1");
    }
}

/// From the black hole to the pool's first failed connect: how long it took, and its message.
async fn first_failure(pool: &Pool, proxy: &FaultProxy) -> (Duration, String) {
    let cut = Instant::now();
    proxy.set_mode(Mode::BlackHole).await;
    // The open connections die: the pool notices the loss and connects again.
    proxy.cut_all().await;
    let cause = wait_for(
        "a connect that timed out",
        Duration::from_secs(20),
        || async {
            pool.status()
                .last_error
                .filter(|cause| cause.message.contains("timed out"))
        },
    )
    .await;
    (cut.elapsed(), cause.message)
}

#[tokio::test]
async fn a_black_hole_fails_a_connect_in_a_fraction_of_the_timeout() {
    let pg = PgServer::start().await;
    let adaptive_proxy = FaultProxy::start(pg.addr()).await;
    let fixed_proxy = FaultProxy::start(pg.addr()).await;
    let adaptive = pool("adaptive", adaptive_proxy.port(), true);
    let fixed = pool("fixed", fixed_proxy.port(), false);
    warm_up(&adaptive).await;
    warm_up(&fixed).await;
    let ((adaptive_took, adaptive_cause), (fixed_took, fixed_cause)) = tokio::join!(
        first_failure(&adaptive, &adaptive_proxy),
        first_failure(&fixed, &fixed_proxy),
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "client black hole (load {}): adaptive: first failed connect after {}ms ({adaptive_cause}); \
         fixed: after {}ms ({fixed_cause})",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        adaptive_took.as_millis(),
        fixed_took.as_millis(),
    );
    assert!(adaptive_took < Duration::from_secs(1), "{adaptive_took:?}");
    assert!(
        adaptive_cause.contains("adaptive timeout"),
        "{adaptive_cause}"
    );
    assert!(fixed_took >= Duration::from_secs(5), "{fixed_took:?}");
}

/// The idle-blip burst found by bench-client: after a recovery, the first logins of a restarted
/// server are slower than the learned (healthy) latency, and the ramp's connects were cut at the
/// learned limit (250 ms at the floor), which made the pool suspect and gave callers fast
/// failures after every task had been served. After a recovery, connects wait the policy's
/// timeout. Here every chunk is delayed 150 ms once the pool has recovered, so a login (several
/// round trips) takes far longer than 250 ms and far less than the 5 s timeout.
#[tokio::test]
async fn after_a_recovery_slow_logins_are_not_cut_at_the_learned_timeout() {
    let pg = PgServer::start().await;
    let proxy = FaultProxy::start(pg.addr()).await;
    let pool = pool("after-recovery", proxy.port(), true);
    warm_up(&pool).await;
    // An outage: connects refused, the open connections cut.
    proxy.set_mode(Mode::Refuse).await;
    proxy.cut_all().await;
    wait_until(
        "the pool to see the outage",
        Duration::from_secs(20),
        || async { pool.status().last_error.is_some() && pool.get().await.is_err() },
    )
    .await;
    let down_since = jiff::Timestamp::now();
    proxy.set_mode(Mode::Pass).await;
    // Recovered: a recovery attempt (the ping's early trial, or the backoff's) connected.
    wait_until("the pool to recover", Duration::from_secs(30), || async {
        pool.status().last_success.is_some_and(|t| t > down_since)
    })
    .await;
    proxy
        .set_mode(Mode::Delay(Duration::from_millis(150)))
        .await;
    // More connections than the recovery's one: the ramp opens them, each a slow login.
    let gets = (0..5).map(|_| pool.get());
    let results = futures::future::join_all(gets).await;
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(
        failed.is_empty(),
        "callers failed after a recovery: {failed:?}"
    );
    let cause = pool.status().last_error.map(|c| c.message);
    assert!(
        cause
            .as_deref()
            .is_none_or(|m| !m.contains("adaptive timeout")),
        "a connect was cut at the learned timeout: {cause:?}"
    );
}
