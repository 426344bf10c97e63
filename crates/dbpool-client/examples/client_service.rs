//! An example service using dbpool-client: `GET /orders/count` runs a query through the pool,
//! `GET /healthz` returns the pool's health report, `GET /metrics` the `dbpool_client_*`
//! metrics.
//!
//! Lives here: wiring only (configuration from the environment, the HTTP routes). Must not live
//! here: anything the library should do for every application.
//!
//! In a cluster (the pod's ServiceAccount needs the Role in examples/client-service/rbac.yaml):
//!   DBPOOL_NAMESPACE=shop DBPOOL_NAME=orders client_service
//! Without Kubernetes:
//!   PGHOST=127.0.0.1 PGPORT=5432 PGUSER=app PGPASSWORD=... PGDATABASE=app client_service
//! Listens on LISTEN_ADDR (default 127.0.0.1:8080).

use std::{sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use dbpool_client::{ClientMetrics, Pool, PoolConfig, PoolOptions, SslMode, from_dbpool_with};
use prometheus_client::registry::Registry;

struct App {
    pool: Pool,
    registry: Registry,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut registry = Registry::default();
    let metrics = ClientMetrics::register(&mut registry);
    let options = PoolOptions {
        acquire_timeout: Duration::from_secs(2),
        ..PoolOptions::default()
    };
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let pool = match (env("DBPOOL_NAMESPACE"), env("DBPOOL_NAME")) {
        (Some(namespace), Some(name)) => {
            let client = kube::Client::try_default().await?;
            from_dbpool_with(client, &namespace, &name, options, Some(metrics)).await?
        }
        _ => {
            let port = env("PGPORT").and_then(|p| p.parse().ok()).unwrap_or(5432);
            let config = PoolConfig::new(
                "example",
                &env("PGHOST").unwrap_or_else(|| "127.0.0.1".into()),
                port,
                &env("PGDATABASE").unwrap_or_else(|| "postgres".into()),
                &env("PGUSER").unwrap_or_else(|| "postgres".into()),
                env("PGPASSWORD"),
            )
            .ssl_mode(SslMode::Prefer)
            .options(options);
            Pool::new(config, Some(metrics))
        }
    };
    let app = Arc::new(App { pool, registry });
    let router = Router::new()
        .route("/orders/count", get(count))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .with_state(app);
    let addr = env("LISTEN_ADDR").unwrap_or_else(|| "127.0.0.1:8080".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    tracing::info!(%addr, "listening");
    axum::serve(listener, router).await?;
    Ok(())
}

/// A query through the pool. While the breaker is open this answers 503 at once, with the real
/// cause (stage, SQLSTATE, message) and when the next trial is due.
async fn count(State(app): State<Arc<App>>) -> (StatusCode, String) {
    let client = match app.pool.get().await {
        Ok(client) => client,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    };
    match client
        .query_one("SELECT count(*) FROM pg_stat_activity", &[])
        .await
    {
        Ok(row) => (StatusCode::OK, format!("{}\n", row.get::<_, i64>(0))),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("query failed: {e}\n"),
        ),
    }
}

async fn healthz(State(app): State<Arc<App>>) -> (StatusCode, String) {
    let report = app.pool.health_check().await;
    let code = if report.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let s = &report.status;
    (
        code,
        format!(
            "healthy: {}\nphase: {:?}\nbreaker: {:?} (DbPool: {:?})\nconsecutive failures: {}\n\
             connections: {} idle, {} in use of {}\nlast error: {}\nrecommendation: {}\n",
            report.healthy,
            s.phase,
            s.breaker,
            s.dbpool_breaker,
            s.consecutive_failures,
            s.idle,
            s.in_use,
            s.max_size,
            s.last_error
                .as_ref()
                .map_or_else(|| "none".to_owned(), ToString::to_string),
            report.recommendation,
        ),
    )
}

async fn metrics_text(State(app): State<Arc<App>>) -> (StatusCode, String) {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &app.registry) {
        Ok(()) => (StatusCode::OK, text),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}
