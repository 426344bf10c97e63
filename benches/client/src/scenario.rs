//! One run: one pool configuration through one scenario on the shared server.
//!
//! Lives here: [`Scenario`] (3 s outage, 30 s outage, idle blip), [`Settings`] (windows and
//! caps), [`run`] (warm-up → steady window → stop → outage → start → recovery, reading the
//! kernel's connect counters at the edges, sampling the pool for the plots) and [`RunResult`];
//! [`start_load`], a pool of one kind (and its PgBouncer) with its tasks. Must not live here:
//! building or calling pools (`pools`), per-call bookkeeping (`load`), formatting (`report`),
//! drawing (`plot`).

use std::{sync::Arc, time::Duration};

use dbpool_testkit::{postgres::PgServer, wait::wait_until};
use jiff::Timestamp;
use tokio::{
    runtime::Handle,
    time::{Instant, sleep},
};

use crate::{
    bouncer::{Bouncer, BouncerSettings},
    load::{Load, Mark, Marks, Merged, merge},
    netcount::{PortSyns, TcpCounters},
    pools::{BenchPool, Op, PoolKind},
    timeline::{Sample, Sampler},
};

/// The load's tasks (the "8 tasks").
pub const TASKS: usize = 8;

/// How the server goes away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Stopped (fast) under load, started 3 s later.
    Outage3,
    /// Stopped (fast) under load, started 30 s later.
    Outage30,
    /// Restarted (stop fast, start at once) while the tasks are parked; they resume at ready.
    IdleBlip,
}

impl Scenario {
    /// Every scenario, in report order.
    pub const ALL: [Scenario; 3] = [Scenario::Outage3, Scenario::Outage30, Scenario::IdleBlip];

    /// Short name, used by the `BENCH_CLIENT_SCENARIOS` filter.
    pub fn id(self) -> &'static str {
        match self {
            Scenario::Outage3 => "3s",
            Scenario::Outage30 => "30s",
            Scenario::IdleBlip => "idle",
        }
    }

    /// Title in the report.
    pub fn title(self) -> &'static str {
        match self {
            Scenario::Outage3 => "3 s outage under load",
            Scenario::Outage30 => "30 s outage under load",
            Scenario::IdleBlip => "idle blip (restart while the pool is idle)",
        }
    }

    /// Time between `pg_ctl stop` returning and `pg_ctl start` being invoked.
    pub fn outage(self) -> Duration {
        match self {
            Scenario::Outage3 => Duration::from_secs(3),
            Scenario::Outage30 => Duration::from_secs(30),
            Scenario::IdleBlip => Duration::ZERO,
        }
    }
}

/// Windows and caps of a run.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Load before the steady window (pools fill, dbpool-client's ramp ends).
    pub warmup: Duration,
    /// The steady window: ops/s are counted in it.
    pub steady: Duration,
    /// Longest wait after ready for every task to succeed (and for dbpool-client's trial).
    pub cap: Duration,
    /// Load kept on after every task succeeded, to count late failures.
    pub tail: Duration,
    /// How far into a long outage "after the first delays" begins.
    pub early: Duration,
}

/// What one run measured.
pub struct RunResult {
    /// The pool configuration.
    pub kind: PoolKind,
    /// The tasks' merged stats (times since the run's origin, in ns).
    pub merged: Merged,
    /// Steady window length.
    pub steady: Duration,
    /// When `pg_ctl stop` was invoked and returned (ns since origin).
    pub stop_at: u64,
    /// `pg_ctl stop` duration.
    pub stop_took: Duration,
    /// When the server was ready (ns since origin).
    pub ready_at: u64,
    /// From `pg_ctl stop` returning to `pg_ctl start` being invoked.
    pub down: Duration,
    /// Connect attempts in `down`.
    pub down_attempts: TcpCounters,
    /// Connect attempts in `down` after `Settings::early`, and that window's length.
    pub late_attempts: Option<(TcpCounters, Duration)>,
    /// Connect attempts during `pg_ctl start` (until ready).
    pub restart_attempts: TcpCounters,
    /// `pg_ctl start` until ready.
    pub restart: Duration,
    /// dbpool-client: ready → its first successful connect (trial or backoff retry).
    pub ready_to_trial: Option<Duration>,
    /// SYNs that reached PostgreSQL's port in `down` (server side; None: not counted).
    pub down_syns: Option<u64>,
    /// dbpool-client's credentialed connects started in `down`.
    pub down_connects: Option<u64>,
    /// dbpool-client's readiness pings started in `down`, as its status reports them.
    pub down_pings: Option<u64>,
    /// PgBouncer: the tasks' connects to it in `down`.
    pub down_app_connects: Option<u64>,
    /// When the run's load stopped (ns since origin).
    pub end_at: u64,
    /// dbpool-client's status and the kernel's connects, sampled (for the plot).
    pub samples: Vec<Sample>,
}

