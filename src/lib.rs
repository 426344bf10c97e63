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

/// The process's allocator: mimalloc instead of glibc's malloc, for every binary that links the
/// operator (the command, the benches, the integration tests; the unit tests count allocations
/// with an allocator of their own). At 10,000 pools glibc held 336 MiB of arenas for 132 MiB in
/// use, and `malloc_trim` gave little of the 204 MiB free back (the freed blocks of the setup's
/// burst lie between live ones); mimalloc keeps blocks of one size class together per page and
/// returns the pages that empty (docs/benchmarks.md, issue 29).
#[cfg(not(test))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
