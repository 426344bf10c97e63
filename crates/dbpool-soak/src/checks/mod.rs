//! The checkers: pure functions from a [`History`] to [`Violation`]s, one per invariant of
//! issue #27.
//!
//! Lives here: [`Violation`], [`Bounds`] (every tolerance a checker uses, stated once), [`run`]
//! (all checkers of a run) and the checkers themselves: `writes` (no stale write, force-reopen
//! tokens acted on once, every breaker move explained) and `world` (convergence, cost, leaks,
//! passwords, isolation). Must not live here: gathering the history, clocks, processes.

mod world;
mod writes;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use crate::history::{History, Ms};

pub use world::{
    check_convergence, check_cost, check_isolation, check_leaks, check_passwords, cost_bounds,
};
pub use writes::{check_breaker_moves, check_stale_writes, check_tokens};

/// The database the isolated pools name: any login to it is an isolation breach.
pub const ISOLATED_DB: &str = "soak_isolated";

/// One broken invariant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Violation {
    /// The checker's name.
    pub checker: String,
    /// The pool (or target, or source) it is about.
    pub subject: String,
    /// What is wrong.
    pub message: String,
    /// The slice of history that shows it.
    pub slice: Vec<String>,
}

impl Violation {
    pub(crate) fn new(checker: &str, subject: &str, message: String, slice: Vec<String>) -> Self {
        Violation {
            checker: checker.to_owned(),
            subject: subject.to_owned(),
            message,
            slice,
        }
    }
}

/// The tolerances, stated once (docs/reliability.md gives their reasons).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Bounds {
    /// How long after a fault's end its failures may still be what a status write reports
    /// (write budget, apiserver restarts, a leader change in between), ms.
    pub explain_after_ms: Ms,
    /// How long a down target must have been down before a write closing the breaker is
    /// suspicious (the write may carry a probe from just before the fault), ms. A write delayed
    /// by an operator or control-plane fault in the `explain_after_ms` before it is not judged.
    pub closed_grace_ms: Ms,
    /// Extra operator sessions per target allowed at the end over the baseline.
    pub session_slack: i64,
    /// Extra fds allowed at the end over the baseline.
    pub fd_slack: f64,
    /// RSS: the median of the last third may be this many times the first third's.
    pub rss_ratio: f64,
    /// RSS is judged only for processes sampled at least this long, ms.
    pub rss_min_span_ms: Ms,
    /// The cost model's smallest retry delay (the soak pools' backoff.initialDelay), ms.
    pub min_retry_ms: Ms,
    /// The cost model's reconnect period of a healthy shared connection, ms.
    pub reconnect_ms: Ms,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            explain_after_ms: 30_000,
            closed_grace_ms: 8_000,
            session_slack: 1,
            fd_slack: 16.0,
            rss_ratio: 1.1,
            rss_min_span_ms: 10 * 60_000,
            min_retry_ms: 300,
            reconnect_ms: 300_000,
        }
    }
}

/// Every checker's verdicts on `history` (password and isolation checks need the texts: pass
/// every log and dump as (source, text), and every password the run ever used).
pub fn run(
    history: &History,
    bounds: &Bounds,
    passwords: &[String],
    texts: &[(String, String)],
) -> Vec<(String, Vec<Violation>)> {
    vec![
        ("stale-write".to_owned(), check_stale_writes(history)),
        ("force-reopen-once".to_owned(), check_tokens(history)),
        ("convergence".to_owned(), check_convergence(history)),
        (
            "breaker-explained".to_owned(),
            check_breaker_moves(history, bounds),
        ),
        ("cost".to_owned(), check_cost(history, bounds)),
        ("leaks".to_owned(), check_leaks(history, bounds)),
        ("no-password".to_owned(), check_passwords(passwords, texts)),
        ("isolation".to_owned(), check_isolation(history)),
    ]
}