/// A new pool of `kind` in front of `pg` (for PgBouncer's kinds, a PgBouncer started for it),
/// and `TASKS` tasks calling it with `op`, on `runtime`.
pub async fn start_load(
    kind: PoolKind,
    pg: &PgServer,
    marks: &Arc<Marks>,
    op: Op,
    runtime: &Handle,
) -> Result<(Arc<BenchPool>, Load), String> {
    let bouncer = match kind {
        PoolKind::BouncerDefault => {
            Some(Bouncer::start(BouncerSettings::Defaults, pg.port()).await?)
        }
        PoolKind::BouncerRetry1 => {
            Some(Bouncer::start(BouncerSettings::LoginRetry1, pg.port()).await?)
        }
        _ => None,
    };
    let pool = if kind.follows_dbpool() {
        let cluster = crate::cluster::CLUSTER
            .get()
            .ok_or("no cluster: the DbPool mode needs hack/bench-client.sh's control plane")?;
        let port = pg.port();
        // Made on the load runtime, where its follower (a watch) runs too.
        let made = runtime
            .spawn(async move { cluster.pool(port).await })
            .await
            .map_err(|e| format!("making the DbPool's pool: {e}"))??;
        Arc::new(BenchPool::Ours(made))
    } else {
        // The pool and its tasks live on the load runtime; the caller's clock does not.
        let _load_runtime = runtime.enter();
        Arc::new(BenchPool::build(kind, pg.port(), bouncer)?)
    };
    let _load_runtime = runtime.enter();
    let load = Load::start(Arc::clone(&pool), Arc::clone(marks), TASKS, op);
    Ok((pool, load))
}

/// Runs `kind` through `scenario` on `pg` (which runs, and runs again at the end); the pool
/// and its load on `runtime`.
pub async fn run(
    scenario: Scenario,
    kind: PoolKind,
    pg: &mut PgServer,
    settings: Settings,
    runtime: &Handle,
    syns: Option<&PortSyns>,
) -> Result<RunResult, String> {
    quiesce(pg).await;
    let marks = Arc::new(Marks::new());
    let (pool, load) = start_load(kind, pg, &marks, Op::SimpleSelect, runtime).await?;
    let sampler = Sampler::start(Arc::clone(&pool), Arc::clone(&marks));
    let counts = |pool: &BenchPool| {
        (
            syns.and_then(PortSyns::read),
            pool.status().map(|s| s.connects_started),
            pool.app_connects(),
            pool.status().map(|s| s.pings_started),
        )
    };

    // Measurement windows are fixed lengths of time by definition (not waits for a condition).
    sleep(settings.warmup).await;
    marks.set(Mark::SteadyStart);
    sleep(settings.steady).await;
    marks.set(Mark::SteadyEnd);

    if scenario == Scenario::IdleBlip {
        load.pause();
        let parked = Arc::clone(&load.parked);
        wait_until("the tasks to park", Duration::from_secs(60), || {
            let n = parked.load(std::sync::atomic::Ordering::SeqCst);
            async move { n == TASKS }
        })
        .await;
    }

    let stop_at = marks.set(Mark::Stop);
    let stop_started = Instant::now();
    pg.stop().await;
    let stop_took = stop_started.elapsed();
    let down_from = Instant::now();
    let c_down = TcpCounters::read();
    let n_down = counts(&pool);
    let outage = scenario.outage();
    let mut late = None;
    if outage > settings.early {
        sleep(settings.early).await;
        late = Some((TcpCounters::read(), Instant::now()));
    }
    sleep(outage.saturating_sub(down_from.elapsed())).await;
    let c_start = TcpCounters::read();
    let n_start = counts(&pool);
    let down = down_from.elapsed();
    let late_attempts = late.map(|(c, at)| (c_start.since(c), at.elapsed()));

    let start_called = Instant::now();
    pg.start().await;
    let ready_at = marks.set(Mark::Ready);
    let ready_wall = Timestamp::now();
    let restart = start_called.elapsed();
    let restart_attempts = TcpCounters::read().since(c_start);
    if scenario == Scenario::IdleBlip {
        load.resume();
    }

    // Until every task succeeded (and dbpool-client's first successful connect is seen), capped.
    let cap_at = Instant::now() + settings.cap;
    let mut ready_to_trial = None;
    let mut capped = false;
    loop {
        if ready_to_trial.is_none()
            && let Some(t) = pool.last_success()
            && t > ready_wall
        {
            ready_to_trial = Duration::try_from(t.duration_since(ready_wall)).ok();
        }
        let all = load.recovered.load(std::sync::atomic::Ordering::SeqCst) == TASKS;
        if all && (!kind.is_ours() || ready_to_trial.is_some()) {
            break;
        }
        if Instant::now() >= cap_at {
            capped = true;
            break;
        }
        sleep(Duration::from_millis(2)).await;
    }
    if !capped {
        sleep(settings.tail).await;
    }
    let stats = load.stats.clone();
    load.stop(Duration::from_secs(2)).await;
    let end_at = marks.now();
    let samples = sampler.finish().await;
    let merged = merge(&stats);
    if let Ok(pool) = Arc::try_unwrap(pool) {
        let _ = runtime.spawn(pool.close()).await;
    }
    Ok(RunResult {
        kind,
        merged,
        steady: settings.steady,
        stop_at,
        stop_took,
        ready_at,
        down,
        down_attempts: c_start.since(c_down),
        late_attempts,
        restart_attempts,
        restart,
        ready_to_trial,
        down_syns: delta(n_down.0, n_start.0),
        down_connects: delta(n_down.1, n_start.1),
        down_app_connects: delta(n_down.2, n_start.2),
        down_pings: delta(n_down.3, n_start.3),
        end_at,
        samples,
    })
}

fn delta(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    Some(b?.saturating_sub(a?))
}

/// Waits until the previous run's sessions are gone, so each run starts from an empty server.
pub async fn quiesce(pg: &PgServer) {
    wait_until(
        "no app sessions left from the previous run",
        Duration::from_secs(30),
        || async {
            pg.query_text("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'")
                .await
                .as_deref()
                == Some("0")
        },
    )
    .await;
}
