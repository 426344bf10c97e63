//! The pools under test, each behind one call: check out a connection, `SELECT 1`, release.
//!
//! Lives here: [`PoolKind`] (every pool configuration the benchmark compares, with its label and
//! how it was configured), [`Op`] (what a call does with its connection), [`BenchPool`] (a built
//! pool of one kind) and [`BenchPool::call`], the unit of load. PgBouncer is the pool of its
//! columns: each task holds one tokio-postgres connection to it, made at the task's first call
//! and again after any error (what an application that leaves pooling to PgBouncer does). Must
//! not live here: timing, counting or the scenario (`load`, `scenario`), PgBouncer's process
//! (`bouncer`).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use dbpool_client::{Policy, PoolConfig, PoolOptions};
use dbpool_testkit::postgres::{APP_DB, APP_PASSWORD, APP_USER};

/// Pool size of every pool (the "max 10 connections").
pub const MAX_SIZE: u32 = 10;

/// Our connect timeout (`Policy::default().timeout`), which the "= ours" peers get.
pub fn our_connect_timeout() -> Duration {
    Policy::default().timeout
}

/// Our acquire timeout (`PoolOptions::default().acquire_timeout`), which the "= ours" peers get.
pub fn our_acquire_timeout() -> Duration {
    PoolOptions::default().acquire_timeout
}

/// One pool configuration of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    /// deadpool-postgres 0.14 at its defaults (no wait, create or recycle timeout).
    DeadpoolDefault,
    /// deadpool-postgres with wait = our acquire timeout, create and recycle = our connect timeout.
    DeadpoolEqual,
    /// bb8 0.9 + bb8-postgres at their defaults (connection_timeout 30 s, retries connects).
    Bb8Default,
    /// bb8 with connection_timeout = our acquire timeout and connect_timeout = ours.
    Bb8Equal,
    /// sqlx (postgres, tokio) at its defaults (acquire_timeout 30 s, test_before_acquire).
    SqlxDefault,
    /// sqlx with acquire_timeout = ours (sqlx has no separate connect timeout).
    SqlxEqual,
    /// dbpool-client at its defaults (breaker openTimeout 60 s).
    OursDefault,
    /// dbpool-client with short timings: breaker openTimeout 1 s, the rest default.
    OursShort,
    /// dbpool-client at its defaults but `sslmode=disable` (only in the TLS-server rounds: the
    /// defaults' `prefer` takes TLS where the server offers it, the peers' NoTls never does).
    OursNoTls,
    /// dbpool-client made by `from_dbpool`, following a DbPool at the API's defaults that the
    /// real operator reconciles (`cluster`): the readiness edge from `status.readiness`.
    OursDbPool,
    /// PgBouncer 1.18 (Debian) at its defaults; each task one tokio-postgres connection to it.
    BouncerDefault,
    /// PgBouncer with `server_login_retry = 1` (default 15 s), the rest default.
    BouncerRetry1,
}

/// What a call does with the connection it checked out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `simple_query("SELECT 1")` (simple query protocol; `raw_sql` on sqlx): the benchmark's
    /// operation in every scenario, and the outside run's.
    SimpleSelect,
    /// Nothing: check out and give back (the pool's own cost; bb8 and sqlx still test the
    /// connection at checkout, a round trip, by default).
    CheckoutOnly,
}

impl Op {
    /// Short name, used by the `BENCH_CLIENT_OPS` filter.
    pub fn id(self) -> &'static str {
        match self {
            Op::SimpleSelect => "select",
            Op::CheckoutOnly => "checkout",
        }
    }

    /// Title in the report.
    pub fn title(self) -> &'static str {
        match self {
            Op::SimpleSelect => "checkout + simple_query(\"SELECT 1\") + release",
            Op::CheckoutOnly => "checkout + release (no statement)",
        }
    }
}

impl PoolKind {
    /// Every kind, in the order of the tables' columns.
    pub const ALL: [PoolKind; 11] = [
        PoolKind::DeadpoolDefault,
        PoolKind::DeadpoolEqual,
        PoolKind::Bb8Default,
        PoolKind::Bb8Equal,
        PoolKind::SqlxDefault,
        PoolKind::SqlxEqual,
        PoolKind::BouncerDefault,
        PoolKind::BouncerRetry1,
        PoolKind::OursDefault,
        PoolKind::OursShort,
        PoolKind::OursDbPool,
    ];

