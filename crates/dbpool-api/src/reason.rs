//! Condition reasons and event reasons: the machine-readable words the operator writes.
//!
//! Lives here: every `reason` string of a status condition or an Event, as a constant, so the
//! controller, the tests, the docs' runbooks and tools such as `kubectl dbpool` name one value.
//! Must not live here: messages (they carry per-pool detail and are built where they are written).

// Condition reasons of `Ready`.
/// Ready=True: the database answered the last probe.
pub const PROBE_SUCCEEDED: &str = "ProbeSucceeded";
/// Ready=Unknown: the pool was not probed yet.
pub const PENDING: &str = "Pending";
/// Ready=False: the last failure is a configuration problem. Also an event reason.
pub const CONFIG_ERROR: &str = "ConfigError";
/// Ready=False: the breaker is open or half-open.
pub const BREAKER_OPEN: &str = "BreakerOpen";
/// Ready=False: a cycle of attempts failed; waiting out the cooldown.
pub const COOLING_DOWN: &str = "CoolingDown";
/// Ready=False: retrying on the backoff schedule.
pub const RECOVERING: &str = "Recovering";
/// Ready=False and BreakerOpen=False: the outage streak reached the failure threshold, but the
/// fleet guard holds the breaker Closed because most targets fail on the network path at once
/// (the operator's own network is suspect). Also an event reason (Warning: a hold started).
pub const FLEET_SUSPECT: &str = "FleetSuspect";

// Condition reasons of `Degraded`.
/// Degraded=True: probes are failing.
pub const PROBE_FAILURES: &str = "ProbeFailures";
/// Degraded=True: pool.maxSize does not fit into the server's free connection slots.
pub const POOL_DOES_NOT_FIT: &str = "PoolDoesNotFit";
/// Degraded=False.
pub const AS_EXPECTED: &str = "AsExpected";

// Condition reasons of `BreakerOpen`.
/// BreakerOpen=True: held open by breaker.mode ForcedOpen.
pub const FORCED_OPEN: &str = "ForcedOpen";
/// BreakerOpen=True: held open by the `dbpool.io/hold` annotation; the message says who and why.
/// Also an event reason (Normal: a hold was set or changed).
pub const HELD: &str = "Held";
/// BreakerOpen=True: the outage streak reached the failure threshold.
pub const FAILURE_THRESHOLD_REACHED: &str = "FailureThresholdReached";
/// BreakerOpen=True: half-open, trial probes decide.
pub const HALF_OPEN: &str = "HalfOpen";
/// BreakerOpen=False.
pub const CLOSED: &str = "Closed";

// Condition reasons of `Gate` (only with spec.gate).
/// Gate=True: the gate's endpoints are ready (breaker closed); connects go to the database.
pub const GATE_OPEN: &str = "GateOpen";
/// Gate=True: the gate's endpoints are not ready (breaker open or half-open); kube-proxy refuses
/// connects to the Service at once.
pub const GATE_REJECTING: &str = "GateRejecting";
/// Gate=True: no probe has logged in yet, so the EndpointSlice holds no address; connects are
/// refused.
pub const GATE_NO_ADDRESS: &str = "NoAuthenticatedAddress";
/// Gate=False: a Service (or EndpointSlice) of that name exists and is not owned by this DbPool;
/// the operator leaves it alone.
pub const GATE_SERVICE_NOT_OWNED: &str = "ServiceNotOwned";
/// Gate=False: the operator was not started with gates allowed in this namespace
/// (--allow-gates-in); no Service is created.
pub const GATES_NOT_ALLOWED: &str = "GatesNotAllowed";
/// Gate=False: writing the Service or EndpointSlice failed; retried at the next reconcile.
pub const GATE_WRITE_FAILED: &str = "GateWriteFailed";

// Condition reasons of the kstatus conditions `Reconciling` and `Stalled` (True: PENDING and
// CONFIG_ERROR above).
/// Reconciling=False: the pool was probed; the operator acts on the current spec.
pub const RECONCILED: &str = "Reconciled";
/// Stalled=False: nothing blocks progress (AS_EXPECTED is Degraded=False's reason too).
pub const NOT_STALLED: &str = AS_EXPECTED;

// Event reasons (CONFIG_ERROR above is one too).
/// Warning: the breaker opened.
pub const BREAKER_OPENED: &str = "BreakerOpened";
/// Normal: the breaker went half-open for a trial.
pub const BREAKER_HALF_OPEN: &str = "BreakerHalfOpen";
/// Normal: the breaker closed.
pub const BREAKER_CLOSED: &str = "BreakerClosed";
/// Warning: maxAttempts failed in a row; a cooldown started.
pub const COOLDOWN_STARTED: &str = "CooldownStarted";
/// Normal: the cooldown ended; a new cycle of attempts starts.
pub const COOLDOWN_ENDED: &str = "CooldownEnded";
/// Normal: the database answers again after failures.
pub const RECOVERED: &str = "Recovered";
/// Normal: the `dbpool.io/hold` annotation was removed; the breaker follows breaker.mode again.
pub const RELEASED: &str = "Released";
/// Normal: a force-reopen token was acted upon.
pub const FORCE_REOPEN: &str = "ForceReopen";
