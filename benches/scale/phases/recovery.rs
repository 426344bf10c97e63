//! Recovery at the speed of the database (issue 24): how soon after PostgreSQL logs "database
//! system is ready to accept connections" a watch on the DbPool sees `Ready=True`, with the
//! DbPool's **default spec** (only `database` is set; every recovery knob is the CRD's default,
//! `breaker.earlyTrial` on, `healthCheck.adaptiveTimeout` on).
//!
//! Lives here: `Run::recovery` and its runs, on servers and pools of its own (labelled
//! `dbpool.io/bench-phase=recovery`, deleted at the end): outages of 3 s and of 30 s (breaker
//! Open) of one pool's server (`pg_ctl stop -m fast` / `start`), crash recovery (WAL written,
//! then SIGKILL of a backend, so the postmaster reinitialises and replays it; the run counts the
//! operator's 57P03 pings), and a fleet restarting together (`BENCH_RECOVERY_FLEET` pools on
//! `BENCH_RECOVERY_FLEET_TARGETS` servers). Start = the `%m` stamp of the server's ready line
//! (parsed from its log), end = the watch's receipt of `Ready=True`: same host clock. Must not
//! live here: the watch and the log parsing (`ready`), statistics and formatting (`report`).

use std::time::Duration;

use dbpool_operator::api::{DbPool, Phase};
use futures::StreamExt;
use kube::api::{DeleteParams, ListParams, PostParams};
use tokio::time::Instant;

use crate::{
    procfs::{load_average, now_us},
    ready::{LOG_CONF, ReadyWatch, log_len, log_lines_after, metric_sum, ready_line_after},
    report::{ms, show, stats, verdict},
    run::Run,
    settings::{API_CONCURRENCY, KEY, SECRET},
    support::postgres::{APP_DB, APP_USER, PgServer},
};

/// The label of the phase's pools.
const LABEL: (&str, &str) = ("dbpool.io/bench-phase", "recovery");
/// The bound for one pool: Ready this soon after the ready line.
const GOAL_MS: f64 = 500.0;
/// The bound for the fleet's p99.
const FLEET_GOAL_MS: f64 = 1000.0;
/// The pings the operator counted as 57P03 (starting up, recovering, shutting down).
const STARTING_UP: &str = "dbpool_readiness_pings_total{result=\"StartingUp\"}";

/// One measured outage of one pool.
struct Sample {
    /// Ready line → watch sees Ready=True, ms.
    ms: f64,
    /// The pool's phase just before the server started again.
    phase: Option<Phase>,
}

/// What a crash-recovery run saw.
struct Crash {
    /// Ready line → watch sees Ready=True, ms (None: the pool never went not-Ready).
    ms: Option<f64>,
    /// 57P03 pings the operator counted during the run.
    starting_up: f64,
    /// The server's "redo starts at" → ready line, ms.
    redo_ms: Option<f64>,
}

