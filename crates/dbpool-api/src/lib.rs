//! The `DbPool` custom resource (group `dbpool.io`, version `v1alpha1`).
//!
//! Lives here: the spec and status types, their defaults, the admission rules (schema bounds and
//! CEL), and the CRD printer. Doc comments on fields become the schema descriptions that
//! `kubectl explain` shows, so they are written for users. No behaviour lives here: deciding,
//! probing and reconciling belong to `dbpool-recovery`, `dbpool-probe` and the operator's
//! controller. The enums those crates decide on or report (breaker mode and state, phase, TLS
//! mode, roles, probe stages and outcomes) are theirs (the probe's live in `dbpool-vocab`) and
//! re-exported here, so the schema shows them and neither crate needs kube; this crate does not
//! depend on `dbpool-probe`, so `kubectl-dbpool` links no database client. Must not live here:
//! I/O, clocks, the Kubernetes client.

// Each `printcolumn(...)` of the CustomResource derive repeats `type_`, which clippy takes for a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

/// The CEL string literal of the Go duration syntax (a macro, so rules can be built with `concat!`).
macro_rules! go_duration_pattern {
    () => {
        r"'^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$'"
    };
}

/// The CEL rule that keeps the duration field `$field` of `self` within `[$min, $max]`; malformed
/// values are left to the field's own rule.
macro_rules! duration_bounds {
    ($field:literal, $min:literal, $max:literal) => {
        concat!(
            "!self.",
            $field,
            ".matches(",
            go_duration_pattern!(),
            ") || (duration(self.",
            $field,
            ") >= duration('",
            $min,
            "') && duration(self.",
            $field,
            ") <= duration('",
            $max,
            "'))"
        )
    };
}

mod duration;
mod hold;
mod policy;
pub mod reason;
mod status;

pub use dbpool_recovery::{BreakerMode, BreakerState, Phase};
pub use dbpool_vocab::{ProbeOutcome, ProbeStage, Readiness, SslMode, TargetSessionAttrs};
pub use duration::{DURATION_MESSAGE, DURATION_RULE, DurationError, GoDuration};
pub use hold::{HELD_BY_ANNOTATION, HOLD_ANNOTATION, Hold, RELEASED_BY_ANNOTATION};
pub use status::*;

use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every resource this operator defines.
pub const GROUP: &str = "dbpool.io";
/// Annotation whose every new value forces one immediate reopen of the breaker.
pub const FORCE_REOPEN_ANNOTATION: &str = "dbpool.io/force-reopen";
/// Label mirroring the breaker state (`open`, `half-open`, `closed`) for label selectors.
pub const BREAKER_LABEL: &str = "dbpool.io/breaker";

/// Label a Secret must carry (value `"true"`) before the operator reads it: its consent.
pub const CREDENTIALS_LABEL: &str = "dbpool.io/credentials";
/// Annotation on a consenting Secret listing, comma-separated, the `database.host` values whose
/// pools may use it (exact names, compared case-insensitively; no wildcards).
pub const ALLOWED_HOSTS_ANNOTATION: &str = "dbpool.io/allowed-hosts";

/// Whether a Secret with these labels and annotations consents to being sent to `host`: it
/// carries [`CREDENTIALS_LABEL`]`: "true"` and `host` is one of [`ALLOWED_HOSTS_ANNOTATION`].
pub fn secret_consents(
    labels: Option<&std::collections::BTreeMap<String, String>>,
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    host: &str,
) -> bool {
    let opted_in = labels
        .and_then(|l| l.get(CREDENTIALS_LABEL))
        .is_some_and(|v| v == "true");
    let allowed = annotations
        .and_then(|a| a.get(ALLOWED_HOSTS_ANNOTATION))
        .is_some_and(|hosts| {
            hosts
                .split(',')
                .map(str::trim)
                .any(|allowed| !allowed.is_empty() && allowed.eq_ignore_ascii_case(host))
        });
    opted_in && allowed
}

/// CEL rule on `database.host`: the characters of host names and IP literals only (no NUL,
/// spaces, slashes or control characters, which no resolver can use).
pub const HOST_RULE: &str = "self.host.matches('^[A-Za-z0-9._:-]+$')";
/// Message of [`HOST_RULE`].
pub const HOST_MESSAGE: &str = "database.host must be a host name or an IP address: letters, digits, '.', '-', '_' and ':' only";

