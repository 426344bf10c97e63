//! The probe's vocabulary, shared by the probe and the DbPool API.
//!
//! Lives here: the four enums that the probe reads from a spec or reports in a result
//! ([`SslMode`], [`TargetSessionAttrs`], [`ProbeStage`], [`ProbeOutcome`]), the one mapping from an
//! outcome to the recovery engine's [`FailureKind`](dbpool_recovery::FailureKind)
//! ([`ProbeOutcome::failure_kind`]), [`ProbeReport`], what one probe saw, and [`Readiness`],
//! what one readiness ping (no password) saw. `dbpool-probe`
//! re-exports all of them from their old paths (`dbpool_probe::ProbeOutcome`, ...) and `dbpool-api`
//! re-exports the enums for the CRD, so neither the API nor `kubectl-dbpool` links the probe.
//!
//! Must not live here: anything about Kubernetes (kube, k8s-openapi), any I/O or async runtime
//! (tokio, tokio-postgres, socket2), and any probing logic (stages, TLS, classification of
//! errors: `dbpool-probe`) or recovery rule (`dbpool-recovery`). `make lint`
//! (`hack/check-crate-graph.sh`) fails when this crate depends on kube or tokio.

mod readiness;
mod report;
mod types;

pub use readiness::Readiness;
pub use report::ProbeReport;
pub use types::{ProbeOutcome, ProbeStage, SslMode, TargetSessionAttrs};
