//! `make bench-client`: dbpool-client against deadpool-postgres, bb8, sqlx and PgBouncer through
//! real PostgreSQL 15 outages, side by side in one run. See docs/benchmarks.md, "Client pools".
//!
//! Lives here: the entry point (settings from the environment, the machine, the order of the
//! runs, printing and saving the report and the plots). Must not live here: the pools (`pools`),
//! PgBouncer's process (`bouncer`), the load (`load`), a run's timeline (`scenario`, sampled in
//! `timeline`), interleaved steady rounds (`steady`), connect counting (`netcount`), tables
//! (`report`), plots (`plot`).
//!
//! Environment (all optional): `BENCH_CLIENT_SCENARIOS` (`3s,30s,idle`), `BENCH_CLIENT_POOLS`
//! (`deadpool,deadpool-eq,bb8,bb8-eq,sqlx,sqlx-eq,pgbouncer,pgbouncer-retry1,ours,ours-short`),
//! `BENCH_CLIENT_OPS` (`select,checkout`: the operations of the steady rounds),
//! `BENCH_CLIENT_TLS_ROUNDS` (0: no select rounds on a server with ssl = on),
//! `BENCH_CLIENT_STEADY_S` (5), `BENCH_CLIENT_CAP_S` (70), `BENCH_CLIENT_ROUNDS` (3 interleaved
//! steady rounds of 2 s per configuration and operation; 0: none), `BENCH_CLIENT_LOG` (a tracing
//! filter, e.g. `dbpool_client=debug`: the pools' decisions on stderr), `BENCH_CLIENT_OUT` (a file the
//! report is also written to), `BENCH_CLIENT_PLOTS` (a directory for the SVG timelines, one per
//! scenario; none when unset).

mod bouncer;
mod cluster;
mod load;
mod netcount;
mod plot;
mod pools;
mod report;
mod scenario;
mod steady;
mod timeline;

use std::{fmt::Write as _, time::Duration};

use dbpool_testkit::postgres::PgServer;
use pools::{Op, PoolKind};
use scenario::{Scenario, Settings};

fn env_list(name: &str) -> Option<Vec<String>> {
    let v = std::env::var(name).ok()?;
    let items: Vec<String> = v
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    (!items.is_empty()).then_some(items)
}

fn env_secs(name: &str, default: u64) -> Duration {
    let secs = std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(default)
        .clamp(1, 600);
    Duration::from_secs(secs)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// nproc, CPU model, memory, kernel, load average.
fn machine() -> String {
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown", str::trim)
        .to_owned();
    let mem = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or_else(
            || "unknown".to_owned(),
            |kb| format!("{:.1} GiB", kb as f64 / 1048576.0),
        );
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    format!("{cpus} CPUs ({model}), {mem} memory, Linux {kernel}")
}

fn loadavg() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The load (pools, their tasks, the callers) runs on a multi-thread runtime of one worker per
/// core; the scenario's clock and `pg_ctl` run on a runtime of their own on another thread, so
/// a pool that starves its runtime shows as a pool that does not recover, not as a benchmark
/// that stops.
fn main() {
    if let Ok(filter) = std::env::var("BENCH_CLIENT_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let runtimes = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .and_then(|load| {
            let control = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok((load, control))
        });
    match runtimes {
        Ok((load, control)) => control.block_on(bench(load.handle().clone())),
        Err(e) => {
            eprintln!("bench-client: cannot start the runtimes: {e}");
            std::process::exit(1);
        }
    }
}

