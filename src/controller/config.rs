//! Settings of one operator process.
//!
//! Lives here: [`OperatorConfig`], [`LeaderElection`] and the field manager name. Must not live
//! here: defaults and flag parsing (`crate::cli` is their single home; `OperatorConfig::default`
//! is implemented there).

use std::time::Duration;

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
    /// Reopen each persistent probe connection this often, to test the full connect path.
    pub reconnect_every: Duration,
    /// Name of this operator instance in events and in the leader lease (e.g. the pod name).
    pub instance: String,
    /// Lease-based leader election; None runs as the only instance.
    pub leader_election: Option<LeaderElection>,
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