    /// Short name, used by the `BENCH_CLIENT_POOLS` filter.
    pub fn id(self) -> &'static str {
        match self {
            PoolKind::DeadpoolDefault => "deadpool",
            PoolKind::DeadpoolEqual => "deadpool-eq",
            PoolKind::Bb8Default => "bb8",
            PoolKind::Bb8Equal => "bb8-eq",
            PoolKind::SqlxDefault => "sqlx",
            PoolKind::SqlxEqual => "sqlx-eq",
            PoolKind::OursDefault => "ours",
            PoolKind::OursShort => "ours-short",
            PoolKind::OursDbPool => "ours-dbpool",
            PoolKind::OursNoTls => "ours-notls",
            PoolKind::BouncerDefault => "pgbouncer",
            PoolKind::BouncerRetry1 => "pgbouncer-retry1",
        }
    }

    /// Column header.
    pub fn label(self) -> &'static str {
        match self {
            PoolKind::DeadpoolDefault => "deadpool defaults",
            PoolKind::DeadpoolEqual => "deadpool = ours",
            PoolKind::Bb8Default => "bb8 defaults",
            PoolKind::Bb8Equal => "bb8 = ours",
            PoolKind::SqlxDefault => "sqlx defaults",
            PoolKind::SqlxEqual => "sqlx = ours",
            PoolKind::OursDefault => "dbpool-client defaults",
            PoolKind::OursShort => "dbpool-client short",
            PoolKind::OursDbPool => "dbpool-client with a DbPool",
            PoolKind::OursNoTls => "dbpool-client sslmode disable",
            PoolKind::BouncerDefault => "PgBouncer defaults",
            PoolKind::BouncerRetry1 => "PgBouncer login_retry 1",
        }
    }

    /// Whether this is dbpool-client.
    pub fn is_ours(self) -> bool {
        matches!(
            self,
            PoolKind::OursDefault
                | PoolKind::OursShort
                | PoolKind::OursDbPool
                | PoolKind::OursNoTls
        )
    }

    /// Whether this is dbpool-client following a DbPool (`cluster`).
    pub fn follows_dbpool(self) -> bool {
        self == PoolKind::OursDbPool
    }

    /// Whether this is PgBouncer (a process the run starts and stops).
    pub fn is_bouncer(self) -> bool {
        matches!(self, PoolKind::BouncerDefault | PoolKind::BouncerRetry1)
    }

    /// How the kind is configured, for the report.
    pub fn describe(self) -> String {
        let (c, a) = (our_connect_timeout(), our_acquire_timeout());
        match self {
            PoolKind::DeadpoolDefault => {
                "deadpool-postgres 0.14, max_size 10, RecyclingMethod::Fast, timeouts wait/create/recycle none (its defaults)".into()
            }
            PoolKind::DeadpoolEqual => format!(
                "deadpool-postgres 0.14, max_size 10, wait {a:?}, create {c:?}, recycle {c:?}, tokio-postgres connect_timeout {c:?}"
            ),
            PoolKind::Bb8Default => {
                "bb8 0.9 + bb8-postgres 0.9, max_size 10, connection_timeout 30 s, retry_connection, test_on_check_out (its defaults)".into()
            }
            PoolKind::Bb8Equal => format!(
                "bb8 0.9, max_size 10, connection_timeout {a:?}, tokio-postgres connect_timeout {c:?}"
            ),
            PoolKind::SqlxDefault => {
                "sqlx 0.9 (postgres, runtime-tokio), max_connections 10, acquire_timeout 30 s, test_before_acquire (its defaults)".into()
            }
            PoolKind::SqlxEqual => format!(
                "sqlx 0.9, max_connections 10, acquire_timeout {a:?} (bounds the connect too: sqlx has no connect timeout of its own)"
            ),
            PoolKind::OursDefault => format!(
                "dbpool-client, PoolConfig::new defaults: max_size 10, acquire_timeout {a:?}, connect timeout {c:?}, backoff 1 s x2, breaker after 5 failures, openTimeout 60 s, readiness pings at most 1/s (standalone)"
            ),
            PoolKind::OursShort => {
                "dbpool-client, as defaults but breaker openTimeout 1 s".into()
            }
            PoolKind::OursNoTls => {
                "dbpool-client, as defaults but sslmode disable (the TLS-server rounds only)".into()
            }
            PoolKind::OursDbPool => {
                "dbpool-client from `from_dbpool` (default PoolOptions), following a DbPool with the API's default recovery settings (healthCheck 30 s / 5 s adaptive, backoff 1 s x2 to 60 s, breaker after 5, openTimeout 60 s; sslMode prefer, pool 1..10) reconciled by the operator's release binary (a child process, default flags) on a real kube-apiserver in the benchmark's namespace: no pings of its own while its watch is live, the readiness edge from `status.readiness`".into()
            }
            PoolKind::BouncerDefault => format!(
                "{}, every setting at its default (pool_mode session, default_pool_size 20, server_login_retry 15 s, query_wait_timeout 120 s, auth_type md5) except listen address and auth_file; started by the run as the postgres user; each task one tokio-postgres connection to it (no connect timeout), reconnecting at its next call after any error",
                crate::bouncer::version()
            ),
            PoolKind::BouncerRetry1 => {
                "PgBouncer as its defaults column but server_login_retry = 1".into()
            }
        }
    }
}

