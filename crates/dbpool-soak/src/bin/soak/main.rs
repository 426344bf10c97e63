//! `make soak`: the chaos soak (issue #27). Starts its own control plane (etcd and kube-apiserver
//! with an audit log and one token per identity), three PostgreSQL servers behind fault proxies,
//! three operator replicas as processes (each with its own apiserver user and its own apiserver
//! proxy), DbPools in three namespaces (two gated, all sharing targets, two isolated), three
//! dbpool-client processes (`dbpool-soak client …`, one per target); then runs the seeded
//! nemesis, waits for convergence, reads the audit log, the servers' and the operators' logs
//! into a history and judges it with the library's checkers.
//!
//!   SEED=27 SOAK_S=60 target/debug/dbpool-soak      # or: make soak SEED=27 SOAK_S=60
//!
//! `dbpool-soak client NAME PORT USER` is one of the run's client processes (its parent starts it).
//!
//! `dbpool-soak judge target/soak/…/history.json` runs the checkers again over a recorded history
//! (with the run's audit logs read again when they are beside it).
//!
//! Settings (environment): `SEED` (default: drawn from the clock, printed first), `SOAK_S`
//! (nemesis seconds, default 60), `SOAK_POOLS` (pools per namespace, default 15), `SOAK_OUT`
//! (report folder, default `target/soak/<seed>-<unix time>`), `SOAK_BIN_DIR` (etcd and
//! kube-apiserver; default: `hack/build-controlplane.sh`'s cache), `DBPOOL_OPERATOR_BIN`
//! (default `target/debug/dbpool-operator`). Exit code 0 when every checker passed.
//!
//! Modules: `client` (the client processes), `controlplane` (etcd, apiserver, tokens, audit), `world` (targets, replicas, pools,
//! clients), `nemesis` (the plan carried out), `observe` (samples, baseline, convergence),
//! `recorder` (the history being recorded, the clock), `report` (logs read, checkers, report).
//! This file holds only the settings and the run's sequence.

mod client;
mod controlplane;
mod nemesis;
mod observe;
mod recorder;
mod report;
mod world;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use dbpool_api::DbPool;
use dbpool_soak::{
    history::{ActionKind, History},
    plan::Plan,
};
use dbpool_testkit::{postgres::APP_PASSWORD, proxy::FaultProxy};
use k8s_openapi::api::{core::v1::Event, events::v1::Event as NewEvent};
use kube::Api;

use crate::{
    controlplane::ControlPlane,
    recorder::{Recorder, now_ms},
    world::{LEASE, NAMESPACES, Replica, Target, World},
};