/// A poll of `check` every 20 ms until it returns `Some` or `deadline` passes.
async fn poll<T>(deadline: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server of the phase: the `%m` log prefix in UTC, and room for the crash run's WAL without a
/// checkpoint in between (so crash recovery replays all of it).
async fn recovery_server() -> PgServer {
    let mut options = PgServer::options()
        .conf("max_wal_size = '8GB'")
        .conf("checkpoint_timeout = '1h'");
    for line in LOG_CONF {
        options = options.conf(line);
    }
    options.start().await
}

/// The manifest of a pool with the default spec: only the database (host, port, dbname, user,
/// password Secret); the apiserver fills in every other field from the CRD's defaults.
fn default_pool(name: &str, port: u16) -> DbPool {
    let manifest = serde_json::json!({
        "apiVersion": "dbpool.io/v1alpha1",
        "kind": "DbPool",
        "metadata": { "name": name, "labels": { LABEL.0: LABEL.1 } },
        "spec": { "database": {
            "host": "127.0.0.1", "port": port, "dbname": APP_DB, "user": APP_USER,
            "passwordSecretRef": { "name": SECRET, "key": KEY },
        }},
    });
    serde_json::from_value(manifest).expect("valid DbPool manifest")
}

/// "a, b, c ms" of a list of milliseconds.
fn listing(values: &[f64]) -> String {
    let list: Vec<String> = values.iter().map(|v| format!("{v:.0}")).collect();
    format!("{} ms", list.join(", "))
}

impl Run {
    /// The phase: single-pool outages, crash recovery, then the fleet.
    pub async fn recovery(&mut self) {
        if self.op.is_none() {
            self.start_operator(Duration::from_secs(300)).await;
        }
        let r = self.s.recovery.clone();
        let selector = format!("{}={}", LABEL.0, LABEL.1);
        let watch = ReadyWatch::start(self.api.clone(), &selector);
        let mut pg = recovery_server().await;
        let pool = "rec-single";
        self.create_pools(&[default_pool(pool, pg.port())]).await;
        self.note_effective_spec(pool).await;
        for (what, outage, n) in [
            ("3 s outage", Duration::from_secs(3), r.short_runs),
            (
                "30 s outage (breaker Open)",
                Duration::from_secs(30),
                r.long_runs,
            ),
        ] {
            if n == 0 {
                continue;
            }
            let mut samples = Vec::new();
            for i in 0..n {
                let sample = outage_run(&watch, &mut pg, pool, outage).await;
                progress!(
                    "recovery {what} {}/{n}: Ready {} after the ready line (phase before the \
                     start {}; load {})",
                    i + 1,
                    ms(sample.ms),
                    sample.phase.map_or("-".to_owned(), |p| format!("{p:?}")),
                    load_average()
                );
                samples.push(sample);
            }
            self.outage_row(what, &samples);
        }
        let mut crashes = Vec::new();
        for i in 0..r.crash_runs {
            let crash = self.crash_run(&watch, &pg, pool, r.wal_mb).await;
            progress!(
                "recovery crash {}/{}: Ready {} after the ready line, {} 57P03 pings, redo {}",
                i + 1,
                r.crash_runs,
                crash.ms.map_or("-".to_owned(), ms),
                crash.starting_up,
                crash.redo_ms.map_or("-".to_owned(), ms)
            );
            crashes.push(crash);
        }
        if !crashes.is_empty() {
            self.crash_row(&crashes, r.wal_mb);
        }
        self.delete_recovery_pools().await;
        drop(pg);
        if r.fleet_pools > 0 {
            self.fleet(&watch).await;
        }
        self.delete_recovery_pools().await;
    }

    /// Creates `pools`, a few at a time, and waits until the watch saw each Ready.
    async fn create_pools(&self, pools: &[DbPool]) {
        let api = &self.api;
        futures::stream::iter(pools)
            .map(|p| async move { api.create(&PostParams::default(), p).await })
            .buffer_unordered(API_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .for_each(|r| {
                if let Err(err) = r {
                    panic!("create a recovery pool: {err}");
                }
            });
    }

    /// Adds a note with the effective spec of `pool` as the apiserver defaulted it.
    async fn note_effective_spec(&mut self, pool: &str) {
        let spec = match self.api.get(pool).await {
            Ok(p) => serde_json::to_value(&p.spec).unwrap_or_default(),
            Err(err) => panic!("get {pool}: {err}"),
        };
        let part = |k: &str| spec.get(k).map(|v| v.to_string()).unwrap_or_default();
        self.report.note(format!(
            "recovery phase: pools with only `spec.database` set; the CRD's defaults: \
             healthCheck {}, backoff {}, breaker {}, sslMode {}",
            part("healthCheck"),
            part("backoff"),
            part("breaker"),
            spec.pointer("/database/sslMode")
                .map(|v| v.to_string())
                .unwrap_or_default()
        ));
    }

    /// Deletes the phase's pools (before their servers go away).
    async fn delete_recovery_pools(&self) {
        let lp = ListParams::default().labels(&format!("{}={}", LABEL.0, LABEL.1));
        if let Err(err) = self
            .api
            .delete_collection(&DeleteParams::default(), &lp)
            .await
        {
            progress!("deleting the recovery pools: {err}");
        }
    }

    /// The report row of one kind of outage.
    fn outage_row(&mut self, what: &str, samples: &[Sample]) {
        let values: Vec<f64> = samples.iter().map(|s| s.ms).collect();
        let s = stats(values.clone());
        let phases: Vec<String> = samples
            .iter()
            .map(|s| s.phase.map_or("-".to_owned(), |p| format!("{p:?}")))
            .collect();
        let mut phases_seen = phases.clone();
        phases_seen.sort();
        phases_seen.dedup();
        self.report.row(
            format!("recovery, default spec, {what}: server's ready line → watch sees Ready=True"),
            format!(
                "{}; per run {}; phase before the start: {}; load average {}",
                show(s),
                listing(&values),
                phases_seen.join(", "),
                load_average()
            ),
            &format!("max ≤ {GOAL_MS:.0} ms"),
            &verdict(s.is_some_and(|s| s.max <= GOAL_MS)),
        );
    }

    /// The report row of the crash runs.
    fn crash_row(&mut self, crashes: &[Crash], wal_mb: u64) {
        let exercised: Vec<&Crash> = crashes.iter().filter(|c| c.starting_up >= 1.0).collect();
        let values: Vec<f64> = exercised.iter().filter_map(|c| c.ms).collect();
        let s = stats(values.clone());
        let redo: Vec<f64> = crashes.iter().filter_map(|c| c.redo_ms).collect();
        let pings: Vec<String> = crashes
            .iter()
            .map(|c| format!("{}", c.starting_up))
            .collect();
        let result = if exercised.is_empty() {
            format!(
                "did **not** exercise crash recovery: no ping answered 57P03 in {} runs (redo {})",
                crashes.len(),
                listing(&redo)
            )
        } else {
            format!(
                "{}; per run {}; 57P03 pings per run {}; redo (\"redo starts\" → ready line) {}; \
                 load average {}",
                show(s),
                listing(&values),
                pings.join(", "),
                listing(&redo),
                load_average()
            )
        };
        self.report.row(
            format!(
                "recovery, default spec, crash ({wal_mb} MB of WAL, kill -9 of a backend): \
                 ready line after redo → watch sees Ready=True"
            ),
            result,
            &format!("max ≤ {GOAL_MS:.0} ms, ≥ 1 ping answered 57P03"),
            &verdict(!exercised.is_empty() && s.is_some_and(|s| s.max <= GOAL_MS)),
        );
    }

    /// One crash: WAL written, a backend SIGKILLed, the postmaster reinitialises and replays.
    async fn crash_run(&self, watch: &ReadyWatch, pg: &PgServer, pool: &str, wal_mb: u64) -> Crash {
        wait_ready(watch, &[pool.to_owned()], 0).await;
        let client = pg.superuser().await;
        let sql = "CREATE TABLE IF NOT EXISTS wal_filler (id bigint, pad text); \
                   TRUNCATE wal_filler; CHECKPOINT;";
        client
            .batch_execute(sql)
            .await
            .expect("prepare the WAL filler");
        // About 1 KiB of WAL per row (an uncompressed 1,024-character value).
        let rows = wal_mb * 1000;
        let insert = format!(
            "INSERT INTO wal_filler SELECT g, repeat(md5(g::text), 32) \
             FROM generate_series(1, {rows}) g"
        );
        client.batch_execute(&insert).await.expect("write WAL");
        let pid = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("backend pid")
            .get::<_, i32>(0);
        let before = self.starting_up_pings().await;
        let offset = log_len(&pg.log_path());
        let t_kill = now_us();
        let killed = tokio::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .await
            .is_ok_and(|s| s.success());
        assert!(killed, "kill -KILL {pid}");
        drop(client);
        let path = pg.log_path();
        let ready_us = poll(Duration::from_secs(300), || ready_line_after(&path, offset))
            .await
            .expect("the server ready again after crash recovery");
        let down = watch.first(pool, t_kill, false);
        let ms = match down {
            Some(down_us) => {
                let end = poll(Duration::from_secs(120), || {
                    watch.first(pool, down_us, true)
                })
                .await;
                end.map(|end_us| (end_us - ready_us) as f64 / 1000.0)
            }
            None => None,
        };
        let after = self.starting_up_pings().await;
        let redo_ms = log_lines_after(&path, offset, "redo starts at")
            .first()
            .and_then(|l| crate::ready::parse_stamp(l))
            .map(|start| (ready_us - start) as f64 / 1000.0);
        Crash {
            ms,
            starting_up: after - before,
            redo_ms,
        }
    }

    /// The operator's count of 57P03 pings, from its /metrics.
    async fn starting_up_pings(&self) -> f64 {
        let text = self.op().metrics_text().await.unwrap_or_default();
        metric_sum(&text, STARTING_UP)
    }

    /// The fleet: pools on servers, every server stopped and started together.
    async fn fleet(&mut self, watch: &ReadyWatch) {
        let r = self.s.recovery.clone();
        let targets = r.fleet_targets.max(1);
        progress!(
            "recovery fleet: starting {targets} PostgreSQL servers for {} pools",
            r.fleet_pools
        );
        let mut pgs = futures::future::join_all((0..targets).map(|_| recovery_server())).await;
        let names: Vec<String> = (0..r.fleet_pools)
            .map(|i| format!("rec-fleet-{i:04}"))
            .collect();
        let manifests: Vec<DbPool> = names
            .iter()
            .enumerate()
            .map(|(i, n)| default_pool(n, pgs[i % targets].port()))
            .collect();
        self.create_pools(&manifests).await;
        let mut samples = Vec::new();
        let mut per_run = Vec::new();
        for run in 0..r.fleet_runs {
            let values = fleet_run(watch, &mut pgs, &names).await;
            let s = stats(values.clone());
            progress!(
                "recovery fleet {}/{}: {} (load {})",
                run + 1,
                r.fleet_runs,
                show(s),
                load_average()
            );
            per_run.push(s.map_or("-".to_owned(), |s| format!("p99 {}", ms(s.p99))));
            samples.extend(values);
        }
        let s = stats(samples);
        self.report.row(
            format!(
                "recovery, default spec, {} pools on {targets} servers (one database each), all \
                 restarted together after 3 s: each server's ready line → watch sees its pools \
                 Ready=True",
                r.fleet_pools
            ),
            format!(
                "{}; per run {}; load average {}",
                show(s),
                per_run.join(", "),
                load_average()
            ),
            &format!("p99 ≤ {FLEET_GOAL_MS:.0} ms"),
            &verdict(s.is_some_and(|s| s.p99 <= FLEET_GOAL_MS)),
        );
        self.delete_recovery_pools().await;
    }
}

/// Waits until the watch's latest event of every pool in `pools` says Ready, at most 120 s
/// (from `since_us`: events before it do not count).
async fn wait_ready(watch: &ReadyWatch, pools: &[String], since_us: i64) {
    let ok = poll(Duration::from_secs(120), || {
        pools
            .iter()
            .all(|p| {
                watch
                    .latest(p)
                    .is_some_and(|e| e.ready && e.at_us >= since_us)
            })
            .then_some(())
    })
    .await;
    assert!(ok.is_some(), "recovery: pools not Ready within 120 s");
}

/// One outage of `outage` of one pool's server: stop, wait until the watch sees the pool not
/// Ready, hold until `outage` after the stop, start, measure.
async fn outage_run(watch: &ReadyWatch, pg: &mut PgServer, pool: &str, outage: Duration) -> Sample {
    wait_ready(watch, &[pool.to_owned()], 0).await;
    let t_stop = now_us();
    let stopped = Instant::now();
    pg.stop().await;
    let down_us = poll(Duration::from_secs(30), || watch.first(pool, t_stop, false))
        .await
        .expect("the pool not Ready within 30 s of the stop");
    // The outage's length is the scenario, not a wait for a condition.
    tokio::time::sleep_until(stopped + outage).await;
    let phase = watch.latest(pool).and_then(|e| e.phase);
    let offset = log_len(&pg.log_path());
    pg.start().await;
    let path = pg.log_path();
    let ready_us = poll(Duration::from_secs(10), || ready_line_after(&path, offset))
        .await
        .expect("a ready line after the start");
    let end_us = poll(Duration::from_secs(120), || {
        watch.first(pool, down_us, true)
    })
    .await
    .expect("the pool Ready within 120 s of the start");
    Sample {
        ms: (end_us - ready_us) as f64 / 1000.0,
        phase,
    }
}

/// One restart of the whole fleet: every server stopped, every pool seen not Ready, 3 s after
/// the stop every server started; per pool, its server's ready line → the watch sees it Ready.
async fn fleet_run(watch: &ReadyWatch, pgs: &mut [PgServer], names: &[String]) -> Vec<f64> {
    wait_ready(watch, names, 0).await;
    let t_stop = now_us();
    let stopped = Instant::now();
    futures::future::join_all(pgs.iter_mut().map(|pg| pg.stop())).await;
    let downs = poll(Duration::from_secs(60), || {
        names
            .iter()
            .map(|n| watch.first(n, t_stop, false))
            .collect::<Option<Vec<i64>>>()
    })
    .await
    .expect("every fleet pool not Ready within 60 s of the stop");
    tokio::time::sleep_until(stopped + Duration::from_secs(3)).await;
    let offsets: Vec<u64> = pgs.iter().map(|pg| log_len(&pg.log_path())).collect();
    futures::future::join_all(pgs.iter_mut().map(|pg| pg.start())).await;
    let readies: Vec<i64> = pgs
        .iter()
        .zip(&offsets)
        .map(|(pg, off)| ready_line_after(&pg.log_path(), *off).expect("a ready line"))
        .collect();
    let ends = poll(Duration::from_secs(120), || {
        names
            .iter()
            .zip(&downs)
            .map(|(n, d)| watch.first(n, *d, true))
            .collect::<Option<Vec<i64>>>()
    })
    .await
    .expect("every fleet pool Ready within 120 s of the start");
    ends.iter()
        .enumerate()
        .map(|(i, end)| (end - readies[i % pgs.len()]) as f64 / 1000.0)
        .collect()
}