/// Why a call failed.
#[derive(Debug)]
pub struct CallError {
    /// dbpool-client's breaker answered (Open or HalfOpen): a fail-fast refusal.
    pub breaker_open: bool,
}

impl CallError {
    fn other() -> Self {
        CallError {
            breaker_open: false,
        }
    }
}

/// A built pool of one [`PoolKind`].
pub enum BenchPool {
    /// deadpool-postgres.
    Deadpool(deadpool_postgres::Pool),
    /// bb8 + bb8-postgres.
    Bb8(bb8::Pool<bb8_postgres::PostgresConnectionManager<tokio_postgres::NoTls>>),
    /// sqlx.
    Sqlx(sqlx::PgPool),
    /// dbpool-client.
    Ours(dbpool_client::Pool),
    /// PgBouncer: one connection slot per task (boxed: the tokio-postgres config is large).
    Bouncer(Box<BouncerClients>),
}

/// The tasks' connections to PgBouncer (and PgBouncer itself, stopped when this is dropped).
pub struct BouncerClients {
    config: tokio_postgres::Config,
    slots: Vec<tokio::sync::Mutex<Option<tokio_postgres::Client>>>,
    /// Connects the tasks made to PgBouncer (to tell them from PgBouncer's own to PostgreSQL).
    pub connects: AtomicU64,
    /// The process, held to stop it when the pool is dropped.
    _bouncer: crate::bouncer::Bouncer,
}

impl BouncerClients {
    async fn call(&self, task: usize, op: Op) -> Result<(), CallError> {
        let slot = self.slots.get(task).ok_or_else(CallError::other)?;
        let mut slot = slot.lock().await;
        if slot.is_none() {
            self.connects.fetch_add(1, Ordering::Relaxed);
            let (client, connection) = self
                .config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|_| CallError::other())?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            *slot = Some(client);
        }
        let result = match (slot.as_ref(), op) {
            (Some(c), Op::SimpleSelect) => c.simple_query("SELECT 1").await.map(drop),
            (Some(c), Op::CheckoutOnly) if c.is_closed() => {
                *slot = None;
                return Err(CallError::other());
            }
            _ => Ok(()),
        };
        if result.is_err() {
            *slot = None;
        }
        result.map_err(|_| CallError::other())
    }
}

fn pg_config(port: u16, connect_timeout: Option<Duration>) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(APP_USER)
        .password(APP_PASSWORD)
        .dbname(APP_DB);
    if let Some(t) = connect_timeout {
        cfg.connect_timeout(t);
    }
    cfg
}

impl BenchPool {
    /// Builds a pool of `kind` against 127.0.0.1:`port` (lazily: no connection is opened here,
    /// except by dbpool-client's supervisor, which connects at once). PgBouncer's kinds need the
    /// started `bouncer` (in front of `port`).
    pub fn build(
        kind: PoolKind,
        port: u16,
        bouncer: Option<crate::bouncer::Bouncer>,
    ) -> Result<BenchPool, String> {
        let (c, a) = (our_connect_timeout(), our_acquire_timeout());
        Ok(match kind {
            PoolKind::DeadpoolDefault | PoolKind::DeadpoolEqual => {
                let equal = kind == PoolKind::DeadpoolEqual;
                let manager = deadpool_postgres::Manager::from_config(
                    pg_config(port, equal.then_some(c)),
                    tokio_postgres::NoTls,
                    deadpool_postgres::ManagerConfig {
                        recycling_method: deadpool_postgres::RecyclingMethod::Fast,
                    },
                );
                let mut b = deadpool_postgres::Pool::builder(manager)
                    .max_size(MAX_SIZE as usize)
                    .runtime(deadpool_postgres::Runtime::Tokio1);
                if equal {
                    b = b
                        .wait_timeout(Some(a))
                        .create_timeout(Some(c))
                        .recycle_timeout(Some(c));
                }
                BenchPool::Deadpool(b.build().map_err(|e| format!("deadpool: {e}"))?)
            }
            PoolKind::Bb8Default | PoolKind::Bb8Equal => {
                let equal = kind == PoolKind::Bb8Equal;
                let manager = bb8_postgres::PostgresConnectionManager::new(
                    pg_config(port, equal.then_some(c)),
                    tokio_postgres::NoTls,
                );
                let mut b = bb8::Pool::builder().max_size(MAX_SIZE);
                if equal {
                    b = b.connection_timeout(a);
                }
                BenchPool::Bb8(b.build_unchecked(manager))
            }
            PoolKind::SqlxDefault | PoolKind::SqlxEqual => {
                let opts = sqlx::postgres::PgConnectOptions::new()
                    .host("127.0.0.1")
                    .port(port)
                    .username(APP_USER)
                    .password(APP_PASSWORD)
                    .database(APP_DB);
                let mut b = sqlx::postgres::PgPoolOptions::new().max_connections(MAX_SIZE);
                if kind == PoolKind::SqlxEqual {
                    b = b.acquire_timeout(a);
                }
                BenchPool::Sqlx(b.connect_lazy_with(opts))
            }
            PoolKind::OursDefault | PoolKind::OursShort | PoolKind::OursNoTls => {
                let mut config = PoolConfig::new(
                    kind.id(),
                    "127.0.0.1",
                    port,
                    APP_DB,
                    APP_USER,
                    Some(APP_PASSWORD.to_owned()),
                );
                if kind == PoolKind::OursNoTls {
                    config = config.ssl_mode(dbpool_client::SslMode::Disable);
                }
                if kind == PoolKind::OursShort {
                    config = config.policy(Policy {
                        open_timeout: Duration::from_secs(1),
                        ..Policy::default()
                    });
                }
                BenchPool::Ours(dbpool_client::Pool::new(config, None))
            }
            PoolKind::OursDbPool => {
                return Err(
                    "a DbPool-driven pool is made by the cluster (`cluster::Cluster::pool`)".into(),
                );
            }
            PoolKind::BouncerDefault | PoolKind::BouncerRetry1 => {
                let bouncer = bouncer.ok_or("PgBouncer was not started")?;
                let tasks = crate::scenario::TASKS;
                BenchPool::Bouncer(Box::new(BouncerClients {
                    config: pg_config(bouncer.port(), None),
                    slots: (0..tasks).map(|_| tokio::sync::Mutex::new(None)).collect(),
                    connects: AtomicU64::new(0),
                    _bouncer: bouncer,
                }))
            }
        })
    }