/// Desired state of a DbPool: which PostgreSQL database to keep a pool healthy for, and the
/// recovery policy (health checks, reconnect backoff, circuit breaker) to apply when it fails.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "dbpool.io",
    version = "v1alpha1",
    kind = "DbPool",
    plural = "dbpools",
    singular = "dbpool",
    shortname = "dbp",
    category = "dbpool",
    namespaced,
    status = "DbPoolStatus",
    derive = "PartialEq",
    doc = "DbPool declares a PostgreSQL connection pool whose health the operator probes, \
           with reconnect backoff and a circuit breaker whose state lives in status.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Overall health of the pool"
    ),
    printcolumn(
        name = "Breaker",
        type_ = "string",
        json_path = ".status.breaker.state",
        description = "Circuit breaker state"
    ),
    printcolumn(
        name = "Failures",
        type_ = "integer",
        json_path = ".status.consecutiveFailures",
        description = "Consecutive failed probes"
    ),
    printcolumn(
        name = "Latency",
        type_ = "integer",
        json_path = ".status.lastProbe.latencyMs",
        description = "Duration of the last probe in milliseconds"
    ),
    printcolumn(
        name = "Last-Probe",
        type_ = "date",
        json_path = ".status.lastProbe.time",
        description = "When the last probe finished"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DbPoolSpec {
    /// Where the database is and how to log in.
    pub database: DatabaseSpec,
    /// Size of the application connection pool; checked against the server's free slots.
    #[serde(default)]
    pub pool: PoolSpec,
    /// How often and how patiently the database is probed when healthy.
    #[serde(default)]
    pub health_check: HealthCheckSpec,
    /// Reconnect schedule after failures: exponential backoff, then a cooldown, then a new cycle.
    #[serde(default)]
    pub backoff: BackoffSpec,
    /// Circuit breaker: when to stop treating the database as available, and when to retry.
    #[serde(default)]
    pub breaker: BreakerSpec,
    /// A Service in this namespace that applications connect to instead of the database host.
    /// The operator points it at the addresses where its probe logged in, and makes them not ready
    /// while the breaker is open or half-open, so connects to it are refused at once by
    /// kube-proxy. Only honoured where the operator was started with gates allowed
    /// (--allow-gates-in); the condition Gate says what happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateSpec>,
}

/// The CEL rule on `gate.serviceName`: a DNS-1035 label, as Service names must be.
pub const GATE_SERVICE_NAME_RULE: &str = "self.serviceName.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')";
/// What the apiserver answers a gate.serviceName that is not a DNS-1035 label.
pub const GATE_SERVICE_NAME_MESSAGE: &str = "gate.serviceName must be a DNS-1035 label: lower-case letters, digits and '-', starting with a letter and ending with a letter or digit";

/// A selector-less Service (and its EndpointSlice) that the operator owns and keeps in step with
/// the circuit breaker.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(GATE_SERVICE_NAME_RULE).message(GATE_SERVICE_NAME_MESSAGE))]
pub struct GateSpec {
    /// Name of the Service (DNS-1035 label). A Service of that name that the operator does not
    /// own is never touched; the condition Gate then says so.
    #[schemars(length(min = 1, max = 63))]
    pub service_name: String,
    /// Port the Service listens on; connections are forwarded to the database's port.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

/// Connection target and credentials. The password is only ever read from a Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!(self.sslMode in ['verify-ca', 'verify-full']) || has(self.caSecretRef)"
).message("caSecretRef is required when sslMode is verify-ca or verify-full"))]
#[x_kube(validation = kube::core::Rule::new(HOST_RULE).message(HOST_MESSAGE))]
pub struct DatabaseSpec {
    /// Host name or IP address of the PostgreSQL server (or its Service DNS name).
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// TCP port of the server.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Database to connect to.
    #[schemars(length(min = 1, max = 63))]
    pub dbname: String,
    /// Role to log in as.
    #[schemars(length(min = 1, max = 63))]
    pub user: String,
    /// Secret key holding the password. Omit for trust or certificate authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// TLS mode, as in libpq: disable, prefer, require, verify-ca or verify-full.
    #[serde(default)]
    pub ssl_mode: SslMode,
    /// Secret key holding the PEM CA bundle that verify-ca and verify-full check the server against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// Which servers count as healthy: read-write (a primary only) or any (standbys too).
    #[serde(default)]
    pub target_session_attrs: TargetSessionAttrs,
    /// application_name the probe reports to the server (visible in pg_stat_activity).
    #[serde(default = "default_application_name")]
    #[schemars(length(max = 63))]
    pub application_name: String,
    /// Allow MD5 password authentication (default false). A server asking for MD5 learns a
    /// hash from which the password can be guessed offline, so by default such a request is
    /// refused (phase ConfigError). Cleartext passwords are only ever sent over verified TLS
    /// (verify-ca, verify-full), whatever this says.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_md5: bool,
}

