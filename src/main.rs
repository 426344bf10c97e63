//! The `dbpool-operator` command: `run` starts the operator, `crd` prints the
//! CustomResourceDefinition. Also serves `/healthz` and `/readyz`, and handles SIGTERM/SIGINT.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use clap::{Parser, Subcommand, ValueEnum};
use dbpool_operator::{
    api::GoDuration,
    controller::{self, OperatorConfig, Readiness},
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
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Kubeconfig file; without it, $KUBECONFIG, ~/.kube/config or the in-cluster config.
    #[arg(long, env = "DBPOOL_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "DBPOOL_NAMESPACE")]
    namespace: Option<String>,
    /// Address of the /healthz and /readyz endpoints.
    #[arg(long, env = "DBPOOL_HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    health_addr: SocketAddr,
    /// Probes running at once across all pools.
    #[arg(long, env = "DBPOOL_MAX_CONCURRENT_PROBES", default_value_t = 64)]
    max_concurrent_probes: usize,
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
            match runtime.block_on(run(args)) {
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
    let config = OperatorConfig {
        namespace: args.namespace,
        max_concurrent_probes: args.max_concurrent_probes,
        status_refresh: args.status_refresh.as_std(),
        reconnect_every: args.reconnect_every.as_std(),
        instance,
    };
    let readiness = Arc::new(Readiness::default());
    let listener = tokio::net::TcpListener::bind(args.health_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.health_addr))?;
    info!(addr = %args.health_addr, "serving /healthz and /readyz");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(readiness.clone());
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            error!("health endpoint stopped: {err}");
        }
    });
    controller::run(client, config, readiness, shutdown_signal()).await;
    Ok(())
}

async fn readyz(State(readiness): State<Arc<Readiness>>) -> (StatusCode, &'static str) {
    if readiness.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
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
