//! Configuration from a DbPool, and following it while running.
//!
//! Lives here: [`from_dbpool`] / [`from_dbpool_with`]: read the DbPool's spec and its password
//! (and CA) Secret, build the pool, and spawn the follower, a watch on that one object that
//! applies spec changes and passes the DbPool's breaker and force-reopen token to the pool as
//! hints, and its `status.readiness` as the readiness edge (the pool pings nothing itself while
//! this watch is live; a watch error hands pinging back to the pool until the next object
//! arrives). Needs exactly get/list/watch on `dbpools` and get on `secrets` in the namespace.
//! Must not live here: what the hints do (`pool::follow`), any write to the cluster.

use std::time::Duration;

use dbpool_api::{DbPool, DbPoolSpec, FORCE_REOPEN_ANNOTATION, SecretKeyRef};
use dbpool_probe::{Password, ProbeOutcome, ProbeStage, ProbeTarget, Readiness};
use dbpool_recovery::{BreakerState, Phase};
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use tracing::{Instrument, info_span, warn};

use crate::{Cause, ClientMetrics, Pool, PoolConfig, PoolOptions, pool::WeakPool};

/// Why a pool could not be made from a DbPool.
#[derive(Debug, thiserror::Error)]
pub enum FromDbPoolError {
    /// Reading the DbPool or a Secret from the apiserver failed (missing, forbidden, ...).
    #[error("reading {what}: {source}")]
    Kube {
        /// What was being read.
        what: String,
        /// The apiserver's answer.
        source: kube::Error,
    },
    /// A Secret lacks the key the DbPool names, or its value is not UTF-8.
    #[error("Secret {name}: {problem}")]
    Secret {
        /// The Secret's name.
        name: String,
        /// What is wrong with it (never its value).
        problem: String,
    },
    /// The spec has a value the client cannot use (e.g. a port out of range).
    #[error("DbPool spec: {0}")]
    Spec(String),
}

/// A pool for DbPool `namespace/name` with [`PoolOptions::default`] and no metrics; see
/// [`from_dbpool_with`].
pub async fn from_dbpool(
    client: Client,
    namespace: &str,
    name: &str,
) -> Result<Pool, FromDbPoolError> {
    from_dbpool_with(client, namespace, name, PoolOptions::default(), None).await
}

/// A pool for DbPool `namespace/name`: target, TLS, sizes (`pool.maxSize`, `pool.minSize` as
/// min idle), health-check timeout, backoff and breaker from its spec, the password from its
/// Secret; the other `options` are the application's. Spec changes apply while it runs; the
/// DbPool's breaker and force-reopen annotation are hints (see the crate's README section).
pub async fn from_dbpool_with(
    client: Client,
    namespace: &str,
    name: &str,
    options: PoolOptions,
    metrics: Option<ClientMetrics>,
) -> Result<Pool, FromDbPoolError> {
    let api: Api<DbPool> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let object = api
        .get(name)
        .await
        .map_err(|source| FromDbPoolError::Kube {
            what: format!("DbPool {namespace}/{name}"),
            source,
        })?;
    let pool_name = format!("{namespace}/{name}");
    let target = target_for(&secrets, &pool_name, &object.spec).await?;
    let (max_size, min_idle) = sizes(&object.spec);
    let config = PoolConfig {
        name: pool_name.clone(),
        target,
        policy: object.spec.policy(),
        options: PoolOptions {
            max_size,
            min_idle,
            adaptive_timeout: object.spec.health_check.adaptive_timeout,
            ..options
        },
    };
    let pool = Pool::new(config, metrics);
    pool.observe_dbpool(
        breaker_of(&object),
        token_of(&object),
        operator_cause(&object),
        readiness_of(&object),
    );
    let span = info_span!("dbpool_client.follow", pool = %pool_name);
    tokio::spawn(
        follow(
            pool.downgrade(),
            api,
            secrets,
            name.to_owned(),
            object.spec.clone(),
        )
        .instrument(span),
    );
    Ok(pool)
}

fn sizes(spec: &DbPoolSpec) -> (usize, usize) {
    let max = usize::try_from(spec.pool.max_size).unwrap_or(1).max(1);
    let min = usize::try_from(spec.pool.min_size).unwrap_or(0).min(max);
    (max, min)
}

fn breaker_of(object: &DbPool) -> Option<BreakerState> {
    object
        .status
        .as_ref()
        .and_then(|s| s.breaker.as_ref())
        .map(|b| b.state)
}

/// The operator's last failed probe, as the cause to show while the DbPool holds the breaker
/// open and the client has seen no failure of its own.
fn operator_cause(object: &DbPool) -> Option<Cause> {
    let probe = object.status.as_ref()?.last_probe.as_ref()?;
    if probe.outcome == ProbeOutcome::Success {
        return None;
    }
    Some(Cause {
        outcome: probe.outcome,
        stage: probe.stage.unwrap_or(ProbeStage::Connect),
        sql_state: probe.sql_state.clone(),
        message: format!(
            "the operator's probe: {}",
            probe.message.as_deref().unwrap_or("failed")
        ),
        at: probe.time.0,
    })
}