/// A key in a Secret in the DbPool's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Application pool size.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.minSize <= self.maxSize")
    .message("pool.minSize must not be greater than pool.maxSize"))]
pub struct PoolSpec {
    /// Connections the application keeps open at least.
    #[serde(default = "default_min_size")]
    #[schemars(range(min = 0, max = 10000))]
    pub min_size: i32,
    /// Connections the application may open at most; the probe reports whether they would fit.
    #[serde(default = "default_max_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_size: i32,
}

impl Default for PoolSpec {
    fn default() -> Self {
        Self {
            min_size: default_min_size(),
            max_size: default_max_size(),
        }
    }
}

/// Health-check timing in the healthy steady state.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
// Cross-field duration rules only judge well-formed values: a malformed one is reported by its
// own field's rule, without a CEL conversion error from this one.
#[x_kube(validation = kube::core::Rule::new(concat!(
    "!self.timeout.matches(", go_duration_pattern!(), ") || !self.interval.matches(", go_duration_pattern!(),
    ") || duration(self.timeout) < duration(self.interval)"
))
    .message("healthCheck.timeout must be shorter than healthCheck.interval"))]
#[x_kube(validation = kube::core::Rule::new(duration_bounds!("interval", "100ms", "24h"))
    .message("healthCheck.interval must be between 100ms and 24h"))]
#[x_kube(validation = kube::core::Rule::new(duration_bounds!("timeout", "100ms", "60s"))
    .message("healthCheck.timeout must be between 100ms and 60s"))]
pub struct HealthCheckSpec {
    /// Time between probes while the pool is healthy (e.g. 30s).
    #[serde(default = "default_interval")]
    pub interval: GoDuration,
    /// Budget for one whole probe (connect, TLS, auth, queries); each stage gets what is left.
    /// With adaptiveTimeout it is the ceiling of each stage's learned timeout.
    #[serde(default = "default_timeout")]
    pub timeout: GoDuration,
    /// Learn each probe stage's timeout from the target's observed latency (RFC 6298: smoothed
    /// latency + 4 × its mean deviation, at least 250ms, at most `timeout`, doubled after each
    /// timeout), so an unanswering server is noticed in a fraction of `timeout`. Default true;
    /// false waits the whole `timeout` in every stage. Applies at the next probe.
    #[serde(default = "default_adaptive_timeout")]
    pub adaptive_timeout: bool,
}

impl Default for HealthCheckSpec {
    fn default() -> Self {
        Self {
            interval: default_interval(),
            timeout: default_timeout(),
            adaptive_timeout: default_adaptive_timeout(),
        }
    }
}

/// Reconnect schedule: delay n (from 0) is initialDelay × multiplier^n, capped at maxDelay and
/// jittered down by up to `jitter`; after maxAttempts failures in a row, wait `cooldown` and start a
/// new cycle. There is no terminal state.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(concat!(
    "!self.maxDelay.matches(", go_duration_pattern!(), ") || !self.initialDelay.matches(", go_duration_pattern!(),
    ") || duration(self.maxDelay) >= duration(self.initialDelay)"
))
    .message("backoff.maxDelay must be at least backoff.initialDelay"))]
#[x_kube(validation = kube::core::Rule::new(duration_bounds!("initialDelay", "100ms", "1h"))
    .message("backoff.initialDelay must be between 100ms and 1h"))]
#[x_kube(validation = kube::core::Rule::new(duration_bounds!("maxDelay", "100ms", "24h"))
    .message("backoff.maxDelay must be between 100ms and 24h"))]
#[x_kube(validation = kube::core::Rule::new(duration_bounds!("cooldown", "100ms", "24h"))
    .message("backoff.cooldown must be between 100ms and 24h"))]