async fn bench(load: tokio::runtime::Handle) {
    let scenarios: Vec<Scenario> = match env_list("BENCH_CLIENT_SCENARIOS") {
        Some(ids) => Scenario::ALL
            .into_iter()
            .filter(|s| ids.iter().any(|i| i == s.id()))
            .collect(),
        None => Scenario::ALL.to_vec(),
    };
    let mut kinds: Vec<PoolKind> = match env_list("BENCH_CLIENT_POOLS") {
        Some(ids) => PoolKind::ALL
            .into_iter()
            .filter(|k| ids.iter().any(|i| i == k.id()))
            .collect(),
        None => PoolKind::ALL.to_vec(),
    };
    let settings = Settings {
        warmup: Duration::from_secs(1),
        steady: env_secs("BENCH_CLIENT_STEADY_S", 5),
        cap: env_secs("BENCH_CLIENT_CAP_S", 70),
        tail: Duration::from_secs(1),
        early: Duration::from_secs(5),
    };
    let rounds = std::env::var("BENCH_CLIENT_ROUNDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(3)
        .min(20);
    let load_start = loadavg();
    let started = jiff::Timestamp::now();
    let private = netcount::private_netns();
    eprintln!(
        "bench-client: {} scenario(s) x {} pool configuration(s); {}",
        scenarios.len(),
        kinds.len(),
        match &private {
            Some(ns) =>
                format!("network namespace {ns}: connect counts are this benchmark's alone"),
            None =>
                "host network namespace: connect counts include other processes' connects".into(),
        }
    );

    let ops: Vec<Op> = match env_list("BENCH_CLIENT_OPS") {
        Some(ids) => [Op::SimpleSelect, Op::CheckoutOnly]
            .into_iter()
            .filter(|o| ids.iter().any(|i| i == o.id()))
            .collect(),
        None => vec![Op::SimpleSelect, Op::CheckoutOnly],
    };
    let plots = std::env::var_os("BENCH_CLIENT_PLOTS").map(std::path::PathBuf::from);

    let mut pg = PgServer::start().await;
    let mut dbpool_note = "dbpool-client standalone (no DbPool, no Kubernetes)".to_owned();
    if kinds.iter().any(|k| k.follows_dbpool()) {
        let logs = plots.clone().unwrap_or_else(std::env::temp_dir);
        match load
            .spawn(async move { cluster::Cluster::start(&logs).await })
            .await
        {
            Ok(Ok(c)) => {
                eprintln!(
                    "bench-client: DbPool mode: operator log {}",
                    c.log.display()
                );
                dbpool_note = "dbpool-client standalone (no DbPool, no Kubernetes), and with a DbPool (the operator's release binary on a real kube-apiserver in the same namespace)".into();
                let _ = cluster::CLUSTER.set(c);
            }
            Ok(Err(why)) => {
                eprintln!("bench-client: the DbPool mode is skipped: {why}");
                kinds.retain(|k| !k.follows_dbpool());
            }
            Err(e) => {
                eprintln!("bench-client: the DbPool mode is skipped: {e}");
                kinds.retain(|k| !k.follows_dbpool());
            }
        }
    }
    let syns = netcount::PortSyns::install(pg.port());
    let mut out = String::new();
    let mut targets = Vec::new();
    for &op in ops.iter().filter(|_| rounds > 0) {
        match steady::rounds(
            &kinds,
            &pg,
            op,
            rounds,
            settings.warmup,
            Duration::from_secs(2),
            &load,
        )
        .await
        {
            Ok(ops) => {
                let (t, lines) = steady::table(&kinds, op, &ops);
                eprintln!("{t}");
                out.push_str(&t);
                let _ = writeln!(out, "\nLoad average after these rounds: {}\n", loadavg());
                targets.extend(lines);
            }
            Err(e) => eprintln!("bench-client: steady rounds: {e}"),
        }
    }
    // Why an outside run saw fewer ops/s than deadpool (#30): dbpool-client's default sslmode
    // is `prefer`, which takes TLS wherever the server offers it, while the peers connect with
    // NoTls. The same select rounds on a server with ssl = on tell the statement path's TLS cost
    // from the pool's own: deadpool (NoTls), ours at its defaults (TLS) and ours without TLS.
    if rounds > 0 && std::env::var("BENCH_CLIENT_TLS_ROUNDS").map_or(true, |v| v != "0") {
        let tls_kinds = [
            PoolKind::DeadpoolDefault,
            PoolKind::OursDefault,
            PoolKind::OursNoTls,
        ];
        let tls_pg = PgServer::options().tls().start().await;
        match steady::rounds(
            &tls_kinds,
            &tls_pg,
            Op::SimpleSelect,
            rounds,
            settings.warmup,
            Duration::from_secs(2),
            &load,
        )
        .await
        {
            Ok(ops) => {
                let (t, lines) = steady::table(&tls_kinds, Op::SimpleSelect, &ops);
                let t = t.replacen(
                    "interleaved rounds:",
                    "interleaved rounds on a server with ssl = on:",
                    1,
                );
                eprintln!("{t}");
                out.push_str(&t);
                let _ = writeln!(out, "\nLoad average after these rounds: {}\n", loadavg());
                targets.extend(
                    lines
                        .into_iter()
                        .map(|l| l.replacen("steady (", "steady on ssl = on (", 1)),
                );
            }
            Err(e) => eprintln!("bench-client: TLS rounds: {e}"),
        }
        drop(tls_pg);
    }
    for &scenario in &scenarios {
        let mut runs = Vec::new();
        for &kind in &kinds {
            eprintln!("bench-client: {} / {} ...", scenario.id(), kind.id());
            match scenario::run(scenario, kind, &mut pg, settings, &load, syns.as_ref()).await {
                Ok(r) => runs.push(r),
                Err(e) => eprintln!("bench-client: {} / {}: {e}", scenario.id(), kind.id()),
            }
        }
        let t = report::table(scenario, &runs);
        eprintln!("{t}");
        out.push_str(&t);
        let _ = writeln!(out, "\nLoad average after this scenario: {}\n", loadavg());
        if let Some(dir) = &plots {
            let path = dir.join(format!("{}.svg", scenario.id()));
            let written = std::fs::create_dir_all(dir)
                .map_err(|e| format!("{}: {e}", dir.display()))
                .and_then(|()| plot::write_svg(&path, scenario, &runs));
            match written {
                Ok(()) => {
                    eprintln!("bench-client: plot {}", path.display());
                    let _ = writeln!(out, "Timeline: `{}`\n", path.display());
                }
                Err(e) => eprintln!("bench-client: {e}"),
            }
        }
        targets.extend(report::targets(scenario, &runs));
    }

    let mut doc = String::new();
    let _ = writeln!(doc, "## Client pools: run of {started}\n");
    let _ = writeln!(doc, "- Machine: {}", machine());
    let _ = writeln!(
        doc,
        "- Load average (1/5/15 min) at start: {load_start}; at end: {}",
        loadavg()
    );
    let _ = writeln!(
        doc,
        "- Connect counting: `/proc/net/snmp` Tcp ActiveOpens/AttemptFails deltas, {}",
        if private.is_some() {
            "in a network namespace made for the run, where nothing else connects (exact)"
        } else {
            "in the host's network namespace (includes other processes' connects)"
        }
    );
    let _ = writeln!(
        doc,
        "- Load: {} tasks, each looping get() + `SELECT 1` (simple query) + release; pools max 10; warm-up {:?}, steady window {:?}, cap after ready {:?}, tail {:?}; {dbpool_note}\n",
        scenario::TASKS,
        settings.warmup,
        settings.steady,
        settings.cap,
        settings.tail
    );
    doc.push_str(&report::configurations(&kinds));
    doc.push('\n');
    doc.push_str(&out);
    doc.push_str("### Targets (dbpool-client, #30)\n\n");
    for t in &targets {
        let _ = writeln!(doc, "{t}");
    }
    if let Some(c) = cluster::CLUSTER.get() {
        let _ = load.spawn(async move { c.stop().await }).await;
    }
    println!("{doc}");
    if let Ok(path) = std::env::var("BENCH_CLIENT_OUT")
        && let Err(e) = std::fs::write(&path, &doc)
    {
        eprintln!("bench-client: cannot write {path}: {e}");
    }
}
