//! The chaos soak's pure half: what a soak run records and how it is judged (issue #27).
//!
//! Lives here: the history's types (`history`), reading the apiserver's audit log and
//! PostgreSQL's connection log and the operators' term starts into history records (`audit`,
//! `pglog`, `oplog`), the seeded nemesis
//! schedule (`plan`, with its own small PRNG in `rng`) and the checkers (`checks`): history in,
//! verdicts out, each proven able to fail by unit tests that feed it a doctored history.
//! Must not live here: anything that starts a process, opens a socket or reads a clock; that is
//! the `dbpool-soak` binary's (`src/bin/soak/`), which runs the world, injects the faults and
//! records the history.

pub mod audit;
pub mod checks;
pub mod history;
pub mod oplog;
pub mod pglog;
pub mod plan;
pub mod rng;
