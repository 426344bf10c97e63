//! The test and benchmark kit: everything the operator's tests, the client's tests and the
//! benchmark need to run against the real thing.
//!
//! Lives here: a real control plane client and test namespaces (`kube`), real PostgreSQL servers
//! (`postgres`), fake hostile servers (`hostile`), a counting fake server that tells credentialed
//! attempts from readiness pings (`counting`), the TCP fault proxy (`proxy`), DbPool
//! manifests and status waits (`pools`), helm (`helm`), free loopback ports (`ports`), the
//! operator as a process (`process`) and condition waits with deadlines (`wait`).
//! Must not live here: the operator itself (this kit is a dev-dependency of the operator, so it
//! cannot depend on it), and assertions about behaviour (those belong to the tests).

pub mod counting;
pub mod helm;
pub mod hostile;
pub mod kube;
pub mod pools;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod wait;
