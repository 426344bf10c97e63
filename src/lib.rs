//! dbpool-operator: keeps PostgreSQL connection pools out of a permanent failure state.
//!
//! - `api`: the DbPool resource (spec, status, CRD).
//! - `recovery`: pure, clock-injected backoff / circuit breaker / phase logic.
//! - `probe`: the staged PostgreSQL probe and its persistent connections.
//! - `controller`: the reconcile loop that ties them to the cluster, and leader election.
//! - `metrics`: Prometheus metrics, readiness and leadership of one process.
pub mod api;
pub mod controller;
pub mod metrics;
pub mod probe;
pub mod recovery;
