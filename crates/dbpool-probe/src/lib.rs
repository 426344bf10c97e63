//! The staged PostgreSQL probe and the persistent connections it runs on.
//!
//! Lives here: [`Prober`], which keeps one persistent connection per distinct target (shared by
//! every pool that probes it) and reports their loss as [`ConnectionLost`] events the moment it
//! happens; the probe stages (resolve, TCP, TLS, startup/auth, `SELECT 1`, role, saturation) with
//! their timeouts; the classification of every failure into a [`ProbeOutcome`]; and
//! [`open_session`], the same connect path handing a usable session to application pools
//! (`dbpool-client`), so there is one copy of connect, TLS and classification; [`ping`], the
//! readiness ping that learns whether a server accepts connections without any password; and
//! adaptive timeouts (`adaptive`: [`StageTimeouts`] as each stage's limit, [`AdaptiveTimeouts`]
//! learning them). The vocabulary
//! (the enums, [`ProbeReport`], the outcome → failure kind mapping) lives in `dbpool-vocab`, which
//! the API shares, and is re-exported here under its old paths.
//!
//! Must not live here: anything about Kubernetes (reading Secrets, writing status, scheduling the
//! next probe) or recovery policy (backoff, breaker): the probe reports what it saw and the
//! controller decides. Passwords travel only inside [`Password`], whose `Debug` is redacted; they
//! never enter a message, a log line, a connection key or an event.

mod adaptive;
mod checks;
mod classify;
mod connect;
mod guard;
mod ping;
mod prober;
mod session;
mod stage;
mod tls;

use std::{fmt, time::Duration};

pub use adaptive::{AdaptiveTimeouts, STAGES, StageTimeouts};
pub use guard::{
    MAX_SCRAM_ITERATIONS, MAX_SERVER_MESSAGE, MAX_STARTUP_BYTES, MIN_SCRAM_ITERATIONS,
};
pub use ping::{MAX_PING_MESSAGE, MAX_PING_TIME, PingReport, PingTarget, ping};
pub use prober::{ConnectionKey, Prober};
pub use session::{
    Session, SessionConnection, SessionError, classify_error, open_session, open_session_within,
};
// The vocabulary lives in dbpool-vocab (so the API needs no probe); its old paths stay valid.
pub use dbpool_vocab::{
    ProbeOutcome, ProbeReport, ProbeStage, Readiness, SslMode, TargetSessionAttrs,
};

/// A database password. `Debug` prints `<redacted>` and there is no `Display`, so it cannot end up
/// in a message or a log line by accident; [`Password::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps a password read from a Secret.
    pub fn new(password: String) -> Self {
        Self(password)
    }

    /// The password itself, for the authentication exchange only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Everything one probe needs: where the server is, how to log in, what counts as healthy.
#[derive(Clone, Debug)]
pub struct ProbeTarget {
    /// Host name or IP address of the server.
    pub host: String,
    /// TCP port of the server.
    pub port: u16,
    /// Database to connect to.
    pub dbname: String,
    /// Role to log in as.
    pub user: String,
    /// Password, when the server asks for one.
    pub password: Option<Password>,
    /// Whether MD5 password authentication may be used (`database.allowMd5`). Cleartext needs
    /// verified TLS whatever this says; see the authentication guard in docs/probe.md.
    pub allow_md5: bool,
    /// TLS mode (libpq's sslmode).
    pub ssl_mode: SslMode,
    /// PEM CA bundle for verify-ca and verify-full.
    pub ca_pem: Option<Vec<u8>>,
    /// Whether a standby is acceptable.
    pub target_session_attrs: TargetSessionAttrs,
    /// application_name shown in pg_stat_activity.
    pub application_name: String,
    /// The application pool's maximum size, checked against the server's free slots.
    pub pool_max_size: u32,
    /// Budget for the whole probe; every stage gets what is left of it.
    pub timeout: Duration,
}

/// Tuning of the [`Prober`].
#[derive(Clone, Debug)]
pub struct ProberConfig {
    /// Age after which a healthy persistent connection is replaced by a freshly opened one, so
    /// that what only new connections see (a changed password, a full server) is still noticed.
    pub reconnect_every: Duration,
}

impl Default for ProberConfig {
    fn default() -> Self {
        Self {
            reconnect_every: Duration::from_secs(300),
        }
    }
}

/// A persistent connection ended without the prober closing it: the pools in `owners` should be
/// probed now rather than at their next interval.
#[derive(Clone, Debug)]
pub struct ConnectionLost {
    /// The pools (`namespace/name`) that were using the connection.
    pub owners: Vec<String>,
    /// Why the connection ended, short and for people.
    pub reason: String,
}
