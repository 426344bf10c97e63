//! dbpool-operator: keeps PostgreSQL connection pools out of a permanent failure state.
//!
//! The operator package. Lives here: the controller (the only code that writes to the
//! apiserver), the command line and its single set of defaults (`cli`), and the process's
//! metrics. Must not live here: the API types (`dbpool-api`), recovery decisions
//! (`dbpool-recovery`) or talking to PostgreSQL (`dbpool-probe`); they are re-exported under their
//! old names (`api`, `recovery`, `probe`) for the controller's and the tests' convenience.
//!
//! - `cli`: the `dbpool-operator` command's arguments and their one mapping to [`controller::OperatorConfig`].
//! - `controller`: the reconcile pipeline, leadership, watches and event publishing.
//! - `metrics`: Prometheus metrics, readiness and leadership of one process.
pub use dbpool_api as api;
pub use dbpool_probe as probe;
pub use dbpool_recovery as recovery;

pub mod cli;
pub mod controller;
pub mod metrics;