/// The operator's view of the target's readiness (`status.readiness`): state and since.
fn readiness_of(object: &DbPool) -> Option<(Readiness, Timestamp)> {
    let r = object.status.as_ref()?.readiness.as_ref()?;
    Some((r.state, r.since.0))
}

fn token_of(object: &DbPool) -> Option<String> {
    object.annotations().get(FORCE_REOPEN_ANNOTATION).cloned()
}

/// Watches the one DbPool until the pool is dropped: spec changes reconfigure it, status and
/// annotation changes are passed on as hints. While the pool reports a configuration error, the
/// Secret is read again every 30 s, so a rotated password is picked up without a spec change.
async fn follow(
    weak: WeakPool,
    api: Api<DbPool>,
    secrets: Api<Secret>,
    name: String,
    mut spec: DbPoolSpec,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher(api, config).default_backoff().applied_objects();
    futures::pin_mut!(stream);
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.tick().await;
    loop {
        tokio::select! {
            item = stream.next() => {
                let Some(item) = item else { return };
                let Some(pool) = weak.upgrade() else { return };
                match item {
                    Ok(object) => {
                        if object.spec != spec {
                            match target_for(&secrets, pool.name(), &object.spec).await {
                                Ok(target) => {
                                    let (max, min) = sizes(&object.spec);
                                    pool.reconfigure(target, object.spec.policy(), (max, min), object.spec.health_check.adaptive_timeout);
                                    spec = object.spec.clone();
                                }
                                Err(e) => warn!(error = %e, "DbPool spec changed but cannot be applied"),
                            }
                        }
                        pool.observe_dbpool(breaker_of(&object), token_of(&object), operator_cause(&object), readiness_of(&object));
                    }
                    Err(e) => {
                        // Until the watch is back the pool pings for itself.
                        pool.set_followed(false);
                        warn!(error = %e, "DbPool watch failed; retrying");
                    }
                }
            }
            _ = tick.tick() => {
                let Some(pool) = weak.upgrade() else { return };
                if pool.status().phase != Phase::ConfigError {
                    continue;
                }
                match target_for(&secrets, pool.name(), &spec).await {
                    Ok(target) if target.password != pool.target().password
                        || target.ca_pem != pool.target().ca_pem => {
                        let (max, min) = sizes(&spec);
                        pool.reconfigure(target, spec.policy(), (max, min), spec.health_check.adaptive_timeout);
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "re-reading the Secret failed"),
                }
            }
        }
    }
}

/// The connect target of `spec`, with the password and CA read from their Secrets.
async fn target_for(
    secrets: &Api<Secret>,
    pool_name: &str,
    spec: &DbPoolSpec,
) -> Result<ProbeTarget, FromDbPoolError> {
    let db = &spec.database;
    let password = match &db.password_secret_ref {
        Some(r) => Some(Password::new(
            String::from_utf8(secret_value(secrets, r).await?).map_err(|_| {
                FromDbPoolError::Secret {
                    name: r.name.clone(),
                    problem: format!("key {} is not UTF-8", r.key),
                }
            })?,
        )),
        None => None,
    };
    let ca_pem = match &db.ca_secret_ref {
        Some(r) => Some(secret_value(secrets, r).await?),
        None => None,
    };
    let port = u16::try_from(db.port)
        .map_err(|_| FromDbPoolError::Spec(format!("port {} out of range", db.port)))?;
    let (max_size, _) = sizes(spec);
    let policy = spec.policy();
    Ok(ProbeTarget {
        host: db.host.clone(),
        port,
        dbname: db.dbname.clone(),
        user: db.user.clone(),
        password,
        ssl_mode: db.ssl_mode,
        allow_md5: db.allow_md5,
        ca_pem,
        target_session_attrs: db.target_session_attrs,
        application_name: format!("dbpool-client/{pool_name}"),
        pool_max_size: u32::try_from(max_size).unwrap_or(u32::MAX),
        timeout: policy.timeout,
    })
}

async fn secret_value(secrets: &Api<Secret>, r: &SecretKeyRef) -> Result<Vec<u8>, FromDbPoolError> {
    let secret = secrets
        .get(&r.name)
        .await
        .map_err(|source| FromDbPoolError::Kube {
            what: format!("Secret {}", r.name),
            source,
        })?;
    secret
        .data
        .and_then(|mut d| d.remove(&r.key))
        .map(|v| v.0)
        .ok_or_else(|| FromDbPoolError::Secret {
            name: r.name.clone(),
            problem: format!("no key {}", r.key),
        })
}