pub struct BackoffSpec {
    /// Delay before the first retry.
    #[serde(default = "default_initial_delay")]
    pub initial_delay: GoDuration,
    /// Growth factor between retries (1 means a constant delay).
    #[serde(default = "default_multiplier")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub multiplier: f64,
    /// Upper bound of a single delay.
    #[serde(default = "default_max_delay")]
    pub max_delay: GoDuration,
    /// Failed attempts in a row before the cooldown.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_attempts: i32,
    /// Pause after maxAttempts failures, before a new cycle of attempts begins.
    #[serde(default = "default_cooldown")]
    pub cooldown: GoDuration,
    /// Fraction (0 to 1) by which each delay is randomly shortened, so that many pools do not retry
    /// in lock-step; applies at the cap too. Seeded per pool, so a pool's schedule is reproducible.
    #[serde(default = "default_jitter")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub jitter: f64,
}

impl Default for BackoffSpec {
    fn default() -> Self {
        Self {
            initial_delay: default_initial_delay(),
            multiplier: default_multiplier(),
            max_delay: default_max_delay(),
            max_attempts: default_max_attempts(),
            cooldown: default_cooldown(),
            jitter: default_jitter(),
        }
    }
}

/// Circuit breaker thresholds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(duration_bounds!("openTimeout", "100ms", "24h"))
    .message("breaker.openTimeout must be between 100ms and 24h"))]
pub struct BreakerSpec {
    /// Consecutive outage failures (not configuration errors) that open the breaker.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 1000))]
    pub failure_threshold: i32,
    /// How long the breaker stays open before a half-open trial probe, unless the database is
    /// seen accepting connections again earlier (see earlyTrial): with earlyTrial on, this is the
    /// longest the breaker waits, not the shortest.
    #[serde(default = "default_open_timeout")]
    pub open_timeout: GoDuration,
    /// Successful probes in half-open needed to close the breaker.
    #[serde(default = "default_success_threshold")]
    #[schemars(range(min = 1, max = 1000))]
    pub success_threshold: i32,
    /// Auto (normal), ForcedOpen (hold open for maintenance; probes go on) or Disabled (never open).
    #[serde(default)]
    pub mode: BreakerMode,
    /// Try at once when the database is seen accepting connections again. While the pool is
    /// Recovering, BreakerOpen (breaker open) or CoolingDown, the operator pings the server
    /// without a password; when the answer turns from not accepting (refused, timed out, starting
    /// up) to accepting, one credentialed trial runs at once instead of waiting for the backoff
    /// delay, the cooldown or openTimeout. A failed trial counts towards the breaker but leaves
    /// the backoff schedule, the cooldown and the breaker's clock alone; a successful one while
    /// open counts as a half-open success. At most one early trial per backoff delay (at least
    /// backoff.initialDelay) and per scheduled probe. Never in breaker mode ForcedOpen. false keeps
    /// the pure timers.
    #[serde(default = "default_early_trial")]
    pub early_trial: bool,
}

impl Default for BreakerSpec {
    fn default() -> Self {
        Self {
            failure_threshold: default_failure_threshold(),
            open_timeout: default_open_timeout(),
            success_threshold: default_success_threshold(),
            mode: BreakerMode::default(),
            early_trial: default_early_trial(),
        }
    }
}

fn default_port() -> i32 {
    5432
}
fn default_application_name() -> String {
    "dbpool-operator".to_owned()
}
fn default_min_size() -> i32 {
    1
}
fn default_max_size() -> i32 {
    10
}
fn default_interval() -> GoDuration {
    GoDuration::from_secs(30)
}
fn default_timeout() -> GoDuration {
    GoDuration::from_secs(5)
}
fn default_adaptive_timeout() -> bool {
    true
}
fn default_initial_delay() -> GoDuration {
    GoDuration::from_secs(1)
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_max_delay() -> GoDuration {
    GoDuration::from_secs(60)
}
fn default_max_attempts() -> i32 {
    10
}
fn default_cooldown() -> GoDuration {
    GoDuration::from_secs(300)
}
fn default_jitter() -> f64 {
    0.1
}
fn default_failure_threshold() -> i32 {
    5
}
fn default_open_timeout() -> GoDuration {
    GoDuration::from_secs(60)
}
fn default_success_threshold() -> i32 {
    1
}
fn default_early_trial() -> bool {
    true
}

/// The CRD as YAML, exactly as `dbpool-operator crd` prints it and `crds/dbpool.yaml` stores it.
pub fn crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    serde_saphyr::to_string(&DbPool::crd())
}

#[cfg(test)]
mod tests;
