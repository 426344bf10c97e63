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
//!
//! How it measures, without any change to the operator:
//! - Probe instants: the operator's own `probe finished` debug event (owner, latency_ms, outcome,
//!   fresh) is captured by a tracing layer installed around `controller::run`; start = finish −
//!   latency. The controller's `status written` event gives the instant each write was
//!   acknowledged. A probe's planned instant is the previous probe's finish plus the interval (or
//!   the backoff delay, or openTimeout), exactly the engine's rule.
//! - Status writes, Open/Closed/Ready: a watch on DbPools in the bench (receipt instant, same host
//!   clock as the operator's MicroTime stamps).
//! - CPU and RSS: the operator runs as a child process of this bench (`BENCH_OPERATOR=child`, the
//!   default) which is this same binary calling `controller::run` with a namespace-scoped
//!   `OperatorConfig` and its own `Metrics`: /proc/<pid>/stat and /proc/<pid>/status then show the
//!   operator alone. `BENCH_OPERATOR=inprocess` runs it on a dedicated runtime inside the bench
//!   instead (CPU from that runtime's threads; RSS is then the whole bench process).
//!
//! Not part of `make test`. Needs the environment `make bench` starts (DBPOOL_TEST_KUBECONFIG).

use dbpool_testkit as support;

use std::{
    collections::HashMap,
    fmt::Write as _,
    hash::{DefaultHasher, Hash, Hasher},
    io::Write as _,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use dbpool_operator::{
    api::{BreakerState, CONDITION_READY, DbPool, FORCE_REOPEN_ANNOTATION, Phase},
    controller::{self, OperatorConfig},
    metrics::Metrics,
};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use support::{
    kube::{TestNamespace, create_consenting_secret, install_crd, kubeconfig_path, kubectl},
    postgres::{APP_DB, APP_PASSWORD, APP_USER, PgServer},
    wait::wait_for,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    task::JoinHandle,
};
use tracing::field::{Field, Visit};
use tracing_subscriber::{Layer, filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

/// Set in the environment of the child process that runs the operator.
const CHILD_ENV: &str = "DBPOOL_BENCH_OPERATOR_CHILD";
const SECRET: &str = "db-credentials";
const KEY: &str = "password";

// The recovery policy of every pool (jitter 0, so the theoretical schedule is exact).
const INITIAL_DELAY: Duration = Duration::from_millis(500);
const MAX_DELAY: Duration = Duration::from_secs(2);
const FAILURE_THRESHOLD: usize = 3;
const OPEN_TIMEOUT: Duration = Duration::from_secs(4);
/// openTimeout of the force-reopen sample: only the annotation closes their breaker.
const LONG_OPEN_TIMEOUT: &str = "10m";
/// Writes to the apiserver in flight at once when creating or patching pools.
const API_CONCURRENCY: usize = 16;

static START: OnceLock<Instant> = OnceLock::new();

macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!(
            "[bench {:>7.1}s] {}",
            START.get_or_init(Instant::now).elapsed().as_secs_f64(),
            format!($($arg)*)
        )
    };
}

fn main() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child_main();
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
        install_subscriber(Box::new(|record| {
            let sink = INPROC_SINK.lock().ok().and_then(|s| s.clone());
            let Some((store, op)) = sink else {
                return;
            };
            match record {
                Record::Probe(owner, finish_us, latency_ms, ok, fresh) => {
                    if let Some(pool) = pool_index(owner) {
                        let event = ProbeEvent::new(op, pool, finish_us, latency_ms, ok, fresh);
                        store.push_probe(event);
                    }
                }
                Record::Write(pool, at_us, phase) => {
                    if let Some(pool) = pool_index(pool) {
                        store.push_ack(pool, at_us, phase);
                    }
                }
            }
        }));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-harness")
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(bench(settings));
}

// ---------------------------------------------------------------------------------------------
// Settings

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Child,
    InProcess,
}

#[derive(Clone, Debug)]
struct Settings {
    sizes: Vec<usize>,
    targets: usize,
    mode: Mode,
    steady_interval: Duration,
    steady_window: Option<Duration>,
    fast_interval: Duration,
    window: Duration,
    sample: usize,
    short_refresh: Duration,
    distinct: bool,
    phases: Vec<String>,
    out: Option<PathBuf>,
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let parsed = value.trim().parse().ok();
    assert!(parsed.is_some(), "{name}={value:?} is not a whole number");
    parsed
}

impl Settings {
    fn from_env() -> Self {
        let mut sizes: Vec<usize> = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with('-'))
            .filter_map(|a| a.parse().ok())
            .collect();
        if sizes.is_empty() {
            sizes = std::env::var("BENCH_N")
                .unwrap_or_else(|_| "100 1000".to_owned())
                .split([' ', ','])
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().expect("BENCH_N: numbers such as \"100 1000\""))
                .collect();
        }
        let mode = match std::env::var("BENCH_OPERATOR").as_deref() {
            Ok("inprocess") => Mode::InProcess,
            Ok("child") | Err(_) => Mode::Child,
            Ok(other) => panic!("BENCH_OPERATOR={other:?}: use child or inprocess"),
        };
        let secs = |name: &str, default: u64| Duration::from_secs(env_u64(name).unwrap_or(default));
        Self {
            sizes,
            targets: env_u64("BENCH_TARGETS").unwrap_or(4).max(1) as usize,
            mode,
            steady_interval: secs("BENCH_STEADY_INTERVAL", 30),
            steady_window: env_u64("BENCH_STEADY_SECS").map(Duration::from_secs),
            fast_interval: secs("BENCH_FAST_INTERVAL", 5),
            window: secs("BENCH_WINDOW_SECS", 20),
            sample: env_u64("BENCH_SAMPLE").unwrap_or(50) as usize,
            short_refresh: secs("BENCH_SHORT_REFRESH_SECS", 10),
            distinct: env_u64("BENCH_DISTINCT").unwrap_or(1) != 0,
            phases: std::env::var("BENCH_PHASES")
                .unwrap_or_else(|_| "steady,fast,fault,restart,coalescing".to_owned())
                .split(',')
                .map(|p| p.trim().to_owned())
                .collect(),
            out: std::env::var_os("BENCH_OUT").map(PathBuf::from),
        }
    }

    /// The steady-state window: five intervals for 1,000 pools and more, three below.
    fn steady_window(&self, n: usize) -> Duration {
        self.steady_window
            .unwrap_or(self.steady_interval * if n >= 1000 { 5 } else { 3 })
    }
}

// ---------------------------------------------------------------------------------------------
// Time, /proc and small statistics

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn micro(t: &MicroTime) -> i64 {
    t.0.as_microsecond()
}

fn us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn go_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Delay `i` (from 0) of the backoff the pools use.
fn backoff_delay(i: usize) -> Duration {
    let factor = 2u32.saturating_pow(u32::try_from(i).unwrap_or(u32::MAX));
    INITIAL_DELAY.saturating_mul(factor).min(MAX_DELAY)
}

fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The fields of a /proc/<pid>/stat line after the command name: [0] is field 3 (state).
fn stat_fields(text: &str) -> Option<Vec<&str>> {
    let close = text.rfind(')')?;
    Some(text.get(close + 2..)?.split_whitespace().collect())
}

/// utime + stime (+ cutime + cstime when `children`) of a /proc stat text, in ticks.
fn stat_ticks(text: &str, children: bool) -> u64 {
    let Some(f) = stat_fields(text) else {
        return 0;
    };
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let own = field(11) + field(12);
    if children {
        own + field(13) + field(14)
    } else {
        own
    }
}

/// (VmHWM, VmRSS) in KiB of a /proc/<pid>/status file.
fn memory_kib(status_path: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(status_path).unwrap_or_default();
    let value = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (value("VmHWM:"), value("VmRSS:"))
}

/// The apiserver's port, from the kubeconfig the bench uses.
fn apiserver_port() -> Option<u16> {
    let text = std::fs::read_to_string(kubeconfig_path()).ok()?;
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))?;
    server
        .rsplit(':')
        .next()?
        .trim_end_matches('/')
        .parse()
        .ok()
}

/// Established TCP connections of process `pid` to 127.0.0.1:`port`.
fn tcp_connections(pid: &str, port: u16) -> Option<usize> {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path())
            && let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_owned());
        }
    }
    let mut count = 0;
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let remote_port = f
                .get(2)
                .and_then(|r| r.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if remote_port == Some(port)
                && f.get(3) == Some(&"01")
                && f.get(9).is_some_and(|i| inodes.contains(*i))
            {
                count += 1;
            }
        }
    }
    Some(count)
}

/// CPU seconds of the PostgreSQL servers (postmasters, their live children and the children they
/// reaped) and the number of server processes.
fn postgres_usage(postmasters: &[u32]) -> (f64, usize) {
    let mut ticks = 0;
    let mut processes = 0;
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid = stat_fields(&text)
                .and_then(|f| f.get(1).and_then(|v| v.parse::<u32>().ok()))
                .unwrap_or(0);
            if postmasters.contains(&pid) {
                ticks += stat_ticks(&text, true);
                processes += 1;
            } else if postmasters.contains(&ppid) {
                ticks += stat_ticks(&text, false);
                processes += 1;
            }
        }
    }
    (ticks as f64 / clk_tck(), processes)
}

/// CPU seconds of kube-apiserver plus etcd, when the environment's pid files are at hand
/// (`DBPOOL_ENV_DIR/run/{apiserver,etcd}.pid`, which `make bench` provides).
fn control_plane_cpu() -> Option<f64> {
    let run = PathBuf::from(std::env::var_os("DBPOOL_ENV_DIR")?).join("run");
    let mut ticks = 0;
    for name in ["apiserver", "etcd"] {
        let pid = std::fs::read_to_string(run.join(format!("{name}.pid"))).ok()?;
        let text = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).ok()?;
        ticks += stat_ticks(&text, true);
    }
    Some(ticks as f64 / clk_tck())
}

