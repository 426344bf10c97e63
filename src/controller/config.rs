//! Settings of one operator process.
//!
//! Lives here: [`OperatorConfig`], [`LeaderElection`] and the field manager name. Must not live
//! here: defaults and flag parsing (`crate::cli` is their single home; `OperatorConfig::default`
//! is implemented there).

use std::{collections::BTreeSet, time::Duration};

/// Field manager of every write the operator makes (the lease has its own, per replica).
pub const FIELD_MANAGER: &str = "dbpool-operator";

/// Settings of one operator process.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Watch only this namespace (None: all namespaces).
    pub namespace: Option<String>,
    /// Reconcile only DbPools whose labels match this selector (None: all). For sharding pools
    /// across operator installations, and for tests that must ignore other tests' pools.
    pub pool_selector: Option<String>,
    /// Probes running at once, across all pools.
    pub max_concurrent_probes: usize,
    /// Requests (status, label and event writes, Secret reads) in flight to the apiserver at once,
    /// across all pools. Each concurrent request holds its own connection (and TLS session) to the
    /// apiserver, so an unbounded burst (a restart, or a shared database failing under a thousand
    /// pools) would open hundreds.
    pub max_concurrent_api_requests: usize,
    /// In a steady state, refresh lastProbe in status at most this often.
    pub status_refresh: Duration,
    /// At most one status write per pool this often, except transitions and force-reopen
    /// acknowledgements (see `write`).
    pub min_status_period: Duration,
    /// Counter-only write requests per second, all pools together (token bucket, burst = rate).
    pub counter_write_rate: u32,
    /// Transition write requests per second, all pools together (token bucket, burst = rate).
    pub transition_write_rate: u32,
    /// Readiness pings per second, all targets together, fair across namespaces (see `pings`).
    pub max_pings_per_second: u32,
    /// Reopen each persistent probe connection this often, to test the full connect path.
    pub reconnect_every: Duration,
    /// Name of this operator instance in events and in the leader lease (e.g. the pod name).
    pub instance: String,
    /// Lease-based leader election; None runs as the only instance.
    pub leader_election: Option<LeaderElection>,
    /// The namespaces in which a DbPool's spec.gate is honoured (--allow-gates-in).
    pub gates: GateAllowlist,
    /// The fleet guard: hold breakers from opening while most targets fail on the network path
    /// at once (see `controller::fleet`).
    pub fleet_guard: FleetGuardSettings,
}

/// Settings of the fleet guard (`--fleet-guard-*`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FleetGuardSettings {
    /// Whether the guard may hold breakers at all (the verdict and its metric are computed
    /// either way).
    pub enabled: bool,
    /// Share of eligible targets per namespace, and of namespaces, that must fail on the path.
    pub share: f64,
    /// Eligible targets (namespace and `host:port`) needed before the guard may trip.
    pub min_targets: u32,
    /// How recent a failure streak's start must be to count.
    pub window: Duration,
    /// A pool is held at most this long; its next path failure after that opens the breaker.
    pub max_hold: Duration,
}

/// Where a DbPool's `spec.gate` is honoured. Off by default: a Service whose endpoints the
/// operator sets to an address taken from a user's spec is the CVE-2021-25740 pattern (a tenant
/// who may create DbPools but not EndpointSlices would make the operator forward cluster traffic
/// to an address of their choosing). The cluster admin opts in per namespace, and even then the
/// EndpointSlice only ever holds addresses at which the probe logged in to the declared database.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum GateAllowlist {
    /// Gates are off: no Service is ever created (the default).
    #[default]
    Nowhere,
    /// Gates are honoured in every namespace the operator watches (`*`).
    Everywhere,
    /// Gates are honoured in these namespaces only.
    In(BTreeSet<String>),
}

impl GateAllowlist {
    /// Parses the flag's value: empty for none, `*` for all, else a comma-separated list of
    /// namespace names.
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        if value.is_empty() {
            return Ok(Self::Nowhere);
        }
        if value == "*" {
            return Ok(Self::Everywhere);
        }
        let mut namespaces = BTreeSet::new();
        for part in value.split(',').map(str::trim) {
            let valid = !part.is_empty()
                && part.len() <= 63
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-');
            if !valid {
                return Err(format!(
                    "\"{part}\" is not a namespace name (use \"*\" alone for all namespaces)"
                ));
            }
            namespaces.insert(part.to_owned());
        }
        Ok(Self::In(namespaces))
    }

    /// Whether a gate may be made in `namespace`.
    pub fn allows(&self, namespace: &str) -> bool {
        match self {
            Self::Nowhere => false,
            Self::Everywhere => true,
            Self::In(namespaces) => namespaces.contains(namespace),
        }
    }

    /// Whether gates are allowed anywhere.
    pub fn enabled(&self) -> bool {
        *self != Self::Nowhere
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowlist_parses_none_all_and_lists() {
        assert_eq!(GateAllowlist::parse(""), Ok(GateAllowlist::Nowhere));
        assert_eq!(GateAllowlist::parse("*"), Ok(GateAllowlist::Everywhere));
        let list = GateAllowlist::parse("shop, billing").unwrap_or_default();
        assert!(list.allows("shop") && list.allows("billing"));
        assert!(!list.allows("other"));
        assert!(!GateAllowlist::Nowhere.allows("shop"));
        assert!(GateAllowlist::Everywhere.allows("anything"));
        assert!(GateAllowlist::parse("shop,*").is_err());
        assert!(GateAllowlist::parse("Shop").is_err());
        assert!(GateAllowlist::parse("a,,b").is_err());
    }
}

/// Lease-based leader election settings: only the holder of the Lease probes and writes.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    /// Name of the coordination.k8s.io Lease.
    pub lease_name: String,
    /// Namespace of the Lease (the operator's own namespace).
    pub lease_namespace: String,
    /// How long a lease is valid after its last renewal; a standby takes over after it expires.
    pub lease_duration: Duration,
    /// The holder renews this long before expiry (the tolerated clock skew, too).
    pub renew_grace: Duration,
}
