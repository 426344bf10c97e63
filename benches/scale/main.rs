//! Scale and latency benchmark of the operator against the real control plane (`make bench`).
//!
//! For each N (default 100 and 1000; `BENCH_N="100 1000"` or `cargo bench --bench scale -- 100`)
//! the bench starts `BENCH_TARGETS` (4) PostgreSQL 15 servers with the test harness, creates N
//! DbPools spread round-robin over them in a fresh namespace, runs the operator on that namespace
//! and goes through these phases, printing one table per N:
//!
//! 1. setup: create the pools (30s interval); wait until every pool is Healthy.
//! 2. steady state, 30s interval: operator CPU and RSS, schedule fidelity, status writes.
//! 3. patch every pool to the short interval (5s); a window with a quiet database, then a window
//!    with connection churn on the database (what applications do all day).
//! 4. fault: stop enough servers to hit twice the force-reopen sample (one of four at N = 1000,
//!    all at N = 100); time to Open against the spec's schedule, detection overhead (crossing
//!    probe → watcher sees Open); start them again; time to Closed.
//! 5. force reopen: a sample of pools (openTimeout 10m, so only the annotation can close them).
//! 6. restart with a short status refresh: how fast a new operator resumes N pools, the spread of
//!    its first probes; then status writes per pool-hour with that refresh (checks the formula).
//! 7. restart with the default configuration; then every pool gets its own application name, so
//!    N connections instead of one per target: the cost that probe coalescing saves.
//! 8. recovery (only when `BENCH_PHASES` names it): pools with the default spec on servers of
//!    their own; server's "ready to accept connections" → watch sees Ready=True after 3 s and
//!    30 s outages, crash recovery and a fleet restarting together (issue 24).
//!
//! How it measures, without any change to the operator's behaviour:
//! - Probe instants and acknowledged writes: the operator runs under
//!   `controller::run_observed` with the bench's typed `Observer` (`capture`), which the
//!   controller calls right after a probe returns (finish instant, latency, outcome, fresh
//!   connection) and right after the apiserver acknowledges a status write. Start = finish −
//!   latency. A probe's planned instant is the previous probe's finish plus the interval (or
//!   the backoff delay from the engine's own `recovery::backoff_delay`, or openTimeout).
//! - Status writes, Open/Closed/Ready: a watch on DbPools in the bench (receipt instant, same host
//!   clock as the operator's MicroTime stamps).
//! - CPU and RSS: the operator runs as a child process of this bench (`BENCH_OPERATOR=child`, the
//!   default) which is this same binary calling `controller::run_observed` with a
//!   namespace-scoped `OperatorConfig` and its own `Metrics`: /proc/<pid>/stat and
//!   /proc/<pid>/status then show the operator alone. `BENCH_OPERATOR=inprocess` runs it on a
//!   dedicated runtime inside the bench instead (CPU from that runtime's threads; RSS is then the
//!   whole bench process).
//!
//! Modules: `settings` (what to run, the pools' policy), `procfs` (clock and /proc), `capture`
//! (the observer), `store` (what was seen, the watch), `operator` (the process under test),
//! `apiserver` (its /metrics), `ready` (ready lines and the Ready watch of the recovery phase),
//! `calibrate`, `run` (one N and shared helpers), `phases::*` (one
//! module per phase), `report` (tables and statistics). This file holds only the entry point
//! and the loop over N.
//!
//! Not part of `make test`. Needs the environment `make bench` starts (DBPOOL_TEST_KUBECONFIG).

use dbpool_testkit as support;

use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::OnceLock,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use dbpool_operator::api::GoDuration;
use kube::Client;

/// When the bench started, for the progress lines.
static START: OnceLock<Instant> = OnceLock::new();

/// A progress line on stderr, stamped with the seconds since the bench started.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!(
            "[bench {:>7.1}s] {}",
            $crate::START.get_or_init(std::time::Instant::now).elapsed().as_secs_f64(),
            format!($($arg)*)
        )
    };
}

mod apiserver;
mod calibrate;
mod capture;
mod operator;
mod phases;
mod procfs;
mod ready;
mod report;
mod run;
mod settings;
mod store;

use crate::{
    procfs::{load_average, machine_description, memory_kib},
    run::Run,
    settings::{CHILD_ENV, Mode, Settings},
    support::kube::{install_crd, kubectl},
};

fn main() {
    if std::env::var_os(CHILD_ENV).is_some() {
        operator::child_main();
        return;
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it, and a
    // ten-minute benchmark is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("scale is a benchmark: run it with `make bench` (cargo bench --bench scale)");
        return;
    }
    START.get_or_init(Instant::now);
    let settings = Settings::from_env();
    if settings.mode == Mode::InProcess {
        operator::install_log();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-harness")
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(bench(settings));
}

/// The kube-apiserver's version, from `kubectl version`.
async fn server_version() -> String {
    let version = kubectl(["version", "-o", "json"]).await;
    String::from_utf8_lossy(&version.stdout)
        .lines()
        .rfind(|l| l.contains("gitVersion"))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().trim_end_matches(',').trim_matches('"').to_owned())
        .unwrap_or_default()
}

/// Calibrates, runs every N, prints every table and writes the report.
async fn bench(s: Settings) {
    let client = support::kube::client().await;
    install_crd(&client).await;
    let machine = machine_description();
    let server = server_version().await;
    progress!("machine: {machine}; kube-apiserver {server}; settings {s:?}");
    let calibration = calibrate::calibrate(&client).await;
    let mut out = format!(
        "## dbpool-operator scale benchmark\n\nMachine: {machine}. kube-apiserver {server}, \
         PostgreSQL 15, all on 127.0.0.1. Settings: {} targets, steady interval {}, short \
         interval {}, windows {} s, force-reopen sample {}, short status_refresh {}.\n\n\
         Control plane calibration (one write at a time, no operator): {calibration}\n\n",
        s.targets,
        GoDuration(s.steady_interval),
        GoDuration(s.fast_interval),
        s.window.as_secs(),
        s.sample,
        GoDuration(s.short_refresh)
    );
    run_sizes(&s, &client, &mut out).await;
    let _ = writeln!(out, "Load average at the end: {}.", load_average());
    let (hwm, _) = memory_kib("/proc/self/status");
    progress!("bench process VmHWM {:.1} MiB", hwm as f64 / 1024.0);
    write_report(&s, &out);
}

/// One run per N; every table is printed and appended to `out`.
async fn run_sizes(s: &Settings, client: &Client, out: &mut String) {
    for &n in &s.sizes {
        let run = Run::new(s, n, client.clone()).await;
        let report = run.execute().await;
        let text = report.markdown();
        println!("\n{text}");
        out.push_str(&text);
        out.push('\n');
    }
}

/// Writes the report to `BENCH_OUT` or `.local/bench-results/scale-<unix time>.md`.
fn write_report(s: &Settings, out: &str) {
    let path = s.out.clone().unwrap_or_else(|| {
        PathBuf::from(".local/bench-results").join(format!(
            "scale-{}.md",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        ))
    });
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&path, out) {
        Ok(()) => progress!("report written to {}", path.display()),
        Err(err) => progress!("cannot write {}: {err}", path.display()),
    }
}