#[derive(Clone, Copy, Debug)]
struct Stats {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

fn stats(mut values: Vec<f64>) -> Option<Stats> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let index = ((p / 100.0) * values.len() as f64).ceil() as usize;
        values[index.clamp(1, values.len()) - 1]
    };
    Some(Stats {
        n: values.len(),
        p50: rank(50.0),
        p99: rank(99.0),
        max: values[values.len() - 1],
    })
}

fn ms(v: f64) -> String {
    if v.abs() >= 10_000.0 {
        format!("{:.1} s", v / 1000.0)
    } else if v.abs() >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.1} ms")
    }
}

fn show(s: Option<Stats>) -> String {
    match s {
        Some(s) => format!(
            "p50 {} · p99 {} · max {} (n={})",
            ms(s.p50),
            ms(s.p99),
            ms(s.max),
            s.n
        ),
        None => "no samples".to_owned(),
    }
}

fn verdict(met: bool) -> String {
    if met { "met" } else { "**missed**" }.to_owned()
}

// ---------------------------------------------------------------------------------------------
// Probe events: a tracing layer on the operator's `probe finished` event

/// What the layer reports: a finished probe, or an acknowledged status write.
enum Record<'a> {
    /// (owner, finish instant µs, latency ms, success, fresh connection)
    Probe(&'a str, i64, u64, bool, bool),
    /// (pool, instant µs the apiserver acknowledged the write, phase written)
    Write(&'a str, i64, &'a str),
}

type Sink = Box<dyn Fn(Record<'_>) + Send + Sync>;

/// Reports the operator's `probe finished` (probe module) and `status written` (controller)
/// debug events to the sink.
struct ProbeLayer {
    sink: Sink,
}

#[derive(Default)]
struct ProbeFields {
    owner: Option<String>,
    pool: Option<String>,
    phase: Option<String>,
    message: Option<String>,
    latency_ms: Option<u64>,
    outcome: Option<String>,
    fresh: bool,
}

impl Visit for ProbeFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "owner" => self.owner = Some(value.to_owned()),
            "pool" => self.pool = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "latency_ms" {
            self.latency_ms = Some(value);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "latency_ms" {
            self.latency_ms = u64::try_from(value).ok();
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "fresh" {
            self.fresh = value;
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = || format!("{value:?}").trim_matches('"').to_owned();
        match field.name() {
            "outcome" => self.outcome = Some(text()),
            "owner" => self.owner = Some(text()),
            "pool" => self.pool = Some(text()),
            "phase" => self.phase = Some(text()),
            "message" => self.message = Some(text()),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for ProbeLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let at_us = now_us();
        let mut fields = ProbeFields::default();
        event.record(&mut fields);
        if let (Some(owner), Some(latency)) = (&fields.owner, fields.latency_ms) {
            let ok = fields.outcome.as_deref() == Some("Success");
            (self.sink)(Record::Probe(owner, at_us, latency, ok, fields.fresh));
        } else if let (Some(pool), Some("status written")) =
            (&fields.pool, fields.message.as_deref())
        {
            let phase = fields.phase.as_deref().unwrap_or("None");
            (self.sink)(Record::Write(pool, at_us, phase));
        }
    }
}

/// Installs the probe layer (the probe module's and the controller's debug events only) and a
/// log on stderr: warnings, or the targets in `BENCH_OPERATOR_LOG` (e.g. `warn,kube=debug`).
fn install_subscriber(sink: Sink) {
    let probes = ProbeLayer { sink }.with_filter(
        Targets::new()
            .with_target("dbpool_operator::probe", tracing::Level::DEBUG)
            .with_target("dbpool_operator::controller", tracing::Level::DEBUG),
    );
    let log_filter = std::env::var("BENCH_OPERATOR_LOG")
        .ok()
        .and_then(|f| f.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::WARN));
    let warnings = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_filter(log_filter);
    tracing_subscriber::registry()
        .with(probes)
        .with(warnings)
        .init();
}

/// The in-process operator's sink: the store of the current run and the operator generation.
static INPROC_SINK: Mutex<Option<(Arc<Store>, u32)>> = Mutex::new(None);

/// The child process: the operator on the namespace it is given, probe events on stdout as
/// `P <owner> <finish µs> <latency ms> <ok 0/1> <fresh 0/1>` lines, flushed every 20ms.
fn child_main() {
    let namespace = std::env::var("BENCH_CHILD_NS").expect("BENCH_CHILD_NS");
    let refresh = Duration::from_millis(env_u64("BENCH_CHILD_REFRESH_MS").unwrap_or(300_000));
    let instance = std::env::var("BENCH_CHILD_INSTANCE").unwrap_or_else(|_| "bench".to_owned());
    let buffer = Arc::new(Mutex::new(Vec::<u8>::with_capacity(1 << 16)));
    let writer = buffer.clone();
    std::thread::spawn(move || {
        let mut stdout = std::io::stdout();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let chunk = std::mem::take(&mut *writer.lock().unwrap_or_else(|e| e.into_inner()));
            // The bench is gone (broken pipe): so is the reason to run.
            if !chunk.is_empty() && (stdout.write_all(&chunk).is_err() || stdout.flush().is_err()) {
                std::process::exit(0);
            }
        }
    });
    install_subscriber(Box::new(move |record| {
        let mut buf = buffer.lock().unwrap_or_else(|e| e.into_inner());
        let _ = match record {
            Record::Probe(owner, finish_us, latency_ms, ok, fresh) => writeln!(
                buf,
                "P {owner} {finish_us} {latency_ms} {} {}",
                u8::from(ok),
                u8::from(fresh)
            ),
            Record::Write(pool, at_us, phase) => writeln!(buf, "W {pool} {at_us} {phase}"),
        };
    }));
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async move {
        let client = support::kube::client().await;
        let config = OperatorConfig {
            namespace: Some(namespace),
            status_refresh: refresh,
            instance,
            ..OperatorConfig::default()
        };
        controller::run(
            client,
            config,
            Arc::new(Metrics::new()),
            std::future::pending(),
        )
        .await
        .expect("operator run");
    });
}

// ---------------------------------------------------------------------------------------------
// What the bench observes

#[derive(Clone, Copy, Debug)]
struct ProbeEvent {
    /// Which operator (generation) ran it.
    op: u32,
    pool: u32,
    start_us: i64,
    finish_us: i64,
    ok: bool,
    fresh: bool,
}

impl ProbeEvent {
    fn new(op: u32, pool: u32, finish_us: i64, latency_ms: u64, ok: bool, fresh: bool) -> Self {
        let latency_us = i64::try_from(latency_ms.saturating_mul(1000)).unwrap_or(0);
        Self {
            op,
            pool,
            start_us: finish_us - latency_us,
            finish_us,
            ok,
            fresh,
        }
    }
}

/// A pool's status as the watcher saw it.
#[derive(Clone, Debug, Default)]
struct Snap {
    phase: Option<Phase>,
    breaker: Option<BreakerState>,
    next_probe_us: Option<i64>,
    last_failure_us: Option<i64>,
    ready: Option<bool>,
    observed_generation: Option<i64>,
    generation: Option<i64>,
    force_token: Option<String>,
}

impl Snap {
    fn of(pool: &DbPool) -> Self {
        let status = pool.status.as_ref();
        let breaker = status.and_then(|s| s.breaker.as_ref());
        Self {
            phase: status.and_then(|s| s.phase),
            breaker: breaker.map(|b| b.state),
            next_probe_us: breaker.and_then(|b| b.next_probe_at.as_ref()).map(micro),
            last_failure_us: status.and_then(|s| s.last_failure_time.as_ref()).map(micro),
            ready: status.and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == CONDITION_READY)
                    .map(|c| c.status == "True")
            }),
            observed_generation: status.and_then(|s| s.observed_generation),
            generation: pool.metadata.generation,
            force_token: status
                .and_then(|s| s.last_force_reopen.as_ref())
                .map(|r| r.token.clone()),
        }
    }
}

/// One watch event of one pool.
#[derive(Clone, Debug)]
struct Obs {
    at_us: i64,
    pool: u32,
    status_changed: bool,
    snap: Snap,
}

/// Everything a run observed: probe events (from the operator) and watch events (apiserver).
struct Store {
    n: usize,
    probes: Mutex<Vec<ProbeEvent>>,
    /// Status writes the apiserver acknowledged: (pool, instant µs, phase written).
    acks: Mutex<Vec<(u32, i64, String)>>,
    obs: Mutex<Vec<Obs>>,
    latest: Mutex<Vec<Option<(i64, Snap)>>>,
    relists: AtomicU32,
}

fn pool_name(i: usize) -> String {
    format!("p{i:05}")
}

/// The pool index of an owner key "namespace/pNNNNN".
fn pool_index(owner: &str) -> Option<u32> {
    owner.rsplit('/').next()?.strip_prefix('p')?.parse().ok()
}

impl Store {
    fn new(n: usize) -> Self {
        Self {
            n,
            probes: Mutex::new(Vec::with_capacity(n * 64)),
            acks: Mutex::new(Vec::new()),
            obs: Mutex::new(Vec::with_capacity(n * 16)),
            latest: Mutex::new(vec![None; n]),
            relists: AtomicU32::new(0),
        }
    }

