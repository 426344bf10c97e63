//! No false opens under slowness (issue 28): `make bench-slowness`.
//!
//! One DbPool with the default settings (only `healthCheck.interval` is 6 s instead of 30 s, so
//! the two minutes see 20 probes instead of 4; it must exceed the 5 s timeout) probes a real
//! PostgreSQL 15 through the test kit's fault proxy, with the operator running in-process
//! against the real apiserver. Once the pool is Healthy and its learned stage timeout is at the
//! 250 ms floor, the proxy adds latency to every chunk, climbing from nothing to
//! `SLOW_PEAK_MS` (default 1,500 ms) per round trip over `SLOW_RAMP_SECS` (default 120 s;
//! quadratically: slowly at first, one small step every `SLOW_TICK_MS`, default 500 ms), and
//! back down to nothing over the same time; then the bench waits (at most `SLOW_SETTLE_SECS`,
//! default 240 s) for the learned timeout to return to the floor.
//!
//! It counts breaker opens (the pool's `status.breaker.openCount`; must be 0), failed probes and
//! the longest run of them, records the added round trip, the learned stage timeout and its
//! smoothed latency (the operator's gauges `dbpool_probe_stage_timeout_seconds` and
//! `dbpool_probe_stage_srtt_seconds`) every tick and every probe's wall time, prints a table and
//! the figures with the load average, and writes the chart to `SLOW_SVG` (default
//! `docs/bench-slowness.svg`).
//!
//! The peak is 1.5 s, not the 2 s per round trip the issue mentions: a probe on its open
//! connection runs three queries (SELECT 1, the role check, the saturation check), one round
//! trip each, and the whole probe must fit `healthCheck.timeout` (5 s): 3 × 2 s cannot, with
//! any timeout rule. 1.5 s is 6 × the learned 250 ms and some 500 × the server's own latency.
//!
//! Not part of `make test`. Needs the environment `make bench-slowness` starts
//! (DBPOOL_TEST_KUBECONFIG), like the tests.

mod svg;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use dbpool_operator::{
    api::{DbPool, ProbeOutcome},
    controller::{Observer, OperatorConfig, ProbeObservation, RunningOperator},
};
use dbpool_testkit::{
    kube::namespace_with_secret,
    pools::{create, status, wait_status},
    postgres::{APP_DB, APP_PASSWORD, APP_USER, PgServer},
    process::sample,
    proxy::{FaultProxy, Mode},
    wait::wait_for,
};

const POOL: &str = "slowness";

/// Every probe of the pool: when it finished (since the ramp's start), its wall time, success.
#[derive(Default)]
struct Probes {
    start: Mutex<Option<Instant>>,
    seen: Mutex<Vec<(f64, Duration, bool)>>,
}

impl Observer for Probes {
    fn probe_finished(&self, probe: &ProbeObservation<'_>) {
        if probe.shared {
            return;
        }
        let Some(start) = *self.start.lock().unwrap_or_else(|e| e.into_inner()) else {
            return;
        };
        let at = start.elapsed().as_secs_f64();
        let ok = probe.outcome == ProbeOutcome::Success;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.push((at, probe.latency, ok));
    }
}

/// One tick's reading: seconds since the start, added round trip, learned timeout and srtt.
struct Tick {
    at: f64,
    added: Duration,
    learned: f64,
    srtt: f64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The pool: the database behind the proxy, every other field at its default but the interval.
fn manifest(port: u16) -> DbPool {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "dbpool.io/v1alpha1",
        "kind": "DbPool",
        "metadata": { "name": POOL },
        "spec": {
            "database": {
                "host": "127.0.0.1", "port": port, "dbname": APP_DB, "user": APP_USER,
                "sslMode": "disable",
                "passwordSecretRef": { "name": "db", "key": "password" },
            },
            "healthCheck": { "interval": "6s" },
        },
    }))
    .expect("valid DbPool manifest")
}

