//! The checkers: pure functions from a [`History`] to [`Violation`]s, one per invariant of
//! issue #27.
//!
//! Lives here: [`Violation`], [`Bounds`] (every tolerance a checker uses, stated once), [`run`]
//! (all checkers of a run) and the checkers themselves: `writes` (no stale write, force-reopen
//! tokens acted on once, every breaker move explained), `cost` (the replay through
//! `dbpool-recovery`) and `world` (convergence, leaks, passwords, isolation). Must not live here: gathering the history, clocks, processes.

mod cost;
mod world;
mod writes;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use crate::history::{History, Ms};

pub use cost::{TargetCost, check_cost, replay_cost, soak_policy};
pub use world::{check_convergence, check_isolation, check_leaks, check_passwords};
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
    /// The cost replay's reconnect period of a healthy connection (the prober's
    /// `reconnect_every`), ms.
    pub reconnect_ms: Ms,
    /// The cost replay: how long before a new term's first write its leader may already log in
    /// (it took the lease, restored its pools and probed them before writing), ms.
    pub leader_lead_ms: Ms,
    /// The cost replay: how much earlier than the allowed instant an attempt may come (fault
    /// edges are recorded around the change, not at it), ms.
    pub cost_early_ms: Ms,
    /// The cost replay: how much later than the allowed instant an attempt may come (the
    /// reconcile queue and write budget on a loaded machine, a login of three round trips under
    /// added latency, the probe's timeout), ms.
    pub cost_late_ms: Ms,
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
            reconnect_ms: 300_000,
            leader_lead_ms: 4_000,
            cost_early_ms: 2_000,
            cost_late_ms: 10_000,
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