struct Settings {
    seed: u64,
    soak_ms: i64,
    per_ns: usize,
    out: PathBuf,
    bin_dir: PathBuf,
    operator: PathBuf,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn settings() -> Result<Settings, String> {
    let num = |k: &str| {
        std::env::var(k)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| v.parse::<u64>().map_err(|e| format!("{k}: {e}")))
    };
    let seed = num("SEED")
        .transpose()?
        .unwrap_or_else(|| (now_ms() as u64) % 1_000_000);
    let soak_s = num("SOAK_S").transpose()?.unwrap_or(60);
    let per_ns = num("SOAK_POOLS").transpose()?.unwrap_or(15) as usize;
    let out = std::env::var_os("SOAK_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(format!("target/soak/{seed}-{}", now_ms() / 1000)));
    let bin_dir = match std::env::var_os("SOAK_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let out = std::process::Command::new(root().join("hack/build-controlplane.sh"))
                .output()
                .map_err(|e| format!("hack/build-controlplane.sh: {e}"))?;
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    let operator = std::env::var_os("DBPOOL_OPERATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/debug/dbpool-operator"));
    Ok(Settings {
        seed,
        soak_ms: soak_s as i64 * 1000,
        per_ns,
        out,
        bin_dir,
        operator,
    })
}

/// `dbpool-soak judge HISTORY.json`: the checkers again over a recorded history (the password
/// checker needs the run's texts and passwords, which a history does not keep: it is skipped).
fn judge_again(path: &Path) -> ExitCode {
    let history: Result<History, String> = std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()));
    let mut history = match history {
        Ok(h) => h,
        Err(e) => {
            eprintln!("[soak] {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    // The run's audit logs, when they are still beside the history, are read again (a history
    // recorded before rotated logs were read lacks the rotated part).
    let logs = report::audit_logs(&path.with_file_name("controlplane").join("audit.log"));
    if !logs.is_empty() {
        history.writes.clear();
        history.events.clear();
        for (_, text) in &logs {
            report::read_audit(&mut history, text);
        }
        println!(
            "read {} audit log files: {} status writes",
            logs.len(),
            history.writes.len()
        );
    }
    // The operators' logs beside it give the terms' starts (a history recorded before they were
    // kept lacks them).
    if history.terms.is_empty() {
        for i in 0..3 {
            let log = std::fs::read_to_string(path.with_file_name(format!("op-{i}.log")));
            let log = log.unwrap_or_default();
            history
                .terms
                .extend(log.lines().filter_map(dbpool_soak::oplog::parse_term));
        }
        history.terms.sort_by_key(|t| t.time);
        println!(
            "read {} term starts from the operators' logs",
            history.terms.len()
        );
    }
    for c in dbpool_soak::checks::replay_cost(&history, &Default::default()) {
        println!(
            "cost {}: {} credentialed attempts, the replay allows {}, {} unexplained, largest lag {:?} ms",
            c.target,
            c.seen,
            c.allowed,
            c.unexplained.len(),
            c.max_lag_ms
        );
    }
    let mut passed = true;
    for (name, violations) in dbpool_soak::checks::run(&history, &Default::default(), &[], &[]) {
        println!(
            "check {name}: {}",
            if violations.is_empty() {
                "PASS"
            } else {
                "FAIL"
            }
        );
        for v in &violations {
            println!(
                "  VIOLATION seed={} checker={} subject={}: {}",
                history.seed, v.checker, v.subject, v.message
            );
            v.slice.iter().for_each(|line| println!("    | {line}"));
        }
        passed &= violations.is_empty();
    }
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let [_, cmd, path] = args.as_slice()
        && cmd == "judge"
    {
        return judge_again(Path::new(path));
    }
    if let [_, cmd, name, port, user] = args.as_slice()
        && cmd == "client"
    {
        let Ok(port) = port.parse::<u16>() else {
            eprintln!("[soak client] bad port {port}");
            return ExitCode::from(2);
        };
        return match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(client::client_main(name, port, user)),
            Err(e) => {
                eprintln!("[soak client] tokio: {e}");
                ExitCode::from(2)
            }
        };
    }
    let settings = match settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("[soak] {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "soak seed {} (replay: make soak SEED={} SOAK_S={})",
        settings.seed,
        settings.seed,
        settings.soak_ms / 1000
    );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("[soak] tokio: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            result = run(&settings) => result,
            signal = interrupted() => Err(format!("{signal}: stopping what the run started")),
        }
    });
    // Dropping the runtime drops every task, and with them the world: the replicas are killed,
    // the servers stopped, the control plane stopped, also after SIGINT or SIGTERM.
    drop(runtime);
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            println!(
                "soak FAILED: seed {} (replay: make soak SEED={} SOAK_S={})",
                settings.seed,
                settings.seed,
                settings.soak_ms / 1000
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!(
                "[soak] seed {}: the run could not complete: {e}",
                settings.seed
            );
            ExitCode::from(2)
        }
    }
}

/// SIGINT or SIGTERM, by name.
async fn interrupted() -> &'static str {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

async fn build_world(s: &Settings) -> Result<Arc<World>, String> {
    std::fs::create_dir_all(&s.out).map_err(|e| format!("{}: {e}", s.out.display()))?;
    let cp = ControlPlane::start(&s.out.join("controlplane"), &s.bin_dir, 3).await?;
    let client = cp.client("soak-admin").await?;
    dbpool_testkit::kube::install_crd(&client).await;
    let mut targets = Vec::new();
    for i in 0..3 {
        targets.push(Target::start(i).await?);
    }
    world::namespaces_and_secrets(&client, &targets).await?;
    let mut replicas = Vec::new();
    for i in 0..3 {
        let proxy = FaultProxy::start(([127, 0, 0, 1], cp.port).into()).await;
        let user = format!("soak-op-{i}");
        let kubeconfig = cp.write_kubeconfig(&user, proxy.port())?;
        replicas.push(Replica {
            id: format!("op-{i}"),
            kubeconfig,
            proxy,
            proc: Mutex::new((None, 0, 0)),
            log: s.out.join(format!("op-{i}.log")),
        });
    }
    let mut passwords = vec![APP_PASSWORD.to_owned()];
    passwords.extend(
        targets
            .iter()
            .map(|t| t.password.lock().unwrap_or_else(|e| e.into_inner()).clone()),
    );
    let recorder = Recorder::default();
    recorder.lock().seed = s.seed;
    Ok(Arc::new(World {
        seed: s.seed,
        etcd_pid: cp.etcd_pid(),
        cp: tokio::sync::Mutex::new(cp),
        client,
        targets,
        replicas,
        pools: Mutex::default(),
        rec: recorder,
        passwords: Mutex::new(passwords),
        counter: Default::default(),
        operator_bin: s.operator.clone(),
        stop_clients: Default::default(),
        client_pids: Default::default(),
        client_ok: Default::default(),
        client_err: Default::default(),
    }))
}