fn gauge(op: &RunningOperator, ns: &str, name: &str) -> Option<f64> {
    sample(
        &op.metrics.encode(),
        name,
        &[("namespace", ns), ("name", POOL)],
    )
}

/// The added round trip `at` seconds into a ramp of `ramp` seconds up and as many down.
fn added_round_trip(at: f64, ramp: f64, peak: Duration) -> Duration {
    let x = if at <= ramp {
        at / ramp
    } else {
        (2.0 * ramp - at).max(0.0) / ramp
    };
    peak.mul_f64(x * x)
}

#[tokio::main]
async fn main() {
    let peak = Duration::from_millis(env_u64("SLOW_PEAK_MS", 1500));
    let ramp = env_u64("SLOW_RAMP_SECS", 120) as f64;
    let tick = Duration::from_millis(env_u64("SLOW_TICK_MS", 500));
    let settle = Duration::from_secs(env_u64("SLOW_SETTLE_SECS", 240));
    let svg_path = std::env::var("SLOW_SVG")
        .unwrap_or_else(|_| format!("{}/docs/bench-slowness.svg", env!("CARGO_MANIFEST_DIR")));
    let load_before = load();

    let (client, ns) = namespace_with_secret("db", "password", APP_PASSWORD).await;
    let pg = PgServer::start().await;
    let proxy = FaultProxy::start(pg.addr()).await;
    let probes = Arc::new(Probes::default());
    let op = RunningOperator::start_observed(
        client.clone(),
        OperatorConfig {
            namespace: Some(ns.name().to_owned()),
            ..OperatorConfig::default()
        },
        probes.clone(),
    );
    create(&client, ns.name(), &manifest(proxy.port())).await;
    wait_status(
        &client,
        ns.name(),
        POOL,
        "Healthy",
        Duration::from_secs(60),
        |s| s.phase == Some(dbpool_operator::api::Phase::Healthy),
    )
    .await;
    let timeout_gauge = "dbpool_probe_stage_timeout_seconds";
    let srtt_gauge = "dbpool_probe_stage_srtt_seconds";
    wait_for(
        "the learned timeout at the floor",
        Duration::from_secs(60),
        || async { gauge(&op, ns.name(), timeout_gauge).filter(|t| *t <= 0.25) },
    )
    .await;
    let opens_before = open_count(&client, ns.name()).await;

    let start = Instant::now();
    *probes.start.lock().unwrap_or_else(|e| e.into_inner()) = Some(start);
    let mut ticks = Vec::new();
    let mut back_at_floor = None;
    loop {
        let at = start.elapsed().as_secs_f64();
        let ramping = at < 2.0 * ramp;
        let added = if ramping {
            added_round_trip(at, ramp, peak)
        } else {
            Duration::ZERO
        };
        proxy
            .set_mode(if added.is_zero() {
                Mode::Pass
            } else {
                Mode::Delay(added / 2)
            })
            .await;
        let learned = gauge(&op, ns.name(), timeout_gauge).unwrap_or_default();
        let srtt = gauge(&op, ns.name(), srtt_gauge).unwrap_or_default();
        ticks.push(Tick {
            at,
            added,
            learned,
            srtt,
        });
        if !ramping && learned <= 0.25 {
            back_at_floor = Some(at - 2.0 * ramp);
            break;
        }
        if start.elapsed() > Duration::from_secs_f64(2.0 * ramp) + settle {
            break;
        }
        tokio::time::sleep(tick).await;
    }
    let opens = open_count(&client, ns.name()).await - opens_before;
    let seen = probes
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    report(
        &ticks,
        &seen,
        opens,
        back_at_floor,
        peak,
        (&load_before, &load()),
    );
    let chart = chart(&ticks, &seen, peak);
    match std::fs::write(&svg_path, chart.render()) {
        Ok(()) => println!("chart written to {svg_path}"),
        Err(e) => println!("cannot write {svg_path}: {e}"),
    }
    drop(op);
    ns.cleanup().await;
    if opens != 0 {
        eprintln!("FAILED: {opens} breaker opens under slowness");
        std::process::exit(1);
    }
}

