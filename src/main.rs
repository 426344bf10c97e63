//! The `dbpool-operator` command: `run` starts the operator, `crd` prints the
//! CustomResourceDefinition. `run` also serves `/metrics`, `/healthz` and `/readyz`, and shuts
//! down gracefully on SIGTERM/SIGINT (releasing the leader lease, so a standby takes over at once).

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use clap::{Parser, Subcommand, ValueEnum};
use dbpool_operator::{
    api::GoDuration,
    controller::{self, LeaderElection, OperatorConfig},
    metrics::Metrics,
};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

/// Kubernetes operator that keeps PostgreSQL connection pools out of a permanent failure state.
#[derive(Parser, Debug)]
#[command(name = "dbpool-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the DbPool CustomResourceDefinition as YAML (what crds/dbpool.yaml holds).
    Crd,
    /// Run the operator.
    Run(Box<RunArgs>),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Kubeconfig file; without it, $KUBECONFIG, ~/.kube/config or the in-cluster config.
    #[arg(long, env = "DBPOOL_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "DBPOOL_NAMESPACE")]
    namespace: Option<String>,
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "DBPOOL_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Elect a leader through a Lease; only the leader probes and writes.
    #[arg(long, env = "DBPOOL_LEADER_ELECT")]
    leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "DBPOOL_LEASE_NAME", default_value = "dbpool-operator")]
    lease_name: String,
    /// Namespace of the leader Lease (default: $POD_NAMESPACE, else "default").
    #[arg(long, env = "DBPOOL_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Validity of the lease after a renewal; a standby takes over this long after the leader dies.
    #[arg(long, env = "DBPOOL_LEASE_DURATION", default_value = "15s")]
    lease_duration: GoDuration,
    /// The leader renews this long before the lease expires.
    #[arg(long, env = "DBPOOL_LEASE_RENEW_GRACE", default_value = "5s")]
    lease_renew_grace: GoDuration,
    /// Probes running at once across all pools.
    #[arg(long, env = "DBPOOL_MAX_CONCURRENT_PROBES", default_value_t = 64)]
    max_concurrent_probes: usize,
    /// Requests in flight to the apiserver at once (status, label and event writes, Secret reads).
    #[arg(long, env = "DBPOOL_MAX_CONCURRENT_API_REQUESTS", default_value_t = 16)]
    max_concurrent_api_requests: usize,
    /// In a healthy steady state, refresh status.lastProbe at most this often.
    #[arg(long, env = "DBPOOL_STATUS_REFRESH", default_value = "5m")]
    status_refresh: GoDuration,
    /// Reopen each persistent probe connection this often (tests the full connect path).
    #[arg(long, env = "DBPOOL_RECONNECT_EVERY", default_value = "5m")]
    reconnect_every: GoDuration,
    /// Log format.
    #[arg(long, env = "DBPOOL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Instance name shown in events (defaults to $POD_NAME or the host name).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

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
            let runtime = match tokio::runtime::Runtime::new() {
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
    let instance = args
        .instance
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "dbpool-operator".to_owned());
    let leader_election = args.leader_elect.then(|| LeaderElection {
        lease_name: args.lease_name.clone(),
        lease_namespace: args
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".to_owned()),
        lease_duration: args.lease_duration.as_std(),
        renew_grace: args.lease_renew_grace.as_std(),
    });
    let config = OperatorConfig {
        namespace: args.namespace,
        max_concurrent_probes: args.max_concurrent_probes,
        max_concurrent_api_requests: args.max_concurrent_api_requests,
        status_refresh: args.status_refresh.as_std(),
        reconnect_every: args.reconnect_every.as_std(),
        instance,
        leader_election,
    };
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.metrics_addr))?;
    info!(addr = %args.metrics_addr, "serving /metrics, /healthz and /readyz");
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(metrics.clone());
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            error!("health endpoint stopped: {err}");
        }
    });
    controller::run(client, config, metrics, shutdown_signal()).await;
    Ok(())
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