async fn create_pools(world: &World, per_ns: usize) -> Result<(), String> {
    for (n, ns) in NAMESPACES.iter().enumerate() {
        for j in 0..per_ns {
            world
                .create_pool(
                    ns,
                    &format!("p{j}"),
                    j % world.targets.len(),
                    false,
                    n == 0 && j < 2,
                )
                .await?;
        }
    }
    world
        .create_pool(NAMESPACES[1], "iso", 0, true, false)
        .await?;
    world
        .create_pool(NAMESPACES[2], "iso", 1, true, false)
        .await?;
    Ok(())
}

async fn dumps(world: &World) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let pools: Api<DbPool> = Api::all(world.client.clone());
    if let Ok(list) = pools.list(&Default::default()).await {
        out.push((
            "DbPools".into(),
            serde_json::to_string(&list.items).unwrap_or_default(),
        ));
    }
    let events: Api<NewEvent> = Api::all(world.client.clone());
    if let Ok(list) = events.list(&Default::default()).await {
        out.push((
            "events".into(),
            serde_json::to_string(&list.items).unwrap_or_default(),
        ));
    }
    let core: Api<Event> = Api::all(world.client.clone());
    if let Ok(list) = core.list(&Default::default()).await {
        out.push((
            "core events".into(),
            serde_json::to_string(&list.items).unwrap_or_default(),
        ));
    }
    out
}

async fn run(s: &Settings) -> Result<bool, String> {
    let world = build_world(s).await?;
    for r in &world.replicas {
        r.start(&world.operator_bin)?;
    }
    create_pools(&world, s.per_ns).await?;
    let clients = (0..world.targets.len())
        .map(|t| world::spawn_client(&world, t))
        .collect::<Result<Vec<_>, _>>()?;
    eprintln!(
        "[soak] {} pools created; waiting for the fleet to be healthy",
        world.live(true).len()
    );
    let setup = observe::converge(&world).await;
    if let Some(c) = setup.iter().find(|c| c.at.is_none()) {
        return Err(format!(
            "setup: {} never showed {} (last {})",
            c.pool, c.expected, c.observed
        ));
    }
    let sampler = observe::spawn_sampler(world.clone());
    let audit = world.cp.lock().await.audit_log.clone();
    let live = observe::spawn_live_checks(world.clone(), audit.clone());
    let (sessions0, fds0, series0, _) = observe::resources(&world, &[]).await;

    let plan = Plan::generate(
        s.seed,
        s.soak_ms,
        world.targets.len(),
        LEASE.as_millis() as i64,
    );
    eprintln!(
        "[soak] nemesis: {} steps over {}s",
        plan.steps.len(),
        s.soak_ms / 1000
    );
    {
        let mut h = world.rec.lock();
        h.start = now_ms();
        h.last_fault_end = h.start;
    }
    nemesis::run(world.clone(), &plan).await;
    eprintln!("[soak] nemesis done; waiting for convergence");
    let convergence = observe::converge(&world).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let deleted: Vec<String> = world
        .rec
        .lock()
        .actions
        .iter()
        .filter(|a| a.kind == ActionKind::Delete)
        .map(|a| a.pool.clone())
        .collect();
    let (sessions1, fds1, series1, stale) = observe::resources(&world, &deleted).await;
    for c in clients {
        let (ok, err) = c.finish().await;
        world.client_ok.fetch_add(ok, Ordering::Relaxed);
        world.client_err.fetch_add(err, Ordering::Relaxed);
    }
    world.stop_clients.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let _ = live.await;
    let dumps = dumps(&world).await;
    for r in &world.replicas {
        r.kill();
    }
    let mut history: History = world.rec.lock().clone();
    history.convergence = convergence;
    history.leaks.baseline_sessions = sessions0;
    history.leaks.final_sessions = sessions1;
    history.leaks.fds = fds0.zip(fds1);
    history.leaks.series_per_pool = series0.zip(series1);
    history.leaks.deleted_with_series = stale;
    let texts = report::collect(&world, &mut history, &audit, dumps).await;
    let passwords = world
        .passwords
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let clients = (
        world.client_ok.load(Ordering::Relaxed),
        world.client_err.load(Ordering::Relaxed),
    );
    Ok(report::judge(
        &history, &plan, &passwords, &texts, &s.out, clients,
    ))
}
