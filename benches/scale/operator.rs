//! The operator under test: started as a child process (this bench binary calling
//! `controller::run_observed`) or on its own runtime inside the bench, measured through /proc,
//! and killed abruptly.
//!
//! Lives here: [`Operator`] (start, CPU, memory, apiserver connections, its /metrics text, kill),
//! [`child_main`] (what the child process runs, which serves its /metrics on the loopback port
//! the bench gives it) and the stderr log both modes keep for warnings (`BENCH_OPERATOR_LOG`). Must not live here: how observations are encoded (`capture`), what
//! the phases do with an operator.

use std::{
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use dbpool_operator::{
    controller::{self, Observer, OperatorConfig},
    metrics::Metrics,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    task::JoinHandle,
};
use tracing_subscriber::{Layer, filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

use crate::{
    capture::{BenchObserver, Line, parse_line, spawn_stdout_flusher},
    procfs::{apiserver_port, clk_tck, memory_kib, stat_ticks, tcp_connections},
    settings::{CHILD_ENV, Mode, env_u64},
    store::Store,
    support::{self, kube::kubeconfig_path},
};

/// How the operator runs, with what it takes to measure and stop it.
enum OperatorKind {
    /// A child process, and the task that reads its observation lines.
    Child {
        child: tokio::process::Child,
        pid: u32,
        reader: JoinHandle<()>,
        /// The loopback port of its /metrics.
        metrics_port: u16,
    },
    /// A dedicated runtime in this process; `live` gates its observer.
    InProcess {
        runtime: tokio::runtime::Runtime,
        live: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
    },
}

/// One operator of a run; `generation` tags its probe events.
pub struct Operator {
    /// 1 for the first operator of a run, then one more per restart.
    pub generation: u32,
    kind: OperatorKind,
}

/// Installs the operator's log on stderr: warnings, or the targets in `BENCH_OPERATOR_LOG`
/// (e.g. `warn,kube=debug`). For people only: the bench parses nothing from it.
pub fn install_log() {
    let log_filter = std::env::var("BENCH_OPERATOR_LOG")
        .ok()
        .and_then(|f| f.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::WARN));
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_filter(log_filter);
    tracing_subscriber::registry().with(log).init();
}

/// The operator on `namespace` with `refresh`, told about everything through `observer`; runs
/// until the process or runtime ends.
async fn run_operator(
    namespace: String,
    refresh: Duration,
    instance: String,
    observer: Arc<dyn Observer>,
    metrics: Arc<Metrics>,
) {
    let client = support::kube::client().await;
    let config = OperatorConfig {
        namespace: Some(namespace),
        status_refresh: refresh,
        instance,
        ..OperatorConfig::default()
    };
    controller::run_observed(client, config, metrics, observer, std::future::pending())
        .await
        .expect("operator run");
}

/// The child process: the operator on the namespace it is given, its observations on stdout as
/// `P`/`W` lines (see `capture`), flushed every 20 ms, its /metrics on 127.0.0.1 at
/// `BENCH_CHILD_METRICS_PORT`.
pub fn child_main() {
    let namespace = std::env::var("BENCH_CHILD_NS").expect("BENCH_CHILD_NS");
    let refresh = Duration::from_millis(env_u64("BENCH_CHILD_REFRESH_MS").unwrap_or(300_000));
    let instance = std::env::var("BENCH_CHILD_INSTANCE").unwrap_or_else(|_| "bench".to_owned());
    let buffer = Arc::new(Mutex::new(Vec::<u8>::with_capacity(1 << 16)));
    spawn_stdout_flusher(buffer.clone());
    install_log();
    spawn_heap_logger();
    let observer = Arc::new(BenchObserver::lines(buffer));
    let metrics = Arc::new(Metrics::new());
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    if let Some(port) = env_u64("BENCH_CHILD_METRICS_PORT").and_then(|p| u16::try_from(p).ok()) {
        runtime.spawn(serve_metrics(port, metrics.clone()));
    }
    runtime.block_on(run_operator(
        namespace, refresh, instance, observer, metrics,
    ));
}

/// glibc's `mallinfo2` (summed over every arena), for where the child's RSS goes.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[repr(C)]
#[derive(Default)]
struct MallInfo2 {
    arena: usize,
    ordblks: usize,
    smblks: usize,
    hblks: usize,
    hblkhd: usize,
    usmblks: usize,
    fsmblks: usize,
    uordblks: usize,
    fordblks: usize,
    keepcost: usize,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
unsafe extern "C" {
    fn mallinfo2() -> MallInfo2;
}

/// Every 10 s, one stderr line (the child's log file) with the heap the allocator holds: in
/// use, free inside its arenas (held, not returned), and mapped apart; with VmRSS beside it.
fn spawn_heap_logger() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    std::thread::spawn(|| {
        loop {
            // SAFETY: mallinfo2 takes no argument and only reads the allocator's counters.
            let m = unsafe { mallinfo2() };
            let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
            let rss = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .map(|l| l.trim_start_matches("VmRSS:").trim().to_owned())
                })
                .unwrap_or_default();
            eprintln!(
                "bench heap: in use {:.1} MiB, free in arenas {:.1} MiB (arenas' total {:.1} \
                 MiB), mmapped {:.1} MiB in {} blocks; VmRSS {rss}",
                mib(m.uordblks),
                mib(m.fordblks),
                mib(m.arena),
                mib(m.hblkhd),
                m.hblks
            );
            std::thread::sleep(Duration::from_secs(10));
        }
    });
}

