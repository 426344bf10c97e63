//! The `dbpool-operator` command line, and the one place every operator default lives.
//!
//! Lives here: [`Cli`] and [`RunArgs`] (flags with their `DBPOOL_*` environment variables), the
//! [`defaults`] they show in `--help`, and [`RunArgs::operator_config`], the only mapping from
//! flags to [`OperatorConfig`]. `OperatorConfig::default()` is built from the same constants, so
//! `main`, the tests, the benchmark and the chart's documented defaults cannot drift apart.
//! Must not live here: starting anything (that is `main.rs`), or operator behaviour.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    api::GoDuration,
    controller::{FleetGuardSettings, GateAllowlist, LeaderElection, OperatorConfig},
};

/// Every default of the operator process. The chart's `values.yaml` documents the same values.
pub mod defaults {
    use std::time::Duration;

    /// Address of the /metrics, /healthz and /readyz endpoints.
    pub const METRICS_ADDR: &str = "0.0.0.0:8080";
    /// Name of the leader Lease.
    pub const LEASE_NAME: &str = "dbpool-operator";
    /// Namespace of the leader Lease when neither the flag nor $POD_NAMESPACE gives one.
    pub const LEASE_NAMESPACE: &str = "default";
    /// Validity of the lease after a renewal.
    pub const LEASE_DURATION: Duration = Duration::from_secs(15);
    /// The leader renews this long before the lease expires.
    pub const LEASE_RENEW_GRACE: Duration = Duration::from_secs(5);
    /// Probes running at once across all pools.
    pub const MAX_CONCURRENT_PROBES: usize = 64;
    /// Requests in flight to the apiserver at once.
    pub const MAX_CONCURRENT_API_REQUESTS: usize = 16;
    /// In a healthy steady state, refresh status.lastProbe at most this often.
    pub const STATUS_REFRESH: Duration = Duration::from_secs(300);
    /// At most one counter-only status write per pool this often (transitions go at once).
    pub const MIN_STATUS_PERIOD: Duration = Duration::from_millis(1000);
    /// Counter-only writes (status, label, event requests) per second, all pools together.
    pub const COUNTER_WRITE_RATE: u32 = 50;
    /// Readiness pings per second, all targets together.
    pub const MAX_PINGS_PER_SECOND: u32 = 200;
    /// Transition writes (status, label, event requests) per second, all pools together.
    pub const TRANSITION_WRITE_RATE: u32 = 1000;
    /// Reopen each persistent probe connection this often.
    pub const RECONNECT_EVERY: Duration = Duration::from_secs(300);
    /// /healthz fails once the watches have failed this long without a success.
    pub const WATCH_FAILURE_TIMEOUT: Duration = Duration::from_secs(120);
    /// Namespaces where spec.gate is honoured: none (see --allow-gates-in).
    pub const ALLOW_GATES_IN: &str = "";
    /// Instance name when neither the flag, $POD_NAME nor $HOSTNAME gives one.
    pub const INSTANCE: &str = "dbpool-operator";
    /// The fleet guard holds breakers (false: it only reports `dbpool_fleet_suspect`).
    pub const FLEET_GUARD: bool = true;
    /// Share of eligible targets per namespace, and of namespaces, that must fail on the path.
    pub const FLEET_GUARD_SHARE: f64 = 0.5;
    /// Eligible targets needed before the fleet guard may trip.
    pub const FLEET_GUARD_MIN_TARGETS: u32 = 3;
    /// A failure streak counts for the fleet guard if it began this recently: two default
    /// probe intervals (30s), so a fleet probed on the default interval falls into one window.
    pub const FLEET_GUARD_WINDOW: Duration = Duration::from_secs(60);
    /// A pool's breaker is held at most this long.
    pub const FLEET_GUARD_MAX_HOLD: Duration = Duration::from_secs(600);
}

/// Kubernetes operator that keeps PostgreSQL connection pools out of a permanent failure state.
#[derive(Parser, Debug)]
#[command(name = "dbpool-operator", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the DbPool CustomResourceDefinition as YAML (what crds/dbpool.yaml holds).
    Crd,
    /// Run the operator.
    Run(Box<RunArgs>),
}