    fn push_probe(&self, event: ProbeEvent) {
        if (event.pool as usize) < self.n
            && let Ok(mut probes) = self.probes.lock()
        {
            probes.push(event);
        }
    }

    fn push_ack(&self, pool: u32, at_us: i64, phase: &str) {
        if (pool as usize) < self.n
            && let Ok(mut acks) = self.acks.lock()
        {
            acks.push((pool, at_us, phase.to_owned()));
        }
    }

    fn acks(&self) -> Vec<(u32, i64, String)> {
        self.acks.lock().map(|a| a.clone()).unwrap_or_default()
    }

    fn probes(&self) -> Vec<ProbeEvent> {
        self.probes.lock().map(|p| p.clone()).unwrap_or_default()
    }

    fn observations(&self) -> Vec<Obs> {
        self.obs.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// Pools with a probe by operator `op` that started at or after `since_us` and matches `pred`.
    fn pools_probed(&self, op: u32, since_us: i64, pred: impl Fn(&ProbeEvent) -> bool) -> usize {
        let probes = self.probes.lock().expect("probe store");
        let mut seen = vec![false; self.n];
        for e in probes.iter().rev() {
            // Events arrive in finish order (give or take a flush): stop well before `since_us`.
            if e.finish_us < since_us - 5_000_000 {
                break;
            }
            if e.op == op && e.start_us >= since_us && pred(e) {
                seen[e.pool as usize] = true;
            }
        }
        seen.iter().filter(|s| **s).count()
    }

    /// Number of pools whose latest watched state satisfies `check(at, snap)`, among `pools`.
    fn count_latest(&self, pools: &[u32], check: impl Fn(u32, i64, &Snap) -> bool) -> usize {
        let latest = self.latest.lock().expect("latest store");
        pools
            .iter()
            .filter(|p| {
                latest
                    .get(**p as usize)
                    .and_then(|l| l.as_ref())
                    .is_some_and(|(at, snap)| check(**p, *at, snap))
            })
            .count()
    }

    /// Status writes seen by the watch between two instants.
    fn status_writes(&self, from_us: i64, to_us: i64) -> usize {
        self.obs
            .lock()
            .map(|o| {
                o.iter()
                    .filter(|o| o.status_changed && o.at_us >= from_us && o.at_us <= to_us)
                    .count()
            })
            .unwrap_or(0)
    }

    fn probe_count(&self, op: u32, from_us: i64, to_us: i64) -> usize {
        self.probes
            .lock()
            .map(|p| {
                p.iter()
                    .filter(|e| e.op == op && e.finish_us >= from_us && e.finish_us <= to_us)
                    .count()
            })
            .unwrap_or(0)
    }
}

/// Watches the run's DbPools and records every change with its receipt instant.
async fn watch_pools(api: Api<DbPool>, store: Arc<Store>) {
    let mut previous: HashMap<u32, u64> = HashMap::new();
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let at_us = now_us();
        let pool = match event {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => p,
            Ok(watcher::Event::Init) => {
                store.relists.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(_) => continue,
            Err(err) => {
                progress!("watch error (the watch restarts): {err}");
                continue;
            }
        };
        let Some(index) = pool_index(&pool.name_any()) else {
            continue;
        };
        if index as usize >= store.n {
            continue;
        }
        let mut hasher = DefaultHasher::new();
        serde_json::to_string(&pool.status)
            .unwrap_or_default()
            .hash(&mut hasher);
        let hash = hasher.finish();
        let status_changed =
            pool.status.is_some() && previous.insert(index, hash).is_none_or(|old| old != hash);
        let snap = Snap::of(&pool);
        if let Ok(mut latest) = store.latest.lock() {
            latest[index as usize] = Some((at_us, snap.clone()));
        }
        if let Ok(mut obs) = store.obs.lock() {
            obs.push(Obs {
                at_us,
                pool: index,
                status_changed,
                snap,
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The operator under test

enum OperatorKind {
    Child {
        child: tokio::process::Child,
        pid: u32,
        reader: JoinHandle<()>,
    },
    InProcess {
        runtime: tokio::runtime::Runtime,
    },
}

struct Operator {
    generation: u32,
    kind: OperatorKind,
}

impl Operator {
    async fn start(
        mode: Mode,
        generation: u32,
        namespace: &str,
        refresh: Duration,
        store: &Arc<Store>,
        log_dir: &std::path::Path,
    ) -> Self {
        let instance = format!("bench-op-{generation}");
        let kind = match mode {
            Mode::Child => {
                let log = std::fs::File::create(log_dir.join(format!("{instance}.log")))
                    .expect("operator log file");
                let mut child = tokio::process::Command::new(
                    std::env::current_exe().expect("path of the bench binary"),
                )
                .env(CHILD_ENV, "1")
                .env("BENCH_CHILD_NS", namespace)
                .env("BENCH_CHILD_REFRESH_MS", refresh.as_millis().to_string())
                .env("BENCH_CHILD_INSTANCE", &instance)
                .env("DBPOOL_TEST_KUBECONFIG", kubeconfig_path())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .expect("start the operator process");
                let pid = child.id().expect("operator pid");
                progress!("operator {instance}: pid {pid}");
                let stdout = child.stdout.take().expect("operator stdout");
                let store = store.clone();
                let reader = tokio::spawn(async move {
                    let mut lines = BufReader::new(stdout).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if let Some(event) = parse_probe_line(&line, generation) {
                            store.push_probe(event);
                        } else if let Some(rest) = line.strip_prefix("W ") {
                            let mut parts = rest.split(' ');
                            let pool = parts.next().and_then(pool_index);
                            let at = parts.next().and_then(|t| t.parse().ok());
                            if let (Some(pool), Some(at)) = (pool, at) {
                                store.push_ack(pool, at, parts.next().unwrap_or(""));
                            }
                        }
                    }
                });
                OperatorKind::Child { child, pid, reader }
            }
            Mode::InProcess => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .thread_name("bench-operator")
                    .thread_keep_alive(Duration::from_secs(24 * 3600))
                    .enable_all()
                    .build()
                    .expect("operator runtime");
                *INPROC_SINK.lock().expect("sink") = Some((store.clone(), generation));
                let config = OperatorConfig {
                    namespace: Some(namespace.to_owned()),
                    status_refresh: refresh,
                    instance,
                    ..OperatorConfig::default()
                };
                runtime.spawn(async move {
                    let client = support::kube::client().await;
                    controller::run(
                        client,
                        config,
                        Arc::new(Metrics::new()),
                        std::future::pending(),
                    )
                    .await
                    .expect("operator run");
                });
                OperatorKind::InProcess { runtime }
            }
        };
        Self { generation, kind }
    }

    /// CPU seconds the operator has used so far.
    fn cpu_seconds(&self) -> f64 {
        match &self.kind {
            OperatorKind::Child { pid, .. } => {
                let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                stat_ticks(&text, false) as f64 / clk_tck()
            }
            OperatorKind::InProcess { .. } => {
                let mut ticks = 0;
                if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
                    for task in tasks.flatten() {
                        let text =
                            std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                        if text.contains("(bench-operator") {
                            ticks += stat_ticks(&text, false);
                        }
                    }
                }
                ticks as f64 / clk_tck()
            }
        }
    }

    /// (VmHWM, VmRSS) in KiB: of the operator process, or of the whole bench in-process.
    fn memory_kib(&self) -> (u64, u64) {
        match &self.kind {
            OperatorKind::Child { pid, .. } => memory_kib(&format!("/proc/{pid}/status")),
            OperatorKind::InProcess { .. } => memory_kib("/proc/self/status"),
        }
    }

    /// Established connections to the apiserver (of the whole bench, in-process).
    fn apiserver_connections(&self) -> Option<usize> {
        let pid = match &self.kind {
            OperatorKind::Child { pid, .. } => pid.to_string(),
            OperatorKind::InProcess { .. } => "self".to_owned(),
        };
        tcp_connections(&pid, apiserver_port()?)
    }

    /// Kills the operator abruptly (SIGKILL, or dropping its runtime).
    async fn kill(self) {
        match self.kind {
            OperatorKind::Child {
                mut child, reader, ..
            } => {
                let _ = child.kill().await;
                let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
            }
            OperatorKind::InProcess { runtime } => {
                *INPROC_SINK.lock().expect("sink") = None;
                runtime.shutdown_background();
            }
        }
    }
}

fn parse_probe_line(line: &str, op: u32) -> Option<ProbeEvent> {
    let mut parts = line.split(' ');
    if parts.next()? != "P" {
        return None;
    }
    let pool = pool_index(parts.next()?)?;
    let finish_us = parts.next()?.parse().ok()?;
    let latency_ms = parts.next()?.parse().ok()?;
    let ok = parts.next()? == "1";
    let fresh = parts.next()? == "1";
    Some(ProbeEvent::new(op, pool, finish_us, latency_ms, ok, fresh))
}

// ---------------------------------------------------------------------------------------------
// The report

struct Report {
    title: String,
    rows: Vec<[String; 4]>,
    notes: Vec<String>,
}

impl Report {
    fn row(&mut self, what: impl Into<String>, result: impl Into<String>, target: &str, v: &str) {
        let row = [what.into(), result.into(), target.to_owned(), v.to_owned()];
        progress!("{} | {} | {} | {}", row[0], row[1], row[2], row[3]);
        self.rows.push(row);
    }

    fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        progress!("note: {note}");
        self.notes.push(note);
    }

    fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n", self.title);
        out.push_str("| measurement | result | target | |\n| --- | --- | --- | --- |\n");
        for [a, b, c, d] in &self.rows {
            let _ = writeln!(out, "| {a} | {b} | {c} | {d} |");
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }
}

fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {:.1} GiB memory, Linux {}, load average at start {}",
        mem_kib as f64 / (1024.0 * 1024.0),
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// What the apiserver's own /metrics say about writes to dbpools/status.
#[derive(Clone, Debug, Default)]
struct ApiSample {
    /// PATCH/APPLY requests on dbpools/status.
    status_requests: f64,
    /// GET requests on secrets.
    secret_gets: f64,
    /// Cumulative histogram of their latency: (upper bound in seconds, count).
    latency: Vec<(f64, f64)>,
}

async fn apiserver_sample() -> Option<ApiSample> {
    let out = kubectl(["get", "--raw", "/metrics"]).await;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut sample = ApiSample::default();
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let ours = |l: &str| {
        l.contains("resource=\"dbpools\"")
            && l.contains("subresource=\"status\"")
            && (l.contains("verb=\"APPLY\"") || l.contains("verb=\"PATCH\""))
    };
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        if line.contains("resource=\"secrets\"")
            && line.contains("verb=\"GET\"")
            && let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
        {
            sample.secret_gets += value;
        }
    }
    for line in text.lines().filter(|l| ours(l)) {
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if line.starts_with("apiserver_request_total{") {
            sample.status_requests += value;
        } else if line.starts_with("apiserver_request_duration_seconds_bucket{") {
            let le = line
                .split("le=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .map(|v| {
                    if v == "+Inf" {
                        f64::INFINITY
                    } else {
                        v.parse().unwrap_or(f64::NAN)
                    }
                });
            if let Some(le) = le.filter(|le| !le.is_nan()) {
                match buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some((_, count)) => *count += value,
                    None => buckets.push((le, value)),
                }
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    sample.latency = buckets;
    Some(sample)
}

/// "p50 ≤ x ms · p99 ≤ y ms (n=…)" of the status writes between two samples, from the
/// apiserver's latency histogram (bucket upper bounds).
fn apiserver_latency(before: &Option<ApiSample>, after: &Option<ApiSample>) -> String {
    let (Some(before), Some(after)) = (before, after) else {
        return "n/a".to_owned();
    };
    let delta: Vec<(f64, f64)> = after
        .latency
        .iter()
        .map(|(le, count)| {
            let old = before
                .latency
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, count - old)
        })
        .collect();
    let total = delta.last().map_or(0.0, |(_, c)| *c);
    if total <= 0.0 {
        return "no writes".to_owned();
    }
    let quantile = |q: f64| {
        delta
            .iter()
            .find(|(_, c)| *c >= q * total)
            .map_or(f64::INFINITY, |(le, _)| *le * 1000.0)
    };
    format!(
        "p50 ≤ {} · p99 ≤ {} (n={total:.0})",
        ms(quantile(0.5)),
        ms(quantile(0.99))
    )
}

fn request_delta(before: &Option<ApiSample>, after: &Option<ApiSample>) -> String {
    match (before, after) {
        (Some(a), Some(b)) => format!("{:.0}", b.status_requests - a.status_requests),
        _ => "n/a".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// One run: N pools

struct Run {
    s: Settings,
    n: usize,
    ns: Option<TestNamespace>,
    api: Api<DbPool>,
    store: Arc<Store>,
    pgs: Vec<PgServer>,
    op: Option<Operator>,
    generation: u32,
    report: Report,
    watch: JoinHandle<()>,
    log_dir: PathBuf,
    /// kube-apiserver + etcd CPU seconds per second in a window without status writes.
    control_plane_idle: Option<f64>,
}

/// Resource usage of the operator and the servers over a window.
struct Usage {
    wall: f64,
    cpu: f64,
    probes: usize,
    pg_cpu: f64,
    pg_processes: usize,
    hwm_kib: u64,
    rss_kib: u64,
    writes: usize,
    fresh: usize,
    /// kube-apiserver + etcd CPU seconds.
    control_plane: Option<f64>,
}

impl Usage {
    fn cpu_per_1000(&self) -> f64 {
        if self.probes == 0 {
            f64::NAN
        } else {
            self.cpu * 1000.0 / self.probes as f64
        }
    }

    fn core_percent(&self) -> f64 {
        100.0 * self.cpu / self.wall
    }
}

impl Run {
    async fn new(s: &Settings, n: usize, client: Client) -> Self {
        let ns = TestNamespace::with_prefix(&client, &format!("bench-{n}")).await;
        create_consenting_secret(
            &client,
            ns.name(),
            SECRET,
            KEY,
            APP_PASSWORD,
            &["127.0.0.1"],
        )
        .await;
        let per_target = n.div_ceil(s.targets);
        let max_connections = u32::try_from(per_target + 60).unwrap_or(u32::MAX).max(100);
        progress!(
            "N={n}: starting {} PostgreSQL servers (max_connections {max_connections})",
            s.targets
        );
        let pgs = futures::future::join_all(
            (0..s.targets).map(|_| PgServer::options().max_connections(max_connections).start()),
        )
        .await;
        let store = Arc::new(Store::new(n));
        let api: Api<DbPool> = Api::namespaced(client.clone(), ns.name());
        let watch = tokio::spawn(watch_pools(api.clone(), store.clone()));
        let log_dir = std::env::var_os("DBPOOL_ENV_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("bench-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&log_dir).expect("log directory");
        let title = format!(
            "N = {n}: {} PostgreSQL targets, operator {}",
            s.targets,
            match s.mode {
                Mode::Child => "in a child process (controller::run)",
                Mode::InProcess => "in-process (controller::run on its own runtime)",
            }
        );
        Self {
            s: s.clone(),
            n,
            api,
            ns: Some(ns),
            store,
            pgs,
            op: None,
            generation: 0,
            report: Report {
                title,
                rows: Vec::new(),
                notes: Vec::new(),
            },
            watch,
            log_dir,
            control_plane_idle: None,
        }
    }

    fn all(&self) -> Vec<u32> {
        (0..self.n as u32).collect()
    }

    fn target_of(&self, pool: u32) -> usize {
        pool as usize % self.s.targets
    }

    /// How many servers the fault phase stops (the first ones): enough for the force-reopen
    /// sample and as many pools again to watch closing by themselves.
    fn fault_targets(&self) -> usize {
        let per_target = self.n.div_ceil(self.s.targets).max(1);
        (2 * self.s.sample)
            .div_ceil(per_target)
            .clamp(1, self.s.targets)
    }

    /// Whether the fault phase takes `pool`'s server down.
    fn affected(&self, pool: u32) -> bool {
        self.target_of(pool) < self.fault_targets()
    }

    /// The force-reopen sample: the first affected pools, created with a 10m openTimeout.
    fn in_sample(&self, pool: u32) -> bool {
        let (k, f) = (self.s.targets, self.fault_targets());
        let affected = (0..self.n as u32).filter(|p| self.affected(*p)).count();
        let sample = self.s.sample.min(affected / 2).max(1);
        let rank = (pool as usize / k) * f + pool as usize % k;
        self.affected(pool) && rank < sample
    }

    fn op(&self) -> &Operator {
        self.op.as_ref().expect("an operator runs")
    }

    async fn start_operator(&mut self, refresh: Duration) -> i64 {
        self.generation += 1;
        let started = now_us();
        let ns = self.ns.as_ref().expect("namespace").name().to_owned();
        self.op = Some(
            Operator::start(
                self.s.mode,
                self.generation,
                &ns,
                refresh,
                &self.store,
                &self.log_dir,
            )
            .await,
        );
        started
    }

    fn manifest(&self, i: u32) -> DbPool {
        let open_timeout = if self.in_sample(i) {
            LONG_OPEN_TIMEOUT.to_owned()
        } else {
            go_duration(OPEN_TIMEOUT)
        };
        support::pools::pool(
            &pool_name(i as usize),
            self.pgs[self.target_of(i)].port(),
            Some((SECRET, KEY)),
            serde_json::json!({
                "pool": {"minSize": 1, "maxSize": 5},
                "healthCheck": {"interval": go_duration(self.s.steady_interval), "timeout": "1s"},
                "backoff": {
                    "initialDelay": go_duration(INITIAL_DELAY), "multiplier": 2.0,
                    "maxDelay": go_duration(MAX_DELAY), "maxAttempts": 10, "cooldown": "30s",
                    "jitter": 0.0,
                },
                "breaker": {
                    "failureThreshold": FAILURE_THRESHOLD, "openTimeout": open_timeout,
                    "successThreshold": 1,
                },
            }),
        )
    }

    /// Applies a JSON merge patch to every pool, a few at a time; returns when all are written.
    async fn patch_all(&self, patch: impl Fn(u32) -> serde_json::Value) {
        let api = &self.api;
        let patch = &patch;
        futures::stream::iter(self.all())
            .map(|i| async move {
                let name = pool_name(i as usize);
                let body = patch(i);
                for attempt in 0..5 {
                    match api
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
                        .await
                    {
                        Ok(_) => return,
                        Err(err) if attempt < 4 => {
                            progress!("patch {name}: {err}; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(err) => panic!("patch {name}: {err}"),
                    }
                }
            })
            .buffer_unordered(API_CONCURRENCY)
            .collect::<Vec<()>>()
            .await;
    }

    /// Waits until every pool's status shows its current generation.
    async fn wait_observed(&self, what: &str) {
        let all = self.all();
        let deadline = Duration::from_secs(60) + Duration::from_millis(40) * self.n as u32;
        wait_for(what, deadline, || {
            let done = self.store.count_latest(&all, |_, _, s| {
                s.generation.is_some() && s.observed_generation == s.generation
            });
            std::future::ready((done == self.n).then_some(()))
        })
        .await;
    }

    fn usage_begin(&self) -> (i64, f64, f64, Option<f64>) {
        let (pg_cpu, _) = postgres_usage(&self.postmasters());
        (
            now_us(),
            self.op().cpu_seconds(),
            pg_cpu,
            control_plane_cpu(),
        )
    }

    fn usage_end(&self, begin: (i64, f64, f64, Option<f64>)) -> (Usage, i64, i64) {
        let (from_us, cpu0, pg0, cp0) = begin;
        let to_us = now_us();
        let cpu = self.op().cpu_seconds() - cpu0;
        let (pg_cpu, pg_processes) = postgres_usage(&self.postmasters());
        let (hwm_kib, rss_kib) = self.op().memory_kib();
        let generation = self.op().generation;
        let fresh = self
            .store
            .probes()
            .iter()
            .filter(|e| e.op == generation && e.fresh && e.finish_us >= from_us)
            .count();
        (
            Usage {
                wall: (to_us - from_us) as f64 / 1e6,
                cpu,
                probes: self.store.probe_count(generation, from_us, to_us),
                pg_cpu: pg_cpu - pg0,
                pg_processes,
                hwm_kib,
                rss_kib,
                writes: self.store.status_writes(from_us, to_us),
                fresh,
                control_plane: cp0.zip(control_plane_cpu()).map(|(a, b)| b - a),
            },
            from_us,
            to_us,
        )
    }

    fn postmasters(&self) -> Vec<u32> {
        self.pgs.iter().filter_map(|p| p.postmaster_pid()).collect()
    }

    /// Lateness (ms) of every probe of operator `op` that started in [from, to] after a successful
    /// probe of the same pool: start − (previous finish + interval).
    fn interval_lateness(&self, op: u32, interval: Duration, from_us: i64, to_us: i64) -> Vec<f64> {
        let per_pool = per_pool(&self.store.probes(), self.n, op);
        let mut out = Vec::new();
        for events in &per_pool {
            for pair in events.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                if a.ok && b.start_us >= from_us && b.start_us <= to_us {
                    out.push((b.start_us - a.finish_us - us(interval)) as f64 / 1000.0);
                }
            }
        }
        out
    }

    /// "kube-apiserver + etcd: x s CPU (y % of a core)[, ≈ z ms per status write]".
    fn control_plane(&self, u: &Usage) -> String {
        let Some(cpu) = u.control_plane else {
            return "kube-apiserver + etcd CPU n/a (no DBPOOL_ENV_DIR pid files)".to_owned();
        };
        let mut text = format!(
            "kube-apiserver + etcd {cpu:.2} s CPU ({:.1} % of a core)",
            100.0 * cpu / u.wall
        );
        if let Some(idle) = self.control_plane_idle
            && u.writes > 0
        {
            let per_write = (cpu - idle * u.wall) * 1000.0 / u.writes as f64;
            let _ = write!(
                text,
                ", ≈ {per_write:.1} ms CPU per status write above idle"
            );
        }
        text
    }

    fn writes_per_pool_hour(&self, writes: usize, wall: f64) -> f64 {
        writes as f64 * 3600.0 / (self.n as f64 * wall)
    }

    // -----------------------------------------------------------------------------------------
    // Phases

    async fn execute(mut self) -> Report {
        let t0 = Instant::now();
        let phase = |name: &str| self.s.phases.iter().any(|p| p == name);
        let (steady, fast, fault) = (phase("steady"), phase("fast"), phase("fault"));
        let (restart, coalescing) = (phase("restart"), phase("coalescing"));
        self.setup().await;
        if steady {
            self.steady().await;
        }
        if fast {
            self.fast().await;
        }
        if fault {
            self.fault_and_force_reopen().await;
        }
        if restart {
            self.restart_short_refresh().await;
        }
        if coalescing {
            self.distinct().await;
        }
        let relists = self.store.relists.load(Ordering::Relaxed);
        if relists > 1 {
            self.report.note(format!(
                "the bench's watch relisted {} times: a few status writes may be missing from \
                 the counts",
                relists - 1
            ));
        }
        self.report
            .note(format!("run took {:.0} s", t0.elapsed().as_secs_f64()));
        progress!("operator logs in {}", self.log_dir.display());
        if let Some(op) = self.op.take() {
            op.kill().await;
        }
        self.watch.abort();
        // Without kube-controller-manager a deleted namespace keeps its objects: delete the
        // pools, so the next run's apiserver does not carry them.
        if let Err(err) = self
            .api
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
        {
            progress!("deleting the pools: {err}");
        }
        if let Some(ns) = self.ns.take() {
            ns.cleanup().await;
        }
        self.report
    }

    async fn setup(&mut self) {
        self.start_operator(Duration::from_secs(300)).await;
        let started = Instant::now();
        let api = &self.api;
        let manifests: Vec<DbPool> = self.all().into_iter().map(|i| self.manifest(i)).collect();
        futures::stream::iter(manifests)
            .map(|pool| async move {
                let name = pool.name_any();
                for attempt in 0..5 {
                    match api.create(&PostParams::default(), &pool).await {
                        Ok(_) => return,
                        Err(kube::Error::Api(s)) if s.code == 409 => return,
                        Err(err) if attempt < 4 => {
                            progress!("create {name}: {err}; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(err) => panic!("create {name}: {err}"),
                    }
                }
            })
            .buffer_unordered(API_CONCURRENCY)
            .collect::<Vec<()>>()
            .await;
        let created = started.elapsed();
        progress!("N={}: {} pools created in {created:.1?}", self.n, self.n);
        let all = self.all();
        let deadline = Duration::from_secs(120) + Duration::from_millis(40) * self.n as u32;
        wait_for("every pool Healthy", deadline, || {
            let healthy = self
                .store
                .count_latest(&all, |_, _, s| s.phase == Some(Phase::Healthy));
            std::future::ready((healthy == self.n).then_some(()))
        })
        .await;
        let healthy = started.elapsed();
        self.report.row(
            "setup: create N pools, then all Healthy",
            format!(
                "created in {:.1} s ({:.0}/s); all Healthy {:.1} s after the first create",
                created.as_secs_f64(),
                self.n as f64 / created.as_secs_f64(),
                healthy.as_secs_f64()
            ),
            "",
            "",
        );
    }

    /// Steady state on the long interval: CPU, RSS, fidelity, writes.
    async fn steady(&mut self) {
        let interval = self.s.steady_interval;
        let window = self.s.steady_window(self.n);
        progress!(
            "N={}: steady state, {} interval, {:.0} s window",
            self.n,
            go_duration(interval),
            window.as_secs_f64()
        );
        let api_before = apiserver_sample().await;
        let begin = self.usage_begin();
        tokio::time::sleep(window).await;
        let (usage, from, to) = self.usage_end(begin);
        let api_after = apiserver_sample().await;
        let op = self.op().generation;
        let late = stats(self.interval_lateness(op, interval, from, to));
        let iv = go_duration(interval);
        self.report.row(
            format!("schedule fidelity, {iv} interval (probe start − planned instant)"),
            show(late),
            "≤ 50 ms p99",
            &verdict(late.is_some_and(|s| s.p99 <= 50.0)),
        );
        let percent = usage.core_percent();
        self.report.row(
            format!("operator CPU, steady state, {iv} interval"),
            format!(
                "{percent:.2} % of one core ({:.2} s CPU in {:.0} s); {:.3} s per 1,000 probes \
                 ({} probes); {}",
                usage.cpu,
                usage.wall,
                usage.cpu_per_1000(),
                usage.probes,
                self.control_plane(&usage)
            ),
            "≤ 5 % of one core",
            &verdict(percent <= 5.0),
        );
        let hwm = usage.hwm_kib as f64 / 1024.0;
        let rss_scope = match self.s.mode {
            Mode::Child => "operator process",
            Mode::InProcess => "whole bench process (operator in-process: an upper bound)",
        };
        self.report.row(
            "peak RSS (VmHWM) since operator start",
            format!(
                "{hwm:.1} MiB (VmRSS now {:.1} MiB; {rss_scope}); {} connections to the \
                 apiserver",
                usage.rss_kib as f64 / 1024.0,
                self.op()
                    .apiserver_connections()
                    .map_or("?".to_owned(), |c| c.to_string())
            ),
            "≤ 64 MiB",
            &verdict(hwm <= 64.0),
        );
        let per_hour = self.writes_per_pool_hour(usage.writes, usage.wall);
        let refresh = 3600.0 / (300.0 / interval.as_secs_f64()).ceil() / interval.as_secs_f64();
        let api_delta = request_delta(&api_before, &api_after);
        self.report.row(
            format!("status writes per pool-hour, healthy, quiet DB, {iv} interval"),
            format!(
                "{per_hour:.2} measured ({} writes seen by the watch, {api_delta} status \
                 requests counted by the apiserver, in {:.0} s) + {refresh:.0} from the 5m \
                 lastProbe refresh (formula) = {:.1}",
                usage.writes,
                usage.wall,
                per_hour + refresh
            ),
            "≤ 12",
            &verdict(per_hour + refresh <= 12.0 + 1e-9),
        );
    }

    /// Short interval: a quiet window, then a window with connection churn on the servers.
    async fn fast(&mut self) {
        let interval = self.s.fast_interval;
        let iv = go_duration(interval);
        progress!("N={}: patching every pool to a {iv} interval", self.n);
        self.patch_all(|_| serde_json::json!({"spec": {"healthCheck": {"interval": iv}}}))
            .await;
        self.wait_observed("every pool to observe the interval change")
            .await;
        tokio::time::sleep(interval + Duration::from_secs(1)).await;

        let begin = self.usage_begin();
        tokio::time::sleep(self.s.window).await;
        let (usage, from, to) = self.usage_end(begin);
        let op = self.op().generation;
        let late = stats(self.interval_lateness(op, interval, from, to));
        self.report.row(
            format!("schedule fidelity, {iv} interval"),
            show(late),
            "≤ 50 ms p99",
            &verdict(late.is_some_and(|s| s.p99 <= 50.0)),
        );
        let latency = stats(
            self.store
                .probes()
                .iter()
                .filter(|e| e.op == op && e.finish_us >= from && e.finish_us <= to)
                .map(|e| (e.finish_us - e.start_us) as f64 / 1000.0)
                .collect(),
        );
        self.report.row(
            format!("probe duration, {iv} interval (ms resolution)"),
            show(latency),
            "",
            "",
        );
        self.report.row(
            format!("operator CPU, {iv} interval, shared connections"),
            format!(
                "{:.1} % of one core; {:.3} s per 1,000 probes ({} probes in {:.0} s); \
                 PostgreSQL {:.3} s per 1,000 probes, {} server processes; {}",
                usage.core_percent(),
                usage.cpu_per_1000(),
                usage.probes,
                usage.wall,
                usage.pg_cpu * 1000.0 / usage.probes.max(1) as f64,
                usage.pg_processes,
                self.control_plane(&usage)
            ),
            "",
            "",
        );
        let quiet = self.writes_per_pool_hour(usage.writes, usage.wall);
        if usage.writes == 0 {
            self.control_plane_idle = usage.control_plane.map(|c| c / usage.wall);
        }
        self.report.row(
            format!("status writes per pool-hour, quiet DB, {iv} interval (refresh 5m not due)"),
            format!(
                "{quiet:.2} ({} writes in {:.0} s)",
                usage.writes, usage.wall
            ),
            "",
            "",
        );

        // Connection churn: each server gains and loses a client connection every 400ms, as
        // application pools do. The probe's message carries the connection count.
        let stop = Arc::new(AtomicBool::new(false));
        let connects = Arc::new(AtomicU32::new(0));
        let churn: Vec<JoinHandle<()>> = self
            .pgs
            .iter()
            .map(|pg| {
                let port = pg.port();
                let (stop, connects) = (stop.clone(), connects.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match connect_app(port).await {
                            Ok(client) => {
                                connects.fetch_add(1, Ordering::Relaxed);
                                // Hold it for a while, as an application's pool does.
                                let _ = client.simple_query("SELECT 1").await;
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                drop(client);
                            }
                            Err(err) => progress!("churn connection to :{port}: {err}"),
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                })
            })
            .collect();
        let begin = self.usage_begin();
        tokio::time::sleep(self.s.window).await;
        let (usage, _, _) = self.usage_end(begin);
        stop.store(true, Ordering::Relaxed);
        for task in churn {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let churned = self.writes_per_pool_hour(usage.writes, usage.wall);
        let probes_per_hour = 3600.0 / interval.as_secs_f64();
        self.report.row(
            format!("status writes per pool-hour, DB with connection churn, {iv} interval"),
            format!(
                "{churned:.0} ({} writes in {:.0} s; a pool probes {probes_per_hour:.0} times \
                 an hour; {} churn connections); operator CPU {:.3} s per 1,000 probes; {}",
                usage.writes,
                usage.wall,
                connects.load(Ordering::Relaxed),
                usage.cpu_per_1000(),
                self.control_plane(&usage)
            ),
            "≤ 12",
            &verdict(churned <= 12.0),
        );
        // Let every pool write its quiet state again before the next phase.
        tokio::time::sleep(interval + Duration::from_secs(1)).await;
    }

    async fn fault_and_force_reopen(&mut self) {
        let affected: Vec<u32> = self
            .all()
            .into_iter()
            .filter(|p| self.affected(*p))
            .collect();
        let sample: Vec<u32> = affected
            .iter()
            .copied()
            .filter(|p| self.in_sample(*p))
            .collect();
        let others: Vec<u32> = affected
            .iter()
            .copied()
            .filter(|p| !self.in_sample(*p))
            .collect();
        let op = self.op().generation;
        progress!(
            "N={}: fault: stopping {} of {} PostgreSQL servers ({} pools)",
            self.n,
            self.fault_targets(),
            self.s.targets,
            affected.len()
        );
        let down = self.fault_targets();
        let api_before = apiserver_sample().await;
        let cp_before = control_plane_cpu();
        let t_stop = now_us();
        futures::future::join_all(self.pgs[..down].iter_mut().map(|pg| pg.stop())).await;
        let stopped_in = now_us() - t_stop;
        let deadline = Duration::from_secs(60);
        wait_for("every affected pool Open", deadline, || {
            let open = self.store.count_latest(&affected, |_, at, s| {
                at >= t_stop && s.breaker == Some(BreakerState::Open)
            });
            std::future::ready((open == affected.len()).then_some(()))
        })
        .await;
        // Hold the outage for one more openTimeout, so failed half-open trials are part of it.
        tokio::time::sleep(OPEN_TIMEOUT).await;
        futures::future::join_all(self.pgs[..down].iter_mut().map(|pg| pg.start())).await;
        let t_started = now_us();
        progress!("N={}: fault: the servers are back", self.n);
        wait_for(
            "the affected pools Closed again",
            Duration::from_secs(60),
            || {
                let closed = self.store.count_latest(&others, |_, at, s| {
                    at >= t_started && s.breaker == Some(BreakerState::Closed)
                });
                std::future::ready((closed == others.len()).then_some(()))
            },
        )
        .await;

        let api_after = apiserver_sample().await;
        let cp_fault = cp_before
            .zip(control_plane_cpu())
            .map(|(a, b)| (b - a, (now_us() - t_stop) as f64 / 1e6));
        let probes = per_pool(&self.store.probes(), self.n, op);
        let obs = self.store.observations();
        let mut first_obs: HashMap<u32, Vec<&Obs>> = HashMap::new();
        for o in obs.iter().filter(|o| o.at_us >= t_stop) {
            first_obs.entry(o.pool).or_default().push(o);
        }

        // Time to Open and detection overhead.
        let mut to_open = Vec::new();
        let mut to_open_theory = Vec::new();
        let mut open_late = Vec::new();
        let mut overhead = Vec::new();
        let mut to_ack = Vec::new();
        let mut ack_to_watch = Vec::new();
        let acks = self.store.acks();
        let mut schedule = Vec::new();
        for &p in &affected {
            let Some(open) = first_obs.get(&p).and_then(|list| {
                list.iter()
                    .find(|o| o.snap.breaker == Some(BreakerState::Open))
                    .copied()
            }) else {
                continue;
            };
            to_open.push((open.at_us - t_stop) as f64 / 1000.0);
            if let Some(failed_at) = open.snap.last_failure_us {
                overhead.push((open.at_us - failed_at) as f64 / 1000.0);
                // The operator's own "status written" for that write splits the overhead.
                if let Some((_, acked, _)) = acks.iter().find(|(pool, at, phase)| {
                    *pool == p && *at >= failed_at && phase.contains("BreakerOpen")
                }) {
                    to_ack.push((acked - failed_at) as f64 / 1000.0);
                    ack_to_watch.push((open.at_us - acked) as f64 / 1000.0);
                }
            }
            let events = &probes[p as usize];
            let last_before = events
                .iter()
                .rev()
                .find(|e| e.finish_us < t_stop)
                .map_or(t_stop, |e| e.finish_us);
            // The loss of the connection triggers a probe at once, but not sooner than
            // initialDelay after the previous one; then the backoff delays until the threshold.
            let first = (last_before + us(INITIAL_DELAY) - t_stop).max(0);
            let theory: i64 = first
                + (0..FAILURE_THRESHOLD - 1)
                    .map(|i| us(backoff_delay(i)))
                    .sum::<i64>();
            to_open_theory.push(theory as f64 / 1000.0);
            open_late.push((open.at_us - t_stop - theory) as f64 / 1000.0);

            // Schedule fidelity of the failure path: backoff delays, then openTimeout (the
            // sample's 10m openTimeout never comes due here).
            let after: Vec<&ProbeEvent> = events.iter().filter(|e| e.start_us >= t_stop).collect();
            let mut streak = 0usize;
            for pair in after.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                if a.ok {
                    break;
                }
                streak += 1;
                let planned = if streak < FAILURE_THRESHOLD {
                    backoff_delay(streak - 1)
                } else {
                    OPEN_TIMEOUT.max(backoff_delay(streak - 1))
                };
                schedule.push((b.start_us - a.finish_us - us(planned)) as f64 / 1000.0);
            }
        }
        // Time to Closed (the pools without the long openTimeout).
        let mut to_closed = Vec::new();
        let mut to_closed_theory = Vec::new();
        let mut closed_late = Vec::new();
        for &p in &others {
            let list = first_obs.get(&p).cloned().unwrap_or_default();
            let Some(closed) = list
                .iter()
                .find(|o| o.at_us >= t_started && o.snap.breaker == Some(BreakerState::Closed))
            else {
                continue;
            };
            let planned = list
                .iter()
                .rev()
                .filter(|o| o.at_us < closed.at_us && o.snap.breaker == Some(BreakerState::Open))
                .find_map(|o| o.snap.next_probe_us)
                .unwrap_or(t_started)
                .max(t_started);
            to_closed.push((closed.at_us - t_started) as f64 / 1000.0);
            to_closed_theory.push((planned - t_started) as f64 / 1000.0);
            closed_late.push((closed.at_us - planned) as f64 / 1000.0);
        }

        let overhead = stats(overhead);
        self.report.row(
            "detection overhead: crossing probe finished (lastFailureTime) → watcher sees Open",
            format!(
                "{}; apiserver-side latency of the status writes during the fault: {}",
                show(overhead),
                apiserver_latency(&api_before, &api_after)
            ),
            "≤ 100 ms p99",
            &verdict(overhead.is_some_and(|s| s.p99 <= 100.0)),
        );
        self.report.row(
            "… of which: crossing probe finished → status write acknowledged (operator's log)",
            show(stats(to_ack)),
            "",
            "",
        );
        self.report.row(
            "… of which: write acknowledged → watcher receives it",
            show(stats(ack_to_watch)),
            "",
            "",
        );
        let schedule = stats(schedule);
        self.report.row(
            "schedule fidelity of the failure path (backoff delays, openTimeout)",
            show(schedule),
            "≤ 50 ms p99",
            &verdict(schedule.is_some_and(|s| s.p99 <= 50.0)),
        );
        let (open_m, open_t) = (stats(to_open), stats(to_open_theory));
        self.report.row(
            format!(
                "time to Open after `pg_ctl stop -m fast` of {down} of {} servers ({} pools; \
                 threshold {FAILURE_THRESHOLD}, backoff {}, {}, …)",
                self.s.targets,
                affected.len(),
                go_duration(backoff_delay(0)),
                go_duration(backoff_delay(1))
            ),
            format!(
                "measured {}; theoretical {}; measured/theoretical p50 {:.2}; per pool, seen \
                 Open − theoretical: {}",
                show(open_m),
                show(open_t),
                ratio(open_m, open_t),
                show(stats(open_late))
            ),
            "",
            "",
        );
        let (closed_m, closed_t) = (stats(to_closed), stats(to_closed_theory));
        self.report.row(
            format!(
                "time to Closed after the server is back ({} pools; openTimeout {})",
                others.len(),
                go_duration(OPEN_TIMEOUT)
            ),
            format!(
                "measured {}; theoretical (next half-open trial) {}; measured/theoretical p50 \
                 {:.2}; per pool, seen Closed − planned trial: {}",
                show(closed_m),
                show(closed_t),
                ratio(closed_m, closed_t),
                show(stats(closed_late))
            ),
            "",
            "",
        );
        self.report.note(format!(
            "fault: `pg_ctl stop -m fast` took {:.0} ms; time to Open counts from before it, \
             time to Closed from the end of `pg_ctl start -w`",
            stopped_in as f64 / 1000.0
        ));
        if let Some((cpu, wall)) = cp_fault {
            self.report.note(format!(
                "fault: kube-apiserver + etcd used {cpu:.2} s CPU in the {wall:.1} s from the stop \
                 to the last pool Closed ({:.0} % of a core on average)",
                100.0 * cpu / wall
            ));
        }

        // Force reopen of the sample (breaker Open, database up, openTimeout 10m).
        let mut sent = Vec::new();
        for &p in &sample {
            let token = format!("bench-{}-{p}", self.generation);
            let body =
                serde_json::json!({"metadata": {"annotations": {FORCE_REOPEN_ANNOTATION: token}}});
            let at = now_us();
            self.api
                .patch(
                    &pool_name(p as usize),
                    &PatchParams::default(),
                    &Patch::Merge(&body),
                )
                .await
                .expect("annotate");
            sent.push((p, token, at));
        }
        let tokens: HashMap<u32, (String, i64)> = sent
            .iter()
            .map(|(p, t, at)| (*p, (t.clone(), *at)))
            .collect();
        wait_for(
            "the force-reopened pools Ready",
            Duration::from_secs(30),
            || {
                let ready = self.store.count_latest(&sample, |p, _, s| {
                    s.ready == Some(true)
                        && s.force_token.as_ref() == tokens.get(&p).map(|(t, _)| t)
                });
                std::future::ready((ready == sample.len()).then_some(()))
            },
        )
        .await;
        let obs = self.store.observations();
        let latencies: Vec<f64> = sample
            .iter()
            .filter_map(|p| {
                let (token, at) = tokens.get(p)?;
                obs.iter()
                    .find(|o| {
                        o.pool == *p
                            && o.at_us >= *at
                            && o.snap.ready == Some(true)
                            && o.snap.force_token.as_ref() == Some(token)
                    })
                    .map(|o| (o.at_us - at) as f64 / 1000.0)
            })
            .collect();
        let latency = stats(latencies);
        self.report.row(
            "force-reopen: annotation sent → watcher sees Ready=True (breaker Open, DB up)",
            show(latency),
            "≤ 1 s p99",
            &verdict(latency.is_some_and(|s| s.p99 <= 1000.0)),
        );
    }

    /// Restart into an operator with a short status refresh: resume time and spread, then the
    /// writes per pool-hour that refresh causes.
    async fn restart_short_refresh(&mut self) {
        let refresh = self.s.short_refresh;
        self.restart(refresh, "restart (kill -9, new operator)")
            .await;
        let interval = self.s.fast_interval;
        // The first probe after a restart writes (nothing was written by this process yet); then
        // one write per refresh. Start counting after that first round.
        tokio::time::sleep(interval + Duration::from_secs(1)).await;
        let window = self.s.window.max(refresh * 3);
        let api_before = apiserver_sample().await;
        let begin = self.usage_begin();
        tokio::time::sleep(window).await;
        let (usage, _, _) = self.usage_end(begin);
        let api_after = apiserver_sample().await;
        let measured = self.writes_per_pool_hour(usage.writes, usage.wall);
        let period =
            (refresh.as_secs_f64() / interval.as_secs_f64()).ceil() * interval.as_secs_f64();
        let formula = 3600.0 / period;
        let api_delta = request_delta(&api_before, &api_after);
        self.report.row(
            format!(
                "status writes per pool-hour, status_refresh {}, {} interval",
                go_duration(refresh),
                go_duration(interval)
            ),
            format!(
                "{measured:.0} measured ({} writes seen, {api_delta} counted by the apiserver, \
                 in {:.0} s); formula 3600 / (⌈refresh / interval⌉ × interval) = {formula:.0}; \
                 operator {:.3} s CPU per 1,000 probes; {}",
                usage.writes,
                usage.wall,
                usage.cpu_per_1000(),
                self.control_plane(&usage)
            ),
            "",
            "",
        );
    }

    /// Kills the operator and starts a new one; reports resume time and first-probe spread.
    async fn restart(&mut self, refresh: Duration, what: &str) {
        let api_before = apiserver_sample().await;
        if let Some(old) = self.op.take() {
            old.kill().await;
        }
        let t_start = self.start_operator(refresh).await;
        let op = self.generation;
        let interval = self.s.fast_interval;
        wait_for(
            "every pool probed by the new operator",
            interval + Duration::from_secs(60) + Duration::from_millis(20) * self.n as u32,
            || {
                let probed = self.store.pools_probed(op, t_start, |_| true);
                std::future::ready((probed == self.n).then_some(()))
            },
        )
        .await;
        let probes = per_pool(&self.store.probes(), self.n, op);
        let firsts: Vec<f64> = probes
            .iter()
            .filter_map(|events| events.iter().find(|e| e.start_us >= t_start))
            .map(|e| (e.start_us - t_start) as f64 / 1000.0)
            .collect();
        let earliest = firsts.iter().copied().fold(f64::INFINITY, f64::min);
        let spread = stats(firsts);
        let resumed = spread.map_or(f64::NAN, |s| s.max);
        let writes = self.store.status_writes(t_start, now_us());
        let connections = self.op().apiserver_connections();
        // The writes the restart causes: wait until they stop (no new one for 2 s), at most one
        // more interval and 10 s (a short status_refresh keeps writing).
        let settle = Instant::now();
        let mut last = (writes, Instant::now());
        while settle.elapsed() < interval + Duration::from_secs(10)
            && last.1.elapsed() < Duration::from_secs(2)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.store.status_writes(t_start, now_us());
            if now != last.0 {
                last = (now, Instant::now());
            }
        }
        let t_end = now_us();
        let mut written = vec![false; self.n];
        let mut last_write = 0.0f64;
        for o in self.store.observations() {
            if o.status_changed && o.at_us >= t_start && o.at_us <= t_end {
                written[o.pool as usize] = true;
                last_write = last_write.max((o.at_us - t_start) as f64 / 1000.0);
            }
        }
        let pools_written = written.iter().filter(|w| **w).count();
        let api_after = apiserver_sample().await;
        let secret_gets = match (&api_before, &api_after) {
            (Some(a), Some(b)) => format!("{:.0}", b.secret_gets - a.secret_gets),
            _ => "?".to_owned(),
        };
        let (hwm, rss) = self.op().memory_kib();
        self.report.row(
            format!("{what}: first probe of each pool, from process start"),
            format!(
                "{}; first probe after {}; all N resumed after {:.2} s",
                show(spread),
                ms(earliest),
                resumed / 1000.0
            ),
            &format!(
                "spread over one interval ({})",
                go_duration(self.s.fast_interval)
            ),
            &verdict(
                spread.is_some_and(|s| s.max - earliest <= us(interval) as f64 / 1000.0 + 50.0),
            ),
        );
        self.report.row(
            format!("{what}: status writes and memory of the new operator"),
            format!(
                "{pools_written} of {} pools' status written (the last seen {:.1} s after \
                 start; {writes} writes by the time every pool was probed); {secret_gets} Secret \
                 GETs; VmHWM {:.1} MiB, VmRSS {:.1} MiB; {} connections to the apiserver when \
                 every pool was probed",
                self.n,
                last_write / 1000.0,
                hwm as f64 / 1024.0,
                rss as f64 / 1024.0,
                connections.map_or("?".to_owned(), |c| c.to_string())
            ),
            "≤ 64 MiB RSS",
            &verdict(hwm as f64 / 1024.0 <= 64.0),
        );
    }

    /// N distinct application names (N connections) against shared connections.
    async fn distinct(&mut self) {
        self.restart(Duration::from_secs(300), "second restart")
            .await;
        let per_target = self.n.div_ceil(self.s.targets);
        if !self.s.distinct || per_target > 400 {
            self.report.note(format!(
                "coalescing comparison skipped ({per_target} connections per server would be \
                 needed; BENCH_DISTINCT=0 or more than 400)"
            ));
            return;
        }
        let interval = self.s.fast_interval;
        tokio::time::sleep(interval + Duration::from_secs(1)).await;
        // Shared connections, same operator configuration, for the comparison.
        let begin = self.usage_begin();
        tokio::time::sleep(self.s.window).await;
        let (shared, _, _) = self.usage_end(begin);

        progress!("N={}: one application name per pool", self.n);
        let t_patch = now_us();
        self.patch_all(|i| {
            let name = format!("bench-{}", pool_name(i as usize));
            serde_json::json!({"spec": {"database": {"applicationName": name}}})
        })
        .await;
        self.wait_observed("every pool to observe its application name")
            .await;
        let op = self.generation;
        wait_for(
            "every pool on its own connection",
            interval + Duration::from_secs(60),
            || {
                let fresh = self.store.pools_probed(op, t_patch, |e| e.fresh);
                std::future::ready((fresh == self.n).then_some(()))
            },
        )
        .await;
        tokio::time::sleep(interval + Duration::from_secs(1)).await;
        let begin = self.usage_begin();
        tokio::time::sleep(self.s.window).await;
        let (own, from, to) = self.usage_end(begin);
        let late = stats(self.interval_lateness(op, interval, from, to));
        let row = |u: &Usage| {
            format!(
                "operator {:.3} s CPU per 1,000 probes ({:.1} % of a core), VmRSS {:.1} MiB; \
                 PostgreSQL {:.3} s CPU per 1,000 probes, {} server processes; {} fresh \
                 connections in the window",
                u.cpu_per_1000(),
                u.core_percent(),
                u.rss_kib as f64 / 1024.0,
                u.pg_cpu * 1000.0 / u.probes.max(1) as f64,
                u.pg_processes,
                u.fresh
            )
        };
        self.report.row(
            format!(
                "coalescing: {} pools on {} shared connections, {} interval",
                self.n,
                self.s.targets,
                go_duration(interval)
            ),
            row(&shared),
            "",
            "",
        );
        self.report.row(
            format!(
                "coalescing: {} pools on {} connections (one application name each)",
                self.n, self.n
            ),
            format!("{}; schedule fidelity {}", row(&own), show(late)),
            "",
            "",
        );
    }
}

fn ratio(measured: Option<Stats>, theory: Option<Stats>) -> f64 {
    match (measured, theory) {
        (Some(m), Some(t)) if t.p50 > 0.0 => m.p50 / t.p50,
        _ => f64::NAN,
    }
}

fn per_pool(events: &[ProbeEvent], n: usize, op: u32) -> Vec<Vec<ProbeEvent>> {
    let mut out = vec![Vec::new(); n];
    for e in events.iter().filter(|e| e.op == op) {
        if let Some(list) = out.get_mut(e.pool as usize) {
            list.push(*e);
        }
    }
    for list in &mut out {
        list.sort_by_key(|e| e.finish_us);
    }
    out
}

async fn connect_app(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(APP_USER)
        .password(APP_PASSWORD)
        .dbname(APP_DB)
        .application_name("bench-churn")
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_timeout(Duration::from_secs(5));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// What one write costs the control plane on this machine, without the operator: 200 ConfigMap
/// merge patches and 200 server-side applies of a realistic DbPool status, one at a time
/// (kube-apiserver + etcd CPU above idle, and the client-side latency).
async fn calibrate(client: &Client) -> String {
    const WRITES: usize = 200;
    let Some(_) = control_plane_cpu() else {
        return "skipped (no DBPOOL_ENV_DIR pid files)".to_owned();
    };
    let ns = TestNamespace::with_prefix(client, "bench-calibrate").await;
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> = ns.api();
    let pools: Api<DbPool> = ns.api();
    let map = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "calibrate"},
        "data": {"n": "0"},
    }))
    .expect("ConfigMap");
    maps.create(&PostParams::default(), &map)
        .await
        .expect("create ConfigMap");
    let pool = support::pools::pool(
        "calibrate",
        5432,
        Some((SECRET, KEY)),
        serde_json::json!({}),
    );
    pools
        .create(&PostParams::default(), &pool)
        .await
        .expect("create DbPool");
    // Idle rate first.
    let idle_from = (Instant::now(), control_plane_cpu().unwrap_or(0.0));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle =
        (control_plane_cpu().unwrap_or(0.0) - idle_from.1) / idle_from.0.elapsed().as_secs_f64();
    let mut results = Vec::new();
    for kind in [
        "ConfigMap merge patch",
        "DbPool status server-side apply (what the operator sends)",
        "DbPool status merge patch",
    ] {
        let (start, cpu0) = (Instant::now(), control_plane_cpu().unwrap_or(0.0));
        let mut latencies = Vec::with_capacity(WRITES);
        for i in 0..WRITES {
            let t = Instant::now();
            if kind.starts_with("ConfigMap") {
                let body = serde_json::json!({"data": {"n": i.to_string()}});
                maps.patch("calibrate", &PatchParams::default(), &Patch::Merge(&body))
                    .await
                    .expect("patch ConfigMap");
            } else {
                let time = k8s_openapi::jiff::Timestamp::now().to_string();
                let body = serde_json::json!({
                    "apiVersion": "dbpool.io/v1alpha1", "kind": "DbPool",
                    "status": {
                        "observedGeneration": 1, "phase": "Healthy",
                        "breaker": {"state": "Closed", "openCount": 0, "halfOpenSuccesses": 0},
                        "consecutiveFailures": 0, "recoveryAttempts": 0,
                        "lastProbe": {
                            "time": time, "outcome": "Success", "stage": "Saturation",
                            "latencyMs": 1, "message": "ok: PostgreSQL 15, primary",
                            "serverVersion": "15", "inRecovery": false, "connections": 1,
                            "maxConnections": 97,
                        },
                        "lastSuccessTime": time,
                        "conditions": [
                            {"type": "Ready", "status": "True", "reason": "ProbeSucceeded",
                             "message": "the database answered the last probe",
                             "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1},
                            {"type": "Degraded", "status": "False", "reason": "AsExpected",
                             "message": "no failures",
                             "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1},
                            {"type": "BreakerOpen", "status": "False", "reason": "Closed",
                             "message": "breaker is closed",
                             "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1},
                        ],
                    },
                });
                if kind.contains("server-side apply") {
                    pools
                        .patch_status(
                            "calibrate",
                            &PatchParams::apply("dbpool-bench").force(),
                            &Patch::Apply(&body),
                        )
                        .await
                        .expect("apply DbPool status");
                } else {
                    pools
                        .patch_status("calibrate", &PatchParams::default(), &Patch::Merge(&body))
                        .await
                        .expect("merge-patch DbPool status");
                }
            }
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let wall = start.elapsed().as_secs_f64();
        let cpu = control_plane_cpu().unwrap_or(0.0) - cpu0 - idle * wall;
        let latency = stats(latencies);
        results.push(format!(
            "{kind}: {:.1} ms kube-apiserver + etcd CPU per write above idle, latency {}",
            cpu * 1000.0 / WRITES as f64,
            show(latency)
        ));
    }
    ns.cleanup().await;
    let text = results.join("; ");
    progress!("calibration: {text}");
    text
}

async fn bench(s: Settings) {
    let client = support::kube::client().await;
    install_crd(&client).await;
    let machine = machine_description();
    let version = kubectl(["version", "-o", "json"]).await;
    let server = String::from_utf8_lossy(&version.stdout)
        .lines()
        .rfind(|l| l.contains("gitVersion"))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().trim_end_matches(',').trim_matches('"').to_owned())
        .unwrap_or_default();
    progress!("machine: {machine}; kube-apiserver {server}; settings {s:?}");
    let calibration = calibrate(&client).await;
    let mut out = format!(
        "## dbpool-operator scale benchmark\n\nMachine: {machine}. kube-apiserver {server}, \
         PostgreSQL 15, all on 127.0.0.1. Settings: {} targets, steady interval {}, short \
         interval {}, windows {} s, force-reopen sample {}, short status_refresh {}.\n\n\
         Control plane calibration (one write at a time, no operator): {calibration}\n\n",
        s.targets,
        go_duration(s.steady_interval),
        go_duration(s.fast_interval),
        s.window.as_secs(),
        s.sample,
        go_duration(s.short_refresh)
    );
    for &n in &s.sizes {
        let run = Run::new(&s, n, client.clone()).await;
        let report = run.execute().await;
        let text = report.markdown();
        println!("\n{text}");
        out.push_str(&text);
        out.push('\n');
    }
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
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let _ = writeln!(
        out,
        "Load average at the end: {}.",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let (hwm, _) = memory_kib("/proc/self/status");
    progress!("bench process VmHWM {:.1} MiB", hwm as f64 / 1024.0);
    match std::fs::write(&path, &out) {
        Ok(()) => progress!("report written to {}", path.display()),
        Err(err) => progress!("cannot write {}: {err}", path.display()),
    }
}