/// Serves `metrics` as text at /metrics on 127.0.0.1:`port` (the child's, for the bench).
async fn serve_metrics(port: u16, metrics: Arc<Metrics>) {
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(err) => {
            tracing::warn!("bench: cannot serve /metrics on 127.0.0.1:{port}: {err}");
            return;
        }
    };
    let text = move || {
        let metrics = metrics.clone();
        async move { metrics.encode() }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(text));
    let _ = axum::serve(listener, app).await;
}

/// GET http://127.0.0.1:`port`/metrics: the body, at most 16 MiB, within 10 s.
async fn fetch_metrics(port: u16) -> Option<String> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let request = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.take(16 << 20).read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        Some(text.split_once("\r\n\r\n")?.1.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .ok()
        .flatten()
}

impl Operator {
    /// Starts operator `generation` on `namespace`; its log goes to `log_dir` (child mode).
    pub async fn start(
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
                let log = log_dir.join(format!("{instance}.log"));
                start_child(generation, namespace, refresh, &instance, store, &log)
            }
            Mode::InProcess => start_in_process(generation, namespace, refresh, instance, store),
        };
        Self { generation, kind }
    }

    /// CPU seconds the operator has used so far.
    pub fn cpu_seconds(&self) -> f64 {
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
    pub fn memory_kib(&self) -> (u64, u64) {
        match &self.kind {
            OperatorKind::Child { pid, .. } => memory_kib(&format!("/proc/{pid}/status")),
            OperatorKind::InProcess { .. } => memory_kib("/proc/self/status"),
        }
    }

    /// Established connections to the apiserver (of the whole bench, in-process).
    pub fn apiserver_connections(&self) -> Option<usize> {
        let pid = match &self.kind {
            OperatorKind::Child { pid, .. } => pid.to_string(),
            OperatorKind::InProcess { .. } => "self".to_owned(),
        };
        tcp_connections(&pid, apiserver_port()?)
    }

    /// The operator's /metrics text (the child's endpoint, or its `Metrics` in-process).
    pub async fn metrics_text(&self) -> Option<String> {
        match &self.kind {
            OperatorKind::Child { metrics_port, .. } => fetch_metrics(*metrics_port).await,
            OperatorKind::InProcess { metrics, .. } => Some(metrics.encode()),
        }
    }

    /// Kills the operator abruptly (SIGKILL, or dropping its runtime).
    pub async fn kill(self) {
        match self.kind {
            OperatorKind::Child {
                mut child, reader, ..
            } => {
                let _ = child.kill().await;
                let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
            }
            OperatorKind::InProcess { runtime, live, .. } => {
                live.store(false, Ordering::Relaxed);
                runtime.shutdown_background();
            }
        }
    }
}

/// Spawns this bench binary as the operator, its stderr into `log`, and a task that feeds its
/// stdout lines into `store`.
fn start_child(
    generation: u32,
    namespace: &str,
    refresh: Duration,
    instance: &str,
    store: &Arc<Store>,
    log: &std::path::Path,
) -> OperatorKind {
    let log = std::fs::File::create(log).expect("operator log file");
    let metrics_port = support::ports::free_port();
    let exe = std::env::current_exe().expect("path of the bench binary");
    // A diagnostic wrapper (`BENCH_OPERATOR_WRAPPER="heaptrack -o /tmp/op"`): the child runs
    // under it; its CPU and RSS figures are then the wrapper's, not the operator's.
    let wrapper: Vec<String> = std::env::var("BENCH_OPERATOR_WRAPPER")
        .map(|w| w.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = tokio::process::Command::new(program);
            command.args(args).arg(&exe);
            command
        }
        None => tokio::process::Command::new(&exe),
    };
    let mut child = command
        .env(CHILD_ENV, "1")
        .env("BENCH_CHILD_NS", namespace)
        .env("BENCH_CHILD_REFRESH_MS", refresh.as_millis().to_string())
        .env("BENCH_CHILD_INSTANCE", instance)
        .env("BENCH_CHILD_METRICS_PORT", metrics_port.to_string())
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
            match parse_line(&line, generation) {
                Some(Line::Probe(event)) => store.push_probe(event),
                Some(Line::Write(pool, at_us, phase)) => store.push_ack(pool, at_us, phase),
                None => {}
            }
        }
    });
    OperatorKind::Child {
        child,
        pid,
        reader,
        metrics_port,
    }
}

/// Starts the operator on a dedicated runtime (threads named `bench-operator`, whose CPU is the
/// operator's), observed straight into `store`.
fn start_in_process(
    generation: u32,
    namespace: &str,
    refresh: Duration,
    instance: String,
    store: &Arc<Store>,
) -> OperatorKind {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("bench-operator")
        .thread_keep_alive(Duration::from_secs(24 * 3600))
        .enable_all()
        .build()
        .expect("operator runtime");
    let live = Arc::new(AtomicBool::new(true));
    let observer = Arc::new(BenchObserver::store(
        store.clone(),
        generation,
        live.clone(),
    ));
    let metrics = Arc::new(Metrics::new());
    runtime.spawn(run_operator(
        namespace.to_owned(),
        refresh,
        instance,
        observer,
        metrics.clone(),
    ));
    OperatorKind::InProcess {
        runtime,
        live,
        metrics,
    }
}