/// Flags of `dbpool-operator run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Kubeconfig file; without it, $KUBECONFIG, ~/.kube/config or the in-cluster config.
    #[arg(long, env = "DBPOOL_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "DBPOOL_NAMESPACE")]
    pub namespace: Option<String>,
    /// Reconcile only DbPools matching this label selector (default: all).
    #[arg(long, env = "DBPOOL_POOL_SELECTOR")]
    pub pool_selector: Option<String>,
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "DBPOOL_METRICS_ADDR", default_value = defaults::METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// Elect a leader through a Lease; only the leader probes and writes.
    #[arg(long, env = "DBPOOL_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "DBPOOL_LEASE_NAME", default_value = defaults::LEASE_NAME)]
    pub lease_name: String,
    /// Namespace of the leader Lease (default: $POD_NAMESPACE, else "default").
    #[arg(long, env = "DBPOOL_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Validity of the lease after a renewal; a standby takes over this long after the leader dies.
    #[arg(long, env = "DBPOOL_LEASE_DURATION", default_value_t = GoDuration(defaults::LEASE_DURATION))]
    pub lease_duration: GoDuration,
    /// The leader renews this long before the lease expires.
    #[arg(long, env = "DBPOOL_LEASE_RENEW_GRACE", default_value_t = GoDuration(defaults::LEASE_RENEW_GRACE))]
    pub lease_renew_grace: GoDuration,
    /// Probes running at once across all pools.
    #[arg(long, env = "DBPOOL_MAX_CONCURRENT_PROBES", default_value_t = defaults::MAX_CONCURRENT_PROBES)]
    pub max_concurrent_probes: usize,
    /// Requests in flight to the apiserver at once (status, label and event writes, Secret reads).
    #[arg(long, env = "DBPOOL_MAX_CONCURRENT_API_REQUESTS", default_value_t = defaults::MAX_CONCURRENT_API_REQUESTS)]
    pub max_concurrent_api_requests: usize,
    /// In a healthy steady state, refresh status.lastProbe at most this often.
    #[arg(long, env = "DBPOOL_STATUS_REFRESH", default_value_t = GoDuration(defaults::STATUS_REFRESH))]
    pub status_refresh: GoDuration,
    /// At most one status write per pool this often, except breaker and phase transitions and
    /// force-reopen acknowledgements, which go at once (counter-only changes are coalesced: the
    /// latest value wins).
    #[arg(long, env = "DBPOOL_MIN_STATUS_PERIOD", default_value_t = GoDuration(defaults::MIN_STATUS_PERIOD))]
    pub min_status_period: GoDuration,
    /// Counter-only write requests (status, label, event) per second across all pools; a
    /// fixed ceiling no DbPool spec can raise.
    #[arg(long, env = "DBPOOL_COUNTER_WRITE_RATE", default_value_t = defaults::COUNTER_WRITE_RATE)]
    pub counter_write_rate: u32,
    /// Readiness pings (no password) per second across all targets, handed out in turn across
    /// namespaces; each target is pinged at most 4 times a second while its pools wait out an
    /// outage.
    #[arg(long, env = "DBPOOL_MAX_PINGS_PER_SECOND", default_value_t = defaults::MAX_PINGS_PER_SECOND)]
    pub max_pings_per_second: u32,
    /// Transition write requests (status, label, event) per second across all pools: a budget
    /// of their own, so a flood of counter updates never delays an Open.
    #[arg(long, env = "DBPOOL_TRANSITION_WRITE_RATE", default_value_t = defaults::TRANSITION_WRITE_RATE)]
    pub transition_write_rate: u32,
    /// Reopen each persistent probe connection this often (tests the full connect path).
    #[arg(long, env = "DBPOOL_RECONNECT_EVERY", default_value_t = GoDuration(defaults::RECONNECT_EVERY))]
    pub reconnect_every: GoDuration,
    /// /healthz answers 503 once the watches have failed this long without a success, so a
    /// wedged process is restarted by its liveness probe.
    #[arg(long, env = "DBPOOL_WATCH_FAILURE_TIMEOUT", default_value_t = GoDuration(defaults::WATCH_FAILURE_TIMEOUT))]
    pub watch_failure_timeout: GoDuration,
    /// Namespaces in which a DbPool's spec.gate is honoured: a comma-separated list, or "*" for
    /// every watched namespace; empty (the default) turns gates off. A gate makes the operator
    /// write a Service and EndpointSlice: see docs/gate.md for why this is opt-in
    /// (CVE-2021-25740).
    #[arg(long, env = "DBPOOL_ALLOW_GATES_IN", default_value = defaults::ALLOW_GATES_IN, value_parser = GateAllowlist::parse)]
    pub allow_gates_in: GateAllowlist,
    /// Let the fleet guard hold breakers from opening while most targets that were healthy fail
    /// on the network path at once (timeouts, unreachable, DNS): the operator's own network is
    /// then the likelier culprit. With false the verdict is still exported as
    /// dbpool_fleet_suspect, but nothing is held.
    #[arg(long, env = "DBPOOL_FLEET_GUARD", default_value_t = defaults::FLEET_GUARD, action = clap::ArgAction::Set)]
    pub fleet_guard: bool,
    /// The fleet guard trips when at least this share (0.01–1) of each agreeing namespace's
    /// eligible targets fail on the path, and at least this share of namespaces agree.
    #[arg(long, env = "DBPOOL_FLEET_GUARD_SHARE", default_value_t = defaults::FLEET_GUARD_SHARE)]
    pub fleet_guard_share: f64,
    /// The fleet guard never trips with fewer eligible targets (namespace and host:port) than this.
    #[arg(long, env = "DBPOOL_FLEET_GUARD_MIN_TARGETS", default_value_t = defaults::FLEET_GUARD_MIN_TARGETS)]
    pub fleet_guard_min_targets: u32,
    /// A target's failures count for the fleet guard if they began within this window.
    #[arg(long, env = "DBPOOL_FLEET_GUARD_WINDOW", default_value_t = GoDuration(defaults::FLEET_GUARD_WINDOW))]
    pub fleet_guard_window: GoDuration,
    /// The fleet guard holds one pool's breaker at most this long; the first path failure after
    /// that opens it.
    #[arg(long, env = "DBPOOL_FLEET_GUARD_MAX_HOLD", default_value_t = GoDuration(defaults::FLEET_GUARD_MAX_HOLD))]
    pub fleet_guard_max_hold: GoDuration,
    /// Log format.
    #[arg(long, env = "DBPOOL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Instance name shown in events and the lease (defaults to $POD_NAME or the host name).
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl RunArgs {
    /// The operator settings these flags ask for. `env` looks up the environment variables that
    /// fill gaps ($HOSTNAME for the instance, $POD_NAMESPACE for the lease namespace), so the
    /// mapping is testable without touching the process environment.
    pub fn operator_config(&self, env: impl Fn(&str) -> Option<String>) -> OperatorConfig {
        let instance = self
            .instance
            .clone()
            .or_else(|| env("HOSTNAME"))
            .unwrap_or_else(|| defaults::INSTANCE.to_owned());
        let leader_election = self.leader_elect.then(|| LeaderElection {
            lease_name: self.lease_name.clone(),
            lease_namespace: self
                .lease_namespace
                .clone()
                .or_else(|| env("POD_NAMESPACE"))
                .unwrap_or_else(|| defaults::LEASE_NAMESPACE.to_owned()),
            lease_duration: self.lease_duration.as_std(),
            renew_grace: self.lease_renew_grace.as_std(),
        });
        OperatorConfig {
            namespace: self.namespace.clone(),
            pool_selector: self.pool_selector.clone(),
            max_concurrent_probes: self.max_concurrent_probes,
            max_concurrent_api_requests: self.max_concurrent_api_requests,
            status_refresh: self.status_refresh.as_std(),
            min_status_period: self.min_status_period.as_std(),
            counter_write_rate: self.counter_write_rate.max(1),
            max_pings_per_second: self.max_pings_per_second.max(1),
            transition_write_rate: self.transition_write_rate.max(1),
            reconnect_every: self.reconnect_every.as_std(),
            instance,
            leader_election,
            gates: self.allow_gates_in.clone(),
            fleet_guard: FleetGuardSettings {
                enabled: self.fleet_guard,
                share: if self.fleet_guard_share.is_finite() {
                    self.fleet_guard_share.clamp(0.01, 1.0)
                } else {
                    defaults::FLEET_GUARD_SHARE
                },
                min_targets: self.fleet_guard_min_targets.max(1),
                window: self.fleet_guard_window.as_std(),
                max_hold: self.fleet_guard_max_hold.as_std(),
            },
        }
    }
}

