//! The phases of a run, in the order `Run::execute` calls them; each adds rows to the run's
//! report.
//!
//! Lives here, one phase per module, each an `impl Run` block:
//! - `setup`: create N pools, wait until all are Healthy;
//! - `steady`: the long interval: CPU, RSS, schedule fidelity, status writes;
//! - `fast`: every pool patched to the short interval, a quiet window; `churn`: a window with
//!   connection churn on every server;
//! - `isolated`: one pool failing at a time among N healthy ones, many staggered faults;
//! - `fault`: stop servers, time to Open and detection overhead, start them, time to Closed;
//! - `force_reopen`: the annotation on the sample (breaker Open, database up);
//! - `restart`: SIGKILL into a new operator, resume spread, writes and memory;
//! - `coalescing`: shared connections against one connection per pool;
//! - `recovery` (opt-in): default-spec pools of its own; server ready → watch sees Ready after
//!   outages, crash recovery and a fleet restart;
//! - `floor` (last): the apiserver's own time for the fault's N status writes, operator stopped.
//!
//! Must not live here: helpers more than one phase uses (`run`), formatting (`report`), /proc
//! (`procfs`).

mod churn;
mod coalescing;
mod fast;
mod fault;
mod floor;
mod force_reopen;
mod isolated;
mod recovery;
mod restart;
mod setup;
mod steady;

pub use floor::Together;
