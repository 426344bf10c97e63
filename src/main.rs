//! The `dbpool-operator` command: `run` starts the operator, `crd` prints the
//! CustomResourceDefinition. `run` also serves `/metrics`, `/healthz` and `/readyz`, and shuts
//! down gracefully on SIGTERM/SIGINT (releasing the leader lease, so a standby takes over at once).
//! Flags and defaults live in `dbpool_operator::cli`; this file only starts things.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use clap::Parser;
use dbpool_operator::{
    cli::{Cli, Command, LogFormat, RunArgs},
    controller,
    metrics::Metrics,
};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match dbpool_operator::api::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: cannot render the CRD: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            init_logging(args.log_format);
            let runtime = match runtime() {
                Ok(rt) => rt,
                Err(err) => {
                    eprintln!("error: cannot start the async runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    error!("{err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn client(kubeconfig: Option<&PathBuf>) -> Result<kube::Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("invalid kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no Kubernetes configuration found: {e}"))?,
    };
    kube::Client::try_from(config).map_err(|e| format!("cannot build the Kubernetes client: {e}"))
}

async fn run(args: RunArgs) -> Result<(), String> {
    let client = client(args.kubeconfig.as_ref()).await?;
    let config = args.operator_config(|name| std::env::var(name).ok());
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.metrics_addr))?;
    info!(addr = %args.metrics_addr, "serving /metrics, /healthz and /readyz");
    let health = Health {
        metrics: metrics.clone(),
        watch_failure_timeout: args.watch_failure_timeout.as_std(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/readyz", get(readyz))
        .with_state(metrics.clone())
        .merge(
            Router::new()
                .route("/healthz", get(healthz))
                .with_state(health),
        );
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            error!("health endpoint stopped: {err}");
        }
    });
    controller::run(client, config, metrics, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

/// What `/healthz` judges.
#[derive(Clone)]
struct Health {
    metrics: Arc<Metrics>,
    watch_failure_timeout: std::time::Duration,
}

/// 200 while the process works; 503 once its watches have failed for longer than the timeout
/// (a wedged process, which the kubelet should restart).
async fn healthz(State(health): State<Health>) -> (StatusCode, String) {
    match health.metrics.watches_failing_for() {
        Some(failing) if failing > health.watch_failure_timeout => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("watches failing for {}s", failing.as_secs()),
        ),
        _ => (StatusCode::OK, "ok".to_owned()),
    }
}

/// 200 once the process can do its job: the leader when its caches have synced, a standby once
/// it is watching the lease (so a 2-replica Deployment shows both pods Ready and can roll).
async fn readyz(State(metrics): State<Arc<Metrics>>) -> (StatusCode, &'static str) {
    match (metrics.is_ready(), metrics.is_leader()) {
        (true, true) => (StatusCode::OK, "ready: leader"),
        (true, false) => (StatusCode::OK, "ready: standby"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not ready"),
    }
}

async fn metrics_text(
    State(metrics): State<Arc<Metrics>>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
    }
}

/// Fewest runtime worker threads. Tokio starts one per CPU it may use, and under the chart's
/// 500m CPU limit that is one: a single task that blocks its thread then stalls `/healthz`,
/// `/metrics` and every probe together. The in-cluster test once saw a leader whose only worker
/// stopped answering for minutes right after it took the lease (liveness-restarted five times;
/// the cause is not found yet, see the closing note of session 5). Two workers keep one blocked
/// task from stalling everything; they did not cure that stall, which came back once with two.
const MIN_WORKER_THREADS: usize = 2;

/// The operator's runtime: one worker per usable CPU, at least [`MIN_WORKER_THREADS`].
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus.max(MIN_WORKER_THREADS))
        .enable_all()
        .build()
}