impl Default for OperatorConfig {
    /// The settings of `dbpool-operator run` with no flags, no environment and no leader
    /// election.
    fn default() -> Self {
        Self {
            namespace: None,
            pool_selector: None,
            max_concurrent_probes: defaults::MAX_CONCURRENT_PROBES,
            max_concurrent_api_requests: defaults::MAX_CONCURRENT_API_REQUESTS,
            status_refresh: defaults::STATUS_REFRESH,
            min_status_period: defaults::MIN_STATUS_PERIOD,
            counter_write_rate: defaults::COUNTER_WRITE_RATE,
            max_pings_per_second: defaults::MAX_PINGS_PER_SECOND,
            transition_write_rate: defaults::TRANSITION_WRITE_RATE,
            reconnect_every: defaults::RECONNECT_EVERY,
            instance: defaults::INSTANCE.to_owned(),
            leader_election: None,
            gates: GateAllowlist::Nowhere,
            fleet_guard: FleetGuardSettings {
                enabled: defaults::FLEET_GUARD,
                share: defaults::FLEET_GUARD_SHARE,
                min_targets: defaults::FLEET_GUARD_MIN_TARGETS,
                window: defaults::FLEET_GUARD_WINDOW,
                max_hold: defaults::FLEET_GUARD_MAX_HOLD,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(args: &[&str]) -> RunArgs {
        let cli =
            Cli::try_parse_from(std::iter::once("dbpool-operator").chain(args.iter().copied()))
                .unwrap_or_else(|e| panic!("{e}"));
        match cli.command {
            Command::Run(args) => *args,
            Command::Crd => panic!("expected run"),
        }
    }

    #[test]
    fn no_flags_give_the_default_config() {
        let config = parse(&["run"]).operator_config(|_| None);
        let default = OperatorConfig::default();
        assert_eq!(config.namespace, default.namespace);
        assert_eq!(config.max_concurrent_probes, default.max_concurrent_probes);
        assert_eq!(
            config.max_concurrent_api_requests,
            default.max_concurrent_api_requests
        );
        assert_eq!(config.status_refresh, default.status_refresh);
        assert_eq!(config.reconnect_every, default.reconnect_every);
        assert_eq!(config.min_status_period, default.min_status_period);
        assert_eq!(config.counter_write_rate, default.counter_write_rate);
        assert_eq!(config.max_pings_per_second, default.max_pings_per_second);
        assert_eq!(config.transition_write_rate, default.transition_write_rate);
        assert_eq!(config.instance, default.instance);
        assert!(config.leader_election.is_none());
        assert_eq!(config.gates, default.gates);
        assert!(!config.gates.enabled());
        assert_eq!(config.fleet_guard, default.fleet_guard);
    }

    #[test]
    fn the_fleet_guard_flags_map_and_clamp() {
        let config = parse(&[
            "run",
            "--fleet-guard=false",
            "--fleet-guard-share",
            "7",
            "--fleet-guard-min-targets",
            "0",
            "--fleet-guard-window",
            "2m",
            "--fleet-guard-max-hold",
            "1h",
        ])
        .operator_config(|_| None);
        let guard = config.fleet_guard;
        assert!(!guard.enabled);
        assert_eq!((guard.share, guard.min_targets), (1.0, 1));
        assert_eq!(guard.window, Duration::from_secs(120));
        assert_eq!(guard.max_hold, Duration::from_secs(3600));
    }

    #[test]
    fn gates_are_allowed_only_where_the_flag_says() {
        let config = parse(&["run", "--allow-gates-in", "shop,billing"]).operator_config(|_| None);
        assert!(config.gates.allows("shop"));
        assert!(!config.gates.allows("default"));
        let config = parse(&["run", "--allow-gates-in", "*"]).operator_config(|_| None);
        assert!(config.gates.allows("default"));
    }

    #[test]
    fn leader_election_takes_the_flags_then_the_environment() {
        let args = parse(&["run", "--leader-elect", "--lease-duration", "3s"]);
        let env = |name: &str| match name {
            "POD_NAMESPACE" => Some("ops".to_owned()),
            "HOSTNAME" => Some("pod-a".to_owned()),
            _ => None,
        };
        let config = args.operator_config(env);
        let election = config
            .leader_election
            .unwrap_or_else(|| panic!("leader election on"));
        assert_eq!(election.lease_namespace, "ops");
        assert_eq!(election.lease_name, defaults::LEASE_NAME);
        assert_eq!(election.lease_duration, Duration::from_secs(3));
        assert_eq!(election.renew_grace, defaults::LEASE_RENEW_GRACE);
        assert_eq!(config.instance, "pod-a");
    }
}
