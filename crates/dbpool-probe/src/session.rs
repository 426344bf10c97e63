//! Sessions for application pools: the probe's connect path, handed out as a usable client.
//!
//! Lives here: [`open_session`], which opens one PostgreSQL session through exactly the stages a
//! probe uses (resolve, TCP with keepalive, TLS with the same refusal of unsafe modes, startup
//! and authentication, and the role check for `read-write`) and returns the
//! `tokio_postgres::Client` plus its connection future, and [`SessionError`], the classified
//! failure. [`classify_error`] classifies an error met later on such a session. Must not live
//! here: pooling, retries or recovery policy (the `dbpool-client` crate owns those).

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use rustls::crypto::CryptoProvider;

use crate::{
    Password, ProbeOutcome, ProbeStage, ProbeTarget, StageTimeouts, TargetSessionAttrs,
    classify::{from_pg_error, redact},
    connect,
    stage::{Clock, Failure},
};

/// The future that drives a session's socket; spawn it. It ends when the session ends: `Ok`
/// when the client was dropped, `Err` when the server or the network ended it.
pub type SessionConnection =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send>>;

/// One open, authenticated session.
pub struct Session {
    /// The client half, for queries.
    pub client: tokio_postgres::Client,
    /// The connection half; must be spawned for the client to make progress.
    pub connection: SessionConnection,
    /// `server_version` as reported at startup.
    pub server_version: Option<String>,
    /// The address connected to, for messages.
    pub peer: String,
    /// Wall time of the whole open.
    pub latency: Duration,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer)
            .field("server_version", &self.server_version)
            .finish_non_exhaustive()
    }
}

/// Why a session could not be opened (or broke), classified as a probe failure is. Never
/// contains a password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionError {
    /// TransientFailure, ConfigFailure or WrongRole (never Success).
    pub outcome: ProbeOutcome,
    /// The stage that failed.
    pub stage: ProbeStage,
    /// Short, for people.
    pub message: String,
    /// SQLSTATE of the server's error, when there was one.
    pub sql_state: Option<String>,
}

impl SessionError {
    fn from_failure(f: Failure, password: Option<&Password>) -> Self {
        Self {
            outcome: f.outcome,
            stage: f.stage,
            message: redact(f.message, password),
            sql_state: f.sql_state,
        }
    }
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.stage.name(), self.message)
    }
}

impl std::error::Error for SessionError {}

pub(crate) fn provider() -> &'static Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// Opens one session to `target` within `target.timeout`, through the probe's connect stages.
/// With `target_session_attrs: read-write` a standby is refused as `WrongRole`.
pub async fn open_session(target: &ProbeTarget) -> Result<Session, SessionError> {
    open_session_within(target, StageTimeouts::none()).await.0
}

/// [`open_session`] with each stage's wait limited by `limits` (adaptive timeouts), and the
/// latency of each stage that ran, for
/// [`AdaptiveTimeouts::learn_stages`](crate::AdaptiveTimeouts::learn_stages).
pub async fn open_session_within(
    target: &ProbeTarget,
    limits: StageTimeouts,
) -> (Result<Session, SessionError>, Vec<(ProbeStage, Duration)>) {
    let mut clock = Clock::limited(target.timeout, limits);
    let result = open_on(target, &mut clock).await;
    (result, clock.stages)
}

/// The stages of [`open_session`] on `clock`.
async fn open_on(target: &ProbeTarget, clock: &mut Clock) -> Result<Session, SessionError> {
    let clock = &mut *clock;
    let opened = connect::open(target, provider(), clock)
        .await
        .map_err(|f| SessionError::from_failure(f, target.password.as_ref()))?;
    let connect::Opened {
        client,
        connection,
        server_version,
        peer,
        ..
    } = opened;
    if target.target_session_attrs == TargetSessionAttrs::ReadWrite {
        // The connection must run for the query to progress; it is handed back unspawned, so
        // drive both here until the answer arrives.
        let mut connection = connection;
        let role_limit = clock.limits().get(ProbeStage::Role);
        let query = tokio::time::timeout(
            clock.remaining_within(role_limit),
            client.simple_query("SELECT pg_is_in_recovery()"),
        );
        let result = tokio::select! {
            r = query => r,
            ended = &mut connection => {
                let f = match ended {
                    Err(e) => from_pg_error(&e, ProbeStage::Role, &peer),
                    Ok(()) => Failure::transient(ProbeStage::Role, format!("connection closed by {peer}")),
                };
                return Err(SessionError::from_failure(f, target.password.as_ref()));
            }
        };
        let in_recovery = match result {
            Err(_) => {
                return Err(SessionError::from_failure(
                    clock.timed_out(ProbeStage::Role, "role check", role_limit),
                    target.password.as_ref(),
                ));
            }
            Ok(Err(e)) => {
                return Err(SessionError::from_failure(
                    from_pg_error(&e, ProbeStage::Role, &peer),
                    target.password.as_ref(),
                ));
            }
            Ok(Ok(messages)) => messages.iter().any(|m| {
                matches!(m, tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("t"))
            }),
        };
        if in_recovery {
            return Err(SessionError {
                outcome: ProbeOutcome::WrongRole,
                stage: ProbeStage::Role,
                message: format!("{peer} is a standby but targetSessionAttrs is read-write"),
                sql_state: None,
            });
        }
        return Ok(Session {
            client,
            connection,
            server_version,
            peer,
            latency: clock.elapsed(),
        });
    }
    Ok(Session {
        client,
        connection,
        server_version,
        peer,
        latency: clock.elapsed(),
    })
}

/// Classifies an error met on an open session (a failed check query, a connection that ended)
/// in `stage`, talking to `peer`, with any occurrence of `password` scrubbed.
pub fn classify_error(
    err: &tokio_postgres::Error,
    stage: ProbeStage,
    peer: &str,
    password: Option<&Password>,
) -> SessionError {
    SessionError::from_failure(from_pg_error(err, stage, peer), password)
}
