#![warn(missing_docs)]
//! dbpool-client: a self-healing tokio-postgres pool for applications.
//!
//! Lives here: the public API ([`Pool`], [`PooledClient`], [`PoolConfig`], [`PoolOptions`],
//! [`PoolError`], [`Cause`], [`PoolStatus`], [`HealthReport`], [`ClientMetrics`],
//! [`from_dbpool`]) and the modules behind it. Recovery decisions are the `dbpool-recovery`
//! engine's (the same rules as the operator's); connecting, TLS and error classification are
//! `dbpool-probe`'s (one copy). Must not live here: a second copy of either, or the operator.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use dbpool_client::{Pool, PoolConfig};
//! let pool = Pool::new(
//!     PoolConfig::new("orders", "127.0.0.1", 5432, "orders", "app", Some("pw".into())),
//!     None,
//! );
//! let client = pool.get().await?; // fails at once while the breaker is open
//! client.simple_query("SELECT 1").await?;
//! # Ok(()) }
//! ```

mod config;
mod dbpool;
mod error;
mod metrics;
mod pool;
mod report;

pub use config::{PoolConfig, PoolOptions};
pub use dbpool::{FromDbPoolError, from_dbpool, from_dbpool_with};
pub use dbpool_probe::{ProbeOutcome, ProbeStage, SslMode};
pub use dbpool_recovery::{BreakerMode, BreakerState, Phase, Policy};
pub use error::{Cause, PoolError};
pub use metrics::ClientMetrics;
pub use pool::{Pool, PooledClient};
pub use report::{HealthReport, PoolStatus, Recommendation};
