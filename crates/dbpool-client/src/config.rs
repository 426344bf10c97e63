//! Pool configuration: where the database is, the recovery policy, and the pool's own options.
//!
//! Lives here: [`PoolConfig`] (target + [`Policy`] + [`PoolOptions`]) and its plain constructor,
//! which needs no Kubernetes. Must not live here: reading a DbPool or a Secret (`dbpool`), or
//! any behaviour.

use std::time::Duration;

use dbpool_probe::{Password, ProbeTarget, SslMode, TargetSessionAttrs};
use dbpool_recovery::Policy;

/// Options that belong to the application, not to the DbPool: sizes, lifetimes, waits.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolOptions {
    /// Most connections open at once (idle, in use and being opened).
    pub max_size: usize,
    /// Idle connections kept open (and re-opened) while the database is healthy.
    pub min_idle: usize,
    /// A connection older than this is closed instead of being handed out or returned.
    pub max_lifetime: Duration,
    /// An idle connection above `min_idle` is closed after being idle this long.
    pub idle_timeout: Duration,
    /// A connection idle at least this long gets a cheap check (an empty query) before it is
    /// handed out.
    pub idle_check_after: Duration,
    /// Longest `get()` waits while the breaker is Closed.
    pub acquire_timeout: Duration,
    /// Step of the ramp after a recovery: capacity is 1, 2, 4 ... connections, one doubling per
    /// step (each process lengthens it by up to half, at random, so replicas spread out).
    pub ramp_step: Duration,
    /// Each connect stage's timeout is learned from this pool's own connects (RFC 6298, at least
    /// 250 ms, at most the policy's timeout; see `dbpool_probe::AdaptiveTimeouts`). From the
    /// DbPool's `healthCheck.adaptiveTimeout` when following one; default true.
    pub adaptive_timeout: bool,
    /// Standalone readiness pings (no DbPool, or its watch down): at most one per this interval
    /// per target and process (each gap stretched by up to 10 % at random), only while a caller
    /// waits on a server whose last failure was an outage. A fleet of N processes sends at most
    /// N / interval pings to a server that is down. None: no pings (the pool then recovers on
    /// its backoff schedule alone). Default 1 s.
    pub readiness_ping: Option<Duration>,
}

impl Default for PoolOptions {
    /// max 10, min idle 1, lifetime 30 min, idle timeout 10 min, idle check after 30 s,
    /// acquire timeout 5 s, ramp step 20 ms, adaptive connect timeouts, readiness pings at most
    /// 1/s.
    fn default() -> Self {
        Self {
            max_size: 10,
            min_idle: 1,
            max_lifetime: Duration::from_secs(30 * 60),
            idle_timeout: Duration::from_secs(10 * 60),
            idle_check_after: Duration::from_secs(30),
            acquire_timeout: Duration::from_secs(5),
            ramp_step: Duration::from_millis(20),
            adaptive_timeout: true,
            readiness_ping: Some(Duration::from_secs(1)),
        }
    }
}

/// Everything a [`Pool`](crate::Pool) needs.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// The pool's name: the `pool` label of its metrics and the field of its spans.
    pub name: String,
    /// Where and how to connect (the probe's target type: one connect path for all).
    pub target: ProbeTarget,
    /// Backoff, cooldown and breaker: the engine's policy (`policy.timeout` bounds a connect).
    pub policy: Policy,
    /// Sizes, lifetimes and waits.
    pub options: PoolOptions,
}

impl PoolConfig {
    /// A configuration without Kubernetes: `user`@`host`:`port`/`dbname`, TLS `prefer`,
    /// read-write servers only, the API's default policy and [`PoolOptions::default`].
    pub fn new(
        name: &str,
        host: &str,
        port: u16,
        dbname: &str,
        user: &str,
        password: Option<String>,
    ) -> Self {
        let policy = Policy::default();
        let options = PoolOptions::default();
        Self {
            name: name.to_owned(),
            target: ProbeTarget {
                host: host.to_owned(),
                port,
                dbname: dbname.to_owned(),
                user: user.to_owned(),
                password: password.map(Password::new),
                ssl_mode: SslMode::Prefer,
                allow_md5: false,
                ca_pem: None,
                target_session_attrs: TargetSessionAttrs::ReadWrite,
                application_name: format!("dbpool-client/{name}"),
                pool_max_size: u32::try_from(options.max_size).unwrap_or(u32::MAX),
                timeout: policy.timeout,
            },
            policy,
            options,
        }
    }

    /// The same configuration, answering an MD5 password request (refused by default: MD5 gives
    /// a server that asks for it a hash that works as the password; see docs/security.md).
    pub fn allow_md5(mut self, allow: bool) -> Self {
        self.target.allow_md5 = allow;
        self
    }

    /// The same configuration with `ssl_mode`.
    pub fn ssl_mode(mut self, mode: SslMode) -> Self {
        self.target.ssl_mode = mode;
        self
    }

    /// The same configuration with `policy` (clamped into the engine's ranges); a connect is
    /// bounded by `policy.timeout`.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy.clamped();
        self.target.timeout = self.policy.timeout;
        self
    }

    /// The same configuration with `options`.
    pub fn options(mut self, options: PoolOptions) -> Self {
        self.target.pool_max_size = u32::try_from(options.max_size).unwrap_or(u32::MAX);
        self.options = options;
        self
    }

    /// `options` with sizes made safe: `max_size` at least 1, `min_idle` at most `max_size`.
    pub(crate) fn sanitized(mut self) -> Self {
        self.options.max_size = self.options.max_size.max(1);
        self.options.min_idle = self.options.min_idle.min(self.options.max_size);
        self.policy = self.policy.clamped();
        self.target.timeout = self.policy.timeout;
        self
    }
}