async fn open_count(client: &kube::Client, ns: &str) -> i64 {
    status(client, ns, POOL)
        .await
        .and_then(|s| s.breaker)
        .map_or(0, |b| b.open_count)
}

/// Prints a table (one line per 10 s) and the figures.
fn report(
    ticks: &[Tick],
    seen: &[(f64, Duration, bool)],
    opens: i64,
    back_at_floor: Option<f64>,
    peak: Duration,
    (load_before, load_after): (&str, &str),
) {
    println!("\n| t (s) | added round trip (ms) | learned stage timeout (ms) | its srtt (ms) |");
    println!("|---:|---:|---:|---:|");
    let mut next = 0.0;
    for t in ticks {
        if t.at >= next {
            println!(
                "| {:.0} | {} | {:.0} | {:.0} |",
                t.at,
                t.added.as_millis(),
                t.learned * 1000.0,
                t.srtt * 1000.0
            );
            next += 10.0;
        }
    }
    let failures: Vec<u128> = seen
        .iter()
        .filter(|(_, _, ok)| !ok)
        .map(|(_, d, _)| d.as_millis())
        .collect();
    let (mut run, mut most) = (0, 0);
    for (_, _, ok) in seen {
        run = if *ok { 0 } else { run + 1 };
        most = most.max(run);
    }
    let peak_learned = ticks.iter().map(|t| t.learned).fold(0.0, f64::max);
    let slowest = seen
        .iter()
        .map(|(_, d, _)| d.as_millis())
        .max()
        .unwrap_or(0);
    println!(
        "\nslowness: peak added round trip {} ms; probes {}; failed {} {failures:?} (most in a \
         row {most}); breaker opens {opens}; peak learned stage timeout {:.0} ms; slowest probe \
         {slowest} ms; learned timeout back at the 250 ms floor {} after the latency was gone; \
         load average before {load_before}, after {load_after}",
        peak.as_millis(),
        seen.len(),
        failures.len(),
        peak_learned * 1000.0,
        back_at_floor.map_or("never (within the settle time)".to_owned(), |s| format!(
            "{s:.0} s"
        )),
    );
}

fn chart(ticks: &[Tick], seen: &[(f64, Duration, bool)], peak: Duration) -> svg::Chart {
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    svg::Chart {
        title: format!(
            "Learned probe stage timeout while latency climbs to {} ms per round trip and back",
            peak.as_millis()
        ),
        lines: vec![
            svg::Line {
                name: "added round trip (fault proxy)".into(),
                colour: "#1f77b4",
                points: ticks.iter().map(|t| (t.at, ms(&t.added))).collect(),
            },
            svg::Line {
                name: "learned stage timeout (gauge)".into(),
                colour: "#ff7f0e",
                points: ticks.iter().map(|t| (t.at, t.learned * 1000.0)).collect(),
            },
            svg::Line {
                name: "its smoothed latency, srtt (gauge)".into(),
                colour: "#2ca02c",
                points: ticks.iter().map(|t| (t.at, t.srtt * 1000.0)).collect(),
            },
        ],
        dots: vec![
            svg::Dots {
                name: "probe wall time (3 queries), succeeded".into(),
                colour: "#7f7f7f",
                points: seen
                    .iter()
                    .filter(|p| p.2)
                    .map(|p| (p.0, ms(&p.1)))
                    .collect(),
            },
            svg::Dots {
                name: "probe wall time, failed".into(),
                colour: "#d62728",
                points: seen
                    .iter()
                    .filter(|p| !p.2)
                    .map(|p| (p.0, ms(&p.1)))
                    .collect(),
            },
        ],
    }
}
