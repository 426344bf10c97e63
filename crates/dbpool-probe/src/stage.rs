//! The clock of one probe and the shape of a stage failure.
//!
//! Lives here: [`Clock`], which gives each stage what is left of the probe's budget (or its
//! learned limit, when shorter: `adaptive`) and records
//! how long each stage took, and [`Failure`], a classified stage failure. Must not live here: the
//! stages themselves or the rules that classify errors (`classify`).

use std::{future::Future, time::Duration};

use tokio::time::Instant;

use crate::{ProbeOutcome, ProbeStage, StageTimeouts};

/// A stage that failed, already classified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    /// TransientFailure, ConfigFailure or WrongRole.
    pub outcome: ProbeOutcome,
    /// The stage that failed.
    pub stage: ProbeStage,
    /// Short, human, without any password.
    pub message: String,
    /// SQLSTATE of the server's error, if any.
    pub sql_state: Option<String>,
    /// The connection this happened on cannot be used any more (closed, reset, or a request is
    /// still pending after a timeout).
    pub broken: bool,
    /// The failure is evidence about the network path rather than the server: a timeout (of
    /// any stage), an unreachable network or host, or a failed host lookup. See
    /// [`ProbeReport::path_evidence`](crate::ProbeReport::path_evidence).
    pub path_evidence: bool,
}

impl Failure {
    /// An outage-type failure.
    pub fn transient(stage: ProbeStage, message: impl Into<String>) -> Self {
        Self {
            outcome: ProbeOutcome::TransientFailure,
            stage,
            message: message.into(),
            sql_state: None,
            broken: true,
            path_evidence: false,
        }
    }

    /// An outage-type failure that is evidence about the network path (timeout, unreachable,
    /// failed lookup).
    pub fn path(stage: ProbeStage, message: impl Into<String>) -> Self {
        Self {
            path_evidence: true,
            ..Self::transient(stage, message)
        }
    }

    /// A configuration mistake.
    pub fn config(stage: ProbeStage, message: impl Into<String>) -> Self {
        Self {
            outcome: ProbeOutcome::ConfigFailure,
            stage,
            message: message.into(),
            sql_state: None,
            broken: false,
            path_evidence: false,
        }
    }

    /// The stage ran out of the probe's budget while doing `what`.
    pub fn timeout(stage: ProbeStage, what: &str, budget: Duration) -> Self {
        Self::path(
            stage,
            format!("{what} timed out (probe timeout {budget:?})"),
        )
    }
}

/// The budget of one probe: a start, a deadline, and the latency of each stage run so far.
#[derive(Debug)]
pub(crate) struct Clock {
    start: Instant,
    deadline: Instant,
    /// A nearer deadline for the current part of the probe (one address of several).
    cap: Option<Instant>,
    budget: Duration,
    /// Each stage's own limit, learned (adaptive timeouts; none when off).
    limits: StageTimeouts,
    /// Wall time of each stage that ran, in order.
    pub stages: Vec<(ProbeStage, Duration)>,
}

impl Clock {
    /// Starts the clock of a probe allowed to take `budget`.
    #[cfg(test)]
    pub fn start(budget: Duration) -> Self {
        Self::limited(budget, StageTimeouts::none())
    }

    /// Starts the clock of a probe allowed to take `budget`, each stage at most its limit.
    pub fn limited(budget: Duration, limits: StageTimeouts) -> Self {
        let start = Instant::now();
        Self {
            start,
            deadline: start + budget,
            cap: None,
            budget,
            limits,
            stages: Vec::new(),
        }
    }

    /// The stage limits this probe runs with.
    pub fn limits(&self) -> &StageTimeouts {
        &self.limits
    }

    /// What a wait limited to `limit` may take from now: the remaining budget, or less.
    pub fn remaining_within(&self, limit: Option<Duration>) -> Duration {
        let remaining = self.remaining();
        limit.map_or(remaining, |limit| limit.min(remaining))
    }

    /// The timeout failure of a wait limited to `limit` (the message names the learned limit
    /// when it was shorter than the budget).
    pub fn timed_out(&self, stage: ProbeStage, what: &str, limit: Option<Duration>) -> Failure {
        match limit.filter(|limit| *limit < self.budget) {
            Some(limit) => Failure::path(
                stage,
                format!(
                    "{what} timed out (adaptive timeout {limit:?}, probe timeout {:?})",
                    self.budget
                ),
            ),
            None => Failure::timeout(stage, what, self.budget),
        }
    }

    /// The probe's whole budget.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// What is left of the budget (or of the cap, when one is set).
    pub fn remaining(&self) -> Duration {
        let deadline = self.cap.map_or(self.deadline, |cap| cap.min(self.deadline));
        deadline.saturating_duration_since(Instant::now())
    }

    /// Until [`Clock::uncap`], stages get at most `share` from now.
    pub fn cap(&mut self, share: Duration) {
        self.cap = Some(Instant::now() + share);
    }

    /// Removes the cap set by [`Clock::cap`].
    pub fn uncap(&mut self) {
        self.cap = None;
    }

    /// Time since the probe started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Records that `stage` took `took`.
    pub fn record(&mut self, stage: ProbeStage, took: Duration) {
        self.stages.push((stage, took));
    }

    /// Runs `fut` as `stage` within what is left of the budget and records its latency. On
    /// timeout the failure says `what` timed out.
    pub async fn stage<T, F>(&mut self, stage: ProbeStage, what: &str, fut: F) -> Result<T, Failure>
    where
        F: Future<Output = Result<T, Failure>>,
    {
        let began = Instant::now();
        let limit = self.limits.get(stage);
        let result = tokio::time::timeout(self.remaining_within(limit), fut).await;
        self.record(stage, began.elapsed());
        match result {
            Ok(inner) => inner,
            Err(_) => Err(self.timed_out(stage, what, limit)),
        }
    }
}