    /// One unit of load for task `task`: a connection, `op`, release.
    pub async fn call(&self, task: usize, op: Op) -> Result<(), CallError> {
        let select = op == Op::SimpleSelect;
        match self {
            BenchPool::Deadpool(p) => {
                let c = p.get().await.map_err(|_| CallError::other())?;
                if select {
                    c.simple_query("SELECT 1")
                        .await
                        .map_err(|_| CallError::other())?;
                }
            }
            BenchPool::Bb8(p) => {
                let c = p.get().await.map_err(|_| CallError::other())?;
                if select {
                    c.simple_query("SELECT 1")
                        .await
                        .map_err(|_| CallError::other())?;
                }
            }
            BenchPool::Sqlx(p) => {
                let mut c = p.acquire().await.map_err(|_| CallError::other())?;
                if select {
                    sqlx::raw_sql("SELECT 1")
                        .execute(&mut *c)
                        .await
                        .map_err(|_| CallError::other())?;
                }
            }
            BenchPool::Ours(p) => {
                let c = p.get().await.map_err(|e| CallError {
                    breaker_open: e.is_breaker_open(),
                })?;
                if select {
                    c.simple_query("SELECT 1")
                        .await
                        .map_err(|_| CallError::other())?;
                }
            }
            BenchPool::Bouncer(b) => b.call(task, op).await?,
        }
        Ok(())
    }

    /// dbpool-client's last successful connect (probe, trial or retry), if this is ours.
    pub fn last_success(&self) -> Option<jiff::Timestamp> {
        match self {
            BenchPool::Ours(p) => p.status().last_success,
            _ => None,
        }
    }

    /// dbpool-client's status, if this is ours.
    pub fn status(&self) -> Option<dbpool_client::PoolStatus> {
        match self {
            BenchPool::Ours(p) => Some(p.status()),
            _ => None,
        }
    }

    /// Connects the tasks made to PgBouncer, if this is PgBouncer.
    pub fn app_connects(&self) -> Option<u64> {
        match self {
            BenchPool::Bouncer(b) => Some(b.connects.load(Ordering::Relaxed)),
            _ => None,
        }
    }

    /// Closes the pool and its connections.
    pub async fn close(self) {
        match self {
            BenchPool::Deadpool(p) => p.close(),
            BenchPool::Bb8(p) => drop(p),
            BenchPool::Sqlx(p) => p.close().await,
            BenchPool::Ours(p) => {
                p.close();
                // A DbPool's pool (named namespace/name): its DbPool goes too.
                if p.name().contains('/')
                    && let Some(cluster) = crate::cluster::CLUSTER.get()
                {
                    cluster.delete(p.name()).await;
                }
            }
            BenchPool::Bouncer(b) => {
                for slot in &b.slots {
                    slot.lock().await.take();
                }
                drop(b);
            }
        }
    }
}
